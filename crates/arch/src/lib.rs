//! The x86-64 machine-code layer of livepatch, the user-space counterpart of ftrace and
//! `text_poke`: find functions in the loaded objects, send a function's callers to a dispatch
//! stub and back, rewrite code while other threads run, and walk stacks by the unwind tables.
//!
//! - [`objects`]: the link map (main executable, libraries, build ids, unwind sections), read
//!   by one scanner.
//! - [`symbols`]: function symbols from the files, with the kernel's `old_sympos` rule.
//! - [`entry`]: how a function's entry is redirected (patchable pad, or relocated prologue):
//!   analysis and relocation, every refusal.
//! - [`stub`]: a site's code and data blocks, and the slow path every stub shares.
//! - [`code_memory`]: stub memory near the code it serves, never writable and executable.
//! - [`code_write`]: writes to live code through `/proc/self/mem`, committed with the world
//!   stopped.
//! - [`redirect`]: the registry of sites: plan, redirect, dispatch, restore.
//! - [`stop_world`]: parking every other thread around a code write.
//! - [`unwind`]: precise stack walks over the loaded objects' `.eh_frame` tables, usable in a
//!   signal handler.
//! - [`signals`], [`maps`]: async-signal-safe helpers shared with the agent, and the memory map.

pub mod asleep;
pub mod code_memory;
pub mod code_write;
pub mod entry;
pub mod maps;
pub mod objects;
pub mod redirect;
pub mod signals;
pub mod stop_world;
pub mod stub;
pub mod symbols;
#[cfg(any(test, feature = "test-support"))]
#[doc(hidden)]
pub mod test_support;
pub mod unwind;

pub use redirect::{Decider, Dispatch, RedirectError, SiteInfo, SiteSpec};

/// Installs the stop-the-world signal handler (a real-time signal the program does not use).
/// Call once before redirecting anything.
pub fn install_stop_signal(signal: i32) -> Result<(), stop_world::StopError> {
    stop_world::install(signal)
}

/// Registers the process for core-serializing barriers, which code writes use once it is done
/// (before, they serialize otherwise). In a process that already has several threads the
/// kernel makes this wait for an RCU grace period, some milliseconds: the agent's own thread
/// does it, not a program thread that an attach stopped.
pub fn register_sync_core() -> bool {
    signals::register_sync_core()
}
