//! What `livepatch status` and a waiting `livepatch load` see: patches, objects, funcs and
//! threads, mapped from the core's attribute tree and the thread records to the protocol.

use std::collections::HashMap;

use livepatch_arch::signals;
use livepatch_core::{BlockReason, PatchState, Platform, ThreadState, Tid};
use livepatch_protocol::{
    FuncStatus, LibraryStatus, ObjectStatus, PatchStatus, Progress, Status, ThreadStatus,
    TransitionStatus,
};

use crate::agent::AgentState;
use crate::threads;

/// The whole status of the process.
pub fn status(state: &mut AgentState, pid: u32) -> Status {
    let transition = transition_status(state);
    let libraries = &state.platform.libraries;
    let patches = state
        .core
        .patch_statuses()
        .into_iter()
        .map(|p| PatchStatus {
            library: libraries
                .find(&p.name)
                .filter(|l| l.active)
                .map(|l| l.path.clone())
                .unwrap_or_default(),
            name: p.name,
            enabled: p.enabled,
            transition: p.transition,
            forced: p.forced,
            replace: p.replace,
            stack_order: p.stack_order,
            objects: p
                .objects
                .into_iter()
                .map(|o| ObjectStatus {
                    name: o.name,
                    patched: o.patched,
                    funcs: o
                        .funcs
                        .into_iter()
                        .map(|f| FuncStatus {
                            name: f.old_name,
                            sympos: f.old_sympos,
                            nop: f.nop,
                            old_addr: f.old_addr,
                            new_addr: f.new_addr,
                            patched: f.patched,
                            transition: f.transition,
                        })
                        .collect(),
                })
                .collect(),
        })
        .collect();
    let unloadable = libraries
        .iter()
        .filter(|l| !l.active)
        .map(|l| LibraryStatus {
            patch: l.name.clone(),
            library: l.path.clone(),
            forced: l.forced,
        })
        .collect();
    let blocked: HashMap<Tid, BlockReason> = state.core.blocked_threads().into_iter().collect();
    let threads = state
        .platform
        .threads()
        .into_iter()
        .map(|tid| {
            let thread = threads::state_of(tid).unwrap_or(ThreadState::IDLE);
            thread_status(state, tid, thread, blocked.get(&tid))
        })
        .collect();
    Status {
        pid,
        transition,
        patches,
        unloadable,
        threads,
    }
}

/// Where the transition stands, for a client waiting for `patch`.
pub fn progress(state: &mut AgentState, patch: &str) -> Progress {
    let transition = transition_status(state);
    let tids = state.platform.threads();
    let mut pending = Vec::new();
    if transition.as_ref().is_some_and(|t| t.patch == patch) {
        let blocked: HashMap<Tid, BlockReason> = state.core.blocked_threads().into_iter().collect();
        for &tid in &tids {
            let thread = threads::state_of(tid).unwrap_or(ThreadState::IDLE);
            if thread.pending {
                pending.push(thread_status(state, tid, thread, blocked.get(&tid)));
            }
        }
    }
    Progress {
        transition,
        enabled: state.core.is_enabled(patch),
        threads: tids.len(),
        pending,
    }
}

fn transition_status(state: &AgentState) -> Option<TransitionStatus> {
    state
        .core
        .transition()
        .map(|(name, target)| TransitionStatus {
            patch: name.to_string(),
            target: if target == PatchState::Patched {
                "patched"
            } else {
                "unpatched"
            }
            .into(),
        })
}

fn thread_status(
    state: &mut AgentState,
    tid: Tid,
    thread: ThreadState,
    blocked: Option<&BlockReason>,
) -> ThreadStatus {
    ThreadStatus {
        tid,
        name: state.platform.thread_name(tid),
        patch_state: thread.state.as_i8(),
        pending: thread.pending,
        blocking: blocked.map(|r| describe_block(state.platform.check_signal, tid, r)),
    }
}

/// What `status` says about a blocked thread.
fn describe_block(check_signal: i32, tid: Tid, reason: &BlockReason) -> String {
    match reason {
        BlockReason::SleepingOn(function) => function.clone(),
        BlockReason::Running if signals::signal_held_blocked(tid, check_signal) => {
            format!("(blocks signal {check_signal}: switches at klp_update_patch_state)")
        }
        BlockReason::Running => "(running: did not answer the check)".into(),
        BlockReason::UnreliableStack => "(stack could not be checked)".into(),
        BlockReason::Error(errno) => format!("(error {errno:?})"),
    }
}
