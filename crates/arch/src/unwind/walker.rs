//! The walk itself: framehop over the classified rows, from a signal handler's registers or
//! from a function's entry, reading only the thread's own stack.

use std::cell::UnsafeCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{FrameAddress, Unwinder};

use super::rules::{FramePointerEffect, Row, RowKind};
use super::sections::ObjectUnwind;
use super::{CACHES, MAX_FRAMES, Policy, SectionData};

/// A framehop cache owned by one walk at a time.
struct CacheSlot {
    in_use: AtomicBool,
    cache: UnsafeCell<CacheX86_64<Policy>>,
}

// SAFETY: the cache is only reached through a `CacheGuard`, which exists only for the one
// walk that set `in_use` from false to true, until it clears it: never two at once.
unsafe impl Sync for CacheSlot {}

/// A checked-out cache; gives it back when dropped.
pub(super) struct CacheGuard<'a>(&'a CacheSlot);

impl CacheGuard<'_> {
    fn cache(&mut self) -> &mut CacheX86_64<Policy> {
        // SAFETY: this guard set `in_use`, so nobody else reaches the cache until it is dropped;
        // the `&mut self` borrow keeps this reference unique within the walk.
        unsafe { &mut *self.0.cache.get() }
    }
}

impl Drop for CacheGuard<'_> {
    fn drop(&mut self) {
        self.0.in_use.store(false, Ordering::Release);
    }
}

/// The unwinder of one state of the link map, with its caches. Built by the control thread,
/// shared with signal handlers through the check configuration; immutable but for the caches.
pub struct StackUnwinder {
    unwinder: UnwinderX86_64<SectionData, Policy>,
    /// Every object's rows, sorted and disjoint.
    pub(super) rows: Vec<Row>,
    pub(super) objects: Vec<Arc<ObjectUnwind>>,
    caches: Box<[CacheSlot]>,
}

impl std::fmt::Debug for StackUnwinder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StackUnwinder")
            .field("objects", &self.objects)
            .field("rows", &self.rows.len())
            .finish()
    }
}

/// Where a walk starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkStart {
    /// A thread interrupted by a signal: its registers.
    Interrupted {
        /// The interrupted instruction.
        pc: u64,
        /// Its stack pointer.
        sp: u64,
        /// Its `rbp`.
        bp: u64,
    },
    /// A thread at the entry of a function, before the function ran anything: `sp` points to the
    /// return address into its caller. Its `rbp` is not known.
    FunctionEntry {
        /// The stack pointer at the entry.
        sp: u64,
    },
    /// A thread asleep in a system call, seen from another thread: where it called the
    /// kernel. Its `rbp` is not known.
    Asleep {
        /// The instruction after the `syscall`.
        pc: u64,
        /// Its stack pointer.
        sp: u64,
    },
}

impl WalkStart {
    /// The lowest stack address the walk may read.
    pub fn sp(self) -> u64 {
        match self {
            WalkStart::Interrupted { sp, .. }
            | WalkStart::FunctionEntry { sp }
            | WalkStart::Asleep { sp, .. } => sp,
        }
    }
}

