//! Shadow variables: data attached to existing objects by address (kernel:
//! shadow.c).
//!
//! A shadow variable is `<obj, id>` → a zero-filled block of `size` bytes
//! that patch code allocates to give an existing structure new fields.
//!
//! [`ShadowVars`] is the table itself: deterministic and single-threaded.
//! Variables are ordered by `<obj, id>`, and `free_all` runs its destructors
//! in that order, objects by ascending address. A platform whose patch code
//! runs on many threads wraps the table with the kernel's concurrency rules
//! (the agent's `shadow` module); the pieces it needs to run constructors and
//! destructors outside its locks are [`ShadowVars::prepare`],
//! [`ShadowVars::insert`], [`ShadowVars::remove`] and
//! [`ShadowVars::remove_all`]. A block stays at its address from its
//! insertion until it is removed.

use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::log::{self, LogRecord};

/// A constructor: gets the object and the new zero-filled data, returns 0 or
/// a negative errno (which cancels the allocation).
pub type ShadowCtor<'a> = &'a mut dyn FnMut(usize, ShadowData<'_>) -> i32;
/// A destructor: gets the object and the data about to be freed.
pub type ShadowDtor<'a> = &'a mut dyn FnMut(usize, ShadowData<'_>);

/// The data of a shadow variable, as constructors and destructors see it.
/// Its bytes may be shared with other threads, so they are reached through
/// atomics, or through the raw pointer by code that does its own locking.
#[derive(Clone, Copy, Debug)]
pub struct ShadowData<'a> {
    bytes: &'a [AtomicU8],
}

impl ShadowData<'_> {
    /// The address of the first byte (16-byte aligned, as `malloc` gives).
    pub fn as_ptr(&self) -> *mut u8 {
        self.bytes.as_ptr().cast::<u8>().cast_mut()
    }

    /// The size in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the variable has no bytes.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Copies `src` into the data at `offset`.
    ///
    /// # Panics
    /// If the range does not fit in the data.
    pub fn write(&self, offset: usize, src: &[u8]) {
        for (cell, b) in self.bytes[offset..offset + src.len()].iter().zip(src) {
            cell.store(*b, Ordering::Relaxed);
        }
    }

    /// Copies the data at `offset` into `dst`.
    ///
    /// # Panics
    /// If the range does not fit in the data.
    pub fn read(&self, offset: usize, dst: &mut [u8]) {
        let src = &self.bytes[offset..offset + dst.len()];
        for (b, cell) in dst.iter_mut().zip(src) {
            *b = cell.load(Ordering::Relaxed);
        }
    }
}

/// A zero-filled block of memory that never moves while it lives.
#[derive(Debug)]
pub struct ShadowBlock {
    cells: Box<[AtomicU8]>,
    offset: usize,
    size: usize,
}

impl ShadowBlock {
    const ALIGN: usize = 16;

    fn zeroed(size: usize) -> ShadowBlock {
        let cells: Box<[AtomicU8]> = (0..size.max(1) + Self::ALIGN - 1)
            .map(|_| AtomicU8::new(0))
            .collect();
        let offset = cells.as_ptr().cast::<u8>().align_offset(Self::ALIGN);
        let offset = if offset < Self::ALIGN { offset } else { 0 };
        ShadowBlock {
            cells,
            offset,
            size,
        }
    }

    /// The data, for a constructor or destructor.
    pub fn data(&self) -> ShadowData<'_> {
        ShadowData {
            bytes: &self.cells[self.offset..self.offset + self.size],
        }
    }

    /// The address patch code uses.
    pub fn ptr(&self) -> NonNull<u8> {
        let first = &self.cells[self.offset];
        NonNull::new(first.as_ptr()).expect("a reference is never null")
    }
}

/// What [`ShadowVars::prepare`] found or made.
#[derive(Debug)]
pub enum Prepared {
    /// The variable exists and is the answer (`get_or_alloc`).
    Existing(NonNull<u8>),
    /// The variable exists and `alloc` refuses a duplicate (the warning is logged).
    Duplicate,
    /// The constructor failed (the error is logged); nothing was created.
    Failed,
    /// A new, constructed block, to [`ShadowVars::insert`].
    New(ShadowBlock),
}

/// The table of shadow variables of one process.
pub struct ShadowVars {
    vars: BTreeMap<(usize, u64), ShadowBlock>,
    log: Option<Box<dyn Fn(LogRecord) + Send + Sync>>,
}

impl std::fmt::Debug for ShadowVars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShadowVars")
            .field("count", &self.vars.len())
            .finish()
    }
}

impl Default for ShadowVars {
    fn default() -> Self {
        Self::new()
    }
}

impl ShadowVars {
    /// An empty table that logs nothing.
    pub fn new() -> Self {
        ShadowVars {
            vars: BTreeMap::new(),
            log: None,
        }
    }

    /// An empty table that reports failures (constructor errors, duplicate
    /// allocations) through `log`.
    pub fn with_log(log: impl Fn(LogRecord) + Send + Sync + 'static) -> Self {
        ShadowVars {
            vars: BTreeMap::new(),
            log: Some(Box::new(log)),
        }
    }

    fn emit(&self, record: LogRecord) {
        if let Some(log) = &self.log {
            log(record);
        }
    }

    /// The data of `<obj, id>`, or `None` (kernel: `klp_shadow_get`).
    pub fn get(&self, obj: usize, id: u64) -> Option<NonNull<u8>> {
        self.vars.get(&(obj, id)).map(ShadowBlock::ptr)
    }

