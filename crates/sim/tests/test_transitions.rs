//! Scenarios implied by the kernel code that no upstream selftest covers:
//! force, reversal of an unpatching transition, enabling during another
//! transition, the fake signals, and `old_sympos`.
//! See: reference/kernel-livepatch.md §8.9, §3.3, §3.7 and §4.1.

mod common;

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use common::{cdu_vml, ins_p, lines, one};
use livepatch_core::{Errno, FuncDesc, ObjectDesc, PatchDesc, PatchState, Target};
use livepatch_sim::modules::*;
use livepatch_sim::{Sim, TargetModule};

fn lp_output() -> String {
    format!("{LP}: this has been live patched")
}

/// Enabling CD with BUSY loaded and blocking, up to "starting".
fn cd_starting_with_busy() -> Vec<String> {
    vec![
        format!("livepatch: enabling patch '{CD}'"),
        format!("livepatch: '{CD}': initializing patching transition"),
        format!("{CD}: pre_patch_callback: vmlinux"),
        format!("{CD}: pre_patch_callback: {BUSY} -> [MODULE_STATE_LIVE] Normal state"),
        format!("livepatch: '{CD}': starting patching transition"),
    ]
}

fn busy_blocking() -> Vec<String> {
    vec![
        insmod(BUSY, "block_transition=Y"),
        format!("{BUSY}: {BUSY}_init"),
        format!("{BUSY}: busymod_work_func enter"),
    ]
}

/// §8.9 "Write force during a stalled transition": the warning appears and
/// the patch completes on the next attempt; the kworker still sleeps in the
/// old function. A forced non-replacing patching transition forces no
/// patch, so every library can still be removed.
#[test]
fn force_during_stalled_transition() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let cd = callbacks_demo(&k, &mut sim.world, Rc::new(Cell::new(0)));

    sim.load_mod(
        callbacks_busy(Rc::new(Cell::new(true))),
        "block_transition=Y",
    );
    sim.load_lp_nowait(&cd, "");
    assert!(!sim.settle_within(Duration::from_secs(10)));
    sim.force(CD).unwrap();
    // Not completed by the write itself.
    assert_eq!(sim.core.transition().map(|t| t.0), Some(CD));
    assert!(sim.work_once());
    assert!(sim.core.transition().is_none());
    assert!(sim.core.patch_statuses().iter().all(|p| !p.forced));
    // New calls run the new code.
    assert_eq!(
        k.run(&mut sim.world, k.reader, Some(BUSY), "busymod_work_func"),
        format!("{CD}: patched_work_func")
    );
    sim.disable_lp(CD);
    assert_eq!(sim.world.released, vec![(CD.to_string(), false)]);
    sim.unload_lp(CD);
    sim.unload_mod(BUSY);

    let busy_live = |cb: &str| format!("{CD}: {cb}: {BUSY} -> [MODULE_STATE_LIVE] Normal state");
    assert_transcript(
        &sim.transcript(),
        &lines(&[
            busy_blocking(),
            one(&insmod(CD, "")),
            cd_starting_with_busy(),
            vec![
                format!("% echo 1 > /sys/kernel/livepatch/{CD}/force"),
                "livepatch: forcing remaining tasks to the patched state".into(),
                format!("livepatch: '{CD}': completing patching transition"),
                format!("{CD}: post_patch_callback: vmlinux"),
                busy_live("post_patch_callback"),
                format!("livepatch: '{CD}': patching complete"),
            ],
            vec![
                format!("% echo 0 > /sys/kernel/livepatch/{CD}/enabled"),
                format!("livepatch: '{CD}': initializing unpatching transition"),
                format!("{CD}: pre_unpatch_callback: vmlinux"),
                busy_live("pre_unpatch_callback"),
                format!("livepatch: '{CD}': starting unpatching transition"),
                format!("livepatch: '{CD}': completing unpatching transition"),
                format!("{CD}: post_unpatch_callback: vmlinux"),
                busy_live("post_unpatch_callback"),
                format!("livepatch: '{CD}': unpatching complete"),
            ],
            one(&rmmod(CD)),
            one(&rmmod(BUSY)),
            one(&format!("{BUSY}: busymod_work_func exit")),
            one(&format!("{BUSY}: {BUSY}_exit")),
        ]),
    );
}

