//! Scenarios of the seed documents that no kernel selftest covers:
//! disabling a patch in the middle of a func stack, threads created during
//! a transition, and which patches a force marks as forced.
//! See: seeds/000_1eea65d10ed1c246.txt (no stacking order),
//! seeds/003_050914891b5914c9.txt (fork race, forced-flag scoping), and
//! reference/kernel-livepatch.md §2, §3.7, §4.4, §4.8.

mod common;

use std::time::Duration;

use common::{ins_p, lines, one, patched_text, text_patch};
use livepatch_core::{Errno, PatchState, ThreadState, Tid};
use livepatch_sim::Sim;
use livepatch_sim::modules::*;

const P1: &str = "test_klp_stack_1";
const P2: &str = "test_klp_stack_2";
const P3: &str = "test_klp_stack_3";

fn cmdline(k: &Kernel, sim: &mut Sim, tid: Tid) -> String {
    k.run(&mut sim.world, tid, None, "cmdline_proc_show")
}

/// A thread that enters `cmdline_proc_show` now and stays inside.
fn sleep_in_cmdline(sim: &mut Sim, name: &str) -> Tid {
    let tid = sim.world.spawn(name);
    let f = sim.world.func_addr(None, "cmdline_proc_show", 0);
    sim.world.call(tid, f);
    tid
}

fn stack_of_cmdline(sim: &Sim) -> Vec<String> {
    let addr = sim.world.func_addr(None, "cmdline_proc_show", 0);
    sim.core
        .func_stacks()
        .into_iter()
        .find(|(a, _)| *a == addr)
        .map(|(_, entries)| entries.into_iter().map(|e| e.patch).collect())
        .unwrap_or_default()
}

/// Seed 000: any enabled patch may be disabled when no transition runs, the
/// middle one of three on the same function included. While it unpatches,
/// every thread keeps running the top of the stack; the thread still in its
/// code blocks the transition until it leaves.
#[test]
fn disable_patch_in_the_middle_of_the_stack() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let p1 = text_patch(
        &k,
        &mut sim.world,
        P1,
        "cmdline_proc_show",
        &patched_text(P1),
        false,
    );
    let p2 = text_patch(
        &k,
        &mut sim.world,
        P2,
        "cmdline_proc_show",
        &patched_text(P2),
        false,
    );
    let p3 = text_patch(
        &k,
        &mut sim.world,
        P3,
        "cmdline_proc_show",
        &patched_text(P3),
        false,
    );

    sim.load_lp(&p1, "");
    sim.load_lp(&p2, "");
    // A thread enters P2's code, which P3 then supersedes; force P3 through.
    let sleeper = sleep_in_cmdline(&mut sim, "sleeper");
    sim.load_lp_nowait(&p3, "");
    assert!(!sim.settle_within(Duration::from_secs(5)));
    sim.force(P3).unwrap();
    assert!(sim.settle());
    assert_eq!(stack_of_cmdline(&sim), vec![P1, P2, P3]);
    assert_eq!(cmdline(&k, &mut sim, k.reader), patched_text(P3));

    // Disable the middle patch.
    sim.sysfs_write(&format!("{P2}/enabled"), "0").unwrap();
    assert_eq!(sim.core.transition(), Some((P2, PatchState::Unpatched)));
    assert!(!sim.settle_within(Duration::from_secs(5)));
    // Threads in either state run P3, the top, which is not in transition.
    let fresh = sim.world.spawn("fresh");
    assert_eq!(
        sim.world.thread(fresh).unwrap().state.state,
        PatchState::Unpatched
    );
    assert_eq!(
        sim.world.thread(k.reader).unwrap().state.state,
        PatchState::Unpatched
    );
    assert_eq!(
        sim.world.thread(sleeper).unwrap().state.state,
        PatchState::Patched
    );
    assert_eq!(cmdline(&k, &mut sim, fresh), patched_text(P3));
    assert_eq!(cmdline(&k, &mut sim, sleeper), patched_text(P3));
    sim.world.ret(sleeper);
    assert!(sim.settle());
    assert_eq!(stack_of_cmdline(&sim), vec![P1, P3]);
    assert_eq!(cmdline(&k, &mut sim, k.reader), patched_text(P3));
    sim.unload_lp(P2);

    // Then the top: P1 shows through.
    sim.disable_lp(P3);
    sim.unload_lp(P3);
    assert_eq!(cmdline(&k, &mut sim, k.reader), patched_text(P1));
    sim.disable_lp(P1);
    sim.unload_lp(P1);
    assert_eq!(cmdline(&k, &mut sim, k.reader), CMDLINE_ORIGINAL);
    assert!(sim.world.sites().is_empty());

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            ins_p(P1, ""),
            ins_p(P2, ""),
            one(&insmod(P3, "")),
            vec![
                format!("livepatch: enabling patch '{P3}'"),
                format!("livepatch: '{P3}': initializing patching transition"),
                format!("livepatch: '{P3}': starting patching transition"),
                format!("% echo 1 > /sys/kernel/livepatch/{P3}/force"),
                "livepatch: forcing remaining tasks to the patched state".into(),
                format!("livepatch: '{P3}': completing patching transition"),
                format!("livepatch: '{P3}': patching complete"),
            ],
            u_block(P2),
            one(&rmmod(P2)),
            u_block(P3),
            one(&rmmod(P3)),
            u_block(P1),
            one(&rmmod(P1)),
        ]),
    );
}

