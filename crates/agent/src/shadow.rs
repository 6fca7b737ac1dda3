//! Shadow variables for patch code on many threads: the core's deterministic table with the
//! kernel's concurrency rules (shadow.c) around it.
//!
//! 1. Any number of threads may call every function at once.
//! 2. `get` never waits for a constructor or destructor to finish: it takes only the table's
//!    read lock, which constructors and destructors never hold.
//! 3. Constructors and destructors run one at a time (the kernel runs them under
//!    `klp_shadow_lock`): a constructor runs exactly once, for the caller that creates the
//!    variable, and may call `get`; calling an allocating or freeing function from a
//!    constructor or destructor deadlocks, as it does in the kernel.
//! 4. The data itself is the caller's to lock; a block stays at its address until it is freed.

#![forbid(unsafe_code)]

use std::ptr::NonNull;
use std::sync::{Mutex, RwLock};

use livepatch_core::shadow::{Prepared, ShadowCtor, ShadowDtor};
use livepatch_core::{LogRecord, ShadowVars};

/// Both locks of the shadow variables, held (see [`SharedShadowVars::hold`]); the table's
/// is released first.
#[derive(Debug)]
pub struct ShadowHold<'a> {
    _table: std::sync::RwLockWriteGuard<'a, ShadowVars>,
    _update: std::sync::MutexGuard<'a, ()>,
}

/// The shadow variables of the process.
#[derive(Debug)]
pub struct SharedShadowVars {
    table: RwLock<ShadowVars>,
    /// Serializes allocation and freeing, so that constructors and destructors run one at a
    /// time without blocking `get` (rules 2 and 3).
    update: Mutex<()>,
}

impl SharedShadowVars {
    /// An empty table that reports failures through `log`.
    pub fn new(log: impl Fn(LogRecord) + Send + Sync + 'static) -> Self {
        SharedShadowVars {
            table: RwLock::new(ShadowVars::with_log(log)),
            update: Mutex::new(()),
        }
    }

    /// Holds both locks until the value is dropped: across a `fork`, so that the child's
    /// copies are not held by a thread the child does not have.
    pub fn hold(&self) -> ShadowHold<'_> {
        let update = self.update.lock().unwrap_or_else(|e| e.into_inner());
        ShadowHold {
            _table: self.write(),
            _update: update,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, ShadowVars> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, ShadowVars> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    /// `klp_shadow_get`.
    pub fn get(&self, obj: usize, id: u64) -> Option<NonNull<u8>> {
        self.read().get(obj, id)
    }

    /// `klp_shadow_alloc`: a duplicate is a warning and `None`.
    pub fn alloc(
        &self,
        obj: usize,
        id: u64,
        size: usize,
        ctor: Option<ShadowCtor<'_>>,
    ) -> Option<NonNull<u8>> {
        self.allocate(obj, id, size, ctor, true)
    }

    /// `klp_shadow_get_or_alloc`.
    pub fn get_or_alloc(
        &self,
        obj: usize,
        id: u64,
        size: usize,
        ctor: Option<ShadowCtor<'_>>,
    ) -> Option<NonNull<u8>> {
        self.allocate(obj, id, size, ctor, false)
    }

    fn allocate(
        &self,
        obj: usize,
        id: u64,
        size: usize,
        ctor: Option<ShadowCtor<'_>>,
        warn_on_exist: bool,
    ) -> Option<NonNull<u8>> {
        let _update = self.update.lock().unwrap_or_else(|e| e.into_inner());
        // The constructor runs under the read lock only: `get` goes on meanwhile, and may be
        // called by the constructor itself.
        let prepared = self.read().prepare(obj, id, size, ctor, warn_on_exist);
        match prepared {
            Prepared::Existing(ptr) => Some(ptr),
            Prepared::Duplicate | Prepared::Failed => None,
            Prepared::New(block) => Some(self.write().insert(obj, id, block)),
        }
    }

    /// `klp_shadow_free`.
    pub fn free(&self, obj: usize, id: u64, dtor: Option<ShadowDtor<'_>>) {
        let _update = self.update.lock().unwrap_or_else(|e| e.into_inner());
        let removed = self.write().remove(obj, id);
        if let (Some(block), Some(dtor)) = (removed, dtor) {
            dtor(obj, block.data());
        }
    }

    /// `klp_shadow_free_all`: destructors run for the objects by ascending address.
    pub fn free_all(&self, id: u64, dtor: Option<ShadowDtor<'_>>) {
        let _update = self.update.lock().unwrap_or_else(|e| e.into_inner());
        let removed = self.write().remove_all(id);
        if let Some(dtor) = dtor {
            for (obj, block) in removed {
                dtor(obj, block.data());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_get_goes_on_while_a_constructor_runs_and_each_variable_is_made_once() {
        let vars = Arc::new(SharedShadowVars::new(|_| {}));
        let constructed = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let vars = vars.clone();
                let constructed = constructed.clone();
                std::thread::spawn(move || {
                    for obj in 0..200usize {
                        let mut ctor = |_: usize, _: livepatch_core::ShadowData<'_>| {
                            // The constructor may look the table up itself.
                            assert!(vars.get(obj, 1).is_none());
                            constructed.fetch_add(1, Ordering::SeqCst);
                            0
                        };
                        let p = vars.get_or_alloc(obj, 1, 16, Some(&mut ctor)).unwrap();
                        assert_eq!(vars.get(obj, 1), Some(p));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(constructed.load(Ordering::SeqCst), 200);
        let mut freed = Vec::new();
        vars.free_all(
            1,
            Some(&mut |obj: usize, _: livepatch_core::ShadowData<'_>| freed.push(obj)),
        );
        assert_eq!(freed, (0..200).collect::<Vec<_>>());
    }
}
