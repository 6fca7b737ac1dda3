//! The core's platform on real things: objects from the link map, functions through the x86-64
//! layer, threads from /proc/self/task, callbacks as real calls into the patch libraries.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use livepatch_arch::maps::Mapping;
use livepatch_arch::objects::{self, LoadedObject};
use livepatch_arch::redirect::{self, SiteSpec};
use livepatch_arch::symbols::{SymbolError, SymbolTable};
use livepatch_core::{
    Addr, BlockReason, BlockingRange, Dispatch, FuncLocation, LogRecord, MAIN_OBJECT_NAME,
    ObjectCallback, ObjectCallbackKind, PatchState, Platform, ResolveError, SiteError,
    SiteRegistration, StateCallback, StateCallbackKind, SwitchResult, Target, ThreadState, Tid,
};

use crate::abi::{self, BuildIdRequirement, KlpPatch, KlpState};
use crate::log::AgentLog;
use crate::threads;

/// Environment variable choosing the real-time signal of per-thread checks; the next signal
/// stops the world for code writes.
pub const SIGNAL_ENV: &str = "LIVEPATCH_SIGNAL";

/// How long one check round waits for the threads' answers, at least; a round over many
/// threads waits longer (see [`check_deadline`]).
const CHECK_DEADLINE: Duration = Duration::from_millis(20);

/// What each signalled thread adds to a round's wait: on two cores, 10,000 threads take about
/// 100 ms to be woken, run the check and answer; a round cut shorter wastes their work.
const CHECK_DEADLINE_PER_THREAD: Duration = Duration::from_micros(30);

fn check_deadline(threads: usize) -> Duration {
    CHECK_DEADLINE + CHECK_DEADLINE_PER_THREAD * threads.min(1 << 20) as u32
}

/// What a redirected function's slow path reads: the kernel handler's inputs for one site.
/// Never freed (a thread may be reading it); reused for the same address.
#[derive(Debug)]
struct SiteDispatch {
    /// Top func's target, 0 for the original.
    top: AtomicUsize,
    /// Target below the top, 0 for the original.
    previous: AtomicUsize,
}

fn target_address(target: Target) -> usize {
    match target {
        Target::Original => 0,
        Target::Code(address) => address as usize,
    }
}

/// The stub's decision for a site in transition, on the calling thread: the previous func for
/// a thread still UNPATCHED, the top otherwise. A pending thread whose callers are clean switches
/// first: entering a function is its switch point, so a thread that calls patched functions
/// back to back, and is never found outside them by a signal, still switches.
extern "C" fn decide(cookie: u64, entry_sp: usize) -> usize {
    // SAFETY: cookies are addresses of leaked `SiteDispatch` records (see `site_dispatch`).
    let site = unsafe { &*(cookie as *const SiteDispatch) };
    threads::set_in_slow_path(true);
    threads::switch_at_entry(entry_sp as u64);
    let target = if threads::current_state() == PatchState::Unpatched {
        site.previous.load(Ordering::Acquire)
    } else {
        site.top.load(Ordering::Acquire)
    };
    threads::set_in_slow_path(false);
    target
}

extern "C" fn on_check_signal(_: libc::c_int, _: *mut libc::siginfo_t, context: *mut libc::c_void) {
    let saved = livepatch_arch::signals::errno();
    // SAFETY: `context` is the ucontext the kernel passed to this SA_SIGINFO handler.
    unsafe { threads::handle_check_signal(context) };
    livepatch_arch::signals::set_errno(saved);
}

/// The state pointers a running callback may ask for with `klp_get_prev_state`.
struct CallbackContext {
    in_transition: bool,
    states: Vec<(u64, usize)>,
}

static CALLBACK_CONTEXT: Mutex<Option<CallbackContext>> = Mutex::new(None);
static CALLBACK_TID: AtomicI32 = AtomicI32::new(0);

