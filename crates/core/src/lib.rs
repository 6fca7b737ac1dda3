//! The livepatch core: everything a live patch does, decided before any
//! machine code is touched, with the semantics of the Linux kernel's livepatch
//! subsystem.
//!
//! The crate is pure and deterministic: no unsafe code, no threads of its own,
//! no I/O. It reaches the process it patches only through the [`Platform`]
//! trait; the simulator (`livepatch-sim`) implements it for tests and the
//! in-process agent for real programs.
//!
//! # Tour
//!
//! Each module follows one file of the kernel's `kernel/livepatch/`:
//!
//! - [`patch`]: patch, object, func and state descriptors and their
//!   validation (core.c `klp_init_*`).
//! - [`lifecycle`]: [`Livepatch`], enabling and disabling patches, objects
//!   loaded and unloaded later (core.c).
//! - [`func_stack`]: func stacks and the dispatch rule of the stub
//!   (patch.c, `klp_ftrace_handler`).
//! - [`transition`]: the transition steps (transition.c).
//! - [`thread_state`]: a thread's state and the rules threads follow between
//!   the core's steps: switch points, clean checks, threads found late
//!   (transition.c, `klp_update_patch_state`, `klp_copy_process`).
//! - [`ranges`]: the code that blocks a thread, and address lookups in it
//!   (`klp_check_stack_func`).
//! - [`replace`]: atomic replace, nops and replaced patches.
//! - [`callbacks`]: per-object callbacks and their gating.
//! - [`state`]: system states, compatibility and per-state callbacks
//!   (state.c and seed 004).
//! - [`shadow`]: shadow variables (shadow.c).
//! - [`sysfs`]: the attribute tree of `/sys/kernel/livepatch`.
//! - [`log`]: every line the kernel prints, with its format string.
//! - [`platform`]: the trait through which the core acts.
//! - [`errno`]: the kernel's error numbers.
//!
//! # Example
//!
//! ```
//! use livepatch_core::{Livepatch, PatchDesc, ObjectDesc, FuncDesc};
//! let desc = PatchDesc {
//!     name: "fix".into(),
//!     objs: vec![ObjectDesc {
//!         name: None,
//!         funcs: vec![FuncDesc { old_name: "parse".into(), new_func: 0x7000, old_sympos: 0 }],
//!         ..Default::default()
//!     }],
//!     ..Default::default()
//! };
//! let core = Livepatch::new();
//! assert!(core.patch_names().is_empty());
//! # let _ = desc;
//! ```
//!
//! What the crate deliberately does not do: find symbols, write code, stop
//! threads or walk stacks. It says which code ranges block a thread and which
//! target a stub must pick; platforms do the rest.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod callbacks;
pub mod errno;
pub mod func_stack;
pub mod lifecycle;
pub mod log;
pub mod patch;
pub mod platform;
pub mod ranges;
pub mod replace;
pub mod shadow;
pub mod state;
pub mod sysfs;
pub mod thread_state;
pub mod transition;

pub use callbacks::ObjectCallbacks;
pub use errno::Errno;
pub use func_stack::{Dispatch, StackEntry, Target};
pub use lifecycle::{ComingError, Livepatch};
pub use log::{Level, LogRecord};
pub use patch::{
    EnableError, FuncDesc, MAIN_OBJECT_NAME, ObjectDesc, PatchDesc, PatchId, StateCallbacks,
    StateDesc,
};
pub use platform::{
    FuncLocation, ObjectCallback, ObjectCallbackKind, Platform, RegisterError, ResolveError,
    SiteRegistration, StateCallback, StateCallbackKind, SwitchResult,
};
pub use ranges::{BlockingRange, CodeKind, DisjointRange, DisjointRanges};
pub use shadow::{ShadowBlock, ShadowData, ShadowVars};
pub use state::{PrevStates, StateRef};
pub use sysfs::{FuncStatus, ObjectStatus, PatchStatus, SysfsEntry, kstrtobool};
pub use thread_state::{PackedThreadState, PatchState, ThreadState};
pub use transition::BlockReason;

/// An address in the patched process.
pub type Addr = u64;
/// A thread id (`pid_t` of the thread).
pub type Tid = i32;
/// A platform's handle for a callback function (the agent stores a function
/// pointer; the simulator an index into its script table).
pub type CallbackId = u64;
