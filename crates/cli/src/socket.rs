//! Finding the agent of a process and making sure it is that process that answers.
//!
//! The socket of process N of user U is `<base>/<U>/<N>.sock` (`livepatch_protocol::socket`).
//! Before a request is sent, every part of that path is checked (no symbolic link; the base
//! owned by root or U and sticky where others may write; U's directory owned by U and closed to
//! others; the socket owned by U), and once connected the peer's credentials must name process
//! N and user U: another user's socket, a squatter's directory or a fake server is refused with
//! the reason, never believed. A process that dropped root's privileges after its agent started
//! has its socket in root's directory (U = 0), where only root can have made it, and the peer's
//! credentials, taken when it listened, name root and process N.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use livepatch_protocol::directories::{Distrust, trust_base, trust_user_dir};
use livepatch_protocol::socket::{SOCKET_DIR_ENV, bases, socket_path};
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, UnixAddr, connect, getsockopt, socket,
    sockopt::PeerCredentials,
};

/// The user a process runs as (its effective uid, which owns what it creates).
pub fn process_uid(pid: u32) -> anyhow::Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|_| anyhow!("no process {pid}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|euid| euid.parse().ok())
        .ok_or_else(|| anyhow!("cannot read the user of process {pid}"))
}

/// What `/proc/N/stat` says the process is doing, for messages: `T (stopped)`.
pub fn process_state(pid: u32) -> String {
    let state = crate::process_tree::stat_field(pid, 0).unwrap_or_else(|| "?".to_owned());
    let meaning = match state.as_str() {
        "R" => "running",
        "S" => "sleeping",
        "D" => "in uninterruptible sleep",
        "T" => "stopped",
        "t" => "stopped by a debugger",
        "Z" => "a zombie",
        "X" => "dead",
        _ => "unknown",
    };
    format!("{state}: {meaning}")
}

/// `LIVEPATCH_SOCKET_DIR` as the target process sees it, when its environment can be read.
pub fn target_socket_dir(pid: u32) -> Option<OsString> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let key = format!("{SOCKET_DIR_ENV}=");
    environ
        .split(|&b| b == 0)
        .find_map(|var| var.strip_prefix(key.as_bytes()))
        .map(|v| OsStr::from_bytes(v).to_owned())
}

/// The base directories to look in for process `pid`: this command's choice, the target's
/// own, then the defaults, each once.
fn candidate_bases(pid: u32) -> Vec<PathBuf> {
    let mut all = bases(std::env::var_os(SOCKET_DIR_ENV).as_deref());
    if let Some(theirs) = target_socket_dir(pid) {
        all.extend(bases(Some(&theirs)));
    }
    all.extend(bases(None));
    let mut unique = Vec::new();
    for base in all {
        if !unique.contains(&base) {
            unique.push(base);
        }
    }
    unique
}

fn distrust(path: &Path, why: String) -> anyhow::Error {
    anyhow!("{} {why}: refusing to trust it", path.display())
}

/// Checks every part of the way to a socket that exists, by the rules the agent made it by
/// (`livepatch_protocol::directories`).
fn check_path(base: &Path, socket: &Path, uid: u32) -> anyhow::Result<()> {
    let dir = socket.parent().unwrap_or(base);
    for (path, trust) in [
        (
            base,
            trust_base as fn(u32, u32, u32) -> Result<(), Distrust>,
        ),
        (dir, trust_user_dir),
    ] {
        let meta = std::fs::symlink_metadata(path)?;
        if meta.file_type().is_symlink() || !meta.is_dir() {
            return Err(distrust(path, "is not a directory".into()));
        }
        trust(meta.uid(), meta.mode() & 0o7777, uid)
            .map_err(|why| distrust(path, why.to_string()))?;
    }
    let socket_meta = std::fs::symlink_metadata(socket)?;
    if !socket_meta.file_type().is_socket() {
        return Err(distrust(socket, "is not a socket".into()));
    }
    if socket_meta.uid() != uid {
        return Err(distrust(
            socket,
            format!("is owned by uid {}, not by uid {uid}", socket_meta.uid()),
        ));
    }
    Ok(())
}

