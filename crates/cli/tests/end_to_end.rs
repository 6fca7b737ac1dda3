//! End-to-end: real programs started with `livepatch run`, patched with the `livepatch` command,
//! their output and their `LIVEPATCH_LOG=stderr` lines read as they happen.

mod support;

use support::{
    BUSY_PATCH, BUSY_SERVICE, MISSING_FUNCTION_PATCH, Target, cli, library, program, status_json,
    stderr, stdout,
};

#[test]
fn a_patch_loads_switches_every_thread_and_unloads_with_the_kernel_log_lines() {
    let program = program("service_basic", BUSY_SERVICE);
    let patch = library("livepatch-value", BUSY_PATCH);
    let mut target = Target::start(&program);
    let pid = target.pid();
    target.send("value");
    target.expect("value 1");

    let load = cli(&["load", &pid, patch.to_str().unwrap()]);
    assert!(load.status.success(), "{}", stderr(&load));
    target.send("value");
    target.expect("value 2");

    let json = status_json(&pid);
    let patch_status = &json["patches"][0];
    assert_eq!(patch_status["name"], "livepatch-value");
    assert_eq!(patch_status["enabled"], true);
    assert_eq!(patch_status["objects"][0]["name"], "vmlinux");

    let disable = cli(&["disable", &pid, "livepatch-value"]);
    assert!(disable.status.success(), "{}", stderr(&disable));
    target.send("value");
    target.expect("value 1");
    let unload = cli(&["unload", &pid, "livepatch-value"]);
    assert!(unload.status.success(), "{}", stderr(&unload));
    target.send("value");
    target.expect("value 1");
    assert_eq!(
        target.log_lines(),
        [
            "livepatch: enabling patch 'livepatch-value'",
            "livepatch: 'livepatch-value': initializing patching transition",
            "livepatch: 'livepatch-value': starting patching transition",
            "livepatch: 'livepatch-value': completing patching transition",
            "livepatch: 'livepatch-value': patching complete",
            "livepatch: 'livepatch-value': initializing unpatching transition",
            "livepatch: 'livepatch-value': starting unpatching transition",
            "livepatch: 'livepatch-value': completing unpatching transition",
            "livepatch: 'livepatch-value': unpatching complete",
        ]
    );
}

#[test]
fn a_thread_inside_a_patched_function_holds_the_transition_until_forced() {
    let program = program("service_busy", BUSY_SERVICE);
    let patch = library("livepatch-busy", BUSY_PATCH);
    let mut target = Target::start(&program);
    let pid = target.pid();
    target.send("worker");
    target.expect("worker: inside stuck");

    let load = cli(&["load", &pid, patch.to_str().unwrap(), "--timeout", "1"]);
    assert_eq!(load.status.code(), Some(3), "{}", stderr(&load));
    assert!(stderr(&load).contains("force"), "{}", stderr(&load));
    // The main thread already runs the new code; the worker still the old one.
    target.send("value");
    target.expect("value 2");

    let json = status_json(&pid);
    assert_eq!(json["transition"]["patch"], "livepatch-busy");
    let blocked: Vec<_> = json["threads"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["pending"] == true)
        .collect();
    assert_eq!(blocked.len(), 1, "{json}");
    assert_eq!(blocked[0]["blocking"], "stuck", "{json}");
    assert_eq!(blocked[0]["patch_state"], 0);

    // The worker leaves the old function: the transition completes by itself.
    target.send("release");
    target.expect("worker: left stuck");
    target.expect("joined");
    target.saw_or_expect("livepatch: 'livepatch-busy': patching complete");

    // A worker inside the new function holds the unpatching transition.
    target.send("worker");
    target.expect("worker: inside new stuck");
    let disable = cli(&["disable", &pid, "livepatch-busy", "--timeout", "1"]);
    assert_eq!(disable.status.code(), Some(3), "{}", stderr(&disable));
    target.send("value");
    target.expect("value 1");
    let force = cli(&["force", &pid, "livepatch-busy"]);
    assert!(force.status.success(), "{}", stderr(&force));
    target.expect("livepatch: 'livepatch-busy': unpatching complete");
    let json = status_json(&pid);
    assert_eq!(json["transition"], serde_json::Value::Null, "{json}");
    assert_eq!(json["unloadable"][0]["forced"], true, "{json}");
    let unload = cli(&["unload", &pid, "livepatch-busy"]);
    assert_eq!(unload.status.code(), Some(1));
    assert!(stderr(&unload).contains("forced"), "{}", stderr(&unload));
    assert!(
        target
            .log_lines()
            .contains(&"livepatch: forcing remaining tasks to the patched state"),
        "{:?}",
        target.log_lines()
    );
    target.send("release");
    target.expect("worker: left new stuck");
}

#[test]
fn a_patch_naming_a_missing_function_is_refused_and_changes_nothing() {
    let program = program("service_refused", BUSY_SERVICE);
    let patch = library("livepatch-missing", MISSING_FUNCTION_PATCH);
    let mut target = Target::start(&program);
    let pid = target.pid();
    let load = cli(&["load", &pid, patch.to_str().unwrap()]);
    assert_eq!(load.status.code(), Some(1));
    let message = stderr(&load);
    assert!(
        message.starts_with("livepatch: error: ") && message.contains("no_such_function"),
        "{message}"
    );
    target.send("value");
    target.expect("value 1");
    let json = status_json(&pid);
    assert_eq!(json["patches"], serde_json::json!([]), "{json}");
    let list = cli(&["list", &pid]);
    assert!(stdout(&list).contains(&pid), "{}", stdout(&list));
}
