//! Port of tools/testing/selftests/livepatch/test-callbacks.sh, every test
//! but 14 (which lives in test_callbacks.rs).
//! See: reference/kernel-livepatch.md §8.2, tests 6 to 13, 15 and 16.

mod common;

use std::cell::Cell;
use std::rc::Rc;

use common::{cdp_vml, cdu_vml, coming, going, lines, one};
use livepatch_core::Errno;
use livepatch_sim::Sim;
use livepatch_sim::modules::*;

fn cd_line(what: &str) -> String {
    format!("{CD}: {what}")
}

fn mod_live(cb: &str) -> String {
    cd_line(&format!("{cb}: {MOD} -> [MODULE_STATE_LIVE] Normal state"))
}

fn busy_live(cb: &str) -> String {
    cd_line(&format!("{cb}: {BUSY} -> [MODULE_STATE_LIVE] Normal state"))
}

/// Enabling CD with one more live module `live` (a line maker for it).
fn cdp_with(live: fn(&str) -> String) -> Vec<String> {
    vec![
        format!("livepatch: enabling patch '{CD}'"),
        format!("livepatch: '{CD}': initializing patching transition"),
        cd_line("pre_patch_callback: vmlinux"),
        live("pre_patch_callback"),
        format!("livepatch: '{CD}': starting patching transition"),
        format!("livepatch: '{CD}': completing patching transition"),
        cd_line("post_patch_callback: vmlinux"),
        live("post_patch_callback"),
        format!("livepatch: '{CD}': patching complete"),
    ]
}

/// Disabling CD with one more live module `live`.
fn cdu_with(live: fn(&str) -> String) -> Vec<String> {
    vec![
        format!("% echo 0 > /sys/kernel/livepatch/{CD}/enabled"),
        format!("livepatch: '{CD}': initializing unpatching transition"),
        cd_line("pre_unpatch_callback: vmlinux"),
        live("pre_unpatch_callback"),
        format!("livepatch: '{CD}': starting unpatching transition"),
        format!("livepatch: '{CD}': completing unpatching transition"),
        cd_line("post_unpatch_callback: vmlinux"),
        live("post_unpatch_callback"),
        format!("livepatch: '{CD}': unpatching complete"),
    ]
}

fn mod_init() -> Vec<String> {
    one(&format!("{MOD}: {MOD}_init"))
}

fn mod_exit() -> Vec<String> {
    one(&format!("{MOD}: {MOD}_exit"))
}

fn demo(sim: &mut Sim, k: &Kernel) -> (livepatch_core::PatchDesc, Rc<Cell<i32>>) {
    let ret = Rc::new(Cell::new(0));
    (callbacks_demo(k, &mut sim.world, ret.clone()), ret)
}

/// Test 6, "target module before livepatch".
#[test]
fn target_module_before_livepatch() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let (cd, _) = demo(&mut sim, &k);

    sim.load_mod(callbacks_mod(), "");
    sim.load_lp(&cd, "");
    sim.disable_lp(CD);
    sim.unload_lp(CD);
    sim.unload_mod(MOD);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(MOD, "")),
            mod_init(),
            one(&insmod(CD, "")),
            cdp_with(mod_live),
            cdu_with(mod_live),
            one(&rmmod(CD)),
            one(&rmmod(MOD)),
            mod_exit(),
        ]),
    );
}

/// Test 7, "module_coming notifier".
#[test]
fn module_coming_notifier() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let (cd, _) = demo(&mut sim, &k);

    sim.load_lp(&cd, "");
    sim.load_mod(callbacks_mod(), "");
    sim.disable_lp(CD);
    sim.unload_lp(CD);
    sim.unload_mod(MOD);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(CD, "")),
            cdp_vml(CD),
            coming(),
            cdu_with(mod_live),
            one(&rmmod(CD)),
            one(&rmmod(MOD)),
            mod_exit(),
        ]),
    );
}

/// Test 8, "module_going notifier".
#[test]
fn module_going_notifier() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let (cd, _) = demo(&mut sim, &k);

    sim.load_mod(callbacks_mod(), "");
    sim.load_lp(&cd, "");
    sim.unload_mod(MOD);
    sim.disable_lp(CD);
    sim.unload_lp(CD);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(MOD, "")),
            mod_init(),
            one(&insmod(CD, "")),
            cdp_with(mod_live),
            going(),
            cdu_vml(CD),
            one(&rmmod(CD)),
        ]),
    );
}

