//! What refuses an attach before anything is done to the process, each with its reason: a
//! process that is gone, stopped, already traced, not a 64-bit x86 program, statically linked,
//! confined by seccomp, or that cannot see the agent's file where this command sees it.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use object::Endianness;
use object::read::elf::{ElfFile64, ProgramHeader};

use crate::target_objects::in_target_view;

/// A field of `/proc/PID/status`.
fn status_field(status: &str, name: &str) -> Option<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
}

/// The command name of `pid`, escaped for a message.
pub fn command_name(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/comm"))
        .map(|n| {
            String::from_utf8_lossy(n.trim_ascii_end())
                .escape_debug()
                .to_string()
        })
        .unwrap_or_else(|_| "?".into())
}

/// Checks everything that can be known about `pid` without tracing it but the agent's file
/// ([`check_agent_visible`]); the reason it cannot be attached to, if any.
pub fn check_process(pid: u32) -> Result<(), String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|_| format!("no process {pid}"))?;
    let state = status_field(&status, "State").unwrap_or_default();
    if state.starts_with('Z') || state.starts_with('X') {
        return Err(format!("process {pid} has exited ({state})"));
    }
    if state.starts_with('T') || state.starts_with('t') {
        return Err(format!(
            "process {pid} is stopped ({state}): continue it (kill -CONT {pid}) first"
        ));
    }
    let tracer: u32 = status_field(&status, "TracerPid")
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    if tracer != 0 {
        return Err(format!(
            "process {pid} is already traced by process {tracer} ({}), a debugger or another \
             tool; a process has one tracer: detach it first",
            command_name(tracer)
        ));
    }
    match status_field(&status, "Seccomp").as_deref() {
        Some("1") => {
            return Err(format!(
                "process {pid} runs in seccomp strict mode, which allows no system call the \
                 agent's start needs"
            ));
        }
        Some("2") => {
            return Err(format!(
                "process {pid} runs under a seccomp filter, which may forbid (or kill the \
                 process for) the system calls the agent's start makes (openat, mmap, clone, \
                 socket); start the program with `livepatch run` instead"
            ));
        }
        _ => {}
    }
    // The calls end with a SIGSEGV the stop takes; the kernel makes an ignored fault signal
    // take its default action again, which would change the program's disposition.
    let ignored = status_field(&status, "SigIgn")
        .and_then(|mask| u64::from_str_radix(&mask, 16).ok())
        .unwrap_or(0);
    if ignored & (1 << (libc::SIGSEGV - 1)) != 0 {
        return Err(format!(
            "process {pid} ignores SIGSEGV, which the attach's calls end with: the kernel would \
             reset it to its default action"
        ));
    }
    check_program(pid)
}

/// The program must be a dynamically linked x86-64 ELF: the agent is loaded by its loader.
fn check_program(pid: u32) -> Result<(), String> {
    let exe = format!("/proc/{pid}/exe");
    let data = match std::fs::read(&exe) {
        Ok(data) => data,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(permission_refusal(pid));
        }
        Err(e) => return Err(format!("cannot read {exe}: {e}")),
    };
    let program = std::fs::read_link(&exe)
        .map(|p| p.display().to_string().escape_debug().to_string())
        .unwrap_or_else(|_| exe.clone());
    loadable_program(&data).map_err(|why| format!("process {pid} runs {program}, {why}"))
}

/// Why a program file (its bytes) cannot get the agent, if it cannot: not a 64-bit x86-64
/// ELF, or statically linked. Said as the end of a sentence naming the program.
pub fn loadable_program(data: &[u8]) -> Result<(), String> {
    if data.len() < 20 || &data[..4] != b"\x7fELF" {
        return Err("which is not an ELF program".into());
    }
    if data[4] != 2 {
        return Err("a 32-bit program: only 64-bit x86-64 programs can be patched".into());
    }
    let machine = u16::from_le_bytes([data[18], data[19]]);
    if data[5] != 1 || machine != 62 {
        return Err(format!("built for ELF machine {machine}, not x86-64 (62)"));
    }
    let elf = ElfFile64::<Endianness>::parse(data)
        .map_err(|e| format!("which cannot be read as ELF: {e}"))?;
    let endian = elf.endian();
    let has_loader = elf
        .elf_program_headers()
        .iter()
        .any(|header| header.p_type(endian) == object::elf::PT_INTERP);
    if !has_loader {
        return Err(
            "which is statically linked: it has no dynamic loader to load the agent, \
                    and cannot be patched"
                .into(),
        );
    }
    Ok(())
}

/// Why tracing fails, said with what can be done about it.
pub fn permission_refusal(pid: u32) -> String {
    let me = nix::unistd::geteuid().as_raw();
    // The effective uid: the second of the four.
    let owner = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| status_field(&status, "Uid"))
        .and_then(|uids| uids.split_whitespace().nth(1).map(str::to_owned))
        .unwrap_or_else(|| "?".into());
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let why = match scope {
        Some(1) => {
            "/proc/sys/kernel/yama/ptrace_scope is 1 (restricted: a process may trace only its \
             descendants): run as root or with CAP_SYS_PTRACE, or set it to 0"
        }
        Some(2) => {
            "/proc/sys/kernel/yama/ptrace_scope is 2 (admin-only: tracing needs CAP_SYS_PTRACE): \
             run as root or with CAP_SYS_PTRACE"
        }
        Some(3) => {
            "/proc/sys/kernel/yama/ptrace_scope is 3 (no process may trace any other until the \
             next boot)"
        }
        _ => {
            "a process may trace only processes of its own user that did not change \
             credentials (setuid programs, or ones that made themselves undumpable): run as \
             root or with CAP_SYS_PTRACE"
        }
    };
    format!(
        "no permission to trace process {pid} (uid {owner}; this command runs as uid {me}): {why}"
    )
}

/// The agent's file must be the same file in the process's view (a process in another mount
/// namespace, a container, sees other files at the same paths).
pub fn check_agent_visible(pid: u32, agent: &Path) -> Result<(), String> {
    let ours = std::fs::metadata(agent)
        .map_err(|e| format!("cannot use the agent {}: {e}", agent.display()))?;
    let path = agent.to_string_lossy();
    let theirs = std::fs::metadata(in_target_view(pid, &path));
    match theirs {
        Ok(m) if m.dev() == ours.dev() && m.ino() == ours.ino() => Ok(()),
        Ok(_) => Err(format!(
            "process {pid} sees another file at {path} (it runs in another mount namespace, a \
             container?): make the agent visible to it at the same path, for instance with a \
             bind mount"
        )),
        Err(e) => Err(format!(
            "process {pid} cannot see the agent at {path} ({e}; it runs in another mount \
             namespace, a container?): make the agent visible to it at the same path, for \
             instance with a bind mount"
        )),
    }
}
