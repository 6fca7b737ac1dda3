//! The in-process livepatch agent: joins the core (`livepatch-core`) to real threads, code and
//! libraries through the x86-64 layer (`livepatch-arch`), and serves the `livepatch` command on
//! a Unix socket.
//!
//! Data flows one way: a request on the control socket ([`control`]) or a library the program
//! loads ([`notifier`]) reaches the [`agent::Agent`], which runs the core under its lock; the
//! core acts through the [`platform`], which hands each job to the module that owns it:
//!
//! - [`library`]: patch libraries (`insmod`, `rmmod`) and their registry.
//! - [`objects`]: the process's objects, symbols and build ids.
//! - [`sites`]: what each redirected function's stub dispatches on, and its decision.
//! - [`threads`]: per-thread records and states; [`check`]: the signal-driven stack checks
//!   that switch threads.
//! - [`callbacks`]: running a patch's callbacks; [`shadow`]: shadow variables; [`log`]: the
//!   log ring.
//! - [`ffi`]: the C edge: the descriptor of `livepatch.h`, the functions it exports, the
//!   interposed `dlopen`/`dlclose`/`dlerror`/`pthread_create`, the dynamic linker.
//!
//! Loaded with `LD_PRELOAD` (see `livepatch run`), the agent starts itself before `main`; a
//! Rust program that links it calls [`start`]. The one [`agent::Agent`] of the process lives
//! here; only the C edge looks it up, everything else is passed it.

pub mod agent;
pub mod callbacks;
pub mod check;
pub mod control;
pub mod ffi;
pub mod library;
pub mod log;
pub mod notifier;
pub mod objects;
pub mod platform;
pub mod shadow;
pub mod sites;
pub mod threads;

use std::sync::{Arc, OnceLock};

pub use agent::{Agent, StartError};

static AGENT: OnceLock<Agent> = OnceLock::new();

/// Whether `livepatch attach` loaded the agent into a running process (rather than the
/// process preloading it): then nothing interposes the program's `dlopen` and `dlclose` until
/// the agent redirects them (`ffi::interpose::interposed`), and meanwhile the control thread looks for
/// libraries coming and going itself, every [`ATTACHED_LIBRARY_POLL`].
static ATTACHED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// How often an attached agent looks for libraries loaded or unloaded.
pub const ATTACHED_LIBRARY_POLL: std::time::Duration = std::time::Duration::from_millis(100);

pub(crate) fn set_attached() {
    ATTACHED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// See [`ATTACHED`].
pub fn attached() -> bool {
    ATTACHED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Whether the control thread must look for libraries coming and going itself: an attached
/// agent before (or without) its interposition.
pub fn looks_for_libraries() -> bool {
    attached() && !ffi::interpose::interposed()
}

/// The agent, if it started. For the C edge only ([`ffi`]): C calls it without an agent in
/// hand; all other code is passed the agent.
pub(crate) fn current_agent() -> Option<&'static Agent> {
    AGENT.get()
}

/// Starts the agent once per process: installs the check signal, creates the control socket
/// and starts the control thread. Later calls return at once, with the first call's result.
pub fn start() -> Result<(), StartError> {
    static STARTED: OnceLock<Result<(), Arc<StartError>>> = OnceLock::new();
    match STARTED.get_or_init(|| start_once().map_err(Arc::new)) {
        Ok(()) => Ok(()),
        Err(e) => Err(StartError::Earlier(e.clone())),
    }
}

fn start_once() -> Result<(), StartError> {
    ffi::dl::resolve_next_definitions();
    let agent = Agent::new()?;
    let agent = AGENT.get_or_init(|| agent);
    start_control_thread(agent)?;
    ffi::process::handle_forks();
    Ok(())
}

/// Makes the control socket of the agent's process and starts the thread that serves it: at
/// the start, and in a child after a `fork`.
pub(crate) fn start_control_thread(agent: &'static Agent) -> Result<(), StartError> {
    let socket = control::socket::bind(agent.pid()).map_err(StartError::Socket)?;
    ffi::process::remove_at_exit(&socket.path, agent.pid());
    let own_signals = {
        let state = agent.lock();
        let check = state.platform.check_signal;
        [check, check + 1]
    };
    let listener = socket.listener;
    ffi::process::spawn_without_signals("livepatch", &own_signals, move || {
        control::server::serve(agent, listener)
    })
    .map_err(StartError::Thread)?;
    Ok(())
}
