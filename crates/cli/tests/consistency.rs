//! The per-thread consistency model on real processes: a thread never mixes old and new code,
//! threads born during a transition start at its target, exited threads are forgotten, and only
//! a patched function on a thread's stack (or a thread that cannot be examined) holds a
//! transition.

mod support;

use std::collections::BTreeSet;

use serde_json::Value;
use support::{
    Target, VALUE_PATCH, cli, last_number, library, pending_tids, program, status_json, stderr,
    thread, threads, wait_for,
};

/// Worker threads call `step()`, which calls `produce` and `consume`; each function puts its
/// version in its own decimal digit of the result, so a worker sees which versions one call of
/// `step` ran. With the argument `back-to-back` the workers do nothing between two steps.
const PRODUCER_CONSUMER: &str = "consistency/producer-consumer.c";

/// New versions of `produce`, `consume` and `step`.
const PATCH_STEPS: &str = "consistency/steps-patch.c";

/// A spawner thread keeps creating short-lived threads that each call `version()` once, counted
/// by phase; another thread can be sent into `stuck()` to hold a transition open.
const SPAWNER: &str = "consistency/spawner.c";

/// New versions of `version` and `stuck` of [`SPAWNER`].
const PATCH_VERSION: &str = "consistency/version-patch.c";

/// A service whose main thread answers commands, with threads that can be started to spin in
/// unpatched code, to run with signals blocked, or to sleep in `read` and `pthread_cond_wait`.
/// Only `value()` is ever patched.
const SERVICE: &str = "consistency/service.c";

/// The value of `key=N` in a line such as "totals v1=3 v2=4 mixed=0".
fn field(line: &str, key: &str) -> u64 {
    line.split(' ')
        .find_map(|word| word.strip_prefix(&format!("{key}=")))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

fn live_tids(pid: &str) -> BTreeSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the target's task directory")
        .map(|entry| {
            entry
                .unwrap()
                .file_name()
                .to_string_lossy()
                .parse()
                .unwrap()
        })
        .collect()
}

/// Runs a `livepatch` verb and asserts its exit status.
fn run(args: &[&str], code: i32) {
    let output = cli(args);
    assert_eq!(
        output.status.code(),
        Some(code),
        "livepatch {}: {}",
        args.join(" "),
        stderr(&output)
    );
}

#[test]
fn producer_and_consumer_never_run_different_versions_within_one_step() {
    let program = program("steps", PRODUCER_CONSUMER);
    let patch = library("livepatch-steps", PATCH_STEPS);
    let patch = patch.to_str().unwrap();
    let mut target = Target::start(&program);
    let pid = target.pid();

    // `step` is replaced too: were it left alone, a worker inside the old step between produce
    // and consume would be free to switch there (no patched function on its stack), and a new
    // consume would legally receive an old item.
    for _ in 0..10 {
        run(&["load", &pid, patch, "--timeout", "10"], 0);
        run(&["disable", &pid, "livepatch-steps", "--timeout", "10"], 0);
        run(&["unload", &pid, "livepatch-steps"], 0);
    }
    target.send("stop");
    let totals = target.expect("totals");
    assert_eq!(field(&totals, "mixed"), 0, "{totals}");
    assert!(field(&totals, "v1") > 0, "{totals}");
    assert!(field(&totals, "v2") > 0, "{totals}");
}

/// Waits until `status --json` lists exactly the threads of `/proc/PID/task`: a thread that
/// pthread_join reported gone may still be in /proc for a moment, so there is no event to wait
/// for.
fn status_when_threads_settle(pid: &str) -> Value {
    wait_for(
        "status --json to list exactly the threads of /proc/PID/task",
        || {
            let status = status_json(pid);
            let listed: BTreeSet<u64> = threads(&status)
                .iter()
                .map(|t| t["tid"].as_u64().unwrap())
                .collect();
            let live = live_tids(pid);
            if listed == live {
                Ok(status)
            } else {
                Err(format!(
                    "status lists threads {listed:?}, the process has {live:?}"
                ))
            }
        },
    )
}

