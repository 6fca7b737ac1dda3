//! Func stacks and the handler's choice (kernel: `klp_ops`, `klp_ftrace_handler`
//! in patch.c).
//!
//! One stack per original function, for as long as any patch touches it. The
//! newest func is on top. A thread that calls the function runs, with no
//! transition on the site, the top func; during a transition of the top
//! func, a thread still in the initial UNPATCHED state runs the func below it
//! (or the original when there is none). A nop func means "the original".
//!
//! The stub of a site does not walk the stack: the core condenses the stack
//! into a [`Dispatch`] — the top target, the target below it, and the top
//! func's transition flag — and publishes it whenever one of those changes.
//! [`Dispatch::choose`] is then exactly the kernel handler's decision.

use std::collections::BTreeMap;

use crate::errno::Errno;
use crate::lifecycle::Livepatch;
use crate::patch::Func;
use crate::platform::{Platform, SiteRegistration};
use crate::thread_state::PatchState;
use crate::{Addr, PatchId, log};

/// The code a call should run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// The original function (also what a nop func stands for).
    Original,
    /// A replacement function at this address.
    Code(Addr),
}

/// What a site's stub must do: the kernel handler's inputs, condensed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Dispatch {
    /// The top func's target.
    pub top: Target,
    /// The target of the func below the top one, or the original.
    pub previous: Target,
    /// The top func's `transition` flag.
    pub transition: bool,
}

impl Dispatch {
    /// The dispatch of a site with only the original.
    pub const ORIGINAL: Dispatch = Dispatch {
        top: Target::Original,
        previous: Target::Original,
        transition: false,
    };

    /// The kernel handler's choice for a thread in `state`: the top target,
    /// unless the top func is in transition and the thread has not switched
    /// (UNPATCHED), in which case the one below it.
    ///
    /// An IDLE thread on a site in transition cannot happen when the core's
    /// ordering is kept (the kernel warns); it gets the top, as in the kernel.
    pub fn choose(&self, state: PatchState) -> Target {
        if self.transition && state == PatchState::Unpatched {
            self.previous
        } else {
            self.top
        }
    }
}

/// Identifies one func of one patch: the element of a func stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct FuncRef {
    pub(crate) patch: PatchId,
    pub(crate) object: usize,
    pub(crate) func: usize,
}

/// The funcs patching one original function, oldest first (so the top is the
/// last element).
#[derive(Clone, Debug, Default)]
pub(crate) struct FuncStack {
    entries: Vec<FuncRef>,
}

impl FuncStack {
    pub(crate) fn top(&self) -> Option<FuncRef> {
        self.entries.last().copied()
    }

    /// The func just below `func` (the previously active version), if any.
    pub(crate) fn below(&self, func: FuncRef) -> Option<FuncRef> {
        let pos = self.entries.iter().position(|e| *e == func)?;
        pos.checked_sub(1).map(|p| self.entries[p])
    }

    /// The funcs, oldest first.
    pub(crate) fn entries(&self) -> &[FuncRef] {
        &self.entries
    }
}

/// What removing a func from its stack left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Removal {
    /// The stack is gone: the site must be unregistered.
    Emptied,
    /// Other funcs remain: the site's dispatch changes.
    Remaining,
    /// The func was not on the stack.
    Absent,
}

/// Every func stack, by the address of the original function (kernel: the `klp_ops` list).
#[derive(Clone, Debug, Default)]
pub(crate) struct FuncStacks {
    stacks: BTreeMap<Addr, FuncStack>,
}

impl FuncStacks {
    pub(crate) fn get(&self, addr: Addr) -> Option<&FuncStack> {
        self.stacks.get(&addr)
    }

    pub(crate) fn contains(&self, addr: Addr) -> bool {
        self.stacks.contains_key(&addr)
    }

    /// Pushes `func` on the stack of `addr`; true when the stack is new (its site must be
    /// registered).
    pub(crate) fn push(&mut self, addr: Addr, func: FuncRef) -> bool {
        match self.stacks.get_mut(&addr) {
            Some(stack) => {
                stack.entries.push(func);
                false
            }
            None => {
                self.stacks.insert(
                    addr,
                    FuncStack {
                        entries: vec![func],
                    },
                );
                true
            }
        }
    }

