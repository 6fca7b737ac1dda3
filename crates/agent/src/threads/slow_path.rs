//! Which threads are inside a stub's slow path, and waiting for them to leave
//! (`klp_synchronize_transition`): a thread there may act on a dispatch or a state it read
//! before the core changed them.

#![forbid(unsafe_code)]

use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use livepatch_arch::signals::gettid;
use livepatch_core::Tid;

use super::records::record;

/// After this long, a thread still in the slow path is reported (it is stopped, or starved).
pub const SLOW_PATH_PATIENCE: Duration = Duration::from_secs(5);

/// Marks the calling thread as inside (or out of) the stub's slow path, for [`synchronize`].
pub fn set_in_slow_path(inside: bool) {
    if let Some(rec) = record(gettid()) {
        rec.in_slow_path.store(u8::from(inside), Ordering::SeqCst);
        if inside {
            // Pairs with the fence in `synchronize`: either the control thread sees this flag,
            // or this thread sees the dispatch the control thread published before waiting.
            fence(Ordering::SeqCst);
        }
    }
}

/// A thread that did not leave the slow path in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("thread {tid} has been inside a stub's slow path for {waited:?}")]
pub struct StillInSlowPath {
    /// The thread.
    pub tid: Tid,
    /// How long it was waited for.
    pub waited: Duration,
}

/// Waits until no thread of `tids` is inside the slow path. A thread can be preempted there; it
/// leaves within a few instructions once it runs. One that stays longer than
/// [`SLOW_PATH_PATIENCE`] (stopped by a debugger) is returned, so the caller can say so; the
/// others have been waited for.
pub fn synchronize(tids: &[Tid]) -> Result<(), StillInSlowPath> {
    // Pairs with the fence in `set_in_slow_path`: the dispatches and states published before
    // this call are ordered before the flags read below (a store-to-load order, which only a
    // full fence gives).
    fence(Ordering::SeqCst);
    let mut late = None;
    for &tid in tids {
        let Some(rec) = record(tid) else { continue };
        let start = Instant::now();
        while rec.in_slow_path.load(Ordering::SeqCst) != 0 {
            if start.elapsed() > SLOW_PATH_PATIENCE {
                late.get_or_insert(StillInSlowPath {
                    tid,
                    waited: SLOW_PATH_PATIENCE,
                });
                break;
            }
            std::thread::yield_now();
        }
    }
    late.map_or(Ok(()), Err)
}
