//! Attaching the agent to a process that was started without it (`livepatch attach`, and
//! `livepatch load` on such a process): one of its threads, stopped with ptrace at a point
//! where it holds neither the loader's nor the allocator's locks, is made to call the C
//! library's `dlopen` on the agent and then the agent's start, and is given back exactly as it
//! was: registers, extended (vector) state, signal mask, red zone, and a system call it was
//! interrupted in, which the kernel restarts. The other threads keep running throughout.

pub mod preflight;
mod remote_call;
mod safe_point;
mod target_objects;
mod tracee;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use remote_call::{Arg, CallError, call};
use safe_point::UnsafeCode;
use target_objects::{LibraryFunction, TargetObject};
use tracee::{TraceError, Tracee};

/// The agent's exported start for an attach: returns NULL once started, else its reason as
/// a C string.
pub const START_SYMBOL: &str = "livepatch_attach_start";

/// How many times every thread is tried before the attach gives up.
const TRIES: u32 = 50;

/// `RTLD_NOW | RTLD_GLOBAL`: the agent's exports (`klp_shadow_get`, ...) must resolve the
/// patch libraries loaded later, as a preloaded agent's do; `__libc_dlopen_mode` also wants
/// glibc's private `__RTLD_DLOPEN`.
const RTLD_NOW_GLOBAL: u64 = 2 | 0x100;
const RTLD_DLOPEN: u64 = 0x8000_0000;

/// The signals a fault raises: left unblocked during the calls, because the kernel resets the
/// handler of a fault signal that is blocked when it is raised (the return to address 0 raises
/// SIGSEGV, which the stop then takes before any handler could run).
const FAULT_SIGNALS: [i32; 5] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGTRAP,
];

/// How long the calls may take once started, whatever the command's deadline: a call cannot be
/// abandoned (the thread would return into nothing), so it gets all the time a loader can need.
const CALL_BUDGET: Duration = Duration::from_secs(60);

/// System calls that fail with EINTR rather than restart when a ptrace stop interrupts them:
/// a thread sleeping in one is tried last.
const NOT_RESTARTED: [i64; 8] = [
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_select,
    libc::SYS_pselect6,
    libc::SYS_io_getevents,
];

/// Why an attach did not happen.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// Nothing was done to the process.
    #[error("{0}")]
    Refused(String),
    /// The agent was not loaded or did not start; the thread used was given back as it was.
    #[error("{0}")]
    Failed(String),
}

/// An attach that happened.
#[derive(Debug, Clone, Copy)]
pub struct Attached {
    /// The thread that loaded the agent.
    pub tid: i32,
    /// How long that thread was stopped; no other thread was.
    pub stopped: Duration,
}

/// The loader's entry the agent is loaded with.
#[derive(Debug, Clone, Copy)]
struct Loader {
    open: u64,
    flags: u64,
    error: Option<u64>,
}

impl Loader {
    /// glibc 2.34 and later export `dlopen` from the C library itself; older ones have the
    /// private `__libc_dlopen_mode` there (and `dlopen` in libdl, which a program may lack).
    fn find(objects: &[TargetObject]) -> Option<Loader> {
        let libc = objects
            .iter()
            .find(|o| o.function("__libc_start_main").is_some())?;
        if let Some(open) = libc.function("dlopen") {
            return Some(Loader {
                open,
                flags: RTLD_NOW_GLOBAL,
                error: libc.function("dlerror"),
            });
        }
        let open = libc.function("__libc_dlopen_mode")?;
        let error = objects.iter().find_map(|o| o.function("dlerror"));
        Some(Loader {
            open,
            flags: RTLD_NOW_GLOBAL | RTLD_DLOPEN,
            error,
        })
    }
}

