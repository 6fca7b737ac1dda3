//! Every line the kernel's livepatch core prints, with its exact format string.
//!
//! One function per line, named after what it reports; the level is the
//! kernel's (`pr_notice`, `pr_warn`, `pr_err`, `pr_debug`). Each line carries
//! the `livepatch: ` prefix that the kernel adds through `pr_fmt`, except the
//! message of a `WARN()`, which `pr_fmt` does not reach. See
//! reference/kernel-livepatch.md §6 for the catalogue these follow.

use std::fmt;

/// The prefix of every core line (`pr_fmt` in kernel/livepatch/*.c).
pub const PREFIX: &str = "livepatch: ";

/// How important a line is; the kernel's printk levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// `pr_err`.
    Err,
    /// `pr_warn` (and `WARN` splats).
    Warn,
    /// `pr_notice`: milestones of a transition.
    Notice,
    /// `pr_info`.
    Info,
    /// `pr_debug`: shown by the selftests' dynamic debug settings, except the
    /// per-thread lines of `klp_try_switch_task`.
    Debug,
}

impl Level {
    /// The lower-case name used in logs and JSON (`notice`, `warn`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Err => "err",
            Level::Warn => "warn",
            Level::Notice => "notice",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }
}

/// One line of the log, prefix included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRecord {
    /// The printk level.
    pub level: Level,
    /// The full text, with the `livepatch: ` prefix where the kernel prints one, without a
    /// newline.
    pub text: String,
    /// Whether this is one of the per-thread lines of `klp_try_switch_task`,
    /// which the kernel selftests switch off with dynamic debug.
    pub per_thread: bool,
}

impl fmt::Display for LogRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn line(level: Level, args: fmt::Arguments<'_>) -> LogRecord {
    LogRecord {
        level,
        text: format!("{PREFIX}{args}"),
        per_thread: false,
    }
}

fn per_thread(args: fmt::Arguments<'_>) -> LogRecord {
    LogRecord {
        level: Level::Debug,
        text: format!("{PREFIX}{args}"),
        per_thread: true,
    }
}

/// "patching" or "unpatching", as `%s` in the transition lines.
pub(crate) fn direction(patching: bool) -> &'static str {
    if patching { "patching" } else { "unpatching" }
}

// Lifecycle (transition.c, core.c).

pub(crate) fn enabling_patch(patch: &str) -> LogRecord {
    line(Level::Notice, format_args!("enabling patch '{patch}'"))
}
pub(crate) fn initializing_transition(patch: &str, patching: bool) -> LogRecord {
    let d = direction(patching);
    line(
        Level::Debug,
        format_args!("'{patch}': initializing {d} transition"),
    )
}
pub(crate) fn starting_transition(patch: &str, patching: bool) -> LogRecord {
    let d = direction(patching);
    line(
        Level::Notice,
        format_args!("'{patch}': starting {d} transition"),
    )
}
pub(crate) fn completing_transition(patch: &str, patching: bool) -> LogRecord {
    let d = direction(patching);
    line(
        Level::Debug,
        format_args!("'{patch}': completing {d} transition"),
    )
}
pub(crate) fn transition_complete(patch: &str, patching: bool) -> LogRecord {
    let d = direction(patching);
    line(Level::Notice, format_args!("'{patch}': {d} complete"))
}
pub(crate) fn canceling_transition(patch: &str) -> LogRecord {
    line(
        Level::Debug,
        format_args!("'{patch}': canceling patching transition, going to unpatch"),
    )
}
pub(crate) fn reversing_transition(patch: &str, from_patching: bool) -> LogRecord {
    let how = if from_patching {
        "patching to unpatching"
    } else {
        "unpatching to patching"
    };
    line(
        Level::Debug,
        format_args!("'{patch}': reversing transition from {how}"),
    )
}
pub(crate) fn signaling_remaining_tasks() -> LogRecord {
    line(Level::Notice, format_args!("signaling remaining tasks"))
}
pub(crate) fn forcing_remaining_tasks() -> LogRecord {
    line(
        Level::Warn,
        format_args!("forcing remaining tasks to the patched state"),
    )
}

// Per-thread results of klp_try_switch_task.

const TRY_SWITCH: &str = "klp_try_switch_task";

pub(crate) fn thread_is_running(comm: &str, tid: i32) -> LogRecord {
    per_thread(format_args!("{TRY_SWITCH}: {comm}:{tid} is running"))
}
pub(crate) fn thread_has_unreliable_stack(comm: &str, tid: i32) -> LogRecord {
    per_thread(format_args!(
        "{TRY_SWITCH}: {comm}:{tid} has an unreliable stack"
    ))
}
pub(crate) fn thread_is_sleeping_on(comm: &str, tid: i32, func: &str) -> LogRecord {
    per_thread(format_args!(
        "{TRY_SWITCH}: {comm}:{tid} is sleeping on function {func}"
    ))
}
pub(crate) fn thread_unknown_error(code: i32, comm: &str, tid: i32) -> LogRecord {
    per_thread(format_args!(
        "{TRY_SWITCH}: Unknown error code ({code}) when trying to switch {comm}:{tid}"
    ))
}

// Enable and module notifier errors (core.c).

