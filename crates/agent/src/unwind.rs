//! Precise stack walks for the per-thread check, with framehop over the `.eh_frame` unwind
//! tables of every loaded object, usable inside a signal handler.
//!
//! framehop, asked to unwind an address it has no usable rule for (no module, no FDE, a row it
//! cannot translate, an evaluation error), silently falls back to frame pointers. A frame
//! pointer walk misses the caller of a function interrupted before its prologue or in a
//! frameless leaf, and a missed caller could be a function being patched: a false "clean".
//! So the agent reads the same tables with the same gimli beforehand and records, per address
//! range, the rule framehop will take there ([`RowKind`]); a walk goes on only through addresses
//! whose rule is one of those plain shapes, and stops as "incomplete" anywhere else. An
//! incomplete walk proves nothing and the caller falls back to its conservative scan.
//!
//! Safety model:
//! 1. Everything a walk reads is built by the control thread in normal context
//!    ([`current`]): the unwind sections are copied out of the loaded objects while the
//!    dynamic linker's lock is held (no object can be unmapped meanwhile), so a walk never
//!    reads an object's memory, only these copies and the stack.
//! 2. A [`StackUnwinder`] is immutable once built, except its caches, each owned by whoever
//!    set its `in_use` flag; a walk that finds no free cache does not walk.
//! 3. A walk reads the stack only through a closure that refuses every address outside
//!    `[start stack pointer, stack end)` and every unaligned one, so a wild frame address ends
//!    the walk instead of faulting.
//! 4. A walk allocates nothing, takes no lock and makes no system call (framehop with
//!    `MustNotAllocateDuringUnwind`; a test counts allocations).

use std::cell::UnsafeCell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{
    AllocationPolicy, ExplicitModuleSectionInfo, FrameAddress, Module, MustNotAllocateDuringUnwind,
    Unwinder,
};
use gimli::{
    BaseAddresses, CfaRule, EhFrame, EhFrameHdr, LittleEndian, Pointer, RegisterRule,
    UnwindContext, UnwindSection, UnwindTableRow, X86_64,
};

/// The unwind sections, shared between framehop's modules and the copies compared each round.
type SectionData = Arc<[u8]>;
type Policy = MustNotAllocateDuringUnwind;
/// The storage framehop evaluates unwind rows in; the agent classifies rows with the same, so
/// that a row too complex for it fails here too.
type ContextStorage = <Policy as AllocationPolicy>::GimliUnwindContextStorage<usize>;

/// How many walks can run at once: every thread being checked walks its own stack in its
/// signal handler, and threads entering functions in transition walk theirs at the entry. A
/// walk that finds no free cache is not made (the conservative scan decides).
const CACHES: usize = 64;

/// The most frames a walk follows; a deeper stack is not walked to its end.
const MAX_FRAMES: usize = 4096;

/// What framehop does for the addresses of one unwind row, as far as a walk relies on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RowKind {
    /// The return address is undefined: the outermost frame (`_start`, the start of a thread).
    Outermost,
    /// The caller's frame is at a constant offset from the stack pointer.
    StackPointer(FramePointerEffect),
    /// The frame is based on `rbp` (`CFA = rbp + 16`, the saved `rbp` just below the return
    /// address): needs the real `rbp` value.
    FramePointer,
}

/// What a stack-pointer-based row says about the caller's `rbp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FramePointerEffect {
    /// Unchanged: the caller's `rbp` is the one this frame has.
    Kept,
    /// Saved in this frame, and read back from the stack.
    Restored,
    /// Not recoverable.
    Lost,
}

/// One address range of one object's unwind table with the kind of its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Row {
    start: u64,
    end: u64,
    kind: RowKind,
}

/// An object's unwind sections as copied from memory (file addresses, before the bias).
struct Sections {
    name: String,
    bias: u64,
    eh_frame_hdr_address: u64,
    eh_frame_hdr: SectionData,
    eh_frame_address: u64,
    eh_frame: SectionData,
    /// Executable segments.
    code: Vec<(u64, u64)>,
}

impl Sections {
    /// The base addresses framehop decodes this object's pointers with (its
    /// `base_addresses_for_sections` for an object given only these two sections).
    fn bases(&self) -> BaseAddresses {
        BaseAddresses::default()
            .set_eh_frame(self.eh_frame_address)
            .set_eh_frame_hdr(self.eh_frame_hdr_address)
            .set_text(0)
            .set_got(0)
    }