    /// Removes `func` from the stack of `addr`.
    pub(crate) fn remove(&mut self, addr: Addr, func: FuncRef) -> Removal {
        let Some(stack) = self.stacks.get_mut(&addr) else {
            return Removal::Absent;
        };
        let Some(pos) = stack.entries.iter().position(|e| *e == func) else {
            return Removal::Absent;
        };
        stack.entries.remove(pos);
        if stack.entries.is_empty() {
            self.stacks.remove(&addr);
            Removal::Emptied
        } else {
            Removal::Remaining
        }
    }

    /// Forgets a stack whose site was never registered.
    pub(crate) fn discard(&mut self, addr: Addr) {
        self.stacks.remove(&addr);
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (Addr, &FuncStack)> {
        self.stacks.iter().map(|(a, s)| (*a, s))
    }
}

/// One entry of a func stack, for inspection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackEntry {
    /// The patch the func belongs to.
    pub patch: String,
    /// A nop of atomic replace.
    pub nop: bool,
    /// The func's target.
    pub target: Target,
    /// The func's transition flag.
    pub transition: bool,
}

impl Livepatch {
    /// Every func stack, by original address, oldest entry first.
    pub fn func_stacks(&self) -> Vec<(Addr, Vec<StackEntry>)> {
        self.stacks
            .iter()
            .map(|(addr, stack)| {
                let entries = stack
                    .entries()
                    .iter()
                    .map(|&f| {
                        let func = self.func(f);
                        let patch = self
                            .patches
                            .iter()
                            .find(|q| q.id == f.patch)
                            .map(|q| q.name.clone());
                        StackEntry {
                            patch: patch.unwrap_or_default(),
                            nop: func.nop,
                            target: func.target(),
                            transition: func.transition,
                        }
                    })
                    .collect();
                (addr, entries)
            })
            .collect()
    }

    /// The func a stack entry stands for.
    pub(crate) fn func(&self, f: FuncRef) -> &Func {
        let patch = self
            .patches
            .iter()
            .find(|p| p.id == f.patch)
            .expect("a func stack refers to a patch that is gone");
        &patch.objects[f.object].funcs[f.func]
    }

    /// The condensed view of the stack at `addr` that its stub acts on.
    pub(crate) fn dispatch_of(&self, addr: Addr) -> Dispatch {
        let Some(stack) = self.stacks.get(addr) else {
            return Dispatch::ORIGINAL;
        };
        let Some(top) = stack.top() else {
            return Dispatch::ORIGINAL;
        };
        let top_func = self.func(top);
        let previous = stack
            .below(top)
            .map(|f| self.func(f).target())
            .unwrap_or(Target::Original);
        Dispatch {
            top: top_func.target(),
            previous,
            transition: top_func.transition,
        }
    }

    /// Tells the platform what the stub at `addr` must do now.
    pub(crate) fn publish_site<P: Platform>(&self, p: &mut P, addr: Addr) {
        if self.stacks.contains(addr) {
            p.update_dispatch(addr, self.dispatch_of(addr));
        }
    }

    /// Pushes every func of an object on its stack, registering the sites
    /// that are new in one batch (kernel: `klp_patch_object` and
    /// `klp_patch_func`). On failure nothing of the object stays pushed.
    pub(crate) fn patch_object<P: Platform>(
        &mut self,
        p: &mut P,
        patch: usize,
        obj: usize,
    ) -> Result<(), (Errno, String)> {
        if self.patches[patch].objects[obj].patched {
            self.warn(p, "patch_object: object already patched");
        }
        let id = self.patches[patch].id;
        let mut fresh = Vec::new();
        let mut existing = Vec::new();
        for fi in 0..self.patches[patch].objects[obj].funcs.len() {
            let func = &self.patches[patch].objects[obj].funcs[fi];
            let Some(addr) = func.old_func else {
                self.warn(p, "patch_object: func has no resolved address");
                continue;
            };
            if func.patched {
                continue;
            }
            let me = FuncRef {
                patch: id,
                object: obj,
                func: fi,
            };
            if self.stacks.push(addr, me) {
                fresh.push((fi, addr));
            } else {
                existing.push(addr);
            }
            self.patches[patch].objects[obj].funcs[fi].patched = true;
        }

        if !fresh.is_empty() {
            let registrations: Vec<SiteRegistration> = fresh
                .iter()
                .map(|&(fi, addr)| {
                    let func = &self.patches[patch].objects[obj].funcs[fi];
                    SiteRegistration {
                        func_name: func.old_name.clone(),
                        addr,
                        size: func.old_size,
                        dispatch: self.dispatch_of(addr),
                    }
                })
                .collect();
            if let Err(err) = p.register_sites(&registrations) {
                let name = registrations
                    .get(err.index)
                    .map(|r| r.func_name.clone())
                    .unwrap_or_default();
                p.log(log::failed_to_register_handler(&name, err.errno.negative()));
                // The new sites were never registered: drop them here so that
                // the unpatch below does not unregister them.
                for &(fi, addr) in &fresh {
                    self.stacks.discard(addr);
                    self.patches[patch].objects[obj].funcs[fi].patched = false;
                }
                self.unpatch_object(p, patch, obj, false);
                return Err((err.errno, format!("function '{name}': {}", err.error)));
            }
        }
        for addr in existing {
            self.publish_site(p, addr);
        }
        self.patches[patch].objects[obj].patched = true;
        Ok(())
    }

