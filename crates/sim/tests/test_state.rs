//! Port of tools/testing/selftests/livepatch/test-state.sh, and the
//! per-state callbacks of seed 004 (setup / enable / disable / release).
//! See: reference/kernel-livepatch.md §8.4 (tests 18 to 21), §4.6, and
//! seeds/004_e13d4d4dc1557bde.txt.

mod common;

use std::cell::Cell;
use std::rc::Rc;

use common::{lines, one};
use livepatch_core::{
    Errno, FuncDesc, ObjectCallbackKind, ObjectCallbacks, ObjectDesc, PatchDesc, StateCallbackKind,
    StateCallbacks, StateDesc,
};
use livepatch_sim::modules::*;
use livepatch_sim::{CallbackCall, Sim, World};

/// `SP_new(X)`.
fn sp_new(x: &str) -> Vec<String> {
    vec![
        format!("livepatch: enabling patch '{x}'"),
        format!("livepatch: '{x}': initializing patching transition"),
        format!("{x}: pre_patch_callback: vmlinux"),
        format!("{x}: allocate_loglevel_state: allocating space to store console_loglevel"),
        format!("livepatch: '{x}': starting patching transition"),
        format!("livepatch: '{x}': completing patching transition"),
        format!("{x}: post_patch_callback: vmlinux"),
        format!("{x}: fix_console_loglevel: fixing console_loglevel"),
        format!("livepatch: '{x}': patching complete"),
    ]
}

/// `SP_take(X)`.
fn sp_take(x: &str) -> Vec<String> {
    let mut v = sp_new(x);
    v[3] =
        format!("{x}: allocate_loglevel_state: space to store console_loglevel already allocated");
    v[7] = format!("{x}: fix_console_loglevel: taking over the console_loglevel change");
    v
}

/// `SU(X)`, the `echo` command included.
fn su(x: &str) -> Vec<String> {
    vec![
        format!("% echo 0 > /sys/kernel/livepatch/{x}/enabled"),
        format!("livepatch: '{x}': initializing unpatching transition"),
        format!("{x}: pre_unpatch_callback: vmlinux"),
        format!("{x}: restore_console_loglevel: restoring console_loglevel"),
        format!("livepatch: '{x}': starting unpatching transition"),
        format!("livepatch: '{x}': completing unpatching transition"),
        format!("{x}: post_unpatch_callback: vmlinux"),
        format!("{x}: free_loglevel_state: freeing space for the stored console_loglevel"),
        format!("livepatch: '{x}': unpatching complete"),
    ]
}

fn loglevel(k: &Kernel) -> i64 {
    k.data.borrow().console_loglevel
}

fn allocations(k: &Kernel) -> i64 {
    k.data.borrow().live_allocations
}

/// Test 18, "system state modification".
#[test]
fn system_state_modification() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let st1 = state(&k, &mut sim.world, ST1);

    sim.load_lp(&st1, "");
    assert_eq!(loglevel(&k), CONSOLE_LOGLEVEL_MOTORMOUTH);
    assert_eq!(allocations(&k), 1);
    sim.disable_lp(ST1);
    sim.unload_lp(ST1);
    assert_eq!(loglevel(&k), CONSOLE_LOGLEVEL_DEFAULT);
    assert_eq!(allocations(&k), 0);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(ST1, "")),
            sp_new(ST1),
            su(ST1),
            one(&rmmod(ST1)),
        ]),
    );
}