/// `klp_get_prev_state` from inside a callback the agent is running on its control thread:
/// answered from the states the core handed the callback (the core is busy and locked).
/// `None` when the caller is not such a callback.
pub fn prev_state_in_callback(id: u64) -> Option<*mut KlpState> {
    if CALLBACK_TID.load(Ordering::SeqCst) != threads::gettid() {
        return None;
    }
    let context = CALLBACK_CONTEXT.lock().unwrap_or_else(|e| e.into_inner());
    let context = context.as_ref()?;
    if !context.in_transition {
        if let Some(agent) = crate::runtime::agent() {
            agent
                .log
                .agent("warning", "klp_get_prev_state called outside a transition");
        }
        return Some(std::ptr::null_mut());
    }
    Some(
        context
            .states
            .iter()
            .find(|(sid, _)| *sid == id)
            .map_or(std::ptr::null_mut(), |&(_, p)| p as *mut KlpState),
    )
}

/// The core's platform inside this process.
#[derive(Debug)]
pub struct ProcessPlatform {
    log: &'static AgentLog,
    started: Instant,
    check_signal: i32,
    /// Objects the core knows about, by the name patches use.
    known: BTreeSet<String>,
    symbol_tables: HashMap<PathBuf, Arc<SymbolTable>>,
    dispatch: BTreeMap<Addr, &'static SiteDispatch>,
    patches: BTreeMap<String, usize>,
    released: Vec<(String, bool)>,
    seen_threads: BTreeSet<Tid>,
    /// Build ids that patches require, by patch.
    build_ids: BTreeMap<String, Vec<BuildIdRequirement>>,
    snapshot: Snapshot,
    /// The last check round found a thread blocked: the next one also walks stacks precisely.
    walk_stacks: bool,
}

/// The link map and the memory map, read at most once per request: the core resolves and
/// checks every function of a patch, and re-reading both per function made a 10,000-function
/// patch spend most of its time in `dl_iterate_phdr` and `/proc/self/maps`.
#[derive(Debug, Default)]
struct Snapshot {
    objects: Option<Vec<LoadedObject>>,
    maps: Option<Vec<Mapping>>,
}

/// The name patches use for an object: `vmlinux` for the main program, else the file name.
fn object_name(object: &LoadedObject) -> Option<String> {
    if object.is_main {
        return Some(MAIN_OBJECT_NAME.to_string());
    }
    object.file_name()
}

impl ProcessPlatform {
    /// Installs the signal handlers and the stub decision; refuses when the chosen signals are
    /// taken by the program.
    pub fn new(log: &'static AgentLog) -> Result<Self, String> {
        let check_signal = match std::env::var(SIGNAL_ENV) {
            Ok(text) => text
                .trim()
                .parse::<i32>()
                .map_err(|_| format!("{SIGNAL_ENV}={text}: not a signal number"))?,
            Err(_) => libc::SIGRTMIN() + 8,
        };
        if check_signal + 1 > libc::SIGRTMAX() {
            return Err(format!(
                "{SIGNAL_ENV}={check_signal}: the agent needs this signal and the next, both real-time (up to {})",
                libc::SIGRTMAX()
            ));
        }
        livepatch_arch::signals::install_handler(check_signal, on_check_signal)
            .map_err(|e| e.to_string())?;
        livepatch_arch::install_stop_signal(check_signal + 1).map_err(|e| e.to_string())?;
        redirect::set_decider(decide);
        let known = objects::loaded_objects()
            .iter()
            .filter_map(object_name)
            .collect();
        let mut platform = Self {
            log,
            started: Instant::now(),
            check_signal,
            known,
            symbol_tables: HashMap::new(),
            dispatch: BTreeMap::new(),
            patches: BTreeMap::new(),
            released: Vec::new(),
            seen_threads: BTreeSet::new(),
            build_ids: BTreeMap::new(),
            snapshot: Snapshot::default(),
            walk_stacks: false,
        };
        // Threads that exist before any transition get their records now, IDLE; later ones are
        // recorded at birth by the pthread_create wrapper.
        platform.threads();
        Ok(platform)
    }

    /// Forgets the link map and memory map read for the previous request; call it whenever
    /// either may have changed (a new request, a library loaded or closed).
    pub fn refresh(&mut self) {
        self.snapshot = Snapshot::default();
    }

    fn loaded_objects(&mut self) -> &[LoadedObject] {
        self.snapshot
            .objects
            .get_or_insert_with(objects::loaded_objects)
    }

