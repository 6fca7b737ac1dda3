//! Refusals end to end: a real program runs under the agent, the `livepatch` command attempts
//! something the agent must refuse, and the test checks the refusal (exit status 1, a
//! `livepatch: error: ` line that names the thing and the reason) and that the process is exactly
//! as before: the same status, the same answers from its functions, the same first bytes of the
//! functions the patch targeted. Where it applies, a correct patch loads afterwards, so nothing
//! half-applied is left in its way.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use livepatch_protocol as protocol;
use support::refusal::{assert_loads, assert_refused, assert_succeeds, call, load, snapshot};
use support::{
    Cc, MISSING_FUNCTION_PATCH, Target, VALUE_PATCH, agent_log, cli, library, patch_names,
    path_str, program, scratch, socket, status_json, stderr,
};

const ENOMEM: i32 = 12;
const EBUSY: i32 = 16;
const ENODEV: i32 = 19;
const EINVAL: i32 = 22;

/// Two functions in the main program.
const BASIC: &str = "refusals/basic.c";

/// The GNU build id of an ELF file, as `readelf -n` prints it.
fn build_id(file: &Path) -> String {
    let out = std::process::Command::new("readelf")
        .arg("-n")
        .arg(file)
        .output()
        .expect("readelf runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: ").map(str::to_owned))
        .unwrap_or_else(|| panic!("{} has no build id", file.display()))
}

/// Sends `command` straight to the agent and returns the errno and message of its refusal;
/// the command prints only the message, and the errno is part of the kernel's contract.
fn refusal_errno(pid: &str, command: protocol::Command) -> (i32, String) {
    let mut stream = UnixStream::connect(socket(pid)).expect("agent socket");
    let mut line = serde_json::to_string(&protocol::Request::new(command.clone())).unwrap();
    line.push('\n');
    stream.write_all(line.as_bytes()).unwrap();
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).unwrap();
    let response: protocol::Response = serde_json::from_str(&reply).unwrap();
    match response.outcome {
        protocol::Outcome::Error { errno, message } => (errno, message),
        other => panic!("{command:?} was not refused: {other:?}"),
    }
}

fn load_request(patch: &Path) -> protocol::Command {
    protocol::Command::Load {
        path: path_str(&patch.canonicalize().unwrap()).to_owned(),
    }
}

// 1. Missing symbols.

#[test]
fn a_function_missing_from_the_program_is_refused_before_anything_is_written() {
    let program = program("refuse_missing_main_prog", BASIC);
    let bad = library("refuse-missing-main", MISSING_FUNCTION_PATCH);
    let fix = library("refuse-missing-main-fix", VALUE_PATCH);
    let mut target = Target::start(&program);
    let pid = target.pid();
    let before = snapshot(&mut target, &["value", "other"], &["value"]);
    let log_before = agent_log(&pid).len();

    let out = load(&pid, &bad);
    assert_refused(
        &out,
        &[
            "'refuse-missing-main'",
            "'no_such_function'",
            "'vmlinux'",
            "not found",
        ],
    );
    // The kernel fails in klp_init_object_loaded, before "enabling patch": one line, no
    // transition started and cancelled.
    assert_eq!(
        agent_log(&pid)[log_before..],
        ["livepatch: symbol 'no_such_function' not found in symbol table"]
    );
    assert_eq!(
        snapshot(&mut target, &["value", "other"], &["value"]),
        before
    );
    assert_eq!(before.status["transition"], serde_json::Value::Null);

    assert_loads(&pid, &fix);
    assert_eq!(call(&mut target, "value"), "call value = 2");
}

/// `lib_value` and `lib_other`.
const TARGET_LIBRARY: &str = "refusals/target-library.c";

/// Opens the library `argv[1]` before it is ready, so the library is there when patches come.
const LIBRARY_HOST: &str = "refusals/library-host.c";

const PATCH_MISSING_IN_LIBRARY: &str = "refusals/missing-in-library-patch.c";

/// `lib_value` of the library `LIBRARY` becomes `VALUE` (defines), in the build `BUILD_ID` if
/// defined.
const PATCH_LIBRARY_VALUE: &str = "refusals/library-value-patch.c";

