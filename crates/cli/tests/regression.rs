//! Regressions, named after the issue that found them, as ripgrep names its own.

mod support;

use std::path::Path;

use support::refusal::{assert_loads, assert_refused, assert_succeeds, call, code, load, snapshot};
use support::{Cc, Target, VALUE_PATCH, agent_log, library, path_str, wait_for};

/// Issue 8: everything that refuses a patch is found before the first callback runs. The
/// second function of the patch lies in a library whose neighbourhood the program has filled,
/// so no stub can be placed within reach of it: the patch is refused before any callback ran
/// and before "enabling patch", the process is left as it was, and a patch of the first function
/// alone loads.
#[test]
fn r8_a_patch_whose_second_function_is_out_of_reach_is_refused_before_any_callback() {
    let library_path = library("libfar", "regression/far-library.c");
    let host = Cc::program("regression/fenced-host.c").build("r8-fenced-host");
    let patch = library("far-patch", "regression/far-patch.c");
    let value_patch = Cc::library(VALUE_PATCH).build("r8-value");
    let mut target = Target::start_with(&host, &[path_str(&library_path)], "ready");
    let pid = target.pid();
    target.send("fence");
    let fenced = target.expect("fenced ");
    assert!(!fenced.contains("fenced 0 MiB"), "{fenced}");
    let before = snapshot(
        &mut target,
        &["value", "far_value"],
        &["value", "far_value"],
    );

    let refused = load(&pid, &patch);
    assert_refused(
        &refused,
        &[
            "'far-patch'",
            "far_value",
            "no free address range within 2 GiB",
        ],
    );
    let log = agent_log(&pid);
    assert!(
        !log.iter()
            .any(|l| l.contains("pre_patch_callback") || l.contains("enabling patch")),
        "a callback ran or the enabling began before the refusal: {log:#?}"
    );
    assert!(
        log.iter()
            .any(|l| l == "livepatch: failed to find location for function 'far_value'"),
        "{log:#?}"
    );
    assert_eq!(
        snapshot(
            &mut target,
            &["value", "far_value"],
            &["value", "far_value"]
        ),
        before
    );

    assert_loads(&pid, &value_patch);
    assert_eq!(call(&mut target, "value"), "call value = 2");
    assert_eq!(call(&mut target, "far_value"), "call far_value = 11");
}

/// The mappings of `pid` that are writable and executable at once.
fn writable_and_executable(pid: &str) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .expect("the target's maps")
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|p| p.starts_with("rwx"))
        })
        .map(str::to_owned)
        .collect()
}

fn patched_and_unpatched_under(host: &Path, mode: &str) {
    let patch = Cc::library(VALUE_PATCH).build("r8-wx-value");
    let mut target = Target::start_with(host, &[mode], "ready");
    let pid = target.pid();
    target.saw_or_expect("writable and executable memory refused");
    assert_eq!(call(&mut target, "value"), "call value = 1");

    assert_loads(&pid, &patch);
    assert_eq!(call(&mut target, "value"), "call value = 2");
    assert_eq!(writable_and_executable(&pid), Vec::<String>::new());
    assert_succeeds(&["disable", &pid, "r8-wx-value"]);
    assert_eq!(call(&mut target, "value"), "call value = 1");
    assert_succeeds(&["unload", &pid, "r8-wx-value"]);
    assert_eq!(writable_and_executable(&pid), Vec::<String>::new());
    // Loaded again, the same stub serves.
    assert_loads(&pid, &patch);
    assert_eq!(call(&mut target, "value"), "call value = 2");
}

/// Issue 8: code is written without ever mapping anything writable and executable, so a
/// target that forbids such memory, as hardened services do (the kernel's
/// memory-deny-write-execute, or systemd's seccomp filter for `MemoryDenyWriteExecute=yes`), is
/// patched and unpatched, through a plain entry and a patchable one.
#[test]
fn r8_a_target_that_denies_writable_executable_memory_is_patched_and_unpatched() {
    let plain = Cc::program("regression/wx-host.c").build("r8-wx-plain");
    let patchable = Cc::program("regression/wx-host.c")
        .arg("-fpatchable-function-entry=16,14")
        .build("r8-wx-patchable");
    for host in [&plain, &patchable] {
        for mode in ["mdwe", "seccomp"] {
            patched_and_unpatched_under(host, mode);
        }
    }
}