    fn memory_maps(&mut self) -> Result<&[Mapping], String> {
        if self.snapshot.maps.is_none() {
            self.snapshot.maps = Some(livepatch_arch::maps::read().map_err(|e| e.to_string())?);
        }
        Ok(self.snapshot.maps.as_deref().unwrap_or_default())
    }

    fn find_object(&mut self, name: &str) -> Option<LoadedObject> {
        self.loaded_objects()
            .iter()
            .find(|o| object_name(o).as_deref() == Some(name))
            .cloned()
    }

    fn table(&mut self, object: &LoadedObject) -> Result<Arc<SymbolTable>, SymbolError> {
        let path = object.path.clone().ok_or_else(|| SymbolError::Unreadable {
            path: object.link_name.clone(),
            reason: "the object has no file".into(),
        })?;
        if let Some(table) = self.symbol_tables.get(&path) {
            return Ok(table.clone());
        }
        let table = Arc::new(SymbolTable::read(&path)?);
        self.symbol_tables.insert(path, table.clone());
        Ok(table)
    }

    /// Libraries that left the link map and ones that entered it since the core last heard.
    pub fn object_changes(&mut self) -> (Vec<String>, Vec<String>) {
        self.refresh();
        let now: BTreeSet<String> = self
            .loaded_objects()
            .iter()
            .filter_map(object_name)
            .collect();
        let gone = self.known.difference(&now).cloned().collect();
        let new = now.difference(&self.known).cloned().collect();
        (gone, new)
    }

    /// The core handled the object's going path.
    pub fn object_gone(&mut self, name: &str) {
        self.known.remove(name);
        self.symbol_tables
            .retain(|path, _| path.file_name().is_none_or(|f| f.to_string_lossy() != name));
    }

    /// The core handled the object's coming path.
    pub fn object_known(&mut self, name: &str) {
        self.known.insert(name.to_string());
    }

    /// Checks the build ids a patch names against the objects loaded now; objects loaded later
    /// are checked when they come (see [`Self::check_coming_build_id`]).
    pub fn check_build_ids(&mut self, required: &[BuildIdRequirement]) -> Result<(), String> {
        for requirement in required {
            if let Some(object) = self.find_object(&requirement.object) {
                build_id_matches(&object, requirement)?;
            }
        }
        Ok(())
    }

    /// Refuses a library that is loading when an active patch was written for another build.
    pub fn check_coming_build_id(
        &mut self,
        name: &str,
        active_patches: &BTreeSet<String>,
    ) -> Result<(), String> {
        let Some(object) = self.find_object(name) else {
            return Ok(());
        };
        for (patch, required) in &self.build_ids {
            if !active_patches.contains(patch) {
                continue;
            }
            for requirement in required.iter().filter(|r| r.object == name) {
                build_id_matches(&object, requirement)
                    .map_err(|e| format!("patch '{patch}': {e}"))?;
            }
        }
        Ok(())
    }

    /// Remembers the declaration of a patch, for callbacks, and the build ids it requires.
    pub fn declare_patch(
        &mut self,
        name: &str,
        declaration: *const KlpPatch,
        build_ids: Vec<BuildIdRequirement>,
    ) {
        self.patches.insert(name.to_string(), declaration as usize);
        self.build_ids.insert(name.to_string(), build_ids);
    }

    /// Forgets a patch whose library is closed.
    pub fn forget_patch(&mut self, name: &str) {
        self.patches.remove(name);
        self.build_ids.remove(name);
    }

    /// Patches the core released since the last call, with their forced flag.
    pub fn take_released(&mut self) -> Vec<(String, bool)> {
        std::mem::take(&mut self.released)
    }

    /// What `status` says about a blocked thread.
    pub fn describe_block(&self, tid: Tid, reason: &BlockReason) -> String {
        match reason {
            BlockReason::SleepingOn(function) => function.clone(),
            BlockReason::Running
                if livepatch_arch::signals::signal_held_blocked(tid, self.check_signal) =>
            {
                format!(
                    "(blocks signal {}: switches at klp_update_patch_state)",
                    self.check_signal
                )
            }
            BlockReason::Running => "(running: did not answer the check)".into(),
            BlockReason::UnreliableStack => "(stack could not be checked)".into(),
            BlockReason::Error(errno) => format!("(error {errno:?})"),
        }
    }