#[test]
fn a_function_missing_from_a_named_library_is_refused_naming_the_library() {
    let library = Cc::library(TARGET_LIBRARY).build("refuse_missing_lib_target");
    let program = program("refuse_missing_lib_prog", LIBRARY_HOST);
    let bad = Cc::library(PATCH_MISSING_IN_LIBRARY).build("refuse-missing-lib");
    let fix = Cc::library(PATCH_LIBRARY_VALUE)
        .define_string("LIBRARY", "refuse_missing_lib_target.so")
        .define("VALUE", 12)
        .build("refuse-missing-lib-fix");
    let mut target = Target::start_with(&program, &[path_str(&library)], "ready");
    let pid = target.pid();
    let functions = ["value", "lib_value", "lib_other"];
    let before = snapshot(&mut target, &functions, &functions);

    let out = load(&pid, &bad);
    assert_refused(
        &out,
        &[
            "'refuse-missing-lib'",
            "'lib_no_such_function'",
            "'refuse_missing_lib_target.so'",
            "not found",
        ],
    );
    assert_eq!(snapshot(&mut target, &functions, &functions), before);

    assert_loads(&pid, &fix);
    assert_eq!(call(&mut target, "lib_value"), "call lib_value = 12");
    assert_eq!(call(&mut target, "lib_other"), "call lib_other = 11");
}

// 2. Ambiguous symbols.

const DUPLICATE_A: &str = "refusals/duplicate-a.c";

const DUPLICATE_B: &str = "refusals/duplicate-b.c";

const DUPLICATE_MAIN: &str = "refusals/duplicate-main.c";

/// `helper` at symbol position SYMPOS becomes 99.
const PATCH_HELPER: &str = "refusals/helper-patch.c";

/// main.c, a.c, b.c in this order: a.c's `helper` is first in the symbol table.
fn duplicate_program(name: &str) -> PathBuf {
    Cc::program(DUPLICATE_MAIN)
        .source(DUPLICATE_A)
        .source(DUPLICATE_B)
        .build(name)
}

fn helper_patch(name: &str, sympos: u32) -> PathBuf {
    Cc::library(PATCH_HELPER)
        .define("SYMPOS", sympos)
        .build(name)
}

const DUPLICATE_CALLS: [&str; 2] = ["call_a", "call_b"];
const DUPLICATE_CODE: [&str; 2] = ["helper_a", "helper_b"];

#[test]
fn a_static_function_defined_in_two_files_needs_old_sympos() {
    let program = duplicate_program("refuse_ambiguous_prog");
    let bad = helper_patch("refuse-ambiguous", 0);
    let fix = helper_patch("refuse-ambiguous-second", 2);
    let mut target = Target::start(&program);
    let pid = target.pid();
    let before = snapshot(&mut target, &DUPLICATE_CALLS, &DUPLICATE_CODE);
    assert_eq!(before.answers, ["call call_a = 10", "call call_b = 20"]);

    let out = load(&pid, &bad);
    assert_refused(
        &out,
        &[
            "'refuse-ambiguous'",
            "'helper'",
            "2 times",
            "'vmlinux'",
            "old_sympos",
        ],
    );
    assert!(agent_log(&pid).contains(
        &"livepatch: unresolvable ambiguity for symbol 'helper' in object 'vmlinux'".to_owned()
    ));
    assert_eq!(
        snapshot(&mut target, &DUPLICATE_CALLS, &DUPLICATE_CODE),
        before
    );

    // Position 2 is b.c's helper: only it changes.
    assert_loads(&pid, &fix);
    let after = snapshot(&mut target, &DUPLICATE_CALLS, &DUPLICATE_CODE);
    assert_eq!(after.answers, ["call call_a = 10", "call call_b = 99"]);
    assert_eq!(after.code[0], before.code[0]);
    assert_ne!(after.code[1], before.code[1]);
    let func = &after.status["patches"][0]["objects"][0]["funcs"][0];
    assert_eq!(func["name"], "helper", "{func}");
    assert_eq!(func["sympos"], 2, "{func}");
}