/// Seed 000: disabling the bottom patch of a stack while others stay leaves
/// the top one in charge, without a transition of the others.
#[test]
fn disable_bottom_patch_keeps_the_top() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let p1 = text_patch(
        &k,
        &mut sim.world,
        P1,
        "cmdline_proc_show",
        &patched_text(P1),
        false,
    );
    let p2 = text_patch(
        &k,
        &mut sim.world,
        P2,
        "cmdline_proc_show",
        &patched_text(P2),
        false,
    );

    sim.load_lp(&p1, "");
    sim.load_lp(&p2, "");
    sim.disable_lp(P1);
    assert_eq!(stack_of_cmdline(&sim), vec![P2]);
    assert_eq!(cmdline(&k, &mut sim, k.reader), patched_text(P2));
    assert_eq!(
        sim.sysfs_read(&format!("{P2}/stack_order")),
        Ok("1\n".to_string())
    );
    sim.disable_lp(P2);
    assert_eq!(cmdline(&k, &mut sim, k.reader), CMDLINE_ORIGINAL);

    assert_transcript(
        &sim.transcript(),
        &lines(&[ins_p(P1, ""), ins_p(P2, ""), u_block(P1), u_block(P2)]),
    );
}

fn state_of(sim: &Sim, tid: Tid) -> ThreadState {
    sim.world.thread(tid).unwrap().state
}

fn at(state: PatchState) -> ThreadState {
    ThreadState {
        state,
        pending: false,
    }
}

/// Seed 003 (fork race): a thread created during a patching transition,
/// and during its reversal, starts at the target state and is not pending;
/// it runs the code of that state at once. Threads that existed keep their
/// state.
#[test]
fn thread_created_during_transition_and_reversal_gets_target_state() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let lp = livepatch(&k, &mut sim.world);

    // A thread asleep in the original blocks the patching transition.
    let sleeper = sleep_in_cmdline(&mut sim, "sleeper");
    sim.load_lp_nowait(&lp, "");
    assert!(!sim.settle_within(Duration::from_secs(5)));
    let born_patching = sim.world.spawn("born_patching");
    assert_eq!(state_of(&sim, born_patching), at(PatchState::Patched));
    assert_eq!(
        cmdline(&k, &mut sim, born_patching),
        format!("{LP}: this has been live patched")
    );
    assert_eq!(
        state_of(&sim, sleeper),
        ThreadState {
            state: PatchState::Unpatched,
            pending: true
        }
    );
    assert_eq!(cmdline(&k, &mut sim, sleeper), CMDLINE_ORIGINAL);

    // Reverse: the target is UNPATCHED now.
    sim.sysfs_write(&format!("{LP}/enabled"), "0").unwrap();
    let born_reversed = sim.world.spawn("born_reversed");
    assert_eq!(state_of(&sim, born_reversed), at(PatchState::Unpatched));
    assert_eq!(cmdline(&k, &mut sim, born_reversed), CMDLINE_ORIGINAL);
    assert_eq!(
        state_of(&sim, born_patching),
        ThreadState {
            state: PatchState::Patched,
            pending: true
        }
    );
    assert_eq!(state_of(&sim, sleeper), at(PatchState::Unpatched));
    assert!(sim.settle());
    assert!(!sim.core.has_patch(LP));
    // No transition: new threads are IDLE.
    let born_after = sim.world.spawn("born_after");
    assert_eq!(state_of(&sim, born_after), ThreadState::IDLE);
    sim.world.ret(sleeper);
    sim.unload_lp(LP);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(LP, "")),
            vec![
                format!("livepatch: enabling patch '{LP}'"),
                format!("livepatch: '{LP}': initializing patching transition"),
                format!("livepatch: '{LP}': starting patching transition"),
                format!("% echo 0 > /sys/kernel/livepatch/{LP}/enabled"),
                format!("livepatch: '{LP}': reversing transition from patching to unpatching"),
                format!("livepatch: '{LP}': starting unpatching transition"),
                format!("livepatch: '{LP}': completing unpatching transition"),
                format!("livepatch: '{LP}': unpatching complete"),
            ],
            one(&rmmod(LP)),
        ]),
    );
}

