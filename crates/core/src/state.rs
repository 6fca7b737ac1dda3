//! System states: compatibility of cumulative patches and the per-state
//! callbacks (kernel: state.c; per-state callbacks from seed 004).
//!
//! A state is an id and a version that a patch declares for a change of the
//! system it makes. A patch may be enabled only if it can live with every
//! state of the patches already enabled: a cumulative (replacing) patch must
//! carry each of them with at least the same version, unless the old patch
//! can take its state away itself (it has a disable or release callback), in
//! which case the state becomes obsolete and is removed with the old patch's
//! callbacks. A non-cumulative patch may ignore existing states.
//!
//! Per-state callbacks run only when a state comes or goes: `setup` before
//! patching and `enable` after, when no other patch carries the state;
//! `disable` before and `release` after unpatching, with the same rule, and
//! `release` only when `setup` succeeded. A state made obsolete by a
//! replacing patch is disabled before the transition and released after it,
//! once, with the callbacks of the newest replaced patch that declares it
//! (seed 004 runs them per old patch, which never removes a state that two
//! replaced patches share).

use crate::lifecycle::Livepatch;
use crate::log::{self, LogRecord};
use crate::patch::{Patch, State};
use crate::platform::{Platform, StateCallback, StateCallbackKind};

/// A state as `klp_get_state` / `klp_get_prev_state` return it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateRef {
    /// The patch that declares the state.
    pub patch: String,
    /// Index of the state in that patch's descriptor.
    pub index: usize,
    /// The state's id.
    pub id: u64,
    /// The state's version.
    pub version: u32,
}

/// The answers of `klp_get_prev_state` at one moment, handed to callbacks
/// (which run while the core is busy and cannot be asked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrevStates<'a> {
    /// Whether a transition runs; outside one `klp_get_prev_state` warns and
    /// finds nothing.
    pub in_transition: bool,
    /// The states of the patches enabled before the transition patch, newest
    /// patch first.
    pub states: &'a [StateRef],
}

impl PrevStates<'_> {
    /// `klp_get_prev_state(id)`: `Err` with the warning to log when no
    /// transition runs.
    pub fn get(&self, id: u64) -> Result<Option<&StateRef>, LogRecord> {
        if !self.in_transition {
            return Err(log::warning(PREV_STATE_OUTSIDE_TRANSITION));
        }
        Ok(self.states.iter().find(|s| s.id == id))
    }
}

const PREV_STATE_OUTSIDE_TRANSITION: &str = "klp_get_prev_state called outside a transition";

/// kernel: `klp_is_state_compatible`, with seed 004's obsolete states.
fn is_state_compatible(new: &Patch, old_state: &State) -> bool {
    match new.state(old_state.id) {
        Some(state) => state.version >= old_state.version,
        None => !new.replace || old_state.callbacks.can_remove(),
    }
}

impl Livepatch {
    /// kernel: `klp_is_patch_compatible`.
    pub(crate) fn is_patch_compatible(&self, new: &Patch) -> bool {
        self.patches
            .iter()
            .flat_map(|old| old.states.iter())
            .all(|old_state| is_state_compatible(new, old_state))
    }

    /// Whether a patch in the list other than the one at `patch` declares
    /// state `id`.
    fn is_state_in_other_patches(&self, patch: usize, id: u64) -> bool {
        self.patches
            .iter()
            .enumerate()
            .any(|(i, other)| i != patch && other.state(id).is_some())
    }

    fn call_state<P: Platform>(
        &self,
        p: &mut P,
        patch: usize,
        state: usize,
        kind: StateCallbackKind,
    ) -> i32 {
        let owner = &self.patches[patch];
        let st = &owner.states[state];
        let callback = match kind {
            StateCallbackKind::Setup => st.callbacks.setup,
            StateCallbackKind::Enable => st.callbacks.enable,
            StateCallbackKind::Disable => st.callbacks.disable,
            StateCallbackKind::Release => st.callbacks.release,
        };
        let Some(callback) = callback else { return 0 };
        let prev = self.prev_state_refs();
        p.call_state_callback(StateCallback {
            kind,
            callback,
            patch: &owner.name,
            state_id: st.id,
            state_index: state,
            prev_states: PrevStates {
                in_transition: self.transition.is_some(),
                states: &prev,
            },
        })
    }

    /// Runs `setup` for each state new to the system; on a failure releases
    /// what was set up and returns the callback's result.
    /// On failure, the id of the state whose setup failed and the callback's result.
    pub(crate) fn setup_states<P: Platform>(
        &mut self,
        p: &mut P,
        patch: usize,
    ) -> Result<(), (u64, i32)> {
        for state in 0..self.patches[patch].states.len() {
            let id = self.patches[patch].states[state].id;
            if !self.is_state_in_other_patches(patch, id) {
                let ret = self.call_state(p, patch, state, StateCallbackKind::Setup);
                if ret != 0 {
                    self.release_states(p, patch);
                    return Err((id, ret));
                }
            }
            self.patches[patch].states[state].setup_succeeded = true;
        }
        Ok(())
    }

    /// Runs `enable` for each state new to the system.
    pub(crate) fn enable_states<P: Platform>(&mut self, p: &mut P, patch: usize) {
        self.run_for_new_states(p, patch, StateCallbackKind::Enable);
    }