#[test]
fn an_old_sympos_past_the_last_match_is_refused() {
    let program = duplicate_program("refuse_sympos_prog");
    let bad = helper_patch("refuse-sympos-past", 3);
    let fix = helper_patch("refuse-sympos-first", 1);
    let mut target = Target::start(&program);
    let pid = target.pid();
    let before = snapshot(&mut target, &DUPLICATE_CALLS, &DUPLICATE_CODE);

    let out = load(&pid, &bad);
    assert_refused(
        &out,
        &[
            "'refuse-sympos-past'",
            "position 3",
            "'helper'",
            "'vmlinux'",
            "not found",
        ],
    );
    assert!(
        agent_log(&pid).contains(
            &"livepatch: symbol position 3 for symbol 'helper' in object 'vmlinux' not found"
                .to_owned()
        )
    );
    assert_eq!(
        snapshot(&mut target, &DUPLICATE_CALLS, &DUPLICATE_CODE),
        before
    );

    assert_loads(&pid, &fix);
    let after = snapshot(&mut target, &DUPLICATE_CALLS, &DUPLICATE_CODE);
    assert_eq!(after.answers, ["call call_a = 99", "call call_b = 20"]);
    assert_ne!(after.code[0], before.code[0]);
    assert_eq!(after.code[1], before.code[1]);
}

// 3. Build ids.

const FAKE_BUILD_ID: &str = "deadbeefdeadbeefdeadbeefdeadbeefdeadbeef";

#[test]
fn a_patch_written_for_another_build_of_the_program_is_refused_naming_both_ids() {
    let program = program("refuse_build_prog", BASIC);
    let real_id = build_id(&program);
    let bad = Cc::library(VALUE_PATCH)
        .define_string("BUILD_ID", FAKE_BUILD_ID)
        .build("refuse-build-wrong");
    let fix = Cc::library(VALUE_PATCH)
        .define_string("BUILD_ID", &real_id)
        .build("refuse-build-right");
    let mut target = Target::start(&program);
    let pid = target.pid();
    let before = snapshot(&mut target, &["value", "other"], &["value"]);

    let out = load(&pid, &bad);
    assert_refused(
        &out,
        &["'refuse-build-wrong'", "'vmlinux'", &real_id, FAKE_BUILD_ID],
    );
    assert_eq!(
        snapshot(&mut target, &["value", "other"], &["value"]),
        before
    );

    assert_loads(&pid, &fix);
    assert_eq!(call(&mut target, "value"), "call value = 2");
}

/// Opens the library `argv[1]` only when told: `load`, and `loaded?` to ask the dynamic
/// linker whether it is there.
const LATER_HOST: &str = "refusals/later-host.c";

/// `lib_value` of refuse_later_target.so becomes 31, in the build `build_id` only.
fn later_patch(name: &str, build_id: &str) -> PathBuf {
    Cc::library(PATCH_LIBRARY_VALUE)
        .define_string("LIBRARY", "refuse_later_target.so")
        .define("VALUE", 31)
        .define_string("BUILD_ID", build_id)
        .build(name)
}

#[test]
fn a_library_loaded_later_from_another_build_fails_to_open_and_the_program_runs_on() {
    let library = Cc::library(TARGET_LIBRARY).build("refuse_later_target");
    let library_id = build_id(&library);
    let program = program("refuse_later_prog", LATER_HOST);
    let wrong = later_patch("refuse-later-wrong", FAKE_BUILD_ID);
    let right = later_patch("refuse-later-right", &library_id);
    let mut target = Target::start_with(&program, &[path_str(&library)], "ready");
    let pid = target.pid();

    // The library is not there yet: nothing to check, the patch waits for it.
    assert_loads(&pid, &wrong);
    let status = status_json(&pid);
    assert_eq!(
        status["patches"][0]["name"], "refuse-later-wrong",
        "{status}"
    );
    assert_eq!(status["patches"][0]["enabled"], true, "{status}");
    let object = &status["patches"][0]["objects"][0];
    assert_eq!(object["name"], "refuse_later_target.so", "{status}");
    assert_eq!(object["patched"], false, "{status}");

    target.send("load");
    let failed = target.expect("load failed");
    target.send("loaded?");
    target.expect("library loaded: no");
    assert_eq!(call(&mut target, "value"), "call value = 1");
    let log = agent_log(&pid);
    assert!(
        log.iter().any(|l| l.contains("refuse_later_target.so")
            && l.contains(&library_id)
            && l.contains(FAKE_BUILD_ID)),
        "no log line names the library and both build ids: {log:#?}"
    );
    assert_eq!(status_json(&pid), status);

    assert_succeeds(&["disable", &pid, "refuse-later-wrong"]);
    assert_succeeds(&["unload", &pid, "refuse-later-wrong"]);
    assert_loads(&pid, &right);
    target.send("load");
    target.expect("loaded: lib_value() = 31");

    // dlopen(3): after a NULL return, dlerror() describes the error; programs print it, some
    // without checking it for NULL.
    assert!(
        !failed.contains("(dlerror says nothing)") && failed.contains("refuse_later_target.so"),
        "the program's dlerror() does not say why: {failed:?}"
    );
}

