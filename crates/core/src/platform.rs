//! The one trait through which the core touches the world.
//!
//! The core decides; a platform acts. Everything that can refuse a patch is asked before
//! anything changes: symbols, build ids and a plan for every function's redirection
//! ([`Platform::plan_site`]: entry analysis, relocation, stub memory within reach), so that a
//! refusal comes before the first callback runs, and registration consumes the plans. The simulator (`livepatch-sim`) and the
//! in-process agent implement the same trait, and nothing else crosses from
//! the core to the world. Every method says what it must do, what it may
//! assume and what the core does with the answer, in the manner of a sink
//! contract: a platform that keeps these promises gets the kernel's semantics.
//!
//! The calls map onto the kernel's interfaces:
//!
//! | kernel                                   | here                                      |
//! |------------------------------------------|-------------------------------------------|
//! | `klp_find_object_module`, `mod->klp_alive` | [`Platform::is_object_loaded`]          |
//! | the module's build id (not in the kernel) | [`Platform::object_build_id`]            |
//! | `klp_find_object_symbol`, kallsyms sizes | [`Platform::resolve_func`], [`Platform::func_size`] |
//! | ftrace location lookup, `ftrace_set_filter_ip` | [`Platform::plan_site`]             |
//! | `register_ftrace_function` / unregister  | [`Platform::register_sites`], [`Platform::unregister_sites`] |
//! | `klp_ops.func_stack` as the handler sees it | [`Platform::update_dispatch`]          |
//! | `task->patch_state`, `TIF_PATCH_PENDING` | [`Platform::threads`], [`Platform::thread_state`], [`Platform::set_thread_state`] |
//! | `klp_target_state`                       | [`Platform::set_target_state`]            |
//! | `klp_copy_process`                       | [`Platform::set_new_thread_state`]        |
//! | `klp_try_switch_task`                    | [`Platform::try_switch_threads`]          |
//! | `klp_synchronize_transition`             | [`Platform::synchronize_transition`]      |
//! | `klp_send_signals`                       | [`Platform::signal_threads`]              |
//! | callbacks of `klp_callbacks`, state callbacks | [`Platform::call_object_callback`], [`Platform::call_state_callback`] |
//! | `printk`                                 | [`Platform::log`]                         |
//! | `jiffies` for the retry work             | [`Platform::now`]                         |
//! | `module_put` in `klp_free_patch_finish`  | [`Platform::patch_released`]              |

use std::time::Duration;

use std::fmt;

use crate::func_stack::Dispatch;
use crate::log::LogRecord;
use crate::ranges::BlockingRange;
use crate::state::PrevStates;
use crate::thread_state::{PatchState, ThreadState};
use crate::{Addr, CallbackId, Tid};

/// Where a function lives in the process, as symbol resolution found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FuncLocation {
    /// The address of the function's entry.
    pub addr: Addr,
    /// The symbol size in bytes (`st_size`).
    pub size: u64,
}

/// Why a function could not be resolved; each maps to one kernel line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResolveError {
    /// No symbol of that name in the object
    /// ("symbol '%s' not found in symbol table").
    NotFound,
    /// `old_sympos` is 0 but the name occurs `count` times
    /// ("unresolvable ambiguity for symbol '%s' in object '%s'").
    Ambiguous {
        /// How many symbols carry the name.
        count: usize,
    },
    /// `old_sympos` is larger than the number of symbols of that name
    /// ("symbol position %lu for symbol '%s' in object '%s' not found").
    PositionNotFound,
    /// The symbol has no size ("kallsyms size lookup failed for '%s'").
    NoSize,
}

/// One function whose entry must start going through its dispatch stub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteRegistration {
    /// The function's name, for error messages.
    pub func_name: String,
    /// The function's entry address.
    pub addr: Addr,
    /// The symbol size of the function.
    pub size: u64,
    /// What the stub must do from the first call on.
    pub dispatch: Dispatch,
}

/// Why registering a batch of sites failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterError<E> {
    /// Index into the batch of the site that could not be registered.
    pub index: usize,
    /// The error number, printed as `(%d)` in "failed to register ftrace
    /// handler for function '%s' (%d)".
    pub errno: crate::Errno,
    /// What went wrong, for people.
    pub error: E,
}