/// Test 19, "taking over system state modification": on disable the old
/// patch is already gone, so `klp_get_prev_state` finds nothing.
#[test]
fn taking_over_system_state_modification() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let st1 = state(&k, &mut sim.world, ST1);
    let st2 = state(&k, &mut sim.world, ST2);

    sim.load_lp(&st1, "");
    sim.load_lp(&st2, "");
    assert_eq!(sim.core.patch_names(), vec![ST2.to_string()]);
    assert_eq!(loglevel(&k), CONSOLE_LOGLEVEL_MOTORMOUTH);
    assert_eq!(allocations(&k), 1);
    sim.unload_lp(ST1);
    sim.disable_lp(ST2);
    sim.unload_lp(ST2);
    assert_eq!(loglevel(&k), CONSOLE_LOGLEVEL_DEFAULT);
    assert_eq!(allocations(&k), 0);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(ST1, "")),
            sp_new(ST1),
            one(&insmod(ST2, "")),
            sp_take(ST2),
            one(&rmmod(ST1)),
            su(ST2),
            one(&rmmod(ST2)),
        ]),
    );
}

/// Test 20, "compatible cumulative livepatches": same versions replace each
/// other in both directions.
#[test]
fn compatible_cumulative_livepatches() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let st2 = state(&k, &mut sim.world, ST2);
    let st3 = state(&k, &mut sim.world, ST3);

    sim.load_lp(&st2, "");
    sim.load_lp(&st3, "");
    sim.unload_lp(ST2);
    sim.load_lp(&st2, "");
    assert_eq!(sim.core.patch_names(), vec![ST2.to_string()]);
    assert_eq!(allocations(&k), 1);
    sim.disable_lp(ST2);
    sim.unload_lp(ST2);
    sim.unload_lp(ST3);
    assert_eq!(loglevel(&k), CONSOLE_LOGLEVEL_DEFAULT);
    assert_eq!(allocations(&k), 0);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(ST2, "")),
            sp_new(ST2),
            one(&insmod(ST3, "")),
            sp_take(ST3),
            one(&rmmod(ST2)),
            one(&insmod(ST2, "")),
            sp_take(ST2),
            su(ST2),
            one(&rmmod(ST2)),
            one(&rmmod(ST3)),
        ]),
    );
}

/// Test 21, "incompatible cumulative livepatches": version 1 cannot replace
/// version 2; the refusal comes before "enabling patch".
#[test]
fn incompatible_cumulative_livepatches() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let st2 = state(&k, &mut sim.world, ST2);
    let st1 = state(&k, &mut sim.world, ST1);

    sim.load_lp(&st2, "");
    assert_eq!(sim.load_failing_lp(&st1, ""), Errno::EINVAL);
    assert_eq!(sim.core.patch_names(), vec![ST2.to_string()]);
    assert_eq!(loglevel(&k), CONSOLE_LOGLEVEL_MOTORMOUTH);
    sim.disable_lp(ST2);
    sim.unload_lp(ST2);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(ST2, "")),
            sp_new(ST2),
            one(&insmod(ST1, "")),
            one(&format!(
                "livepatch: Livepatch patch ({ST1}) is not compatible with the already installed livepatches."
            )),
            one(&format!(
                "insmod: ERROR: could not insert module test_modules/{ST1}.ko: Invalid parameters"
            )),
            su(ST2),
            one(&rmmod(ST2)),
        ]),
    );
}

// Per-state callbacks (seed 004).

/// A state of a test patch: id, version, and whether it has the four
/// per-state callbacks.
#[derive(Clone, Copy)]
struct Spec {
    id: u64,
    version: u32,
    callbacks: bool,
}

/// What the patch builder's callbacks do.
#[derive(Clone, Default)]
struct Behaviour {
    /// `setup` of this state id returns this value.
    setup_fails: Option<(u64, i32)>,
    /// `pre_patch` returns this value.
    pre_patch_ret: i32,
}

fn state_kind(kind: StateCallbackKind) -> &'static str {
    match kind {
        StateCallbackKind::Setup => "setup",
        StateCallbackKind::Enable => "enable",
        StateCallbackKind::Disable => "disable",
        StateCallbackKind::Release => "release",
    }
}

fn object_kind(kind: ObjectCallbackKind) -> &'static str {
    match kind {
        ObjectCallbackKind::PrePatch => "pre_patch_callback",
        ObjectCallbackKind::PostPatch => "post_patch_callback",
        ObjectCallbackKind::PreUnpatch => "pre_unpatch_callback",
        ObjectCallbackKind::PostUnpatch => "post_unpatch_callback",
    }
}

