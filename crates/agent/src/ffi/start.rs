//! The agent's start: before `main` when its library was preloaded (an `.init_array` entry),
//! and when `livepatch attach` loaded it into a running process, on that command's call of
//! [`livepatch_attach_start`].
//!
//! Safety model of this module: the constructor is an `extern "C"` function without arguments
//! that lives as long as the process; the dynamic linker calls it once, after the library's
//! relocations, like any constructor. The attach start returns NULL or a C string that is
//! never freed, for the attaching command to read from the process's memory.

use std::ffi::{CString, c_char};
use std::sync::OnceLock;

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

/// Starts the agent in a process it was just loaded into by `livepatch attach` (called by one
/// of the program's threads, stopped and made to call it, with every signal blocked). NULL once
/// the agent runs (or ran already); else why it could not start.
#[unsafe(no_mangle)]
pub extern "C" fn livepatch_attach_start() -> *const c_char {
    static REFUSAL: OnceLock<CString> = OnceLock::new();
    static COPIED: OnceLock<CString> = OnceLock::new();
    // An agent that runs already, but for another process: this one is a copy made without
    // `fork` (a raw `clone` without CLONE_VM runs no fork handler), whose agent has no thread
    // and may hold locks of threads the copy does not have.
    if let Some(agent) = crate::current_agent()
        && agent.pid() != livepatch_arch::signals::getpid() as u32
    {
        return COPIED
            .get_or_init(|| {
                CString::new(format!(
                    "this process is a copy of process {} made without fork() (clone without \
                     CLONE_VM), which carries that process's agent without its thread; it cannot \
                     be started again here",
                    agent.pid()
                ))
                .unwrap_or_default()
            })
            .as_ptr();
    }
    crate::set_attached();
    match crate::start() {
        Ok(()) => std::ptr::null(),
        Err(e) => REFUSAL
            .get_or_init(|| CString::new(e.to_string().replace('\0', " ")).unwrap_or_default())
            .as_ptr(),
    }
}