/// Loads and starts the agent in process `pid` by `deadline`. The agent's file is asked of
/// `agent` once the process passed every check that does not need it, so that nothing is made
/// for a process that is refused anyway.
pub fn attach(
    pid: u32,
    agent: impl FnOnce() -> PathBuf,
    deadline: Instant,
) -> Result<Attached, AttachError> {
    preflight::check_process(pid).map_err(AttachError::Refused)?;
    let agent = agent();
    let agent = agent.canonicalize().map_err(|e| {
        AttachError::Refused(format!("cannot use the agent {}: {e}", agent.display()))
    })?;
    preflight::check_agent_visible(pid, &agent).map_err(AttachError::Refused)?;
    let maps = livepatch_arch::maps::read_process(pid).map_err(|e| {
        AttachError::Refused(format!("cannot read the mappings of process {pid}: {e}"))
    })?;
    let objects = target_objects::objects(pid, &maps);
    let loader = Loader::find(&objects).ok_or_else(|| {
        AttachError::Refused(format!(
            "process {pid} maps no GNU C library with `dlopen` or `__libc_dlopen_mode`: the \
             agent cannot be loaded into it"
        ))
    })?;
    let unsafe_code = UnsafeCode::of(&objects);
    let start = LibraryFunction::find(&agent, START_SYMBOL).ok_or_else(|| {
        AttachError::Refused(format!(
            "{} exports no {START_SYMBOL}: is it the livepatch agent?",
            agent.display()
        ))
    })?;
    let _child_signals = tracee::ChildSignals::block()
        .map_err(|e| AttachError::Failed(format!("cannot wait for process {pid}: {e}")))?;
    let mut last_reasons: Vec<(i32, String)> = Vec::new();
    let mut tried = 0u32;
    for round in 1..=TRIES {
        last_reasons.clear();
        for tid in threads(pid) {
            if Instant::now() >= deadline {
                break;
            }
            tried += 1;
            let mut attempt = Attempt {
                pid,
                tid,
                agent: &agent,
                start,
                loader,
                unsafe_code: &unsafe_code,
                deadline,
            };
            match attempt.run() {
                Ok(Ok(stopped)) => return Ok(Attached { tid, stopped }),
                Ok(Err(why)) => last_reasons.push((tid, why)),
                Err(AttemptError::Trace(TraceError::Permission)) => {
                    return Err(AttachError::Refused(preflight::permission_refusal(pid)));
                }
                // A thread that exited meanwhile, or one that would not stop in time (in an
                // uninterruptible sleep): the next one.
                Err(AttemptError::Trace(TraceError::Gone | TraceError::Timeout)) => {}
                Err(AttemptError::Trace(e)) => {
                    return Err(AttachError::Failed(format!(
                        "tracing thread {tid} of process {pid}: {e}"
                    )));
                }
                Err(AttemptError::Failed(message)) => return Err(AttachError::Failed(message)),
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        // Let the threads run on, out of the code they were in.
        std::thread::sleep(Duration::from_millis(u64::from(round)));
    }
    if tried == 0 {
        return Err(AttachError::Refused(format!(
            "the time given ran out before any thread of process {pid} could be tried"
        )));
    }
    let reasons: Vec<String> = last_reasons
        .iter()
        .take(4)
        .map(|(tid, why)| format!("thread {tid}: {why}"))
        .collect();
    Err(AttachError::Refused(format!(
        "no thread of process {pid} was at a point where it could load the agent (outside the \
         dynamic loader and the allocator) at any of the tries: {}",
        if reasons.is_empty() {
            "no thread could be stopped in time".to_owned()
        } else {
            reasons.join("; ")
        }
    )))
}

/// The threads of `pid` in the order they are tried: those a stop cannot make fail a system
/// call first (a thread sleeping in `epoll_wait`, `poll` or `select` would see EINTR), the main
/// thread first among equals (it has the largest stack).
fn threads(pid: u32) -> Vec<i32> {
    let mut tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let sleeps_in_unrestarted_call = |tid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall"))
            .ok()
            .and_then(|s| s.split_ascii_whitespace().next()?.parse::<i64>().ok())
            .is_some_and(|call| NOT_RESTARTED.contains(&call))
    };
    tids.sort_by_cached_key(|&t| (sleeps_in_unrestarted_call(t), t != pid as i32, t));
    tids
}

#[derive(Debug)]
enum AttemptError {
    Trace(TraceError),
    Failed(String),
}

impl From<TraceError> for AttemptError {
    fn from(e: TraceError) -> Self {
        AttemptError::Trace(e)
    }
}

/// One try with one thread.
struct Attempt<'a> {
    pid: u32,
    tid: i32,
    agent: &'a Path,
    start: LibraryFunction,
    loader: Loader,
    unsafe_code: &'a UnsafeCode,
    deadline: Instant,
}

