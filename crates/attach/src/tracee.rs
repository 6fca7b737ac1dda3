//! One thread of another process held with ptrace: seized, stopped, its registers, extended
//! state and signal mask read and written, its memory read and written, and let go.
//!
//! Safety model of this module: the raw `ptrace` requests nix does not wrap (extended state,
//! signal mask) pass buffers of the size the kernel is told, owned by the caller for the call;
//! nothing else here is unsafe.

use std::io::IoSliceMut;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::uio::{RemoteIoVec, process_vm_readv, process_vm_writev};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// `NT_X86_XSTATE`: the x87, SSE, AVX and later register state.
const NT_X86_XSTATE: libc::c_int = 0x202;
/// Larger than any x86-64 extended state the kernel saves (AMX's is about 11 KiB).
const XSTATE_MAX: usize = 16 * 1024;

/// Everything of a thread a call made in it could change.
#[derive(Clone)]
pub struct SavedState {
    pub regs: libc::user_regs_struct,
    xstate: Vec<u8>,
    sigmask: u64,
}

impl std::fmt::Debug for SavedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SavedState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("rsp", &format_args!("{:#x}", self.regs.rsp))
            .field("sigmask", &format_args!("{:#x}", self.sigmask))
            .finish_non_exhaustive()
    }
}

/// How a thread stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The stop we asked for with `PTRACE_INTERRUPT` (or a group stop).
    Interrupted,
    /// About to receive this signal.
    Signal(Signal),
}

/// Why a thread could not be held or waited for.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("no permission to trace it")]
    Permission,
    #[error("it is gone")]
    Gone,
    #[error("it did not stop within the deadline")]
    Timeout,
    #[error("{what}: {errno}")]
    Failed { what: &'static str, errno: Errno },
}

fn failed(what: &'static str) -> impl Fn(Errno) -> TraceError {
    move |errno| match errno {
        Errno::ESRCH => TraceError::Gone,
        errno => TraceError::Failed { what, errno },
    }
}

/// SIGCHLD blocked on the calling thread while it traces, so that a tracee's stop can be
/// awaited with `sigtimedwait`; the mask is given back when dropped.
#[derive(Debug)]
pub struct ChildSignals {
    previous: nix::sys::signal::SigSet,
}

impl ChildSignals {
    pub fn block() -> Result<ChildSignals, TraceError> {
        block(&[Signal::SIGCHLD]).map(|previous| ChildSignals { previous })
    }
}

fn block(signals: &[Signal]) -> Result<nix::sys::signal::SigSet, TraceError> {
    let mut these = nix::sys::signal::SigSet::empty();
    for &signal in signals {
        these.add(signal);
    }
    let mut previous = nix::sys::signal::SigSet::empty();
    nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_BLOCK,
        Some(&these),
        Some(&mut previous),
    )
    .map_err(failed("pthread_sigmask"))?;
    Ok(previous)
}

/// The signals that end this command from a terminal or a service manager, held back while a
/// thread of the target runs a call this command made (it must not be left in the middle);
/// delivered when dropped.
#[derive(Debug)]
pub struct TerminalSignals {
    previous: Option<nix::sys::signal::SigSet>,
}

impl TerminalSignals {
    pub fn block() -> TerminalSignals {
        let signals = [
            Signal::SIGINT,
            Signal::SIGTERM,
            Signal::SIGHUP,
            Signal::SIGQUIT,
        ];
        TerminalSignals {
            previous: block(&signals).ok(),
        }
    }
}

impl Drop for TerminalSignals {
    fn drop(&mut self) {
        if let Some(previous) = &self.previous {
            let _ = nix::sys::signal::pthread_sigmask(
                nix::sys::signal::SigmaskHow::SIG_SETMASK,
                Some(previous),
                None,
            );
        }
    }
}

impl Drop for ChildSignals {
    fn drop(&mut self) {
        // Taken back as it was: a SIGCHLD still pending is then delivered as usual.
        let _ = nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_SETMASK,
            Some(&self.previous),
            None,
        );
    }
}

/// Waits at most `timeout` for a SIGCHLD (blocked by [`ChildSignals`]).
fn wait_for_child_signal(timeout: Duration) {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(Signal::SIGCHLD);
    let timeout = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: a valid signal set and timeout, both living across the call; no siginfo is
    // asked for. EAGAIN (the timeout) and EINTR only end the wait early.
    unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &timeout) };
}