    /// Run-time addresses spanned by the object's code.
    fn code_span(&self) -> (u64, u64) {
        let start = self.code.iter().map(|c| c.0).min().unwrap_or(0);
        let end = self.code.iter().map(|c| c.1).max().unwrap_or(0);
        (start + self.bias, end + self.bias)
    }
}

/// One object, ready for walks: its framehop module and its classified rows.
struct ObjectUnwind {
    sections: Sections,
    module: Module<SectionData>,
    /// Run-time addresses, sorted and disjoint.
    rows: Vec<Row>,
}

impl std::fmt::Debug for ObjectUnwind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectUnwind")
            .field("name", &self.sections.name)
            .field("bias", &self.sections.bias)
            .field("rows", &self.rows.len())
            .finish()
    }
}

/// A framehop cache owned by one walk at a time.
struct CacheSlot {
    in_use: AtomicBool,
    cache: UnsafeCell<CacheX86_64<Policy>>,
}

// SAFETY: the cache is only reached through a `CacheGuard`, which exists only for the one
// walk that set `in_use` from false to true, until it clears it: never two at once.
unsafe impl Sync for CacheSlot {}

/// A checked-out cache; gives it back when dropped.
struct CacheGuard<'a>(&'a CacheSlot);

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
    rows: Vec<Row>,
    objects: Vec<Arc<ObjectUnwind>>,
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
}

impl WalkStart {
    /// The lowest stack address the walk may read.
    pub fn sp(self) -> u64 {
        match self {
            WalkStart::Interrupted { sp, .. } | WalkStart::FunctionEntry { sp } => sp,
        }
    }
}

