//! What every end-to-end test needs: the agent built once, the C programs and patches of
//! `tests/fixtures/` compiled once per test process, the `livepatch` command, and a target
//! program whose output and `LIVEPATCH_LOG=stderr` lines are read in order as they happen.
#![allow(dead_code)] // Each test binary uses a different part.

pub mod refusal;
pub mod selftest;

use std::collections::HashMap;
use std::fmt::Display;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// The C sources of the tests.
pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// How long a test waits for something it expects to happen: long enough for a loaded machine,
/// short enough that a test that waits in vain fails rather than hangs.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A service with a main loop answering one command per line, and a worker thread that can be
/// sent into a function it never leaves.
pub const BUSY_SERVICE: &str = "busy-service.c";

/// Replaces `value` (1 becomes 2) and `stuck` of [`BUSY_SERVICE`] with versions that say so.
pub const BUSY_PATCH: &str = "busy-patch.c";

/// `value` becomes 2 (the define `VALUE` picks another number, `PATCH_NAME` names the patch and
/// `BUILD_ID` the build it is written for).
pub const VALUE_PATCH: &str = "value-patch.c";

/// Replaces `value` and `no_such_function`.
pub const MISSING_FUNCTION_PATCH: &str = "missing-function-patch.c";

/// Which build of the agent: the tests use the debug one, the bench the release one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Debug,
    Release,
}

/// Builds the agent library with cargo and returns its path.
pub fn build_agent(profile: Profile) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "-q", "-p", "livepatch-agent"]);
    if profile == Profile::Release {
        build.arg("--release");
    }
    let status = build.current_dir(WORKSPACE).status().expect("cargo runs");
    assert!(status.success(), "building the agent failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| Path::new(WORKSPACE).join("target"), PathBuf::from);
    let directory = match profile {
        Profile::Debug => "debug",
        Profile::Release => "release",
    };
    let path = target.join(directory).join("liblivepatch_agent.so");
    assert!(path.exists(), "{} missing", path.display());
    path
}

/// The agent library, built once per test process (nextest has released the build lock).
pub fn agent() -> &'static Path {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT.get_or_init(|| build_agent(Profile::Debug))
}

/// This process's directory for built programs and the agents' sockets.
pub fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("livepatch-e2e-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("sockets")).unwrap();
    dir
}

/// One `cc` run: a program (`-rdynamic`) or a patch library (`-shared -fPIC`) from C files, with
/// `-O2 -g -pthread -I<workspace>/include` and the defines and arguments given. A source path
/// that is not absolute is a file of [`FIXTURES`].
#[derive(Debug)]
pub struct Cc {
    shared: bool,
    flags: Vec<String>,
    sources: Vec<PathBuf>,
    args: Vec<String>,
}

impl Cc {
    /// An executable from `source`.
    pub fn program(source: impl AsRef<Path>) -> Self {
        Self::new(false, source.as_ref())
    }

    /// A shared library from `source`.
    pub fn library(source: impl AsRef<Path>) -> Self {
        Self::new(true, source.as_ref())
    }

    fn new(shared: bool, source: &Path) -> Self {
        Cc {
            shared,
            flags: ["-O2", "-g", "-pthread"].map(String::from).to_vec(),
            sources: vec![Path::new(FIXTURES).join(source)],
            args: Vec::new(),
        }
    }

    /// One more C file, linked in after the others.
    pub fn source(mut self, source: impl AsRef<Path>) -> Self {
        self.sources.push(Path::new(FIXTURES).join(source));
        self
    }

    /// `-DNAME=VALUE`.
    pub fn define(mut self, name: &str, value: impl Display) -> Self {
        self.args.push(format!("-D{name}={value}"));
        self
    }

    /// `-DNAME="VALUE"`: a string literal.
    pub fn define_string(self, name: &str, value: &str) -> Self {
        assert!(
            !value.contains(['"', '\\']),
            "{value:?} needs escaping as a C string"
        );
        self.define(name, format_args!("\"{value}\""))
    }

    /// Any other argument of `cc` (`-Wl,...`, `-lNAME`, `-f...`), after the sources.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_owned());
        self
    }

    /// Replaces the optimization, debug and thread flags (`-O2 -g -pthread`).
    pub fn flags(mut self, flags: &[&str]) -> Self {
        self.flags = flags.iter().map(|&f| f.to_owned()).collect();
        self
    }

    /// Builds `name` (`name.so` for a library) in [`scratch`] and returns its path. Each output
    /// is built once per process: the tests of one process run in parallel, and a program is
    /// not rewritten while another test runs it. Two different builds to one name fail the
    /// test.
    pub fn build(self, name: &str) -> PathBuf {
        let out = scratch().join(if self.shared {
            format!("{name}.so")
        } else {
            name.to_owned()
        });
        let mut args: Vec<String> = self.flags;
        args.extend(["-o".to_owned(), path_str(&out).to_owned()]);
        args.extend(self.sources.iter().map(|s| path_str(s).to_owned()));
        args.push(format!("-I{WORKSPACE}/include"));
        if self.shared {
            args.extend(["-shared", "-fPIC"].map(String::from));
        } else {
            args.push("-rdynamic".to_owned());
        }
        args.extend(self.args);

        type Builds = Mutex<HashMap<PathBuf, Arc<OnceLock<Vec<String>>>>>;
        static BUILDS: OnceLock<Builds> = OnceLock::new();
        let once = BUILDS
            .get_or_init(Builds::default)
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(out.clone())
            .or_default()
            .clone();
        let built = once.get_or_init(|| {
            let status = Command::new("cc").args(&args).status().expect("cc runs");
            assert!(status.success(), "compiling {name}: cc {}", args.join(" "));
            args.clone()
        });
        assert_eq!(
            *built,
            args,
            "two different builds of {}: give them different names",
            out.display()
        );
        out
    }
}

