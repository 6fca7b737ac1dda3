//! Invariant checkers: after every step of a simulation, the world and the
//! core must agree with a model the checker builds on its own.
//!
//! The model is derived from the list of patches (in enable order) and their
//! funcs, never from the dispatch the core published, so a stale or wrongly
//! condensed dispatch is caught. The families of invariants:
//!
//! 1. Func stacks: each stack holds the patches that patch the function, in
//!    enable order; a site is redirected exactly when its stack is non-empty.
//! 2. Dispatch: every thread, calling any redirected function, runs exactly
//!    the implementation its state selects under the kernel handler's rule.
//! 3. Consistency: no thread has a frame in an implementation other than the
//!    one its state selects now, unless the frame predates a forced
//!    transition (the per-thread consistency model's promise).
//! 4. States: with no transition every thread is IDLE and not pending; during
//!    a transition a thread is pending exactly when it is not at the target.
//! 5. Contract: the core never broke the platform contract (registering a
//!    site twice, updating an unregistered one, ...).

use std::collections::BTreeMap;

use livepatch_core::{Addr, Livepatch, PatchState, Target};

use crate::world::World;

/// One func of the model's stack for a function.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ModelEntry {
    patch: String,
    target: Target,
    transition: bool,
}

/// The model's func stacks: for each original function, the patched funcs of
/// every active patch, in enable order.
fn model_stacks(core: &Livepatch) -> BTreeMap<Addr, Vec<ModelEntry>> {
    let mut stacks: BTreeMap<Addr, Vec<ModelEntry>> = BTreeMap::new();
    for patch in core.patch_statuses() {
        for obj in &patch.objects {
            for func in &obj.funcs {
                let (true, Some(old)) = (func.patched, func.old_addr) else {
                    continue;
                };
                stacks.entry(old).or_default().push(ModelEntry {
                    patch: patch.name.clone(),
                    target: if func.nop {
                        Target::Original
                    } else {
                        Target::Code(func.new_addr)
                    },
                    transition: func.transition,
                });
            }
        }
    }
    stacks
}

/// The kernel handler's choice on the model's stack.
fn expected(stack: &[ModelEntry], state: PatchState) -> Target {
    let Some(top) = stack.last() else {
        return Target::Original;
    };
    if top.transition && state == PatchState::Unpatched {
        stack
            .len()
            .checked_sub(2)
            .map(|i| stack[i].target)
            .unwrap_or(Target::Original)
    } else {
        top.target
    }
}

/// Checks every invariant family; `forced_before` is the world step of the
/// last forced transition (frames pushed up to it are exempt from the
/// consistency rule).
pub fn check(core: &Livepatch, world: &World, forced_before: u64) -> Result<(), String> {
    if let Some(v) = world.contract_violations.first() {
        return Err(format!("platform contract broken: {v}"));
    }
    let model = model_stacks(core);

    // 1. Func stacks.
    let stacks: BTreeMap<Addr, Vec<String>> = core
        .func_stacks()
        .into_iter()
        .map(|(addr, entries)| (addr, entries.into_iter().map(|e| e.patch).collect()))
        .collect();
    for (addr, entries) in &model {
        let names: Vec<String> = entries.iter().map(|e| e.patch.clone()).collect();
        if stacks.get(addr) != Some(&names) {
            return Err(format!(
                "func stack at {addr:#x} is {:?}, the patches in enable order are {names:?}",
                stacks.get(addr)
            ));
        }
        if !world.sites().contains_key(addr) {
            return Err(format!(
                "function at {addr:#x} is patched but not redirected"
            ));
        }
    }
    for addr in stacks.keys().chain(world.sites().keys()) {
        if !model.contains_key(addr) {
            return Err(format!(
                "function at {addr:#x} is redirected but no patch patches it"
            ));
        }
    }

    // 4. Thread states.
    let transition = core.transition();
    for t in world.all_threads() {
        match transition {
            None => {
                if t.state.state != PatchState::Idle || t.state.pending {
                    return Err(format!(
                        "no transition, but thread {} is {:?}",
                        t.tid, t.state
                    ));
                }
            }
            Some((_, target)) => {
                if t.state.state == PatchState::Idle {
                    return Err(format!("thread {} is IDLE during a transition", t.tid));
                }
                if t.state.pending != (t.state.state != target) {
                    return Err(format!(
                        "thread {} is {:?} while the target is {target:?}",
                        t.tid, t.state
                    ));
                }
            }
        }
    }
    if transition.is_none()
        && let Some((addr, _)) = model.iter().find(|(_, s)| s.iter().any(|e| e.transition))
    {
        return Err(format!(
            "no transition, but a func at {addr:#x} is in transition"
        ));
    }

    // 2. Dispatch and 3. consistency.
    for t in world.all_threads() {
        for (addr, stack) in &model {
            let want = expected(stack, t.state.state);
            let got = world.implementation(t.tid, *addr);
            if got != want {
                return Err(format!(
                    "thread {} ({:?}) would run {got:?} for {addr:#x}, its state selects {want:?}",
                    t.tid, t.state
                ));
            }
        }
        for frame in &t.frames {
            if frame.pushed_at <= forced_before {
                continue;
            }
            let want = model
                .get(&frame.func)
                .map(|s| expected(s, t.state.state))
                .unwrap_or(Target::Original);
            if frame.target != want {
                return Err(format!(
                    "thread {} ({:?}) is inside {:?} of {:#x}, but its state selects {want:?}",
                    t.tid, t.state, frame.target, frame.func
                ));
            }
        }
    }
    Ok(())
}
