//! The check of a thread asleep in a system call, made by the control thread without a signal
//! (a signal would make calls such as `nanosleep`, `poll` and `epoll_wait` fail with EINTR;
//! the kernel never does that to a sleeping task). While the thread stays in its call its stack
//! cannot change: the control thread copies it, scans the copy, confirms that the thread stayed
//! asleep in the same call throughout, and switches it with a compare-and-swap of its state word
//! that fails if the thread's slow path read its state meanwhile (records, rule 4).

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};

use livepatch_arch::asleep::{asleep, copy_memory, still_asleep};
use livepatch_arch::unwind::WalkStart;
use livepatch_core::{SwitchResult, Tid};

use super::config::CheckConfig;
use super::stack::{MAX_SCAN, Verdict, mapping_end, scan_words};
use crate::threads::ThreadRecord;

/// The C library's signal-return trampoline, the return address of every signal handler: a
/// stack copy that holds it is that of a thread inside a handler, which may run on an
/// alternate stack and have the rest of its frames elsewhere. Such a thread gets the signal,
/// whose check knows its stack.
static SIGNAL_RETURN: AtomicU64 = AtomicU64::new(0);

pub fn set_signal_return(address: u64) {
    SIGNAL_RETURN.store(address, Ordering::Relaxed);
}

/// Checks `tid` if it is asleep in a system call: `Switched` or `Blocked` when that settles it,
/// `None` when the thread must be checked by the signal (it runs, woke up meanwhile, sleeps
/// in code where no thread may switch, or its state changed).
pub fn check_asleep(cfg: &CheckConfig, rec: &ThreadRecord, tid: Tid) -> Option<SwitchResult> {
    let word = rec.state_word();
    if ThreadRecord::state_of_word(word) != cfg.from || rec.in_slow_path.load(Ordering::SeqCst) != 0
    {
        return None;
    }
    let before = asleep(tid)?;
    if cfg
        .no_switch_code
        .iter()
        .any(|&(a, b)| before.pc >= a && before.pc < b)
    {
        return None;
    }
    let top = mapping_end(&cfg.stacks, before.sp)?;
    if top - before.sp > MAX_SCAN || !before.sp.is_multiple_of(8) {
        return None;
    }
    let mut stack = vec![0u8; (top - before.sp) as usize];
    if !copy_memory(before.sp, &mut stack) {
        return None;
    }
    let words = || {
        stack
            .chunks_exact(8)
            .map(|w| u64::from_ne_bytes(w.try_into().unwrap_or_default()))
    };
    let signal_return = SIGNAL_RETURN.load(Ordering::Relaxed);
    if signal_return == 0 || words().any(|w| w == signal_return) {
        return None;
    }
    let mut verdict = scan_words(cfg, before.pc, words());
    // As for a signalled thread: a thread the scan suspects gets the precise walk, here over
    // the copy; only a walk that reached the outermost frame overrules the scan.
    if let (Verdict::Blocked(_), Some(unwinder)) = (verdict, &cfg.unwinder) {
        let mut best: Option<u32> = None;
        let start = WalkStart::Asleep {
            pc: before.pc,
            sp: before.sp,
        };
        let complete = unwinder.walk_copy(start, &stack, |address| {
            if let Some(i) = cfg.ranges.find(address) {
                best = Some(best.map_or(i, |b| b.min(i)));
            }
        });
        if complete {
            verdict = best.map_or(Verdict::Clean, Verdict::Blocked);
        }
    }
    if !still_asleep(tid, &before) {
        return None;
    }
    match verdict {
        Verdict::Clean if rec.switch_unread(word, cfg.to) => Some(SwitchResult::Switched),
        // Never wrongly clean; a sleeping thread is not woken to be checked again: it is
        // checked at the next round, and once it runs, by the signal.
        Verdict::Blocked(i) => Some(SwitchResult::Blocked(i as usize)),
        _ => None,
    }
}
