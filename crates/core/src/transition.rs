//! Per-thread switching: the consistency model (kernel: transition.c).
//!
//! A transition moves every thread from an initial state to a target state,
//! one thread at a time, each when its own stack holds none of the code being
//! superseded. The steps keep the kernel's names and order:
//! [`Livepatch::init_transition`] → [`Livepatch::start_transition`] →
//! [`Livepatch::try_complete_transition`] (repeated) →
//! [`Livepatch::complete_transition`], with cancel, reverse and force as the
//! other exits.
//!
//! Ordering the platform relies on: thread states are written before the
//! dispatch that makes a site consult them, and a synchronization separates
//! the last use of an old dispatch from the threads becoming IDLE — the pairs
//! of `smp_wmb`/`smp_rmb` and `klp_synchronize_transition` in the kernel.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::errno::Errno;
use crate::func_stack::FuncRef;
use crate::lifecycle::Livepatch;
use crate::platform::{Platform, SwitchResult};
use crate::ranges::{BlockingRange, CodeKind};
use crate::thread_state::{PatchState, ThreadState};
use crate::{PatchId, Tid, log};

/// Why a thread could not switch at the last attempt.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum BlockReason {
    /// It was running and could not be examined (or did not answer).
    Running,
    /// Its stack could not be walked reliably.
    UnreliableStack,
    /// It has code of this function (`old_name`) on its stack.
    SleepingOn(String),
    /// Another failure.
    Error(Errno),
}

/// The first delay between two attempts to complete a transition. The kernel
/// waits a second; user-space threads are cheap to check, so start fast and
/// back off while threads stay blocked.
pub const RETRY_FIRST: Duration = Duration::from_millis(1);
/// The longest delay between two attempts.
pub const RETRY_MAX: Duration = Duration::from_millis(250);
/// After this long, remaining threads are nudged (`SIGNALS_TIMEOUT`: the
/// kernel sends fake signals after 15 attempts one second apart), and again
/// every such period.
pub const SIGNALS_PERIOD: Duration = Duration::from_secs(15);

/// The transition in progress (`klp_transition_patch` and the work state).
#[derive(Clone, Debug)]
pub(crate) struct Transition {
    pub(crate) patch: PatchId,
    /// `klp_target_state`: where every thread goes.
    pub(crate) target: PatchState,
    /// When the retry work runs next.
    pub(crate) next_attempt_at: Duration,
    pub(crate) retry_delay: Duration,
    /// When threads are signalled next (`klp_signals_cnt`).
    pub(crate) next_signal_at: Duration,
    pub(crate) signaled: bool,
    /// Threads that failed to switch at the last attempt.
    pub(crate) blocked: BTreeMap<Tid, BlockReason>,
    /// The disable callbacks of states this replacing patch makes obsolete
    /// ran, and neither their release nor a re-enable has run since.
    pub(crate) obsolete_states_disabled: bool,
}

impl Livepatch {
    /// `klp_target_state`: the transition's target, IDLE when none runs.
    pub(crate) fn target(&self) -> PatchState {
        self.transition
            .as_ref()
            .map_or(PatchState::Idle, |t| t.target)
    }

    /// Turns the transition in progress toward `target` (cancel and reverse).
    fn set_target(&mut self, target: PatchState) {
        if let Some(tr) = &mut self.transition {
            tr.target = target;
        }
    }

