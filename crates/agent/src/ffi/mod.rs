//! The C edge of the agent: everything that crosses into or out of C code.
//!
//! - [`descriptor`]: the structures of `livepatch.h` a patch declares, read into the core's
//!   descriptors, and the callbacks they declare, called.
//! - [`dl`]: the dynamic linker (patch libraries, the next definitions of interposed calls).
//! - [`exports`]: the functions `livepatch.h` declares for patch code.
//! - [`interpose`]: `dlopen`, `dlclose`, `dlerror` and `pthread_create` as the program sees them.
//! - [`start`]: the agent's start, before `main` when preloaded or on an attach's call.
//! - [`process`]: the agent's thread without the program's signals, and its clean-up at exit.
//!
//! Only the functions of `exports`, `interpose` and `start`, which C calls with no agent in
//! hand, find the agent through [`crate::current_agent`]; everything below them is passed the agent.

pub mod descriptor;
pub mod dl;
pub mod exports;
pub mod interpose;
pub mod process;
pub mod start;