    /// Pops the object's funcs (only nops with `nops_only`) off their stacks,
    /// restoring entries whose stack becomes empty (kernel:
    /// `__klp_unpatch_object`).
    pub(crate) fn unpatch_object<P: Platform>(
        &mut self,
        p: &mut P,
        patch: usize,
        obj: usize,
        nops_only: bool,
    ) {
        let id = self.patches[patch].id;
        let mut emptied = Vec::new();
        let mut changed = Vec::new();
        for fi in 0..self.patches[patch].objects[obj].funcs.len() {
            let func = &self.patches[patch].objects[obj].funcs[fi];
            if !func.patched || (nops_only && !func.nop) {
                continue;
            }
            let Some(addr) = func.old_func else { continue };
            let me = FuncRef {
                patch: id,
                object: obj,
                func: fi,
            };
            match self.stacks.remove(addr, me) {
                Removal::Emptied => emptied.push(addr),
                Removal::Remaining => changed.push(addr),
                Removal::Absent => {}
            }
            self.patches[patch].objects[obj].funcs[fi].patched = false;
        }
        if !emptied.is_empty() {
            p.unregister_sites(&emptied);
        }
        for addr in changed {
            self.publish_site(p, addr);
        }
        let object = &mut self.patches[patch].objects[obj];
        if !nops_only || object.dynamic {
            object.patched = false;
        }
    }

    /// kernel: `klp_unpatch_objects` / `klp_unpatch_objects_dynamic`.
    pub(crate) fn unpatch_objects<P: Platform>(
        &mut self,
        p: &mut P,
        patch: usize,
        nops_only: bool,
    ) {
        for obj in 0..self.patches[patch].objects.len() {
            if self.patches[patch].objects[obj].patched {
                self.unpatch_object(p, patch, obj, nops_only);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_follows_the_kernel_handler() {
        let d = Dispatch {
            top: Target::Code(0x2000),
            previous: Target::Code(0x1000),
            transition: true,
        };
        assert_eq!(d.choose(PatchState::Unpatched), Target::Code(0x1000));
        assert_eq!(d.choose(PatchState::Patched), Target::Code(0x2000));
        let settled = Dispatch {
            transition: false,
            ..d
        };
        assert_eq!(settled.choose(PatchState::Unpatched), Target::Code(0x2000));
        assert_eq!(
            Dispatch::ORIGINAL.choose(PatchState::Idle),
            Target::Original
        );
    }

    #[test]
    fn below_is_the_previous_version() {
        let f = |p| FuncRef {
            patch: PatchId(p),
            object: 0,
            func: 0,
        };
        let mut stacks = FuncStacks::default();
        assert!(stacks.push(0x10, f(1)));
        assert!(!stacks.push(0x10, f(2)));
        assert!(!stacks.push(0x10, f(3)));
        let s = stacks.get(0x10).unwrap();
        assert_eq!(s.top(), Some(f(3)));
        assert_eq!(s.below(f(3)), Some(f(2)));
        assert_eq!(s.below(f(1)), None);
        assert_eq!(stacks.remove(0x10, f(2)), Removal::Remaining);
        assert_eq!(stacks.get(0x10).unwrap().below(f(3)), Some(f(1)));
        assert_eq!(stacks.remove(0x10, f(2)), Removal::Absent);
        assert_eq!(stacks.remove(0x10, f(1)), Removal::Remaining);
        assert_eq!(stacks.remove(0x10, f(3)), Removal::Emptied);
        assert!(!stacks.contains(0x10));
    }
}
