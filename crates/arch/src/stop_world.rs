//! Stopping every other thread of the process while code is rewritten.
//!
//! Each other thread gets a real-time signal and parks in its handler until the writer releases
//! it; the writer reads each parked thread's interrupted PC so it never rewrites bytes a thread is
//! in the middle of. Threads are listed with raw `getdents64` and their records live in a static
//! table found by thread id, so nothing here allocates or locks once the first thread is parked
//! (a parked thread may hold the allocator's lock).
//!
//! Safety model of this module:
//! 1. The handler acts only on a signal this process queued with the index of the receiving
//!    thread's own record (`SI_QUEUE`, our pid, a record whose tid is the caller's); any other
//!    delivery of the signal returns at once.
//! 2. The handler makes only async-signal-safe system calls (gettid, getpid, futex), saves and
//!    restores `errno`, and touches only the static table.
//! 3. One writer at a time (`WRITER`): records change only between stops, or by the thread a
//!    record belongs to.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Why the world could not be stopped. Nothing was changed when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StopError {
    /// The stop signal is not installed.
    #[error("no stop signal installed (install_stop_signal was not called)")]
    NotInstalled,
    /// A thread blocks the stop signal, so it cannot be parked for a code write.
    #[error("thread {tid} blocks signal {signal}; code cannot be changed safely while it runs")]
    SignalBlocked {
        /// The thread.
        tid: i32,
        /// The signal.
        signal: i32,
    },
    /// A thread did not park in time (stopped by a debugger, or blocked the signal meanwhile).
    #[error("thread {tid} did not stop within {waited:?}; code was not changed")]
    ThreadDidNotStop {
        /// The thread.
        tid: i32,
        /// How long we waited.
        waited: Duration,
    },
    /// The process has more threads than the stop table holds.
    #[error("more than {0} threads; cannot stop them all")]
    TooManyThreads(usize),
    /// Another stop signal is installed already.
    #[error("the stop signal is already {current}, cannot switch to {wanted}")]
    OtherSignal {
        /// The one installed.
        current: i32,
        /// The one asked for.
        wanted: i32,
    },
    /// The handler could not be installed.
    #[error(transparent)]
    Install(#[from] crate::signals::SignalError),
}

/// Most threads a process may have while it is stopped.
pub const MAX_THREADS: usize = 16384;

/// How long the writer waits for every thread to park before it gives up.
const PARK_DEADLINE: Duration = Duration::from_secs(2);

/// How often the missing threads are examined (exited, or blocking the signal) while waiting.
const SWEEP_PERIOD: Duration = Duration::from_millis(20);

/// How long a thread may block the stop signal before we call it deliberate.
const BLOCKED_GRACE: Duration = Duration::from_millis(100);