/// A patch on vmlinux with the four object callbacks, `funcs`, and
/// `states`. Every callback prints `<patch>: <callback>: ...`; a state
/// callback also keeps `live` (set-up states minus released ones) by id.
fn cb_patch(
    world: &mut World,
    name: &str,
    replace: bool,
    funcs: Vec<FuncDesc>,
    states: &[Spec],
    how: Behaviour,
    live: Rc<Cell<i64>>,
) -> PatchDesc {
    let obj_cb = {
        let how = how.clone();
        world.add_callback(move |w, call| {
            let CallbackCall::Object {
                kind,
                patch,
                object,
                ..
            } = call
            else {
                return 0;
            };
            let obj = object.as_deref().unwrap_or("vmlinux");
            w.print(format!("{patch}: {}: {obj}", object_kind(*kind)));
            if *kind == ObjectCallbackKind::PrePatch {
                how.pre_patch_ret
            } else {
                0
            }
        })
    };
    let state_cb = {
        let how = how.clone();
        world.add_callback(move |w, call| {
            let CallbackCall::State {
                kind,
                patch,
                state_id,
                ..
            } = call
            else {
                return 0;
            };
            w.print(format!("{patch}: {} state {state_id}", state_kind(*kind)));
            match kind {
                StateCallbackKind::Setup => match how.setup_fails {
                    Some((id, ret)) if id == *state_id => return ret,
                    _ => live.set(live.get() + 1),
                },
                StateCallbackKind::Release => live.set(live.get() - 1),
                _ => {}
            }
            0
        })
    };
    PatchDesc {
        name: name.into(),
        objs: vec![ObjectDesc {
            name: None,
            funcs,
            callbacks: ObjectCallbacks {
                pre_patch: Some(obj_cb),
                post_patch: Some(obj_cb),
                pre_unpatch: Some(obj_cb),
                post_unpatch: Some(obj_cb),
            },
            build_id: None,
        }],
        states: states
            .iter()
            .map(|s| StateDesc {
                id: s.id,
                version: s.version,
                callbacks: if s.callbacks {
                    StateCallbacks {
                        setup: Some(state_cb),
                        enable: Some(state_cb),
                        disable: Some(state_cb),
                        release: Some(state_cb),
                    }
                } else {
                    StateCallbacks::default()
                },
            })
            .collect(),
        replace,
    }
}

const A: &str = "test_klp_state_a";
const B: &str = "test_klp_state_b";
const C: &str = "test_klp_state_c";

fn with_cb(id: u64, version: u32) -> Spec {
    Spec {
        id,
        version,
        callbacks: true,
    }
}

fn l(patch: &str, what: &str) -> String {
    format!("{patch}: {what}")
}

/// Enabling `x` with the given lines in the places of seed 004: `setup`
/// lines after "initializing", before the object's pre_patch; `enable`
/// lines after "completing", before its post_patch.
fn enable_block(x: &str, setup: &[String], enable: &[String]) -> Vec<String> {
    lines(&[
        vec![
            format!("livepatch: enabling patch '{x}'"),
            format!("livepatch: '{x}': initializing patching transition"),
        ],
        setup.to_vec(),
        vec![
            l(x, "pre_patch_callback: vmlinux"),
            format!("livepatch: '{x}': starting patching transition"),
            format!("livepatch: '{x}': completing patching transition"),
        ],
        enable.to_vec(),
        vec![
            l(x, "post_patch_callback: vmlinux"),
            format!("livepatch: '{x}': patching complete"),
        ],
    ])
}

