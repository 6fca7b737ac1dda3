//! A deterministic simulated process for testing the livepatch core.
//!
//! [`World`] is a process made of virtual objects (with symbol tables that
//! may repeat names), code at virtual addresses, threads with stacks of
//! frames, and a virtual clock. It implements the core's platform trait, so
//! the core runs against it exactly as against the real agent. [`Sim`] bundles
//! the core and a world with the commands of the kernel's selftest harness
//! (`insmod`, `rmmod`, writes to `/sys/kernel/livepatch`), waits for
//! transitions on the virtual clock, and runs the invariant [`checker`] after
//! every command.
//!
//! Everything is deterministic: no threads, no real time, no randomness
//! except what a test feeds in, or the one seed of a simulation.
//!
//! - [`world`]: the simulated process and its platform implementation.
//! - [`checker`]: invariants checked after every step.
//! - [`modules`]: the kernel selftest modules, rebuilt as simulated patch
//!   libraries and target objects.
//! - [`workload`]: the operations of random runs, with their checks.
//! - [`simulator`]: runs driven by one seed, which decides every operation,
//!   thread move and fault; the `simulate` program runs one.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod checker;
pub mod modules;
pub mod simulator;
pub mod workload;
pub mod world;

use std::collections::BTreeMap;
use std::time::Duration;

use livepatch_core::{Errno, Livepatch, PatchDesc, PatchId};

pub use world::{CallbackCall, Frame, ModuleState, SimSiteError, SimThread, World};

/// How long the harness waits for a transition, like the selftests' 60 s.
pub const SETTLE_LIMIT: Duration = Duration::from_secs(60);

/// A target module (a shared object that is not a patch): what it contains
/// and what its initializer and finalizer do.
pub struct TargetModule {
    /// The object's name.
    pub name: String,
    /// Its functions and their sizes.
    pub functions: Vec<(String, u64)>,
    /// Runs after the object is loaded and patched (`module_init`).
    pub init: Box<dyn FnMut(&mut World)>,
    /// Runs before the object is unpatched and unloaded (`module_exit`).
    pub exit: Box<dyn FnMut(&mut World)>,
}

impl std::fmt::Debug for TargetModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetModule")
            .field("name", &self.name)
            .finish()
    }
}

/// The core and a simulated process, driven like the kernel selftests drive a
/// kernel.
pub struct Sim {
    /// The livepatch core.
    pub core: Livepatch,
    /// The simulated process.
    pub world: World,
    targets: BTreeMap<String, TargetModule>,
    /// World step of the last forced transition.
    forced_before: u64,
    /// Whether commands run the checker (on by default).
    pub check_invariants: bool,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim").field("world", &self.world).finish()
    }
}

impl Default for Sim {
    fn default() -> Self {
        Self::new(World::new())
    }
}

/// The module path the selftests print.
fn module_path(name: &str) -> String {
    format!("test_modules/{name}.ko")
}

impl Sim {
    /// A simulation over `world` with an empty core.
    pub fn new(world: World) -> Self {
        Sim {
            core: Livepatch::new(),
            world,
            targets: BTreeMap::new(),
            forced_before: 0,
            check_invariants: true,
        }
    }

    /// Runs the invariant checker.
    ///
    /// # Panics
    /// On any violation, with the violation and the log so far.
    pub fn check(&self) {
        if !self.check_invariants {
            return;
        }
        if let Err(e) = checker::check(&self.core, &self.world, self.forced_before) {
            panic!(
                "invariant violated: {e}\nlog so far:\n{}",
                self.world.transcript().join("\n")
            );
        }
    }

    /// The log, as the selftests' `check_result` filters it.
    pub fn transcript(&self) -> Vec<String> {
        self.world.transcript()
    }

