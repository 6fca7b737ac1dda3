//! A connection to the agent of one process.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use livepatch_protocol::{Command, Outcome, Progress, Request, Response, Status, socket_path};

/// A connected client.
pub struct Client {
    pid: u32,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connects to the agent of `pid`.
    pub fn connect(pid: u32) -> anyhow::Result<Client> {
        let path = socket_path(pid);
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            bail!("no process {pid}");
        }
        let stream = UnixStream::connect(&path).map_err(|e| {
            anyhow!(
                "no livepatch agent answers in process {pid} ({}: {e}); start the program with \
                 `livepatch run PROGRAM` or with LD_PRELOAD=$(livepatch agent-path)",
                path.display()
            )
        })?;
        // The agent answers at once except while it runs a transition step;
        // a minute covers even a patch of many thousand functions.
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let writer = stream.try_clone()?;
        Ok(Client {
            pid,
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Sends a request and returns the outcome; an error outcome becomes an
    /// error that carries the agent's message.
    pub fn call(&mut self, command: Command) -> anyhow::Result<Outcome> {
        let mut line = serde_json::to_string(&Request::new(command))?;
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .with_context(|| format!("sending a request to the agent of process {}", self.pid))?;
        let mut reply = String::new();
        let n = self
            .reader
            .read_line(&mut reply)
            .with_context(|| format!("reading the answer of the agent of process {}", self.pid))?;
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
