//! The control channel can be faked by nobody, and never hangs: another user's socket or
//! directory, a server that is not the process, a stale socket and a stopped target each give a
//! refusal that says why, within the deadline.
//!
//! The attacks run a server as another user (uid 65534), which needs root; the tests say so if
//! they are run without it.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::refusal::assert_refused;
use support::{Cc, Target, VALUE_PATCH, euid, livepatch, path_str, scratch, stderr, stdout};

/// The user an attacker runs as.
const NOBODY: u32 = 65534;

const BASIC: &str = "refusals/basic.c";

fn fake_agent() -> PathBuf {
    Cc::program("channel/fake-agent.c").build("channel-fake-agent")
}

/// A base directory of sockets for one test, as a machine's is: root's, mode 1777.
fn shared_base(name: &str) -> PathBuf {
    let base = scratch().join(format!("channel-{name}"));
    std::fs::create_dir_all(&base).unwrap();
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o1777)).unwrap();
    base
}

fn needs_root() {
    assert_eq!(
        euid(),
        0,
        "this test acts as another user (uid {NOBODY}) and needs to run as root"
    );
}

/// `livepatch ARGS` with the sockets in `base`.
fn cli_in(base: &Path, args: &[&str]) -> Output {
    livepatch()
        .env("LIVEPATCH_SOCKET_DIR", base)
        .args(args)
        .output()
        .expect("livepatch runs")
}

/// A program without the agent, with the sockets in `base`.
fn start_without_agent(base: &Path) -> Target {
    let program = Cc::program(BASIC).build("channel-basic");
    let mut command = Command::new(program);
    command.env("LIVEPATCH_SOCKET_DIR", base);
    Target::spawn(command, "ready")
}

/// The fake agent, listening at `socket` in `dir` (made with `mode`), run as `uid`.
fn start_fake_agent(dir: &Path, mode: u32, socket: &Path, uid: u32) -> Target {
    let mut command = Command::new(fake_agent());
    command
        .arg(dir)
        .arg(format!("{mode:o}"))
        .arg(socket)
        .uid(uid)
        .gid(uid);
    Target::spawn(command, "listening")
}

fn assert_not_enabled(out: &Output) {
    assert!(
        !stdout(out).contains("enabled"),
        "the fake was believed: {}",
        stdout(out)
    );
}

#[test]
fn another_users_socket_for_a_process_without_an_agent_is_refused() {
    needs_root();
    let base = shared_base("squat");
    let target = start_without_agent(&base);
    let pid = target.pid();
    let dir = base.join("0");
    let socket = dir.join(format!("{pid}.sock"));
    let _fake = start_fake_agent(&dir, 0o777, &socket, NOBODY);
    let patch = Cc::library(VALUE_PATCH).build("channel-value");

    let out = cli_in(&base, &["load", &pid, path_str(&patch)]);
    assert_refused(
        &out,
        &[path_str(&dir), "owned by uid 65534", "refusing to trust"],
    );
    assert_not_enabled(&out);
}

#[test]
fn a_server_that_is_not_the_process_is_refused_by_its_credentials() {
    let base = shared_base("impostor");
    let target = start_without_agent(&base);
    let pid = target.pid();
    let me = euid();
    let dir = base.join(me.to_string());
    let socket = dir.join(format!("{pid}.sock"));
    let fake = start_fake_agent(&dir, 0o700, &socket, me);
    let patch = Cc::library(VALUE_PATCH).build("channel-value");

    let out = cli_in(&base, &["load", &pid, path_str(&patch)]);
    assert_refused(
        &out,
        &[
            &format!("is served by pid {} uid {me}", fake.pid()),
            &format!("not by process {pid}"),
        ],
    );
    assert_not_enabled(&out);
}

/// Starts a program under the agent, with the sockets in `base`, and waits for its ready line
/// only: the agent may refuse to make its socket.
fn start_under_agent(base: &Path) -> Target {
    let program = Cc::program(BASIC).build("channel-basic");
    let mut command = livepatch();
    command
        .env("LIVEPATCH_SOCKET_DIR", base)
        .arg("run")
        .arg("--")
        .arg(program);
    Target::spawn(command, "ready")
}

