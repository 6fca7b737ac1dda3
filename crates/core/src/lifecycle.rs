//! Enabling and disabling patches, and objects that come and go (kernel:
//! `klp_enable_patch`, `__klp_enable_patch`, `__klp_disable_patch`,
//! `klp_module_coming`, `klp_module_going` in core.c).
//!
//! [`Livepatch`] holds what the kernel keeps in globals: the list of active
//! patches in enable order (`klp_patches`), the func stacks (`klp_ops`) and
//! the transition in progress. Its methods are the locked entry points: the
//! caller serializes them (the kernel's `klp_mutex`).

use std::time::Duration;

use crate::errno::Errno;
use crate::func_stack::FuncStacks;
use crate::patch::{EnableError, Patch, PatchDesc, free_object_loaded, init_object_loaded};
use crate::platform::Platform;
use crate::thread_state::PatchState;
use crate::transition::{BlockReason, Transition};
use crate::{Addr, PatchId, Tid, log};

/// The livepatch core's state for one process.
#[derive(Debug, Default)]
pub struct Livepatch {
    /// Enabled patches and the one in transition, in enable order.
    pub(crate) patches: Vec<Patch>,
    /// One stack per patched original function, by its address.
    pub(crate) stacks: FuncStacks,
    /// The transition in progress, with its target (`klp_target_state`).
    pub(crate) transition: Option<Transition>,
    next_id: u64,
}

/// Why an object loaded later could not be patched: the module loader refuses
/// the module with this error.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("patch '{patch}' failed for object '{object}': {reason}")]
pub struct ComingError {
    /// The patch that failed.
    pub patch: String,
    /// The object being loaded.
    pub object: String,
    /// The error number.
    pub errno: Errno,
    /// What failed and why.
    pub reason: String,
}

impl Livepatch {
    /// An empty core: no patches, no transition.
    pub fn new() -> Self {
        Self::default()
    }

    /// Logs an impossible state (the kernel's `WARN_ON_ONCE`); debug builds
    /// stop at once so that tests catch it.
    pub(crate) fn warn<P: Platform>(&self, p: &mut P, what: &str) {
        p.log(log::warning(what));
        debug_assert!(false, "livepatch core invariant broken: {what}");
    }

    pub(crate) fn patch_index(&self, id: PatchId) -> Option<usize> {
        self.patches.iter().position(|q| q.id == id)
    }

    pub(crate) fn transition_patch_index(&self) -> Option<usize> {
        self.transition
            .as_ref()
            .and_then(|t| self.patch_index(t.patch))
    }

    fn index_by_name(&self, name: &str) -> Option<usize> {
        self.patches.iter().position(|q| q.name == name)
    }

    /// Drops the patch at `idx` from the list and tells the platform (kernel:
    /// `klp_free_patch_async` → `module_put` unless forced).
    pub(crate) fn free_patch<P: Platform>(&mut self, p: &mut P, idx: usize) {
        let patch = self.patches.remove(idx);
        p.patch_released(&patch.name, patch.forced);
    }

    /// Enables a patch, as loading a livepatch module does (kernel:
    /// `klp_enable_patch`): validates the descriptor and the system states,
    /// resolves every function of every loaded object, then runs the
    /// patching transition's first steps and a first attempt to complete it.
    ///
    /// On error nothing stays changed; the error carries the kernel's error
    /// number (`EINVAL`, `EBUSY`, a failing callback's value, ...) and why.
    pub fn enable_patch<P: Platform>(
        &mut self,
        p: &mut P,
        desc: &PatchDesc,
    ) -> Result<PatchId, EnableError> {
        self.next_id += 1;
        let id = PatchId(self.next_id);
        let mut patch = Patch::from_desc(id, desc)?;
        if !self.is_patch_compatible(&patch) {
            p.log(log::not_compatible(&patch.name));
            return Err(EnableError::new(
                Errno::EINVAL,
                format!(
                    "patch '{}' is not compatible with the installed patches: {}",
                    patch.name,
                    self.incompatibility(&patch)
                ),
            ));
        }
        if self.index_by_name(&patch.name).is_some() {
            return Err(EnableError::new(
                Errno::EEXIST,
                format!("a patch named '{}' is already loaded", patch.name),
            ));
        }
        if patch.replace {
            self.add_nops(&mut patch);
        }
        for obj in &mut patch.objects {
            obj.loaded = match &obj.name {
                None => true,
                Some(name) => p.is_object_loaded(name),
            };
            if obj.loaded {
                init_object_loaded(p, obj)?;
            }
        }
        self.patches.push(patch);
        let idx = self.patches.len() - 1;
        match self.enable_patch_locked(p, idx) {
            Ok(()) => Ok(id),
            Err(err) => {
                if let Some(idx) = self.patch_index(id) {
                    self.patches.remove(idx);
                }
                Err(err)
            }
        }
    }

