//! Threads of the process as the consistency model sees them: a record per thread with its
//! patch state ([`records`]), what the core publishes for threads to act on ([`published`]),
//! and the threads inside a stub's slow path ([`slow_path`]). The checks that switch threads
//! are in `crate::check`.

pub mod published;
pub mod records;
pub mod slow_path;

pub use records::{
    ThreadRecord, dispatch_state, forget, prepare, record, register, register_birth,
    register_forked, set_state, state_of, update_patch_state,
};
pub use slow_path::{set_in_slow_path, synchronize};