/// The socket of process `pid`, checked, and the user whose directory holds it: the user the
/// process runs as, or root for a process that started as root and dropped its privileges
/// since (a server's workers), whose agent bound its socket while it was root.
pub fn locate(pid: u32) -> anyhow::Result<(PathBuf, u32)> {
    let process_uid = process_uid(pid)?;
    let bases = candidate_bases(pid);
    let owners: &[u32] = if process_uid == 0 {
        &[0]
    } else {
        &[process_uid, 0]
    };
    for (base, &uid) in bases
        .iter()
        .flat_map(|base| owners.iter().map(move |uid| (base, uid)))
    {
        let path = socket_path(base, uid, pid);
        if std::fs::symlink_metadata(&path).is_err() {
            // Nothing there, or a directory on the way missing or closed to us; a squatter's
            // directory shows as a directory that fails the checks below.
            if let Ok(meta) = std::fs::symlink_metadata(path.parent().unwrap_or(base))
                && meta.uid() != uid
            {
                check_path(base, &path, uid)?;
            }
            continue;
        }
        check_path(base, &path, uid)?;
        return Ok((path, uid));
    }
    let looked: Vec<String> = bases
        .iter()
        .map(|b| socket_path(b, process_uid, pid).display().to_string())
        .collect();
    Err(NoAgent {
        pid,
        why: format!("no socket at {}", looked.join(" or ")),
    }
    .into())
}

/// Process `pid` has no agent that could answer (no socket, or a stale one): the one failure to
/// connect that `--children` passes over.
#[derive(Debug)]
pub struct NoAgent {
    pub pid: u32,
    why: String,
}

impl std::fmt::Display for NoAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no livepatch agent answers in process {} ({}); attach one with `livepatch attach \
             {}` (`livepatch load` does), or start the program with `livepatch run PROGRAM`",
            self.pid, self.why, self.pid
        )
    }
}

impl std::error::Error for NoAgent {}

fn unix_stream(path: &Path, deadline: Instant, pid: u32) -> anyhow::Result<UnixStream> {
    let address = UnixAddr::new(path)?;
    loop {
        let fd: OwnedFd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        match connect(fd.as_raw_fd(), &address) {
            Ok(()) => {
                let stream = UnixStream::from(fd);
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            // A Unix socket's backlog is full: the agent is not accepting (stopped or busy).
            Err(Errno::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(Errno::EAGAIN) => bail!(
                "process {pid} does not answer (state {}): its agent accepts no connection",
                process_state(pid)
            ),
            Err(Errno::ECONNREFUSED) => {
                // Nobody listens: the socket was left by an earlier process with this pid, or
                // by this one before it exec'd another program (the agent does not survive
                // exec unless LD_PRELOAD brings it back).
                let made_by_this_process = made_after_start(path, pid);
                let removed = std::fs::remove_file(path).is_ok();
                let removed = if removed { ", removed" } else { "" };
                let why = if made_by_this_process {
                    format!(
                        "its agent is gone: {} is the socket it left when the process exec'd a \
                         new program{removed}",
                        path.display()
                    )
                } else {
                    format!(
                        "{} is a stale socket left by an earlier process with that pid{removed}",
                        path.display()
                    )
                };
                return Err(NoAgent { pid, why }.into());
            }
            Err(errno) => bail!("cannot connect to {}: {errno}", path.display()),
        }
    }
}

/// Whether the socket at `path` was made after process `pid` started: by that process.
fn made_after_start(path: &Path, pid: u32) -> bool {
    // `/proc/PID/stat` counts the start in clock ticks since boot, which Linux exports at 100
    // per second (USER_HZ) on every architecture it runs x86-64 on.
    const TICKS_PER_SECOND: f64 = 100.0;
    let start_ticks: Option<f64> =
        crate::process_tree::stat_field(pid, 19).and_then(|ticks| ticks.parse().ok());
    // The boot's wall-clock time to a hundredth of a second (`btime` has whole seconds).
    let uptime: Option<f64> = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_ascii_whitespace().next()?.parse().ok());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .ok();
    let boot = uptime.zip(now).map(|(up, now)| now - up);
    let made = std::fs::symlink_metadata(path)
        .ok()
        .map(|m| m.mtime() as f64 + m.mtime_nsec() as f64 / 1e9);
    match (start_ticks, boot, made) {
        // Both clocks count in hundredths of a second: allow two.
        (Some(ticks), Some(boot), Some(made)) => made > boot + ticks / TICKS_PER_SECOND + 0.02,
        _ => false,
    }
}

/// Connects to the agent of `pid` by `deadline`, and checks that it is that process, of its
/// user, that answers.
pub fn connect_to(pid: u32, deadline: Instant) -> anyhow::Result<UnixStream> {
    let (path, uid) = locate(pid)?;
    let stream = unix_stream(&path, deadline, pid)?;
    let peer = getsockopt(&stream, PeerCredentials)?;
    if peer.pid() as u32 != pid || peer.uid() != uid {
        bail!(
            "socket {} is served by pid {} uid {}, not by process {pid} (uid {uid}): refusing to \
             talk to it",
            path.display(),
            peer.pid(),
            peer.uid()
        );
    }
    Ok(stream)
}
