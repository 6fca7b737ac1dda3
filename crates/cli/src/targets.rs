//! The processes one command acts on: the process named, or with `--children` that process and
//! every descendant that has an agent, each connected before anything is asked of any.

use std::time::Instant;

use crate::client::Client;
use crate::process_tree;
use crate::socket::NoAgent;

/// A process the command acts on, connected.
pub struct Target {
    pub pid: u32,
    pub client: Client,
}

/// Connects to `pid`, and with `children` to each of its descendants that has an agent; a
/// descendant without one is named on standard error and passed over, one that exited meanwhile
/// is passed over; any other failure (a socket not to be trusted, a process that does not
/// answer) fails the command before anything was asked.
pub fn reach(pid: u32, children: bool, deadline: Instant) -> anyhow::Result<Vec<Target>> {
    if !children {
        return Ok(vec![Target {
            pid,
            client: Client::connect(pid, deadline)?,
        }]);
    }
    let mut targets = Vec::new();
    for each in process_tree::with_descendants(pid) {
        match Client::connect(each, deadline) {
            Ok(client) => targets.push(Target { pid: each, client }),
            Err(e) if each != pid && e.downcast_ref::<NoAgent>().is_some() => eprintln!(
                "livepatch: process {each} ({}), a descendant of {pid}, has no agent: passed over",
                process_tree::command_name(each)
            ),
            Err(_) if each != pid && process_tree::parent_of(each).is_none() => {}
            Err(e) if each == pid => return Err(e),
            Err(e) => {
                return Err(e.context(format!(
                    "process {each}, a descendant of {pid}: nothing was done in any process"
                )));
            }
        }
    }
    Ok(targets)
}
