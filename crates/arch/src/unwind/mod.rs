//! Precise stack walks for the per-thread check, with framehop over the `.eh_frame` unwind
//! tables of every loaded object, usable inside a signal handler.
//!
//! - `rules`: which rule framehop takes at each address; a walk goes only through plain ones.
//! - `sections`: the unwind sections copied from the loaded objects, as framehop modules.
//! - `walker`: the [`StackUnwinder`] and its walk.
//!
//! A walk goes on only through addresses whose rule is one the tables state exactly, and stops
//! as "incomplete" anywhere else. An incomplete walk proves nothing and the caller falls back to
//! its conservative scan.
//!
//! Safety model:
//! 1. Everything a walk reads is built in normal context ([`current`]): the unwind sections
//!    are copied out of the loaded objects during a link-map scan, which holds the dynamic
//!    linker's lock (no object can be unmapped meanwhile), so a walk never reads an object's
//!    memory, only these copies and the stack.
//! 2. A [`StackUnwinder`] is immutable once built, except its caches, each owned by whoever
//!    set its `in_use` flag; a walk that finds no free cache does not walk.
//! 3. A walk reads the stack only through a closure that refuses every address outside
//!    `[start stack pointer, stack end)` and every unaligned one, so a wild frame address ends
//!    the walk instead of faulting.
//! 4. A walk allocates nothing, takes no lock and makes no system call (framehop with
//!    `MustNotAllocateDuringUnwind`; a test counts allocations).

mod rules;
mod sections;
mod walker;

use std::sync::{Arc, Mutex};

use framehop::{AllocationPolicy, MustNotAllocateDuringUnwind};

use sections::{Found, ObjectUnwind};
pub use walker::{StackUnwinder, WalkStart};

/// The unwind sections, shared between framehop's modules and the copies compared each round.
type SectionData = Arc<[u8]>;
type Policy = MustNotAllocateDuringUnwind;
/// The storage framehop evaluates unwind rows in; rows are classified with the same, so that a
/// row too complex for it fails there too.
type ContextStorage = <Policy as AllocationPolicy>::GimliUnwindContextStorage<usize>;

/// How many walks can run at once: every thread being checked walks its own stack in its
/// signal handler, and threads entering functions in transition walk theirs at the entry. A
/// walk that finds no free cache is not made (the conservative scan decides).
const CACHES: usize = 64;

/// The most frames a walk follows; a deeper stack is not walked to its end.
const MAX_FRAMES: usize = 4096;

/// The unwinder built for the link map of the last call, kept for the next.
static CURRENT: Mutex<Option<Arc<StackUnwinder>>> = Mutex::new(None);

/// The unwinder for the objects loaded now: the previous one when no object's unwind sections
/// changed, else a new one (only new objects are classified again).
///
/// Normal context only: takes the dynamic linker's lock and allocates.
pub fn current() -> Arc<StackUnwinder> {
    let mut current = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    let known: &[Arc<ObjectUnwind>] = current.as_ref().map_or(&[], |u| &u.objects);
    let mut found = Vec::new();
    crate::objects::scan(|view| found.extend(sections::find(view, known)));
    let unchanged = current.as_ref().is_some_and(|u| {
        u.objects.len() == found.len()
            && u.objects.iter().zip(&found).all(
                |(old, found)| matches!(found, Found::Known(object) if Arc::ptr_eq(old, object)),
            )
    });
    if unchanged && let Some(unwinder) = current.as_ref() {
        return unwinder.clone();
    }
    let objects = found
        .into_iter()
        .map(|found| match found {
            Found::Known(object) => object,
            Found::Fresh(sections) => Arc::new(ObjectUnwind::new(sections)),
        })
        .collect();
    let unwinder = Arc::new(StackUnwinder::build(objects));
    *current = Some(unwinder.clone());
    unwinder
}

#[cfg(test)]
mod tests {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::ffi::c_void;
    use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