#[test]
fn the_agent_refuses_a_directory_another_user_made_or_linked_and_the_command_too() {
    needs_root();
    for (name, linked) in [("made", false), ("linked", true)] {
        let base = shared_base(&format!("pre-{name}"));
        let theirs = scratch().join(format!("channel-theirs-{name}"));
        std::fs::create_dir_all(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o777)).unwrap();
        let dir = base.join("0");
        if linked {
            std::os::unix::fs::symlink(&theirs, &dir).unwrap();
        } else {
            std::fs::create_dir(&dir).unwrap();
            std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        }

        let mut target = start_under_agent(&base);
        let pid = target.pid();
        let why = if linked {
            "is a symbolic link"
        } else {
            "is owned by uid 65534"
        };
        target.saw_or_expect("livepatch: agent not started");
        assert!(
            target
                .seen()
                .iter()
                .any(|l| l.contains("agent not started") && l.contains(why)),
            "{:#?}",
            target.seen()
        );
        assert_eq!(
            std::fs::read_dir(&theirs).unwrap().count(),
            0,
            "the agent put something in the other user's directory"
        );
        let out = cli_in(&base, &["status", &pid]);
        assert_refused(&out, &[path_str(&dir)]);
    }
}

#[test]
fn a_stale_socket_is_never_answered_and_is_removed() {
    let base = shared_base("stale");
    let target = start_without_agent(&base);
    let pid = target.pid();
    let dir = base.join(euid().to_string());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let socket = dir.join(format!("{pid}.sock"));
    // Bound and closed: what a process killed with its agent leaves behind.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());

    let out = cli_in(&base, &["status", &pid]);
    assert_refused(&out, &["stale socket", path_str(&socket), ", removed"]);
    assert!(!socket.exists(), "the stale socket is still there");
}

#[test]
fn a_stopped_target_gets_an_answer_within_the_deadline_and_works_again_when_continued() {
    let base = shared_base("stopped");
    let mut target = start_under_agent(&base);
    let pid = target.pid();
    support::wait_for("the agent's socket", || {
        match cli_in(&base, &["status", &pid]).status.success() {
            true => Ok(()),
            false => Err("no answer yet".into()),
        }
    });
    let patch = Cc::library(VALUE_PATCH).build("channel-value");
    let signal = |signal: i32| {
        // SAFETY: kill takes plain integers; it signals the target, a child of this test.
        unsafe { libc::kill(pid.parse().unwrap(), signal) }
    };
    assert_eq!(signal(libc::SIGSTOP), 0);
    support::wait_for("the target to stop", || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        match stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('T')
        {
            true => Ok(()),
            false => Err(stat),
        }
    });

    for args in [
        vec!["status", pid.as_str(), "--timeout", "2"],
        vec!["load", pid.as_str(), path_str(&patch), "--timeout", "2"],
    ] {
        let start = Instant::now();
        let out = cli_in(&base, &args);
        // Far beyond the two seconds asked, far below what a hang would take (forever).
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{args:?} took {:?}",
            start.elapsed()
        );
        assert_refused(
            &out,
            &[&format!("process {pid} does not answer"), "T: stopped"],
        );
    }

    assert_eq!(signal(libc::SIGCONT), 0);
    let out = cli_in(&base, &["status", &pid]);
    assert!(out.status.success(), "{}", stderr(&out));
    target.send("call value");
    target.expect("call value = 1");
}

#[test]
fn durations_out_of_range_are_refused_with_a_reason() {
    for bad in ["inf", "nan", "1e30", "-1", "0", "soon"] {
        let out = livepatch()
            .args(["status", "1", &format!("--timeout={bad}")])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "--timeout {bad}: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains(bad) && stderr(&out).contains("--timeout"),
            "{}",
            stderr(&out)
        );
    }
}