/// Disabling `x`: `disable` lines before its pre_unpatch, `release` lines
/// before its post_unpatch.
fn disable_block(x: &str, disable: &[String], release: &[String]) -> Vec<String> {
    lines(&[
        vec![
            format!("% echo 0 > /sys/kernel/livepatch/{x}/enabled"),
            format!("livepatch: '{x}': initializing unpatching transition"),
        ],
        disable.to_vec(),
        vec![
            l(x, "pre_unpatch_callback: vmlinux"),
            format!("livepatch: '{x}': starting unpatching transition"),
            format!("livepatch: '{x}': completing unpatching transition"),
        ],
        release.to_vec(),
        vec![
            l(x, "post_unpatch_callback: vmlinux"),
            format!("livepatch: '{x}': unpatching complete"),
        ],
    ])
}

/// A new state: `setup` before the pre_patch callbacks and `enable` after
/// the transition; `disable` before the pre_unpatch callbacks and `release`
/// after the unpatching transition. A state without callbacks is silent.
#[test]
fn state_callbacks_new_state() {
    let mut sim = Sim::default();
    let live = Rc::new(Cell::new(0));
    let a = cb_patch(
        &mut sim.world,
        A,
        false,
        vec![],
        &[
            with_cb(1, 1),
            Spec {
                id: 2,
                version: 1,
                callbacks: false,
            },
        ],
        Behaviour::default(),
        live.clone(),
    );

    sim.load_lp(&a, "");
    assert_eq!(live.get(), 1);
    assert_eq!(sim.core.get_state(A, 2).map(|s| s.version), Some(1));
    sim.disable_lp(A);
    assert_eq!(live.get(), 0);
    sim.unload_lp(A);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(A, "")),
            enable_block(A, &[l(A, "setup state 1")], &[l(A, "enable state 1")]),
            disable_block(A, &[l(A, "disable state 1")], &[l(A, "release state 1")]),
            one(&rmmod(A)),
        ]),
    );
}

/// A state taken over by a newer patch: no callback runs when a state
/// already exists (non-replacing or replacing newer patch), and the state
/// goes only with the last patch that carries it.
#[test]
fn state_callbacks_state_taken_over() {
    let mut sim = Sim::default();
    let live = Rc::new(Cell::new(0));
    let a = cb_patch(
        &mut sim.world,
        A,
        false,
        vec![],
        &[with_cb(1, 1)],
        Behaviour::default(),
        live.clone(),
    );
    let b = cb_patch(
        &mut sim.world,
        B,
        false,
        vec![],
        &[with_cb(1, 1)],
        Behaviour::default(),
        live.clone(),
    );
    let c = cb_patch(
        &mut sim.world,
        C,
        true,
        vec![],
        &[with_cb(1, 2)],
        Behaviour::default(),
        live.clone(),
    );

    sim.load_lp(&a, "");
    sim.load_lp(&b, "");
    // B leaves, A still carries state 1: no state callback.
    sim.disable_lp(B);
    sim.unload_lp(B);
    assert_eq!(live.get(), 1);
    // C replaces A and carries state 1 (a newer version): no state callback.
    sim.load_lp(&c, "");
    assert_eq!(sim.core.patch_names(), vec![C.to_string()]);
    assert_eq!(live.get(), 1);
    sim.unload_lp(A);
    // C is the last to carry it: its callbacks remove it.
    sim.disable_lp(C);
    assert_eq!(live.get(), 0);
    sim.unload_lp(C);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(A, "")),
            enable_block(A, &[l(A, "setup state 1")], &[l(A, "enable state 1")]),
            one(&insmod(B, "")),
            enable_block(B, &[], &[]),
            disable_block(B, &[], &[]),
            one(&rmmod(B)),
            one(&insmod(C, "")),
            enable_block(C, &[], &[]),
            one(&rmmod(A)),
            disable_block(C, &[l(C, "disable state 1")], &[l(C, "release state 1")]),
            one(&rmmod(C)),
        ]),
    );
}

