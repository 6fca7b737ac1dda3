//! The simulated process: objects with symbol tables, code, threads with
//! stacks of frames, a virtual clock, a log, callbacks and injectable faults.
//! [`World`] implements the core's [`Platform`] trait exactly as a real
//! process would be driven, so the core cannot tell it from the agent.
//!
//! Addresses are virtual: every function, original or replacement, gets its
//! own range in one flat address space, so the stack check and the dispatch
//! work on addresses just as they do in a real process.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use livepatch_core::{
    Addr, BlockingRange, CallbackId, DisjointRanges, Dispatch, Errno, FuncLocation, Level,
    LogRecord, ObjectCallback, PatchState, Platform, RegisterError, ResolveError, SiteRegistration,
    StateCallback, SwitchResult, Target, ThreadState, Tid,
};

/// The lifecycle state of a shared object, as the kernel's module states
/// (`MODULE_STATE_*`) that the callbacks of the selftests print.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleState {
    /// Loaded and running (`MODULE_STATE_LIVE`).
    Live,
    /// Being loaded, its initializers not run yet (`MODULE_STATE_COMING`).
    Coming,
    /// Being unloaded, after its finalizers (`MODULE_STATE_GOING`).
    Going,
    /// Not loaded (`MODULE_STATE_UNFORMED`).
    Unformed,
}

impl ModuleState {
    /// The text the kernel selftest modules print for the state.
    pub fn describe(self) -> &'static str {
        match self {
            ModuleState::Live => "[MODULE_STATE_LIVE] Normal state",
            ModuleState::Coming => "[MODULE_STATE_COMING] Full formed, running module_init",
            ModuleState::Going => "[MODULE_STATE_GOING] Going away",
            ModuleState::Unformed => "[MODULE_STATE_UNFORMED] Still setting it up",
        }
    }
}

/// A function symbol of an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol {
    /// The symbol name; several symbols may share it.
    pub name: String,
    /// The entry address.
    pub addr: Addr,
    /// The size in bytes (0: no size known).
    pub size: u64,
}

/// A shared object or the main executable.
#[derive(Clone, Debug)]
pub struct SimObject {
    /// `None` for the main executable.
    pub name: Option<String>,
    /// The module state.
    pub state: ModuleState,
    /// Function symbols in symbol-table order.
    pub symbols: Vec<Symbol>,
    /// The GNU build id, if the object has one.
    pub build_id: Option<Vec<u8>>,
}

/// A frame on a simulated thread's stack: the thread is inside `func` (the
/// original entry of the function it called), running `target`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The original entry address of the called function.
    pub func: Addr,
    /// The implementation the call went to.
    pub target: Target,
    /// Where in that implementation the thread is.
    pub pc: Addr,
    /// The world step at which the frame was pushed.
    pub pushed_at: u64,
}

/// A simulated thread.
#[derive(Clone, Debug)]
pub struct SimThread {
    /// The thread id.
    pub tid: Tid,
    /// The thread name (`comm`).
    pub name: String,
    /// Its patch state and pending flag.
    pub state: ThreadState,
    /// Its stack, outermost frame first.
    pub frames: Vec<Frame>,
    /// Busy on a CPU: cannot be examined (`-EBUSY`).
    pub running: bool,
    /// Its stack cannot be walked reliably (`-EINVAL`).
    pub unreliable: bool,
    /// Sleeping interruptibly: a signal makes it return from all its frames
    /// and pass a switch point, as a task sleeping in a system call does.
    pub interruptible: bool,
}

/// A callback of the simulated patch libraries.
pub type SimCallback = Box<dyn FnMut(&mut World, &CallbackCall) -> i32>;

/// The arguments of a callback invocation.
#[derive(Clone, Debug)]
pub enum CallbackCall {
    /// A per-object callback.
    Object {
        /// Which one.
        kind: livepatch_core::ObjectCallbackKind,
        /// The patch name.
        patch: String,
        /// The object name (`None`: main executable).
        object: Option<String>,
        /// The state of the object's module when the callback runs.
        module_state: ModuleState,
        /// `klp_get_prev_state` answers: `None` outside a transition.
        prev_states: Option<Vec<livepatch_core::StateRef>>,
    },
    /// A per-state callback.
    State {
        /// Which one.
        kind: livepatch_core::StateCallbackKind,
        /// The patch whose state it is.
        patch: String,
        /// The state id.
        state_id: u64,
        /// `klp_get_prev_state` answers: `None` outside a transition.
        prev_states: Option<Vec<livepatch_core::StateRef>>,
    },
}

