//! The scenarios of the kernel's test-livepatch.sh that make sense for a process, on real
//! programs: stacked patches and atomic replace on examples/programs/greeter.c, and one
//! transition at a time. Each test compares the agent's log with the lines the kernel prints for
//! the same scenario.
//! See: tools/testing/selftests/livepatch/test-livepatch.sh (reference/kernel-livepatch.md §8.1;
//! the simulator's port is crates/sim/tests/test_livepatch.rs).

mod support;

use support::selftest::{
    disable, dmesg, example_program, load, patching, unload, unloadable_names, unpatching,
};
use support::{
    BUSY_SERVICE, Cc, Target, VALUE_PATCH, cli, examples, library, patch_names, program,
    status_json, stderr,
};

// Stacked patches and atomic replace, on examples/programs/greeter.c.

/// A greeter that prints only when told to, so that every line answers one command.
fn start_greeter() -> Target {
    let greeter = example_program("greeter", false);
    let mut target = Target::start_with(&greeter, &["600000"], "greeter: pid");
    assert_eq!(
        greeting_line(&mut target),
        "hello from the original greeting"
    );
    target
}

/// The text of the greeter's next "greeter: N: TEXT" line.
fn greeting_line(target: &mut Target) -> String {
    let line = target.expect("greeter: ");
    let tick = line.strip_prefix("greeter: ").unwrap();
    match tick.split_once(": ") {
        Some((n, text)) if n.parse::<u64>().is_ok() => text.to_string(),
        _ => panic!("not a greeting: {line}"),
    }
}

/// What `greeting()` returns now.
fn greeting(target: &mut Target) -> String {
    target.send("greet");
    greeting_line(target)
}

/// What `farewell()` writes now.
fn farewell(target: &mut Target) -> String {
    target.send("bye");
    let line = target.expect("greeter: ");
    greeting_line(target);
    line.strip_prefix("greeter: ").unwrap().to_string()
}

const ORIGINAL_GREETING: &str = "hello from the original greeting";
const ORIGINAL_FAREWELL: &str = "goodbye from the original farewell";

/// Patch a: `greeting`.
const STACK_A: &str = "kernel/stack-a-patch.c";

/// Patch b: `greeting` and `farewell`.
const STACK_B: &str = "kernel/stack-b-patch.c";

/// Kernel test "multiple livepatches": two non-replacing patches stack; the newest one runs,
/// and disabling it shows the one below again, for the function both patch, while a function
/// only the top one patched goes back to the original.
#[test]
fn disabling_the_top_of_two_stacked_patches_reveals_the_lower_patch() {
    let a = library("livepatch-stack-a", STACK_A);
    let b = library("livepatch-stack-b", STACK_B);
    let mut target = start_greeter();
    let pid = target.pid();

    load(&pid, &a);
    assert_eq!(greeting(&mut target), "greeting of patch a");
    load(&pid, &b);
    assert_eq!(greeting(&mut target), "greeting of patch b");
    assert_eq!(farewell(&mut target), "farewell of patch b");
    let status = status_json(&pid);
    assert_eq!(
        patch_names(&status),
        ["livepatch_stack_a", "livepatch_stack_b"]
    );
    assert_eq!(status["patches"][0]["stack_order"], 1, "{status}");
    assert_eq!(status["patches"][1]["stack_order"], 2, "{status}");
    // An enabled patch's library is in use.
    let refused = cli(&["unload", &pid, "livepatch_stack_a"]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));

    disable(&pid, "livepatch_stack_b");
    assert_eq!(greeting(&mut target), "greeting of patch a");
    assert_eq!(farewell(&mut target), ORIGINAL_FAREWELL);
    unload(&pid, "livepatch_stack_b");
    disable(&pid, "livepatch_stack_a");
    unload(&pid, "livepatch_stack_a");
    assert_eq!(greeting(&mut target), ORIGINAL_GREETING);

    assert_eq!(
        dmesg(&pid),
        [
            patching("livepatch_stack_a"),
            patching("livepatch_stack_b"),
            unpatching("livepatch_stack_b"),
            unpatching("livepatch_stack_a"),
        ]
        .concat()
    );
}

/// Since Linux 5.1 any enabled patch may be disabled, not only the newest: disabling the bottom
/// of the stack leaves the top one running, renumbered to stack_order 1.
#[test]
fn disabling_the_bottom_of_two_stacked_patches_keeps_the_top_one_running() {
    let a = library("livepatch-stack-a", STACK_A);
    let b = library("livepatch-stack-b", STACK_B);
    let mut target = start_greeter();
    let pid = target.pid();

    load(&pid, &a);
    load(&pid, &b);
    disable(&pid, "livepatch_stack_a");
    assert_eq!(greeting(&mut target), "greeting of patch b");
    assert_eq!(farewell(&mut target), "farewell of patch b");
    let status = status_json(&pid);
    assert_eq!(patch_names(&status), ["livepatch_stack_b"]);
    assert_eq!(status["patches"][0]["stack_order"], 1, "{status}");
    assert_eq!(unloadable_names(&status), ["livepatch_stack_a"]);

    disable(&pid, "livepatch_stack_b");
    assert_eq!(greeting(&mut target), ORIGINAL_GREETING);
    assert_eq!(farewell(&mut target), ORIGINAL_FAREWELL);
    assert_eq!(
        dmesg(&pid),
        [
            patching("livepatch_stack_a"),
            patching("livepatch_stack_b"),
            unpatching("livepatch_stack_a"),
            unpatching("livepatch_stack_b"),
        ]
        .concat()
    );
}

