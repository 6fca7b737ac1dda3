//! Atomic replace: cumulative patches, nops and replaced patches (kernel:
//! `klp_add_nops`, `klp_unpatch_replaced_patches`, `klp_discard_nops`,
//! `klp_free_replaced_patches_async` in core.c).
//!
//! A replacing patch gets a nop func for every function an enabled patch
//! changes and it does not: during the transition the nop sends the threads
//! that switched to the original. When the transition completes, the
//! replaced patches leave every func stack without running any of their
//! callbacks, the nops are discarded, and the replaced patches are released.
//! Dynamic objects exist only to hold nops and go with them; an object the
//! author declared stays even with no funcs, so its callbacks still run.

use crate::PatchId;
use crate::lifecycle::Livepatch;
use crate::patch::{Func, Object, Patch};
use crate::platform::Platform;

impl Livepatch {
    /// Adds the nops and dynamic objects to `new`, which is not on the patch
    /// list yet (kernel: `klp_add_nops`).
    pub(crate) fn add_nops(&self, new: &mut Patch) {
        for old in &self.patches {
            for old_obj in &old.objects {
                let idx = match new.objects.iter().position(|o| o.name == old_obj.name) {
                    Some(idx) => idx,
                    None => {
                        new.objects.push(Object {
                            name: old_obj.name.clone(),
                            funcs: Vec::new(),
                            callbacks: Default::default(),
                            build_id: None,
                            desc_index: None,
                            dynamic: true,
                            loaded: false,
                            patched: false,
                            post_unpatch_enabled: false,
                        });
                        new.objects.len() - 1
                    }
                };
                let new_obj = &mut new.objects[idx];
                for old_func in &old_obj.funcs {
                    let covered = new_obj.funcs.iter().any(|f| {
                        f.old_name == old_func.old_name && f.old_sympos == old_func.old_sympos
                    });
                    if !covered {
                        new_obj
                            .funcs
                            .push(Func::new_nop(&old_func.old_name, old_func.old_sympos));
                    }
                }
            }
        }
    }

    /// Takes every patch enabled before the replacing patch at index `new`
    /// off the func stacks, silently (kernel: `klp_unpatch_replaced_patches`).
    pub(crate) fn unpatch_replaced_patches<P: Platform>(&mut self, p: &mut P, new: usize) {
        for old in 0..new {
            self.patches[old].enabled = false;
            self.unpatch_objects(p, old, false);
        }
    }

    /// Pops and forgets the nops of the patch at `patch`, and its dynamic
    /// objects (kernel: `klp_discard_nops`).
    pub(crate) fn discard_nops<P: Platform>(&mut self, p: &mut P, patch: usize) {
        self.unpatch_objects(p, patch, true);
        let objects = &mut self.patches[patch].objects;
        objects.retain(|o| !o.dynamic);
        for obj in objects {
            obj.funcs.retain(|f| !f.nop);
        }
    }

    /// Releases every patch before the replacing patch `new` (kernel:
    /// `klp_free_replaced_patches_async`).
    pub(crate) fn free_replaced_patches<P: Platform>(&mut self, p: &mut P, new: PatchId) {
        while let Some(first) = self.patches.first() {
            if first.id == new {
                break;
            }
            self.free_patch(p, 0);
        }
    }
}