    /// Describes the first state that makes `new` incompatible.
    fn incompatibility(&self, new: &Patch) -> String {
        for old in &self.patches {
            for st in &old.states {
                match new.state(st.id) {
                    Some(s) if s.version < st.version => {
                        return format!(
                            "state {} has version {} in '{}' but {} in '{}'",
                            st.id, s.version, new.name, st.version, old.name
                        );
                    }
                    None if new.replace && !st.callbacks.can_remove() => {
                        return format!(
                            "replacing patch '{}' does not carry state {} of patch '{}', which has no callback to remove it",
                            new.name, st.id, old.name
                        );
                    }
                    _ => {}
                }
            }
        }
        "unknown".to_string()
    }

    /// kernel: `__klp_enable_patch`.
    fn enable_patch_locked<P: Platform>(
        &mut self,
        p: &mut P,
        idx: usize,
    ) -> Result<(), EnableError> {
        if self.transition.is_some() {
            let busy = self
                .transition_patch_index()
                .map(|i| self.patches[i].name.clone());
            return Err(EnableError::new(
                Errno::EBUSY,
                format!(
                    "patch '{}' is in transition; wait for it, reverse it or force it first",
                    busy.unwrap_or_default()
                ),
            ));
        }
        if self.patches[idx].enabled {
            self.warn(p, "enable: patch already enabled");
        }
        let name = self.patches[idx].name.clone();
        p.log(log::enabling_patch(&name));
        self.init_transition(p, idx, PatchState::Patched);

        let failure = 'enable: {
            if let Err((id, ret)) = self.setup_states(p, idx) {
                break 'enable Some(EnableError::new(
                    errno_of(ret),
                    format!("the setup callback of state {id} of patch '{name}' failed with {ret}"),
                ));
            }
            if self.patches[idx].replace {
                self.disable_obsolete_states(p, idx);
            }
            for obj in 0..self.patches[idx].objects.len() {
                if !self.patches[idx].objects[obj].loaded {
                    continue;
                }
                let obj_name = self.patches[idx].objects[obj].display_name().to_string();
                let ret = self.pre_patch_callback(p, idx, obj);
                if ret != 0 {
                    p.log(log::pre_patch_failed(&obj_name));
                    self.undo_states_after_setup(p, idx);
                    break 'enable Some(EnableError::new(
                        errno_of(ret),
                        format!("pre_patch callback of object '{obj_name}' failed with {ret}"),
                    ));
                }
                if let Err((errno, reason)) = self.patch_object(p, idx, obj) {
                    p.log(log::failed_to_patch_object(&obj_name));
                    self.undo_states_after_setup(p, idx);
                    break 'enable Some(EnableError::new(
                        errno,
                        format!("object '{obj_name}' could not be patched: {reason}"),
                    ));
                }
            }
            None
        };
        if let Some(err) = failure {
            p.log(log::failed_to_enable_patch(&name));
            self.cancel_transition(p);
            return Err(err);
        }

        self.start_transition(p);
        self.patches[idx].enabled = true;
        self.try_complete_transition(p);
        Ok(())
    }

    /// The `err_states` path of seed 004: give back the obsolete states and
    /// release what setup created.
    fn undo_states_after_setup<P: Platform>(&mut self, p: &mut P, idx: usize) {
        if self.patches[idx].replace {
            self.enable_obsolete_states(p, idx);
        }
        self.release_states(p, idx);
    }

    /// kernel: `__klp_disable_patch`.
    fn disable_patch_locked<P: Platform>(&mut self, p: &mut P, idx: usize) -> Result<(), Errno> {
        if !self.patches[idx].enabled {
            self.warn(p, "disable: patch not enabled");
            return Err(Errno::EINVAL);
        }
        if self.transition.is_some() {
            return Err(Errno::EBUSY);
        }
        self.init_transition(p, idx, PatchState::Unpatched);
        self.disable_states(p, idx);
        for obj in 0..self.patches[idx].objects.len() {
            if self.patches[idx].objects[obj].patched {
                self.pre_unpatch_callback(p, idx, obj);
            }
        }
        self.start_transition(p);
        self.patches[idx].enabled = false;
        self.try_complete_transition(p);
        Ok(())
    }

    /// Writes `enabled` (kernel: `enabled_store`): the same value again is
    /// `EINVAL`; the opposite value for the patch in transition reverses it;
    /// 0 disables (`EBUSY` while another patch is in transition); 1 for a
    /// disabled patch is `EINVAL` (a disabled patch is never enabled again).
    pub fn set_enabled<P: Platform>(
        &mut self,
        p: &mut P,
        patch: &str,
        enabled: bool,
    ) -> Result<(), Errno> {
        let idx = self.index_by_name(patch).ok_or(Errno::EINVAL)?;
        if self.patches[idx].enabled == enabled {
            return Err(Errno::EINVAL);
        }
        if self.transition_patch_index() == Some(idx) {
            self.reverse_transition(p);
            Ok(())
        } else if !enabled {
            self.disable_patch_locked(p, idx)
        } else {
            Err(Errno::EINVAL)
        }
    }

    /// Writes 1 to `force` (kernel: `force_store`): only for the patch in
    /// transition, else `EINVAL`.
    pub fn force<P: Platform>(&mut self, p: &mut P, patch: &str) -> Result<(), Errno> {
        let idx = self.index_by_name(patch).ok_or(Errno::EINVAL)?;
        if self.transition_patch_index() != Some(idx) {
            return Err(Errno::EINVAL);
        }
        self.force_transition(p);
        Ok(())
    }

    /// The retry work (kernel: `klp_transition_work_fn`): attempts to
    /// complete the transition if one runs and its next attempt is due.
    /// Returns whether a transition completed.
    pub fn transition_work<P: Platform>(&mut self, p: &mut P) -> bool {
        match &self.transition {
            Some(tr) if p.now() >= tr.next_attempt_at => self.try_complete_transition(p),
            _ => false,
        }
    }

    /// When [`Livepatch::transition_work`] should run next; `None` when no
    /// transition runs.
    pub fn next_work_at(&self) -> Option<Duration> {
        self.transition.as_ref().map(|t| t.next_attempt_at)
    }

    /// A shared object is being loaded (kernel: `klp_module_coming`): apply
    /// every enabled patch that targets it, before the object's code can run.
    /// Unlike the kernel, which initializes and applies one patch after the
    /// other, every patch's object is initialized (build ids, symbols, plans)
    /// before the first callback runs, so that a refusal runs none. On error
    /// the patches applied so far are reverted and the object must not be
    /// loaded.
    pub fn object_coming<P: Platform>(
        &mut self,
        p: &mut P,
        object: &str,
    ) -> Result<(), ComingError> {
        if object == crate::patch::MAIN_OBJECT_NAME {
            p.log(log::invalid_module_name());
            return Err(ComingError {
                patch: String::new(),
                object: object.to_string(),
                errno: Errno::EINVAL,
                reason: format!("'{object}' is reserved for the main executable"),
            });
        }
        let tp = self.transition.as_ref().map(|t| t.patch);
        // Every patch's object for it, in enable order; one already loaded (the object came in
        // with a patch library, before that patch was enabled) has been patched already.
        let targets: Vec<(usize, usize)> = (0..self.patches.len())
            .filter_map(|idx| {
                self.patches[idx]
                    .objects
                    .iter()
                    .position(|o| o.matches(Some(object)) && !o.loaded)
                    .map(|obj| (idx, obj))
            })
            .collect();

        // Everything that can refuse the object, for every patch, before any callback runs or
        // any code is written: build ids, symbols, the plan of each redirection.
        for (i, &(idx, obj)) in targets.iter().enumerate() {
            let name = self.patches[idx].name.clone();
            let o = &mut self.patches[idx].objects[obj];
            o.loaded = true;
            if let Err(err) = init_object_loaded(p, o) {
                p.log(log::failed_to_initialize_for_module(
                    &name,
                    object,
                    err.errno.negative(),
                ));
                p.log(log::refusing_to_load_module(&name, object));
                for &(j, ob) in &targets[..=i] {
                    free_object_loaded(&mut self.patches[j].objects[ob]);
                }
                return Err(ComingError {
                    patch: name,
                    object: object.to_string(),
                    errno: err.errno,
                    reason: err.reason,
                });
            }
        }

        for (i, &(idx, obj)) in targets.iter().enumerate() {
            let name = self.patches[idx].name.clone();
            let failure = 'coming: {
                p.log(log::applying_patch_to_loading(&name, object));
                let ret = self.pre_patch_callback(p, idx, obj);
                if ret != 0 {
                    p.log(log::pre_patch_failed(object));
                    break 'coming Some((
                        errno_of(ret),
                        format!("pre_patch callback failed with {ret}"),
                    ));
                }
                if let Err((errno, reason)) = self.patch_object(p, idx, obj) {
                    p.log(log::failed_to_apply_to_module(
                        &name,
                        object,
                        errno.negative(),
                    ));
                    self.post_unpatch_callback(p, idx, obj);
                    break 'coming Some((errno, reason));
                }
                if Some(self.patches[idx].id) != tp {
                    self.post_patch_callback(p, idx, obj);
                }
                None
            };
            if let Some((errno, reason)) = failure {
                p.log(log::refusing_to_load_module(&name, object));
                free_object_loaded(&mut self.patches[idx].objects[obj]);
                // The patches after this one were only initialized.
                for &(j, ob) in &targets[i + 1..] {
                    free_object_loaded(&mut self.patches[j].objects[ob]);
                }
                self.cleanup_object_patches(p, object, Some(idx));
                return Err(ComingError {
                    patch: name,
                    object: object.to_string(),
                    errno,
                    reason,
                });
            }
        }
        Ok(())
    }

    /// A shared object is going away, after its own finalizers ran (kernel:
    /// `klp_module_going`): revert every patch on it.
    pub fn object_going<P: Platform>(&mut self, p: &mut P, object: &str) {
        self.cleanup_object_patches(p, object, None);
    }

    /// kernel: `klp_cleanup_module_patches_limited`: reverts the patches
    /// before `limit` (all with `None`) on `object`.
    fn cleanup_object_patches<P: Platform>(
        &mut self,
        p: &mut P,
        object: &str,
        limit: Option<usize>,
    ) {
        let tp = self.transition.as_ref().map(|t| t.patch);
        let end = limit.unwrap_or(self.patches.len());
        for idx in 0..end {
            let Some(obj) = self.patches[idx]
                .objects
                .iter()
                .position(|o| o.matches(Some(object)))
            else {
                continue;
            };
            if !self.patches[idx].objects[obj].loaded {
                continue;
            }
            if Some(self.patches[idx].id) != tp {
                self.pre_unpatch_callback(p, idx, obj);
            }
            let name = self.patches[idx].name.clone();
            p.log(log::reverting_patch_on_unloading(&name, object));
            if self.patches[idx].objects[obj].patched {
                self.unpatch_object(p, idx, obj, false);
            }
            self.post_unpatch_callback(p, idx, obj);
            free_object_loaded(&mut self.patches[idx].objects[obj]);
        }
    }

    /// The name of the patch in transition and its target state.
    pub fn transition(&self) -> Option<(&str, PatchState)> {
        self.transition_patch_index()
            .map(|i| (self.patches[i].name.as_str(), self.target()))
    }

    /// The threads that failed to switch at the last attempt, and why.
    pub fn blocked_threads(&self) -> Vec<(Tid, BlockReason)> {
        self.transition
            .as_ref()
            .map(|t| t.blocked.iter().map(|(tid, r)| (*tid, r.clone())).collect())
            .unwrap_or_default()
    }

    /// `klp_target_state`.
    pub fn target_state(&self) -> PatchState {
        self.target()
    }

    /// The names of the active patches, in enable order.
    pub fn patch_names(&self) -> Vec<String> {
        self.patches.iter().map(|p| p.name.clone()).collect()
    }

    /// Whether the patch `name` is loaded in the core (enabled or in
    /// transition).
    pub fn has_patch(&self, name: &str) -> bool {
        self.index_by_name(name).is_some()
    }

    /// The addresses of every redirected function, with the dispatch its
    /// stub acts on now.
    pub fn sites(&self) -> Vec<(Addr, crate::func_stack::Dispatch)> {
        self.stacks
            .iter()
            .map(|(a, _)| (a, self.dispatch_of(a)))
            .collect()
    }
}

/// The positive errno of a failing C callback result.
fn errno_of(ret: i32) -> Errno {
    match Errno::from_callback_result(ret) {
        Err(e) => e,
        Ok(()) => Errno::EINVAL,
    }
}