    fn declaration(&self, patch: &str) -> *mut KlpPatch {
        self.patches
            .get(patch)
            .map_or(std::ptr::null_mut(), |&p| p as *mut KlpPatch)
    }

    fn with_callback_context<R>(
        &mut self,
        prev: livepatch_core::PrevStates<'_>,
        call: impl FnOnce() -> R,
    ) -> R {
        let states = prev
            .states
            .iter()
            .filter_map(|s| {
                let decl = self.declaration(&s.patch);
                // SAFETY: `index` is a state index of that declared, still loaded patch.
                (!decl.is_null()).then(|| (s.id, unsafe { abi::state_ptr(decl, s.index) } as usize))
            })
            .collect();
        *CALLBACK_CONTEXT.lock().unwrap_or_else(|e| e.into_inner()) = Some(CallbackContext {
            in_transition: prev.in_transition,
            states,
        });
        CALLBACK_TID.store(threads::gettid(), Ordering::SeqCst);
        let result = call();
        CALLBACK_TID.store(0, Ordering::SeqCst);
        *CALLBACK_CONTEXT.lock().unwrap_or_else(|e| e.into_inner()) = None;
        result
    }

    /// Code a thread runs between a stub and the function it chose: every stub block (stubs
    /// and trampolines, which run the first instructions of the old function) and the agent's
    /// own code (the slow path and the decision). A thread stopped there may have chosen a
    /// version already; it is checked again later, never switched there.
    fn slow_path_code(&mut self) -> Vec<(u64, u64)> {
        let own = decide as *const () as usize;
        let agent_code: Vec<(usize, usize)> = self
            .loaded_objects()
            .iter()
            .find(|o| o.contains_code(own))
            .map(|o| o.code_ranges.clone())
            .unwrap_or_default();
        livepatch_arch::code_memory::arena_ranges()
            .into_iter()
            .chain(agent_code)
            .map(|(start, end)| (start as u64, end as u64))
            .collect()
    }

    fn site_dispatch(&mut self, address: Addr) -> &'static SiteDispatch {
        self.dispatch.entry(address).or_insert_with(|| {
            Box::leak(Box::new(SiteDispatch {
                top: AtomicUsize::new(0),
                previous: AtomicUsize::new(0),
            }))
        })
    }

    fn apply_dispatch(&mut self, address: Addr, dispatch: Dispatch) {
        let site = self.site_dispatch(address);
        site.top
            .store(target_address(dispatch.top), Ordering::Release);
        site.previous
            .store(target_address(dispatch.previous), Ordering::Release);
        let arch_dispatch = if dispatch.transition {
            redirect::Dispatch::Decide
        } else {
            match dispatch.top {
                Target::Original => redirect::Dispatch::Original,
                Target::Code(code) => redirect::Dispatch::Jump(code as usize),
            }
        };
        if let Err(e) = redirect::set_dispatch(address as usize, arch_dispatch) {
            self.log.agent("error", &format!("livepatch: {e}"));
        }
    }
}

fn build_id_matches(object: &LoadedObject, requirement: &BuildIdRequirement) -> Result<(), String> {
    match object.build_id_hex() {
        Some(actual) if actual == requirement.build_id => Ok(()),
        Some(actual) => Err(format!(
            "object '{}' has build id {actual}, but the patch was written for build id {}",
            requirement.object, requirement.build_id
        )),
        None => Err(format!(
            "object '{}' has no build id, but the patch was written for build id {}",
            requirement.object, requirement.build_id
        )),
    }
}

fn read_comm(tid: Tid) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_default()
}

impl Platform for ProcessPlatform {
    fn is_object_loaded(&mut self, name: &str) -> bool {
        self.find_object(name).is_some()
    }