/// Test 9, "module_coming and module_going notifiers".
#[test]
fn module_coming_and_going_notifiers() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let (cd, _) = demo(&mut sim, &k);

    sim.load_lp(&cd, "");
    sim.load_mod(callbacks_mod(), "");
    sim.unload_mod(MOD);
    sim.disable_lp(CD);
    sim.unload_lp(CD);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(CD, "")),
            cdp_vml(CD),
            coming(),
            going(),
            cdu_vml(CD),
            one(&rmmod(CD)),
        ]),
    );
}

/// Test 10, "target module not present".
#[test]
fn target_module_not_present() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let (cd, _) = demo(&mut sim, &k);

    sim.load_lp(&cd, "");
    assert_eq!(
        sim.sysfs_read(&format!("{CD}/{MOD}/patched")),
        Ok("0\n".to_string())
    );
    sim.disable_lp(CD);
    sim.unload_lp(CD);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(CD, "")),
            cdp_vml(CD),
            cdu_vml(CD),
            one(&rmmod(CD)),
        ]),
    );
}

/// Test 11, "pre-patch callback -ENODEV": vmlinux's pre_patch fails, the
/// enable is canceled without a "starting" line and without any
/// post_unpatch callback.
#[test]
fn pre_patch_callback_enodev() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let (cd, ret) = demo(&mut sim, &k);

    sim.load_mod(callbacks_mod(), "");
    ret.set(-19);
    assert_eq!(sim.load_failing_lp(&cd, "pre_patch_ret=-19"), Errno::ENODEV);
    assert!(!sim.core.has_patch(CD));
    assert!(sim.world.sites().is_empty());
    sim.unload_mod(MOD);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(MOD, "")),
            mod_init(),
            one(&insmod(CD, "pre_patch_ret=-19")),
            vec![
                format!("livepatch: enabling patch '{CD}'"),
                format!("livepatch: '{CD}': initializing patching transition"),
                cd_line("pre_patch_callback: vmlinux"),
                "livepatch: pre-patch callback failed for object 'vmlinux'".to_string(),
                format!("livepatch: failed to enable patch '{CD}'"),
                format!("livepatch: '{CD}': canceling patching transition, going to unpatch"),
                format!("livepatch: '{CD}': completing unpatching transition"),
                format!("livepatch: '{CD}': unpatching complete"),
                format!(
                    "insmod: ERROR: could not insert module test_modules/{CD}.ko: No such device"
                ),
            ],
            one(&rmmod(MOD)),
            mod_exit(),
        ]),
    );
}

/// Test 12, "module_coming + pre-patch callback -ENODEV": the module is
/// refused and its init never runs; the patch stays enabled.
#[test]
fn module_coming_pre_patch_callback_enodev() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let (cd, ret) = demo(&mut sim, &k);

    sim.load_lp(&cd, "");
    sim.world.print(format!(
        "% echo -19 > /sys/module/{CD}/parameters/pre_patch_ret"
    ));
    ret.set(-19);
    assert_eq!(sim.insmod_target(callbacks_mod(), ""), Err(Errno::ENODEV));
    assert!(!sim.is_target_loaded(MOD));
    assert_eq!(
        sim.sysfs_read(&format!("{CD}/{MOD}/patched")),
        Ok("0\n".to_string())
    );
    sim.disable_lp(CD);
    sim.unload_lp(CD);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(CD, "")),
            cdp_vml(CD),
            one(&format!(
                "% echo -19 > /sys/module/{CD}/parameters/pre_patch_ret"
            )),
            one(&insmod(MOD, "")),
            vec![
                format!("livepatch: applying patch '{CD}' to loading module '{MOD}'"),
                cd_line(&format!(
                    "pre_patch_callback: {MOD} -> [MODULE_STATE_COMING] Full formed, running module_init"
                )),
                format!("livepatch: pre-patch callback failed for object '{MOD}'"),
                format!(
                    "livepatch: patch '{CD}' failed for module '{MOD}', refusing to load module '{MOD}'"
                ),
                format!(
                    "insmod: ERROR: could not insert module test_modules/{MOD}.ko: No such device"
                ),
            ],
            cdu_vml(CD),
            one(&rmmod(CD)),
        ]),
    );
}