/// A state made obsolete by a replacing patch that does not carry it: the
/// replaced patch's own `disable` runs before the transition (after the new
/// patch's setup, before its pre_patch) and its `release` right after
/// "completing", before the new patch's post_patch.
#[test]
fn state_callbacks_state_obsoleted_by_replace() {
    let mut sim = Sim::default();
    let live = Rc::new(Cell::new(0));
    let a = cb_patch(
        &mut sim.world,
        A,
        false,
        vec![],
        &[with_cb(1, 1)],
        Behaviour::default(),
        live.clone(),
    );
    let b = cb_patch(
        &mut sim.world,
        B,
        true,
        vec![],
        &[with_cb(2, 1)],
        Behaviour::default(),
        live.clone(),
    );

    sim.load_lp(&a, "");
    sim.load_lp(&b, "");
    assert_eq!(sim.core.patch_names(), vec![B.to_string()]);
    assert_eq!(sim.core.get_state(B, 1), None);
    assert_eq!(live.get(), 1, "state 1 released, state 2 set up");
    sim.unload_lp(A);
    sim.disable_lp(B);
    sim.unload_lp(B);
    assert_eq!(live.get(), 0);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(A, "")),
            enable_block(A, &[l(A, "setup state 1")], &[l(A, "enable state 1")]),
            one(&insmod(B, "")),
            vec![
                format!("livepatch: enabling patch '{B}'"),
                format!("livepatch: '{B}': initializing patching transition"),
                l(B, "setup state 2"),
                l(A, "disable state 1"),
                l(B, "pre_patch_callback: vmlinux"),
                format!("livepatch: '{B}': starting patching transition"),
                format!("livepatch: '{B}': completing patching transition"),
                l(A, "release state 1"),
                l(B, "enable state 2"),
                l(B, "post_patch_callback: vmlinux"),
                format!("livepatch: '{B}': patching complete"),
            ],
            one(&rmmod(A)),
            disable_block(B, &[l(B, "disable state 2")], &[l(B, "release state 2")]),
            one(&rmmod(B)),
        ]),
    );
}

/// A replacing patch that would make a state obsolete is reversed: the
/// replaced patch keeps its state, which is enabled again (never released).
#[test]
fn state_callbacks_obsoleting_replace_reversed() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let live = Rc::new(Cell::new(0));
    let new_func = sim.world.add_replacement(A, "a_cmdline_proc_show");
    k.data
        .borrow_mut()
        .outputs
        .insert(new_func, format!("{A}: this has been live patched"));
    let funcs = vec![FuncDesc {
        old_name: "cmdline_proc_show".into(),
        new_func,
        old_sympos: 0,
    }];
    let a = cb_patch(
        &mut sim.world,
        A,
        false,
        funcs,
        &[with_cb(1, 1)],
        Behaviour::default(),
        live.clone(),
    );
    let b = cb_patch(
        &mut sim.world,
        B,
        true,
        vec![],
        &[],
        Behaviour::default(),
        live.clone(),
    );

    sim.load_lp(&a, "");
    // A thread sleeps in A's replacement, which B's nop supersedes.
    let sleeper = sim.world.spawn("sleeper");
    let f = sim.world.func_addr(None, "cmdline_proc_show", 0);
    sim.world.call(sleeper, f);
    sim.load_lp_nowait(&b, "");
    assert!(!sim.settle_within(std::time::Duration::from_secs(5)));
    assert_eq!(sim.sysfs_read(&format!("{B}/transition")), Ok("1\n".into()));
    sim.sysfs_write(&format!("{B}/enabled"), "0").unwrap();
    assert!(sim.settle());
    assert_eq!(sim.core.patch_names(), vec![A.to_string()]);
    assert_eq!(live.get(), 1);
    assert_eq!(
        k.read(&mut sim.world, "cmdline_proc_show"),
        format!("{A}: this has been live patched")
    );
    sim.unload_lp(B);
    sim.world.ret(sleeper);
    sim.disable_lp(A);
    sim.unload_lp(A);
    assert_eq!(live.get(), 0);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(A, "")),
            enable_block(A, &[l(A, "setup state 1")], &[l(A, "enable state 1")]),
            one(&insmod(B, "")),
            vec![
                format!("livepatch: enabling patch '{B}'"),
                format!("livepatch: '{B}': initializing patching transition"),
                l(A, "disable state 1"),
                l(B, "pre_patch_callback: vmlinux"),
                format!("livepatch: '{B}': starting patching transition"),
                format!("% echo 0 > /sys/kernel/livepatch/{B}/enabled"),
                format!("livepatch: '{B}': reversing transition from patching to unpatching"),
                format!("livepatch: '{B}': starting unpatching transition"),
                format!("livepatch: '{B}': completing unpatching transition"),
                l(A, "enable state 1"),
                l(B, "post_unpatch_callback: vmlinux"),
                format!("livepatch: '{B}': unpatching complete"),
            ],
            one(&rmmod(B)),
            disable_block(A, &[l(A, "disable state 1")], &[l(A, "release state 1")]),
            one(&rmmod(A)),
        ]),
    );
}