    fn resolve_func(
        &mut self,
        object: Option<&str>,
        name: &str,
        sympos: u64,
    ) -> Result<FuncLocation, ResolveError> {
        let object_name = object.unwrap_or(MAIN_OBJECT_NAME);
        let object = self
            .find_object(object_name)
            .ok_or(ResolveError::NotFound)?;
        let table = self.table(&object).map_err(|e| {
            self.log.agent("error", &format!("livepatch: {e}"));
            ResolveError::NotFound
        })?;
        let symbol = table.lookup(name, sympos).map_err(|e| match e {
            SymbolError::Ambiguous { count, .. } => ResolveError::Ambiguous { count },
            SymbolError::PositionNotFound { .. } => ResolveError::PositionNotFound,
            _ => ResolveError::NotFound,
        })?;
        if symbol.size == 0 {
            return Err(ResolveError::NoSize);
        }
        Ok(FuncLocation {
            addr: (object.bias as u64).wrapping_add(symbol.address),
            size: symbol.size,
        })
    }

    fn func_size(&mut self, addr: Addr) -> Option<u64> {
        let object = self
            .loaded_objects()
            .iter()
            .find(|o| o.contains_code(addr as usize))?
            .clone();
        let table = self.table(&object).ok()?;
        let (symbol, offset) = table.containing(addr.wrapping_sub(object.bias as u64))?;
        (offset == 0 && symbol.size > 0).then_some(symbol.size)
    }

