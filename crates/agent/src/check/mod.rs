//! The per-thread check, the kernel's `klp_try_switch_task`: each pending thread examines its
//! own stack in a signal handler and switches itself when none of the code being superseded is
//! on it; a pending thread entering a function in transition does the same at the entry.
//!
//! - [`config`]: what a round publishes for the handlers, and how it is retired safely.
//! - [`stack`]: the verdict on one stack (a conservative scan, then a precise walk).
//! - [`handler`]: the check signal's handler, and the switch at a function's entry.
//! - [`asleep`]: a thread asleep in a system call, checked by the control thread without a
//!   signal.
//! - [`round`]: a round, run by the control thread: publish, check the sleeping threads,
//!   signal the others, collect the answers.
//!
//! Safety model of this module:
//! 1. The handler acts only on a check signal this process sent with `tgkill`, and only on the
//!    configuration published for the current round, which it reads after counting itself in
//!    `IN_FLIGHT`: the control thread retires a configuration only after unpublishing it and
//!    seeing `IN_FLIGHT` drop to zero, so no handler reads freed memory or switches a thread on
//!    a stale configuration.
//! 2. The handler reads only the interrupted thread's own stack, between its stack pointer and
//!    the end of the mapping that holds it, as listed in the configuration; a stack pointer
//!    outside every listed mapping, or a thread running on an alternate signal stack, makes the
//!    stack "unreliable" rather than clean. The precise walk reads through the same bounds.
//! 3. The handler saves and restores `errno`, allocates nothing, takes no lock, and makes only
//!    async-signal-safe system calls (gettid, getpid, sigaltstack, futex).
//! 4. A stack is "clean" only from a walk that reached the outermost frame by the unwind
//!    tables' own rules, or from the conservative scan of every word; a walk that stopped
//!    anywhere else is never taken for clean. The unwinder belongs to the configuration, so it
//!    lives as long (rule 1).
//! 5. The switch and the check are one step: the thread is in its handler (or its stub's slow
//!    path) and cannot enter any code between them, and the switch is a compare-and-swap from
//!    the pending initial state, so it never overrides a switch made meanwhile.

pub mod asleep;
pub mod config;
pub mod handler;
pub mod round;
pub mod stack;

pub use handler::{install, switch_at_entry};
pub use round::{RoundInput, check_round};