/// A failing `setup` refuses the patch: the states set up before it are
/// released (once), the failing one is not, no object callback runs, and
/// insmod fails with the callback's error.
#[test]
fn state_callbacks_setup_failure_rolls_back() {
    let mut sim = Sim::default();
    let live = Rc::new(Cell::new(0));
    let a = cb_patch(
        &mut sim.world,
        A,
        false,
        vec![],
        &[with_cb(1, 1), with_cb(2, 1)],
        Behaviour {
            setup_fails: Some((2, -12)),
            pre_patch_ret: 0,
        },
        live.clone(),
    );

    assert_eq!(sim.load_failing_lp(&a, ""), Errno::ENOMEM);
    assert!(!sim.core.has_patch(A));
    assert_eq!(live.get(), 0);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(A, "")),
            vec![
                format!("livepatch: enabling patch '{A}'"),
                format!("livepatch: '{A}': initializing patching transition"),
                l(A, "setup state 1"),
                l(A, "setup state 2"),
                l(A, "release state 1"),
                format!("livepatch: failed to enable patch '{A}'"),
                format!("livepatch: '{A}': canceling patching transition, going to unpatch"),
                format!("livepatch: '{A}': completing unpatching transition"),
                format!("livepatch: '{A}': unpatching complete"),
                format!(
                    "insmod: ERROR: could not insert module test_modules/{A}.ko: Cannot allocate memory"
                ),
            ],
        ]),
    );
}

/// A replacing patch whose pre_patch fails after its setup and after it
/// disabled an obsolete state: the obsolete state is enabled again, the new
/// state released, and the replaced patch stays with its state.
#[test]
fn state_callbacks_pre_patch_failure_restores_obsolete_states() {
    let mut sim = Sim::default();
    let live = Rc::new(Cell::new(0));
    let a = cb_patch(
        &mut sim.world,
        A,
        false,
        vec![],
        &[with_cb(1, 1)],
        Behaviour::default(),
        live.clone(),
    );
    let b = cb_patch(
        &mut sim.world,
        B,
        true,
        vec![],
        &[with_cb(2, 1)],
        Behaviour {
            setup_fails: None,
            pre_patch_ret: -19,
        },
        live.clone(),
    );

    sim.load_lp(&a, "");
    assert_eq!(sim.load_failing_lp(&b, ""), Errno::ENODEV);
    assert_eq!(sim.core.patch_names(), vec![A.to_string()]);
    assert_eq!(live.get(), 1);
    sim.disable_lp(A);
    sim.unload_lp(A);
    assert_eq!(live.get(), 0);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(A, "")),
            enable_block(A, &[l(A, "setup state 1")], &[l(A, "enable state 1")]),
            one(&insmod(B, "")),
            vec![
                format!("livepatch: enabling patch '{B}'"),
                format!("livepatch: '{B}': initializing patching transition"),
                l(B, "setup state 2"),
                l(A, "disable state 1"),
                l(B, "pre_patch_callback: vmlinux"),
                "livepatch: pre-patch callback failed for object 'vmlinux'".into(),
                l(A, "enable state 1"),
                l(B, "release state 2"),
                format!("livepatch: failed to enable patch '{B}'"),
                format!("livepatch: '{B}': canceling patching transition, going to unpatch"),
                format!("livepatch: '{B}': completing unpatching transition"),
                format!("livepatch: '{B}': unpatching complete"),
                format!(
                    "insmod: ERROR: could not insert module test_modules/{B}.ko: No such device"
                ),
            ],
            disable_block(A, &[l(A, "disable state 1")], &[l(A, "release state 1")]),
            one(&rmmod(A)),
        ]),
    );
}

