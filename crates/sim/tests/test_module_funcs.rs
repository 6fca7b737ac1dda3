//! Port of the "module function patching" tests of
//! tools/testing/selftests/livepatch/test-livepatch.sh (2026).
//! See: reference/kernel-livepatch.md §8.1, tests 4 and 5.

mod common;

use common::{lines, one};
use livepatch_sim::Sim;
use livepatch_sim::modules::*;

const SHOW: &str = "test_klp_mod_target_show";

fn target_output(k: &Kernel, sim: &mut Sim) -> String {
    k.run(&mut sim.world, k.reader, Some(MOD_TARGET), SHOW)
}

fn original() -> String {
    format!("{MOD_TARGET}: original output")
}

fn patched() -> String {
    format!("{MOD_PATCH}: this has been live patched")
}

/// Test 4, "module function patching": the target module is loaded first.
#[test]
fn module_function_patching() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let lp = mod_patch(&k, &mut sim.world);

    sim.load_mod(mod_target(&k), "");
    assert_eq!(target_output(&k, &mut sim), original());
    sim.load_lp(&lp, "");
    assert_eq!(target_output(&k, &mut sim), patched());
    assert_eq!(
        sim.sysfs_read(&format!("{MOD_PATCH}/{MOD_TARGET}/patched")),
        Ok("1\n".to_string())
    );
    sim.disable_lp(MOD_PATCH);
    sim.unload_lp(MOD_PATCH);
    assert_eq!(target_output(&k, &mut sim), original());
    sim.unload_mod(MOD_TARGET);
    assert!(sim.world.sites().is_empty());

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(MOD_TARGET, "")),
            one(&format!("{MOD_TARGET}: {MOD_TARGET}_init")),
            one(&insmod(MOD_PATCH, "")),
            p_block(MOD_PATCH),
            u_block(MOD_PATCH),
            one(&rmmod(MOD_PATCH)),
            one(&rmmod(MOD_TARGET)),
            one(&format!("{MOD_TARGET}: {MOD_TARGET}_exit")),
        ]),
    );
}

/// Test 5, "module function patching (livepatch first)": the patch is
/// applied to the target module while it loads, before its init runs.
#[test]
fn module_function_patching_livepatch_first() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let lp = mod_patch(&k, &mut sim.world);

    sim.load_lp(&lp, "");
    // The object is declared but not loaded: nothing redirected yet.
    assert!(sim.world.sites().is_empty());
    assert_eq!(
        sim.sysfs_read(&format!("{MOD_PATCH}/{MOD_TARGET}/patched")),
        Ok("0\n".to_string())
    );
    sim.load_mod(mod_target(&k), "");
    assert_eq!(target_output(&k, &mut sim), patched());
    assert_eq!(
        sim.sysfs_read(&format!("{MOD_PATCH}/{MOD_TARGET}/patched")),
        Ok("1\n".to_string())
    );
    sim.disable_lp(MOD_PATCH);
    sim.unload_lp(MOD_PATCH);
    assert_eq!(target_output(&k, &mut sim), original());
    sim.unload_mod(MOD_TARGET);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(MOD_PATCH, "")),
            p_block(MOD_PATCH),
            one(&insmod(MOD_TARGET, "")),
            one(&format!(
                "livepatch: applying patch '{MOD_PATCH}' to loading module '{MOD_TARGET}'"
            )),
            one(&format!("{MOD_TARGET}: {MOD_TARGET}_init")),
            u_block(MOD_PATCH),
            one(&rmmod(MOD_PATCH)),
            one(&rmmod(MOD_TARGET)),
            one(&format!("{MOD_TARGET}: {MOD_TARGET}_exit")),
        ]),
    );
}

/// The target module leaves while the patch stays enabled, then comes back:
/// the patch is reverted on the way out and applied again on the way in.
#[test]
fn module_function_patching_target_reloaded() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let lp = mod_patch(&k, &mut sim.world);

    sim.load_mod(mod_target(&k), "");
    sim.load_lp(&lp, "");
    sim.unload_mod(MOD_TARGET);
    assert!(sim.world.sites().is_empty());
    assert_eq!(
        sim.sysfs_read(&format!("{MOD_PATCH}/{MOD_TARGET}/patched")),
        Ok("0\n".to_string())
    );
    sim.load_mod(mod_target(&k), "");
    assert_eq!(target_output(&k, &mut sim), patched());
    sim.disable_lp(MOD_PATCH);
    sim.unload_lp(MOD_PATCH);
    sim.unload_mod(MOD_TARGET);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(MOD_TARGET, "")),
            one(&format!("{MOD_TARGET}: {MOD_TARGET}_init")),
            one(&insmod(MOD_PATCH, "")),
            p_block(MOD_PATCH),
            one(&rmmod(MOD_TARGET)),
            one(&format!("{MOD_TARGET}: {MOD_TARGET}_exit")),
            one(&format!(
                "livepatch: reverting patch '{MOD_PATCH}' on unloading module '{MOD_TARGET}'"
            )),
            one(&insmod(MOD_TARGET, "")),
            one(&format!(
                "livepatch: applying patch '{MOD_PATCH}' to loading module '{MOD_TARGET}'"
            )),
            one(&format!("{MOD_TARGET}: {MOD_TARGET}_init")),
            u_block(MOD_PATCH),
            one(&rmmod(MOD_PATCH)),
            one(&rmmod(MOD_TARGET)),
            one(&format!("{MOD_TARGET}: {MOD_TARGET}_exit")),
        ]),
    );
}