    /// Runs the retry work until no transition is left or `limit` of virtual
    /// time passed. Returns whether the transition (if any) finished.
    pub fn settle_within(&mut self, limit: Duration) -> bool {
        let deadline = self.world.clock() + limit;
        while let Some(at) = self.core.next_work_at() {
            if at > deadline {
                self.world.advance_to(deadline);
                return false;
            }
            self.world.advance_to(at);
            self.core.transition_work(&mut self.world);
            self.check();
        }
        true
    }

    /// [`Sim::settle_within`] with the selftests' limit.
    pub fn settle(&mut self) -> bool {
        self.settle_within(SETTLE_LIMIT)
    }

    /// Runs one attempt of the retry work at its due time.
    pub fn work_once(&mut self) -> bool {
        if let Some(at) = self.core.next_work_at() {
            self.world.advance_to(at);
        }
        let done = self.core.transition_work(&mut self.world);
        self.check();
        done
    }

    /// `insmod` of a patch library: prints the command, enables the patch
    /// and, on failure, prints insmod's error.
    pub fn insmod_patch(
        &mut self,
        desc: &PatchDesc,
        args: &str,
    ) -> Result<PatchId, livepatch_core::EnableError> {
        let path = module_path(&desc.name);
        self.world
            .print(format!("% insmod {path}{}", arg_suffix(args)));
        let r = self.core.enable_patch(&mut self.world, desc);
        if let Err(e) = &r {
            self.world.print(format!(
                "insmod: ERROR: could not insert module {path}: {}",
                e.errno.load_error_text()
            ));
        }
        self.check();
        r
    }

    /// `load_lp`: insmod a patch and wait for its transition.
    ///
    /// # Panics
    /// If the patch fails to load or its transition does not finish.
    pub fn load_lp(&mut self, desc: &PatchDesc, args: &str) -> PatchId {
        let id = self
            .insmod_patch(desc, args)
            .unwrap_or_else(|e| panic!("loading {} failed: {e}", desc.name));
        assert!(
            self.settle(),
            "the transition of {} did not finish",
            desc.name
        );
        id
    }

    /// `load_lp_nowait`: insmod a patch and do not wait.
    ///
    /// # Panics
    /// If the patch fails to load.
    pub fn load_lp_nowait(&mut self, desc: &PatchDesc, args: &str) -> PatchId {
        self.insmod_patch(desc, args)
            .unwrap_or_else(|e| panic!("loading {} failed: {e}", desc.name))
    }

    /// `load_failing_mod` for a patch: insmod must fail.
    ///
    /// # Panics
    /// If it succeeds.
    pub fn load_failing_lp(&mut self, desc: &PatchDesc, args: &str) -> Errno {
        match self.insmod_patch(desc, args) {
            Ok(_) => panic!("loading {} succeeded but should have failed", desc.name),
            Err(e) => e.errno,
        }
    }

    /// Writes an attribute of `/sys/kernel/livepatch`, printing the command
    /// the way the selftests do.
    pub fn sysfs_write(&mut self, path: &str, value: &str) -> Result<(), Errno> {
        self.world
            .print(format!("% echo {value} > /sys/kernel/livepatch/{path}"));
        let r = self.core.sysfs_write(&mut self.world, path, value);
        self.check();
        r
    }

    /// Writes an attribute without printing anything.
    pub fn sysfs_write_quiet(&mut self, path: &str, value: &str) -> Result<(), Errno> {
        let r = self.core.sysfs_write(&mut self.world, path, value);
        self.check();
        r
    }

    /// Reads an attribute.
    pub fn sysfs_read(&self, path: &str) -> Result<String, Errno> {
        self.core.sysfs_read(path)
    }

    /// `disable_lp`: writes 0 to `enabled` and waits until the patch is gone.
    ///
    /// # Panics
    /// If the write fails or the patch does not go away.
    pub fn disable_lp(&mut self, name: &str) {
        self.sysfs_write(&format!("{name}/enabled"), "0")
            .unwrap_or_else(|e| panic!("disabling {name} failed: {e}"));
        assert!(
            self.settle(),
            "the unpatching transition of {name} did not finish"
        );
        assert!(!self.core.has_patch(name), "{name} is still loaded");
    }

