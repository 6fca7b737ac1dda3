//! One record per thread, found from a thread id without allocation or locks, so that signal
//! handlers and the stub's slow path can read and switch a thread's state.
//!
//! Safety model of this module:
//! 1. Records live in chunks that are allocated in normal context (the control thread, or a
//!    thread being born) and never freed; a record is found from a thread id with two loads.
//! 2. A record's state (a [`PackedThreadState`], the low byte of its state word) changes only
//!    by compare-and-swap, so a thread switching itself (handler, switch point) and the control
//!    thread never lose each other's update. The word's upper bits are an epoch the stub's slow
//!    path advances in the same atomic operation that reads the state: a switch the control
//!    thread decided for a thread asleep in a system call, made with a compare-and-swap of the
//!    whole word, fails if the thread read its state since (rule 4).
//! 4. The control thread switches a thread asleep only with the word it read before it
//!    checked the thread ([`ThreadRecord::switch_unread`]).
//! 3. A record belongs to the thread whose id it holds; claims (a birth, or the control thread
//!    finding a thread) exclude each other through the `CLAIMING` id, so neither overwrites the
//!    other's state.

use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU8, AtomicU32, AtomicU64, Ordering};

use livepatch_arch::signals::gettid;
use livepatch_core::{PackedThreadState, PatchState, ThreadState, Tid};

use super::published;

/// The highest thread id plus one (`PID_MAX_LIMIT`).
const TID_LIMIT: usize = 1 << 22;
const CHUNK_SHIFT: usize = 10;
const CHUNK_LEN: usize = 1 << CHUNK_SHIFT;
const CHUNKS: usize = TID_LIMIT >> CHUNK_SHIFT;

/// One thread's record.
#[derive(Debug)]
#[repr(C, align(32))]
pub struct ThreadRecord {
    /// The thread id the record belongs to; 0 when free.
    tid: AtomicI32,
    /// The [`PackedThreadState`] (state and pending flag) in the low byte; above it the epoch
    /// of its reads by the slow path (rule 2).
    pub(crate) state: AtomicU64,
    /// Set by the thread while it is inside the stub's slow path.
    pub(crate) in_slow_path: AtomicU8,
    /// Result of the last check: kind.
    pub(crate) result_kind: AtomicU8,
    /// The check round the thread must answer.
    pub(crate) request: AtomicU64,
    /// The last check round the thread answered.
    pub(crate) answered: AtomicU64,
    /// Result of the last check: index of the blocking range.
    pub(crate) result_index: AtomicU32,
}

impl ThreadRecord {
    const fn new() -> Self {
        ThreadRecord {
            tid: AtomicI32::new(0),
            state: AtomicU64::new(PackedThreadState::IDLE.0 as u64),
            in_slow_path: AtomicU8::new(0),
            result_kind: AtomicU8::new(0),
            request: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            result_index: AtomicU32::new(0),
        }
    }

    /// The thread's state.
    pub fn thread_state(&self) -> ThreadState {
        packed(self.state.load(Ordering::SeqCst)).unpack()
    }

    /// Switches the thread from `from` to `to` if it is still in `from` (rule 2); the state
    /// it had otherwise.
    pub fn switch(&self, from: ThreadState, to: ThreadState) -> Result<(), ThreadState> {
        let from = PackedThreadState::pack(from);
        let to = PackedThreadState::pack(to);
        let mut word = self.state.load(Ordering::SeqCst);
        loop {
            if packed(word) != from {
                return Err(packed(word).unpack());
            }
            match self.state.compare_exchange(
                word,
                with_packed(word, to),
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return Ok(()),
                // Only the epoch moved, or the state too: look again.
                Err(now) => word = now,
            }
        }
    }

    /// The whole state word, for [`ThreadRecord::switch_unread`].
    pub fn state_word(&self) -> u64 {
        self.state.load(Ordering::SeqCst)
    }

    /// The state of a word read with [`ThreadRecord::state_word`].
    pub fn state_of_word(word: u64) -> ThreadState {
        packed(word).unpack()
    }

