//! What the ports of the kernel's livepatch selftests (`test_*.rs`) share: the example programs
//! built so that every line answers one command, the agent's log as the selftests read dmesg,
//! the log lines of their `P(X)` and `U(X)`, and the verbs they expect to succeed.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{Cc, WORKSPACE, agent_log, cli, stderr};

/// examples/programs/NAME.c built as examples/build.sh builds it, with
/// `fixtures/kernel/restarting-poll.c` (the program's `poll()` restarts after the agent's
/// signals), and with patchable function entries if `patchable_entries`.
pub fn example_program(name: &str, patchable_entries: bool) -> PathBuf {
    let mut cc = Cc::program(Path::new(WORKSPACE).join(format!("examples/programs/{name}.c")))
        .flags(&["-O2", "-g"])
        .source("kernel/restarting-poll.c")
        .arg("-Wl,--wrap=poll")
        .arg("-ldl");
    if patchable_entries {
        cc = cc.arg("-fpatchable-function-entry=16,14");
    }
    cc.build(&format!("{name}-restarting-poll"))
}

/// The agent's log as dmesg shows it in the kernel selftests: the core's lines and the lines
/// patch code writes with `klp_log`, in the order they were written. It is read from the agent's
/// ring rather than from the target's stderr so that lines with and without the `livepatch: `
/// prefix keep their relative order. The per-thread lines of `klp_try_switch_task` are left out,
/// as the selftests switch them off.
pub fn dmesg(pid: &str) -> Vec<String> {
    agent_log(pid)
        .into_iter()
        .filter(|l| !l.contains("klp_try_switch_task: "))
        .collect()
}

/// `P(X)` of the selftests: enabling a patch without callbacks.
pub fn patching(patch: &str) -> Vec<String> {
    vec![
        format!("livepatch: enabling patch '{patch}'"),
        format!("livepatch: '{patch}': initializing patching transition"),
        format!("livepatch: '{patch}': starting patching transition"),
        format!("livepatch: '{patch}': completing patching transition"),
        format!("livepatch: '{patch}': patching complete"),
    ]
}

/// `U(X)` of the selftests without the `echo` line: disabling a patch without callbacks.
pub fn unpatching(patch: &str) -> Vec<String> {
    vec![
        format!("livepatch: '{patch}': initializing unpatching transition"),
        format!("livepatch: '{patch}': starting unpatching transition"),
        format!("livepatch: '{patch}': completing unpatching transition"),
        format!("livepatch: '{patch}': unpatching complete"),
    ]
}

/// How long a transition of these idle programs may take; it completes at the first attempt
/// unless something is wrong, and a failing test should not hang for the CLI's default minute.
pub const TRANSITION_TIMEOUT: &str = "5";

pub fn load(pid: &str, library: &Path) {
    let load = cli(&[
        "load",
        pid,
        library.to_str().unwrap(),
        "--timeout",
        TRANSITION_TIMEOUT,
    ]);
    assert!(load.status.success(), "{}", stderr(&load));
}

pub fn disable(pid: &str, patch: &str) {
    let disable = cli(&["disable", pid, patch, "--timeout", TRANSITION_TIMEOUT]);
    assert!(disable.status.success(), "{}", stderr(&disable));
}

pub fn unload(pid: &str, patch: &str) {
    let unload = cli(&["unload", pid, patch]);
    assert!(unload.status.success(), "{}", stderr(&unload));
}

/// The patches of a status that are no longer enabled and whose libraries may be unloaded.
pub fn unloadable_names(status: &Value) -> Vec<&str> {
    status["unloadable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["patch"].as_str().unwrap())
        .collect()
}
