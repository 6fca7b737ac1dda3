//! The x86-64 machine-code layer of livepatch, the user-space counterpart of ftrace and
//! `text_poke`: find functions in the loaded objects, send a function's callers to a dispatch
//! stub and back, and rewrite code while other threads run.
//!
//! - [`objects`]: the link map (main executable, libraries, build ids).
//! - [`symbols`]: function symbols from the files, with the kernel's `old_sympos` rule.
//! - [`entry`]: how a function's entry is redirected (patchable pad, or relocated prologue).
//! - [`redirect`]: stubs, the slow path, batched redirect and restore.
//! - [`stop_world`]: parking every other thread around a code write.
//! - [`signals`]: async-signal-safe helpers shared with the agent.

pub mod code_memory;
pub mod entry;
pub mod maps;
pub mod objects;
pub mod redirect;
pub mod signals;
pub mod stop_world;
pub mod symbols;

pub use redirect::{Decider, Dispatch, SiteInfo, SiteSpec};

use std::time::Duration;

/// Why a redirection or a code write could not happen. Nothing was changed when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedirectError {
    /// The function's code cannot be redirected safely.
    #[error("cannot redirect function '{function}': {reason}")]
    Unpatchable {
        /// The function.
        function: String,
        /// Why.
        reason: String,
    },
    /// No redirection exists at the address.
    #[error("no redirected function at {0:#x}")]
    NotRedirected(usize),
    /// Executable memory could not be found or mapped.
    #[error("cannot allocate stub memory: {0}")]
    Memory(String),
    /// The stop signal is missing or taken.
    #[error("{0}")]
    Signal(String),
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
    /// A thread stayed inside the bytes to rewrite through every retry.
    #[error(
        "thread {tid} kept executing at {pc:#x}, inside code to be rewritten; code was not changed"
    )]
    ThreadInsideRewrite {
        /// The thread.
        tid: i32,
        /// Its PC.
        pc: usize,
    },
    /// The process has more threads than the stop table holds.
    #[error("more than {0} threads; cannot stop them all")]
    TooManyThreads(usize),
}

/// Installs the stop-the-world signal handler (a real-time signal the program does not use) and
/// registers for core-serializing barriers. Call once before redirecting anything.
pub fn install_stop_signal(signal: i32) -> Result<(), RedirectError> {
    signals::register_sync_core();
    stop_world::install(signal)
}
