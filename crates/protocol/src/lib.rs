//! The control protocol between the `livepatch` command and the agent inside
//! a process.
//!
//! The agent listens on a Unix socket per process, `<base>/<uid>/<pid>.sock`
//! (see [`socket`]): a directory per user that only that user can write, in a
//! base directory every user can create theirs in. A client connects, checks
//! with the peer's credentials that the process it asked for answers, writes
//! one request as a line of JSON, and reads one response line; then it may
//! send the next request on the same connection. The agent accepts only its
//! own user and root (checked with the peer's credentials).
//!
//! Every message carries the protocol version; an agent refuses a request of
//! another version with an error that names both.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

use serde::{Deserialize, Serialize};

/// The protocol version; bumped on any incompatible change.
pub const VERSION: u32 = 2;

pub mod directories;
pub mod socket;

/// A request line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// [`VERSION`] of the client.
    pub v: u32,
    /// What to do.
    #[serde(flatten)]
    pub command: Command,
}

/// What a client asks the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Load a patch library and enable its patch (`insmod`).
    Load {
        /// Absolute path of the library.
        path: String,
    },
    /// Start disabling a patch (write 0 to `enabled`); reverses a patching
    /// transition of that patch.
    Disable {
        /// The patch name.
        patch: String,
    },
    /// Write 1 to `enabled`: reverses an unpatching transition.
    Enable {
        /// The patch name.
        patch: String,
    },
    /// Force the transition of a patch (write 1 to `force`).
    Force {
        /// The patch name.
        patch: String,
    },
    /// Unload the library of a disabled patch (`rmmod`).
    Unload {
        /// The patch name.
        patch: String,
    },
    /// Report the patches and threads.
    Status,
    /// Answer with the [`Progress`] of `patch` as soon as it is no longer in transition, or
    /// after `timeout_ms` (a client shows progress between waits).
    Wait {
        /// The patch name.
        patch: String,
        /// The longest the agent holds the answer back.
        timeout_ms: u64,
    },
    /// Report log lines with a sequence number above `after`.
    Log {
        /// The last sequence number the client has seen (0: from the start).
        after: u64,
    },
}

/// A response line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// [`VERSION`] of the agent.
    pub v: u32,
    /// The outcome.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// The outcome of a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    /// Done; `patch` names the patch a load enabled.
    Done {
        /// The patch concerned, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        patch: Option<String>,
    },
    /// The status.
    Status(Status),
    /// The progress of a transition (the answer to a wait).
    Progress(Progress),
    /// Log lines.
    Log {
        /// The lines, oldest first.
        lines: Vec<LogLine>,
    },
    /// Refused or failed, with the errno and a message that says what and why.
    Error {
        /// The Linux errno of the failure (0 if none applies).
        errno: i32,
        /// What failed and why.
        message: String,
    },
}

/// Where a transition stands: what a client waiting for it needs, without the cost of a full
/// [`Status`] (the names of every thread, every function of every patch).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The transition running now, if any (it may be another patch's).
    pub transition: Option<TransitionStatus>,
    /// Whether the patch waited for is enabled; `None` when it is gone.
    pub enabled: Option<bool>,
    /// How many threads the process has.
    pub threads: usize,
    /// The threads that still have to switch, when the waited-for patch is in transition.
    pub pending: Vec<ThreadStatus>,
}

/// One line of the agent's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Sequence number, from 1, increasing.
    pub seq: u64,
    /// The level: err, warn, notice, info, debug, or "patch" for lines of
    /// patch code.
    pub level: String,
    /// The text.
    pub text: String,
}

/// What `/sys/kernel/livepatch` and `/proc/*/patch_state` show for a
/// process: the document `livepatch status --json` prints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The process id.
    pub pid: u32,
    /// The patch in transition and its target, if any.
    pub transition: Option<TransitionStatus>,
    /// The active patches, in enable order.
    pub patches: Vec<PatchStatus>,
    /// Loaded patch libraries whose patch is no longer active.
    pub unloadable: Vec<LibraryStatus>,
    /// The threads of the process.
    pub threads: Vec<ThreadStatus>,
}