/// What a platform found when it tried to switch one thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SwitchResult {
    /// The thread was clean and now has the target state, pending cleared.
    Switched,
    /// The thread no longer exists; it counts as switched.
    Exited,
    /// The thread is running and could not be examined (`-EBUSY`): for the
    /// agent, it did not answer the check request before the deadline, for
    /// example because it blocks the check signal.
    Running,
    /// The stack could not be walked reliably (`-EINVAL`).
    UnreliableStack,
    /// A forbidden range is on the stack (`-EADDRINUSE`): the index of the
    /// first matching range in the order they were given.
    Blocked(usize),
    /// Anything else, with its error number.
    Other(crate::Errno),
}

/// A per-object callback to run, with everything needed to find the
/// patch author's function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectCallback<'a> {
    /// Which of the four callbacks.
    pub kind: ObjectCallbackKind,
    /// The platform's handle for the function to call.
    pub callback: CallbackId,
    /// The patch's name.
    pub patch: &'a str,
    /// The object's name; `None` is the main executable.
    pub object: Option<&'a str>,
    /// Index of the object in the patch descriptor's `objs`.
    pub object_index: usize,
    /// What `klp_get_prev_state` answers while the callback runs.
    pub prev_states: PrevStates<'a>,
}

/// The four per-object callbacks of `struct klp_callbacks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ObjectCallbackKind {
    /// Before the object is patched; may fail.
    PrePatch,
    /// After the patching transition of the object completed.
    PostPatch,
    /// Before the object is unpatched.
    PreUnpatch,
    /// After the unpatching transition completed.
    PostUnpatch,
}

/// A per-state callback to run (seed 004).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateCallback<'a> {
    /// Which of the four callbacks.
    pub kind: StateCallbackKind,
    /// The platform's handle for the function to call.
    pub callback: CallbackId,
    /// The name of the patch whose state this is (the old patch's for an
    /// obsolete state).
    pub patch: &'a str,
    /// The state's id.
    pub state_id: u64,
    /// Index of the state in that patch descriptor's `states`.
    pub state_index: usize,
    /// What `klp_get_prev_state` answers while the callback runs.
    pub prev_states: PrevStates<'a>,
}

/// The four per-state callbacks of `struct klp_state_callbacks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StateCallbackKind {
    /// Before patching, when the state is new; may fail.
    Setup,
    /// After the patching transition, when the state is new.
    Enable,
    /// Before unpatching, or before an obsolete state is replaced away.
    Disable,
    /// After unpatching or replacement, when setup had succeeded.
    Release,
}

/// What the core needs from the process it patches.
///
/// Calls happen from one thread at a time (the kernel's `klp_mutex`); a
/// platform whose threads change state on their own (the agent's threads
/// switch themselves in a signal handler) must make those changes atomic
/// with respect to these calls.
pub trait Platform {
    /// Whether the shared object `name` is loaded and may be patched now.
    /// The main executable is always loaded and is never asked about.
    fn is_object_loaded(&mut self, name: &str) -> bool;

    /// Resolves `name` in `object` (`None`: the main executable) with the
    /// kernel's `old_sympos` rule: 0 requires a unique name, N picks the Nth
    /// symbol of that name in symbol-table order. Called only for loaded
    /// objects, before anything changes.
    fn resolve_func(
        &mut self,
        object: Option<&str>,
        name: &str,
        sympos: u64,
    ) -> Result<FuncLocation, ResolveError>;

    /// The symbol size of the code at `addr` (a replacement function), or
    /// `None` when no symbol covers it.
    fn func_size(&mut self, addr: Addr) -> Option<u64>;

    /// The GNU build id of a loaded object (`None`: the main executable), or `None` when it
    /// has none. Asked when a patch names the build it was written for.
    fn object_build_id(&mut self, object: Option<&str>) -> Option<Vec<u8>>;

    /// What a platform says when a function cannot be redirected, for people.
    type SiteError: fmt::Display;

