//! Async-signal-safe building blocks: raw system calls, futexes, the interrupted PC, and thread
//! listing without allocation. Shared with the agent's own per-thread check signal.
//!
//! Safety model of this module: every function here may run in a signal handler or while
//! other threads are parked (allocating nothing, taking no lock), except [`install_handler`];
//! pointers come from the kernel (a handler's `siginfo_t` and `ucontext_t`) or are our own
//! locals, and are only read as the kernel lays them out.
//!
//! System calls go through [`syscall6`], the `syscall` instruction itself, not through libc: a
//! patch may replace a libc function (`getpid`, `pwrite64`, `syscall` itself), and the agent
//! must never run code it is patching while it patches it.

use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// A three-argument `SA_SIGINFO` handler.
pub type SignalHandler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// Why a signal handler could not be installed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignalError {
    /// Only real-time signals are used.
    #[error("signal {signal} is not a real-time signal ({min}..={max})")]
    NotRealTime {
        /// The signal.
        signal: i32,
        /// `SIGRTMIN`.
        min: i32,
        /// `SIGRTMAX`.
        max: i32,
    },
    /// The program handles the signal itself.
    #[error(
        "signal {0} already has a handler in this program; choose another with LIVEPATCH_SIGNAL"
    )]
    Taken(i32),
    /// `sigaction` failed (its errno).
    #[error("sigaction for signal {signal} failed: {}", std::io::Error::from_raw_os_error(*.errno))]
    Sigaction {
        /// The signal.
        signal: i32,
        /// The errno.
        errno: i32,
    },
}

fn last_errno() -> i32 {
    errno()
}

/// Installs `handler` for `signal` with every signal blocked while it runs. Refuses when the
/// program already has a handler there: we never replace the program's own handlers.
/// Where a handler of `signal` returns to: the C library's signal-return trampoline (its
/// `sa_restorer`), which the kernel puts on a thread's stack as the return address of every
/// handler it runs, so a stack that holds it is a stack a handler runs on.
pub fn signal_return(signal: i32) -> Option<usize> {
    // SAFETY: sigaction is plain data; zeroed is a valid "no handler, empty mask" value.
    let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: querying the current action with a null new action changes nothing.
    if unsafe { libc::sigaction(signal, std::ptr::null(), &mut current) } != 0 {
        return None;
    }
    current.sa_restorer.map(|f| f as usize)
}

pub fn install_handler(signal: i32, handler: SignalHandler) -> Result<(), SignalError> {
    if signal < libc::SIGRTMIN() || signal > libc::SIGRTMAX() {
        return Err(SignalError::NotRealTime {
            signal,
            min: libc::SIGRTMIN(),
            max: libc::SIGRTMAX(),
        });
    }
    // SAFETY: sigaction is plain data; zeroed is a valid "no handler, empty mask" value.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: querying the current action with a null new action changes nothing.
    if unsafe { libc::sigaction(signal, std::ptr::null(), &mut old) } != 0 {
        return Err(SignalError::Sigaction {
            signal,
            errno: last_errno(),
        });
    }
    if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != handler as usize {
        return Err(SignalError::Taken(signal));
    }
    // SAFETY: as above, zeroed is a valid starting value.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = handler as usize;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
    // SAFETY: sa_mask is a valid sigset_t inside `action`.
    unsafe { libc::sigfillset(&mut action.sa_mask) };
    // SAFETY: `handler` is an extern "C" SA_SIGINFO handler that lives for the whole program.
    if unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } != 0 {
        return Err(SignalError::Sigaction {
            signal,
            errno: last_errno(),
        });
    }
    Ok(())
}