struct ParkedThread {
    tid: AtomicI32,
    pc: AtomicUsize,
    arrived: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: ParkedThread = ParkedThread {
    tid: AtomicI32::new(0),
    pc: AtomicUsize::new(0),
    arrived: AtomicBool::new(false),
};

static TABLE: [ParkedThread; MAX_THREADS] = [EMPTY; MAX_THREADS];
/// Entries of `TABLE` in use by the current stop.
static LISTED: AtomicUsize = AtomicUsize::new(0);
/// Parked (or exited) threads of the current stop; a futex word.
static ARRIVED: AtomicU32 = AtomicU32::new(0);
/// Bumped to release parked threads; a futex word.
static RELEASE: AtomicU32 = AtomicU32::new(0);
/// Which thread ids have a record in the current stop, one bit per possible id (Linux's
/// `PID_MAX_LIMIT`), so listing 10,000 threads does not compare each against all others.
static LISTED_TIDS: [AtomicU64; TID_LIMIT / 64] = [const { AtomicU64::new(0) }; TID_LIMIT / 64];
const TID_LIMIT: usize = 1 << 22;

fn is_listed(tid: i32) -> bool {
    let tid = tid as usize % TID_LIMIT;
    LISTED_TIDS[tid / 64].load(Ordering::Relaxed) & (1 << (tid % 64)) != 0
}

fn set_listed(tid: i32, listed: bool) {
    let tid = tid as usize % TID_LIMIT;
    let bit = 1 << (tid % 64);
    if listed {
        LISTED_TIDS[tid / 64].fetch_or(bit, Ordering::Relaxed);
    } else {
        LISTED_TIDS[tid / 64].fetch_and(!bit, Ordering::Relaxed);
    }
}

/// The installed signal, 0 when none.
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// One writer at a time.
static WRITER: Mutex<()> = Mutex::new(());

/// Installs the handler for `signal`. Refuses when the program already handles that signal.
pub fn install(signal: i32) -> Result<(), StopError> {
    let current = SIGNAL.load(Ordering::Acquire);
    if current == signal {
        return Ok(());
    }
    if current != 0 {
        return Err(StopError::OtherSignal {
            current,
            wanted: signal,
        });
    }
    crate::signals::install_handler(signal, on_stop_signal)?;
    SIGNAL.store(signal, Ordering::Release);
    Ok(())
}

/// The signal in use, if installed.
pub fn signal() -> Option<i32> {
    match SIGNAL.load(Ordering::Acquire) {
        0 => None,
        s => Some(s),
    }
}

extern "C" fn on_stop_signal(
    signo: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    if signo != SIGNAL.load(Ordering::Relaxed) || info.is_null() {
        return;
    }
    let saved_errno = crate::signals::errno();
    let generation = RELEASE.load(Ordering::SeqCst);
    let tid = crate::signals::gettid();
    let listed = LISTED.load(Ordering::SeqCst).min(MAX_THREADS);
    // SAFETY: the kernel's siginfo of this SA_SIGINFO handler, checked non-null above.
    let slot = unsafe { crate::signals::queued_value(info) };
    // Rule 1: the writer sends each thread the index of its record; a signal from elsewhere, or
    // a late one from a stop that gave up on this thread, finds no record of this thread there.
    let Some(record) = slot
        .filter(|&slot| slot < listed)
        .map(|slot| &TABLE[slot])
        .filter(|r| r.tid.load(Ordering::Acquire) == tid)
    else {
        crate::signals::set_errno(saved_errno);
        return;
    };
    record
        .pc
        .store(crate::signals::interrupted_pc(context), Ordering::Relaxed);
    if record.arrived.swap(true, Ordering::AcqRel) {
        crate::signals::set_errno(saved_errno);
        return;
    }
    // Only the last thread to arrive wakes the writer: 10,000 wake-ups would cost more than
    // the parking itself. The writer also wakes by itself every few milliseconds.
    let arrived = ARRIVED.fetch_add(1, Ordering::AcqRel) + 1;
    if arrived as usize >= LISTED.load(Ordering::Acquire) {
        crate::signals::futex_wake(&ARRIVED);
    }
    while RELEASE.load(Ordering::Acquire) == generation {
        crate::signals::futex_wait(&RELEASE, generation, None);
    }
    crate::signals::set_errno(saved_errno);
}

/// Every other thread parked; dropping it releases them.
#[derive(Debug)]
pub struct StoppedWorld {
    _writer: std::sync::MutexGuard<'static, ()>,
}

impl StoppedWorld {
    /// Interrupted PCs of the parked threads, with their thread ids (exited threads excluded).
    pub fn parked_pcs(&self) -> impl Iterator<Item = (i32, usize)> + '_ {
        TABLE[..LISTED.load(Ordering::Acquire)]
            .iter()
            .map(|r| (r.tid.load(Ordering::Relaxed), r.pc.load(Ordering::Relaxed)))
            .filter(|&(_, pc)| pc != 0)
    }
}

impl Drop for StoppedWorld {
    fn drop(&mut self) {
        release();
    }
}

fn release() {
    // Forget the listed threads first: a signal still pending for a thread that never parked
    // then finds no record and returns, instead of parking until some later stop releases it.
    let listed = LISTED.swap(0, Ordering::SeqCst).min(MAX_THREADS);
    for record in &TABLE[..listed] {
        set_listed(record.tid.load(Ordering::Relaxed), false);
    }
    RELEASE.fetch_add(1, Ordering::SeqCst);
    crate::signals::futex_wake(&RELEASE);
}

