//! Regressions, named after the issue that found them (as ripgrep names its own).

use std::cell::RefCell;
use std::rc::Rc;

use livepatch_core::{
    Errno, FuncDesc, ObjectCallbacks, ObjectDesc, PatchDesc, PatchState, ThreadState,
};
use livepatch_sim::modules::{assert_transcript, insmod};
use livepatch_sim::{Sim, TargetModule, World};

/// A patch of `value` and `second` in `object`, with a `pre_patch` callback that logs.
fn two_function_patch(sim: &mut Sim, object: Option<&str>, build_id: Option<&str>) -> PatchDesc {
    let new_value = sim.world.add_replacement("p", "new_value");
    let new_second = sim.world.add_replacement("p", "new_second");
    let pre_patch = sim.world.add_callback(|w: &mut World, _| {
        w.print("p: pre_patch_callback");
        0
    });
    PatchDesc {
        name: "p".into(),
        objs: vec![ObjectDesc {
            name: object.map(str::to_string),
            funcs: vec![
                FuncDesc {
                    old_name: "value".into(),
                    new_func: new_value,
                    old_sympos: 0,
                },
                FuncDesc {
                    old_name: "second".into(),
                    new_func: new_second,
                    old_sympos: 0,
                },
            ],
            callbacks: ObjectCallbacks {
                pre_patch: Some(pre_patch),
                ..Default::default()
            },
            build_id: build_id.map(str::to_string),
        }],
        ..Default::default()
    }
}

/// `libplug.so` as a module that does nothing when it loads or goes.
fn plugin() -> TargetModule {
    TargetModule {
        name: "libplug.so".into(),
        functions: vec![],
        init: Box::new(|_| {}),
        exit: Box::new(|_| {}),
    }
}

/// Issue 8: everything that refuses a patch is found before the first callback runs. The
/// second function of the patch cannot be redirected: the patch is refused with no callback
/// run, no "enabling patch" line, and nothing planned left registered.
#[test]
fn r8_a_function_that_cannot_be_redirected_refuses_the_patch_before_any_callback() {
    let mut sim = Sim::default();
    sim.world
        .add_functions(None, &[("value", 0x40), ("second", 0x40)]);
    sim.world.faults.unredirectable.insert("second".into());
    let desc = two_function_patch(&mut sim, None, None);
    assert_eq!(sim.load_failing_lp(&desc, ""), Errno::EINVAL);
    assert_transcript(
        &sim.transcript(),
        &[
            insmod("p", ""),
            "livepatch: failed to find location for function 'second'".into(),
            "insmod: ERROR: could not insert module test_modules/p.ko: Invalid parameters".into(),
        ],
    );
    assert!(sim.world.sites().is_empty());

    sim.world.faults.unredirectable.clear();
    sim.world.clear_log();
    sim.load_lp(&desc, "");
    assert_eq!(sim.world.sites().len(), 2);
    assert!(
        sim.transcript()
            .iter()
            .any(|l| l == "p: pre_patch_callback")
    );
}

/// Issue 8: build ids are the core's. A patch written for another build of the program is
/// refused before anything runs, naming both ids; for a library loaded later, the library is
/// refused with the kernel's lines for an object that fails to initialize.
#[test]
fn r8_a_patch_for_another_build_is_refused_at_enable_and_when_its_library_comes() {
    let mut sim = Sim::default();
    sim.world
        .add_functions(None, &[("value", 0x40), ("second", 0x40)]);
    sim.world.set_build_id(None, Some(vec![0xab, 0xcd]));
    let wrong = two_function_patch(&mut sim, None, Some("ABCE"));
    let err = sim.core.enable_patch(&mut sim.world, &wrong).unwrap_err();
    assert_eq!(err.errno, Errno::EINVAL);
    assert_eq!(
        err.reason,
        "object 'vmlinux' has build id abcd, but the patch was written for build id abce"
    );
    assert!(sim.transcript().is_empty(), "{:?}", sim.transcript());
    let right = two_function_patch(&mut sim, None, Some("ABCD"));
    sim.load_lp(&right, "");
    sim.disable_lp("p");
    sim.unload_lp("p");

    sim.world
        .add_functions(Some("libplug.so"), &[("value", 0x40), ("second", 0x40)]);
    let for_plug = two_function_patch(&mut sim, Some("libplug.so"), Some("0102"));
    sim.load_lp(&for_plug, "");
    sim.world.clear_log();
    assert_eq!(sim.insmod_target(plugin(), ""), Err(Errno::EINVAL));
    assert_transcript(
        &sim.transcript(),
        &[
            insmod("libplug.so", ""),
            "livepatch: failed to initialize patch 'p' for module 'libplug.so' (-22)".into(),
            "livepatch: patch 'p' failed for module 'libplug.so', refusing to load module 'libplug.so'".into(),
            "insmod: ERROR: could not insert module test_modules/libplug.so.ko: Invalid parameters".into(),
        ],
    );
    assert!(sim.world.sites().is_empty());
}