    /// Prepares a transition to `target` for the patch at index `patch`
    /// (kernel: `klp_init_transition`). Must be called with no transition in
    /// progress; before [`Livepatch::start_transition`].
    pub(crate) fn init_transition<P: Platform>(
        &mut self,
        p: &mut P,
        patch: usize,
        target: PatchState,
    ) {
        if self.target() != PatchState::Idle {
            self.warn(p, "init_transition: a transition is already in progress");
        }
        let id = self.patches[patch].id;
        let now = p.now();
        self.transition = Some(Transition {
            patch: id,
            target,
            next_attempt_at: now,
            retry_delay: RETRY_FIRST,
            next_signal_at: now + SIGNALS_PERIOD,
            signaled: false,
            blocked: BTreeMap::new(),
            obsolete_states_disabled: false,
        });
        p.log(log::initializing_transition(
            &self.patches[patch].name,
            target == PatchState::Patched,
        ));

        // Threads born from now on may still run old code until every site
        // dispatches on thread states: they start in the initial state, like
        // the threads that exist now, and start_transition makes them
        // pending. Published before the existing threads get their initial
        // state so that none is missed.
        p.set_target_state(target);
        let initial = target.opposite();
        p.set_new_thread_state(ThreadState {
            state: initial,
            pending: false,
        });
        for tid in p.threads() {
            if let Some(st) = p.thread_state(tid) {
                // A thread born since the publication above already has the initial state.
                if st.state != PatchState::Idle && st.state != initial {
                    self.warn(p, &format!("init_transition: thread {tid} is not IDLE"));
                }
                p.set_thread_state(
                    tid,
                    ThreadState {
                        state: initial,
                        pending: false,
                    },
                );
            }
        }

        // Thread states are written before any func is marked in transition:
        // a stub that sees the transition flag must find a non-IDLE state.
        let mut sites = Vec::new();
        for obj in &mut self.patches[patch].objects {
            for func in &mut obj.funcs {
                func.transition = true;
                if func.patched {
                    sites.extend(func.old_func);
                }
            }
        }
        for addr in sites {
            self.publish_site(p, addr);
        }
    }

    /// Marks every thread not yet at the target as pending and starts the
    /// retry schedule (kernel: `klp_start_transition`).
    pub(crate) fn start_transition<P: Platform>(&mut self, p: &mut P) {
        if self.target() == PatchState::Idle {
            self.warn(p, "start_transition: no transition to start");
            return;
        }
        let target = self.target();
        let patch = self
            .transition_patch_index()
            .expect("transition patch exists");
        p.log(log::starting_transition(
            &self.patches[patch].name,
            target == PatchState::Patched,
        ));
        // Every site of the patch dispatches on thread states now: a thread
        // born from here on has no old frame and starts at the target. Set
        // before the loop, so a thread born during it is either at the
        // target or seen by the loop.
        p.set_new_thread_state(ThreadState::switched_to(target));
        for tid in p.threads() {
            if let Some(st) = p.thread_state(tid)
                && st.state != target
            {
                p.set_thread_state(
                    tid,
                    ThreadState {
                        state: st.state,
                        pending: true,
                    },
                );
            }
        }
        let now = p.now();
        if let Some(tr) = &mut self.transition {
            tr.next_signal_at = now + SIGNALS_PERIOD;
            tr.signaled = false;
            tr.retry_delay = RETRY_FIRST;
            tr.next_attempt_at = now + RETRY_FIRST;
        }
    }

    /// The code ranges a thread must not have on its stack to switch to the
    /// target (kernel: `klp_check_stack` over `klp_check_stack_func`), in the
    /// order the kernel checks them: objects, then funcs, nops included.
    pub(crate) fn blocking_ranges(&self) -> Vec<BlockingRange> {
        let Some(patch) = self.transition_patch_index() else {
            return Vec::new();
        };
        let tp = &self.patches[patch];
        let mut ranges = Vec::new();
        for (oi, obj) in tp.objects.iter().enumerate() {
            if !obj.patched {
                continue;
            }
            for (fi, func) in obj.funcs.iter().enumerate() {
                let Some(old_func) = func.old_func else {
                    continue;
                };
                let (start, size, kind) = if self.target() == PatchState::Unpatched {
                    // The code being removed. A nop's new_func is the original.
                    let kind = if func.nop {
                        CodeKind::Original
                    } else {
                        CodeKind::Replacement
                    };
                    (func.new_func, func.new_size, kind)
                } else {
                    // The code being superseded: the func below this one on
                    // the stack, or the original when there is none.
                    let me = FuncRef {
                        patch: tp.id,
                        object: oi,
                        func: fi,
                    };
                    let below = self.stacks.get(old_func).and_then(|s| s.below(me));
                    match below.map(|f| self.func(f)) {
                        Some(prev) if !prev.nop => {
                            (prev.new_func, prev.new_size, CodeKind::Replacement)
                        }
                        _ => (old_func, func.old_size, CodeKind::Original),
                    }
                };
                ranges.push(BlockingRange {
                    func_name: func.old_name.clone(),
                    start,
                    size,
                    kind,
                });
            }
        }
        ranges
    }

