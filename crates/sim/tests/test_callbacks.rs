//! Port of tools/testing/selftests/livepatch/test-callbacks.sh.
//! See: reference/kernel-livepatch.md §8.2.

use std::cell::Cell;
use std::rc::Rc;

use livepatch_sim::Sim;
use livepatch_sim::modules::*;

/// Test 14, "busy target module": the transition stalls on a worker asleep
/// in the patched function, objects come and go during it, and it is
/// reversed.
#[test]
fn busy_target_module() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let cd = callbacks_demo(&k, &mut sim.world, Rc::new(Cell::new(0)));
    let block = Rc::new(Cell::new(true));

    sim.load_mod(callbacks_busy(block.clone()), "block_transition=Y");
    sim.load_lp_nowait(&cd, "");
    assert_eq!(sim.sysfs_read(&format!("{CD}/transition")).unwrap(), "1\n");
    sim.load_mod(callbacks_mod(), "");
    sim.unload_mod(MOD);
    sim.disable_lp(CD);
    sim.unload_lp(CD);
    sim.unload_mod(BUSY);

    let want: Vec<String> = [
        insmod(BUSY, "block_transition=Y"),
        format!("{BUSY}: {BUSY}_init"),
        format!("{BUSY}: busymod_work_func enter"),
        insmod(CD, ""),
        format!("livepatch: enabling patch '{CD}'"),
        format!("livepatch: '{CD}': initializing patching transition"),
        format!("{CD}: pre_patch_callback: vmlinux"),
        format!("{CD}: pre_patch_callback: {BUSY} -> [MODULE_STATE_LIVE] Normal state"),
        format!("livepatch: '{CD}': starting patching transition"),
        insmod(MOD, ""),
        format!("livepatch: applying patch '{CD}' to loading module '{MOD}'"),
        format!("{CD}: pre_patch_callback: {MOD} -> [MODULE_STATE_COMING] Full formed, running module_init"),
        format!("{MOD}: {MOD}_init"),
        rmmod(MOD),
        format!("{MOD}: {MOD}_exit"),
        format!("livepatch: reverting patch '{CD}' on unloading module '{MOD}'"),
        format!("{CD}: post_unpatch_callback: {MOD} -> [MODULE_STATE_GOING] Going away"),
        format!("% echo 0 > /sys/kernel/livepatch/{CD}/enabled"),
        format!("livepatch: '{CD}': reversing transition from patching to unpatching"),
        format!("livepatch: '{CD}': starting unpatching transition"),
        format!("livepatch: '{CD}': completing unpatching transition"),
        format!("{CD}: post_unpatch_callback: vmlinux"),
        format!("{CD}: post_unpatch_callback: {BUSY} -> [MODULE_STATE_LIVE] Normal state"),
        format!("livepatch: '{CD}': unpatching complete"),
        rmmod(CD),
        rmmod(BUSY),
        format!("{BUSY}: busymod_work_func exit"),
        format!("{BUSY}: {BUSY}_exit"),
    ]
    .into();
    assert_transcript(&sim.transcript(), &want);
}
