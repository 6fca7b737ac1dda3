//! The core's platform on this process: objects from the link map, functions through the
//! x86-64 layer, threads from `/proc/self/task` and their records, callbacks as real calls into
//! the patch libraries. Each method of the trait hands the work to the module that owns it.

#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use livepatch_arch::redirect::{RedirectError, SiteSpec};
use livepatch_arch::signals;
use livepatch_core::{
    Addr, BlockingRange, Dispatch, Errno, FuncLocation, Level, LogRecord, ObjectCallback,
    PatchState, Platform, RegisterError, ResolveError, SiteRegistration, StateCallback,
    SwitchResult, ThreadState, Tid,
};

use crate::callbacks::CallbackScope;
use crate::check::{self, RoundInput};
use crate::library::{HoldsLibraries, PatchLibraries};
use crate::log::AgentLog;
use crate::objects::ProcessObjects;
use crate::sites::Sites;
use crate::threads::{self, published};

/// How long one check round waits for the threads' answers, at least; a round over many
/// threads waits longer (see [`check_deadline`]).
const CHECK_DEADLINE: Duration = Duration::from_millis(20);

/// What each signalled thread adds to a round's wait: on two cores, 10,000 threads take about
/// 100 ms to be woken, run the check and answer; a round cut shorter wastes their work.
const CHECK_DEADLINE_PER_THREAD: Duration = Duration::from_micros(30);

fn check_deadline(threads: usize) -> Duration {
    CHECK_DEADLINE + CHECK_DEADLINE_PER_THREAD * threads.min(1 << 20) as u32
}

/// The core's platform inside this process.
#[derive(Debug)]
pub struct ProcessPlatform {
    pub(crate) log: Arc<AgentLog>,
    pub(crate) callbacks: Arc<CallbackScope>,
    /// The patch libraries loaded.
    pub libraries: PatchLibraries,
    /// The objects of the process.
    pub objects: ProcessObjects,
    sites: Sites,
    started: Instant,
    /// The real-time signal of per-thread checks.
    pub check_signal: i32,
    seen_threads: BTreeSet<Tid>,
    /// The last check round found a thread blocked: the next one also walks stacks precisely.
    walk_stacks: bool,
    /// Functions the core no longer patches whose entries could not be restored yet (a thread
    /// could not be stopped): their stubs run the original code, and the restore is retried.
    pending_restores: BTreeSet<Addr>,
    last_restore_attempt: Option<Instant>,
}

/// How often a failed restore is tried again.
const RESTORE_RETRY: Duration = Duration::from_secs(1);

impl ProcessPlatform {
    /// The platform of this process; the check signal's handler and the stub decision must be
    /// installed already.
    pub fn new(log: Arc<AgentLog>, callbacks: Arc<CallbackScope>, check_signal: i32) -> Self {
        let mut platform = ProcessPlatform {
            log,
            callbacks,
            libraries: PatchLibraries::default(),
            objects: ProcessObjects::new(),
            sites: Sites::default(),
            started: Instant::now(),
            check_signal,
            seen_threads: BTreeSet::new(),
            walk_stacks: false,
            pending_restores: BTreeSet::new(),
            last_restore_attempt: None,
        };
        // Threads that exist before any transition get their records now, IDLE; later ones are
        // recorded at birth by the pthread_create wrapper.
        platform.threads();
        platform
    }

    fn warn(&self, text: std::fmt::Arguments<'_>) {
        self.log.agent(Level::Err, text);
    }

    /// Tries again to restore the entries that could not be restored, at most once per
    /// [`RESTORE_RETRY`].
    pub fn retry_restores(&mut self) {
        if self.pending_restores.is_empty()
            || self
                .last_restore_attempt
                .is_some_and(|at| at.elapsed() < RESTORE_RETRY)
        {
            return;
        }
        self.last_restore_attempt = Some(Instant::now());
        let addresses: Vec<usize> = self.pending_restores.iter().map(|&a| a as usize).collect();
        if livepatch_arch::redirect::restore(&addresses).is_ok() {
            self.pending_restores.clear();
        }
    }

    /// Code a thread runs between a stub and the function it chose: every stub block (stubs
    /// and trampolines, which run the first instructions of the old function) and the agent's
    /// own code (the slow path and the decision). A thread stopped there may have chosen a
    /// version already; it is checked again later, never switched there.
    fn slow_path_code(&mut self) -> Vec<(u64, u64)> {
        let own = Self::new as *const () as usize;
        let agent_code = self.objects.code_of_object_holding(own);
        livepatch_arch::code_memory::arena_ranges()
            .into_iter()
            .chain(agent_code)
            .map(|(start, end)| (start as u64, end as u64))
            .collect()
    }
}

impl HoldsLibraries for ProcessPlatform {
    fn libraries(&mut self) -> &mut PatchLibraries {
        &mut self.libraries
    }
}

fn read_comm(tid: Tid) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_default()
}

impl Platform for ProcessPlatform {
    fn is_object_loaded(&mut self, name: &str) -> bool {
        self.objects.find(name).is_some()
    }

    fn resolve_func(
        &mut self,
        object: Option<&str>,
        name: &str,
        sympos: u64,
    ) -> Result<FuncLocation, ResolveError> {
        let log = self.log.clone();
        self.objects.resolve(
            object.unwrap_or(livepatch_core::MAIN_OBJECT_NAME),
            name,
            sympos,
            |e| log.agent(Level::Err, format_args!("{e}")),
        )
    }

