//! What every end-to-end test needs: the agent built once, C programs and patches compiled by
//! the test, the `livepatch` command, and a target program whose output and
//! `LIVEPATCH_LOG=stderr` lines are read in order as they happen.
#![allow(dead_code)] // Each test binary uses a different part.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

pub const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// The agent library, built once per test process (nextest has released the build lock).
pub fn agent() -> &'static Path {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-q", "-p", "livepatch-agent"])
            .current_dir(WORKSPACE)
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the agent failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| Path::new(WORKSPACE).join("target"), PathBuf::from);
        let path = target.join("debug/liblivepatch_agent.so");
        assert!(path.exists(), "{} missing", path.display());
        path
    })
}

pub fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("livepatch-e2e-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("sockets")).unwrap();
    dir
}

pub fn compile(name: &str, source: &str, shared: bool) -> PathBuf {
    let dir = scratch();
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source).unwrap();
    let out = dir.join(if shared {
        format!("{name}.so")
    } else {
        name.to_string()
    });
    let mut cc = Command::new("cc");
    cc.args(["-O2", "-g", "-pthread", "-o"]).arg(&out).arg(&src);
    cc.arg(format!("-I{WORKSPACE}/include"));
    if shared {
        cc.args(["-shared", "-fPIC"]);
    } else {
        cc.arg("-rdynamic");
    }
    let status = cc.status().expect("cc");
    assert!(status.success(), "compiling {name}");
    out
}

pub fn livepatch() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_livepatch"));
    command
        .env("LIVEPATCH_AGENT", agent())
        .env("LIVEPATCH_SOCKET_DIR", scratch().join("sockets"));
    command
}

pub fn cli(args: &[&str]) -> Output {
    livepatch().args(args).output().expect("livepatch runs")
}

/// A program under the agent, its stdout and stderr lines merged into one channel.
pub struct Target {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Target {
    /// Starts `program` under the agent and waits for its line containing "ready" and for the
    /// agent's socket.
    pub fn start(program: &Path) -> Self {
        Self::start_with(program, &[], "ready")
    }

    /// Like [`Target::start`], with arguments and the text of the program's ready line.
    pub fn start_with(program: &Path, args: &[&str], ready: &str) -> Self {
        let mut child = livepatch()
            .arg("run")
            .arg("--")
            .arg(program)
            .args(args)
            .env("LIVEPATCH_LOG", "stderr")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("livepatch run");
        let (tx, lines) = channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let stdin = child.stdin.take().unwrap();
        let mut target = Target {
            child,
            stdin,
            lines,
            seen: Vec::new(),
        };
        target.expect(ready);
        // The agent's socket exists before main runs; wait for it to accept.
        let socket = scratch()
            .join("sockets")
            .join(format!("{}.sock", target.pid()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "no agent socket {}",
                socket.display()
            );
            std::thread::yield_now();
        }
        target
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Waits for a line containing `text`; returns it.
    pub fn expect(&mut self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    panic!("no line with {text:?}; saw:\n{}", self.seen.join("\n"))
                }
            }
        }
    }

    /// Like `expect`, but also satisfied by a line already seen (for lines whose order against
    /// others is not fixed).
    pub fn saw_or_expect(&mut self, text: &str) {
        if !self.seen.iter().any(|l| l.contains(text)) {
            self.expect(text);
        }
    }

    /// The `livepatch:` lines seen so far, in order.
    pub fn log_lines(&self) -> Vec<&str> {
        self.seen
            .iter()
            .filter(|l| l.starts_with("livepatch: "))
            .map(String::as_str)
            .collect()
    }

    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `livepatch status PID --json`, parsed.
pub fn status_json(pid: &str) -> serde_json::Value {
    let status = cli(&["status", pid, "--json"]);
    assert!(status.status.success(), "{}", stderr(&status));
    serde_json::from_slice(&status.stdout).expect("status --json is JSON")
}

/// The programs and patches of `examples/`, built once per test process with
/// `examples/build.sh`.
pub fn examples() -> &'static Path {
    static EXAMPLES: OnceLock<PathBuf> = OnceLock::new();
    EXAMPLES.get_or_init(|| {
        let out = scratch().join("examples");
        let status = Command::new("sh")
            .arg(Path::new(WORKSPACE).join("examples/build.sh"))
            .arg(&out)
            .stdout(Stdio::null())
            .status()
            .expect("sh runs");
        assert!(status.success(), "examples/build.sh failed");
        out
    })
}

/// A service with a main loop answering one command per line, and a worker thread that can be
/// sent into a function it never leaves.
pub const BUSY_SERVICE: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <string.h>
volatile int release_worker;
__attribute__((noinline, noipa)) int value(void) { return 1; }
__attribute__((noinline, noipa)) void stuck(void) {
    puts("worker: inside stuck");
    while (!release_worker) __asm__ volatile("pause");
    puts("worker: left stuck");
}
static void *worker(void *arg) { (void)arg; stuck(); return NULL; }
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    char line[64];
    pthread_t t;
    puts("ready");
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "value", 5)) printf("value %d\n", value());
        else if (!strncmp(line, "worker", 6)) { release_worker = 0; pthread_create(&t, NULL, worker, NULL); }
        else if (!strncmp(line, "release", 7)) { release_worker = 1; pthread_join(t, NULL); puts("joined"); }
    }
    return 0;
}
"#;

/// Replaces `value` (1 becomes 2) and `stuck` of [`BUSY_SERVICE`] with versions that say so.
pub const BUSY_PATCH: &str = r#"
#include <livepatch.h>
#include <stdio.h>
static int new_value(void) { return 2; }
extern volatile int release_worker;
static void new_stuck(void) {
    puts("worker: inside new stuck");
    while (!release_worker) __asm__ volatile("pause");
    puts("worker: left new stuck");
}
static struct klp_func funcs[] = {
    { .old_name = "value", .new_func = new_value },
    { .old_name = "stuck", .new_func = new_stuck },
    { }
};
static struct klp_object objs[] = { { .name = NULL, .funcs = funcs }, { } };
static struct klp_patch patch = { .objs = objs };
KLP_PATCH(patch);
"#;