/// A system call with up to six arguments, made with the `syscall` instruction; the kernel's
/// raw result (a negative errno on failure).
///
/// # Safety
/// The arguments are valid for system call `number`, as its kernel interface requires (memory
/// it reads or writes, file descriptors it uses).
pub unsafe fn syscall6(number: i64, args: [usize; 6]) -> isize {
    let result: isize;
    // SAFETY: the x86-64 Linux system call convention: number in rax, arguments in rdi, rsi,
    // rdx, r10, r8, r9, result in rax; the kernel clobbers rcx and r11 and nothing else, and
    // touches no stack. The caller vouches for the arguments.
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") number as isize => result,
            in("rdi") args[0],
            in("rsi") args[1],
            in("rdx") args[2],
            in("r10") args[3],
            in("r8") args[4],
            in("r9") args[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    result
}

/// [`syscall6`] as `Ok(result)` or `Err(errno)`.
///
/// # Safety
/// As [`syscall6`].
pub unsafe fn syscall(number: i64, args: [usize; 6]) -> Result<usize, i32> {
    // SAFETY: the caller's promise.
    let r = unsafe { syscall6(number, args) };
    if (-4095..0).contains(&r) {
        Err(-r as i32)
    } else {
        Ok(r as usize)
    }
}

/// A system call without pointer arguments.
fn plain_syscall(number: i64, args: [usize; 6]) -> Result<usize, i32> {
    // SAFETY: the callers below pass only integers, which no system call dereferences.
    unsafe { syscall(number, args) }
}

/// This process's id, from the kernel (no cache that a `fork` could leave stale).
pub fn getpid() -> i32 {
    plain_syscall(libc::SYS_getpid, [0; 6]).unwrap_or(0) as i32
}

/// The calling thread's id.
pub fn gettid() -> i32 {
    plain_syscall(libc::SYS_gettid, [0; 6]).unwrap_or(0) as i32
}

/// Sends `signal` (0: only check existence) to thread `tid`; false when the thread is gone.
pub fn tgkill(pid: i32, tid: i32, signal: i32) -> bool {
    plain_syscall(
        libc::SYS_tgkill,
        [pid as usize, tid as usize, signal as usize, 0, 0, 0],
    )
    .is_ok()
}

/// Sends `signal` to thread `tid` of process `pid` with `value` in the siginfo's `si_value`, so
/// the handler learns something without searching for it. False when the thread is gone.
pub fn tgkill_with_value(pid: i32, tid: i32, signal: i32, value: usize) -> bool {
    // SAFETY: an all-zero siginfo is valid; the fields written below are those
    // rt_tgsigqueueinfo reads for SI_QUEUE.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    info.si_signo = signal;
    info.si_code = libc::SI_QUEUE;
    let fields = (&mut info as *mut libc::siginfo_t).cast::<QueuedSigInfo>();
    // SAFETY: `QueuedSigInfo` mirrors the start of the kernel's siginfo for SI_QUEUE, which fits
    // in `siginfo_t`; the pointer is to our local.
    unsafe {
        (*fields).pid = pid;
        // SAFETY: getuid cannot fail.
        (*fields).uid = libc::getuid();
        (*fields).value = value;
    }
    // SAFETY: plain integers and a pointer to a valid siginfo; only our own process's threads.
    unsafe {
        syscall(
            libc::SYS_rt_tgsigqueueinfo,
            [
                pid as usize,
                tid as usize,
                signal as usize,
                &info as *const libc::siginfo_t as usize,
                0,
                0,
            ],
        )
    }
    .is_ok()
}

/// The `si_value` a handler received from [`tgkill_with_value`] of this very process; `None`
/// for any other sender (another process, `kill`, the kernel), whose signals carry nothing for
/// us.
///
/// # Safety
/// `info` is the non-null siginfo the kernel passed to an `SA_SIGINFO` handler.
pub unsafe fn queued_value(info: *const libc::siginfo_t) -> Option<usize> {
    // SAFETY: the caller passes the kernel's siginfo.
    let code = unsafe { (*info).si_code };
    if code != libc::SI_QUEUE {
        return None;
    }
    // SAFETY: for SI_QUEUE the kernel filled the fields `QueuedSigInfo` mirrors.
    let queued = unsafe { &*info.cast::<QueuedSigInfo>() };
    (queued.pid == getpid()).then_some(queued.value)
}

/// Whether a signal was sent with [`tgkill`] by a thread of this process (`SI_TKILL` from our
/// own pid), as the agent's checks are; a handler ignores the signal otherwise.
///
/// # Safety
/// `info` is the non-null siginfo the kernel passed to an `SA_SIGINFO` handler.
pub unsafe fn sent_by_this_process_with_tgkill(info: *const libc::siginfo_t) -> bool {
    // SAFETY: the caller passes the kernel's siginfo.
    let code = unsafe { (*info).si_code };
    // SAFETY: for SI_TKILL the kernel fills the sender's pid and uid where `QueuedSigInfo` has
    // them (the `_kill` member shares the layout's head with `_rt`).
    code == libc::SI_TKILL && unsafe { (*info.cast::<QueuedSigInfo>()).pid } == getpid()
}

/// The head of the kernel's x86-64 siginfo for signals queued by a process (`_rt` member).
#[repr(C)]
struct QueuedSigInfo {
    signo: i32,
    errno: i32,
    code: i32,
    pad: i32,
    pid: i32,
    uid: u32,
    value: usize,
}

/// The calling thread's errno.
pub fn errno() -> i32 {
    // SAFETY: __errno_location returns the calling thread's errno slot, always valid.
    unsafe { *libc::__errno_location() }
}

/// Sets the calling thread's errno (handlers restore it before returning).
pub fn set_errno(value: i32) {
    // SAFETY: as in `errno`.
    unsafe { *libc::__errno_location() = value }
}

/// The PC the thread was interrupted at, from the handler's `ucontext_t`.
pub fn interrupted_pc(context: *mut libc::c_void) -> usize {
    register(context, libc::REG_RIP)
}

/// The stack pointer the thread was interrupted at.
pub fn interrupted_sp(context: *mut libc::c_void) -> usize {
    register(context, libc::REG_RSP)
}

/// The frame pointer register (`rbp`) the thread was interrupted with; unwinders need it for
/// the frames whose unwind rules compute their frame from it.
pub fn interrupted_bp(context: *mut libc::c_void) -> usize {
    register(context, libc::REG_RBP)
}

fn register(context: *mut libc::c_void, index: i32) -> usize {
    if context.is_null() {
        return 0;
    }
    // SAFETY: the kernel passes a valid ucontext_t as the third argument of an SA_SIGINFO
    // handler; we only read it.
    unsafe { (*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs[index as usize] as usize }
}

const MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE: i32 = 32;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: i32 = 64;

/// Registers the process for core-serializing memory barriers; false when the kernel lacks them.
pub fn register_sync_core() -> bool {
    plain_syscall(
        libc::SYS_membarrier,
        [
            MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE as usize,
            0,
            0,
            0,
            0,
            0,
        ],
    )
    .is_ok()
}

/// Makes every thread execute a serializing instruction before it runs user code again, so no
/// core keeps a stale decoded copy of rewritten code. False when the kernel did it not (no
/// registration: kernels before 4.16); the caller serializes otherwise.
pub fn sync_core() -> bool {
    plain_syscall(
        libc::SYS_membarrier,
        [
            MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE as usize,
            0,
            0,
            0,
            0,
            0,
        ],
    )
    .is_ok()
}

/// Sleeps while `*word == expected`, at most `timeout`.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    let spec = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let spec_ptr = spec
        .as_ref()
        .map_or(std::ptr::null(), |s| s as *const libc::timespec);
    // SAFETY: `word` is a valid, aligned 32-bit atomic for the duration of the call, and the
    // timeout pointer is null or points to `spec`, alive until the call returns. A timeout,
    // EINTR or EAGAIN (the word changed) all mean: look again, which the callers do.
    let _ = unsafe {
        syscall(
            libc::SYS_futex,
            [
                word.as_ptr() as usize,
                (libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG) as usize,
                expected as usize,
                spec_ptr as usize,
                0,
                0,
            ],
        )
    };
}

/// Wakes every thread sleeping on `word`.
pub fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is a valid, aligned 32-bit atomic; FUTEX_WAKE only reads its address. It
    // cannot fail for a valid private word.
    let _ = unsafe {
        syscall(
            libc::SYS_futex,
            [
                word.as_ptr() as usize,
                (libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG) as usize,
                i32::MAX as usize,
                0,
                0,
                0,
            ],
        )
    };
}

