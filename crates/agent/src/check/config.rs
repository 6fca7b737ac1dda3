//! What one check round publishes for the signal handlers, and the counters of their answers
//! (rule 1 of the module).

use std::sync::Arc;
use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

use livepatch_arch::unwind::StackUnwinder;
use livepatch_core::{DisjointRanges, ThreadState};

/// What the handlers of one check round need, prepared by the control thread.
#[derive(Debug)]
pub struct CheckConfig {
    /// The round's number: a thread answers the round it was asked for.
    pub round: u64,
    /// The state a clean thread switches from (the initial one, pending).
    pub from: ThreadState,
    /// The state it switches to.
    pub to: ThreadState,
    /// The blocking ranges, disjoint.
    pub ranges: DisjointRanges,
    /// Writable mappings that may hold stacks, sorted by start.
    pub stacks: Vec<(u64, u64)>,
    /// Code where a thread must not be switched (slow paths, stubs, trampolines).
    pub no_switch_code: Vec<(u64, u64)>,
    /// The precise walk, when the control thread could build it.
    pub unwinder: Option<Arc<StackUnwinder>>,
}

static CONFIG: AtomicPtr<CheckConfig> = AtomicPtr::new(std::ptr::null_mut());
static IN_FLIGHT: AtomicU32 = AtomicU32::new(0);

/// Answers received in the current round; a futex word the control thread waits on.
pub static ACKS: AtomicU32 = AtomicU32::new(0);
/// How many answers the round waits for, once every signal is sent (`u32::MAX` before): the
/// answer that completes the count wakes the control thread, the others do not.
pub static EXPECTED_ACKS: AtomicU32 = AtomicU32::new(u32::MAX);

/// The kinds of answer a thread records.
pub const RESULT_SWITCHED: u8 = 1;
/// A blocking range is on its stack.
pub const RESULT_BLOCKED: u8 = 2;
/// Its stack could not be checked.
pub const RESULT_UNRELIABLE: u8 = 3;
/// It was interrupted where it may have chosen a version already.
pub const RESULT_RACED: u8 = 4;

/// A configuration the handlers can see; [`retire`] takes it back.
#[derive(Debug)]
pub struct Published(*mut CheckConfig);

/// Makes `cfg` the configuration of the current round, with fresh answer counters.
pub fn publish(cfg: CheckConfig) -> Published {
    let ptr = Box::into_raw(Box::new(cfg));
    ACKS.store(0, Ordering::SeqCst);
    EXPECTED_ACKS.store(u32::MAX, Ordering::SeqCst);
    CONFIG.store(ptr, Ordering::SeqCst);
    Published(ptr)
}

/// Unpublishes the configuration and frees it once no handler uses it any more (rule 1). Also
/// drops the configuration's hold on the unwinder, here on the control thread, never in a
/// handler.
pub fn retire(published: Published) {
    CONFIG.store(std::ptr::null_mut(), Ordering::SeqCst);
    while IN_FLIGHT.load(Ordering::SeqCst) != 0 {
        std::hint::spin_loop();
    }
    // SAFETY: made by `publish` from a Box, unpublished above, and no handler holds it: every
    // reader counts itself in IN_FLIGHT before loading CONFIG.
    drop(unsafe { Box::from_raw(published.0) });
}

/// Runs `f` with the configuration of the round in progress, if one is published, counted in
/// `IN_FLIGHT` for the whole call so the control thread does not free it meanwhile (rule 1).
pub fn with_published_config(f: impl FnOnce(&CheckConfig)) {
    IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
    let cfg = CONFIG.load(Ordering::SeqCst);
    if !cfg.is_null() {
        // SAFETY: a published configuration stays valid while IN_FLIGHT counts us (rule 1).
        f(unsafe { &*cfg });
    }
    IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
}
