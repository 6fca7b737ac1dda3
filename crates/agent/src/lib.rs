//! The in-process livepatch agent: joins the core (`livepatch-core`) to real threads, code and
//! libraries through the x86-64 layer (`livepatch-arch`), and serves the `livepatch` command on
//! a Unix socket.
//!
//! - [`runtime`]: the agent, its commands, loading and unloading patch libraries.
//! - [`platform`]: the core's platform trait implemented on this process.
//! - [`threads`]: per-thread records and the signal-driven stack checks.
//! - [`unwind`]: precise stack walks over the loaded objects' unwind tables, for those checks.
//! - [`abi`] / [`capi`]: the C ABI of `livepatch.h`, both directions.
//! - [`loader`]: `dlopen`/`dlclose`/`pthread_create` interposition.
//! - [`server`], [`log`]: the control socket and the log ring.
//!
//! Loaded with `LD_PRELOAD` (see `livepatch run`), the agent starts itself; a Rust program that
//! links it calls [`start`].

pub mod abi;
pub mod capi;
pub mod loader;
pub mod log;
pub mod platform;
pub mod runtime;
pub mod server;
pub mod threads;
pub mod unwind;

pub use runtime::{StartError, start};

/// Starts the agent when this library was preloaded, before `main` runs.
extern "C" fn start_when_preloaded() {
    loader::resolve_next_definitions();
    let preloaded = std::env::var_os("LD_PRELOAD")
        .is_some_and(|v| v.to_string_lossy().contains("liblivepatch_agent"));
    if preloaded && let Err(e) = start() {
        eprintln!("livepatch: agent not started: {e}");
    }
}

#[used]
#[unsafe(link_section = ".init_array")]
static START_WHEN_PRELOADED: extern "C" fn() = start_when_preloaded;