/// Seed 003 (fork race): the same for an unpatching transition and its
/// reversal back to patching.
#[test]
fn thread_created_during_unpatching_and_its_reversal_gets_target_state() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let lp = livepatch(&k, &mut sim.world);

    sim.load_lp(&lp, "");
    // A thread asleep in the new code blocks the unpatching transition.
    let sleeper = sleep_in_cmdline(&mut sim, "sleeper");
    sim.sysfs_write(&format!("{LP}/enabled"), "0").unwrap();
    assert!(!sim.settle_within(Duration::from_secs(5)));
    let born_unpatching = sim.world.spawn("born_unpatching");
    assert_eq!(state_of(&sim, born_unpatching), at(PatchState::Unpatched));
    assert_eq!(cmdline(&k, &mut sim, born_unpatching), CMDLINE_ORIGINAL);

    sim.sysfs_write(&format!("{LP}/enabled"), "1").unwrap();
    let born_repatching = sim.world.spawn("born_repatching");
    assert_eq!(state_of(&sim, born_repatching), at(PatchState::Patched));
    assert_eq!(
        cmdline(&k, &mut sim, born_repatching),
        format!("{LP}: this has been live patched")
    );
    assert!(sim.settle());
    assert_eq!(sim.core.patch_names(), vec![LP.to_string()]);
    sim.world.ret(sleeper);
    sim.disable_lp(LP);
}

/// Seed 003 (forced-flag scoping): forcing an unpatching transition marks
/// only the patch being removed; its library can never be removed, while
/// another enabled patch is unaffected.
#[test]
fn forced_unpatching_marks_only_the_transition_patch() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let lp = livepatch(&k, &mut sim.world);
    let ar = atomic_replace(&k, &mut sim.world, false);

    sim.load_lp(&lp, "");
    sim.load_lp(&ar, "replace=0");
    let sleeper = sleep_in_cmdline(&mut sim, "sleeper");
    sim.sysfs_write(&format!("{LP}/enabled"), "0").unwrap();
    assert!(!sim.settle_within(Duration::from_secs(5)));
    sim.force(LP).unwrap();
    let forced: Vec<(String, bool)> = sim
        .core
        .patch_statuses()
        .into_iter()
        .map(|p| (p.name, p.forced))
        .collect();
    assert_eq!(
        forced,
        vec![(LP.to_string(), true), (AR.to_string(), false)]
    );
    assert!(sim.settle());
    assert_eq!(sim.world.released, vec![(LP.to_string(), true)]);
    assert_eq!(sim.rmmod_patch(LP), Err(Errno::EBUSY));
    sim.world.ret(sleeper);
    sim.disable_lp(AR);
    sim.unload_lp(AR);
    // Still pinned.
    assert_eq!(sim.rmmod_patch(LP), Err(Errno::EBUSY));

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            ins_p(LP, ""),
            ins_p(AR, "replace=0"),
            vec![
                format!("% echo 0 > /sys/kernel/livepatch/{LP}/enabled"),
                format!("livepatch: '{LP}': initializing unpatching transition"),
                format!("livepatch: '{LP}': starting unpatching transition"),
                format!("% echo 1 > /sys/kernel/livepatch/{LP}/force"),
                "livepatch: forcing remaining tasks to the patched state".into(),
                format!("livepatch: '{LP}': completing unpatching transition"),
                format!("livepatch: '{LP}': unpatching complete"),
            ],
            u_block(AR),
            one(&rmmod(AR)),
        ]),
    );
}