/// §8.9 "Reverse an unpatching transition back to patching": writing 1 to
/// `enabled` while the patch unpatches. No completion is attempted by the
/// write; the next periodic attempt completes it, without callbacks.
#[test]
fn reverse_unpatching_transition_to_patching() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let lp = livepatch(&k, &mut sim.world);

    sim.load_lp(&lp, "");
    let sleeper = sim.world.spawn("sleeper");
    let f = sim.world.func_addr(None, "cmdline_proc_show", 0);
    sim.world.call(sleeper, f);
    sim.sysfs_write(&format!("{LP}/enabled"), "0").unwrap();
    assert!(!sim.settle_within(Duration::from_secs(5)));
    assert_eq!(
        sim.sysfs_read(&format!("{LP}/enabled")),
        Ok("0\n".to_string())
    );
    sim.sysfs_write(&format!("{LP}/enabled"), "1").unwrap();
    // Nothing blocks the patching direction, but the write does not try.
    assert_eq!(sim.core.transition(), Some((LP, PatchState::Patched)));
    assert_eq!(
        sim.sysfs_read(&format!("{LP}/enabled")),
        Ok("1\n".to_string())
    );
    assert!(sim.work_once());
    assert_eq!(k.read(&mut sim.world, "cmdline_proc_show"), lp_output());
    sim.world.ret(sleeper);
    sim.disable_lp(LP);
    sim.unload_lp(LP);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            ins_p(LP, ""),
            vec![
                format!("% echo 0 > /sys/kernel/livepatch/{LP}/enabled"),
                format!("livepatch: '{LP}': initializing unpatching transition"),
                format!("livepatch: '{LP}': starting unpatching transition"),
                format!("% echo 1 > /sys/kernel/livepatch/{LP}/enabled"),
                format!("livepatch: '{LP}': reversing transition from unpatching to patching"),
                format!("livepatch: '{LP}': starting patching transition"),
                format!("livepatch: '{LP}': completing patching transition"),
                format!("livepatch: '{LP}': patching complete"),
            ],
            u_block(LP),
            one(&rmmod(LP)),
        ]),
    );
}

/// §8.9 "Enable (insmod) while another patch is in transition": `EBUSY`
/// before "enabling patch"; the other transition goes on untouched.
#[test]
fn enable_while_another_patch_in_transition() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let cd = callbacks_demo(&k, &mut sim.world, Rc::new(Cell::new(0)));
    let lp = livepatch(&k, &mut sim.world);

    sim.load_mod(
        callbacks_busy(Rc::new(Cell::new(true))),
        "block_transition=Y",
    );
    sim.load_lp_nowait(&cd, "");
    assert_eq!(sim.load_failing_lp(&lp, ""), Errno::EBUSY);
    assert!(!sim.core.has_patch(LP));
    assert_eq!(sim.core.transition().map(|t| t.0), Some(CD));
    assert_eq!(
        k.read(&mut sim.world, "cmdline_proc_show"),
        CMDLINE_ORIGINAL
    );
    // Reverse CD, then LP loads.
    sim.disable_lp(CD);
    sim.unload_lp(CD);
    sim.load_lp(&lp, "");
    sim.disable_lp(LP);
    sim.unload_lp(LP);
    sim.unload_mod(BUSY);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            busy_blocking(),
            one(&insmod(CD, "")),
            cd_starting_with_busy(),
            one(&insmod(LP, "")),
            one(&format!(
                "insmod: ERROR: could not insert module test_modules/{LP}.ko: Device or resource busy"
            )),
            vec![
                format!("% echo 0 > /sys/kernel/livepatch/{CD}/enabled"),
                format!("livepatch: '{CD}': reversing transition from patching to unpatching"),
                format!("livepatch: '{CD}': starting unpatching transition"),
                format!("livepatch: '{CD}': completing unpatching transition"),
                format!("{CD}: post_unpatch_callback: vmlinux"),
                format!("{CD}: post_unpatch_callback: {BUSY} -> [MODULE_STATE_LIVE] Normal state"),
                format!("livepatch: '{CD}': unpatching complete"),
            ],
            one(&rmmod(CD)),
            ins_p(LP, ""),
            u_block(LP),
            one(&rmmod(LP)),
            one(&rmmod(BUSY)),
            one(&format!("{BUSY}: busymod_work_func exit")),
            one(&format!("{BUSY}: {BUSY}_exit")),
        ]),
    );
}