/// A program built from one fixture file.
pub fn program(name: &str, source: &str) -> PathBuf {
    Cc::program(source).build(name)
}

/// A patch (or other shared library) built from one fixture file.
pub fn library(name: &str, source: &str) -> PathBuf {
    Cc::library(source).build(name)
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// Waits at most [`DEADLINE`] for `what`: `probe` returns `Ok` once it happened, else `Err` with
/// what it sees instead, which the failure shows.
pub fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match probe() {
            Ok(done) => return done,
            Err(seen) => assert!(
                Instant::now() < deadline,
                "waited {} s for {what}: {seen}",
                DEADLINE.as_secs()
            ),
        }
        std::thread::yield_now();
    }
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
        let mut command = livepatch();
        command.arg("run").arg("--").arg(program).args(args);
        let target = Self::spawn(command, ready);
        // The agent's socket exists before main runs; wait for it to accept.
        wait_for_socket(&target.pid());
        target
    }

    /// Starts `program` without the agent, with the tests' socket directory in its
    /// environment, and waits for its ready line.
    pub fn start_without_agent(program: &Path, args: &[&str]) -> Self {
        let mut command = Command::new(program);
        command
            .args(args)
            .env("LIVEPATCH_SOCKET_DIR", scratch().join("sockets"));
        Self::spawn(command, "ready")
    }

    /// Runs `command` (with `LIVEPATCH_LOG=stderr` and its standard streams to the test) and
    /// waits for its line containing `ready`; nothing else is awaited.
    pub fn spawn(mut command: Command, ready: &str) -> Self {
        let mut child = command
            .env("LIVEPATCH_LOG", "stderr")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the target starts");
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
        target
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Every line the program wrote so far, in order.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// Waits for a line containing `text`; returns it.
    pub fn expect(&mut self, text: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "no line with {text:?} in {} s; saw:\n{}",
                    DEADLINE.as_secs(),
                    self.seen.join("\n")
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "the program's output ended without a line with {text:?}; saw:\n{}",
                    self.seen.join("\n")
                ),
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

/// The user the tests (and the programs they start) run as.
pub fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// The control socket of the agent in process `pid`: `<base>/<uid>/<pid>.sock`.
pub fn socket(pid: &str) -> PathBuf {
    scratch()
        .join("sockets")
        .join(euid().to_string())
        .join(format!("{pid}.sock"))
}

/// Waits until the agent in process `pid` accepts on its socket.
pub fn wait_for_socket(pid: &str) {
    let socket = socket(pid);
    wait_for(
        &format!("the agent socket {} to accept", socket.display()),
        || {
            std::os::unix::net::UnixStream::connect(&socket)
                .map(drop)
                .map_err(|e| format!("no agent socket {}: {e}", socket.display()))
        },
    );
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `livepatch status PID --json`, parsed.
pub fn status_json(pid: &str) -> Value {
    let status = cli(&["status", pid, "--json"]);
    assert!(status.status.success(), "{}", stderr(&status));
    serde_json::from_slice(&status.stdout).expect("status --json is JSON")
}

/// The names of the enabled patches in a status, in stack order.
pub fn patch_names(status: &Value) -> Vec<&str> {
    status["patches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect()
}

/// The threads of a status.
pub fn threads(status: &Value) -> &[Value] {
    status["threads"].as_array().expect("threads is an array")
}

/// Thread `tid` of a status.
pub fn thread(status: &Value, tid: u64) -> &Value {
    threads(status)
        .iter()
        .find(|t| t["tid"] == tid)
        .unwrap_or_else(|| panic!("no thread {tid} in {status}"))
}

/// The threads a status lists as pending.
pub fn pending_tids(status: &Value) -> Vec<u64> {
    threads(status)
        .iter()
        .filter(|t| t["pending"] == true)
        .map(|t| t["tid"].as_u64().expect("tid is a number"))
        .collect()
}

/// The number after the last space of a line such as "stuck: inside old, tid 1234".
pub fn last_number(line: &str) -> u64 {
    line.rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number at the end of {line:?}"))
}

/// The agent's log (`livepatch log`): core lines, agent lines and the lines patch code wrote,
/// in order, complete when a request has been answered.
pub fn agent_log(pid: &str) -> Vec<String> {
    let log = cli(&["log", pid]);
    assert!(log.status.success(), "{}", stderr(&log));
    stdout(&log).lines().map(str::to_owned).collect()
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
