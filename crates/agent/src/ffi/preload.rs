//! The agent's start when its library was preloaded: an `.init_array` entry that runs before
//! `main`.
//!
//! Safety model of this module: the constructor is an `extern "C"` function without arguments
//! that lives as long as the process; the dynamic linker calls it once, after the library's
//! relocations, like any constructor.

/// Starts the agent when this library was preloaded, before `main` runs.
extern "C" fn start_when_preloaded() {
    super::dl::resolve_next_definitions();
    let preloaded = std::env::var_os("LD_PRELOAD")
        .is_some_and(|v| v.to_string_lossy().contains("liblivepatch_agent"));
    if preloaded && let Err(e) = crate::start() {
        eprintln!("livepatch: agent not started: {e}");
    }
}

#[used]
#[unsafe(link_section = ".init_array")]
static START_WHEN_PRELOADED: extern "C" fn() = start_when_preloaded;