    fn check_redirectable(
        &mut self,
        func_name: &str,
        location: FuncLocation,
    ) -> Result<(), String> {
        if redirect::site(location.addr as usize).is_some() {
            // Another patch redirects it already: the new func joins its stack.
            return Ok(());
        }
        let maps = self.memory_maps()?;
        redirect::check(
            &SiteSpec {
                name: func_name,
                address: location.addr as usize,
                size: location.size as usize,
                cookie: 0,
            },
            maps,
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    fn register_sites(&mut self, sites: &[SiteRegistration]) -> Result<(), SiteError> {
        let cookies: Vec<u64> = sites
            .iter()
            .map(|s| self.site_dispatch(s.addr) as *const SiteDispatch as u64)
            .collect();
        let specs: Vec<SiteSpec<'_>> = sites
            .iter()
            .zip(&cookies)
            .map(|(s, &cookie)| SiteSpec {
                name: &s.func_name,
                address: s.addr as usize,
                size: s.size as usize,
                cookie,
            })
            .collect();
        if let Err(e) = redirect::redirect(&specs) {
            let index = match &e {
                livepatch_arch::RedirectError::Unpatchable { function, .. } => sites
                    .iter()
                    .position(|s| &s.func_name == function)
                    .unwrap_or(0),
                _ => 0,
            };
            return Err(SiteError {
                index,
                errno: livepatch_core::Errno::EINVAL,
                reason: e.to_string(),
            });
        }
        for site in sites {
            self.apply_dispatch(site.addr, site.dispatch);
        }
        Ok(())
    }

    fn unregister_sites(&mut self, addrs: &[Addr]) {
        // A thread that entered a stub just before the restore may still be on its way to the
        // decision: it must find the original function, not the last target.
        for &addr in addrs {
            let site = self.site_dispatch(addr);
            site.top.store(0, Ordering::Release);
            site.previous.store(0, Ordering::Release);
        }
        let addresses: Vec<usize> = addrs.iter().map(|&a| a as usize).collect();
        if let Err(e) = redirect::restore(&addresses) {
            self.log.agent("error", &format!("livepatch: {e}"));
        }
    }

    fn update_dispatch(&mut self, addr: Addr, dispatch: Dispatch) {
        self.apply_dispatch(addr, dispatch);
    }

    fn threads(&mut self) -> Vec<Tid> {
        let mut tids = Vec::new();
        livepatch_arch::signals::TaskListing::new().for_each_tid(|t| tids.push(t as Tid));
        tids.sort_unstable();
        let now: BTreeSet<Tid> = tids.iter().copied().collect();
        for gone in self.seen_threads.difference(&now) {
            threads::forget(*gone);
        }
        for &tid in &tids {
            threads::prepare(tid);
            threads::register(tid);
        }
        self.seen_threads = now;
        tids
    }

    fn thread_name(&mut self, tid: Tid) -> String {
        read_comm(tid)
    }

    fn thread_state(&mut self, tid: Tid) -> Option<ThreadState> {
        threads::register(tid);
        threads::state_of(tid)
    }

    fn set_thread_state(&mut self, tid: Tid, state: ThreadState) {
        threads::set_state(tid, |_| state);
    }

    fn set_target_state(&mut self, target: PatchState) {
        threads::set_target(target);
    }

    fn set_new_thread_state(&mut self, state: ThreadState) {
        threads::set_new_thread_state(state);
    }

    fn try_switch_threads(
        &mut self,
        tids: &[Tid],
        target: PatchState,
        ranges: &[BlockingRange],
    ) -> Vec<SwitchResult> {
        let stacks = livepatch_arch::maps::read()
            .map(|maps| {
                maps.iter()
                    .filter(|m| m.prot & libc::PROT_WRITE != 0)
                    .map(|m| (m.start as u64, m.end as u64))
                    .collect()
            })
            .unwrap_or_default();
        let input = threads::RoundInput {
            ranges: ranges.iter().map(|r| (r.start, r.start + r.size)).collect(),
            stacks,
            unsafe_pcs: self.slow_path_code(),
            // Only after a round found a blocked thread: the scan alone clears idle threads, and
            // the walk is there to clear threads that the scan blocks on a stale word. Rebuilt
            // only when an object's unwind sections changed; it reads the link map itself
            // because it copies the sections under the dynamic linker's lock.
            unwinder: self.walk_stacks.then(crate::unwind::current),
        };
        let pid = std::process::id() as i32;
        let signal = self.check_signal;
        let results =
            threads::check_round(tids, target, input, check_deadline(tids.len()), |tid| {
                livepatch_arch::signals::tgkill(pid, tid, signal)
            });
        self.walk_stacks = results
            .iter()
            .any(|r| matches!(r, SwitchResult::Blocked(_)));
        results
    }

    fn synchronize_transition(&mut self) {
        let tids: Vec<Tid> = self.seen_threads.iter().copied().collect();
        threads::synchronize(&tids);
    }

    fn signal_threads(&mut self, _tids: &[Tid]) {
        // Every check already interrupts the thread with a signal; there is no sleep to end.
    }

    fn call_object_callback(&mut self, call: ObjectCallback<'_>) -> i32 {
        let decl = self.declaration(call.patch);
        if decl.is_null() {
            return 0;
        }
        // SAFETY: `object_index` is an object of that declared, still loaded patch.
        let object = unsafe { abi::object_ptr(decl, call.object_index) };
        let function = call.callback as usize;
        self.with_callback_context(call.prev_states, || match call.kind {
            ObjectCallbackKind::PrePatch => {
                // SAFETY: the core hands back the pre_patch pointer read from this patch.
                let f: abi::ObjectCallbackFn = unsafe { std::mem::transmute(function) };
                // SAFETY: a C callback of the patch library, called as livepatch.h declares.
                unsafe { f(object) }
            }
            _ => {
                // SAFETY: the other object callbacks return nothing.
                let f: abi::ObjectVoidCallbackFn = unsafe { std::mem::transmute(function) };
                // SAFETY: as above.
                unsafe { f(object) };
                0
            }
        })
    }

    fn call_state_callback(&mut self, call: StateCallback<'_>) -> i32 {
        let decl = self.declaration(call.patch);
        if decl.is_null() {
            return 0;
        }
        // SAFETY: `state_index` is a state of that declared, still loaded patch.
        let state = unsafe { abi::state_ptr(decl, call.state_index) };
        let function = call.callback as usize;
        self.with_callback_context(call.prev_states, || match call.kind {
            StateCallbackKind::Setup => {
                // SAFETY: the core hands back the setup pointer read from this patch.
                let f: abi::StateCallbackFn = unsafe { std::mem::transmute(function) };
                // SAFETY: a C callback of the patch library, called as livepatch.h declares.
                unsafe { f(decl, state) }
            }
            _ => {
                // SAFETY: the other state callbacks return nothing.
                let f: abi::StateVoidCallbackFn = unsafe { std::mem::transmute(function) };
                // SAFETY: as above.
                unsafe { f(decl, state) };
                0
            }
        })
    }

    fn log(&mut self, record: LogRecord) {
        self.log.core(&record);
    }

    fn now(&mut self) -> Duration {
        self.started.elapsed()
    }

    fn patch_released(&mut self, patch: &str, forced: bool) {
        self.released.push((patch.to_string(), forced));
    }
}