// 4. Functions that cannot be redirected.

/// `tiny` is a lone `ret` (1 byte); `loopy` jumps back to offset 2, inside the 5 bytes a
/// jump would overwrite.
const UNPATCHABLE: &str = "refusals/unpatchable.c";

/// `value`, then `FUNCTION` (a define) with `NEW_FUNCTION`.
const PATCH_UNPATCHABLE: &str = "refusals/unpatchable-patch.c";

const UNPATCHABLE_FUNCTIONS: [&str; 3] = ["value", "tiny", "loopy"];

fn refuse_unpatchable(function: &str, reason: &str) {
    let program = program(&format!("refuse_unpatchable_{function}_prog"), UNPATCHABLE);
    let name = format!("refuse-unpatchable-{function}");
    let bad = Cc::library(PATCH_UNPATCHABLE)
        .define_string("FUNCTION", function)
        .define("NEW_FUNCTION", format!("new_{function}"))
        .build(&name);
    let fix = library(&format!("{name}-fix"), VALUE_PATCH);
    let mut target = Target::start(&program);
    let pid = target.pid();
    let before = snapshot(&mut target, &UNPATCHABLE_FUNCTIONS, &UNPATCHABLE_FUNCTIONS);
    assert_eq!(
        before.answers,
        ["call value = 1", "call tiny = 42", "call loopy = 3"]
    );

    let out = load(&pid, &bad);
    assert_refused(
        &out,
        &[&format!("'{name}'"), &format!("'{function}'"), reason],
    );
    assert!(
        agent_log(&pid).contains(&format!(
            "livepatch: failed to find location for function '{function}'"
        )),
        "{:#?}",
        agent_log(&pid)
    );
    assert_eq!(
        snapshot(&mut target, &UNPATCHABLE_FUNCTIONS, &UNPATCHABLE_FUNCTIONS),
        before
    );

    assert_loads(&pid, &fix);
    assert_eq!(call(&mut target, "value"), "call value = 2");
}

#[test]
fn a_function_shorter_than_a_jump_is_refused_with_its_length() {
    refuse_unpatchable("tiny", "1 bytes long, too short for a 5-byte jump");
}

#[test]
fn a_function_branching_into_its_first_bytes_is_refused_with_the_branch() {
    refuse_unpatchable("loopy", "lands at offset 0x2");
}

// 5. System states.

/// `value` becomes `RESULT`, with state 7 at `VERSION`, replacing if `REPLACE` (defines).
const PATCH_STATE: &str = "refusals/state-patch.c";

fn state_patch(name: &str, version: u32, replace: bool, result: i32) -> PathBuf {
    Cc::library(PATCH_STATE)
        .define("RESULT", result)
        .define("VERSION", version)
        .define("REPLACE", replace)
        .build(name)
}

