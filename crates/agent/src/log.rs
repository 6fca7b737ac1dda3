//! The agent's log: every line of the core (the kernel's format strings)
//! and of patch code, in a ring buffer the CLI reads, and with
//! `LIVEPATCH_LOG=stderr` also on the process's standard error, one line
//! per write, as it happens.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Mutex;

use livepatch_core::{Level, LogRecord};
use livepatch_protocol::LogLine;

/// Who wrote a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// The core or the agent, at a printk level.
    Livepatch(Level),
    /// Patch code, through `klp_log`.
    Patch,
}

impl Source {
    /// The level the protocol shows: the printk level's name, or "patch".
    fn name(self) -> &'static str {
        match self {
            Source::Livepatch(level) => level.as_str(),
            Source::Patch => "patch",
        }
    }
}

/// How many lines the ring keeps.
const CAPACITY: usize = 16 * 1024;

/// The environment variable that selects where lines go besides the ring.
pub const LOG_ENV: &str = "LIVEPATCH_LOG";

/// The log of one process.
#[derive(Debug)]
pub struct AgentLog {
    ring: Mutex<Ring>,
    to_stderr: bool,
}

/// The log's lock, held (see [`AgentLog::hold`]).
#[derive(Debug)]
pub struct LogHold<'a>(#[allow(dead_code)] std::sync::MutexGuard<'a, Ring>);

#[derive(Debug, Default)]
struct Ring {
    lines: VecDeque<LogLine>,
    next_seq: u64,
}

impl AgentLog {
    /// A log that also writes to stderr when `LIVEPATCH_LOG=stderr`.
    pub fn from_env() -> Self {
        let to_stderr = std::env::var(LOG_ENV).is_ok_and(|v| v.split(',').any(|w| w == "stderr"));
        AgentLog {
            ring: Mutex::new(Ring {
                lines: VecDeque::new(),
                next_seq: 1,
            }),
            to_stderr,
        }
    }

    /// Appends a line of the core. The per-thread lines of
    /// `klp_try_switch_task` go to the ring only, as the kernel selftests
    /// switch them off.
    pub fn core(&self, record: &LogRecord) {
        self.push(
            Source::Livepatch(record.level),
            &record.text,
            !record.per_thread,
        );
    }

    /// Appends a line written by patch code (`klp_log`).
    pub fn patch_line(&self, text: &str) {
        self.push(Source::Patch, text, true);
    }

    /// Appends a line of the agent itself, with the `livepatch: ` prefix of the core's lines.
    pub fn agent(&self, level: Level, text: std::fmt::Arguments<'_>) {
        let line = format!("{}{text}", livepatch_core::log::PREFIX);
        self.push(Source::Livepatch(level), &line, true);
    }

    fn push(&self, source: Source, text: &str, echo: bool) {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let seq = ring.next_seq;
        ring.next_seq += 1;
        if ring.lines.len() == CAPACITY {
            ring.lines.pop_front();
        }
        ring.lines.push_back(LogLine {
            seq,
            level: source.name().to_string(),
            text: text.to_string(),
        });
        // Written under the ring's lock so that lines reach stderr in
        // sequence order, each in a single write.
        if echo && self.to_stderr {
            let mut line = String::with_capacity(text.len() + 1);
            line.push_str(text);
            line.push('\n');
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }

    /// Holds the ring's lock until the value is dropped: across a `fork`, so that the child's
    /// copy of the lock is not held by a thread the child does not have.
    pub fn hold(&self) -> LogHold<'_> {
        LogHold(self.ring.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The lines with a sequence number above `after`.
    pub fn since(&self, after: u64) -> Vec<LogLine> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.lines
            .iter()
            .filter(|l| l.seq > after)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_numbered_and_read_after_a_sequence() {
        let log = AgentLog {
            ring: Mutex::new(Ring {
                lines: VecDeque::new(),
                next_seq: 1,
            }),
            to_stderr: false,
        };
        log.patch_line("a");
        log.agent(Level::Notice, format_args!("b"));
        let all = log.since(0);
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].seq, 2);
        assert_eq!(all[0].level, "patch");
        assert_eq!(all[1].level, "notice");
        assert_eq!(log.since(1)[0].text, "livepatch: b");
        assert!(log.since(2).is_empty());
    }
}