pub(crate) fn pre_patch_failed(object: &str) -> LogRecord {
    line(
        Level::Warn,
        format_args!("pre-patch callback failed for object '{object}'"),
    )
}
pub(crate) fn failed_to_patch_object(object: &str) -> LogRecord {
    line(
        Level::Warn,
        format_args!("failed to patch object '{object}'"),
    )
}
pub(crate) fn failed_to_enable_patch(patch: &str) -> LogRecord {
    line(
        Level::Warn,
        format_args!("failed to enable patch '{patch}'"),
    )
}
pub(crate) fn not_compatible(patch: &str) -> LogRecord {
    line(
        Level::Err,
        format_args!(
            "Livepatch patch ({patch}) is not compatible with the already installed livepatches."
        ),
    )
}
pub(crate) fn reverting_patch_on_unloading(patch: &str, module: &str) -> LogRecord {
    line(
        Level::Notice,
        format_args!("reverting patch '{patch}' on unloading module '{module}'"),
    )
}
pub(crate) fn applying_patch_to_loading(patch: &str, module: &str) -> LogRecord {
    line(
        Level::Notice,
        format_args!("applying patch '{patch}' to loading module '{module}'"),
    )
}
pub(crate) fn invalid_module_name() -> LogRecord {
    line(Level::Err, format_args!("vmlinux.ko: invalid module name"))
}
pub(crate) fn failed_to_initialize_for_module(patch: &str, module: &str, err: i32) -> LogRecord {
    line(
        Level::Warn,
        format_args!("failed to initialize patch '{patch}' for module '{module}' ({err})"),
    )
}
pub(crate) fn failed_to_apply_to_module(patch: &str, module: &str, err: i32) -> LogRecord {
    line(
        Level::Warn,
        format_args!("failed to apply patch '{patch}' to module '{module}' ({err})"),
    )
}
pub(crate) fn refusing_to_load_module(patch: &str, module: &str) -> LogRecord {
    line(
        Level::Warn,
        format_args!(
            "patch '{patch}' failed for module '{module}', refusing to load module '{module}'"
        ),
    )
}

// Symbol resolution (core.c).

pub(crate) fn symbol_not_found(name: &str) -> LogRecord {
    line(
        Level::Err,
        format_args!("symbol '{name}' not found in symbol table"),
    )
}
pub(crate) fn symbol_ambiguous(name: &str, object: &str) -> LogRecord {
    line(
        Level::Err,
        format_args!("unresolvable ambiguity for symbol '{name}' in object '{object}'"),
    )
}
pub(crate) fn symbol_position_not_found(pos: u64, name: &str, object: &str) -> LogRecord {
    line(
        Level::Err,
        format_args!("symbol position {pos} for symbol '{name}' in object '{object}' not found"),
    )
}
pub(crate) fn size_lookup_failed(name: &str) -> LogRecord {
    line(
        Level::Err,
        format_args!("kallsyms size lookup failed for '{name}'"),
    )
}
pub(crate) fn replacement_size_lookup_failed(name: &str) -> LogRecord {
    line(
        Level::Err,
        format_args!("kallsyms size lookup failed for '{name}' replacement"),
    )
}

// Redirection (patch.c).

pub(crate) fn failed_to_find_location(func: &str) -> LogRecord {
    line(
        Level::Err,
        format_args!("failed to find location for function '{func}'"),
    )
}
pub(crate) fn failed_to_register_handler(func: &str, err: i32) -> LogRecord {
    line(
        Level::Err,
        format_args!("failed to register ftrace handler for function '{func}' ({err})"),
    )
}

// Shadow variables (shadow.c).

pub(crate) fn shadow_construct_failed(obj: usize, id: u64, err: i32) -> LogRecord {
    line(
        Level::Err,
        format_args!("Failed to construct shadow variable <{obj:#x}, {id:x}> ({err})"),
    )
}
/// Printed by `WARN()`, which does not apply `pr_fmt`: the line has no `livepatch: ` prefix.
pub(crate) fn shadow_duplicate(obj: usize, id: u64) -> LogRecord {
    LogRecord {
        level: Level::Warn,
        text: format!("Duplicate shadow variable <{obj:#x}, {id:x}>"),
        per_thread: false,
    }
}

/// A `WARN_ON_ONCE` of the kernel: an impossible state was observed. It is
/// logged, never ignored silently; debug builds also assert.
pub fn warning(what: &str) -> LogRecord {
    line(Level::Warn, format_args!("WARNING: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_prefix_and_exact_wording() {
        assert_eq!(
            transition_complete("p", true).text,
            "livepatch: 'p': patching complete"
        );
        assert_eq!(
            reversing_transition("p", false).text,
            "livepatch: 'p': reversing transition from unpatching to patching"
        );
        let l = thread_is_sleeping_on("worker", 42, "do_work");
        assert!(l.per_thread);
        assert_eq!(
            l.text,
            "livepatch: klp_try_switch_task: worker:42 is sleeping on function do_work"
        );
        assert_eq!(
            refusing_to_load_module("p", "m").text,
            "livepatch: patch 'p' failed for module 'm', refusing to load module 'm'"
        );
    }
}