/// A non-replacing fix of `farewell`.
const FAREWELL_FIX: &str = "kernel/farewell-fix-patch.c";

/// A cumulative patch that carries a greeting fix and no farewell fix.
const GREETING_ONLY_REPLACE: &str = "kernel/greeting-only-replace-patch.c";

/// Kernel test "atomic replace livepatch": a cumulative patch replaces every enabled patch in one
/// transition; a function only a replaced patch had (here `farewell`) goes back to the original
/// through a nop; none of the replaced patches logs an unpatching transition, and their libraries
/// become unloadable.
#[test]
fn a_cumulative_patch_replaces_every_patch_and_reverts_the_functions_it_does_not_carry() {
    let farewell_fix = library("livepatch-farewell-fix", FAREWELL_FIX);
    let replacement = library("livepatch-greeting-only", GREETING_ONLY_REPLACE);
    let mut target = start_greeter();
    let pid = target.pid();

    load(&pid, &examples().join("livepatch-sample.so"));
    load(&pid, &farewell_fix);
    assert_eq!(greeting(&mut target), "this has been live patched");
    assert_eq!(farewell(&mut target), "goodbye from the farewell fix");

    load(&pid, &replacement);
    assert_eq!(greeting(&mut target), "hello from the cumulative greeting");
    assert_eq!(farewell(&mut target), ORIGINAL_FAREWELL);
    let status = status_json(&pid);
    assert_eq!(patch_names(&status), ["livepatch_greeting_only"]);
    assert_eq!(status["patches"][0]["replace"], true, "{status}");
    assert_eq!(status["patches"][0]["stack_order"], 1, "{status}");
    // The nop for farewell is discarded once the transition completed.
    let funcs: Vec<_> = status["patches"][0]["objects"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|o| o["funcs"].as_array().unwrap())
        .map(|f| (f["name"].as_str().unwrap(), f["nop"].as_bool().unwrap()))
        .collect();
    assert_eq!(funcs, [("greeting", false)], "{status}");
    assert_eq!(
        unloadable_names(&status),
        ["livepatch_sample", "livepatch_farewell_fix"]
    );
    assert!(
        status["unloadable"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["forced"] == false),
        "{status}"
    );
    unload(&pid, "livepatch_sample");
    unload(&pid, "livepatch_farewell_fix");
    assert_eq!(status_json(&pid)["unloadable"], serde_json::json!([]));

    disable(&pid, "livepatch_greeting_only");
    assert_eq!(greeting(&mut target), ORIGINAL_GREETING);
    assert_eq!(farewell(&mut target), ORIGINAL_FAREWELL);
    assert_eq!(
        dmesg(&pid),
        [
            patching("livepatch_sample"),
            patching("livepatch_farewell_fix"),
            patching("livepatch_greeting_only"),
            unpatching("livepatch_greeting_only"),
        ]
        .concat()
    );
}

// One transition at a time, on the busy service.

/// A patch named `name` in which `value()` returns `value`.
fn value_patch(name: &str, value: i32) -> Cc {
    Cc::library(VALUE_PATCH)
        .define_string("PATCH_NAME", name)
        .define("VALUE", value)
}

/// `stuck` of [`BUSY_SERVICE`] becomes a new function that a worker never leaves either.
const STUCK_PATCH: &str = "kernel/stuck-patch.c";

/// One transition at a time: while a patch's transition runs, another patch can be neither
/// disabled nor enabled (`-EBUSY`, and no "enabling patch" line for the refused one); both work
/// once it completed.
#[test]
fn no_patch_is_enabled_or_disabled_while_another_patch_is_in_transition() {
    let program = program("service_busy", BUSY_SERVICE);
    let value_two = value_patch("livepatch_value_two", 2).build("livepatch-value-two");
    let value_three = value_patch("livepatch_value_three", 3).build("livepatch-value-three");
    let stuck = library("livepatch-stuck", STUCK_PATCH);
    let mut target = Target::start(&program);
    let pid = target.pid();

    load(&pid, &value_two);
    target.send("worker");
    target.expect("worker: inside stuck");
    let pending = cli(&["load", &pid, stuck.to_str().unwrap(), "--no-wait"]);
    assert!(pending.status.success(), "{}", stderr(&pending));
    assert_eq!(status_json(&pid)["transition"]["patch"], "livepatch_stuck");

    let busy_disable = cli(&["disable", &pid, "livepatch_value_two"]);
    assert_eq!(
        busy_disable.status.code(),
        Some(1),
        "{}",
        stderr(&busy_disable)
    );
    assert!(
        stderr(&busy_disable).contains("'livepatch_stuck' is in transition"),
        "{}",
        stderr(&busy_disable)
    );
    let busy_load = cli(&["load", &pid, value_three.to_str().unwrap()]);
    assert_eq!(busy_load.status.code(), Some(1), "{}", stderr(&busy_load));
    target.send("value");
    target.expect("value 2");
    let status = status_json(&pid);
    assert_eq!(
        patch_names(&status),
        ["livepatch_value_two", "livepatch_stuck"]
    );
    assert_eq!(status["unloadable"], serde_json::json!([]), "{status}");

    target.send("release");
    target.expect("joined");
    target.saw_or_expect("livepatch: 'livepatch_stuck': patching complete");
    disable(&pid, "livepatch_value_two");
    target.send("value");
    target.expect("value 1");
    load(&pid, &value_three);
    target.send("value");
    target.expect("value 3");

    assert_eq!(
        dmesg(&pid),
        [
            patching("livepatch_value_two"),
            patching("livepatch_stuck"),
            unpatching("livepatch_value_two"),
            patching("livepatch_value_three"),
        ]
        .concat()
    );
}