#[test]
fn a_replacing_patch_with_an_older_state_version_is_refused_with_einval() {
    let program = program("refuse_state_prog", BASIC);
    let first = state_patch("refuse-state-v2", 2, false, 2);
    let older = state_patch("refuse-state-v1-replace", 1, true, 3);
    let same = state_patch("refuse-state-v2-replace", 2, true, 4);
    let mut target = Target::start(&program);
    let pid = target.pid();
    assert_loads(&pid, &first);
    let before = snapshot(&mut target, &["value", "other"], &["value"]);
    assert_eq!(before.answers[0], "call value = 2");
    let log_before = agent_log(&pid).len();

    let out = load(&pid, &older);
    assert_refused(
        &out,
        &[
            "'refuse-state-v1-replace'",
            "'refuse-state-v2'",
            "state 7",
            "version 1",
            "not compatible",
        ],
    );
    // As klp_enable_patch: the compatibility check comes before "enabling patch".
    assert_eq!(
        agent_log(&pid)[log_before..],
        [
            "livepatch: Livepatch patch (refuse-state-v1-replace) is not compatible with the already installed livepatches."
        ]
    );
    assert_eq!(
        snapshot(&mut target, &["value", "other"], &["value"]),
        before
    );
    let (errno, _) = refusal_errno(&pid, load_request(&older));
    assert_eq!(errno, EINVAL);

    assert_loads(&pid, &same);
    assert_eq!(call(&mut target, "value"), "call value = 4");
    assert_eq!(patch_names(&status_json(&pid)), ["refuse-state-v2-replace"]);
}

// 6. A failing pre_patch callback.

/// `value` becomes 2, but the pre_patch callback fails with -ENODEV.
const PATCH_PRE_PATCH_FAILS: &str = "refusals/pre-patch-fails-patch.c";

#[test]
fn a_pre_patch_callback_failing_with_enodev_refuses_the_patch_as_the_kernel_does() {
    let program = program("refuse_pre_patch_prog", BASIC);
    let bad = library("refuse-pre-patch", PATCH_PRE_PATCH_FAILS);
    let fix = library("refuse-pre-patch-fix", VALUE_PATCH);
    let mut target = Target::start(&program);
    let pid = target.pid();
    let before = snapshot(&mut target, &["value", "other"], &["value"]);
    let log_before = agent_log(&pid).len();

    let out = load(&pid, &bad);
    assert_refused(
        &out,
        &["'refuse-pre-patch'", "pre_patch", "'vmlinux'", "-19"],
    );
    // The kernel selftest "pre-patch callback -ENODEV": no post_unpatch, since pre_patch failed.
    assert_eq!(
        agent_log(&pid)[log_before..],
        [
            "livepatch: enabling patch 'refuse-pre-patch'",
            "livepatch: 'refuse-pre-patch': initializing patching transition",
            "pre_patch_callback: vmlinux",
            "livepatch: pre-patch callback failed for object 'vmlinux'",
            "livepatch: failed to enable patch 'refuse-pre-patch'",
            "livepatch: 'refuse-pre-patch': canceling patching transition, going to unpatch",
            "livepatch: 'refuse-pre-patch': completing unpatching transition",
            "livepatch: 'refuse-pre-patch': unpatching complete",
        ]
    );
    assert_eq!(
        snapshot(&mut target, &["value", "other"], &["value"]),
        before
    );
    let (errno, _) = refusal_errno(&pid, load_request(&bad));
    assert_eq!(errno, ENODEV);

    assert_loads(&pid, &fix);
    assert_eq!(call(&mut target, "value"), "call value = 2");
}

// 7. A failing state setup callback.

/// `value` becomes 2, with state 9 whose setup returns `SETUP_RESULT`; its callbacks log lines
/// that begin with `TAG` (defines).
const PATCH_STATE_SETUP: &str = "refusals/state-setup-patch.c";

fn setup_patch(name: &str, setup_result: i32) -> PathBuf {
    Cc::library(PATCH_STATE_SETUP)
        .define_string("TAG", name)
        .define("SETUP_RESULT", setup_result)
        .build(name)
}