#[test]
fn threads_born_during_a_transition_start_at_its_target_and_exited_ones_are_forgotten() {
    let program = program("spawner", SPAWNER);
    let patch = library("livepatch-version", PATCH_VERSION);
    let mut target = Target::start(&program);
    let pid = target.pid();

    target.send("count 0");
    let unpatched = target.expect("born in phase 0");
    assert_eq!(field(&unpatched, "v2"), 0, "{unpatched}");

    // Patching, held open by a thread inside the old `stuck`.
    target.send("stuck");
    let stuck = last_number(&target.expect("stuck: inside old"));
    run(
        &["load", &pid, patch.to_str().unwrap(), "--timeout", "1"],
        3,
    );
    target.send("phase 1");
    target.expect("phase 1 begins");
    target.send("count 1");
    let patching = target.expect("born in phase 1");
    assert_eq!(field(&patching, "v1"), 0, "{patching}");
    assert!(field(&patching, "v2") >= 50, "{patching}");

    // Dozens of threads were born, ran and exited during the transition; none of them is
    // listed, pending or otherwise.
    target.send("pause");
    target.expect("spawner paused");
    let status = status_when_threads_settle(&pid);
    assert_eq!(status["transition"]["target"], "patched", "{status}");
    assert_eq!(pending_tids(&status), [stuck], "{status}");
    target.send("resume");
    target.expect("spawner resumed");

    target.send("release");
    target.expect("stuck: left old");
    target.saw_or_expect("livepatch: 'livepatch-version': patching complete");
    assert_eq!(status_json(&pid)["transition"], Value::Null);

    // Unpatching, held open by a thread inside the new `stuck`.
    target.send("stuck");
    let stuck = last_number(&target.expect("stuck: inside new"));
    run(&["disable", &pid, "livepatch-version", "--timeout", "1"], 3);
    target.send("phase 2");
    target.expect("phase 2 begins");
    target.send("count 2");
    let unpatching = target.expect("born in phase 2");
    assert_eq!(field(&unpatching, "v2"), 0, "{unpatching}");
    assert!(field(&unpatching, "v1") >= 50, "{unpatching}");

    target.send("pause");
    target.expect("spawner paused");
    let status = status_when_threads_settle(&pid);
    assert_eq!(status["transition"]["target"], "unpatched", "{status}");
    assert_eq!(pending_tids(&status), [stuck], "{status}");
    target.send("resume");
    target.expect("spawner resumed");

    target.send("release");
    target.expect("stuck: left new");
    target.saw_or_expect("livepatch: 'livepatch-version': unpatching complete");
    assert_eq!(status_json(&pid)["transition"], Value::Null);
}

#[test]
fn threads_spinning_in_unpatched_code_do_not_hold_the_transition() {
    let program = program("spinners", SERVICE);
    let patch = library("livepatch-spin", VALUE_PATCH);
    let mut target = Target::start(&program);
    let pid = target.pid();
    target.send("spin");
    target.expect("spinners: spinning");

    run(
        &["load", &pid, patch.to_str().unwrap(), "--timeout", "5"],
        0,
    );
    let status = status_json(&pid);
    assert_eq!(status["transition"], Value::Null, "{status}");
    assert_eq!(pending_tids(&status), Vec::<u64>::new(), "{status}");
    target.send("value");
    target.expect("main: value 2");
    // The spinners were interrupted, not stopped for good: they still answer.
    target.send("unspin");
    target.expect("spinners: joined");
}

#[test]
fn workers_calling_patched_functions_back_to_back_do_not_hold_the_transitions() {
    let program = program("steps_back_to_back", PRODUCER_CONSUMER);
    let patch = library("livepatch-hot-steps", PATCH_STEPS);
    let mut target = Target::start_with(&program, &["back-to-back"], "ready");
    let pid = target.pid();

    // Their loop is not patched: at every entry to `step`, before it decides which version to
    // run, nothing patched is on a worker's stack, so a check landing there can switch it.
    run(
        &["load", &pid, patch.to_str().unwrap(), "--timeout", "5"],
        0,
    );
    run(
        &["disable", &pid, "livepatch-hot-steps", "--timeout", "5"],
        0,
    );
    target.send("stop");
    let totals = target.expect("totals");
    assert_eq!(field(&totals, "mixed"), 0, "{totals}");
}