/// The transition in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransitionStatus {
    /// The patch in transition.
    pub patch: String,
    /// "patched" or "unpatched".
    pub target: String,
}

/// One active patch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchStatus {
    /// The patch name.
    pub name: String,
    /// The library it came from.
    pub library: String,
    /// `enabled`.
    pub enabled: bool,
    /// `transition`.
    pub transition: bool,
    /// Took part in a forced transition: its library can never be unloaded.
    pub forced: bool,
    /// `replace`.
    pub replace: bool,
    /// `stack_order`.
    pub stack_order: usize,
    /// The objects.
    pub objects: Vec<ObjectStatus>,
}

/// One object of a patch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectStatus {
    /// The object name; "vmlinux" is the main executable, as in the kernel.
    pub name: String,
    /// `patched`.
    pub patched: bool,
    /// The funcs.
    pub funcs: Vec<FuncStatus>,
}

/// One func of an object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FuncStatus {
    /// `old_name`.
    pub name: String,
    /// `old_sympos` (0 shown as given).
    pub sympos: u64,
    /// A nop of atomic replace.
    pub nop: bool,
    /// Address of the original, while the object is loaded.
    pub old_addr: Option<u64>,
    /// Address of the replacement.
    pub new_addr: u64,
    /// On its func stack.
    pub patched: bool,
    /// In transition.
    pub transition: bool,
}

/// A patch library that is still loaded but whose patch is not active.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LibraryStatus {
    /// The patch name.
    pub patch: String,
    /// The library path.
    pub library: String,
    /// Forced: can never be unloaded.
    pub forced: bool,
}

/// One thread.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadStatus {
    /// The thread id.
    pub tid: i32,
    /// The thread name.
    pub name: String,
    /// -1 idle, 0 unpatched, 1 patched (`/proc/<pid>/patch_state`).
    pub patch_state: i8,
    /// Still has to switch.
    pub pending: bool,
    /// Why it could not switch at the last attempt: the function it is
    /// in, or a reason in parentheses ("(running: did not answer the check)",
    /// "(blocks signal N: ...)", "(stack could not be checked)").
    pub blocking: Option<String>,
}

impl Request {
    /// A request of this protocol version.
    pub fn new(command: Command) -> Self {
        Request {
            v: VERSION,
            command,
        }
    }
}

impl Response {
    /// A response of this protocol version.
    pub fn new(outcome: Outcome) -> Self {
        Response {
            v: VERSION,
            outcome,
        }
    }

    /// An error response.
    pub fn error(errno: i32, message: impl Into<String>) -> Self {
        Self::new(Outcome::Error {
            errno,
            message: message.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_are_single_json_lines() {
        let r = Request::new(Command::Disable {
            patch: "fix".into(),
        });
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(line, r#"{"v":2,"cmd":"disable","patch":"fix"}"#);
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r);

        let e = Response::error(16, "busy");
        let line = serde_json::to_string(&e).unwrap();
        assert_eq!(
            line,
            r#"{"v":2,"result":"error","errno":16,"message":"busy"}"#
        );
        assert_eq!(serde_json::from_str::<Response>(&line).unwrap(), e);

        let s = Response::new(Outcome::Status(Status {
            pid: 7,
            ..Default::default()
        }));
        let back: Response = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);

        let w = Request::new(Command::Wait {
            patch: "fix".into(),
            timeout_ms: 250,
        });
        let line = serde_json::to_string(&w).unwrap();
        assert_eq!(
            line,
            r#"{"v":2,"cmd":"wait","patch":"fix","timeout_ms":250}"#
        );
        let p = Response::new(Outcome::Progress(Progress {
            threads: 3,
            enabled: Some(true),
            ..Default::default()
        }));
        let back: Response = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }
}