#[test]
fn a_failing_state_setup_refuses_the_patch_without_releasing_the_state() {
    let program = program("refuse_setup_prog", BASIC);
    let bad = setup_patch("refuse-setup", -ENOMEM);
    let fix = setup_patch("refuse-setup-fix", 0);
    let mut target = Target::start(&program);
    let pid = target.pid();
    let before = snapshot(&mut target, &["value", "other"], &["value"]);
    let log_before = agent_log(&pid).len();

    let out = load(&pid, &bad);
    assert_refused(&out, &["'refuse-setup'", "setup", "state 9", "-12"]);
    // Setup runs before any pre_patch; nothing was set up, so nothing is released, and no
    // object callback runs at all.
    assert_eq!(
        agent_log(&pid)[log_before..],
        [
            "livepatch: enabling patch 'refuse-setup'",
            "livepatch: 'refuse-setup': initializing patching transition",
            "refuse-setup: setup_callback: state 9",
            "livepatch: failed to enable patch 'refuse-setup'",
            "livepatch: 'refuse-setup': canceling patching transition, going to unpatch",
            "livepatch: 'refuse-setup': completing unpatching transition",
            "livepatch: 'refuse-setup': unpatching complete",
        ]
    );
    assert_eq!(
        snapshot(&mut target, &["value", "other"], &["value"]),
        before
    );
    let (errno, _) = refusal_errno(&pid, load_request(&bad));
    assert_eq!(errno, ENOMEM);

    // The state is still new to the process: the next patch carrying it sets it up again.
    let log_before = agent_log(&pid).len();
    assert_loads(&pid, &fix);
    assert_eq!(call(&mut target, "value"), "call value = 2");
    let log = agent_log(&pid);
    for line in [
        "refuse-setup-fix: setup_callback: state 9",
        "refuse-setup-fix: pre_patch_callback",
        "refuse-setup-fix: enable_callback: state 9",
    ] {
        assert!(
            log[log_before..].iter().any(|l| l == line),
            "no {line:?} in {:#?}",
            &log[log_before..]
        );
    }
}

// 8. Another transition running.

/// A worker thread can be sent into `stuck`, which it leaves only when released.
const BUSY: &str = "refusals/busy.c";

/// `other` becomes 8.
const PATCH_OTHER: &str = "refusals/other-patch.c";

/// `value` becomes 2, and `stuck` a new one that says so.
const PATCH_STUCK: &str = "refusals/stuck-patch.c";

#[test]
fn while_a_transition_runs_other_loads_disables_and_its_unload_are_refused_with_ebusy() {
    let program = program("refuse_busy_prog", BUSY);
    let done = library("refuse-busy-done", PATCH_OTHER);
    let stuck = library("refuse-busy-stuck", PATCH_STUCK);
    let second = Cc::library(VALUE_PATCH)
        .define("VALUE", 3)
        .build("refuse-busy-second");
    let mut target = Target::start(&program);
    let pid = target.pid();
    assert_loads(&pid, &done);
    target.send("worker");
    target.expect("worker: inside stuck");
    let load_stuck = cli(&["load", &pid, path_str(&stuck), "--timeout", "1"]);
    assert_eq!(load_stuck.status.code(), Some(3), "{}", stderr(&load_stuck));
    let calls = ["value", "other"];
    let code_of = ["value", "other", "stuck"];
    let before = snapshot(&mut target, &calls, &code_of);
    assert_eq!(before.answers, ["call value = 2", "call other = 8"]);
    assert_eq!(
        before.status["transition"]["patch"], "refuse-busy-stuck",
        "{}",
        before.status
    );

    let out = load(&pid, &second);
    assert_refused(
        &out,
        &[
            "'refuse-busy-second'",
            "'refuse-busy-stuck'",
            "in transition",
        ],
    );
    let out = cli(&["disable", &pid, "refuse-busy-done"]);
    assert_refused(&out, &["'refuse-busy-stuck'", "in transition"]);
    let out = cli(&["unload", &pid, "refuse-busy-stuck"]);
    assert_refused(&out, &["'refuse-busy-stuck'", "in transition"]);
    let out = cli(&["enable", &pid, "refuse-busy-stuck"]);
    assert_refused(&out, &["'refuse-busy-stuck'", "already in transition"]);
    assert_eq!(snapshot(&mut target, &calls, &code_of), before);

    let busy = [
        load_request(&second),
        protocol::Command::Disable {
            patch: "refuse-busy-done".into(),
        },
        protocol::Command::Unload {
            patch: "refuse-busy-stuck".into(),
        },
    ];
    for request in busy {
        let (errno, message) = refusal_errno(&pid, request.clone());
        assert_eq!(errno, EBUSY, "{request:?}: {message}");
    }
    let (errno, _) = refusal_errno(
        &pid,
        protocol::Command::Enable {
            patch: "refuse-busy-stuck".into(),
        },
    );
    assert_eq!(errno, EINVAL);

    // The worker leaves the old function: the first transition completes by itself, and the
    // refused patch now loads.
    target.send("release");
    target.expect("worker: left stuck");
    target.expect("joined");
    target.saw_or_expect("livepatch: 'refuse-busy-stuck': patching complete");
    assert_eq!(status_json(&pid)["transition"], serde_json::Value::Null);
    assert_loads(&pid, &second);
    assert_eq!(call(&mut target, "value"), "call value = 3");
    assert_eq!(
        patch_names(&status_json(&pid)),
        [
            "refuse-busy-done",
            "refuse-busy-stuck",
            "refuse-busy-second"
        ]
    );
}