/// Issue 8: a thread the platform only finds after it started, during a transition, is
/// treated like one that existed at its start: it may have run old code, so it is pending and
/// holds the transition until it is checked clean, even though new threads start switched.
#[test]
fn r8_a_thread_found_during_a_transition_starts_pending_in_the_initial_state() {
    let mut sim = Sim::default();
    sim.world
        .add_functions(None, &[("value", 0x40), ("second", 0x40)]);
    let worker = sim.world.spawn("worker");
    let value = sim.world.func_addr(None, "value", 0);
    sim.world.call(worker, value);
    let desc = two_function_patch(&mut sim, None, None);
    sim.load_lp_nowait(&desc, "");
    assert!(sim.core.transition().is_some());

    let born = sim.world.spawn("born");
    assert_eq!(
        sim.world.thread(born).unwrap().state,
        ThreadState::switched_to(PatchState::Patched)
    );
    let found = sim.world.spawn_discovered("found");
    assert_eq!(
        sim.world.thread(found).unwrap().state,
        ThreadState::pending_for(PatchState::Patched)
    );
    sim.check();

    // The worker still runs the old `value`; once it returns, both pending threads switch.
    assert!(!sim.settle_within(std::time::Duration::from_secs(1)));
    sim.world.ret(worker);
    assert!(sim.settle());
    assert_eq!(sim.world.thread(found).unwrap().state, ThreadState::IDLE);
}

/// Issue 8: shadow variables of one id are freed, and their destructors run, in the order of
/// their objects' addresses, whatever the order they were made in.
#[test]
fn r8_free_all_runs_destructors_in_a_defined_order() {
    let mut vars = livepatch_core::ShadowVars::new();
    for obj in [0x5000usize, 0x1000, 0x3000, 0x2000, 0x4000] {
        assert!(vars.alloc(obj, 1, 8, None).is_some());
    }
    let order = Rc::new(RefCell::new(Vec::new()));
    let seen = order.clone();
    vars.free_all(
        1,
        Some(&mut |obj: usize, _: livepatch_core::ShadowData<'_>| seen.borrow_mut().push(obj)),
    );
    assert_eq!(*order.borrow(), [0x1000, 0x2000, 0x3000, 0x4000, 0x5000]);
}

/// Issue 8: a library that comes is refused before any patch's callback runs or any code is
/// written for it, even when the patch that refuses it is not the first that targets it.
#[test]
fn r8_a_coming_library_refused_by_a_later_patch_runs_no_earlier_patch_callback() {
    let mut sim = Sim::default();
    sim.world
        .add_functions(Some("libplug.so"), &[("value", 0x40), ("second", 0x40)]);
    sim.world
        .set_build_id(Some("libplug.so"), Some(vec![0x01, 0x02]));
    let mut first = two_function_patch(&mut sim, Some("libplug.so"), None);
    first.name = "first".into();
    let mut second = two_function_patch(&mut sim, Some("libplug.so"), Some("0103"));
    second.name = "second".into();
    sim.load_lp(&first, "");
    sim.load_lp(&second, "");
    sim.world.clear_log();
    assert_eq!(sim.insmod_target(plugin(), ""), Err(Errno::EINVAL));
    assert_transcript(
        &sim.transcript(),
        &[
            insmod("libplug.so", ""),
            "livepatch: failed to initialize patch 'second' for module 'libplug.so' (-22)".into(),
            "livepatch: patch 'second' failed for module 'libplug.so', refusing to load module 'libplug.so'".into(),
            "insmod: ERROR: could not insert module test_modules/libplug.so.ko: Invalid parameters".into(),
        ],
    );
    assert!(sim.world.sites().is_empty());
    let statuses = sim.core.patch_statuses();
    assert!(
        statuses
            .iter()
            .flat_map(|p| &p.objects)
            .all(|o| !o.loaded && !o.patched),
        "{statuses:?}"
    );
}