/// One line of the simulated kernel log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    /// The text, as `dmesg` would show it.
    pub text: String,
    /// The core's level, or `None` for lines printed by the test's own
    /// modules and commands.
    pub level: Option<Level>,
    /// A per-thread line of `klp_try_switch_task`.
    pub per_thread: bool,
}

/// Faults the world can inject into what the platform does.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Functions (by name) that cannot be redirected at all.
    pub unredirectable: BTreeSet<String>,
    /// Functions (by name) whose site registration fails with this errno, as
    /// an ftrace registration refused by a conflicting user does.
    pub register_fails: BTreeMap<String, Errno>,
}

/// Why the world cannot redirect a function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimSiteError {
    /// The [`Faults::unredirectable`] fault: found when planning.
    TooShort {
        /// The function.
        func: String,
    },
    /// The [`Faults::register_fails`] fault: found when registering.
    Claimed {
        /// The function.
        func: String,
    },
}

impl fmt::Display for SimSiteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SimSiteError::TooShort { func } => {
                write!(f, "function '{func}' is too short to redirect")
            }
            SimSiteError::Claimed { func } => {
                write!(f, "the entry of '{func}' is claimed by another user")
            }
        }
    }
}

/// A site as the world keeps it: what the stub does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimSite {
    /// The current dispatch.
    pub dispatch: Dispatch,
    /// The size of the original function.
    pub size: u64,
}

/// The simulated process.
pub struct World {
    clock: Duration,
    step: u64,
    next_addr: Addr,
    next_tid: Tid,
    objects: Vec<SimObject>,
    /// Every function's code, by start address: (name, size, owner).
    code: BTreeMap<Addr, (String, u64, String)>,
    sites: BTreeMap<Addr, SimSite>,
    /// Functions planned for redirection and not registered since.
    planned: BTreeMap<Addr, u64>,
    threads: BTreeMap<Tid, SimThread>,
    target: PatchState,
    new_thread: ThreadState,
    callbacks: Vec<Option<SimCallback>>,
    log: Vec<LogLine>,
    /// Faults to inject.
    pub faults: Faults,
    /// Patches the core released: (name, forced).
    pub released: Vec<(String, bool)>,
    /// How many times the core synchronized.
    pub synchronizations: u64,
    /// Threads the core signalled, per call.
    pub signals: Vec<Vec<Tid>>,
    /// Violations of the platform contract the world noticed.
    pub contract_violations: Vec<String>,
}

impl fmt::Debug for World {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("World")
            .field("clock", &self.clock)
            .field("objects", &self.objects.len())
            .field("sites", &self.sites)
            .field("threads", &self.threads)
            .field("target", &self.target)
            .finish()
    }
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

/// Size given to functions that do not ask for one.
pub const DEFAULT_FUNC_SIZE: u64 = 0x40;

impl World {
    /// An empty process with a main executable that has no functions yet.
    pub fn new() -> Self {
        World {
            clock: Duration::ZERO,
            step: 0,
            next_addr: 0x40_0000,
            next_tid: 100,
            objects: vec![SimObject {
                name: None,
                state: ModuleState::Live,
                symbols: Vec::new(),
                build_id: None,
            }],
            code: BTreeMap::new(),
            sites: BTreeMap::new(),
            planned: BTreeMap::new(),
            threads: BTreeMap::new(),
            target: PatchState::Idle,
            new_thread: ThreadState::IDLE,
            callbacks: Vec::new(),
            log: Vec::new(),
            faults: Faults::default(),
            released: Vec::new(),
            synchronizations: 0,
            signals: Vec::new(),
            contract_violations: Vec::new(),
        }
    }