    /// Runs `disable` for each state no other patch carries.
    pub(crate) fn disable_states<P: Platform>(&mut self, p: &mut P, patch: usize) {
        self.run_for_new_states(p, patch, StateCallbackKind::Disable);
    }

    /// Runs `release` for each state no other patch carries and whose setup
    /// succeeded; a state is released at most once.
    pub(crate) fn release_states<P: Platform>(&mut self, p: &mut P, patch: usize) {
        for state in 0..self.patches[patch].states.len() {
            let st = &self.patches[patch].states[state];
            if self.is_state_in_other_patches(patch, st.id) || !st.setup_succeeded {
                continue;
            }
            self.call_state(p, patch, state, StateCallbackKind::Release);
            self.patches[patch].states[state].setup_succeeded = false;
        }
    }

    fn run_for_new_states<P: Platform>(
        &mut self,
        p: &mut P,
        patch: usize,
        kind: StateCallbackKind,
    ) {
        for state in 0..self.patches[patch].states.len() {
            let id = self.patches[patch].states[state].id;
            if !self.is_state_in_other_patches(patch, id) {
                self.call_state(p, patch, state, kind);
            }
        }
    }

    /// The states a replacing patch at `patch` makes obsolete: every state id
    /// of the patches it replaces that it does not carry itself, each once,
    /// as the newest replaced patch declares it (that patch's callbacks own
    /// the state now, as `klp_get_prev_state` would find it).
    fn obsolete_states(&self, patch: usize) -> Vec<(usize, usize)> {
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for old in (0..self.patches.len()).rev() {
            if old == patch {
                continue;
            }
            for (si, st) in self.patches[old].states.iter().enumerate() {
                if self.patches[patch].state(st.id).is_none() && !seen.contains(&st.id) {
                    seen.push(st.id);
                    out.push((old, si));
                }
            }
        }
        out
    }

    /// Before a replacing patch takes over: disable the states it makes
    /// obsolete, with the callbacks of the patch that owns each.
    pub(crate) fn disable_obsolete_states<P: Platform>(&mut self, p: &mut P, patch: usize) {
        for (old, state) in self.obsolete_states(patch) {
            self.call_state(p, old, state, StateCallbackKind::Disable);
        }
        if let Some(tr) = &mut self.transition {
            tr.obsolete_states_disabled = true;
        }
    }

    /// The replacement did not happen: enable again what
    /// [`Livepatch::disable_obsolete_states`] disabled. Does nothing if that
    /// did not run or was already undone.
    pub(crate) fn enable_obsolete_states<P: Platform>(&mut self, p: &mut P, patch: usize) {
        let Some(tr) = &mut self.transition else {
            return;
        };
        if !std::mem::take(&mut tr.obsolete_states_disabled) {
            return;
        }
        for (old, state) in self.obsolete_states(patch) {
            self.call_state(p, old, state, StateCallbackKind::Enable);
        }
    }

    /// The replacement happened: release the obsolete states whose setup
    /// had succeeded.
    pub(crate) fn release_obsolete_states<P: Platform>(&mut self, p: &mut P, patch: usize) {
        let Some(tr) = &mut self.transition else {
            return;
        };
        if !std::mem::take(&mut tr.obsolete_states_disabled) {
            return;
        }
        for (old, state) in self.obsolete_states(patch) {
            if self.patches[old].states[state].setup_succeeded {
                self.call_state(p, old, state, StateCallbackKind::Release);
                self.patches[old].states[state].setup_succeeded = false;
            }
        }
    }

    /// The state `id` of the loaded patch `patch` (kernel: `klp_get_state`).
    pub fn get_state(&self, patch: &str, id: u64) -> Option<StateRef> {
        let owner = self.patches.iter().find(|q| q.name == patch)?;
        let index = owner.states.iter().position(|s| s.id == id)?;
        let st = &owner.states[index];
        Some(StateRef {
            patch: owner.name.clone(),
            index,
            id: st.id,
            version: st.version,
        })
    }

    /// Every state of the patches enabled before the transition patch, the
    /// newest patch first (the search order of `klp_get_prev_state`).
    pub(crate) fn prev_state_refs(&self) -> Vec<StateRef> {
        let Some(tp) = self.transition_patch_index() else {
            return Vec::new();
        };
        self.patches[..tp]
            .iter()
            .rev()
            .flat_map(|owner| {
                owner.states.iter().enumerate().map(|(index, st)| StateRef {
                    patch: owner.name.clone(),
                    index,
                    id: st.id,
                    version: st.version,
                })
            })
            .collect()
    }

    /// The state `id` as the patches enabled before the transition patch
    /// declare it, the newest of them winning (kernel: `klp_get_prev_state`).
    /// Only meaningful during a transition; outside one it warns and returns
    /// `None`.
    pub fn get_prev_state<P: Platform>(&mut self, p: &mut P, id: u64) -> Option<StateRef> {
        let prev = self.prev_state_refs();
        let query = PrevStates {
            in_transition: self.transition.is_some(),
            states: &prev,
        };
        match query.get(id) {
            Ok(found) => found.cloned(),
            Err(warning) => {
                p.log(warning);
                None
            }
        }
    }
}