    /// Tries to switch every thread not yet at the target; completes the
    /// transition when none is left (kernel: `klp_try_complete_transition`).
    /// Returns whether the transition completed. Never blocks.
    pub(crate) fn try_complete_transition<P: Platform>(&mut self, p: &mut P) -> bool {
        if self.target() == PatchState::Idle || self.transition.is_none() {
            self.warn(p, "try_complete_transition: no transition in progress");
            return false;
        }
        let target = self.target();
        let ranges = self.blocking_ranges();
        let tids = p.threads();
        let mut pending = Vec::new();
        for tid in tids {
            match p.thread_state(tid) {
                Some(st) if st.state != target => pending.push(tid),
                _ => {}
            }
        }
        let results = if pending.is_empty() {
            Vec::new()
        } else {
            p.try_switch_threads(&pending, target, &ranges)
        };
        if results.len() != pending.len() {
            self.warn(
                p,
                "try_switch_threads returned a result count that differs from the request",
            );
        }

        let mut blocked = BTreeMap::new();
        for (i, tid) in pending.iter().copied().enumerate() {
            let reason = match results.get(i) {
                Some(SwitchResult::Switched) | Some(SwitchResult::Exited) => continue,
                Some(SwitchResult::Running) | None => BlockReason::Running,
                Some(SwitchResult::UnreliableStack) => BlockReason::UnreliableStack,
                Some(SwitchResult::Blocked(r)) => match ranges.get(*r) {
                    Some(range) => BlockReason::SleepingOn(range.func_name.clone()),
                    None => BlockReason::Error(Errno::EINVAL),
                },
                Some(SwitchResult::Other(errno)) => BlockReason::Error(*errno),
            };
            blocked.insert(tid, reason);
        }

        // The kernel prints a debug line per blocked task and attempt; with
        // attempts milliseconds apart that would flood the log, so a line is
        // printed when a thread's reason changes.
        let previous = self.transition.as_ref().map(|t| &t.blocked);
        let mut lines = Vec::new();
        for (tid, reason) in &blocked {
            if previous.and_then(|prev| prev.get(tid)) != Some(reason) {
                lines.push((*tid, reason.clone()));
            }
        }
        for (tid, reason) in lines {
            let comm = p.thread_name(tid);
            p.log(match &reason {
                BlockReason::Running => log::thread_is_running(&comm, tid),
                BlockReason::UnreliableStack => log::thread_has_unreliable_stack(&comm, tid),
                BlockReason::SleepingOn(func) => log::thread_is_sleeping_on(&comm, tid, func),
                BlockReason::Error(e) => log::thread_unknown_error(e.negative(), &comm, tid),
            });
        }

        if !blocked.is_empty() {
            let now = p.now();
            let tr = self.transition.as_mut().expect("checked above");
            tr.blocked = blocked;
            if now >= tr.next_signal_at {
                if !tr.signaled {
                    tr.signaled = true;
                    p.log(log::signaling_remaining_tasks());
                }
                tr.next_signal_at = now + SIGNALS_PERIOD;
                let tids: Vec<Tid> = tr.blocked.keys().copied().collect();
                p.signal_threads(&tids);
            }
            tr.next_attempt_at = now + tr.retry_delay;
            tr.retry_delay = (tr.retry_delay * 2).min(RETRY_MAX);
            return false;
        }

        let patch_id = self.transition.as_ref().expect("checked above").patch;
        self.complete_transition(p);
        // Free what is no longer used (kernel: klp_free_patch_async and
        // klp_free_replaced_patches_async after the completion).
        if let Some(idx) = self.patch_index(patch_id) {
            if !self.patches[idx].enabled {
                self.free_patch(p, idx);
            } else if self.patches[idx].replace {
                self.free_replaced_patches(p, patch_id);
            }
        }
        true
    }

