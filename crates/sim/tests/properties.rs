//! Property tests: random sequences of operations on a simulated process,
//! with every invariant of `livepatch_sim::checker` checked after every step.
//!
//! Operations: enable (plain or replacing patches, with callbacks, failing
//! pre-patch callbacks and system states), disable, reverse, force, loading
//! and unloading libraries, threads entering and leaving functions, threads
//! starting and exiting, threads passing a switch point, threads busy on a
//! CPU, and retries of the transition work on the virtual clock.
//!
//! After each sequence every thread is released and every patch disabled;
//! the run must then settle with every thread IDLE, no function redirected,
//! and every system state set up by a patch released exactly once.
//!
//! `PROPTEST_CASES` overrides the number of sequences (default 2000).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use livepatch_core::{
    Errno, FuncDesc, ObjectCallbacks, ObjectDesc, PatchDesc, StateCallbackKind, StateCallbacks,
    StateDesc, Tid,
};
use livepatch_sim::{CallbackCall, ModuleState, Sim, World};
use proptest::prelude::*;

/// The objects of the simulated program and their functions.
const OBJECTS: [(Option<&str>, &[&str]); 3] = [
    (None, &["f0", "f1", "f2", "f3"]),
    (Some("liba.so"), &["a0", "a1", "a2"]),
    (Some("libb.so"), &["b0", "b1"]),
];

#[derive(Clone, Debug)]
struct PatchSpec {
    replace: bool,
    /// (object index, function index) pairs; duplicates are dropped.
    funcs: Vec<(usize, usize)>,
    callbacks: bool,
    pre_patch_fails: bool,
    /// (id, version). State 1 always has the four per-state callbacks, state
    /// 2 never, so that the ledger of set-up states stays meaningful when
    /// one patch takes a state over from another.
    state: Option<(u64, u32)>,
}

#[derive(Clone, Debug)]
enum Op {
    Enable(PatchSpec),
    Disable(usize),
    Reverse,
    Force,
    LoadObject(usize),
    UnloadObject(usize),
    Enter(usize, usize, usize),
    Leave(usize),
    Spawn,
    Exit(usize),
    SwitchPoint(usize),
    SetRunning(usize, bool),
    Work(u8),
}

fn patch_spec() -> impl Strategy<Value = PatchSpec> {
    (
        any::<bool>(),
        prop::collection::vec((0..3usize, 0..4usize), 0..4),
        any::<bool>(),
        prop::bool::weighted(0.1),
        prop::option::weighted(0.3, (1..3u64, 1..4u32)),
    )
        .prop_map(
            |(replace, funcs, callbacks, pre_patch_fails, state)| PatchSpec {
                replace,
                funcs,
                callbacks,
                pre_patch_fails,
                state,
            },
        )
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => patch_spec().prop_map(Op::Enable),
        2 => (0..4usize).prop_map(Op::Disable),
        1 => Just(Op::Reverse),
        1 => Just(Op::Force),
        1 => (1..3usize).prop_map(Op::LoadObject),
        1 => (1..3usize).prop_map(Op::UnloadObject),
        4 => (0..6usize, 0..3usize, 0..4usize).prop_map(|(t, o, f)| Op::Enter(t, o, f)),
        4 => (0..6usize).prop_map(Op::Leave),
        1 => Just(Op::Spawn),
        1 => (0..6usize).prop_map(Op::Exit),
        2 => (0..6usize).prop_map(Op::SwitchPoint),
        1 => (0..6usize, any::<bool>()).prop_map(|(t, r)| Op::SetRunning(t, r)),
        4 => (1..6u8).prop_map(Op::Work),
    ]
}

/// Per-state resource accounting: setups that succeeded minus releases.
#[derive(Debug, Default)]
struct Ledger {
    live_states: BTreeMap<u64, i64>,
}

struct Run {
    sim: Sim,
    ledger: Rc<RefCell<Ledger>>,
    next_patch: usize,
    enabled_ever: Vec<String>,
}

impl Run {
    fn new() -> Run {
        let mut world = World::new();
        for (name, funcs) in OBJECTS {
            let f: Vec<(&str, u64)> = funcs.iter().map(|n| (*n, 0x40)).collect();
            world.add_functions(name, &f);
        }
        world.set_module_state("liba.so", ModuleState::Live);
        for i in 0..3 {
            world.spawn(&format!("worker{i}"));
        }
        Run {
            sim: Sim::new(world),
            ledger: Rc::new(RefCell::new(Ledger::default())),
            next_patch: 0,
            enabled_ever: Vec::new(),
        }
    }