impl Attempt<'_> {
    /// Stops the thread; if it is at a safe point, loads and starts the agent with it. The
    /// time it was stopped, or why it was not used.
    fn run(&mut self) -> Result<Result<Duration, String>, AttemptError> {
        let stopped_at = Instant::now();
        let mut thread = Tracee::seize(self.tid)?;
        thread.interrupt(self.deadline)?;
        let saved = thread.save()?;
        let maps = livepatch_arch::maps::read_process(self.pid)
            .map_err(|_| AttemptError::Trace(TraceError::Gone))?;
        if let Some(why) = self.unsafe_code.why_not(&thread, &saved.regs, &maps)? {
            thread.detach()?;
            return Ok(Err(why));
        }
        // No signal handler may run on the call's frames; pending signals wait for the mask
        // to be given back. Fault signals stay unblocked (see FAULT_SIGNALS).
        let faults = FAULT_SIGNALS
            .iter()
            .fold(0u64, |mask, &signal| mask | 1 << (signal - 1));
        thread.set_sigmask(!faults)?;
        // Started, the calls are seen through: neither the deadline nor a Ctrl-C of this command
        // may leave the thread in the middle of them.
        self.deadline = self.deadline.max(Instant::now() + CALL_BUDGET);
        let _no_interruption = tracee::TerminalSignals::block();
        let result = self.load_and_start(&mut thread, &saved.regs);
        if let Err(AttemptError::Trace(TraceError::Timeout)) = result {
            // The call is still running after all that time (a deadlock the safe point did not
            // foresee): its registers cannot be given back under it, and letting it go would
            // make it return into nothing. It stays stopped until this command ends.
            return Err(AttemptError::Failed(format!(
                "the loader call in thread {} of process {} did not return within {} s (a \
                 deadlock): the thread is left inside it, and gets SIGSEGV if the call ever \
                 returns",
                self.tid,
                self.pid,
                CALL_BUDGET.as_secs()
            )));
        }
        thread.restore(&saved)?;
        thread.detach()?;
        result.map(|()| Ok(stopped_at.elapsed()))
    }

    fn load_and_start(
        &self,
        thread: &mut Tracee,
        regs: &libc::user_regs_struct,
    ) -> Result<(), AttemptError> {
        let pid = self.pid;
        let path = CString::new(self.agent.as_os_str().as_bytes())
            .map_err(|_| AttemptError::Failed("the agent's path holds a NUL byte".into()))?;
        let handle = self.call(
            thread,
            regs,
            self.loader.open,
            &[Arg::Data, Arg::Value(self.loader.flags)],
            path.as_bytes_with_nul(),
        )?;
        if handle == 0 {
            let why = match self.loader.error {
                Some(dlerror) => {
                    let message = self.call(thread, regs, dlerror, &[], &[])?;
                    if message == 0 {
                        "no reason given".to_owned()
                    } else {
                        thread.read_c_string(message, 4096)?
                    }
                }
                None => "no reason given".to_owned(),
            };
            return Err(AttemptError::Failed(format!(
                "the dynamic loader of process {pid} could not load the agent {}: {}",
                self.agent.display(),
                why.escape_debug()
            )));
        }
        let maps = livepatch_arch::maps::read_process(pid)
            .map_err(|_| AttemptError::Trace(TraceError::Gone))?;
        let agent_path = self.agent.to_string_lossy();
        let start = self.start.address_in(&maps, &agent_path).ok_or_else(|| {
            AttemptError::Failed(format!(
                "{} was loaded into process {pid} but is not in its mappings",
                self.agent.display()
            ))
        })?;
        let refusal = self.call(thread, regs, start, &[], &[])?;
        if refusal != 0 {
            let why = thread.read_c_string(refusal, 4096)?;
            return Err(AttemptError::Failed(format!(
                "the agent was loaded into process {pid} but did not start: {}",
                why.escape_debug()
            )));
        }
        Ok(())
    }

    fn call(
        &self,
        thread: &mut Tracee,
        regs: &libc::user_regs_struct,
        function: u64,
        args: &[Arg],
        data: &[u8],
    ) -> Result<u64, AttemptError> {
        call(thread, regs, function, args, data, self.deadline).map_err(|e| match e {
            CallError::Trace(t) => AttemptError::Trace(t),
            CallError::Faulted { signal, rip } => AttemptError::Failed(format!(
                "a call in thread {} of process {} faulted ({signal} at {rip:#x})",
                self.tid, self.pid
            )),
        })
    }
}
