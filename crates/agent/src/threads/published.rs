//! What the core publishes for threads to act on between its steps: `klp_target_state`, and
//! the state of threads born from now on (`klp_copy_process`). Read by signal handlers, the
//! stub's slow path and threads being born, so kept in atomics.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU8, Ordering};

use livepatch_core::{PackedThreadState, PatchState, ThreadState};

/// `klp_target_state`, packed as a switched thread's state.
static TARGET: AtomicU8 = AtomicU8::new(PackedThreadState::IDLE.0);

/// The state of threads born from now on.
static NEW_THREADS: AtomicU8 = AtomicU8::new(PackedThreadState::IDLE.0);

/// Publishes `klp_target_state`.
pub fn set_target(target: PatchState) {
    let packed = PackedThreadState::pack(ThreadState::switched_to(target));
    TARGET.store(packed.0, Ordering::SeqCst);
}

/// The published `klp_target_state`.
pub fn target() -> PatchState {
    PackedThreadState(TARGET.load(Ordering::SeqCst))
        .unpack()
        .state
}

/// Publishes the state of threads born from now on.
pub fn set_new_threads(state: ThreadState) {
    NEW_THREADS.store(PackedThreadState::pack(state).0, Ordering::SeqCst);
}

/// The state a thread born now starts in.
pub fn new_threads() -> ThreadState {
    PackedThreadState(NEW_THREADS.load(Ordering::SeqCst)).unpack()
}

/// The state of a thread found running whose birth nobody saw (the core's rule).
pub fn discovered() -> ThreadState {
    ThreadState::discovered(new_threads(), target())
}