/// §8.9 "Fake signals after 15 s": a blocked thread that a signal cannot
/// move is signalled every 15 s, and "signaling remaining tasks" is logged
/// once.
#[test]
fn fake_signals_logged_once() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let cd = callbacks_demo(&k, &mut sim.world, Rc::new(Cell::new(0)));

    sim.load_mod(
        callbacks_busy(Rc::new(Cell::new(true))),
        "block_transition=Y",
    );
    let kworker = sim
        .world
        .all_threads()
        .find(|t| t.name == "kworker/0:1")
        .map(|t| t.tid)
        .unwrap();
    sim.load_lp_nowait(&cd, "");
    assert!(!sim.settle_within(Duration::from_millis(14_900)));
    assert!(sim.world.signals.is_empty());
    assert!(!sim.settle_within(Duration::from_secs(40)));
    assert_eq!(
        sim.world.signals,
        vec![vec![kworker], vec![kworker], vec![kworker]]
    );
    let t = sim.transcript();
    let signaled = t
        .iter()
        .filter(|l| *l == "livepatch: signaling remaining tasks")
        .count();
    assert_eq!(signaled, 1);
    assert_eq!(
        t.last().map(String::as_str),
        Some("livepatch: signaling remaining tasks")
    );
    sim.disable_lp(CD);
    sim.unload_lp(CD);
    sim.unload_mod(BUSY);
}

/// §3.3, (d): a thread sleeping interruptibly in the old function is
/// signalled after 15 s, unwinds through its switch point, and the
/// transition completes.
#[test]
fn fake_signal_moves_an_interruptible_sleeper() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let lp = livepatch(&k, &mut sim.world);
    let sleeper = sim.world.spawn("sleeper");
    let f = sim.world.func_addr(None, "cmdline_proc_show", 0);
    sim.world.call(sleeper, f);
    sim.world.thread_mut(sleeper).unwrap().interruptible = true;

    sim.load_lp_nowait(&lp, "");
    assert!(!sim.settle_within(Duration::from_secs(14)));
    assert!(sim.settle());
    assert!(sim.world.clock() >= Duration::from_secs(15));
    assert_eq!(sim.world.signals, vec![vec![sleeper]]);
    assert!(sim.world.thread(sleeper).unwrap().frames.is_empty());
    assert_eq!(
        k.run(&mut sim.world, sleeper, None, "cmdline_proc_show"),
        lp_output()
    );
    sim.disable_lp(LP);
    sim.unload_lp(LP);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(LP, "")),
            vec![
                format!("livepatch: enabling patch '{LP}'"),
                format!("livepatch: '{LP}': initializing patching transition"),
                format!("livepatch: '{LP}': starting patching transition"),
                "livepatch: signaling remaining tasks".into(),
                format!("livepatch: '{LP}': completing patching transition"),
                format!("livepatch: '{LP}': patching complete"),
            ],
            u_block(LP),
            one(&rmmod(LP)),
        ]),
    );
}

const DUP_MOD: &str = "test_klp_dup_mod";
const DUP_PATCH: &str = "test_klp_dup_patch";

/// A module with two static functions of the same name.
fn dup_module() -> TargetModule {
    TargetModule {
        name: DUP_MOD.into(),
        functions: vec![("dup_func".into(), 0x40), ("dup_func".into(), 0x40)],
        init: Box::new(|_| {}),
        exit: Box::new(|_| {}),
    }
}

