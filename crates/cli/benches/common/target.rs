//! The program a bench measures: started with or without the agent preloaded, asked one line
//! at a time.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use crate::support::scratch;

pub struct Target {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Target {
    /// Starts `program` (with the agent preloaded when `agent` is given) and waits for its
    /// `ready` line.
    pub fn start(agent: Option<&Path>, program: &Path, args: &[String]) -> Self {
        let mut command = Command::new(program);
        command
            .args(args)
            .env("LIVEPATCH_SOCKET_DIR", scratch().join("sockets"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if let Some(agent) = agent {
            command.env("LD_PRELOAD", agent);
        }
        let mut child = command.spawn().expect("program starts");
        let stdin = child.stdin.take().unwrap();
        let mut target = Target {
            stdout: BufReader::new(child.stdout.take().unwrap()),
            stdin,
            child,
        };
        assert_eq!(target.line(), "ready");
        target
    }

    pub fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("program output");
        line.trim_end().to_string()
    }

    pub fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        self.line()
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
