//! The operations a random run applies to a simulated process, shared by the property tests
//! (which let proptest choose them) and the seeded [`crate::simulator`] (which draws them from
//! one seed): enabling patches (plain or replacing, with callbacks that may fail, with system
//! states whose setup may fail), disabling, reversing and forcing them, libraries coming and
//! going, threads entering and leaving functions, starting (seen at birth or found later) and
//! exiting, passing switch points, running on a CPU or having unreliable stacks, faults of the
//! functions' entries, and the retry work on the virtual clock.
//!
//! [`Run::apply`] runs the invariant checker after every operation; [`Run::wind_down`]
//! releases every thread, disables every patch and checks that the run settles: every thread
//! IDLE, no function redirected, every system state set up released exactly once.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use livepatch_core::{
    Errno, FuncDesc, ObjectCallbacks, ObjectDesc, PatchDesc, StateCallbackKind, StateCallbacks,
    StateDesc, Tid,
};

use crate::{CallbackCall, ModuleState, Sim, World};

/// The objects of the simulated program and their functions.
pub const OBJECTS: [(Option<&str>, &[&str]); 3] = [
    (None, &["f0", "f1", "f2", "f3"]),
    (Some("liba.so"), &["a0", "a1", "a2"]),
    (Some("libb.so"), &["b0", "b1"]),
];

/// The most threads a run has at once.
pub const MAX_THREADS: usize = 8;

/// A patch to enable.
#[derive(Clone, Debug)]
pub struct PatchSpec {
    /// Atomic replace.
    pub replace: bool,
    /// (object index, function index) pairs; duplicates are dropped.
    pub funcs: Vec<(usize, usize)>,
    /// The objects have all four callbacks.
    pub callbacks: bool,
    /// Their `pre_patch` fails with -ENODEV.
    pub pre_patch_fails: bool,
    /// (id, version). State 1 always has the four per-state callbacks, state
    /// 2 never, so that the ledger of set-up states stays meaningful when
    /// one patch takes a state over from another.
    pub state: Option<(u64, u32)>,
    /// State 1's `setup` fails with -EINVAL.
    pub setup_fails: bool,
}

/// How an entry fault breaks a function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SiteFault {
    /// It cannot be redirected at all (found when planning).
    Unredirectable,
    /// Its registration fails with -EBUSY (found when writing).
    RegisterFails,
}

/// One operation of a run. Thread operands are indices into the threads alive, modulo their
/// number; patch operands into the active patches.
#[derive(Clone, Debug)]
pub enum Op {
    /// `insmod` of a patch.
    Enable(PatchSpec),
    /// `echo 0 > enabled`.
    Disable(usize),
    /// Reverses the transition in progress.
    Reverse,
    /// Forces the transition in progress.
    Force,
    /// A library of [`OBJECTS`] comes.
    LoadObject(usize),
    /// A library of [`OBJECTS`] goes (only when no thread runs its code).
    UnloadObject(usize),
    /// A thread calls function `.2` of object `.1` and stays in it.
    Enter(usize, usize, usize),
    /// A thread returns from its innermost function.
    Leave(usize),
    /// A thread starts, seen at its birth.
    Spawn,
    /// A thread starts that the platform only finds later.
    SpawnDiscovered,
    /// A thread exits.
    Exit(usize),
    /// A thread with nothing on its stack passes `klp_update_patch_state`.
    SwitchPoint(usize),
    /// A thread runs on a CPU (cannot be checked) or stops.
    SetRunning(usize, bool),
    /// A thread's stack becomes unreliable, or reliable again.
    SetUnreliable(usize, bool),
    /// Function `.1` of object `.0` is broken so.
    BreakSite(usize, usize, SiteFault),
    /// Every entry fault is mended.
    MendSites,
    /// Up to this many attempts of the retry work, each at its due time.
    Work(u8),
}

/// Per-state resource accounting: setups that succeeded minus releases.
#[derive(Default)]
struct Ledger {
    live_states: BTreeMap<u64, i64>,
}

/// A simulated process and what a run has done to it.
#[derive(Debug)]
pub struct Run {
    /// The core and the world.
    pub sim: Sim,
    ledger: Rc<RefCell<Ledger>>,
    next_patch: usize,
    enabled_ever: Vec<String>,
}

impl Default for Run {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(&self.live_states).finish()
    }
}

impl Run {
    /// The objects of [`OBJECTS`], `liba.so` loaded, and three threads.
    pub fn new() -> Run {
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

    fn function(o: usize, f: usize) -> &'static str {
        let funcs = OBJECTS[o].1;
        funcs[f % funcs.len()]
    }

    fn build(&mut self, spec: &PatchSpec) -> PatchDesc {
        self.next_patch += 1;
        let name = format!("p{}", self.next_patch);
        let world = &mut self.sim.world;
        let mut objs: Vec<ObjectDesc> = Vec::new();
        for &(o, f) in &spec.funcs {
            let fname = Self::function(o, f);
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
                    let setup_fails = spec.setup_fails;
                    let cb = world.add_callback(move |_, call| {
                        let CallbackCall::State { kind, state_id, .. } = call else {
                            return 0;
                        };
                        if *kind == StateCallbackKind::Setup && setup_fails {
                            return -22;
                        }
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

    /// Applies one operation, then checks every invariant.
    ///
    /// # Panics
    /// When an invariant or an expectation of the kernel's interface breaks.
    pub fn apply(&mut self, op: &Op) {
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
                    let addr = self
                        .sim
                        .world
                        .func_addr(OBJECTS[*o].0, Self::function(*o, *f), 0);
                    self.sim.world.call(tid, addr);
                }
            }
            Op::Leave(t) => {
                if let Some(tid) = self.tid(*t) {
                    self.sim.world.ret(tid);
                }
            }
            Op::Spawn => {
                if self.sim.world.all_threads().count() < MAX_THREADS {
                    self.sim.world.spawn("spawned");
                }
            }
            Op::SpawnDiscovered => {
                if self.sim.world.all_threads().count() < MAX_THREADS {
                    self.sim.world.spawn_discovered("found");
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
            Op::SetUnreliable(t, unreliable) => {
                if let Some(tid) = self.tid(*t) {
                    self.sim.world.thread_mut(tid).expect("exists").unreliable = *unreliable;
                }
            }
            Op::BreakSite(o, f, fault) => {
                let name = Self::function(*o, *f).to_string();
                let faults = &mut self.sim.world.faults;
                match fault {
                    SiteFault::Unredirectable => {
                        faults.unredirectable.insert(name);
                    }
                    SiteFault::RegisterFails => {
                        faults.register_fails.insert(name, Errno::EBUSY);
                    }
                }
            }
            Op::MendSites => {
                self.sim.world.faults = Default::default();
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
    ///
    /// # Panics
    /// When the run does not settle, or leaves anything behind.
    pub fn wind_down(&mut self) {
        let tids: Vec<Tid> = self.sim.world.all_threads().map(|t| t.tid).collect();
        for tid in tids {
            while self.sim.world.ret(tid).is_some() {}
            let t = self.sim.world.thread_mut(tid).expect("exists");
            t.running = false;
            t.unreliable = false;
        }
        self.sim.world.faults = Default::default();
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
