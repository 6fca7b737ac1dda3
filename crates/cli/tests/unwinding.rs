//! End-to-end: the stack check walks stacks by their unwind tables, so a stale word that only
//! looks like a return address into a patched function holds nothing, while a thread really
//! inside one still holds the transition.
mod support;

use serde_json::Value;
use support::{
    BUSY_PATCH, Target, cli, last_number, library, pending_tids, program, status_json, stderr,
    thread,
};

/// A service whose idle reader thread sleeps in `read()` with words in its frame that look like
/// return addresses into `value()` and `stuck()`, and a worker that can be sent into `stuck()`,
/// which it leaves only when released.
const SERVICE: &str = "unwinding/service.c";

#[test]
fn stale_return_address_words_on_an_idle_stack_do_not_hold_the_transition() {
    let program = program("unwinding_stale", SERVICE);
    let patch = library("livepatch-unwinding-stale", BUSY_PATCH);
    let mut target = Target::start(&program);
    let pid = target.pid();
    target.send("reader");
    let reader = last_number(&target.expect("reader: holding stale words"));

    // A conservative scan alone takes the reader's stale words for calls into both functions
    // and keeps it pending until the timeout (exit 3); the walk of its real frames finds none.
    let load = cli(&["load", &pid, patch.to_str().unwrap(), "--timeout", "10"]);
    assert!(load.status.success(), "{}", stderr(&load));
    target.saw_or_expect("livepatch: 'livepatch-unwinding-stale': patching complete");

    // The transition is over, the reader among the threads it switched (all idle again).
    let status = status_json(&pid);
    assert_eq!(status["transition"], Value::Null, "{status}");
    assert_eq!(thread(&status, reader)["pending"], false, "{status}");

    // The reader wakes up in the patched state, its words untouched.
    target.send("write");
    target.expect("reader: read 1, value 2, stale words kept");
}

#[test]
fn a_thread_inside_a_patched_function_holds_the_transition_beside_stale_words() {
    let program = program("unwinding_busy", SERVICE);
    let patch = library("livepatch-unwinding-busy", BUSY_PATCH);
    let mut target = Target::start(&program);
    let pid = target.pid();
    target.send("reader");
    let reader = last_number(&target.expect("reader: holding stale words"));
    target.send("worker");
    let worker = last_number(&target.expect("worker: inside stuck"));

    let load = cli(&["load", &pid, patch.to_str().unwrap(), "--timeout", "1"]);
    assert_eq!(load.status.code(), Some(3), "{}", stderr(&load));
    let status = status_json(&pid);
    assert_eq!(
        status["transition"]["patch"], "livepatch-unwinding-busy",
        "{status}"
    );
    // Only the worker, really inside `stuck`, holds the transition; the reader switched.
    assert_eq!(pending_tids(&status), [worker], "{status}");
    assert_eq!(thread(&status, worker)["blocking"], "stuck", "{status}");
    assert_eq!(thread(&status, reader)["patch_state"], 1, "{status}");

    // Once the worker leaves the old function, the transition completes by itself.
    target.send("release");
    target.expect("worker: left stuck");
    target.expect("worker: joined");
    target.saw_or_expect("livepatch: 'livepatch-unwinding-busy': patching complete");
    target.send("write");
    target.expect("reader: read 1, value 2, stale words kept");
}