    /// Switches the thread to `to` only if its state word is still `word`: neither its state
    /// changed nor did its slow path read it since (rule 4).
    pub fn switch_unread(&self, word: u64, to: ThreadState) -> bool {
        self.state
            .compare_exchange(
                word,
                with_packed(word, PackedThreadState::pack(to)),
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
    }

    /// The state, read by the thread's slow path to choose a version: the read advances the
    /// epoch, in the same atomic operation (rule 2).
    fn read_for_dispatch(&self) -> ThreadState {
        packed(self.state.fetch_add(EPOCH_ONE, Ordering::SeqCst)).unpack()
    }
}

/// One step of the epoch, above the state byte; 56 bits of it never wrap in practice.
const EPOCH_ONE: u64 = 1 << 8;

fn packed(word: u64) -> PackedThreadState {
    PackedThreadState(word as u8)
}

fn with_packed(word: u64, state: PackedThreadState) -> u64 {
    (word & !0xff) | u64::from(state.0)
}

type Chunk = [ThreadRecord; CHUNK_LEN];

static CHUNK_TABLE: [AtomicPtr<Chunk>; CHUNKS] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; CHUNKS];

fn slot(tid: Tid) -> Option<(usize, usize)> {
    let t = usize::try_from(tid)
        .ok()
        .filter(|t| *t > 0 && *t < TID_LIMIT)?;
    Some((t >> CHUNK_SHIFT, t & (CHUNK_LEN - 1)))
}

/// The record slot of `tid`, if its chunk exists (any context).
fn slot_record(tid: Tid) -> Option<&'static ThreadRecord> {
    let (chunk, index) = slot(tid)?;
    let p = CHUNK_TABLE[chunk].load(Ordering::Acquire);
    if p.is_null() {
        return None;
    }
    // SAFETY: chunks are never freed once published (rule 1), and `index`
    // is within the chunk.
    Some(unsafe { &(*p)[index] })
}

/// The record of `tid` if it belongs to it (any context).
pub fn record(tid: Tid) -> Option<&'static ThreadRecord> {
    slot_record(tid).filter(|r| r.tid.load(Ordering::Acquire) == tid)
}

/// The record slot of `tid`, allocating its chunk (normal context only).
fn ensure_slot(tid: Tid) -> Option<&'static ThreadRecord> {
    let (chunk, _) = slot(tid)?;
    if CHUNK_TABLE[chunk].load(Ordering::Acquire).is_null() {
        let fresh: Box<Chunk> = Box::new([const { ThreadRecord::new() }; CHUNK_LEN]);
        let fresh = Box::into_raw(fresh);
        if CHUNK_TABLE[chunk]
            .compare_exchange(
                std::ptr::null_mut(),
                fresh,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            // SAFETY: `fresh` was never published; we still own it.
            drop(unsafe { Box::from_raw(fresh) });
        }
    }
    slot_record(tid)
}

/// Makes sure the chunks that hold `tid` and the ids the kernel hands out
/// next exist, so that threads created soon find their slot without
/// allocating (control thread only).
pub fn prepare(tid: Tid) {
    ensure_slot(tid);
    ensure_slot(tid.saturating_add(CHUNK_LEN as Tid));
}

/// The record of a thread the control thread saw in /proc, claimed for it
/// if it had none, in the state of a discovered thread (control thread only).
pub fn register(tid: Tid) -> Option<&'static ThreadRecord> {
    let rec = ensure_slot(tid)?;
    claim(rec, tid, published::discovered(), Claim::IfUnclaimed);
    Some(rec)
}

/// Registers the calling thread at its birth, before it runs any code of
/// the program, in the state of new threads (`klp_copy_process`).
pub fn register_birth() {
    let tid = gettid();
    if let Some(rec) = ensure_slot(tid) {
        claim(rec, tid, published::new_threads(), Claim::Always);
    }
}