impl StackUnwinder {
    pub(super) fn build(objects: Vec<Arc<ObjectUnwind>>) -> Self {
        let mut unwinder = UnwinderX86_64::new();
        let mut rows = Vec::new();
        // framehop finds an address's object as the last one starting at or below it: objects
        // whose code overlaps another's would be ambiguous, so they get no rows (their frames end
        // walks).
        let mut spans: Vec<(u64, u64, usize)> = objects
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let (start, end) = o.sections.code_span();
                (start, end, i)
            })
            .collect();
        spans.sort_unstable();
        for (k, &(start, end, i)) in spans.iter().enumerate() {
            let overlaps_previous = k > 0 && spans[k - 1].1 > start;
            let overlaps_next = spans.get(k + 1).is_some_and(|next| next.0 < end);
            if overlaps_previous || overlaps_next {
                continue;
            }
            unwinder.add_module(objects[i].module.clone());
            rows.extend_from_slice(&objects[i].rows);
        }
        rows.sort_unstable_by_key(|r| r.start);
        let caches = (0..CACHES)
            .map(|_| CacheSlot {
                in_use: AtomicBool::new(false),
                cache: UnsafeCell::new(CacheX86_64::new_in()),
            })
            .collect();
        StackUnwinder {
            unwinder,
            rows,
            objects,
            caches,
        }
    }

    fn row_kind(&self, address: u64) -> Option<RowKind> {
        let i = self.rows.partition_point(|r| r.start <= address);
        let row = self.rows.get(i.checked_sub(1)?)?;
        (address < row.end).then_some(row.kind)
    }

    pub(super) fn checkout(&self) -> Option<CacheGuard<'_>> {
        self.caches.iter().find_map(|slot| {
            // The guard is made only for a slot this walk took: dropping one releases its slot.
            slot.in_use
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
                .then(|| CacheGuard(slot))
        })
    }

    /// Walks the stack of the calling thread from `start`, reading only `[start.sp(),
    /// stack_end)`, and calls `frame` with the lookup address of every frame: the interrupted
    /// PC, then each return address minus one (inside its call instruction). True when the walk
    /// reached the outermost frame by the unwind tables' own rules; false when it stopped
    /// anywhere else (an address without a plain rule, an unreadable slot, too many frames, no
    /// free cache), in which case the frames reported are only a prefix of the stack.
    ///
    /// Async-signal-safe: allocates nothing and takes no lock.
    pub fn walk(&self, start: WalkStart, stack_end: u64, frame: impl FnMut(u64)) -> bool {
        let stack_start = start.sp();
        let read_stack = |address: u64| -> Result<u64, ()> {
            let inside = address >= stack_start
                && address.is_multiple_of(8)
                && address.checked_add(8).is_some_and(|end| end <= stack_end);
            if !inside {
                return Err(());
            }
            // SAFETY: `[stack_start, stack_end)` is the part of the calling thread's stack
            // mapping above its (interrupted) stack pointer, as the caller promises: mapped and
            // readable while the thread runs this walk, which is the only thing it does now.
            // The address is 8-byte aligned and the whole word lies inside.
            Ok(unsafe { std::ptr::read_volatile(address as *const u64) })
        };
        self.walk_reading(start, read_stack, frame)
    }

    /// [`StackUnwinder::walk`] over a copy of another thread's stack: `copy` holds the bytes
    /// from `start.sp()` up; nothing outside it is read.
    pub fn walk_copy(&self, start: WalkStart, copy: &[u8], frame: impl FnMut(u64)) -> bool {
        let base = start.sp();
        let read_stack = |address: u64| -> Result<u64, ()> {
            let offset = usize::try_from(address.checked_sub(base).ok_or(())?).map_err(|_| ())?;
            if !address.is_multiple_of(8) {
                return Err(());
            }
            let bytes = copy
                .get(offset..offset.checked_add(8).ok_or(())?)
                .ok_or(())?;
            Ok(u64::from_ne_bytes(bytes.try_into().map_err(|_| ())?))
        };
        self.walk_reading(start, read_stack, frame)
    }

    fn walk_reading(
        &self,
        start: WalkStart,
        mut read_stack: impl FnMut(u64) -> Result<u64, ()>,
        mut frame: impl FnMut(u64),
    ) -> bool {
        let Some(mut guard) = self.checkout() else {
            return false;
        };
        let (mut address, mut regs, mut bp_known) = match start {
            WalkStart::Asleep { pc, sp } => (
                FrameAddress::from_instruction_pointer(pc),
                UnwindRegsX86_64::new(pc, sp, 0),
                false,
            ),
            WalkStart::Interrupted { pc, sp, bp } => (
                FrameAddress::from_instruction_pointer(pc),
                UnwindRegsX86_64::new(pc, sp, bp),
                true,
            ),
            WalkStart::FunctionEntry { sp } => {
                let Ok(return_address) = read_stack(sp) else {
                    return false;
                };
                let Some(address) = FrameAddress::from_return_address(return_address) else {
                    return false;
                };
                // Exactly framehop's state after unwinding the entered function's frame: its
                // caller's return address, and the stack pointer above it. The `rbp` value is a
                // placeholder that `bp_known` keeps every rule from using.
                (
                    address,
                    UnwindRegsX86_64::new(return_address, sp + 8, 0),
                    false,
                )
            }
        };
        for _ in 0..MAX_FRAMES {
            let lookup = address.address_for_lookup();
            frame(lookup);
            let Some(kind) = self.row_kind(lookup) else {
                return false;
            };
            let bp_known_in_caller = match kind {
                RowKind::Outermost => return true,
                RowKind::FramePointer => {
                    // framehop takes `rbp == 0` as the end of the stack; with a rule that bases
                    // the frame on `rbp`, that can only be a wrong value.
                    if !bp_known || regs.bp() == 0 {
                        return false;
                    }
                    true
                }
                RowKind::StackPointer(FramePointerEffect::Kept) => bp_known,
                RowKind::StackPointer(FramePointerEffect::Restored) => true,
                RowKind::StackPointer(FramePointerEffect::Lost) => false,
            };
            let sp_before = regs.sp();
            match self
                .unwinder
                .unwind_frame(address, &mut regs, guard.cache(), &mut read_stack)
            {
                // A zero return address: nothing called this frame, it is the outermost.
                Ok(None) => return true,
                Ok(Some(return_address)) => {
                    if regs.sp() <= sp_before {
                        return false;
                    }
                    let Some(next) = FrameAddress::from_return_address(return_address) else {
                        return false;
                    };
                    address = next;
                    bp_known = bp_known_in_caller;
                }
                Err(_) => return false,
            }
        }
        false
    }
}