    fn alloc_code(&mut self, owner: &str, name: &str, size: u64) -> Addr {
        let addr = self.next_addr;
        // Leave a gap so that no two functions are adjacent.
        self.next_addr += size.max(1).next_multiple_of(0x10) + 0x10;
        self.code
            .insert(addr, (name.to_string(), size, owner.to_string()));
        addr
    }

    fn object_index(&self, name: Option<&str>) -> Option<usize> {
        self.objects.iter().position(|o| o.name.as_deref() == name)
    }

    /// Adds functions to an object (`None`: the main executable), creating
    /// the object unloaded if it does not exist. A name may repeat: the
    /// symbols keep the order given. Returns their addresses.
    pub fn add_functions(&mut self, object: Option<&str>, funcs: &[(&str, u64)]) -> Vec<Addr> {
        let idx = match self.object_index(object) {
            Some(i) => i,
            None => {
                self.objects.push(SimObject {
                    name: object.map(str::to_string),
                    state: ModuleState::Unformed,
                    symbols: Vec::new(),
                    build_id: None,
                });
                self.objects.len() - 1
            }
        };
        let owner = object
            .unwrap_or(livepatch_core::MAIN_OBJECT_NAME)
            .to_string();
        let mut addrs = Vec::new();
        for (name, size) in funcs {
            let addr = self.alloc_code(&owner, name, *size);
            self.objects[idx].symbols.push(Symbol {
                name: name.to_string(),
                addr,
                size: *size,
            });
            addrs.push(addr);
        }
        addrs
    }

    /// Adds a replacement function of a patch library; returns its address.
    pub fn add_replacement(&mut self, patch: &str, name: &str) -> Addr {
        self.alloc_code(patch, name, DEFAULT_FUNC_SIZE)
    }

    /// The address of the `nth` (1-based; 0: the only) function `name` of
    /// `object`.
    ///
    /// # Panics
    /// If there is no such function.
    pub fn func_addr(&self, object: Option<&str>, name: &str, nth: usize) -> Addr {
        let idx = self.object_index(object).expect("no such object");
        let matches: Vec<&Symbol> = self.objects[idx]
            .symbols
            .iter()
            .filter(|s| s.name == name)
            .collect();
        let pick = if nth == 0 { 1 } else { nth };
        assert!(
            nth != 0 || matches.len() == 1,
            "function {name} is ambiguous"
        );
        matches
            .get(pick - 1)
            .map(|s| s.addr)
            .expect("no such function")
    }

    /// The name of the code at `addr` (any function, original or new).
    pub fn code_name(&self, addr: Addr) -> Option<&str> {
        self.code
            .range(..=addr)
            .next_back()
            .filter(|(start, (_, size, _))| addr < *start + (*size).max(1))
            .map(|(_, (name, _, _))| name.as_str())
    }

    /// Whether an object of that name exists, loaded or not.
    pub fn object_exists(&self, name: &str) -> bool {
        self.object_index(Some(name)).is_some()
    }

    /// The module state of an object.
    pub fn module_state(&self, object: Option<&str>) -> ModuleState {
        self.object_index(object)
            .map(|i| self.objects[i].state)
            .unwrap_or(ModuleState::Unformed)
    }

    /// Sets the module state of an object (the harness does this around
    /// `object_coming` / `object_going`).
    pub fn set_module_state(&mut self, object: &str, state: ModuleState) {
        let idx = match self.object_index(Some(object)) {
            Some(i) => i,
            None => {
                self.add_functions(Some(object), &[]);
                self.objects.len() - 1
            }
        };
        self.objects[idx].state = state;
    }

    /// Registers a callback; its id goes into a descriptor.
    pub fn add_callback(
        &mut self,
        f: impl FnMut(&mut World, &CallbackCall) -> i32 + 'static,
    ) -> CallbackId {
        self.callbacks.push(Some(Box::new(f)));
        (self.callbacks.len() - 1) as CallbackId
    }

    /// Appends a line of the harness or of a simulated module to the log.
    pub fn print(&mut self, text: impl Into<String>) {
        self.log.push(LogLine {
            text: text.into(),
            level: None,
            per_thread: false,
        });
    }

    /// The whole log.
    pub fn log_lines(&self) -> &[LogLine] {
        &self.log
    }