    /// Decides everything the redirection of the function at `location` needs (how its entry
    /// is redirected, the relocation of its first instructions, stub memory within reach) and
    /// keeps it for [`Platform::register_sites`]; `Err` says why the function cannot be
    /// redirected. Called while validating, before any callback runs, for every func of a
    /// loaded object, including functions another patch redirects already (nothing to plan
    /// then). Changes nothing the program can observe.
    fn plan_site(&mut self, func_name: &str, location: FuncLocation)
    -> Result<(), Self::SiteError>;

    /// Makes every function in `sites` enter its dispatch stub, all or none, each as
    /// [`Platform::plan_site`] planned it. On success each site dispatches as its registration
    /// says; on error no site changed and the error names the first one that failed. A
    /// platform fails here only for what no plan can foresee (a thread that cannot be stopped
    /// for the write), never for a reason `plan_site` could have found.
    fn register_sites(
        &mut self,
        sites: &[SiteRegistration],
    ) -> Result<(), RegisterError<Self::SiteError>>;

    /// Restores the original entries of `addrs`, all registered earlier. Code
    /// a thread may still execute (stubs, trampolines) must stay mapped.
    fn unregister_sites(&mut self, addrs: &[Addr]);

    /// Publishes what the stub at `addr` must do from now on. The platform
    /// must make the change visible to other threads in call order: the core
    /// relies on thread states written before a dispatch being seen by a
    /// thread that sees the dispatch.
    fn update_dispatch(&mut self, addr: Addr, dispatch: Dispatch);

    /// The threads of the process now, in a stable order.
    fn threads(&mut self) -> Vec<Tid>;

    /// A thread's name (`comm`), for log lines.
    fn thread_name(&mut self, tid: Tid) -> String;

    /// A thread's state and pending flag; `None` if it has exited.
    fn thread_state(&mut self, tid: Tid) -> Option<ThreadState>;

    /// Sets a thread's state and pending flag (ignored for exited threads).
    fn set_thread_state(&mut self, tid: Tid, state: ThreadState);

    /// Publishes `klp_target_state`: the state a pending thread takes when
    /// it reaches a switch point (`klp_update_patch_state`).
    fn set_target_state(&mut self, target: PatchState);

    /// The state a thread created from now on starts with (the kernel's
    /// `klp_copy_process`). Between the start of a transition's preparation
    /// and the moment every site dispatches on thread states, a new thread
    /// may still run old code, so it starts in the initial state like the
    /// threads that exist; once every site is in transition a new thread has
    /// no old frame and starts at the target. A platform that discovers a
    /// thread only after its creation must not use this state for it: it
    /// cannot know what the thread ran, and gives it
    /// [`ThreadState::discovered`] instead.
    fn set_new_thread_state(&mut self, state: ThreadState);

    /// For each thread of `tids` (all pending, none at `target`): check its
    /// stack against `ranges` and, only if none is on it, set its state to
    /// `target` and clear its pending flag, atomically with the check (the
    /// thread must not enter a range between the check and the switch).
    /// Returns one result per tid, in order. `Blocked` carries the index of
    /// the first range, in the given order, that the stack hits.
    fn try_switch_threads(
        &mut self,
        tids: &[Tid],
        target: PatchState,
        ranges: &[BlockingRange],
    ) -> Vec<SwitchResult>;

    /// Waits until no thread can still act on dispatch or state it read
    /// before this call (`klp_synchronize_transition`).
    fn synchronize_transition(&mut self);

    /// Nudges threads that block the transition for a long time (the
    /// kernel's fake signal). A platform may do nothing useful here.
    fn signal_threads(&mut self, tids: &[Tid]);

    /// Runs a per-object callback; returns its C-style result (0 or a
    /// negative errno). Only `PrePatch` results are looked at.
    fn call_object_callback(&mut self, call: ObjectCallback<'_>) -> i32;

    /// Runs a per-state callback; returns its C-style result. Only `Setup`
    /// results are looked at.
    fn call_state_callback(&mut self, call: StateCallback<'_>) -> i32;

    /// Emits one log line.
    fn log(&mut self, record: LogRecord);

    /// Monotonic time, for retry and signal timing.
    fn now(&mut self) -> Duration;

    /// The core no longer uses the patch. `forced` patches took part in a
    /// forced transition: their code may still run and must never be
    /// unloaded. Not called for a patch whose enable failed.
    fn patch_released(&mut self, patch: &str, forced: bool);
}