    /// The first half of an allocation: looks `<obj, id>` up and, if it is new, makes and
    /// constructs its block without inserting it. Reads the table only, so a concurrent
    /// wrapper may run it (and the constructor in it) without excluding readers; it must
    /// exclude other allocations until the [`ShadowVars::insert`] that follows.
    pub fn prepare(
        &self,
        obj: usize,
        id: u64,
        size: usize,
        ctor: Option<ShadowCtor<'_>>,
        warn_on_exist: bool,
    ) -> Prepared {
        if let Some(existing) = self.get(obj, id) {
            if warn_on_exist {
                self.emit(log::shadow_duplicate(obj, id));
                return Prepared::Duplicate;
            }
            return Prepared::Existing(existing);
        }
        let block = ShadowBlock::zeroed(size);
        if let Some(ctor) = ctor {
            let err = ctor(obj, block.data());
            if err != 0 {
                self.emit(log::shadow_construct_failed(obj, id, err));
                return Prepared::Failed;
            }
        }
        Prepared::New(block)
    }

    /// The second half of an allocation: adds the block that [`ShadowVars::prepare`] made
    /// for `<obj, id>` and returns its address. A variable created meanwhile wins.
    pub fn insert(&mut self, obj: usize, id: u64, block: ShadowBlock) -> NonNull<u8> {
        self.vars.entry((obj, id)).or_insert(block).ptr()
    }

    /// Allocates `<obj, id>`; a duplicate is a warning and `None` (kernel:
    /// `klp_shadow_alloc`).
    pub fn alloc(
        &mut self,
        obj: usize,
        id: u64,
        size: usize,
        ctor: Option<ShadowCtor<'_>>,
    ) -> Option<NonNull<u8>> {
        self.allocate(obj, id, size, ctor, true)
    }

    /// Returns `<obj, id>`, allocating it if it does not exist; the
    /// constructor runs only when it is created (kernel:
    /// `klp_shadow_get_or_alloc`).
    pub fn get_or_alloc(
        &mut self,
        obj: usize,
        id: u64,
        size: usize,
        ctor: Option<ShadowCtor<'_>>,
    ) -> Option<NonNull<u8>> {
        self.allocate(obj, id, size, ctor, false)
    }

    fn allocate(
        &mut self,
        obj: usize,
        id: u64,
        size: usize,
        ctor: Option<ShadowCtor<'_>>,
        warn_on_exist: bool,
    ) -> Option<NonNull<u8>> {
        match self.prepare(obj, id, size, ctor, warn_on_exist) {
            Prepared::Existing(ptr) => Some(ptr),
            Prepared::Duplicate | Prepared::Failed => None,
            Prepared::New(block) => Some(self.insert(obj, id, block)),
        }
    }

    /// Takes `<obj, id>` out of the table; the caller runs the destructor on it.
    pub fn remove(&mut self, obj: usize, id: u64) -> Option<ShadowBlock> {
        self.vars.remove(&(obj, id))
    }

    /// Takes every variable with `id` out of the table, objects by ascending address: the
    /// order their destructors run in.
    pub fn remove_all(&mut self, id: u64) -> Vec<(usize, ShadowBlock)> {
        let keys: Vec<(usize, u64)> = self.vars.keys().filter(|k| k.1 == id).copied().collect();
        keys.into_iter()
            .filter_map(|key| self.vars.remove(&key).map(|block| (key.0, block)))
            .collect()
    }

    /// Frees `<obj, id>` after running `dtor` on it; nothing if it does not
    /// exist (kernel: `klp_shadow_free`).
    pub fn free(&mut self, obj: usize, id: u64, dtor: Option<ShadowDtor<'_>>) {
        if let (Some(block), Some(dtor)) = (self.remove(obj, id), dtor) {
            dtor(obj, block.data());
        }
    }

    /// Frees every variable with `id`, running `dtor` on each, objects by ascending address
    /// (kernel: `klp_shadow_free_all`).
    pub fn free_all(&mut self, id: u64, dtor: Option<ShadowDtor<'_>>) {
        let removed = self.remove_all(id);
        if let Some(dtor) = dtor {
            for (obj, block) in removed {
                dtor(obj, block.data());
            }
        }
    }

    /// How many variables exist.
    pub fn len(&self) -> usize {
        self.vars.len()
    }

    /// Whether no variable exists.
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_all_runs_destructors_by_ascending_object() {
        let mut vars = ShadowVars::new();
        for obj in [0x30usize, 0x10, 0x20] {
            assert!(vars.alloc(obj, 7, 4, None).is_some());
        }
        let mut order = Vec::new();
        vars.free_all(
            7,
            Some(&mut |obj: usize, _: ShadowData<'_>| order.push(obj)),
        );
        assert_eq!(order, [0x10, 0x20, 0x30]);
        assert!(vars.is_empty());
    }

    #[test]
    fn a_block_keeps_its_address_while_others_come_and_go() {
        let mut vars = ShadowVars::new();
        let first = vars.alloc(1, 1, 64, None).unwrap();
        for obj in 2..200 {
            vars.alloc(obj, 1, 64, None);
        }
        vars.free_all(2, None);
        assert_eq!(vars.get(1, 1), Some(first));
        assert_eq!(first.as_ptr().align_offset(16), 0);
    }
}