/// Opens `path` (NUL-terminated) read-only; the file descriptor or the errno.
pub fn open_read_only(path: &[u8], directory: bool) -> Result<i32, i32> {
    if path.last() != Some(&0) {
        return Err(libc::EINVAL);
    }
    let flags = libc::O_RDONLY | libc::O_CLOEXEC | if directory { libc::O_DIRECTORY } else { 0 };
    // SAFETY: a NUL-terminated path that outlives the call.
    unsafe {
        syscall(
            libc::SYS_openat,
            [
                libc::AT_FDCWD as usize,
                path.as_ptr() as usize,
                flags as usize,
                0,
                0,
                0,
            ],
        )
    }
    .map(|fd| fd as i32)
}

/// Reads into `buffer`; the bytes read or the errno.
pub fn read(fd: i32, buffer: &mut [u8]) -> Result<usize, i32> {
    // SAFETY: the kernel writes at most `buffer.len()` bytes into it.
    unsafe {
        syscall(
            libc::SYS_read,
            [
                fd as usize,
                buffer.as_mut_ptr() as usize,
                buffer.len(),
                0,
                0,
                0,
            ],
        )
    }
}

/// Closes a descriptor this module opened.
pub fn close(fd: i32) {
    // Nothing to do about a failing close of a read-only descriptor.
    let _ = plain_syscall(libc::SYS_close, [fd as usize, 0, 0, 0, 0, 0]);
}