// 9. Unload while enabled.

#[test]
fn an_enabled_patch_cannot_be_unloaded_until_it_is_disabled() {
    let program = program("refuse_unload_prog", BASIC);
    let patch = library("refuse-unload-enabled", VALUE_PATCH);
    let mut target = Target::start(&program);
    let pid = target.pid();
    let original = snapshot(&mut target, &["value", "other"], &["value"]);
    assert_loads(&pid, &patch);
    let before = snapshot(&mut target, &["value", "other"], &["value"]);
    assert_eq!(before.answers[0], "call value = 2");

    let out = cli(&["unload", &pid, "refuse-unload-enabled"]);
    assert_refused(&out, &["'refuse-unload-enabled'", "is enabled", "disable"]);
    assert_eq!(
        snapshot(&mut target, &["value", "other"], &["value"]),
        before
    );
    let (errno, _) = refusal_errno(
        &pid,
        protocol::Command::Unload {
            patch: "refuse-unload-enabled".into(),
        },
    );
    assert_eq!(errno, EBUSY);

    assert_succeeds(&["disable", &pid, "refuse-unload-enabled"]);
    assert_succeeds(&["unload", &pid, "refuse-unload-enabled"]);
    assert_eq!(
        snapshot(&mut target, &["value", "other"], &["value"]),
        original
    );
}

// 10. Malformed patch libraries.

/// Loads `bad`, expects a refusal naming `names`, checks nothing changed, then loads a
/// correct patch.
fn refuse_malformed(test: &str, bad: &Path, names: &[&str]) -> String {
    let program = program(&format!("{test}_prog"), BASIC);
    let fix = library(&format!("{test}-fix"), VALUE_PATCH);
    let mut target = Target::start(&program);
    let pid = target.pid();
    let before = snapshot(&mut target, &["value", "other"], &["value"]);

    let message = assert_refused(&load(&pid, bad), names);
    assert_eq!(
        snapshot(&mut target, &["value", "other"], &["value"]),
        before
    );
    assert_eq!(before.status["patches"], serde_json::json!([]));

    assert_loads(&pid, &fix);
    assert_eq!(call(&mut target, "value"), "call value = 2");
    message
}

#[test]
fn a_library_without_klp_patch_is_refused_as_not_a_patch() {
    let bad = library("refuse-no-declaration", "refusals/no-declaration.c");
    refuse_malformed(
        "refuse_no_declaration",
        &bad,
        &["refuse-no-declaration.so", "KLP_PATCH"],
    );
}

#[test]
fn a_patch_path_that_does_not_exist_is_refused_naming_the_path() {
    let missing = scratch().join("refuse-no-such-patch.so");
    refuse_malformed(
        "refuse_no_such_path",
        &missing,
        &["refuse-no-such-patch.so", "No such file"],
    );
}

#[test]
fn a_file_that_is_not_a_shared_library_is_refused_with_the_loader_reason() {
    let bad = scratch().join("refuse-not-elf.so");
    // Longer than an ELF header, so the loader reads it and rejects the header.
    std::fs::write(&bad, "this is not an ELF file\n".repeat(8)).unwrap();
    refuse_malformed(
        "refuse_not_elf",
        &bad,
        &["refuse-not-elf.so", "cannot load patch library", "ELF"],
    );
}

/// An object whose funcs are NULL.
const PATCH_NULL_FUNCS: &str = "refusals/null-funcs-patch.c";

#[test]
fn an_object_with_null_funcs_is_refused_as_malformed() {
    let bad = library("refuse-null-funcs", PATCH_NULL_FUNCS);
    refuse_malformed(
        "refuse_null_funcs",
        &bad,
        &[
            "refuse-null-funcs",
            "malformed",
            "funcs",
            "'libc.so.6'",
            "NULL",
        ],
    );
}