/// Test 13, "multiple target modules": BUSY does not block, so the
/// transition completes at once; MOD comes and goes while CD is enabled.
#[test]
fn multiple_target_modules() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let (cd, _) = demo(&mut sim, &k);

    sim.load_mod(
        callbacks_busy(Rc::new(Cell::new(false))),
        "block_transition=N",
    );
    sim.load_lp(&cd, "");
    // The busy module's function is patched now.
    assert_eq!(
        k.run(&mut sim.world, k.reader, Some(BUSY), "busymod_work_func"),
        format!("{CD}: patched_work_func")
    );
    sim.load_mod(callbacks_mod(), "");
    sim.unload_mod(MOD);
    sim.disable_lp(CD);
    sim.unload_lp(CD);
    sim.unload_mod(BUSY);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(BUSY, "block_transition=N")),
            vec![
                format!("{BUSY}: {BUSY}_init"),
                format!("{BUSY}: busymod_work_func enter"),
                format!("{BUSY}: busymod_work_func exit"),
            ],
            one(&insmod(CD, "")),
            cdp_with(busy_live),
            coming(),
            going(),
            cdu_with(busy_live),
            one(&rmmod(CD)),
            one(&rmmod(BUSY)),
            one(&format!("{BUSY}: {BUSY}_exit")),
        ]),
    );
}

/// Test 15, "multiple livepatches" (callbacks): two non-replacing patches,
/// each runs its own callbacks.
#[test]
fn multiple_livepatches_callbacks() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let (cd, _) = demo(&mut sim, &k);
    let cd2 = callbacks_demo2(&mut sim.world, false);

    sim.load_lp(&cd, "");
    sim.load_lp(&cd2, "");
    assert_eq!(
        sim.core.patch_names(),
        vec![CD.to_string(), CD2.to_string()]
    );
    sim.disable_lp(CD2);
    sim.disable_lp(CD);
    sim.unload_lp(CD2);
    sim.unload_lp(CD);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(CD, "")),
            cdp_vml(CD),
            one(&insmod(CD2, "")),
            cdp_vml(CD2),
            cdu_vml(CD2),
            cdu_vml(CD),
            one(&rmmod(CD2)),
            one(&rmmod(CD)),
        ]),
    );
}

/// Test 16, "atomic replace" (callbacks): CD is replaced silently, none of
/// its callbacks run, and its library can be removed without output.
#[test]
fn atomic_replace_callbacks() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let (cd, _) = demo(&mut sim, &k);
    let cd2 = callbacks_demo2(&mut sim.world, true);

    sim.load_lp(&cd, "");
    sim.load_lp(&cd2, "replace=1");
    assert_eq!(sim.core.patch_names(), vec![CD2.to_string()]);
    assert_eq!(sim.world.released, vec![(CD.to_string(), false)]);
    sim.disable_lp(CD2);
    sim.unload_lp(CD2);
    sim.unload_lp(CD);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(CD, "")),
            cdp_vml(CD),
            one(&insmod(CD2, "replace=1")),
            cdp_vml(CD2),
            cdu_vml(CD2),
            one(&rmmod(CD2)),
            one(&rmmod(CD)),
        ]),
    );
}

/// A replacing patch without callbacks (AR `replace=1`) replaces CD: no
/// callback of CD runs, neither then nor when one of CD's target modules is
/// loaded and unloaded afterwards (CD is gone from the list).
#[test]
fn atomic_replace_without_callbacks() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let (cd, _) = demo(&mut sim, &k);
    let ar = atomic_replace(&k, &mut sim.world, true);

    sim.load_lp(&cd, "");
    sim.load_lp(&ar, "replace=1");
    // Only the objects AR declares remain: the dynamic ones (for CD's
    // modules) were discarded with the nops.
    let status = sim.core.patch_statuses();
    assert_eq!(status.len(), 1);
    let objects: Vec<&str> = status[0].objects.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(objects, vec!["vmlinux"]);
    sim.load_mod(callbacks_mod(), "");
    sim.unload_mod(MOD);
    sim.unload_lp(CD);
    sim.disable_lp(AR);
    sim.unload_lp(AR);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(CD, "")),
            cdp_vml(CD),
            one(&insmod(AR, "replace=1")),
            p_block(AR),
            one(&insmod(MOD, "")),
            mod_init(),
            one(&rmmod(MOD)),
            mod_exit(),
            one(&rmmod(CD)),
            u_block(AR),
            one(&rmmod(AR)),
        ]),
    );
}
