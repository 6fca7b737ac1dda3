//! Port of tools/testing/selftests/livepatch/test-livepatch.sh.
//! See: reference/kernel-livepatch.md §8.1.

use livepatch_sim::Sim;
use livepatch_sim::modules::*;

fn lines(parts: &[Vec<String>]) -> Vec<String> {
    parts.concat()
}

fn one(s: &str) -> Vec<String> {
    vec![s.to_string()]
}

/// Test 1, "basic function patching".
#[test]
fn basic_function_patching() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let lp = livepatch(&k, &mut sim.world);

    sim.load_lp(&lp, "");
    assert_eq!(
        k.read(&mut sim.world, "cmdline_proc_show"),
        format!("{LP}: this has been live patched")
    );
    sim.disable_lp(LP);
    sim.unload_lp(LP);
    assert_eq!(
        k.read(&mut sim.world, "cmdline_proc_show"),
        CMDLINE_ORIGINAL
    );

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(LP, "")),
            p_block(LP),
            u_block(LP),
            one(&rmmod(LP)),
        ]),
    );
}

/// Test 2, "multiple livepatches".
#[test]
fn multiple_livepatches() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let lp = livepatch(&k, &mut sim.world);
    let ar = atomic_replace(&k, &mut sim.world, false);

    sim.load_lp(&lp, "");
    k.grep_live_patched(&mut sim.world);
    sim.load_lp(&ar, "replace=0");
    k.grep_live_patched(&mut sim.world);
    sim.disable_lp(AR);
    sim.unload_lp(AR);
    k.grep_live_patched(&mut sim.world);
    sim.disable_lp(LP);
    sim.unload_lp(LP);
    k.grep_live_patched(&mut sim.world);

    let lp_line = format!("{LP}: this has been live patched");
    let ar_line = format!("{AR}: this has been live patched");
    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(LP, "")),
            p_block(LP),
            one(&lp_line),
            one(&insmod(AR, "replace=0")),
            p_block(AR),
            one(&lp_line),
            one(&ar_line),
            u_block(AR),
            one(&rmmod(AR)),
            one(&lp_line),
            u_block(LP),
            one(&rmmod(LP)),
        ]),
    );
}

/// Test 3, "atomic replace livepatch" (v6.12 form).
#[test]
fn atomic_replace_livepatch() {
    use std::cell::Cell;
    use std::rc::Rc;
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let lp = livepatch(&k, &mut sim.world);
    let sc = syscall(&k, &mut sim.world);
    let cd = callbacks_demo(&k, &mut sim.world, Rc::new(Cell::new(0)));
    let ar = atomic_replace(&k, &mut sim.world, true);

    sim.load_lp(&lp, "");
    k.grep_live_patched(&mut sim.world);
    sim.load_lp(&sc, "");
    sim.load_lp(&cd, "");
    assert_eq!(sim.core.patch_names().len(), 3);
    sim.load_lp(&ar, "replace=1");
    k.grep_live_patched(&mut sim.world);
    assert_eq!(sim.core.patch_names(), vec![AR.to_string()]);
    sim.unload_lp(CD);
    sim.unload_lp(SC);
    sim.unload_lp(LP);
    k.grep_live_patched(&mut sim.world);
    sim.disable_lp(AR);
    sim.unload_lp(AR);
    k.grep_live_patched(&mut sim.world);
    assert!(sim.world.sites().is_empty());

    let ar_line = format!("{AR}: this has been live patched");
    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(LP, "")),
            p_block(LP),
            one(&format!("{LP}: this has been live patched")),
            one(&insmod(SC, "")),
            p_block(SC),
            one(&insmod(CD, "")),
            vec![
                format!("livepatch: enabling patch '{CD}'"),
                format!("livepatch: '{CD}': initializing patching transition"),
                format!("{CD}: pre_patch_callback: vmlinux"),
                format!("livepatch: '{CD}': starting patching transition"),
                format!("livepatch: '{CD}': completing patching transition"),
                format!("{CD}: post_patch_callback: vmlinux"),
                format!("livepatch: '{CD}': patching complete"),
            ],
            one(&insmod(AR, "replace=1")),
            p_block(AR),
            one(&ar_line),
            one(&rmmod(CD)),
            one(&rmmod(SC)),
            one(&rmmod(LP)),
            one(&ar_line),
            u_block(AR),
            one(&rmmod(AR)),
        ]),
    );
}