    /// The log without the per-thread lines, as the kernel selftests see it.
    pub fn transcript(&self) -> Vec<String> {
        self.log
            .iter()
            .filter(|l| !l.per_thread)
            .map(|l| l.text.clone())
            .collect()
    }

    /// Forgets the log (the selftests' canary line).
    pub fn clear_log(&mut self) {
        self.log.clear();
    }

    /// Advances the clock.
    pub fn advance(&mut self, by: Duration) {
        self.clock += by;
    }

    /// Sets the clock forward to `to` (never backwards).
    pub fn advance_to(&mut self, to: Duration) {
        self.clock = self.clock.max(to);
    }

    /// The clock.
    pub fn clock(&self) -> Duration {
        self.clock
    }

    /// A counter of world events, used to date frames.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Starts a thread, in the state the core set for new threads.
    pub fn spawn(&mut self, name: &str) -> Tid {
        self.step += 1;
        let tid = self.next_tid;
        self.next_tid += 1;
        self.threads.insert(
            tid,
            SimThread {
                tid,
                name: name.to_string(),
                state: self.new_thread,
                frames: Vec::new(),
                running: false,
                unreliable: false,
                interruptible: false,
            },
        );
        tid
    }

    /// Starts a thread the platform does not see being born: it is found already running, so it
    /// takes the state of a discovered thread (the core's rule), not the state of new threads.
    pub fn spawn_discovered(&mut self, name: &str) -> Tid {
        let tid = self.spawn(name);
        let state = ThreadState::discovered(self.new_thread, self.target);
        if let Some(t) = self.threads.get_mut(&tid) {
            t.state = state;
        }
        tid
    }

    /// Sets the build id of an object (`None`: the main executable).
    pub fn set_build_id(&mut self, object: Option<&str>, build_id: Option<Vec<u8>>) {
        if let Some(i) = self.object_index(object) {
            self.objects[i].build_id = build_id;
        }
    }

    /// Functions planned and not registered since.
    pub fn planned_sites(&self) -> impl Iterator<Item = Addr> + '_ {
        self.planned.keys().copied()
    }

    /// Ends a thread.
    pub fn exit(&mut self, tid: Tid) {
        self.step += 1;
        self.threads.remove(&tid);
    }

    /// A thread, if it exists.
    pub fn thread(&self, tid: Tid) -> Option<&SimThread> {
        self.threads.get(&tid)
    }

    /// A thread, mutably (to mark it running, unreliable or interruptible).
    pub fn thread_mut(&mut self, tid: Tid) -> Option<&mut SimThread> {
        self.threads.get_mut(&tid)
    }

    /// Every thread.
    pub fn all_threads(&self) -> impl Iterator<Item = &SimThread> {
        self.threads.values()
    }

    /// The implementation a call of the function at `func` by `tid` runs now:
    /// the stub's choice for the thread's state, or the original.
    pub fn implementation(&self, tid: Tid, func: Addr) -> Target {
        let state = self
            .threads
            .get(&tid)
            .map(|t| t.state.state)
            .unwrap_or(PatchState::Idle);
        match self.sites.get(&func) {
            Some(site) => site.dispatch.choose(state),
            None => Target::Original,
        }
    }

    /// The thread calls the function at `func` and stays inside it.
    pub fn call(&mut self, tid: Tid, func: Addr) -> Target {
        self.step += 1;
        let target = self.implementation(tid, func);
        let pc = match target {
            Target::Original => func + 1,
            Target::Code(addr) => addr + 1,
        };
        let step = self.step;
        if let Some(t) = self.threads.get_mut(&tid) {
            t.frames.push(Frame {
                func,
                target,
                pc,
                pushed_at: step,
            });
        }
        target
    }

    /// The thread returns from its innermost function.
    pub fn ret(&mut self, tid: Tid) -> Option<Frame> {
        self.step += 1;
        self.threads.get_mut(&tid).and_then(|t| t.frames.pop())
    }

    /// The thread passes a switch point with nothing patched on its stack
    /// (`klp_update_patch_state`): a pending thread takes the target state.
    pub fn update_patch_state(&mut self, tid: Tid) {
        self.step += 1;
        let target = self.target;
        if let Some(t) = self.threads.get_mut(&tid) {
            t.state = t.state.at_switch_point(target);
        }
    }

    /// The redirected functions and what their stubs do.
    pub fn sites(&self) -> &BTreeMap<Addr, SimSite> {
        &self.sites
    }

    /// `klp_target_state` as last published.
    pub fn target_state(&self) -> PatchState {
        self.target
    }

    fn prev_states_of(p: &livepatch_core::PrevStates<'_>) -> Option<Vec<livepatch_core::StateRef>> {
        p.in_transition.then(|| p.states.to_vec())
    }

    fn run_callback(&mut self, id: CallbackId, call: CallbackCall) -> i32 {
        let idx = usize::try_from(id).unwrap_or(usize::MAX);
        let Some(mut f) = self.callbacks.get_mut(idx).and_then(Option::take) else {
            self.contract_violations
                .push(format!("unknown or re-entered callback {id}"));
            return 0;
        };
        let ret = f(self, &call);
        self.callbacks[idx] = Some(f);
        ret
    }
}