    fn func_size(&mut self, addr: Addr) -> Option<u64> {
        self.objects.func_size(addr)
    }

    fn object_build_id(&mut self, object: Option<&str>) -> Option<Vec<u8>> {
        self.objects
            .find(object.unwrap_or(livepatch_core::MAIN_OBJECT_NAME))?
            .build_id
    }

    type SiteError = RedirectError;

    fn plan_site(&mut self, func_name: &str, location: FuncLocation) -> Result<(), RedirectError> {
        if crate::ffi::interpose::redirected_by_agent(location.addr as usize) {
            return Err(RedirectError::Unpatchable {
                function: func_name.to_owned(),
                reason: livepatch_arch::entry::Unpatchable::HeldByAgent,
            });
        }
        if livepatch_arch::redirect::site(location.addr as usize).is_some() {
            // Another patch redirects it already (the new func joins its stack), or its restore
            // is pending (it is adopted as it is).
            return Ok(());
        }
        let cookie = self.sites.cookie(location.addr);
        self.objects
            .planner()?
            .plan(&SiteSpec {
                name: func_name,
                address: location.addr as usize,
                size: location.size as usize,
                cookie,
            })
            .map(|_| ())
    }

    fn register_sites(
        &mut self,
        sites: &[SiteRegistration],
    ) -> Result<(), RegisterError<RedirectError>> {
        // A function whose restore is pending is still redirected: it only needs its dispatch.
        let addresses: Vec<usize> = sites
            .iter()
            .filter(|s| !self.pending_restores.contains(&s.addr))
            .map(|s| s.addr as usize)
            .collect();
        if let Err(error) = livepatch_arch::redirect::redirect_planned(&addresses) {
            let index = match &error {
                RedirectError::Unpatchable { function, .. } => sites
                    .iter()
                    .position(|s| &s.func_name == function)
                    .unwrap_or(0),
                _ => 0,
            };
            return Err(RegisterError {
                index,
                errno: Errno::EINVAL,
                error,
            });
        }
        for site in sites {
            self.pending_restores.remove(&site.addr);
            self.update_dispatch(site.addr, site.dispatch);
        }
        Ok(())
    }

    fn unregister_sites(&mut self, addrs: &[Addr]) {
        for &addr in addrs {
            self.sites.clear(addr);
        }
        let addresses: Vec<usize> = addrs.iter().map(|&a| a as usize).collect();
        if let Err(e) = livepatch_arch::redirect::restore(&addresses) {
            // The entries still jump to their stubs: send the stubs to the original code, which
            // is what the core asked for, and restore the entries later.
            for &address in &addresses {
                let _ = livepatch_arch::redirect::set_dispatch(
                    address,
                    livepatch_arch::Dispatch::Original,
                );
            }
            self.pending_restores.extend(addrs.iter().copied());
            self.last_restore_attempt = Some(Instant::now());
            self.warn(format_args!(
                "the entries of {} functions stay redirected to their stubs, which run the original code, until they can be restored: {e}",
                addrs.len()
            ));
        }
    }

    fn update_dispatch(&mut self, addr: Addr, dispatch: Dispatch) {
        if let Err(e) = self.sites.publish(addr, dispatch) {
            self.warn(format_args!("{e}"));
        }
    }

    fn threads(&mut self) -> Vec<Tid> {
        let mut tids = Vec::new();
        signals::TaskListing::new().for_each_tid(|t| tids.push(t as Tid));
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
        published::set_target(target);
    }

    fn set_new_thread_state(&mut self, state: ThreadState) {
        published::set_new_threads(state);
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
        let input = RoundInput {
            ranges,
            stacks,
            no_switch_code: self.slow_path_code(),
            // Only after a round found a blocked thread: the scan alone clears idle threads, and
            // the walk is there to clear threads that the scan blocks on a stale word. Rebuilt
            // only when an object's unwind sections changed.
            unwinder: self.walk_stacks.then(livepatch_arch::unwind::current),
        };
        let pid = signals::getpid();
        let signal = self.check_signal;
        let results = check::check_round(tids, target, input, check_deadline(tids.len()), |tid| {
            signals::tgkill(pid, tid, signal)
        });
        self.walk_stacks = results
            .iter()
            .any(|r| matches!(r, SwitchResult::Blocked(_)));
        results
    }

    fn synchronize_transition(&mut self) {
        // Listed now: a thread born since the last listing may be in a slow path too.
        let tids = self.threads();
        if let Err(late) = threads::synchronize(&tids) {
            self.log.core(&livepatch_core::log::warning(&format!(
                "synchronize_transition: {late}; going on without it"
            )));
        }
    }

    fn signal_threads(&mut self, _tids: &[Tid]) {
        // Every check already interrupts the thread with a signal; there is no sleep to end.
    }

    fn call_object_callback(&mut self, call: ObjectCallback<'_>) -> i32 {
        self.callbacks.run_object(&self.libraries, call)
    }

    fn call_state_callback(&mut self, call: StateCallback<'_>) -> i32 {
        self.callbacks.run_state(&self.libraries, call)
    }

    fn log(&mut self, record: LogRecord) {
        self.log.core(&record);
    }

    fn now(&mut self) -> Duration {
        self.started.elapsed()
    }

    fn patch_released(&mut self, patch: &str, forced: bool) {
        self.libraries.released(patch, forced);
    }
}