    /// Finishes the transition once every thread switched, or at once when
    /// canceling (kernel: `klp_complete_transition`).
    pub(crate) fn complete_transition<P: Platform>(&mut self, p: &mut P) {
        let target = self.target();
        let patch = self
            .transition_patch_index()
            .expect("transition patch exists");
        let patching = target == PatchState::Patched;
        p.log(log::completing_transition(
            &self.patches[patch].name,
            patching,
        ));

        if patching && self.patches[patch].replace {
            self.unpatch_replaced_patches(p, patch);
            self.discard_nops(p, patch);
            self.release_obsolete_states(p, patch);
        }
        if target == PatchState::Unpatched {
            self.unpatch_objects(p, patch, false);
            // No stub may still act on the removed funcs before the threads
            // lose their state below.
            p.synchronize_transition();
        }

        let mut sites = Vec::new();
        for obj in &mut self.patches[patch].objects {
            for func in &mut obj.funcs {
                func.transition = false;
                if func.patched {
                    sites.extend(func.old_func);
                }
            }
        }
        for addr in sites {
            self.publish_site(p, addr);
        }
        if patching {
            // A stub must never see an IDLE thread with a func in transition.
            p.synchronize_transition();
        }

        p.set_new_thread_state(ThreadState::IDLE);
        p.set_target_state(PatchState::Idle);
        for tid in p.threads() {
            if let Some(st) = p.thread_state(tid) {
                if st.pending {
                    self.warn(
                        p,
                        &format!("complete_transition: thread {tid} is still pending"),
                    );
                }
                p.set_thread_state(tid, ThreadState::IDLE);
            }
        }

        if patching {
            self.enable_states(p, patch);
        } else {
            self.release_states(p, patch);
            // A reversed replace: the patches it was to replace stay, so the
            // states it disabled for them come back.
            self.enable_obsolete_states(p, patch);
        }

        for obj in 0..self.patches[patch].objects.len() {
            if !self.patches[patch].objects[obj].loaded {
                continue;
            }
            if patching {
                self.post_patch_callback(p, patch, obj);
            } else {
                self.post_unpatch_callback(p, patch, obj);
            }
        }

        p.log(log::transition_complete(
            &self.patches[patch].name,
            patching,
        ));
        self.transition = None;
    }

    /// Undoes a patching transition that failed before it started (kernel:
    /// `klp_cancel_transition`): only between init and start.
    pub(crate) fn cancel_transition<P: Platform>(&mut self, p: &mut P) {
        if self.target() != PatchState::Patched {
            self.warn(p, "cancel_transition: not a patching transition");
            return;
        }
        let patch = self
            .transition_patch_index()
            .expect("transition patch exists");
        p.log(log::canceling_transition(&self.patches[patch].name));
        self.set_target(PatchState::Unpatched);
        self.complete_transition(p);
    }

    /// Turns the transition around (kernel: `klp_reverse_transition`): the
    /// target flips, threads keep their states, those already at the new
    /// target are done. No callbacks run and no attempt is made at once; the
    /// retry work picks it up.
    pub(crate) fn reverse_transition<P: Platform>(&mut self, p: &mut P) {
        let patch = self
            .transition_patch_index()
            .expect("transition patch exists");
        let from_patching = self.target() == PatchState::Patched;
        p.log(log::reversing_transition(
            &self.patches[patch].name,
            from_patching,
        ));

        // Clear every pending flag, and let any switch decided on the old
        // target finish, before the target changes.
        for tid in p.threads() {
            if let Some(st) = p.thread_state(tid)
                && st.pending
            {
                p.set_thread_state(
                    tid,
                    ThreadState {
                        state: st.state,
                        pending: false,
                    },
                );
            }
        }
        p.synchronize_transition();

        let tp = &mut self.patches[patch];
        tp.enabled = !tp.enabled;
        let target = self.target().opposite();
        self.set_target(target);
        p.set_target_state(target);
        if let Some(tr) = &mut self.transition {
            tr.blocked.clear();
        }
        self.start_transition(p);
    }

    /// Switches every pending thread without looking at stacks and marks the
    /// patches whose code may still run as forced (kernel:
    /// `klp_force_transition`). The next attempt completes the transition.
    pub(crate) fn force_transition<P: Platform>(&mut self, p: &mut P) {
        p.log(log::forcing_remaining_tasks());
        let target = self.target();
        for tid in p.threads() {
            if let Some(st) = p.thread_state(tid)
                && st.pending
            {
                p.set_thread_state(tid, ThreadState::switched_to(target));
            }
        }
        let patch = self
            .transition_patch_index()
            .expect("transition patch exists");
        if target == PatchState::Unpatched {
            // Only the patch being removed may still be running somewhere.
            self.patches[patch].forced = true;
        } else if self.patches[patch].replace {
            // The replaced patches may still be running somewhere.
            for (i, other) in self.patches.iter_mut().enumerate() {
                if i != patch {
                    other.forced = true;
                }
            }
        }
        if let Some(tr) = &mut self.transition {
            tr.next_attempt_at = p.now();
        }
    }
}