impl Platform for World {
    fn is_object_loaded(&mut self, name: &str) -> bool {
        matches!(
            self.module_state(Some(name)),
            ModuleState::Live | ModuleState::Coming
        )
    }

    fn resolve_func(
        &mut self,
        object: Option<&str>,
        name: &str,
        sympos: u64,
    ) -> Result<FuncLocation, ResolveError> {
        let Some(idx) = self.object_index(object) else {
            return Err(ResolveError::NotFound);
        };
        let matches: Vec<&Symbol> = self.objects[idx]
            .symbols
            .iter()
            .filter(|s| s.name == name)
            .collect();
        let sym = match (matches.len(), sympos) {
            (0, _) => return Err(ResolveError::NotFound),
            (1, 0) => matches[0],
            (n, 0) => return Err(ResolveError::Ambiguous { count: n }),
            (n, pos) if pos as usize > n => return Err(ResolveError::PositionNotFound),
            (_, pos) => matches[pos as usize - 1],
        };
        Ok(FuncLocation {
            addr: sym.addr,
            size: sym.size,
        })
    }

    fn func_size(&mut self, addr: Addr) -> Option<u64> {
        self.code
            .range(..=addr)
            .next_back()
            .filter(|(start, (_, size, _))| addr < *start + *size)
            .map(|(_, (_, size, _))| *size)
    }

    fn object_build_id(&mut self, object: Option<&str>) -> Option<Vec<u8>> {
        self.object_index(object)
            .and_then(|i| self.objects[i].build_id.clone())
    }

    type SiteError = SimSiteError;

    fn plan_site(&mut self, func_name: &str, location: FuncLocation) -> Result<(), SimSiteError> {
        if self.faults.unredirectable.contains(func_name) {
            return Err(SimSiteError::TooShort {
                func: func_name.to_string(),
            });
        }
        if !self.sites.contains_key(&location.addr) {
            self.planned.insert(location.addr, location.size);
        }
        Ok(())
    }

    fn register_sites(
        &mut self,
        sites: &[SiteRegistration],
    ) -> Result<(), RegisterError<SimSiteError>> {
        for (index, site) in sites.iter().enumerate() {
            if let Some(errno) = self.faults.register_fails.get(&site.func_name) {
                return Err(RegisterError {
                    index,
                    errno: *errno,
                    error: SimSiteError::Claimed {
                        func: site.func_name.clone(),
                    },
                });
            }
            if self.sites.contains_key(&site.addr) {
                self.contract_violations
                    .push(format!("site {:#x} registered twice", site.addr));
            }
            if self.planned.get(&site.addr) != Some(&site.size) {
                self.contract_violations.push(format!(
                    "site {:#x} ({}) registered without a plan",
                    site.addr, site.func_name
                ));
            }
        }
        for site in sites {
            self.planned.remove(&site.addr);
            self.sites.insert(
                site.addr,
                SimSite {
                    dispatch: site.dispatch,
                    size: site.size,
                },
            );
        }
        Ok(())
    }

