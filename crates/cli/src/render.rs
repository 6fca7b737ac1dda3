//! Text for people: status tables, progress lines, advice.

use std::fmt::Write;
use std::time::Duration;

use livepatch_protocol::{Progress, Status, ThreadStatus};

fn state_name(s: i8) -> &'static str {
    match s {
        -1 => "idle",
        0 => "unpatched",
        1 => "patched",
        _ => "?",
    }
}

fn flag(b: bool) -> u8 {
    u8::from(b)
}

fn process_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// `livepatch list`: one line per process.
pub fn list(rows: &[(u32, Option<Status>)]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{:>8}  {:<16}  PATCHES", "PID", "COMMAND");
    for (pid, status) in rows {
        let patches = match status {
            None => "(agent not answering)".to_string(),
            Some(s) if s.patches.is_empty() => "-".to_string(),
            Some(s) => s
                .patches
                .iter()
                .map(|p| {
                    let mut name = p.name.clone();
                    if p.transition {
                        name.push_str(if p.enabled {
                            " (patching)"
                        } else {
                            " (unpatching)"
                        });
                    }
                    name
                })
                .collect::<Vec<_>>()
                .join(", "),
        };
        let _ = writeln!(out, "{pid:>8}  {:<16}  {patches}", process_name(*pid));
    }
    out
}

fn blocking(t: &ThreadStatus) -> String {
    t.blocking.clone().unwrap_or_default()
}

/// `livepatch status`: the attribute tree and the threads.
pub fn status(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "process {} ({})", s.pid, process_name(s.pid));
    match &s.transition {
        Some(t) => {
            let _ = writeln!(out, "transition: '{}' to {}", t.patch, t.target);
        }
        None => {
            let _ = writeln!(out, "transition: none");
        }
    }
    if s.patches.is_empty() {
        let _ = writeln!(out, "patches: none");
    }
    for p in &s.patches {
        let _ = writeln!(out, "patch '{}'  ({})", p.name, p.library);
        let _ = writeln!(
            out,
            "  enabled {}  transition {}  replace {}  stack_order {}{}",
            flag(p.enabled),
            flag(p.transition),
            flag(p.replace),
            p.stack_order,
            if p.forced { "  forced" } else { "" }
        );
        for o in &p.objects {
            let _ = writeln!(out, "  {}/  patched {}", o.name, flag(o.patched));
            for f in &o.funcs {
                let target = if f.nop {
                    "nop (original)".to_string()
                } else {
                    format!("{:#x}", f.new_addr)
                };
                let old = f
                    .old_addr
                    .map(|a| format!("{a:#x}"))
                    .unwrap_or_else(|| "not loaded".into());
                let _ = writeln!(
                    out,
                    "    {},{}  {old} -> {target}{}",
                    f.name,
                    f.sympos.max(1),
                    if f.transition { "  (transition)" } else { "" }
                );
            }
        }
    }
    for l in &s.unloadable {
        let _ = writeln!(
            out,
            "library of disabled patch '{}': {}{}",
            l.patch,
            l.library,
            if l.forced {
                "  (forced: cannot be unloaded)"
            } else {
                ""
            }
        );
    }
    let _ = writeln!(out, "threads:");
    let _ = writeln!(
        out,
        "  {:>8}  {:<16}  {:<9}  PENDING  BLOCKED ON",
        "TID", "NAME", "STATE"
    );
    for t in &s.threads {
        let _ = writeln!(
            out,
            "  {:>8}  {:<16}  {:<9}  {:<7}  {}",
            t.tid,
            t.name,
            state_name(t.patch_state),
            if t.pending { "yes" } else { "no" },
            blocking(t)
        );
    }
    out
}

fn blocked_summary(s: &Progress) -> (usize, Vec<String>) {
    let pending = &s.pending;
    let blocked = pending
        .iter()
        .filter(|t| t.blocking.is_some())
        .map(|t| format!("{} ({}) {}", t.tid, t.name, describe_block(&blocking(t))))
        .collect();
    (pending.len(), blocked)
}

fn describe_block(b: &str) -> String {
    match b {
        // The agent puts reasons that are not a function in parentheses.
        reason if reason.starts_with('(') => reason.to_string(),
        f => format!("in {f}"),
    }
}

/// The one-line progress of a transition.
pub fn progress(s: &Progress, patch: &str) -> String {
    let target = s
        .transition
        .as_ref()
        .map(|t| t.target.as_str())
        .unwrap_or("?");
    let (pending, blocked) = blocked_summary(s);
    let mut line = format!(
        "livepatch: '{patch}' to {target}: {pending} of {} threads pending",
        s.threads
    );
    if !blocked.is_empty() {
        let shown: Vec<&String> = blocked.iter().take(3).collect();
        let _ = write!(
            line,
            "; {}",
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        if blocked.len() > 3 {
            let _ = write!(line, " and {} more", blocked.len() - 3);
        }
    }
    line
}

/// What to say when a wait times out.
pub fn timeout_advice(
    s: &Progress,
    pid: u32,
    patch: &str,
    patching: bool,
    waited: Duration,
) -> String {
    let (pending, blocked) = blocked_summary(s);
    let reverse = if patching { "disable" } else { "enable" };
    let mut msg = format!(
        "the transition of '{patch}' is still running after {:.1} s: {pending} thread(s) pending",
        waited.as_secs_f64()
    );
    if !blocked.is_empty() {
        let _ = write!(msg, " ({})", blocked.join(", "));
    }
    let _ = write!(
        msg,
        ".\nIt goes on in the background: watch it with `livepatch status {pid}`, reverse it with \
         `livepatch {reverse} {pid} {patch}`, or force it with `livepatch force {pid} {patch}` \
         (threads still in old code keep running it"
    );
    if patching {
        msg.push_str("; the patches it replaces can then never be unloaded).");
    } else {
        msg.push_str("; the patch can then never be unloaded).");
    }
    msg
}