/// Parks every other thread of the process. Allocates nothing after the first signal is sent.
pub fn stop() -> Result<StoppedWorld, StopError> {
    let Some(signal) = signal() else {
        return Err(StopError::NotInstalled);
    };
    let writer = WRITER.lock().unwrap_or_else(|e| e.into_inner());
    let world = StoppedWorld { _writer: writer };
    LISTED.store(0, Ordering::Release);
    ARRIVED.store(0, Ordering::Release);
    let own_tid = crate::signals::gettid();
    let pid = std::process::id() as i32;
    let started = Instant::now();
    let deadline = started + PARK_DEADLINE;
    let mut listing = crate::signals::TaskListing::new();
    loop {
        let mut new_threads = 0;
        let mut failure = None;
        listing.for_each_tid(|tid| {
            if tid == own_tid || failure.is_some() {
                return;
            }
            let listed = LISTED.load(Ordering::Relaxed);
            if is_listed(tid) {
                return;
            }
            if listed == MAX_THREADS {
                failure = Some(StopError::TooManyThreads(MAX_THREADS));
                return;
            }
            let record = &TABLE[listed];
            record.tid.store(tid, Ordering::Relaxed);
            record.pc.store(0, Ordering::Relaxed);
            record.arrived.store(false, Ordering::Relaxed);
            LISTED.store(listed + 1, Ordering::Release);
            set_listed(tid, true);
            new_threads += 1;
            if !crate::signals::tgkill_with_value(pid, tid, signal, listed) {
                // The thread exited since it was listed.
                record.arrived.store(true, Ordering::Relaxed);
                ARRIVED.fetch_add(1, Ordering::Release);
            }
        });
        if let Some(failure) = failure {
            drop(world);
            return Err(failure);
        }
        if new_threads == 0 {
            // Every thread listed before this pass was parked when it started, so none could
            // have created a thread this pass missed.
            return Ok(world);
        }
        let mut next_sweep = Instant::now() + SWEEP_PERIOD;
        loop {
            let arrived = ARRIVED.load(Ordering::Acquire);
            if arrived as usize >= LISTED.load(Ordering::Acquire) {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                let missing = TABLE[..LISTED.load(Ordering::Acquire)]
                    .iter()
                    .find(|r| !r.arrived.load(Ordering::Acquire))
                    .map_or(0, |r| r.tid.load(Ordering::Relaxed));
                drop(world);
                return Err(StopError::ThreadDidNotStop {
                    tid: missing,
                    waited: PARK_DEADLINE,
                });
            }
            let wait = (deadline - now).min(Duration::from_millis(10));
            crate::signals::futex_wait(&ARRIVED, arrived, Some(wait));
            // Every arrival wakes us; looking at every missing thread each time would make
            // parking 10,000 threads quadratic, so the missing ones are examined periodically.
            let now = Instant::now();
            if now < next_sweep {
                continue;
            }
            next_sweep = now + SWEEP_PERIOD;
            // Threads block every signal for a moment while they start and exit; one that
            // still blocks ours after a while does so on purpose and cannot be parked.
            if now - started > BLOCKED_GRACE
                && let Some(record) = TABLE[..LISTED.load(Ordering::Acquire)].iter().find(|r| {
                    !r.arrived.load(Ordering::Acquire)
                        && crate::signals::signal_held_blocked(
                            r.tid.load(Ordering::Relaxed),
                            signal,
                        )
                })
            {
                let tid = record.tid.load(Ordering::Relaxed);
                drop(world);
                return Err(StopError::SignalBlocked { tid, signal });
            }
            // A thread that exits with the signal pending never runs the handler.
            for record in &TABLE[..LISTED.load(Ordering::Acquire)] {
                if !record.arrived.load(Ordering::Acquire)
                    && !crate::signals::tgkill(pid, record.tid.load(Ordering::Relaxed), 0)
                    && !record.arrived.swap(true, Ordering::AcqRel)
                {
                    ARRIVED.fetch_add(1, Ordering::Release);
                }
            }
        }
    }
}
