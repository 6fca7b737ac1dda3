//! A thread of this process asleep in a system call, seen from another of its threads: where
//! it sleeps (`/proc/self/task/TID/syscall`: the call, its stack pointer and instruction
//! pointer) and how often it was switched out (`/proc/self/task/TID/status`). A thread found
//! asleep twice in the same call with the same switch counts did not run in between, so its
//! stack did not change: it can be read from outside, without a signal that would make its
//! call fail with EINTR.

/// A thread asleep in a system call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Asleep {
    /// The system call's number.
    pub call: i64,
    /// The stack pointer at the call.
    pub sp: u64,
    /// The instruction pointer after the `syscall` instruction.
    pub pc: u64,
    /// Voluntary plus involuntary context switches so far.
    switches: u64,
}

/// Thread `tid` of this process, if it is asleep in a system call now. The switch counts are
/// read first: [`still_asleep`] reads them last.
pub fn asleep(tid: i32) -> Option<Asleep> {
    let switches = switches(tid)?;
    let (call, sp, pc) = syscall(tid)?;
    Some(Asleep {
        call,
        sp,
        pc,
        switches,
    })
}

/// Whether thread `tid` is asleep in the same call as `before` and was not switched out since:
/// it did not run in between (a thread that ran and sleeps again was switched out once more;
/// one that runs now shows as running).
pub fn still_asleep(tid: i32, before: &Asleep) -> bool {
    let Some((call, sp, pc)) = syscall(tid) else {
        return false;
    };
    (call, sp, pc) == (before.call, before.sp, before.pc) && switches(tid) == Some(before.switches)
}

/// The call, stack pointer and instruction pointer of a thread blocked in a system call:
/// `NR ARG1 .. ARG6 SP PC`. `running`, or `-1 SP PC` (blocked outside a call), is `None`.
fn syscall(tid: i32) -> Option<(i64, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).ok()?;
    let fields: Vec<&str> = text.split_ascii_whitespace().collect();
    if fields.len() != 9 {
        return None;
    }
    let call: i64 = fields[0].parse().ok()?;
    let hex = |f: &str| u64::from_str_radix(f.strip_prefix("0x")?, 16).ok();
    (call >= 0).then_some((call, hex(fields[7])?, hex(fields[8])?))
}

fn switches(tid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
    let count = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))?
            .trim()
            .parse()
            .ok()
    };
    Some(count("voluntary_ctxt_switches:")? + count("nonvoluntary_ctxt_switches:")?)
}

/// Copies `buf.len()` bytes of this process's memory at `address` into `buf`; false if any of
/// it is not mapped readable (a thread's stack unmapped meanwhile), instead of a fault.
pub fn copy_memory(address: u64, buf: &mut [u8]) -> bool {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: address as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which we own for the
    // call, and reads the remote range itself, failing with EFAULT where it is not mapped.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    n >= 0 && n as usize == buf.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_thread_blocked_in_read_is_asleep_and_stays_so_until_it_runs() {
        let (fds_tx, fds_rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut fds = [0; 2];
            // SAFETY: pipe writes two descriptors into the array.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            // SAFETY: gettid has no arguments and cannot fail.
            let tid = unsafe { libc::gettid() };
            fds_tx.send((tid, fds[1])).unwrap();
            let mut byte = 0u8;
            // SAFETY: reads one byte into `byte`.
            unsafe { libc::read(fds[0], (&raw mut byte).cast(), 1) };
            byte
        });
        let (tid, write_end) = fds_rx.recv().unwrap();
        let seen = loop {
            if let Some(seen) = asleep(tid) {
                break seen;
            }
            std::thread::yield_now();
        };
        assert_eq!(seen.call, libc::SYS_read);
        assert!(still_asleep(tid, &seen));
        let mut word = [0u8; 8];
        assert!(copy_memory(seen.sp, &mut word));
        // SAFETY: writes one byte from a local array.
        let written = unsafe { libc::write(write_end, [7u8].as_ptr().cast(), 1) };
        assert_eq!(written, 1);
        assert_eq!(reader.join().unwrap(), 7);
        assert!(!still_asleep(tid, &seen));
        assert!(!copy_memory(8, &mut word), "address 8 is never mapped");
    }
}
