//! The agent of one process: the core and its platform under one lock (the kernel's
//! `klp_mutex`), the log, the shadow variables, and the thread that serves the control socket.
//! The process has one, made by [`crate::start`]; everything below gets it passed in.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use livepatch_arch::signals::{self, gettid};
use livepatch_core::Livepatch;

use crate::callbacks::{CallbackScope, PrevStateAnswer};
use crate::check;
use crate::ffi::descriptor::KlpState;
use crate::ffi::process::with_signals_blocked;
use crate::log::AgentLog;
use crate::notifier::{self, ComingRefusal};
use crate::platform::ProcessPlatform;
use crate::shadow::SharedShadowVars;
use crate::sites::Sites;

/// Environment variable choosing the real-time signal of per-thread checks; the next signal
/// stops the world for code writes.
pub const SIGNAL_ENV: &str = "LIVEPATCH_SIGNAL";

/// Why the agent did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `LIVEPATCH_SIGNAL` is not a number.
    #[error("{SIGNAL_ENV}={0}: not a signal number")]
    NotASignal(String),
    /// The chosen signals do not fit.
    #[error(
        "{SIGNAL_ENV}={signal}: the agent needs this signal and the next, both real-time (up to {max})"
    )]
    NoRoom {
        /// The chosen signal.
        signal: i32,
        /// `SIGRTMIN`.
        max: i32,
    },
    /// The check signal cannot be used.
    #[error(transparent)]
    CheckSignal(#[from] signals::SignalError),
    /// The stop signal cannot be used.
    #[error(transparent)]
    StopSignal(#[from] livepatch_arch::stop_world::StopError),
    /// The control socket could not be created.
    #[error("no control socket: {0}")]
    Socket(crate::control::socket::SocketError),
    /// The control thread could not be started.
    #[error("cannot start the control thread: {0}")]
    Thread(std::io::Error),
    /// The agent failed to start earlier in this process, for this reason.
    #[error("{0}")]
    Earlier(std::sync::Arc<StartError>),
}

/// The check signal: `LIVEPATCH_SIGNAL` or `SIGRTMIN+8`; the stop signal is the next one.
fn chosen_signal() -> Result<i32, StartError> {
    let signal = match std::env::var(SIGNAL_ENV) {
        Ok(text) => text
            .trim()
            .parse::<i32>()
            .map_err(|_| StartError::NotASignal(text))?,
        Err(_) => libc::SIGRTMIN() + 8,
    };
    if signal + 1 > libc::SIGRTMAX() {
        return Err(StartError::NoRoom {
            signal,
            max: libc::SIGRTMAX(),
        });
    }
    Ok(signal)
}

/// The core and its platform: what the lock protects.
#[derive(Debug)]
pub struct AgentState {
    /// The livepatch core.
    pub core: Livepatch,
    /// The platform the core acts through.
    pub platform: ProcessPlatform,
}

/// The agent of this process.
#[derive(Debug)]
pub struct Agent {
    log: Arc<AgentLog>,
    shadow: SharedShadowVars,
    callbacks: Arc<CallbackScope>,
    state: Mutex<AgentState>,
    /// This process's id (a forked child changes it).
    pid: AtomicU32,
    /// The control thread, once it runs; 0 before.
    control_tid: AtomicI32,
}

/// Every lock of the agent, held by the thread that calls `fork` from before it forks until
/// after, in the parent and in the child (see [`Agent::prepare_fork`]).
#[derive(Debug)]
pub struct ForkHold {
    state: MutexGuard<'static, AgentState>,
    shadow: crate::shadow::ShadowHold<'static>,
    log: crate::log::LogHold<'static>,
    /// The forking thread's state, which its copy in the child gets.
    forking_thread: Option<livepatch_core::ThreadState>,
}

impl Agent {
    /// Installs the signal handlers and the stub decision and makes the core and its
    /// platform; refuses when the chosen signals are taken by the program.
    pub fn new() -> Result<Agent, StartError> {
        let check_signal = chosen_signal()?;
        check::install(check_signal)?;
        livepatch_arch::install_stop_signal(check_signal + 1)?;
        Sites::install();
        let log = Arc::new(AgentLog::from_env());
        let shadow_log = log.clone();
        let callbacks = Arc::new(CallbackScope::default());
        let platform = ProcessPlatform::new(log.clone(), callbacks.clone(), check_signal);
        Ok(Agent {
            shadow: SharedShadowVars::new(move |r| shadow_log.core(&r)),
            log,
            callbacks,
            state: Mutex::new(AgentState {
                core: Livepatch::new(),
                platform,
            }),
            pid: AtomicU32::new(signals::getpid() as u32),
            control_tid: AtomicI32::new(0),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::Acquire)
    }

    /// Before a `fork`: takes every lock of the agent (its state, the shadow variables, the
    /// log), so that no other thread holds one when the process is copied; the child would
    /// find it held forever. Everything else the agent locks is locked under its state's lock.
    pub fn prepare_fork(&'static self) -> ForkHold {
        let state = self.lock();
        // Read under the lock: a round, which holds it, may switch this thread meanwhile.
        let forking_thread = crate::threads::state_of(gettid());
        let shadow = self.shadow.hold();
        let log = self.log.hold();
        ForkHold {
            state,
            shadow,
            log,
            forking_thread,
        }
    }

    /// In the parent after a `fork`: the locks go.
    pub fn after_fork_in_parent(&'static self, hold: ForkHold) {
        drop(hold);
    }

    /// In the child after a `fork` (kernel: `klp_copy_process`): the child keeps every patch,
    /// site and func stack; its one thread takes the forking thread's state and pending flag;
    /// a transition running at the fork goes on in the child on its own. The caller then starts
    /// the child's control thread.
    pub fn after_fork_in_child(&'static self, hold: ForkHold) {
        let ForkHold {
            mut state,
            shadow,
            log,
            forking_thread,
        } = hold;
        let pid = signals::getpid() as u32;
        self.pid.store(pid, Ordering::Release);
        self.control_tid.store(0, Ordering::SeqCst);
        match forking_thread {
            Some(thread) => crate::threads::register_forked(thread),
            None => {
                crate::threads::register(gettid());
            }
        }
        state.platform.objects.refresh();
        let transition = state
            .core
            .transition()
            .map(|(patch, target)| (patch.to_string(), target));
        drop(log);
        drop(shadow);
        drop(state);
        if let Some((patch, target)) = transition {
            let direction = if target == livepatch_core::PatchState::Patched {
                "patching"
            } else {
                "unpatching"
            };
            self.log.agent(
                livepatch_core::Level::Notice,
                format_args!(
                    "'{patch}': forked during the {direction} transition; it goes on in process {pid}"
                ),
            );
        }
    }

    /// The log.
    pub fn log(&self) -> &AgentLog {
        &self.log
    }

    /// The shadow variables of patch code.
    pub fn shadow(&self) -> &SharedShadowVars {
        &self.shadow
    }

    /// Takes the lock (`klp_mutex`).
    pub fn lock(&self) -> MutexGuard<'_, AgentState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the calling thread as the control thread.
    pub fn set_control_thread(&self) {
        self.control_tid.store(gettid(), Ordering::SeqCst);
    }

    /// Whether the caller is the control thread: its own `dlopen` calls (a patch library's)
    /// must not wait for the lock it holds.
    pub fn is_control_thread(&self) -> bool {
        self.control_tid.load(Ordering::SeqCst) == gettid()
    }

    /// The program loaded or unloaded libraries: the module notifiers. Returns why a patch
    /// refused a library that came, which must then be unloaded again.
    pub fn objects_changed(&self) -> Option<ComingRefusal> {
        let mut guard = self.lock();
        let state = &mut *guard;
        // A program thread: no handler of the program may run while it publishes dispatches or
        // holds the world stopped. Blocked only once the lock is held, so that a stop or a check
        // round of the control thread reaches it while it waits for the lock.
        let own = [state.platform.check_signal, state.platform.check_signal + 1];
        let refused = with_signals_blocked(&own, || {
            state.platform.retry_restores();
            notifier::sync_objects(
                &mut state.core,
                &mut state.platform,
                notifier::Refusals::ToTheLoader,
            )
        });
        drop(guard);
        if let Some(refusal) = &refused {
            self.log.agent(
                livepatch_core::Level::Warn,
                format_args!("dlopen refused: {refusal}"),
            );
        }
        refused
    }

    /// `klp_get_prev_state(id)` for patch code: answered from the callback's states when a
    /// callback the agent runs asks, else by the core.
    pub fn prev_state(&self, id: u64) -> Option<*mut KlpState> {
        match self.callbacks.prev_state(id) {
            Some(PrevStateAnswer::Found(state)) => return state,
            Some(PrevStateAnswer::OutsideTransition(warning)) => {
                self.log.core(&warning);
                return None;
            }
            None => {}
        }
        let mut guard = self.lock();
        let state = &mut *guard;
        let found = state.core.get_prev_state(&mut state.platform, id)?;
        state
            .platform
            .libraries
            .declaration(&found.patch)?
            .state(found.index)
    }

    /// How long until the transition work is due; `None` when no transition runs.
    pub fn until_next_work(&self) -> Option<Duration> {
        let mut state = self.lock();
        let at = state.core.next_work_at()?;
        let now = livepatch_core::Platform::now(&mut state.platform);
        Some(at.saturating_sub(now))
    }

    /// Runs the transition work if it is due (`klp_transition_work_fn`).
    pub fn run_work(&self) {
        let mut guard = self.lock();
        let state = &mut *guard;
        if crate::looks_for_libraries() {
            // No `dlopen` wrapper reports libraries coming and going: look.
            notifier::sync_objects(
                &mut state.core,
                &mut state.platform,
                notifier::Refusals::Logged,
            );
        } else {
            state.platform.objects.refresh();
        }
        state.platform.retry_restores();
        state.core.transition_work(&mut state.platform);
    }

    /// Whether `patch` is in transition now.
    pub fn in_transition(&self, patch: &str) -> bool {
        self.lock()
            .core
            .transition()
            .is_some_and(|(name, _)| name == patch)
    }
}