/// Whether the calling thread runs on its alternate signal stack.
pub fn on_alternate_signal_stack() -> bool {
    let mut current = std::mem::MaybeUninit::<libc::stack_t>::zeroed();
    // SAFETY: querying only (NULL new stack); `current` is valid for writes.
    let r = unsafe {
        syscall(
            libc::SYS_sigaltstack,
            [0, current.as_mut_ptr() as usize, 0, 0, 0, 0],
        )
    };
    // SAFETY: zero-initialized and filled by a successful call.
    r.is_ok() && unsafe { current.assume_init() }.ss_flags & libc::SS_ONSTACK != 0
}

/// Whether `signal` waits for thread `tid` of this process because the thread blocks it: pending
/// and blocked (`SigPnd` and `SigBlk` of its status file). A thread running the signal's handler
/// blocks it too, but it is no longer pending then: that thread is slow, not refusing.
/// Reads with raw system calls into a stack buffer: safe while other threads are parked.
pub fn signal_held_blocked(tid: i32, signal: i32) -> bool {
    let mut path = [0u8; 64];
    let prefix = b"/proc/self/task/";
    path[..prefix.len()].copy_from_slice(prefix);
    let mut end = prefix.len() + write_decimal(&mut path[prefix.len()..], tid as u32);
    let suffix = b"/status\0";
    path[end..end + suffix.len()].copy_from_slice(suffix);
    end += suffix.len();
    let mut buffer = [0u8; 4096];
    let Ok(fd) = open_read_only(&path[..end], false) else {
        return false;
    };
    let mut filled = 0;
    while filled < buffer.len() {
        match read(fd, &mut buffer[filled..]) {
            Ok(n) if n > 0 => filled += n,
            _ => break,
        }
    }
    close(fd);
    let text = &buffer[..filled];
    let bit = 1u64 << (signal - 1);
    let pending = status_mask(text, b"SigPnd:") | status_mask(text, b"ShdPnd:");
    pending & status_mask(text, b"SigBlk:") & bit != 0
}

