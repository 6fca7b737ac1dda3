//! Per-object (un)patching callbacks (kernel: `struct klp_callbacks` and the
//! wrappers in core.h).
//!
//! `pre_patch` is the only callback that can fail; its result decides whether
//! `post_unpatch` runs later (`post_unpatch_enabled`), so an object whose
//! `pre_patch` failed is never told it was unpatched.

use crate::CallbackId;
use crate::lifecycle::Livepatch;
use crate::platform::{ObjectCallback, ObjectCallbackKind, Platform};
use crate::state::PrevStates;

/// The callbacks of one object; each is an opaque handle the platform knows
/// how to call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ObjectCallbacks {
    /// Before the object is patched; a non-zero result refuses the patch.
    pub pre_patch: Option<CallbackId>,
    /// After the patching transition (or at once for an object loaded later).
    pub post_patch: Option<CallbackId>,
    /// Before the unpatching transition.
    pub pre_unpatch: Option<CallbackId>,
    /// After the unpatching transition, only if `pre_patch` succeeded.
    pub post_unpatch: Option<CallbackId>,
}

impl ObjectCallbacks {
    fn get(&self, kind: ObjectCallbackKind) -> Option<CallbackId> {
        match kind {
            ObjectCallbackKind::PrePatch => self.pre_patch,
            ObjectCallbackKind::PostPatch => self.post_patch,
            ObjectCallbackKind::PreUnpatch => self.pre_unpatch,
            ObjectCallbackKind::PostUnpatch => self.post_unpatch,
        }
    }
}

impl Livepatch {
    /// Runs one callback of object `obj` of the patch at `patch` (an index
    /// into the patch list) if the author supplied it; 0 otherwise.
    fn call_object<P: Platform>(
        &self,
        p: &mut P,
        patch: usize,
        obj: usize,
        kind: ObjectCallbackKind,
    ) -> i32 {
        let patch = &self.patches[patch];
        let object = &patch.objects[obj];
        let Some(callback) = object.callbacks.get(kind) else {
            return 0;
        };
        let prev = self.prev_state_refs();
        p.call_object_callback(ObjectCallback {
            kind,
            callback,
            patch: &patch.name,
            object: object.name.as_deref(),
            object_index: object.desc_index.unwrap_or(obj),
            prev_states: PrevStates {
                in_transition: self.transition.is_some(),
                states: &prev,
            },
        })
    }

    /// kernel: `klp_pre_patch_callback`.
    pub(crate) fn pre_patch_callback<P: Platform>(
        &mut self,
        p: &mut P,
        patch: usize,
        obj: usize,
    ) -> i32 {
        let ret = self.call_object(p, patch, obj, ObjectCallbackKind::PrePatch);
        self.patches[patch].objects[obj].post_unpatch_enabled = ret == 0;
        ret
    }

    /// kernel: `klp_post_patch_callback`.
    pub(crate) fn post_patch_callback<P: Platform>(&mut self, p: &mut P, patch: usize, obj: usize) {
        self.call_object(p, patch, obj, ObjectCallbackKind::PostPatch);
    }

    /// kernel: `klp_pre_unpatch_callback`.
    pub(crate) fn pre_unpatch_callback<P: Platform>(
        &mut self,
        p: &mut P,
        patch: usize,
        obj: usize,
    ) {
        self.call_object(p, patch, obj, ObjectCallbackKind::PreUnpatch);
    }

    /// kernel: `klp_post_unpatch_callback`: gated by `post_unpatch_enabled`,
    /// which it clears.
    pub(crate) fn post_unpatch_callback<P: Platform>(
        &mut self,
        p: &mut P,
        patch: usize,
        obj: usize,
    ) {
        if self.patches[patch].objects[obj].post_unpatch_enabled {
            self.call_object(p, patch, obj, ObjectCallbackKind::PostUnpatch);
        }
        self.patches[patch].objects[obj].post_unpatch_enabled = false;
    }
}