/// The signals a thread of `pid` blocks, from its status file.
fn blocked_signals(pid: &str, tid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .expect("SigBlk in the status file");
    u64::from_str_radix(mask.trim(), 16).unwrap()
}

/// The thread of `pid` named `name`, once it has that name (a thread names itself as it starts).
fn thread_named(pid: &str, name: &str) -> String {
    wait_for(&format!("a thread named {name} in process {pid}"), || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map_err(|e| e.to_string())?
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|tid| {
                std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                    .is_ok_and(|comm| comm.trim_end() == name)
            })
            .ok_or_else(|| "none yet".to_string())
    })
}

/// Issue 8: the agent never receives the program's signals. A program that blocks SIGCHLD in
/// every thread and takes it with `sigtimedwait` gets the SIGCHLD of every child, before and
/// after a patch is loaded; the agent's thread blocks every signal but its own two.
#[test]
fn r8_a_program_taking_sigchld_synchronously_gets_every_one_with_the_agent_in_it() {
    let host = Cc::program("regression/sigchld-waiter.c").build("r8-sigchld-waiter");
    let patch = Cc::library(VALUE_PATCH).build("r8-sigchld-value");
    let mut target = Target::start(&host);
    let pid = target.pid();

    let agent_thread = thread_named(&pid, "livepatch");
    let blocked = blocked_signals(&pid, &agent_thread);
    let bit = |signal: i32| 1u64 << (signal - 1);
    for signal in [
        libc::SIGCHLD,
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGHUP,
        libc::SIGUSR1,
    ] {
        assert_ne!(
            blocked & bit(signal),
            0,
            "the agent's thread takes signal {signal}"
        );
    }
    let check = libc::SIGRTMIN() + 8;
    assert_eq!(blocked & (bit(check) | bit(check + 1)), 0, "{blocked:#x}");

    target.send("fork 20");
    target.expect("got SIGCHLD of 20 of 20 children");
    assert_loads(&pid, &patch);
    assert_eq!(call(&mut target, "value"), "call value = 2");
    target.send("fork 20");
    target.expect("got SIGCHLD of 20 of 20 children");
    assert_succeeds(&["disable", &pid, "r8-sigchld-value"]);
    target.send("fork 20");
    target.expect("got SIGCHLD of 20 of 20 children");
}

/// Issue 8 (review): an entry that cannot be restored yet, because a thread blocks every signal
/// and cannot be stopped for the write, runs the original code through its stub, and is
/// restored once the thread lets itself be stopped.
#[test]
fn r8_an_entry_restored_while_a_thread_blocks_every_signal_is_restored_later() {
    let host = Cc::program("regression/blocker-host.c").build("r8-blocker-host");
    let patch = Cc::library(VALUE_PATCH).build("r8-blocker-value");
    let mut target = Target::start(&host);
    let pid = target.pid();
    let original = code(&mut target, "value");
    assert_loads(&pid, &patch);
    assert_eq!(call(&mut target, "value"), "call value = 2");

    target.send("block");
    target.expect("blocker: blocking every signal");
    // The blocker cannot answer the check signal, but it sleeps in `read`: it is checked
    // without one, and the transition completes.
    assert_succeeds(&["disable", &pid, "r8-blocker-value"]);
    assert_eq!(call(&mut target, "value"), "call value = 1");
    assert_ne!(
        code(&mut target, "value"),
        original,
        "restored with a thread not stopped"
    );
    assert!(
        agent_log(&pid)
            .iter()
            .any(|l| l.contains("stay redirected to their stubs")),
        "{:#?}",
        agent_log(&pid)
    );

    target.send("release");
    target.expect("blocker: released");
    wait_for("the entry of value to be restored", || {
        let now = code(&mut target, "value");
        if now == original { Ok(()) } else { Err(now) }
    });
    assert_eq!(call(&mut target, "value"), "call value = 1");
}
