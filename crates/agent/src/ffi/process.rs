//! The process around the agent: the agent's own thread, which receives none of the program's
//! signals; `fork` (the kernel's `klp_copy_process`), after which the child has an agent of its
//! own; and the removal of the socket when the process exits normally.
//!
//! Safety model of this module: signal sets are plain data of our own, and masks change only
//! the calling thread's, restored at once; the exit handler is an `extern "C"` function
//! without arguments that lives as long as the process, and the socket path it unlinks is a C
//! string set once.

use std::cell::RefCell;
use std::ffi::CString;
use std::path::Path;
use std::sync::{Mutex, Once};

use crate::agent::ForkHold;

thread_local! {
    /// The agent's locks, held by the forking thread from `prepare_fork` to its end.
    static FORK_HOLD: RefCell<Option<ForkHold>> = const { RefCell::new(None) };
}

extern "C" fn before_fork() {
    if let Some(agent) = crate::current_agent()
        && !agent.is_control_thread()
    {
        let hold = agent.prepare_fork();
        FORK_HOLD.with(|h| *h.borrow_mut() = Some(hold));
    }
}

extern "C" fn after_fork_in_parent() {
    if let (Some(agent), Some(hold)) = (
        crate::current_agent(),
        FORK_HOLD.with(|h| h.borrow_mut().take()),
    ) {
        agent.after_fork_in_parent(hold);
    }
}

extern "C" fn after_fork_in_child() {
    let (Some(agent), Some(hold)) = (
        crate::current_agent(),
        FORK_HOLD.with(|h| h.borrow_mut().take()),
    ) else {
        return;
    };
    // The parent's control thread is not in the child, but the descriptors it served are:
    // closed, so that the parent's clients see the parent's answers and ends alone.
    for fd in crate::control::server::served_descriptors() {
        // SAFETY: a descriptor the parent's control thread owned; no thread of the child uses
        // it, and it is closed once.
        unsafe { libc::close(fd) };
    }
    agent.after_fork_in_child(hold);
    if let Err(e) = crate::start_control_thread(agent) {
        eprintln!(
            "livepatch: agent of forked process {} without control socket: {e}",
            agent.pid()
        );
    }
}

/// Registers the `fork` handlers once (`pthread_atfork`).
pub fn handle_forks() {
    static REGISTERED: Once = Once::new();
    REGISTERED.call_once(|| {
        // SAFETY: three extern "C" functions without arguments, valid forever.
        let r = unsafe {
            libc::pthread_atfork(
                Some(before_fork),
                Some(after_fork_in_parent),
                Some(after_fork_in_child),
            )
        };
        if r != 0 {
            eprintln!(
                "livepatch: fork handlers not registered ({}): a forked child gets no agent",
                std::io::Error::from_raw_os_error(r)
            );
        }
    });
}

/// The sockets to remove at exit, with the process that made each: a forked child inherits
/// its parent's entry and must not remove the parent's socket when it exits.
static SOCKETS: Mutex<Vec<(u32, CString)>> = Mutex::new(Vec::new());

extern "C" fn unlink_sockets() {
    let me = livepatch_arch::signals::getpid() as u32;
    let sockets = SOCKETS.lock().unwrap_or_else(|e| e.into_inner());
    for (owner, path) in sockets.iter() {
        if *owner == me {
            // SAFETY: a valid C string; unlink has no other effect.
            unsafe { libc::unlink(path.as_ptr()) };
        }
    }
}

/// Removes the socket at `path` of process `pid` when that process exits normally.
pub fn remove_at_exit(path: &Path, pid: u32) {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    let mut sockets = SOCKETS.lock().unwrap_or_else(|e| e.into_inner());
    if sockets.is_empty() {
        // SAFETY: registers a function without arguments, valid forever.
        if unsafe { libc::atexit(unlink_sockets) } != 0 {
            // The socket stays after exit: the next process with this pid (or the CLI) finds
            // it stale and replaces it.
        }
    }
    sockets.push((pid, c));
}

/// Every signal but `keep` and the synchronous ones a fault raises.
fn all_signals_but(keep: &[i32]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigfillset initializes it fully.
    let mut blocked: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid sigset_t of ours.
    unsafe { libc::sigfillset(&mut blocked) };
    let synchronous = [
        libc::SIGSEGV,
        libc::SIGBUS,
        libc::SIGILL,
        libc::SIGFPE,
        libc::SIGTRAP,
        libc::SIGSYS,
    ];
    for &signal in keep.iter().chain(&synchronous) {
        // SAFETY: as above; an invalid number only makes sigdelset fail, which leaves the set.
        unsafe { libc::sigdelset(&mut blocked, signal) };
    }
    blocked
}

/// Runs `f` on the calling thread with every signal blocked but `keep` and the synchronous
/// ones: a program's signal handler must not run in the middle of what the agent does on a
/// program thread (publishing a dispatch, stopping the world), where it could wait for the
/// agent forever. The thread's mask is put back after.
pub fn with_signals_blocked<R>(keep: &[i32], f: impl FnOnce() -> R) -> R {
    let blocked = all_signals_but(keep);
    // SAFETY: sigset_t is plain data, filled by pthread_sigmask below.
    let mut previous: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid sets; changes only the calling thread's mask, restored below.
    let masked = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &blocked, &mut previous) } == 0;
    let result = f();
    if masked {
        // SAFETY: restores the mask read above; it cannot fail for a valid set.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut()) };
    }
    result
}

/// Starts the agent's own thread with every signal blocked except `keep` (the agent's own
/// signals) and the synchronous ones a fault raises, so that the program's process-directed
/// signals (SIGCHLD, SIGTERM, ...) always reach the program's threads, as without the agent.
/// The mask is set before the thread exists (it inherits it), so no signal can slip in first.
pub fn spawn_without_signals(
    name: &str,
    keep: &[i32],
    body: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let blocked = all_signals_but(keep);
    // SAFETY: sigset_t is plain data, filled by pthread_sigmask below.
    let mut previous: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid sets; changes only the calling thread's mask, restored below.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &blocked, &mut previous) };
    if r != 0 {
        return Err(std::io::Error::from_raw_os_error(r));
    }
    let spawned = std::thread::Builder::new().name(name.into()).spawn(body);
    // SAFETY: restores the mask read above.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut()) };
    if r != 0 {
        // The thread exists, but the caller's own mask stays wider than it was: say so.
        return Err(std::io::Error::from_raw_os_error(r));
    }
    spawned
}