/// A seized thread; detached when dropped.
#[derive(Debug)]
pub struct Tracee {
    pub tid: Pid,
    attached: bool,
    /// A signal held back while the thread ran a call, delivered when it is let go.
    deferred: Option<Signal>,
}

impl Tracee {
    /// Seizes thread `tid` (it keeps running).
    pub fn seize(tid: i32) -> Result<Tracee, TraceError> {
        let tid = Pid::from_raw(tid);
        match ptrace::seize(tid, ptrace::Options::empty()) {
            Ok(()) => Ok(Tracee {
                tid,
                attached: true,
                deferred: None,
            }),
            Err(Errno::EPERM) => Err(TraceError::Permission),
            Err(e) => Err(failed("PTRACE_SEIZE")(e)),
        }
    }

    /// Stops the thread and waits for the stop by `deadline`; signals that reach it meanwhile
    /// are delivered as they would have been.
    pub fn interrupt(&mut self, deadline: Instant) -> Result<(), TraceError> {
        ptrace::interrupt(self.tid).map_err(failed("PTRACE_INTERRUPT"))?;
        loop {
            match self.wait(deadline)? {
                Stop::Interrupted => return Ok(()),
                Stop::Signal(signal) => {
                    ptrace::cont(self.tid, signal).map_err(failed("PTRACE_CONT"))?;
                }
            }
        }
    }

