//! Whether a stopped thread may be made to call the dynamic loader: not while it is inside the
//! loader or an allocator, whose locks it may hold (the call would wait for itself forever).
//! The thread's instruction pointer and every word of its stack are compared with the code of
//! the loader and of the functions that take those locks; a word that only looks like a return
//! address into them makes the thread wait for a later try, never a deadlock.

use livepatch_arch::maps::{self, Mapping};

use crate::target_objects::TargetObject;
use crate::tracee::{TraceError, Tracee};

/// Exported functions that hold the allocator's or the loader's locks while they run, or call
/// what does with a lock of their own held.
const LOCK_HOLDERS: &[&str] = &[
    "malloc",
    "free",
    "calloc",
    "realloc",
    "reallocarray",
    "memalign",
    "posix_memalign",
    "aligned_alloc",
    "valloc",
    "pvalloc",
    "malloc_trim",
    "malloc_usable_size",
    "malloc_stats",
    "malloc_info",
    "mallinfo",
    "mallinfo2",
    "mallopt",
    "__libc_malloc",
    "__libc_free",
    "__libc_calloc",
    "__libc_realloc",
    "__libc_memalign",
    "cfree",
    "dlopen",
    "dlmopen",
    "dlclose",
    "dlsym",
    "dlvsym",
    "dladdr",
    "dladdr1",
    "dlinfo",
    "dlerror",
    "dl_iterate_phdr",
    "__libc_dlopen_mode",
    "__libc_dlsym",
    "__libc_dlvsym",
    "__libc_dlclose",
    "fork",
    "_Fork",
    "pthread_create",
    "pthread_exit",
    "exit",
    "_exit",
    "atexit",
    "__cxa_atexit",
    "__cxa_finalize",
    "__cxa_thread_atexit_impl",
];

/// The stack a thread must have left below its stack pointer to make the call.
const MIN_STACK: u64 = 64 * 1024;

/// The code a thread must not be in when it is made to call the loader.
#[derive(Debug)]
pub struct UnsafeCode {
    /// Sorted, disjoint: start, end, what it is.
    ranges: Vec<(u64, u64, String)>,
    /// The signal-return trampolines: a stack holding one is a signal handler's, which may run
    /// on an alternate stack with the interrupted frames elsewhere, unscanned.
    signal_returns: Vec<u64>,
}

impl UnsafeCode {
    /// The loader's code and the lock holders of every object that exports one (the C library,
    /// and an allocator the program brings, such as jemalloc).
    pub fn of(objects: &[TargetObject]) -> UnsafeCode {
        let mut ranges = Vec::new();
        for object in objects {
            let file = object.path.rsplit('/').next().unwrap_or(&object.path);
            if object.is_loader() {
                for &(start, end) in &object.code {
                    ranges.push((start, end, format!("the dynamic loader ({file})")));
                }
                continue;
            }
            for (name, address, size) in &object.functions {
                if LOCK_HOLDERS.contains(&name.as_str()) {
                    ranges.push((
                        *address,
                        address + (*size).max(1),
                        format!("{name} ({file})"),
                    ));
                }
            }
        }
        ranges.sort_unstable();
        ranges.dedup_by(|b, a| b.0 < a.1);
        let signal_returns = objects
            .iter()
            .flat_map(|o| o.signal_returns.iter().copied())
            .collect();
        UnsafeCode {
            ranges,
            signal_returns,
        }
    }

    /// What holds `address`, if it is unsafe code.
    pub fn holding(&self, address: u64) -> Option<&str> {
        let after = self.ranges.partition_point(|r| r.0 <= address);
        self.ranges[..after]
            .last()
            .filter(|r| address < r.1)
            .map(|r| r.2.as_str())
    }

    /// Why the stopped `thread` may not call the loader now: the unsafe code it is in or that a
    /// word of its stack points into; `None` when it may.
    pub fn why_not(
        &self,
        thread: &Tracee,
        regs: &libc::user_regs_struct,
        maps: &[Mapping],
    ) -> Result<Option<String>, TraceError> {
        if let Some(what) = self.holding(regs.rip) {
            return Ok(Some(format!("it runs {what}")));
        }
        let Some(stack) = maps::find(maps, regs.rsp as usize) else {
            return Ok(Some(format!(
                "its stack pointer {:#x} is in no mapping",
                regs.rsp
            )));
        };
        // The loader and the agent's start need room; a thread stack's end is fixed (the main
        // thread's grows).
        if stack.name != "[stack]" && regs.rsp.saturating_sub(stack.start as u64) < MIN_STACK {
            return Ok(Some(format!(
                "its stack has less than {} KiB left",
                MIN_STACK / 1024
            )));
        }
        let mut at = regs.rsp & !7;
        let end = stack.end as u64;
        let mut chunk = vec![0u8; 64 * 1024];
        while at < end {
            let len = ((end - at) as usize).min(chunk.len());
            thread.read(at, &mut chunk[..len])?;
            for word in chunk[..len].chunks_exact(8) {
                let value = u64::from_ne_bytes(word.try_into().unwrap_or_default());
                if self.signal_returns.contains(&value) {
                    return Ok(Some("it runs a signal handler".to_owned()));
                }
                if let Some(what) = self.holding(value) {
                    return Ok(Some(format!("its stack holds a return into {what}")));
                }
            }
            at += len as u64;
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_inside_the_ranges_are_found_and_others_not() {
        let code = UnsafeCode {
            ranges: vec![
                (0x1000, 0x1100, "malloc".into()),
                (0x2000, 0x3000, "ld".into()),
            ],
            signal_returns: Vec::new(),
        };
        assert_eq!(code.holding(0x1000), Some("malloc"));
        assert_eq!(code.holding(0x10ff), Some("malloc"));
        assert_eq!(code.holding(0x1100), None);
        assert_eq!(code.holding(0xfff), None);
        assert_eq!(code.holding(0x2fff), Some("ld"));
    }
}