    /// `rmmod` of a patch library: only a released, unforced patch can go.
    pub fn rmmod_patch(&mut self, name: &str) -> Result<(), Errno> {
        let released = self
            .world
            .released
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .cloned();
        match released {
            Some((_, false)) => {
                self.world.print(format!("% rmmod {name}"));
                self.world.released.retain(|(n, _)| n != name);
                Ok(())
            }
            // A forced patch, or one still in use, keeps its reference.
            _ => Err(Errno::EBUSY),
        }
    }

    /// `unload_lp`.
    ///
    /// # Panics
    /// If the patch library cannot be removed.
    pub fn unload_lp(&mut self, name: &str) {
        self.rmmod_patch(name)
            .unwrap_or_else(|e| panic!("rmmod {name} failed: {e}"));
    }

    /// Records that the last force happened now: frames pushed so far are
    /// exempt from the consistency invariant.
    pub fn note_force(&mut self) {
        self.forced_before = self.world.step();
    }

    /// Writes 1 to `force` of a patch.
    pub fn force(&mut self, name: &str) -> Result<(), Errno> {
        self.note_force();
        self.sysfs_write(&format!("{name}/force"), "1")
    }

    /// `insmod` of a target module: the object comes, the patches that
    /// target it are applied, then its initializer runs. On failure the
    /// loader prints its error and the object stays unloaded.
    pub fn insmod_target(&mut self, mut module: TargetModule, args: &str) -> Result<(), Errno> {
        let name = module.name.clone();
        let path = module_path(&name);
        self.world
            .print(format!("% insmod {path}{}", arg_suffix(args)));
        if !self.world.object_exists(&name) {
            let functions: Vec<(&str, u64)> = module
                .functions
                .iter()
                .map(|(n, s)| (n.as_str(), *s))
                .collect();
            self.world.add_functions(Some(&name), &functions);
        }
        self.world.set_module_state(&name, ModuleState::Coming);
        if let Err(e) = self.core.object_coming(&mut self.world, &name) {
            self.world.set_module_state(&name, ModuleState::Unformed);
            self.world.print(format!(
                "insmod: ERROR: could not insert module {path}: {}",
                e.errno.load_error_text()
            ));
            self.check();
            return Err(e.errno);
        }
        (module.init)(&mut self.world);
        self.world.set_module_state(&name, ModuleState::Live);
        self.targets.insert(name, module);
        self.check();
        Ok(())
    }

    /// `load_mod`: insmod a target module that must load.
    ///
    /// # Panics
    /// If it fails.
    pub fn load_mod(&mut self, module: TargetModule, args: &str) {
        let name = module.name.clone();
        self.insmod_target(module, args)
            .unwrap_or_else(|e| panic!("loading {name} failed: {e}"));
    }

    /// `unload_mod`: the finalizer runs, then the patches on the object are
    /// reverted, then the object goes.
    ///
    /// # Panics
    /// If the module is not loaded.
    pub fn unload_mod(&mut self, name: &str) {
        let mut module = self
            .targets
            .remove(name)
            .unwrap_or_else(|| panic!("{name} is not loaded"));
        self.world.print(format!("% rmmod {name}"));
        (module.exit)(&mut self.world);
        self.world.set_module_state(name, ModuleState::Going);
        self.core.object_going(&mut self.world, name);
        self.world.set_module_state(name, ModuleState::Unformed);
        self.check();
    }

    /// Whether a target module is loaded.
    pub fn is_target_loaded(&self, name: &str) -> bool {
        self.targets.contains_key(name)
    }
}

fn arg_suffix(args: &str) -> String {
    if args.is_empty() {
        String::new()
    } else {
        format!(" {args}")
    }
}