/// A hex signal mask field of a status file; 0 when absent.
fn status_mask(text: &[u8], field: &[u8]) -> u64 {
    let Some(at) = text.windows(field.len()).position(|w| w == field) else {
        return 0;
    };
    text[at + field.len()..]
        .iter()
        .skip_while(|b| b.is_ascii_whitespace())
        .take_while(|b| b.is_ascii_hexdigit())
        .fold(0u64, |acc, &b| {
            acc << 4 | (b as char).to_digit(16).expect("hex digit") as u64
        })
}

fn write_decimal(out: &mut [u8], mut value: u32) -> usize {
    let mut digits = [0u8; 10];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (value % 10) as u8;
        n += 1;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    for i in 0..n {
        out[i] = digits[n - 1 - i];
    }
    n
}

/// Lists `/proc/self/task` with `getdents64` into a fixed buffer.
#[derive(Debug)]
pub struct TaskListing {
    buffer: [u8; 16384],
}

impl Default for TaskListing {
    fn default() -> Self {
        Self::new()
    }
}

impl TaskListing {
    /// A listing buffer; keep it alive across passes so no pass allocates.
    pub fn new() -> Self {
        Self { buffer: [0; 16384] }
    }

    /// Calls `each` with every thread id of the process.
    pub fn for_each_tid(&mut self, mut each: impl FnMut(i32)) {
        let Ok(fd) = open_read_only(b"/proc/self/task\0", true) else {
            return;
        };
        loop {
            // SAFETY: getdents64 writes at most `len` bytes into our buffer.
            let n = match unsafe {
                syscall(
                    libc::SYS_getdents64,
                    [
                        fd as usize,
                        self.buffer.as_mut_ptr() as usize,
                        self.buffer.len(),
                        0,
                        0,
                        0,
                    ],
                )
            } {
                Ok(n) if n > 0 => n,
                _ => break,
            };
            let mut offset = 0usize;
            while offset < n {
                // linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, char name[].
                let record = &self.buffer[offset..n];
                let reclen = u16::from_ne_bytes([record[16], record[17]]) as usize;
                let name = &record[19..reclen];
                let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
                if !name.is_empty() && name.iter().all(u8::is_ascii_digit) {
                    let tid = name
                        .iter()
                        .fold(0i32, |acc, &b| acc * 10 + i32::from(b - b'0'));
                    each(tid);
                }
                offset += reclen.max(1);
            }
        }
        close(fd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_finds_this_thread_and_a_new_one() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let helper = std::thread::spawn(move || {
            tx.send(gettid()).unwrap();
            stop_rx.recv().ok();
        });
        let helper_tid = rx.recv().unwrap();
        let mut tids = Vec::new();
        TaskListing::new().for_each_tid(|t| tids.push(t));
        assert!(tids.contains(&gettid()));
        assert!(tids.contains(&helper_tid));
        stop_tx.send(()).unwrap();
        helper.join().unwrap();
    }

    #[test]
    fn a_blocked_pending_signal_is_seen_in_the_status_file() {
        let signal = libc::SIGRTMIN() + 3;
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let helper = std::thread::spawn(move || {
            // SAFETY: sigset operations on a local set, then masking this thread only.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, signal);
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
            tx.send(gettid()).unwrap();
            stop_rx.recv().ok();
        });
        let tid = rx.recv().unwrap();
        assert!(
            !signal_held_blocked(tid, signal),
            "blocked, not yet pending"
        );
        assert!(tgkill(std::process::id() as i32, tid, signal));
        assert!(signal_held_blocked(tid, signal));
        assert!(!signal_held_blocked(gettid(), signal));
        stop_tx.send(()).unwrap();
        helper.join().unwrap();
    }
}
