//! Shadow variables: data attached to existing objects by address (kernel:
//! shadow.c).
//!
//! A shadow variable is `<obj, id>` → a zero-filled block of `size` bytes
//! that patch code allocates to give an existing structure new fields.
//!
//! Concurrency rules, as in the kernel:
//! 1. Any number of threads may call every function at once.
//! 2. `get` never waits for a constructor or destructor to finish.
//! 3. Constructors and destructors run one at a time (the kernel runs them
//!    under `klp_shadow_lock`): a constructor runs exactly once, for the
//!    caller that creates the variable, and may call `get`; calling an
//!    allocating or freeing function from a constructor or destructor
//!    deadlocks, as it does in the kernel.
//! 4. The data itself is the caller's to lock; a block stays at its address
//!    until it is freed.

use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, RwLock};

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
struct Block {
    cells: Box<[AtomicU8]>,
    offset: usize,
    size: usize,
}

impl Block {
    const ALIGN: usize = 16;

    fn zeroed(size: usize) -> Block {
        let cells: Box<[AtomicU8]> = (0..size.max(1) + Self::ALIGN - 1)
            .map(|_| AtomicU8::new(0))
            .collect();
        let offset = cells.as_ptr().cast::<u8>().align_offset(Self::ALIGN);
        let offset = if offset < Self::ALIGN { offset } else { 0 };
        Block {
            cells,
            offset,
            size,
        }
    }

    fn data(&self) -> ShadowData<'_> {
        ShadowData {
            bytes: &self.cells[self.offset..self.offset + self.size],
        }
    }

    fn ptr(&self) -> NonNull<u8> {
        let first = &self.cells[self.offset];
        NonNull::new(first.as_ptr()).expect("a reference is never null")
    }
}

type Key = (usize, u64);

/// The table of shadow variables of one process.
pub struct ShadowVars {
    vars: RwLock<HashMap<Key, Block>>,
    /// Serializes allocation and freeing, so that constructors and
    /// destructors run one at a time without blocking `get`.
    update: Mutex<()>,
    log: Option<Box<dyn Fn(LogRecord) + Send + Sync>>,
}

impl std::fmt::Debug for ShadowVars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.vars.read().map(|v| v.len()).unwrap_or(0);
        f.debug_struct("ShadowVars").field("count", &n).finish()
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
            vars: RwLock::new(HashMap::new()),
            update: Mutex::new(()),
            log: None,
        }
    }

    /// An empty table that reports failures (constructor errors, duplicate
    /// allocations) through `log`.
    pub fn with_log(log: impl Fn(LogRecord) + Send + Sync + 'static) -> Self {
        ShadowVars {
            log: Some(Box::new(log)),
            ..Self::new()
        }
    }

    fn emit(&self, record: LogRecord) {
        if let Some(log) = &self.log {
            log(record);
        }
    }

    /// The data of `<obj, id>`, or `None` (kernel: `klp_shadow_get`).
    pub fn get(&self, obj: usize, id: u64) -> Option<NonNull<u8>> {
        let vars = self.vars.read().unwrap_or_else(|e| e.into_inner());
        vars.get(&(obj, id)).map(Block::ptr)
    }

    /// Allocates `<obj, id>`; a duplicate is a warning and `None` (kernel:
    /// `klp_shadow_alloc`).
    pub fn alloc(
        &self,
        obj: usize,
        id: u64,
        size: usize,
        ctor: Option<ShadowCtor<'_>>,
    ) -> Option<NonNull<u8>> {
        self.get_or_alloc_inner(obj, id, size, ctor, true)
    }

    /// Returns `<obj, id>`, allocating it if it does not exist; the
    /// constructor runs only when it is created (kernel:
    /// `klp_shadow_get_or_alloc`).
    pub fn get_or_alloc(
        &self,
        obj: usize,
        id: u64,
        size: usize,
        ctor: Option<ShadowCtor<'_>>,
    ) -> Option<NonNull<u8>> {
        self.get_or_alloc_inner(obj, id, size, ctor, false)
    }

    fn get_or_alloc_inner(
        &self,
        obj: usize,
        id: u64,
        size: usize,
        ctor: Option<ShadowCtor<'_>>,
        warn_on_exist: bool,
    ) -> Option<NonNull<u8>> {
        let _update = self.update.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = self.get(obj, id) {
            if warn_on_exist {
                self.emit(log::shadow_duplicate(obj, id));
                return None;
            }
            return Some(existing);
        }
        let block = Block::zeroed(size);
        if let Some(ctor) = ctor {
            let err = ctor(obj, block.data());
            if err != 0 {
                self.emit(log::shadow_construct_failed(obj, id, err));
                return None;
            }
        }
        let mut vars = self.vars.write().unwrap_or_else(|e| e.into_inner());
        let block = vars.entry((obj, id)).or_insert(block);
        Some(block.ptr())
    }

    /// Frees `<obj, id>` after running `dtor` on it; nothing if it does not
    /// exist (kernel: `klp_shadow_free`).
    pub fn free(&self, obj: usize, id: u64, dtor: Option<ShadowDtor<'_>>) {
        let _update = self.update.lock().unwrap_or_else(|e| e.into_inner());
        let removed = self
            .vars
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(obj, id));
        if let (Some(block), Some(dtor)) = (removed, dtor) {
            dtor(obj, block.data());
        }
    }

    /// Frees every variable with `id`, running `dtor` on each (kernel:
    /// `klp_shadow_free_all`).
    pub fn free_all(&self, id: u64, dtor: Option<ShadowDtor<'_>>) {
        let _update = self.update.lock().unwrap_or_else(|e| e.into_inner());
        let mut removed = Vec::new();
        {
            let mut vars = self.vars.write().unwrap_or_else(|e| e.into_inner());
            let keys: Vec<Key> = vars.keys().filter(|k| k.1 == id).copied().collect();
            for key in keys {
                if let Some(block) = vars.remove(&key) {
                    removed.push((key.0, block));
                }
            }
        }
        if let Some(dtor) = dtor {
            for (obj, block) in removed {
                dtor(obj, block.data());
            }
        }
    }

    /// How many variables exist.
    pub fn len(&self) -> usize {
        self.vars.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no variable exists.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