    fn tid(&self, k: usize) -> Option<Tid> {
        let tids: Vec<Tid> = self.sim.world.all_threads().map(|t| t.tid).collect();
        (!tids.is_empty()).then(|| tids[k % tids.len()])
    }

    fn object_loaded(&self, o: usize) -> bool {
        match OBJECTS[o].0 {
            None => true,
            Some(name) => self.sim.world.module_state(Some(name)) == ModuleState::Live,
        }
    }

    fn build(&mut self, spec: &PatchSpec) -> PatchDesc {
        self.next_patch += 1;
        let name = format!("p{}", self.next_patch);
        let world = &mut self.sim.world;
        let mut objs: Vec<ObjectDesc> = Vec::new();
        for &(o, f) in &spec.funcs {
            let funcs = OBJECTS[o].1;
            let fname = funcs[f % funcs.len()];
            let obj_name = OBJECTS[o].0.map(str::to_string);
            let idx = match objs.iter().position(|d| d.name == obj_name) {
                Some(i) => i,
                None => {
                    objs.push(ObjectDesc {
                        name: obj_name,
                        ..Default::default()
                    });
                    objs.len() - 1
                }
            };
            if objs[idx].funcs.iter().any(|d| d.old_name == fname) {
                continue;
            }
            let new_func = world.add_replacement(&name, &format!("{name}_{fname}"));
            objs[idx].funcs.push(FuncDesc {
                old_name: fname.into(),
                new_func,
                old_sympos: 0,
            });
        }
        if objs.is_empty() {
            objs.push(ObjectDesc::default());
        }
        if spec.callbacks {
            let fails = spec.pre_patch_fails;
            for obj in &mut objs {
                let pre = world.add_callback(move |_, _| if fails { -19 } else { 0 });
                let noop = world.add_callback(|_, _| 0);
                obj.callbacks = ObjectCallbacks {
                    pre_patch: Some(pre),
                    post_patch: Some(noop),
                    pre_unpatch: Some(noop),
                    post_unpatch: Some(noop),
                };
            }
        }
        let states = match spec.state {
            None => Vec::new(),
            Some((id, version)) => {
                let callbacks = if id == 1 {
                    let ledger = self.ledger.clone();
                    let cb = world.add_callback(move |_, call| {
                        if let CallbackCall::State { kind, state_id, .. } = call {
                            let mut l = ledger.borrow_mut();
                            let live = l.live_states.entry(*state_id).or_default();
                            match kind {
                                StateCallbackKind::Setup => *live += 1,
                                StateCallbackKind::Release => *live -= 1,
                                _ => {}
                            }
                            assert!(
                                (0..=1).contains(live),
                                "state {state_id} set up {live} times"
                            );
                        }
                        0
                    });
                    StateCallbacks {
                        setup: Some(cb),
                        enable: Some(cb),
                        disable: Some(cb),
                        release: Some(cb),
                    }
                } else {
                    StateCallbacks::default()
                };
                vec![StateDesc {
                    id,
                    version,
                    callbacks,
                }]
            }
        };
        PatchDesc {
            name,
            objs,
            states,
            replace: spec.replace,
        }
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Enable(spec) => {
                let desc = self.build(spec);
                if self
                    .sim
                    .core
                    .enable_patch(&mut self.sim.world, &desc)
                    .is_ok()
                {
                    self.enabled_ever.push(desc.name);
                }
            }
            Op::Disable(k) => {
                let names = self.sim.core.patch_names();
                if let Some(name) = names.get(k % names.len().max(1)) {
                    let r = self.sim.sysfs_write_quiet(&format!("{name}/enabled"), "0");
                    assert!(
                        matches!(r, Ok(()) | Err(Errno::EBUSY) | Err(Errno::EINVAL)),
                        "{r:?}"
                    );
                }
            }
            Op::Reverse => {
                if let Some((name, target)) = self.sim.core.transition() {
                    let name = name.to_string();
                    let value = if target == livepatch_core::PatchState::Patched {
                        "0"
                    } else {
                        "1"
                    };
                    self.sim
                        .sysfs_write_quiet(&format!("{name}/enabled"), value)
                        .expect("reversing the patch in transition works");
                }
            }
            Op::Force => {
                if let Some((name, _)) = self.sim.core.transition() {
                    let name = name.to_string();
                    self.sim.note_force();
                    self.sim
                        .sysfs_write_quiet(&format!("{name}/force"), "1")
                        .expect("forcing the patch in transition works");
                }
            }
            Op::LoadObject(o) => {
                let name = OBJECTS[*o].0.expect("libraries only");
                if !self.object_loaded(*o) {
                    self.sim.world.set_module_state(name, ModuleState::Coming);
                    let state = match self.sim.core.object_coming(&mut self.sim.world, name) {
                        Ok(()) => ModuleState::Live,
                        Err(_) => ModuleState::Unformed,
                    };
                    self.sim.world.set_module_state(name, state);
                }
            }
            Op::UnloadObject(o) => {
                let name = OBJECTS[*o].0.expect("libraries only");
                // A library only goes away when no thread runs its code.
                let addrs: Vec<u64> = OBJECTS[*o]
                    .1
                    .iter()
                    .map(|f| self.sim.world.func_addr(Some(name), f, 0))
                    .collect();
                let busy = self
                    .sim
                    .world
                    .all_threads()
                    .any(|t| t.frames.iter().any(|f| addrs.contains(&f.func)));
                if self.object_loaded(*o) && !busy {
                    self.sim.world.set_module_state(name, ModuleState::Going);
                    self.sim.core.object_going(&mut self.sim.world, name);
                    self.sim.world.set_module_state(name, ModuleState::Unformed);
                }
            }
            Op::Enter(t, o, f) => {
                if let Some(tid) = self.tid(*t)
                    && self.object_loaded(*o)
                {
                    let funcs = OBJECTS[*o].1;
                    let addr = self
                        .sim
                        .world
                        .func_addr(OBJECTS[*o].0, funcs[f % funcs.len()], 0);
                    self.sim.world.call(tid, addr);
                }
            }
            Op::Leave(t) => {
                if let Some(tid) = self.tid(*t) {
                    self.sim.world.ret(tid);
                }
            }
            Op::Spawn => {
                if self.sim.world.all_threads().count() < 8 {
                    self.sim.world.spawn("spawned");
                }
            }
            Op::Exit(t) => {
                if let Some(tid) = self.tid(*t) {
                    self.sim.world.exit(tid);
                }
            }
            Op::SwitchPoint(t) => {
                // Only where nothing is on the stack, as klp_update_patch_state
                // requires.
                if let Some(tid) = self.tid(*t)
                    && self
                        .sim
                        .world
                        .thread(tid)
                        .is_some_and(|th| th.frames.is_empty())
                {
                    self.sim.world.update_patch_state(tid);
                }
            }
            Op::SetRunning(t, running) => {
                if let Some(tid) = self.tid(*t) {
                    self.sim.world.thread_mut(tid).expect("exists").running = *running;
                }
            }
            Op::Work(n) => {
                for _ in 0..*n {
                    if self.sim.core.next_work_at().is_none() {
                        break;
                    }
                    self.sim.work_once();
                }
            }
        }
        self.sim.check();
    }

    /// Releases every thread, disables every patch and checks the end state.
    fn wind_down(&mut self) {
        let tids: Vec<Tid> = self.sim.world.all_threads().map(|t| t.tid).collect();
        for tid in tids {
            while self.sim.world.ret(tid).is_some() {}
            self.sim.world.thread_mut(tid).expect("exists").running = false;
        }
        self.sim.check();
        assert!(
            self.sim.settle(),
            "a transition did not finish with every thread idle"
        );
        while let Some(name) = self.sim.core.patch_names().first().cloned() {
            self.sim
                .sysfs_write_quiet(&format!("{name}/enabled"), "0")
                .expect("disabling with no transition running works");
            assert!(self.sim.settle(), "disabling {name} did not finish");
        }
        assert!(
            self.sim.world.sites().is_empty(),
            "functions still redirected"
        );
        for (id, live) in &self.ledger.borrow().live_states {
            assert_eq!(*live, 0, "state {id} was set up but not released");
        }
        let released: Vec<&String> = self.sim.world.released.iter().map(|(n, _)| n).collect();
        for name in &self.enabled_ever {
            assert_eq!(
                released.iter().filter(|r| **r == name).count(),
                1,
                "{name} must be released exactly once"
            );
        }
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_sequences_keep_every_invariant(ops in prop::collection::vec(op(), 1..60)) {
        let mut run = Run::new();
        for op in &ops {
            run.apply(op);
        }
        run.wind_down();
    }
}