    use super::rules::{FramePointerEffect, RowKind};
    use super::sections::eh_frame_length;
    use super::walker::CacheGuard;
    use super::*;
    use crate::signals;
    use crate::test_support::{function_range, interrupt_self, stack_end};

    /// Counts the allocations made by one thread, to show walks make none.
    struct CountingAllocator;

    static WATCHED_TID: AtomicI32 = AtomicI32::new(0);
    static WATCHED_ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

    fn count_if_watched() {
        let watched = WATCHED_TID.load(Ordering::Relaxed);
        if watched != 0 && watched == signals::gettid() {
            WATCHED_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
    }

    // SAFETY: forwards every call unchanged to the system allocator.
    unsafe impl GlobalAlloc for CountingAllocator {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            count_if_watched();
            // SAFETY: the caller's contract, forwarded.
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            count_if_watched();
            // SAFETY: the caller's contract, forwarded.
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            count_if_watched();
            // SAFETY: the caller's contract, forwarded.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: the caller's contract, forwarded.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: CountingAllocator = CountingAllocator;

    fn interrupted(context: *mut c_void) -> WalkStart {
        WalkStart::Interrupted {
            pc: signals::interrupted_pc(context) as u64,
            sp: signals::interrupted_sp(context) as u64,
            bp: signals::interrupted_bp(context) as u64,
        }
    }

    /// Walks with `unwinder` from the signal's context and reports what it saw, recording into
    /// a preallocated array so that the test itself allocates nothing in the handler.
    struct Recorded {
        complete: bool,
        frames: [u64; 256],
        count: usize,
        allocations: usize,
    }

    fn walk_in_handler(unwinder: &StackUnwinder, end_of_stack: Option<u64>) -> Recorded {
        let mut recorded = Recorded {
            complete: false,
            frames: [0; 256],
            count: 0,
            allocations: usize::MAX,
        };
        let stack_end_here = stack_end(&recorded as *const Recorded as u64);
        interrupt_self(&mut |context| {
            let start = interrupted(context);
            let end = end_of_stack.map_or(stack_end_here, |len| start.sp() + len);
            WATCHED_ALLOCATIONS.store(0, Ordering::SeqCst);
            WATCHED_TID.store(signals::gettid(), Ordering::SeqCst);
            let mut count = 0;
            let frames = &mut recorded.frames;
            recorded.complete = unwinder.walk(start, end, |address| {
                if count < frames.len() {
                    frames[count] = address;
                    count += 1;
                }
            });
            WATCHED_TID.store(0, Ordering::SeqCst);
            recorded.allocations = WATCHED_ALLOCATIONS.load(Ordering::SeqCst);
            recorded.count = count;
        });
        recorded
    }

    #[inline(never)]
    fn outer_caller(unwinder: &StackUnwinder, end_of_stack: Option<u64>) -> Recorded {
        let r = middle_caller(unwinder, end_of_stack);
        std::hint::black_box(r)
    }

    #[inline(never)]
    fn middle_caller(unwinder: &StackUnwinder, end_of_stack: Option<u64>) -> Recorded {
        let r = walk_in_handler(unwinder, end_of_stack);
        std::hint::black_box(r)
    }

    fn position_in(frames: &[u64], function: usize) -> Option<usize> {
        let (start, end) = function_range(function);
        frames.iter().position(|&f| (start..end).contains(&f))
    }

    #[test]
    fn a_walk_from_a_signal_reaches_the_thread_start_through_every_caller_without_allocating() {
        let unwinder = current();
        let recorded = outer_caller(&unwinder, None);
        let frames = &recorded.frames[..recorded.count];
        assert!(recorded.complete, "walk incomplete after {frames:x?}");
        assert_eq!(recorded.allocations, 0, "the walk allocated");
        let middle = position_in(frames, middle_caller as *const () as usize);
        let outer = position_in(frames, outer_caller as *const () as usize);
        let test = position_in(
            frames,
            a_walk_from_a_signal_reaches_the_thread_start_through_every_caller_without_allocating
                as *const () as usize,
        );
        assert!(
            matches!((middle, outer, test), (Some(m), Some(o), Some(t)) if m < o && o < t),
            "callers out of order or missing: {middle:?} {outer:?} {test:?} in {frames:x?}"
        );
    }

    #[test]
    fn a_walk_that_would_read_past_the_given_stack_end_is_incomplete() {
        let unwinder = current();
        // 64 bytes hold no more than the handler's innermost frames: the walk must stop at the
        // first slot above them instead of reading on.
        let recorded = outer_caller(&unwinder, Some(64));
        assert!(!recorded.complete);
        let frames = &recorded.frames[..recorded.count];
        assert_eq!(
            position_in(frames, outer_caller as *const () as usize),
            None,
            "{frames:x?}"
        );
    }

    #[test]
    fn a_walk_from_code_without_unwind_tables_is_incomplete() {
        let unwinder = current();
        let mut stack_word = 0u64;
        let sp = (&raw mut stack_word) as u64 & !7;
        let start = WalkStart::Interrupted {
            pc: 0x10, // never mapped, so no object's tables cover it
            sp,
            bp: 0,
        };
        let mut frames = Vec::new();
        assert!(!unwinder.walk(start, stack_end(sp), |f| frames.push(f)));
        assert_eq!(frames, [0x10]);
    }

    #[test]
    fn a_cache_stays_taken_until_its_walk_gives_it_back() {
        let unwinder = current();
        let taken: Vec<CacheGuard<'_>> = (0..CACHES)
            .map(|_| unwinder.checkout().expect("a free cache"))
            .collect();
        // Failing to find a free cache must not free another walk's.
        assert!(unwinder.checkout().is_none());
        assert!(unwinder.checkout().is_none());
        let mut stack_word = 0u64;
        let sp = (&raw mut stack_word) as u64 & !7;
        let own_pc = a_cache_stays_taken_until_its_walk_gives_it_back as *const () as u64;
        let start = WalkStart::Interrupted {
            pc: own_pc,
            sp,
            bp: 0,
        };
        let mut frames = 0;
        assert!(!unwinder.walk(start, stack_end(sp), |_| frames += 1));
        assert_eq!(frames, 0, "walked without a cache");
        drop(taken);
        assert!(unwinder.checkout().is_some());
    }

    #[test]
    fn the_unwinder_is_reused_while_the_link_map_is_unchanged() {
        let first = current();
        let second = current();
        assert!(Arc::ptr_eq(&first, &second));
        assert!(
            first
                .objects
                .iter()
                .any(|o| o.sections.name.contains("libc.so")),
            "{first:?}"
        );
        assert!(first.rows.windows(2).all(|w| w[0].end <= w[1].start));
    }

    #[test]
    fn rows_are_classified_as_framehop_translates_them() {
        let unwinder = current();
        let libc_object = unwinder
            .objects
            .iter()
            .find(|o| o.sections.name.contains("libc.so"))
            .expect("libc is loaded");
        // glibc's thread start marks its return address undefined: the outermost frame.
        assert!(
            libc_object
                .rows
                .iter()
                .any(|r| r.kind == RowKind::Outermost),
            "{libc_object:?}"
        );
        assert!(
            libc_object
                .rows
                .iter()
                .any(|r| r.kind == RowKind::StackPointer(FramePointerEffect::Kept))
        );
    }

    #[test]
    fn eh_frame_records_end_at_the_terminator_or_the_last_whole_record() {
        let mut records = Vec::new();
        records.extend_from_slice(&8u32.to_le_bytes());
        records.extend_from_slice(&[1; 8]);
        records.extend_from_slice(&4u32.to_le_bytes());
        records.extend_from_slice(&[2; 4]);
        records.extend_from_slice(&0u32.to_le_bytes());
        records.extend_from_slice(&[0xff; 16]);
        assert_eq!(eh_frame_length(&records), 24);
        // Cut inside the second record: only the first one counts.
        assert_eq!(eh_frame_length(&records[..15]), 12);
    }
}
