//! The control socket: a Unix socket per process in a well-known directory,
//! served by the agent's one control thread, which also runs the
//! transition work between requests.
//!
//! One thread serves every connection with `poll`, so the agent never adds
//! more than one thread to the program. Only the process's own user and
//! root may connect (checked with the peer's credentials).

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use livepatch_protocol::{Command, Request, Response, VERSION};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

use crate::agent::Agent;
use crate::control::requests;

/// The longest a request line may be.
const MAX_LINE: usize = 64 * 1024;

/// The most connections served at once; one more is closed as soon as it is accepted.
pub const MAX_CONNECTIONS: usize = 64;

/// The descriptors the control thread serves (its listener and connections), kept where a
/// forked child, which has no control thread, can find its copies and close them.
static SERVED: [AtomicI32; MAX_CONNECTIONS + 1] =
    [const { AtomicI32::new(-1) }; MAX_CONNECTIONS + 1];

/// Records a served descriptor; false when the table is full.
fn track(fd: RawFd) -> bool {
    SERVED.iter().any(|slot| {
        slot.compare_exchange(-1, fd, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    })
}

fn untrack(fd: RawFd) {
    for slot in &SERVED {
        let _ = slot.compare_exchange(fd, -1, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// The descriptors the control thread served when this was read: in a forked child, the
/// parent's, which the child must close.
pub fn served_descriptors() -> Vec<RawFd> {
    SERVED
        .iter()
        .map(|slot| slot.load(Ordering::Acquire))
        .filter(|&fd| fd >= 0)
        .collect()
}

struct Connection {
    stream: UnixStream,
    buf: Vec<u8>,
    /// A wait request held back: the patch and when to answer at the latest.
    waiting: Option<(String, Instant)>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        untrack(self.stream.as_raw_fd());
    }
}

/// Whether the peer is this process's user or root.
fn peer_allowed(stream: &UnixStream) -> bool {
    let me = nix::unistd::geteuid().as_raw();
    getsockopt(stream, PeerCredentials).is_ok_and(|cred| cred.uid() == 0 || cred.uid() == me)
}

/// Serves the socket forever, running the transition work when it is due.
pub fn serve(agent: &'static Agent, listener: UnixListener) {
    agent.set_control_thread();
    livepatch_arch::register_sync_core();
    track(listener.as_raw_fd());
    let mut conns: Vec<Connection> = Vec::new();
    loop {
        let now = Instant::now();
        let timeout = conns
            .iter()
            .filter_map(|c| c.waiting.as_ref())
            .map(|(_, deadline)| deadline.saturating_duration_since(now))
            .chain(agent.until_next_work())
            .fold(
                if crate::looks_for_libraries() {
                    crate::ATTACHED_LIBRARY_POLL
                } else {
                    Duration::from_secs(1)
                },
                Duration::min,
            );
        let ready: Vec<PollFlags> = {
            let mut fds: Vec<PollFd<'_>> = std::iter::once(listener.as_fd())
                .chain(conns.iter().map(|c| c.stream.as_fd()))
                .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
                .collect();
            let ms = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
            match poll(&mut fds, ms) {
                Ok(n) if n > 0 => fds
                    .iter()
                    .map(|fd| fd.revents().unwrap_or(PollFlags::empty()))
                    .collect(),
                // A timeout, or EINTR: nothing is ready.
                _ => Vec::new(),
            }
        };
        if let Some((listening, connections)) = ready.split_first() {
            if listening.contains(PollFlags::POLLIN) {
                accept_all(&listener, &mut conns);
            }
            let mut closed = Vec::new();
            for (i, revents) in connections.iter().enumerate() {
                if revents.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
                    && !serve_connection(agent, &mut conns[i])
                {
                    closed.push(i);
                }
            }
            for i in closed.into_iter().rev() {
                conns.remove(i);
            }
        }
        agent.run_work();
        conns.retain_mut(|conn| answer_wait(agent, conn));
    }
}

/// Answers a held-back wait once its transition ended or its time is up, then the requests
/// that queued behind it. Returns false when the connection is finished.
fn answer_wait(agent: &'static Agent, conn: &mut Connection) -> bool {
    let Some((patch, deadline)) = &conn.waiting else {
        return true;
    };
    if agent.in_transition(patch) && Instant::now() < *deadline {
        return true;
    }
    let Some((patch, _)) = conn.waiting.take() else {
        return true;
    };
    let answer = requests::handle(
        agent,
        Command::Wait {
            patch,
            timeout_ms: 0,
        },
    );
    if reply(&mut conn.stream, &answer).is_err() {
        return false;
    }
    answer_lines(agent, conn)
}

fn accept_all(listener: &UnixListener, conns: &mut Vec<Connection>) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if !peer_allowed(&stream) || !track(stream.as_raw_fd()) {
                    continue;
                }
                // Untracked again when dropped, whatever happens next.
                let conn = Connection {
                    stream,
                    buf: Vec::new(),
                    waiting: None,
                };
                if conn.stream.set_nonblocking(true).is_ok() {
                    conns.push(conn);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}

/// Reads what the peer sent and answers every complete line. Returns false
/// when the connection is finished.
fn serve_connection(agent: &'static Agent, conn: &mut Connection) -> bool {
    let mut chunk = [0u8; 4096];
    loop {
        match conn.stream.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
        if conn.buf.len() > MAX_LINE {
            let _ = reply(
                &mut conn.stream,
                &Response::error(libc::E2BIG, "request line too long"),
            );
            return false;
        }
    }
    answer_lines(agent, conn)
}

/// Answers the complete request lines received, until one is a wait that must be held back.
fn answer_lines(agent: &'static Agent, conn: &mut Connection) -> bool {
    while conn.waiting.is_none()
        && let Some(end) = conn.buf.iter().position(|b| *b == b'\n')
    {
        let line: Vec<u8> = conn.buf.drain(..=end).collect();
        let response = match serde_json::from_slice::<Request>(&line) {
            Ok(req) if req.v != VERSION => Response::error(
                libc::EPROTO,
                format!(
                    "the client speaks protocol {} and the agent {VERSION}",
                    req.v
                ),
            ),
            Ok(Request {
                command: Command::Wait { patch, timeout_ms },
                ..
            }) if agent.in_transition(&patch) => {
                let deadline = Instant::now() + Duration::from_millis(timeout_ms);
                conn.waiting = Some((patch, deadline));
                continue;
            }
            Ok(req) => requests::handle(agent, req.command),
            Err(e) => Response::error(libc::EINVAL, format!("malformed request: {e}")),
        };
        if reply(&mut conn.stream, &response).is_err() {
            return false;
        }
    }
    true
}

fn reply(stream: &mut UnixStream, response: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.set_nonblocking(false)?;
    let r = stream.write_all(&line);
    stream.set_nonblocking(true)?;
    r
}
