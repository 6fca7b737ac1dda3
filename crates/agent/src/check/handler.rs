//! The check signal's handler, run by each pending thread of a round on itself, and the same
//! check at the entry of a function in transition, run from the stub's slow path.

use std::ffi::c_void;
use std::sync::atomic::{AtomicI32, Ordering};

use livepatch_arch::signals::{self, SignalError, gettid};
use livepatch_arch::unwind::WalkStart;

use super::config::{
    ACKS, CheckConfig, EXPECTED_ACKS, RESULT_BLOCKED, RESULT_RACED, RESULT_SWITCHED,
    RESULT_UNRELIABLE, with_published_config,
};
use super::stack::{Verdict, check_stack, on_alt_stack};
use crate::threads::record;

/// The check signal, once installed.
static CHECK_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// Installs the handler of the check signal.
pub fn install(signal: i32) -> Result<(), SignalError> {
    signals::install_handler(signal, on_check_signal)?;
    CHECK_SIGNAL.store(signal, Ordering::Release);
    if let Some(address) = signals::signal_return(signal) {
        super::asleep::set_signal_return(address as u64);
    }
    Ok(())
}

extern "C" fn on_check_signal(signo: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // Rule 1: only our own check, sent with tgkill by a thread of this process.
    if signo != CHECK_SIGNAL.load(Ordering::Acquire) || info.is_null() || ctx.is_null() {
        return;
    }
    // SAFETY: the kernel's non-null siginfo of this SA_SIGINFO handler.
    if !unsafe { signals::sent_by_this_process_with_tgkill(info) } {
        return;
    }
    let saved = signals::errno();
    // SAFETY: `ctx` is the ucontext the kernel passed to this handler.
    with_published_config(|cfg| unsafe { answer(cfg, ctx) });
    signals::set_errno(saved);
}

/// Checks the interrupted thread's stack and switches it when clean (rule 5), then records the
/// answer for the round.
///
/// # Safety
/// `ctx` is the `ucontext_t` the kernel passed to the handler running on this thread.
unsafe fn answer(cfg: &CheckConfig, ctx: *mut c_void) {
    let Some(rec) = record(gettid()) else { return };
    if rec.request.load(Ordering::Acquire) != cfg.round {
        return;
    }
    if rec.answered.load(Ordering::Acquire) == cfg.round {
        return;
    }
    let start = WalkStart::Interrupted {
        pc: signals::interrupted_pc(ctx) as u64,
        sp: signals::interrupted_sp(ctx) as u64,
        bp: signals::interrupted_bp(ctx) as u64,
    };
    let verdict = if rec.in_slow_path.load(Ordering::SeqCst) != 0 {
        // Interrupted while choosing a target from its state: switching now could let it run
        // the code of the state it just left.
        Verdict::Raced
    } else if on_alt_stack() {
        Verdict::Unreliable
    } else {
        check_stack(cfg, start)
    };
    let (kind, index) = match verdict {
        Verdict::Clean => match rec.switch(cfg.from, cfg.to) {
            Ok(()) => (RESULT_SWITCHED, 0),
            Err(now) if now == cfg.to => (RESULT_SWITCHED, 0),
            Err(_) => (RESULT_RACED, 0),
        },
        Verdict::Blocked(i) => (RESULT_BLOCKED, i),
        Verdict::Raced => (RESULT_RACED, 0),
        Verdict::Unreliable => (RESULT_UNRELIABLE, 0),
    };
    rec.result_kind.store(kind, Ordering::Relaxed);
    rec.result_index.store(index, Ordering::Relaxed);
    // Release: the result is written before the round sees it answered.
    rec.answered.store(cfg.round, Ordering::Release);
    let acks = ACKS.fetch_add(1, Ordering::SeqCst) + 1;
    if acks >= EXPECTED_ACKS.load(Ordering::SeqCst) {
        signals::futex_wake(&ACKS);
    }
}

/// The switch point at a function's entry, from the stub's slow path: a pending thread whose
/// stack above `entry_sp` (its callers) holds nothing in transition takes the target state.
/// Only while a check round publishes the ranges; the round's signal finds it switched.
pub fn switch_at_entry(entry_sp: u64) {
    with_published_config(|cfg| {
        if let Some(rec) = record(gettid())
            && rec.thread_state() == cfg.from
            && !on_alt_stack()
            && matches!(
                check_stack(cfg, WalkStart::FunctionEntry { sp: entry_sp }),
                Verdict::Clean
            )
        {
            // Fails only when the thread's own signal handler switched it meanwhile.
            let _ = rec.switch(cfg.from, cfg.to);
        }
    });
}