impl StackUnwinder {
    fn build(objects: Vec<Arc<ObjectUnwind>>) -> Self {
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

    fn checkout(&self) -> Option<CacheGuard<'_>> {
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
    pub fn walk(&self, start: WalkStart, stack_end: u64, mut frame: impl FnMut(u64)) -> bool {
        let Some(mut guard) = self.checkout() else {
            return false;
        };
        let stack_start = start.sp();
        let mut read_stack = |address: u64| -> Result<u64, ()> {
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
        let (mut address, mut regs, mut bp_known) = match start {
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

/// The kind of a row, if it is one whose framehop rule the walk can rely on: framehop's
/// `translate_into_unwind_rule` turns exactly these into its cached rules, without rounding
/// (offsets are multiples of 8) and without the fallbacks it takes for the others.
fn row_kind<S: gimli::UnwindContextStorage<usize>>(
    row: &UnwindTableRow<usize, S>,
) -> Option<RowKind> {
    match row.register(X86_64::RA) {
        Some(RegisterRule::Undefined) => return Some(RowKind::Outermost),
        Some(RegisterRule::Offset(-8)) => {}
        // No rule at all also ends framehop's walk, but unlike an explicit "undefined" it is
        // not a statement that the frame is the outermost.
        _ => return None,
    }
    let bp = row.register(X86_64::RBP);
    match *row.cfa() {
        CfaRule::RegisterAndOffset { register, offset }
            if register == X86_64::RSP
                && offset > 0
                && offset % 8 == 0
                && u16::try_from(offset / 8).is_ok() =>
        {
            let effect = match bp {
                None | Some(RegisterRule::SameValue) => FramePointerEffect::Kept,
                Some(RegisterRule::Undefined) => FramePointerEffect::Lost,
                Some(RegisterRule::Offset(saved)) => {
                    let from_sp = offset + saved;
                    if from_sp % 8 != 0 || i16::try_from(from_sp / 8).is_err() {
                        return None;
                    }
                    FramePointerEffect::Restored
                }
                Some(_) => return None,
            };
            Some(RowKind::StackPointer(effect))
        }
        CfaRule::RegisterAndOffset {
            register,
            offset: 16,
        } if register == X86_64::RBP && bp == Some(RegisterRule::Offset(-16)) => {
            Some(RowKind::FramePointer)
        }
        _ => None,
    }
}

/// The rows of one object that a walk may go through, at run-time addresses. framehop finds
/// an address's FDE through the `.eh_frame_hdr` table (the last entry at or below it), so an
/// entry's rows count only below the next entry's start.
fn classify(sections: &Sections) -> Vec<Row> {
    let bases = sections.bases();
    let Ok(header) = EhFrameHdr::new(&sections.eh_frame_hdr, LittleEndian).parse(&bases, 8) else {
        return Vec::new();
    };
    let Some(table) = header.table() else {
        return Vec::new();
    };
    let mut entries: Vec<(u64, Pointer)> = Vec::new();
    let mut iter = table.iter(&bases);
    loop {
        match iter.next() {
            Ok(Some((Pointer::Direct(initial), fde @ Pointer::Direct(_)))) => {
                entries.push((initial, fde));
            }
            Ok(None) => break,
            // Indirect pointers or a damaged table: framehop's lookups would fail here.
            _ => return Vec::new(),
        }
    }
    // framehop binary-searches the table: an unsorted one sends lookups astray.
    if !entries.windows(2).all(|w| w[0].0 < w[1].0) {
        return Vec::new();
    }
    let mut eh_frame = EhFrame::new(&sections.eh_frame, LittleEndian);
    eh_frame.set_address_size(8);
    let mut context = Box::new(UnwindContext::<usize, ContextStorage>::new_in());
    let mut rows: Vec<Row> = Vec::new();
    for (i, &(initial, fde_pointer)) in entries.iter().enumerate() {
        let limit = entries.get(i + 1).map_or(u64::MAX, |next| next.0);
        let Ok(offset) = table.pointer_to_offset(fde_pointer) else {
            continue;
        };
        let Ok(fde) = eh_frame.fde_from_offset(&bases, offset, EhFrame::cie_from_offset) else {
            continue;
        };
        let in_code = sections.code.iter().any(|&(start, end)| {
            start <= fde.initial_address()
                && fde.initial_address() < fde.end_address()
                && fde.end_address() <= end
        });
        // framehop reads the return address from its fixed column and ignores signal frames'
        // special meaning.
        if !in_code
            || fde.cie().return_address_register() != X86_64::RA
            || fde.is_signal_trampoline()
        {
            continue;
        }
        let Ok(mut fde_rows) = fde.rows(&eh_frame, &bases, &mut context) else {
            continue;
        };
        // Rows before an evaluation error are exactly what framehop computes for their
        // addresses (it evaluates up to the address looked up); none after it are.
        while let Ok(Some(row)) = fde_rows.next_row() {
            let start = row.start_address().max(initial);
            let end = row.end_address().min(limit);
            let Some(kind) = row_kind(row) else { continue };
            if start >= end || end - 1 > u64::from(u32::MAX) {
                // framehop looks addresses up 32-bit relative to the object's bias.
                continue;
            }
            let (start, end) = (start + sections.bias, end + sections.bias);
            match rows.last_mut() {
                Some(last) if last.end == start && last.kind == kind => last.end = end,
                _ => rows.push(Row { start, end, kind }),
            }
        }
    }
    rows
}

impl ObjectUnwind {
    fn new(sections: Sections) -> Self {
        let rows = classify(&sections);
        let (start, end) = sections.code_span();
        let module = Module::new(
            sections.name.clone(),
            start..end,
            sections.bias,
            ExplicitModuleSectionInfo {
                base_svma: 0,
                eh_frame_svma: Some(
                    sections.eh_frame_address
                        ..sections.eh_frame_address + sections.eh_frame.len() as u64,
                ),
                eh_frame: Some(sections.eh_frame.clone()),
                eh_frame_hdr_svma: Some(
                    sections.eh_frame_hdr_address
                        ..sections.eh_frame_hdr_address + sections.eh_frame_hdr.len() as u64,
                ),
                eh_frame_hdr: Some(sections.eh_frame_hdr.clone()),
                ..Default::default()
            },
        );
        ObjectUnwind {
            sections,
            module,
            rows,
        }
    }
}

/// What one object of the link map gave.
enum Found {
    /// The same unwind sections as an object already classified.
    Known(Arc<ObjectUnwind>),
    /// New sections to classify.
    Fresh(Sections),
}

/// The state of `dl_iterate_phdr`'s walk over the link map.
struct LinkMapScan<'a> {
    known: &'a [Arc<ObjectUnwind>],
    found: Vec<Found>,
}

/// The length of the `.eh_frame` records at the start of `memory`: up to and including the
/// zero terminator, or the last whole record.
fn eh_frame_length(memory: &[u8]) -> usize {
    let word = |at: usize, len: usize| -> Option<u64> {
        let bytes = memory.get(at..at + len)?;
        Some(
            bytes
                .iter()
                .rev()
                .fold(0u64, |acc, &b| acc << 8 | u64::from(b)),
        )
    };
    let mut at = 0usize;
    while let Some(length) = word(at, 4) {
        if length == 0 {
            return at + 4;
        }
        let next = if length == 0xffff_ffff {
            let Some(length) = word(at + 4, 8) else { break };
            usize::try_from(length)
                .ok()
                .and_then(|l| (at + 12).checked_add(l))
        } else {
            (at + 4).checked_add(length as usize)
        };
        match next {
            Some(next) if next <= memory.len() => at = next,
            _ => break,
        }
    }
    at
}

unsafe extern "C" fn scan_object(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut c_void,
) -> libc::c_int {
    // SAFETY: `data` is the `&mut LinkMapScan` that `current` passes, and `info` a record the
    // dynamic linker keeps valid during this call.
    let (scan, info) = unsafe { (&mut *data.cast::<LinkMapScan<'_>>(), &*info) };
    // SAFETY: `info` is the linker's record for this call.
    let headers = unsafe { livepatch_arch::objects::program_headers(info) };
    let bias = info.dlpi_addr;
    let loaded = |address: u64, len: u64| {
        headers.iter().any(|h| {
            h.p_type == libc::PT_LOAD
                && h.p_flags & libc::PF_R != 0
                && h.p_vaddr <= address
                && address
                    .checked_add(len)
                    .is_some_and(|end| end <= h.p_vaddr + h.p_filesz)
        })
    };
    let code: Vec<(u64, u64)> = headers
        .iter()
        .filter(|h| h.p_type == libc::PT_LOAD && h.p_flags & libc::PF_X != 0)
        .map(|h| (h.p_vaddr, h.p_vaddr + h.p_memsz))
        .collect();
    let Some(hdr) = headers.iter().find(|h| h.p_type == libc::PT_GNU_EH_FRAME) else {
        return 0;
    };
    if code.is_empty() || !loaded(hdr.p_vaddr, hdr.p_memsz) {
        return 0;
    }
    // SAFETY: the header lies inside a readable loaded segment of an object the dynamic linker
    // holds mapped while we run inside its iteration (it holds its lock: no dlclose).
    let hdr_memory = unsafe {
        std::slice::from_raw_parts((bias + hdr.p_vaddr) as *const u8, hdr.p_memsz as usize)
    };
    let bases = BaseAddresses::default().set_eh_frame_hdr(hdr.p_vaddr);
    let Ok(eh_frame_address) = EhFrameHdr::new(hdr_memory, LittleEndian)
        .parse(&bases, 8)
        .and_then(|parsed| parsed.eh_frame_ptr().direct())
    else {
        return 0;
    };
    let Some(segment_end) = headers
        .iter()
        .filter(|h| {
            h.p_type == libc::PT_LOAD
                && h.p_flags & libc::PF_R != 0
                && h.p_vaddr <= eh_frame_address
                && eh_frame_address < h.p_vaddr + h.p_filesz
        })
        .map(|h| h.p_vaddr + h.p_filesz)
        .next()
    else {
        return 0;
    };
    // SAFETY: as above, the rest of the readable loaded segment that holds `.eh_frame`.
    let rest = unsafe {
        std::slice::from_raw_parts(
            (bias + eh_frame_address) as *const u8,
            (segment_end - eh_frame_address) as usize,
        )
    };
    let eh_frame_memory = &rest[..eh_frame_length(rest)];
    let known = scan.known.iter().find(|o| {
        let s = &o.sections;
        s.bias == bias
            && s.eh_frame_hdr_address == hdr.p_vaddr
            && s.eh_frame_address == eh_frame_address
            && s.code == code
            && *s.eh_frame_hdr == *hdr_memory
            && *s.eh_frame == *eh_frame_memory
    });
    scan.found.push(match known {
        Some(object) => Found::Known(object.clone()),
        None => {
            let name = if info.dlpi_name.is_null() {
                String::new()
            } else {
                // SAFETY: a non-null dlpi_name is a NUL-terminated string owned by the linker.
                unsafe { std::ffi::CStr::from_ptr(info.dlpi_name) }
                    .to_string_lossy()
                    .into_owned()
            };
            Found::Fresh(Sections {
                name,
                bias,
                eh_frame_hdr_address: hdr.p_vaddr,
                eh_frame_hdr: hdr_memory.into(),
                eh_frame_address,
                eh_frame: eh_frame_memory.into(),
                code,
            })
        }
    });
    0
}

/// The unwinder built for the link map of the last call, kept for the next.
static CURRENT: Mutex<Option<Arc<StackUnwinder>>> = Mutex::new(None);

/// The unwinder for the objects loaded now: the previous one when no object's unwind sections
/// changed, else a new one (only new objects are classified again).
///
/// Normal context only (the control thread): takes the dynamic linker's lock and allocates.
pub fn current() -> Arc<StackUnwinder> {
    let mut current = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    let known: &[Arc<ObjectUnwind>] = current.as_ref().map_or(&[], |u| &u.objects);
    let mut scan = LinkMapScan {
        known,
        found: Vec::new(),
    };
    // SAFETY: dl_iterate_phdr calls `scan_object` synchronously with valid records and passes
    // our `&mut LinkMapScan` back unchanged as `data`.
    unsafe {
        libc::dl_iterate_phdr(Some(scan_object), (&raw mut scan).cast());
    }
    let unchanged = current.as_ref().is_some_and(|u| {
        u.objects.len() == scan.found.len()
            && u.objects.iter().zip(&scan.found).all(
                |(old, found)| matches!(found, Found::Known(object) if Arc::ptr_eq(old, object)),
            )
    });
    if unchanged && let Some(unwinder) = current.as_ref() {
        return unwinder.clone();
    }
    let objects = scan
        .found
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
pub(crate) mod tests {
    use super::*;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicUsize};

    use livepatch_arch::signals;

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

    /// The signal the tests interrupt themselves with (not the agent's default check signals).
    fn test_signal() -> i32 {
        libc::SIGRTMIN() + 2
    }

    /// What the test handler calls: set by `interrupt_self` for the duration of one signal.
    static ON_SIGNAL: AtomicPtr<&mut dyn FnMut(*mut c_void)> = AtomicPtr::new(std::ptr::null_mut());
    /// One interrupting test at a time (the handler slot is global).
    static INTERRUPTING: Mutex<()> = Mutex::new(());

    extern "C" fn test_handler(_: libc::c_int, _: *mut libc::siginfo_t, context: *mut c_void) {
        let f = ON_SIGNAL.load(Ordering::SeqCst);
        if !f.is_null() {
            // SAFETY: `interrupt_self` stores a pointer to its live `&mut dyn FnMut` and clears
            // it before that returns; the signal runs on the same thread, in between.
            unsafe { (*f)(context) };
        }
    }

    /// Sends a signal to the calling thread and runs `on_signal` inside the handler with the
    /// interrupted context. The handler runs before `tgkill` returns to user space, so the
    /// frames of the callers of this function are live, interrupted frames.
    #[inline(never)]
    pub(crate) fn interrupt_self(mut on_signal: &mut dyn FnMut(*mut c_void)) {
        let _one_at_a_time = INTERRUPTING.lock().unwrap_or_else(|e| e.into_inner());
        signals::install_handler(test_signal(), test_handler).expect("test signal handler");
        ON_SIGNAL.store((&raw mut on_signal).cast(), Ordering::SeqCst);
        assert!(signals::tgkill(
            std::process::id() as i32,
            signals::gettid(),
            test_signal()
        ));
        ON_SIGNAL.store(std::ptr::null_mut(), Ordering::SeqCst);
        std::hint::black_box(&mut on_signal);
    }

    /// The run-time `[start, end)` of a function of this test binary, from its symbol table.
    pub(crate) fn function_range(function: usize) -> (u64, u64) {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let table = livepatch_arch::symbols::SymbolTable::read(&exe).unwrap();
        let bias = livepatch_arch::objects::loaded_objects()[0].bias;
        let (symbol, offset) = table
            .containing((function - bias) as u64)
            .expect("the function has a symbol");
        assert_eq!(offset, 0, "{} is not at the function's start", symbol.name);
        assert!(symbol.size > 0);
        let start = function as u64;
        (start, start + symbol.size)
    }

    /// The end of the writable mapping that holds `address` (the calling thread's stack).
    pub(crate) fn stack_end(address: u64) -> u64 {
        let maps = livepatch_arch::maps::read().unwrap();
        livepatch_arch::maps::find(&maps, address as usize)
            .expect("the stack is mapped")
            .end as u64
    }

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