/// Seed 003 (forced-flag scoping): forcing a non-replacing patching
/// transition marks no patch: both libraries can be removed later.
#[test]
fn forced_patching_without_replace_marks_nothing() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let lp = livepatch(&k, &mut sim.world);
    let ar = atomic_replace(&k, &mut sim.world, false);

    sim.load_lp(&lp, "");
    let sleeper = sim.world.spawn("sleeper");
    let f = sim.world.func_addr(None, "meminfo_proc_show", 0);
    sim.world.call(sleeper, f);
    sim.load_lp_nowait(&ar, "replace=0");
    assert!(!sim.settle_within(Duration::from_secs(5)));
    sim.force(AR).unwrap();
    assert!(sim.settle());
    assert!(sim.core.patch_statuses().iter().all(|p| !p.forced));
    sim.world.ret(sleeper);
    sim.disable_lp(AR);
    sim.disable_lp(LP);
    assert_eq!(
        sim.world.released,
        vec![(AR.to_string(), false), (LP.to_string(), false)]
    );
    sim.unload_lp(AR);
    sim.unload_lp(LP);
}

/// Seed 003 (forced-flag scoping): forcing a replacing patch marks the
/// patches it replaces (their code may still run), not itself: the
/// replaced libraries stay pinned, the replacing one can go.
#[test]
fn forced_replace_marks_the_replaced_patches() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let lp = livepatch(&k, &mut sim.world);
    let sc = syscall(&k, &mut sim.world);
    let ar = atomic_replace(&k, &mut sim.world, true);

    sim.load_lp(&lp, "");
    sim.load_lp(&sc, "");
    // A thread in LP's code blocks AR's nop for cmdline_proc_show.
    let sleeper = sleep_in_cmdline(&mut sim, "sleeper");
    sim.load_lp_nowait(&ar, "replace=1");
    assert!(!sim.settle_within(Duration::from_secs(5)));
    sim.force(AR).unwrap();
    let forced: Vec<(String, bool)> = sim
        .core
        .patch_statuses()
        .into_iter()
        .map(|p| (p.name, p.forced))
        .collect();
    assert_eq!(
        forced,
        vec![
            (LP.to_string(), true),
            (SC.to_string(), true),
            (AR.to_string(), false)
        ]
    );
    assert!(sim.settle());
    assert_eq!(sim.core.patch_names(), vec![AR.to_string()]);
    assert_eq!(
        sim.world.released,
        vec![(LP.to_string(), true), (SC.to_string(), true)]
    );
    assert_eq!(sim.rmmod_patch(LP), Err(Errno::EBUSY));
    assert_eq!(sim.rmmod_patch(SC), Err(Errno::EBUSY));
    assert_eq!(cmdline(&k, &mut sim, k.reader), CMDLINE_ORIGINAL);
    sim.world.ret(sleeper);
    sim.disable_lp(AR);
    sim.unload_lp(AR);
    assert_eq!(sim.rmmod_patch(LP), Err(Errno::EBUSY));

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            ins_p(LP, ""),
            ins_p(SC, ""),
            one(&insmod(AR, "replace=1")),
            vec![
                format!("livepatch: enabling patch '{AR}'"),
                format!("livepatch: '{AR}': initializing patching transition"),
                format!("livepatch: '{AR}': starting patching transition"),
                format!("% echo 1 > /sys/kernel/livepatch/{AR}/force"),
                "livepatch: forcing remaining tasks to the patched state".into(),
                format!("livepatch: '{AR}': completing patching transition"),
                format!("livepatch: '{AR}': patching complete"),
            ],
            u_block(AR),
            one(&rmmod(AR)),
        ]),
    );
}

/// Seed 003: a patch loaded after a forced transition is not pinned by it
/// (the flag is per patch, not global).
#[test]
fn patch_loaded_after_a_force_is_not_pinned() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let lp = livepatch(&k, &mut sim.world);
    let ar = atomic_replace(&k, &mut sim.world, false);

    sim.load_lp(&lp, "");
    let sleeper = sleep_in_cmdline(&mut sim, "sleeper");
    sim.sysfs_write(&format!("{LP}/enabled"), "0").unwrap();
    sim.force(LP).unwrap();
    assert!(sim.settle());
    sim.world.ret(sleeper);
    sim.load_lp(&ar, "replace=0");
    sim.disable_lp(AR);
    assert_eq!(sim.rmmod_patch(AR), Ok(()));
    assert_eq!(sim.rmmod_patch(LP), Err(Errno::EBUSY));
}