    /// Waits for the thread's next stop by `deadline`.
    pub fn wait(&mut self, deadline: Instant) -> Result<Stop, TraceError> {
        loop {
            let status = waitpid(self.tid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG))
                .map_err(|e| match e {
                    Errno::ECHILD => TraceError::Gone,
                    e => failed("waitpid")(e),
                })?;
            match status {
                WaitStatus::StillAlive => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(TraceError::Timeout);
                    }
                    // waitpid has no timeout: wait for the SIGCHLD a tracee's stop sends, which
                    // [`ChildSignals`] keeps blocked for this, at most a little while (another
                    // child's signal may have been taken for ours).
                    wait_for_child_signal(left.min(Duration::from_millis(10)));
                }
                WaitStatus::PtraceEvent(_, _, _) => return Ok(Stop::Interrupted),
                WaitStatus::Stopped(_, signal) => return Ok(Stop::Signal(signal)),
                WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                    self.attached = false;
                    return Err(TraceError::Gone);
                }
                _ => {}
            }
        }
    }

    /// Resumes the stopped thread without a signal.
    pub fn resume(&mut self) -> Result<(), TraceError> {
        ptrace::cont(self.tid, None).map_err(failed("PTRACE_CONT"))
    }

    pub fn regs(&self) -> Result<libc::user_regs_struct, TraceError> {
        ptrace::getregs(self.tid).map_err(failed("PTRACE_GETREGS"))
    }

    pub fn set_regs(&self, regs: libc::user_regs_struct) -> Result<(), TraceError> {
        ptrace::setregs(self.tid, regs).map_err(failed("PTRACE_SETREGS"))
    }

    /// The stopped thread's registers, extended state and signal mask.
    pub fn save(&self) -> Result<SavedState, TraceError> {
        let regs = self.regs()?;
        let mut xstate = vec![0u8; XSTATE_MAX];
        let len = self.xstate(libc::PTRACE_GETREGSET, &mut xstate)?;
        xstate.truncate(len);
        let mut sigmask = 0u64;
        // SAFETY: PTRACE_GETSIGMASK writes a signal set of the size given (8 bytes, the
        // kernel's sigset_t) into `sigmask`, which lives across the call.
        let r = unsafe {
            libc::ptrace(
                libc::PTRACE_GETSIGMASK,
                self.tid.as_raw(),
                std::mem::size_of::<u64>(),
                &mut sigmask as *mut u64,
            )
        };
        Errno::result(r).map_err(failed("PTRACE_GETSIGMASK"))?;
        Ok(SavedState {
            regs,
            xstate,
            sigmask,
        })
    }

    /// Gives the thread back everything [`Tracee::save`] read: each part even if another
    /// fails; the first failure is returned.
    pub fn restore(&self, saved: &SavedState) -> Result<(), TraceError> {
        let regs = self.set_regs(saved.regs);
        let xstate = self
            .xstate(libc::PTRACE_SETREGSET, &mut saved.xstate.clone())
            .map(drop);
        let mask = self.set_sigmask(saved.sigmask);
        regs.and(xstate).and(mask)
    }

    /// `PTRACE_GETREGSET` (into `buf`) or `PTRACE_SETREGSET` (from `buf`) of the extended
    /// state; the length the kernel read or wrote.
    fn xstate(&self, request: libc::c_uint, buf: &mut [u8]) -> Result<usize, TraceError> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: the kernel writes (GETREGSET) or reads (SETREGSET) at most iov_len bytes of
        // the buffer iov points to, which lives across the call, and sets iov_len to the length
        // it used.
        let r = unsafe {
            libc::ptrace(
                request,
                self.tid.as_raw(),
                NT_X86_XSTATE as usize as *mut libc::c_void,
                &mut iov as *mut libc::iovec,
            )
        };
        let what = if request == libc::PTRACE_GETREGSET {
            "PTRACE_GETREGSET"
        } else {
            "PTRACE_SETREGSET"
        };
        Errno::result(r).map_err(failed(what))?;
        Ok(iov.iov_len)
    }

    /// Sets the thread's signal mask (SIGKILL and SIGSTOP stay unblocked whatever it says).
    pub fn set_sigmask(&self, mask: u64) -> Result<(), TraceError> {
        let mut mask = mask;
        // SAFETY: PTRACE_SETSIGMASK reads a signal set of the size given from `mask`, which
        // lives across the call.
        let r = unsafe {
            libc::ptrace(
                libc::PTRACE_SETSIGMASK,
                self.tid.as_raw(),
                std::mem::size_of::<u64>(),
                &mut mask as *mut u64,
            )
        };
        Errno::result(r)
            .map(drop)
            .map_err(failed("PTRACE_SETSIGMASK"))
    }

    /// Reads `buf.len()` bytes of the process's memory at `address`.
    pub fn read(&self, address: u64, buf: &mut [u8]) -> Result<(), TraceError> {
        let len = buf.len();
        let remote = [RemoteIoVec {
            base: address as usize,
            len,
        }];
        let n = process_vm_readv(self.tid, &mut [IoSliceMut::new(buf)], &remote)
            .map_err(failed("process_vm_readv"))?;
        if n != len {
            return Err(TraceError::Failed {
                what: "process_vm_readv (short read)",
                errno: Errno::EFAULT,
            });
        }
        Ok(())
    }

    /// Writes `data` into the process's memory at `address`.
    pub fn write(&self, address: u64, data: &[u8]) -> Result<(), TraceError> {
        let remote = [RemoteIoVec {
            base: address as usize,
            len: data.len(),
        }];
        let n = process_vm_writev(self.tid, &[std::io::IoSlice::new(data)], &remote)
            .map_err(failed("process_vm_writev"))?;
        if n != data.len() {
            return Err(TraceError::Failed {
                what: "process_vm_writev (short write)",
                errno: Errno::EFAULT,
            });
        }
        Ok(())
    }

    /// Reads a NUL-terminated string of at most `max` bytes at `address`.
    pub fn read_c_string(&self, address: u64, max: usize) -> Result<String, TraceError> {
        let mut out = Vec::new();
        let mut chunk = [0u8; 256];
        while out.len() < max {
            // Never across a page end: the next page may be unmapped.
            let at = address + out.len() as u64;
            let room = (4096 - (at % 4096) as usize).min(chunk.len());
            self.read(at, &mut chunk[..room])?;
            if let Some(end) = chunk[..room].iter().position(|&b| b == 0) {
                out.extend_from_slice(&chunk[..end]);
                return Ok(String::from_utf8_lossy(&out).into_owned());
            }
            out.extend_from_slice(&chunk[..room]);
        }
        out.truncate(max);
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Holds `signal` back until the thread is let go.
    pub fn defer(&mut self, signal: Signal) {
        self.deferred = Some(signal);
    }

    /// Lets the stopped thread go, running, with the signal held back if there is one.
    pub fn detach(mut self) -> Result<(), TraceError> {
        self.attached = false;
        ptrace::detach(self.tid, self.deferred).map_err(failed("PTRACE_DETACH"))
    }
}

impl Drop for Tracee {
    fn drop(&mut self) {
        if self.attached {
            // A seized thread that is not stopped cannot be detached: stop it first. Whatever
            // fails here, the kernel detaches every tracee when this process exits.
            if ptrace::detach(self.tid, self.deferred).is_err()
                && ptrace::interrupt(self.tid).is_ok()
            {
                // A signal that arrived meanwhile goes with the detach.
                let signal = match self.wait(Instant::now() + Duration::from_secs(1)) {
                    Ok(Stop::Signal(signal)) => Some(signal),
                    _ => self.deferred,
                };
                let _ = ptrace::detach(self.tid, signal);
            }
        }
    }
}