    fn unregister_sites(&mut self, addrs: &[Addr]) {
        for addr in addrs {
            if self.sites.remove(addr).is_none() {
                self.contract_violations
                    .push(format!("site {addr:#x} unregistered but not registered"));
            }
        }
    }

    fn update_dispatch(&mut self, addr: Addr, dispatch: Dispatch) {
        match self.sites.get_mut(&addr) {
            Some(site) => site.dispatch = dispatch,
            None => self
                .contract_violations
                .push(format!("dispatch of unregistered site {addr:#x}")),
        }
    }

    fn threads(&mut self) -> Vec<Tid> {
        self.threads.keys().copied().collect()
    }

    fn thread_name(&mut self, tid: Tid) -> String {
        self.threads
            .get(&tid)
            .map(|t| t.name.clone())
            .unwrap_or_default()
    }

    fn thread_state(&mut self, tid: Tid) -> Option<ThreadState> {
        self.threads.get(&tid).map(|t| t.state)
    }

    fn set_thread_state(&mut self, tid: Tid, state: ThreadState) {
        if let Some(t) = self.threads.get_mut(&tid) {
            t.state = state;
        }
    }

    fn set_target_state(&mut self, target: PatchState) {
        self.target = target;
    }

    fn set_new_thread_state(&mut self, state: ThreadState) {
        self.new_thread = state;
    }

    fn try_switch_threads(
        &mut self,
        tids: &[Tid],
        target: PatchState,
        ranges: &[BlockingRange],
    ) -> Vec<SwitchResult> {
        let checked = DisjointRanges::new(ranges);
        let mut violations = Vec::new();
        let results = tids
            .iter()
            .map(|tid| {
                let Some(t) = self.threads.get_mut(tid) else {
                    return SwitchResult::Exited;
                };
                if t.running {
                    return SwitchResult::Running;
                }
                if t.unreliable {
                    return SwitchResult::UnreliableStack;
                }
                match checked.first_hit(t.frames.iter().map(|f| f.pc)) {
                    Some(i) => SwitchResult::Blocked(i as usize),
                    None if t.state == ThreadState::pending_for(target) => {
                        t.state = ThreadState::switched_to(target);
                        SwitchResult::Switched
                    }
                    None => {
                        violations.push(format!(
                            "thread {tid} asked to switch to {target:?} while {:?}",
                            t.state
                        ));
                        SwitchResult::Other(Errno::EINVAL)
                    }
                }
            })
            .collect();
        self.contract_violations.extend(violations);
        results
    }

    fn synchronize_transition(&mut self) {
        self.synchronizations += 1;
    }

    fn signal_threads(&mut self, tids: &[Tid]) {
        self.signals.push(tids.to_vec());
        let target = self.target;
        for tid in tids {
            if let Some(t) = self.threads.get_mut(tid)
                && t.interruptible
                && t.state.pending
            {
                // The system call returns: every frame unwinds and the
                // thread passes the switch point on its way out.
                t.frames.clear();
                t.state = t.state.at_switch_point(target);
            }
        }
    }

    fn call_object_callback(&mut self, call: ObjectCallback<'_>) -> i32 {
        let module_state = self.module_state(call.object);
        let args = CallbackCall::Object {
            kind: call.kind,
            patch: call.patch.to_string(),
            object: call.object.map(str::to_string),
            module_state,
            prev_states: Self::prev_states_of(&call.prev_states),
        };
        self.run_callback(call.callback, args)
    }

    fn call_state_callback(&mut self, call: StateCallback<'_>) -> i32 {
        let args = CallbackCall::State {
            kind: call.kind,
            patch: call.patch.to_string(),
            state_id: call.state_id,
            prev_states: Self::prev_states_of(&call.prev_states),
        };
        self.run_callback(call.callback, args)
    }

    fn log(&mut self, record: LogRecord) {
        self.log.push(LogLine {
            text: record.text,
            level: Some(record.level),
            per_thread: record.per_thread,
        });
    }

    fn now(&mut self) -> Duration {
        self.clock
    }

    fn patch_released(&mut self, patch: &str, forced: bool) {
        self.released.push((patch.to_string(), forced));
    }
}