/// In a child process a `fork` just made: the table holds the calling thread alone, with the
/// state the forking thread had in the parent (`klp_copy_process` copies the task's state and
/// pending flag); the records of the parent's other threads, which the child does not have, go.
pub fn register_forked(state: ThreadState) {
    let tid = gettid();
    for chunk in &CHUNK_TABLE {
        let p = chunk.load(Ordering::Acquire);
        if p.is_null() {
            continue;
        }
        // SAFETY: a published chunk is never freed (rule 1).
        for rec in unsafe { &*p } {
            // The child has one thread: every other slot is reset whole, also one a parent's
            // thread was claiming at the fork (its CLAIMING mark would stay forever).
            if rec.tid.load(Ordering::Acquire) != tid {
                rec.state
                    .store(u64::from(PackedThreadState::IDLE.0), Ordering::SeqCst);
                rec.in_slow_path.store(0, Ordering::SeqCst);
                rec.request.store(0, Ordering::Relaxed);
                rec.tid.store(0, Ordering::Release);
            }
        }
    }
    if let Some(rec) = ensure_slot(tid) {
        claim(rec, tid, state, Claim::Always);
    }
}

/// A record's `tid` while someone writes its state.
const CLAIMING: Tid = -1;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// A thread being born: its record may hold a dead thread with the same id.
    Always,
    /// A thread found running: a record already claimed for it (by its own birth, which knows
    /// better) is kept.
    IfUnclaimed,
}

/// Takes a slot for `tid` in `state` (rule 3).
fn claim(rec: &ThreadRecord, tid: Tid, state: ThreadState, how: Claim) {
    loop {
        let current = rec.tid.load(Ordering::Acquire);
        if current == CLAIMING {
            std::hint::spin_loop();
            continue;
        }
        if current == tid && how == Claim::IfUnclaimed {
            return;
        }
        if rec
            .tid
            .compare_exchange(current, CLAIMING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            break;
        }
    }
    rec.state.store(
        u64::from(PackedThreadState::pack(state).0),
        Ordering::SeqCst,
    );
    // A slot another thread used may have been left marked (it exited inside a slow path, or
    // a fork copied it so).
    rec.in_slow_path.store(0, Ordering::SeqCst);
    rec.request.store(0, Ordering::Relaxed);
    rec.tid.store(tid, Ordering::Release);
}

/// Frees the record of a thread that exited (control thread only).
pub fn forget(tid: Tid) {
    if let Some(rec) = slot_record(tid)
        && rec
            .tid
            .compare_exchange(tid, CLAIMING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    {
        rec.state
            .store(u64::from(PackedThreadState::IDLE.0), Ordering::SeqCst);
        rec.tid.store(0, Ordering::Release);
    }
}

/// A thread's state, `None` if it has no record.
pub fn state_of(tid: Tid) -> Option<ThreadState> {
    record(tid).map(ThreadRecord::thread_state)
}

/// Sets a thread's state (control thread only), by compare-and-swap so that a concurrent
/// self-switch is never overwritten with a decision made on older information: the new value
/// is derived from the value replaced (rule 2).
pub fn set_state(tid: Tid, f: impl Fn(ThreadState) -> ThreadState) {
    let Some(rec) = register(tid) else { return };
    let mut cur = rec.state.load(Ordering::SeqCst);
    loop {
        let new = with_packed(cur, PackedThreadState::pack(f(packed(cur).unpack())));
        match rec
            .state
            .compare_exchange(cur, new, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => return,
            Err(actual) => cur = actual,
        }
    }
}

/// The state the calling thread runs in, for the stub's slow path to choose a version by; the
/// read advances the record's epoch (rule 2). A thread without a record was not seen being
/// born: it gets the state of a discovered thread, recorded if its slot exists.
pub fn dispatch_state() -> PatchState {
    let tid = gettid();
    match slot_record(tid) {
        Some(rec) if rec.tid.load(Ordering::Acquire) == tid => rec.read_for_dispatch().state,
        Some(rec) => {
            claim(rec, tid, published::discovered(), Claim::IfUnclaimed);
            rec.read_for_dispatch().state
        }
        None => published::discovered().state,
    }
}

/// `klp_update_patch_state()` for the calling thread: a pending thread takes the target state;
/// no stack check (the caller promises nothing patched is on its stack).
pub fn update_patch_state() {
    let Some(rec) = record(gettid()) else { return };
    let now = rec.thread_state();
    let next = now.at_switch_point(published::target());
    if next != now {
        // Fails only if the control thread or a handler changed the state in between; then
        // there is nothing left to do here.
        let _ = rec.switch(now, next);
    }
}
