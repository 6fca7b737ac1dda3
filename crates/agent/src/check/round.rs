//! A check round, the control thread's half of `klp_try_switch_task` for many threads at
//! once: publish the round's configuration, signal every pending thread, wait for their
//! answers (or the deadline), retire the configuration, read the results.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use livepatch_arch::signals::{self, gettid};
use livepatch_arch::unwind::StackUnwinder;
use livepatch_core::{BlockingRange, DisjointRanges, PatchState, SwitchResult, ThreadState, Tid};

use super::asleep::check_asleep;
use super::config::{
    self, ACKS, CheckConfig, EXPECTED_ACKS, RESULT_BLOCKED, RESULT_RACED, RESULT_SWITCHED,
    with_published_config,
};
use crate::threads::{record, register};

static ROUND: AtomicU64 = AtomicU64::new(0);

/// What a check round needs besides the threads.
#[derive(Debug)]
pub struct RoundInput<'a> {
    /// The blocking ranges, in the core's order.
    pub ranges: &'a [BlockingRange],
    /// Writable mappings that may hold stacks.
    pub stacks: Vec<(u64, u64)>,
    /// Code where no thread may switch (slow paths of stubs).
    pub no_switch_code: Vec<(u64, u64)>,
    /// The precise walk over the loaded objects' unwind tables; without it every check is the
    /// conservative scan.
    pub unwinder: Option<Arc<StackUnwinder>>,
}

/// Checks each thread of `tids` (all pending) that sleeps in a system call from here, and asks
/// every other to check its stack and switch to `target`; waits up to `deadline` for their
/// answers. `send` delivers the
/// check signal to one thread and says whether the thread exists. The
/// calling thread, if listed, is switched directly: nothing of the code
/// being checked is on the control thread's stack.
pub fn check_round(
    tids: &[Tid],
    target: PatchState,
    input: RoundInput<'_>,
    deadline: Duration,
    send: impl Fn(Tid) -> bool,
) -> Vec<SwitchResult> {
    let round = ROUND.fetch_add(1, Ordering::SeqCst) + 1;
    let from = ThreadState::pending_for(target);
    let to = ThreadState::switched_to(target);
    let mut stacks = input.stacks;
    stacks.sort_unstable();
    let published = config::publish(CheckConfig {
        round,
        from,
        to,
        ranges: DisjointRanges::new(input.ranges),
        stacks,
        no_switch_code: input.no_switch_code,
        unwinder: input.unwinder,
    });

    let me = gettid();
    let mut results: Vec<Option<SwitchResult>> = vec![None; tids.len()];
    let mut sent = 0u32;
    for (i, &tid) in tids.iter().enumerate() {
        let Some(rec) = register(tid) else {
            results[i] = Some(SwitchResult::Other(livepatch_core::Errno::EINVAL));
            continue;
        };
        if tid == me {
            let ok = rec.switch(from, to).is_ok();
            results[i] = Some(if ok {
                SwitchResult::Switched
            } else {
                SwitchResult::Running
            });
            continue;
        }
        let mut settled = None;
        with_published_config(|cfg| settled = check_asleep(cfg, rec, tid));
        if settled.is_some() {
            results[i] = settled;
            continue;
        }
        rec.request.store(round, Ordering::Release);
        if send(tid) {
            sent += 1;
        } else {
            results[i] = Some(SwitchResult::Exited);
        }
    }

    EXPECTED_ACKS.store(sent, Ordering::SeqCst);
    let start = Instant::now();
    loop {
        let acks = ACKS.load(Ordering::SeqCst);
        if acks >= sent {
            break;
        }
        let elapsed = start.elapsed();
        if elapsed >= deadline {
            break;
        }
        signals::futex_wait(
            &ACKS,
            acks,
            Some((deadline - elapsed).min(Duration::from_millis(10))),
        );
    }

    config::retire(published);

    tids.iter()
        .zip(results)
        .map(|(&tid, r)| {
            if let Some(r) = r {
                return r;
            }
            let Some(rec) = record(tid) else {
                return SwitchResult::Exited;
            };
            if rec.answered.load(Ordering::Acquire) != round {
                return SwitchResult::Running;
            }
            match rec.result_kind.load(Ordering::Relaxed) {
                RESULT_SWITCHED => SwitchResult::Switched,
                RESULT_BLOCKED => {
                    SwitchResult::Blocked(rec.result_index.load(Ordering::Relaxed) as usize)
                }
                RESULT_RACED => SwitchResult::Running,
                _ => SwitchResult::UnreliableStack,
            }
        })
        .collect()
}