/// A patch `name` of `func` (with `sympos`) in the module.
fn dup_patch(sim: &mut Sim, k: &Kernel, name: &str, func: &str, sympos: u64) -> PatchDesc {
    let new_func = sim.world.add_replacement(DUP_PATCH, "livepatch_dup_func");
    k.data
        .borrow_mut()
        .outputs
        .insert(new_func, format!("{DUP_PATCH}: patched dup_func"));
    PatchDesc {
        name: name.into(),
        objs: vec![ObjectDesc {
            name: Some(DUP_MOD.into()),
            funcs: vec![FuncDesc {
                old_name: func.into(),
                new_func,
                old_sympos: sympos,
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// §8.9 "`old_sympos` ambiguity errors": 0 with two symbols of the name,
/// a position past the last one, and a missing symbol are refused before
/// "enabling patch"; an exact position patches that symbol only.
#[test]
fn old_sympos_resolution_errors() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    sim.load_mod(dup_module(), "");
    let ambiguous = dup_patch(&mut sim, &k, DUP_PATCH, "dup_func", 0);
    let past_end = dup_patch(&mut sim, &k, DUP_PATCH, "dup_func", 3);
    let missing = dup_patch(&mut sim, &k, DUP_PATCH, "no_such_func", 0);
    let second = dup_patch(&mut sim, &k, DUP_PATCH, "dup_func", 2);

    assert_eq!(sim.load_failing_lp(&ambiguous, ""), Errno::EINVAL);
    assert_eq!(sim.load_failing_lp(&past_end, ""), Errno::EINVAL);
    assert_eq!(sim.load_failing_lp(&missing, ""), Errno::EINVAL);
    assert!(sim.world.sites().is_empty());
    sim.load_lp(&second, "");
    let first_addr = sim.world.func_addr(Some(DUP_MOD), "dup_func", 1);
    let second_addr = sim.world.func_addr(Some(DUP_MOD), "dup_func", 2);
    assert_eq!(
        sim.world.sites().keys().copied().collect::<Vec<_>>(),
        vec![second_addr]
    );
    assert_eq!(
        sim.world.implementation(k.reader, second_addr),
        Target::Code(second.objs[0].funcs[0].new_func)
    );
    assert_eq!(
        sim.world.implementation(k.reader, first_addr),
        Target::Original
    );
    assert_eq!(
        sim.sysfs_read(&format!("{DUP_PATCH}/{DUP_MOD}/dup_func,2")),
        Err(Errno(21))
    );
    sim.disable_lp(DUP_PATCH);
    sim.unload_lp(DUP_PATCH);
    sim.unload_mod(DUP_MOD);

    let refused = |name: &str, line: String| {
        vec![
            insmod(name, ""),
            line,
            format!(
                "insmod: ERROR: could not insert module test_modules/{name}.ko: Invalid parameters"
            ),
        ]
    };
    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(DUP_MOD, "")),
            refused(
                DUP_PATCH,
                format!(
                    "livepatch: unresolvable ambiguity for symbol 'dup_func' in object '{DUP_MOD}'"
                ),
            ),
            refused(
                DUP_PATCH,
                format!(
                    "livepatch: symbol position 3 for symbol 'dup_func' in object '{DUP_MOD}' not found"
                ),
            ),
            refused(
                DUP_PATCH,
                "livepatch: symbol 'no_such_func' not found in symbol table".into(),
            ),
            ins_p(DUP_PATCH, ""),
            u_block(DUP_PATCH),
            one(&rmmod(DUP_PATCH)),
            one(&rmmod(DUP_MOD)),
        ]),
    );
}

/// `old_sympos` on vmlinux: the position line names the object "vmlinux".
#[test]
fn old_sympos_position_not_found_in_vmlinux() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let mut lp = livepatch(&k, &mut sim.world);
    lp.objs[0].funcs[0].old_sympos = 2;

    assert_eq!(sim.load_failing_lp(&lp, ""), Errno::EINVAL);
    assert_transcript(
        &sim.transcript(),
        &[
            insmod(LP, ""),
            "livepatch: symbol position 2 for symbol 'cmdline_proc_show' in object 'vmlinux' not found".into(),
            format!("insmod: ERROR: could not insert module test_modules/{LP}.ko: Invalid parameters"),
        ],
    );
    // sympos 1 of a unique symbol is that symbol.
    lp.objs[0].funcs[0].old_sympos = 1;
    sim.load_lp(&lp, "");
    assert_eq!(k.read(&mut sim.world, "cmdline_proc_show"), lp_output());
    sim.disable_lp(LP);
}

/// The unpatching transition of a patch is not cut short by a thread
/// sleeping in the original function (only the new code blocks it), and
/// CD's disable with nothing blocking prints CDU_vml.
#[test]
fn unpatching_is_blocked_only_by_new_code() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let cd = callbacks_demo(&k, &mut sim.world, Rc::new(Cell::new(0)));
    let lp = livepatch(&k, &mut sim.world);
    sim.load_lp(&lp, "");
    sim.load_lp(&cd, "");
    let in_new = sim.world.spawn("in_new");
    let f = sim.world.func_addr(None, "cmdline_proc_show", 0);
    sim.world.call(in_new, f);

    // CD does not patch cmdline_proc_show: a thread in LP's code does not
    // block it.
    let before = sim.transcript().len();
    sim.disable_lp(CD);
    assert_eq!(sim.transcript()[before..].to_vec(), cdu_vml(CD));
    // LP's own unpatching waits for that thread.
    sim.sysfs_write(&format!("{LP}/enabled"), "0").unwrap();
    assert!(!sim.settle_within(Duration::from_secs(5)));
    sim.world.ret(in_new);
    assert!(sim.settle());
    assert!(!sim.core.has_patch(LP));
}