#[test]
fn a_thread_blocking_the_check_signal_holds_the_transition_until_its_switch_point() {
    let program = program("check_blocker", SERVICE);
    let patch = library("livepatch-check-blocked", VALUE_PATCH);
    let mut target = Target::start(&program);
    let pid = target.pid();
    let main_tid: u64 = pid.parse().unwrap();

    // With no patch at all, a switch point changes nothing.
    target.send("update");
    target.expect("main: passed its switch point, value 1");
    assert_eq!(thread(&status_json(&pid), main_tid)["patch_state"], -1);

    target.send("block-check-signal");
    let blocker = last_number(&target.expect("blocker: the check signal blocked"));
    run(
        &["load", &pid, patch.to_str().unwrap(), "--timeout", "1"],
        3,
    );
    let status = status_json(&pid);
    assert_eq!(
        status["transition"]["patch"], "livepatch-check-blocked",
        "{status}"
    );
    assert_eq!(pending_tids(&status), [blocker], "{status}");
    let blocked = thread(&status, blocker);
    assert_eq!(blocked["patch_state"], 0, "{status}");
    assert!(blocked["blocking"].is_string(), "{status}");

    // The main thread was examined and switched; its own switch point leaves it patched and
    // does not move the blocker.
    target.send("value");
    target.expect("main: value 2");
    target.send("update");
    target.expect("main: passed its switch point, value 2");
    let status = status_json(&pid);
    let main = thread(&status, main_tid);
    assert_eq!(main["patch_state"], 1, "{status}");
    assert_eq!(main["pending"], false, "{status}");
    assert_eq!(pending_tids(&status), [blocker], "{status}");
    target.send("blocker-value");
    target.expect("blocker: value 1");

    target.send("blocker-switch");
    target.expect("blocker: passed its switch point, value 2");
    target.saw_or_expect("livepatch: 'livepatch-check-blocked': patching complete");
    let status = status_json(&pid);
    assert_eq!(status["transition"], Value::Null, "{status}");
    assert_eq!(pending_tids(&status), Vec::<u64>::new(), "{status}");
}

#[test]
fn a_thread_blocking_every_signal_makes_the_load_refused_and_changes_nothing() {
    let program = program("signal_blocker", SERVICE);
    let patch = library("livepatch-all-blocked", VALUE_PATCH);
    let mut target = Target::start(&program);
    let pid = target.pid();

    // Code is written while every other thread is parked by a signal; a thread that blocks
    // every signal cannot be parked, so the load is refused up front instead of half applied
    // (README, Limits). A thread blocking only the check signal is the case above.
    target.send("block-every-signal");
    let blocker = last_number(&target.expect("blocker: every signal blocked"));
    let before = status_json(&pid);
    let output = cli(&["load", &pid, patch.to_str().unwrap(), "--timeout", "1"]);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{message}");
    assert!(
        message.starts_with("livepatch: error: ")
            && message.contains(&format!("thread {blocker} blocks signal"))
            && message.contains("'value'"),
        "{message}"
    );
    let after = status_json(&pid);
    assert_eq!(after["patches"], before["patches"], "{after}");
    assert_eq!(after["transition"], Value::Null, "{after}");
    assert_eq!(pending_tids(&after), Vec::<u64>::new(), "{after}");
    target.send("value");
    target.expect("main: value 1");
    target.send("blocker-value");
    target.expect("blocker: value 1");
}

/// Waits until thread `tid` sleeps in system call `number` (from /proc/PID/task/TID/syscall):
/// the thread announces itself just before it enters the call, and no event marks the entry.
fn wait_in_syscall(pid: &str, tid: u64, number: &str) {
    let path = format!("/proc/{pid}/task/{tid}/syscall");
    wait_for(
        &format!("thread {tid} to sleep in system call {number}"),
        || {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.split(' ').next() == Some(number) {
                Ok(())
            } else {
                Err(format!(
                    "thread {tid} not in system call {number}: {text:?}"
                ))
            }
        },
    );
}

#[test]
fn threads_sleeping_in_system_calls_switch_at_once_and_their_calls_go_on() {
    const SYS_READ: &str = "0";
    const SYS_FUTEX: &str = "202";
    let program = program("sleepers", SERVICE);
    let patch = library("livepatch-sleepers", VALUE_PATCH);
    let mut target = Target::start(&program);
    let pid = target.pid();
    target.send("read");
    let reader = last_number(&target.expect("reader: tid"));
    target.send("wait");
    let waiter = last_number(&target.expect("waiter: tid"));
    wait_in_syscall(&pid, reader, SYS_READ);
    wait_in_syscall(&pid, waiter, SYS_FUTEX);

    run(
        &["load", &pid, patch.to_str().unwrap(), "--timeout", "2"],
        0,
    );
    let status = status_json(&pid);
    assert_eq!(status["transition"], Value::Null, "{status}");

    // The check signal interrupted both calls; they go on rather than fail with EINTR.
    target.send("write");
    target.expect("reader: read 'x', value 2");
    target.send("wake");
    target.expect("waiter: woken, value 2");
}
