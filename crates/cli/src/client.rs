//! A connection to the agent of one process.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use livepatch_protocol::{Command, Outcome, Progress, Request, Response, Status};

use crate::socket;

/// A connected client, whose every exchange ends by its deadline.
pub struct Client {
    pid: u32,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    deadline: Instant,
}

impl Client {
    /// Connects to the agent of `pid`, checking that it is that process that answers; nothing
    /// of this connection waits past `deadline`.
    pub fn connect(pid: u32, deadline: Instant) -> anyhow::Result<Client> {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            bail!("no process {pid}");
        }
        let stream = socket::connect_to(pid, deadline)?;
        let writer = stream.try_clone()?;
        Ok(Client {
            pid,
            reader: BufReader::new(stream),
            writer,
            deadline,
        })
    }

    /// The time left before the deadline, at least a millisecond (a zero timeout means
    /// "forever" to the socket).
    fn left(&self) -> anyhow::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.silent());
        }
        Ok(left.max(Duration::from_millis(1)))
    }

    fn silent(&self) -> anyhow::Error {
        anyhow!(
            "process {} does not answer (state {})",
            self.pid,
            socket::process_state(self.pid)
        )
    }

    /// Moves the deadline (for `log --follow`, whose every request gets the timeout).
    pub fn extend_deadline(&mut self, deadline: Instant) {
        self.deadline = deadline;
    }

    /// Sends a request and returns the outcome; an error outcome becomes an
    /// error that carries the agent's message.
    pub fn call(&mut self, command: Command) -> anyhow::Result<Outcome> {
        let mut line = serde_json::to_string(&Request::new(command))?;
        line.push('\n');
        self.writer.set_write_timeout(Some(self.left()?))?;
        if let Err(e) = self.writer.write_all(line.as_bytes()) {
            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                return Err(self.silent());
            }
            return Err(e).with_context(|| {
                format!("sending a request to the agent of process {}", self.pid)
            });
        }
        let mut reply = String::new();
        self.reader.get_ref().set_read_timeout(Some(self.left()?))?;
        let n = match self.reader.read_line(&mut reply) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(self.silent());
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("reading the answer of the agent of process {}", self.pid)
                });
            }
        };
        if n == 0 {
            bail!("the agent of process {} closed the connection", self.pid);
        }
        let response: Response = serde_json::from_str(&reply).with_context(|| {
            format!(
                "the agent of process {} sent an answer this version does not understand",
                self.pid
            )
        })?;
        match response.outcome {
            // The errno is what insmod or a sysfs write would have failed with.
            Outcome::Error { message, errno } if errno > 0 => Err(anyhow!(
                "{message} [{}]",
                std::io::Error::from_raw_os_error(errno)
            )),
            Outcome::Error { message, .. } => Err(anyhow!(message)),
            other => Ok(other),
        }
    }

    /// The progress of `patch` once it left its transition, or after `timeout`.
    pub fn wait(&mut self, patch: &str, timeout: Duration) -> anyhow::Result<Progress> {
        let command = Command::Wait {
            patch: patch.to_string(),
            timeout_ms: timeout.as_millis().try_into().unwrap_or(u64::MAX),
        };
        match self.call(command)? {
            Outcome::Progress(p) => Ok(p),
            _ => bail!(
                "the agent of process {} gave an unexpected answer to a wait request",
                self.pid
            ),
        }
    }

    /// The status of the process.
    pub fn status(&mut self) -> anyhow::Result<Status> {
        match self.call(Command::Status)? {
            Outcome::Status(s) => Ok(s),
            _ => bail!(
                "the agent of process {} gave an unexpected answer to a status request",
                self.pid
            ),
        }
    }
}
