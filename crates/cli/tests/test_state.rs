//! The scenarios of the kernel's test-state.sh on a real program: a system state set up,
//! enabled, disabled and released by its patch, taken over by a newer version, and refused to an
//! older one. Each test compares the agent's log with the lines the kernel prints for the same
//! scenario.
//! See: tools/testing/selftests/livepatch/test-state.sh (reference/kernel-livepatch.md §8.4; the
//! simulator's port is crates/sim/tests/test_state.rs).

mod support;

use support::selftest::{disable, dmesg, example_program, load, unload, unloadable_names};
use support::{Target, cli, examples, patch_names, status_json, stderr};

// System states: examples/patches/livepatch-state.c (versions 1 and 2) on
// examples/programs/state-host.c, the kernel's test_klp_state modules.

const STATE_V1: &str = "livepatch_state_v1";
const STATE_V2: &str = "livepatch_state_v2";

fn start_state_host() -> Target {
    let host = example_program("state-host", false);
    Target::start_with(&host, &["600000"], "state-host: console_loglevel 7")
}

fn console_loglevel(target: &mut Target) -> i32 {
    target.send("show");
    let line = target.expect("state-host: console_loglevel ");
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// `SP_new(X)` of the selftests: enabling a patch that makes the state change.
fn state_patching_new(patch: &str) -> Vec<String> {
    vec![
        format!("livepatch: enabling patch '{patch}'"),
        format!("livepatch: '{patch}': initializing patching transition"),
        format!("{patch}: setup: allocated room for the console_loglevel"),
        format!("livepatch: '{patch}': starting patching transition"),
        format!("livepatch: '{patch}': completing patching transition"),
        format!("{patch}: enable: console_loglevel raised to 15"),
        format!("livepatch: '{patch}': patching complete"),
    ]
}

/// `SU(X)` of the selftests without the `echo` line: disabling the last patch with the state.
fn state_unpatching(patch: &str) -> Vec<String> {
    vec![
        format!("livepatch: '{patch}': initializing unpatching transition"),
        format!("{patch}: disable: console_loglevel restored to 7"),
        format!("livepatch: '{patch}': starting unpatching transition"),
        format!("livepatch: '{patch}': completing unpatching transition"),
        format!("{patch}: release: freed the room"),
        format!("livepatch: '{patch}': unpatching complete"),
    ]
}

/// Kernel test "system state modification": setup runs before the transition, enable after it,
/// disable before the unpatching transition and release after it.
#[test]
fn a_system_state_is_set_up_enabled_disabled_and_released_in_order() {
    let mut target = start_state_host();
    let pid = target.pid();
    load(&pid, &examples().join("livepatch-state-v1.so"));
    assert_eq!(console_loglevel(&mut target), 15);
    disable(&pid, STATE_V1);
    assert_eq!(console_loglevel(&mut target), 7);
    unload(&pid, STATE_V1);

    assert_eq!(
        dmesg(&pid),
        [state_patching_new(STATE_V1), state_unpatching(STATE_V1)].concat()
    );
}

/// Kernel tests "taking over system state modification" and "incompatible cumulative
/// livepatches": version 2 replaces version 1 and takes the state over (no setup or enable,
/// `klp_get_prev_state` finds version 1's state); version 1 cannot then replace version 2 (a
/// downgrade), refused before "enabling patch"; disabling version 2 restores the state.
#[test]
fn a_newer_state_version_takes_the_state_over_and_an_older_one_is_refused() {
    let mut target = start_state_host();
    let pid = target.pid();
    let v1 = examples().join("livepatch-state-v1.so");
    load(&pid, &v1);
    load(&pid, &examples().join("livepatch-state-v2.so"));
    assert_eq!(console_loglevel(&mut target), 15);
    let status = status_json(&pid);
    assert_eq!(patch_names(&status), [STATE_V2]);
    assert_eq!(unloadable_names(&status), [STATE_V1]);
    unload(&pid, STATE_V1);

    let downgrade = cli(&["load", &pid, v1.to_str().unwrap()]);
    assert_eq!(downgrade.status.code(), Some(1), "{}", stderr(&downgrade));
    assert!(
        stderr(&downgrade).contains(STATE_V1),
        "{}",
        stderr(&downgrade)
    );
    assert_eq!(patch_names(&status_json(&pid)), [STATE_V2]);
    assert_eq!(console_loglevel(&mut target), 15);

    disable(&pid, STATE_V2);
    assert_eq!(console_loglevel(&mut target), 7);

    assert_eq!(
        dmesg(&pid),
        [
            state_patching_new(STATE_V1),
            vec![
                format!("livepatch: enabling patch '{STATE_V2}'"),
                format!("livepatch: '{STATE_V2}': initializing patching transition"),
                format!("{STATE_V2}: pre_patch: taking over the console_loglevel change"),
                format!("livepatch: '{STATE_V2}': starting patching transition"),
                format!("livepatch: '{STATE_V2}': completing patching transition"),
                format!("livepatch: '{STATE_V2}': patching complete"),
                format!(
                    "livepatch: Livepatch patch ({STATE_V1}) is not compatible with the \
                     already installed livepatches."
                ),
            ],
            state_unpatching(STATE_V2),
        ]
        .concat()
    );
}
