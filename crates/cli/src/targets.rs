//! The processes one command acts on: the process named, or with `--children` that process and
//! every descendant that has an agent or (for `load`) can get one, each connected before
//! anything is asked of any.

use std::os::unix::fs::MetadataExt;
use std::time::Instant;

use crate::client::Client;
use crate::process_tree;
use crate::socket::NoAgent;

/// A process the command acts on, connected.
pub struct Target {
    pub pid: u32,
    pub client: Client,
}

/// Whether processes without an agent get one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// Attach the agent to the process named and to descendants that run the same program.
    Missing,
    /// Only processes that have an agent.
    Never,
}

/// Connects to `pid`, and with `children` to each of its descendants. A process without an
/// agent gets one with [`Attach::Missing`] (a descendant only if it runs the program the
/// process named runs: a child that exec'd another program has nothing of it to patch); one
/// that does not is named on standard error and passed over, as is one that exited
/// meanwhile. Any other failure (a socket not to be trusted, a process that does not answer, an
/// attach refused) fails the command before anything was asked of any process.
pub fn reach(
    pid: u32,
    children: bool,
    attach: Attach,
    deadline: Instant,
) -> anyhow::Result<Vec<Target>> {
    let tree = if children {
        process_tree::with_descendants(pid)
    } else {
        vec![pid]
    };
    let program = program_of(pid);
    let mut targets = Vec::new();
    for each in tree {
        let connected = match Client::connect(each, deadline) {
            Err(e) if e.downcast_ref::<NoAgent>().is_some() && attach == Attach::Missing => {
                if each != pid && program_of(each) != program {
                    eprintln!(
                        "livepatch: process {each} ({}), a descendant of {pid}, has no agent and \
                         runs another program: passed over",
                        process_tree::command_name(each)
                    );
                    continue;
                }
                crate::commands::attach_agent(each, deadline)
                    .and_then(|()| Client::connect(each, deadline))
            }
            other => other,
        };
        match connected {
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

/// The program file a process runs (device and inode of `/proc/PID/exe`).
fn program_of(pid: u32) -> Option<(u64, u64)> {
    std::fs::metadata(format!("/proc/{pid}/exe"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}