/// A downgrade is refused by version, for replacing and non-replacing
/// patches alike, before "enabling patch" and before any callback; a
/// replacing patch may not drop a state whose patch cannot remove it.
#[test]
fn state_downgrade_refused_by_version() {
    let mut sim = Sim::default();
    let live = Rc::new(Cell::new(0));
    let a = cb_patch(
        &mut sim.world,
        A,
        false,
        vec![],
        &[with_cb(1, 2)],
        Behaviour::default(),
        live.clone(),
    );
    let b = cb_patch(
        &mut sim.world,
        B,
        true,
        vec![],
        &[with_cb(1, 1)],
        Behaviour::default(),
        live.clone(),
    );
    let c = cb_patch(
        &mut sim.world,
        C,
        false,
        vec![],
        &[with_cb(1, 1)],
        Behaviour::default(),
        live.clone(),
    );

    sim.load_lp(&a, "");
    assert_eq!(sim.load_failing_lp(&b, ""), Errno::EINVAL);
    assert_eq!(sim.load_failing_lp(&c, ""), Errno::EINVAL);
    assert_eq!(sim.core.patch_names(), vec![A.to_string()]);
    assert_eq!(live.get(), 1);
    sim.disable_lp(A);
    sim.unload_lp(A);

    let refused = |x: &str| {
        vec![
            insmod(x, ""),
            format!(
                "livepatch: Livepatch patch ({x}) is not compatible with the already installed livepatches."
            ),
            format!(
                "insmod: ERROR: could not insert module test_modules/{x}.ko: Invalid parameters"
            ),
        ]
    };
    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(A, "")),
            enable_block(A, &[l(A, "setup state 1")], &[l(A, "enable state 1")]),
            refused(B),
            refused(C),
            disable_block(A, &[l(A, "disable state 1")], &[l(A, "release state 1")]),
            one(&rmmod(A)),
        ]),
    );
}

/// §4.6: a replacing patch must carry every state whose patch has no
/// callback to remove it; a non-replacing patch may ignore it.
#[test]
fn state_without_callbacks_cannot_be_dropped_by_replace() {
    let mut sim = Sim::default();
    let live = Rc::new(Cell::new(0));
    let plain = Spec {
        id: 1,
        version: 1,
        callbacks: false,
    };
    let a = cb_patch(
        &mut sim.world,
        A,
        false,
        vec![],
        &[plain],
        Behaviour::default(),
        live.clone(),
    );
    let b = cb_patch(
        &mut sim.world,
        B,
        true,
        vec![],
        &[],
        Behaviour::default(),
        live.clone(),
    );
    let c = cb_patch(
        &mut sim.world,
        C,
        false,
        vec![],
        &[],
        Behaviour::default(),
        live.clone(),
    );

    sim.load_lp(&a, "");
    assert_eq!(sim.load_failing_lp(&b, ""), Errno::EINVAL);
    sim.load_lp(&c, "");
    assert_eq!(sim.core.patch_names(), vec![A.to_string(), C.to_string()]);
    assert_eq!(live.get(), 0);

    let t = sim.transcript();
    let idx = t.iter().position(|s| *s == insmod(B, "")).unwrap();
    assert_eq!(
        t[idx + 1],
        format!(
            "livepatch: Livepatch patch ({B}) is not compatible with the already installed livepatches."
        )
    );
    assert_eq!(t[idx + 3], insmod(C, ""));
}
