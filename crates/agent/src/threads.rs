//! Threads and the consistency model: one record per thread, reachable
//! without allocation from the stub's slow path and from signal handlers,
//! and the check rounds in which each pending thread examines its own stack
//! in a signal handler and switches itself when clean.
//!
//! Safety model of this module:
//! 1. Records live in chunks that are allocated by the control thread and
//!    never freed; a record is found from a thread id with two loads, so the
//!    signal handler and the slow path never allocate or lock.
//! 2. A record's state byte (state and pending flag) changes only by
//!    compare-and-swap, so a thread switching itself (handler, switch point)
//!    and the control thread never lose each other's update.
//! 3. The handler acts only on the check configuration published for the
//!    current round, and counts itself in `IN_FLIGHT` before reading it: the
//!    control thread retires a configuration only after unpublishing it and
//!    seeing `IN_FLIGHT` drop to zero, so no handler reads freed memory or
//!    switches a thread on a stale configuration.
//! 4. The handler reads only the interrupted thread's own stack, between its
//!    stack pointer and the end of the mapping that holds it, as listed in
//!    the configuration; a stack pointer outside every listed mapping, or a
//!    thread running on an alternate signal stack, makes the stack
//!    "unreliable" rather than clean. The precise walk reads through the same
//!    bounds (see `unwind`).
//! 5. The handler saves and restores `errno` and makes only async-signal-safe
//!    system calls (gettid, sigaltstack, futex).
//! 6. A stack is "clean" only from a walk that reached the outermost frame by
//!    the unwind tables' own rules, or from the conservative scan of every
//!    word; a walk that stopped anywhere else is never taken for clean. The
//!    unwinder belongs to the configuration, so it lives as long (rule 3).

use std::ffi::c_void;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use livepatch_arch::signals;
use livepatch_core::{PatchState, SwitchResult, ThreadState, Tid};

use crate::unwind::{StackUnwinder, WalkStart};

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
    /// [`pack`]ed state and pending flag.
    state: AtomicU8,
    /// Set by the thread while it is inside the stub's slow path.
    in_slow_path: AtomicU8,
    /// Result of the last check: kind.
    result_kind: AtomicU8,
    /// The check round the thread must answer.
    request: AtomicU64,
    /// The last check round the thread answered.
    answered: AtomicU64,
    /// Result of the last check: index of the blocking range.
    result_index: AtomicU32,
}

impl ThreadRecord {
    const fn new() -> Self {
        ThreadRecord {
            tid: AtomicI32::new(0),
            state: AtomicU8::new(IDLE),
            in_slow_path: AtomicU8::new(0),
            result_kind: AtomicU8::new(0),
            request: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            result_index: AtomicU32::new(0),
        }
    }
}

type Chunk = [ThreadRecord; CHUNK_LEN];

static CHUNK_TABLE: [AtomicPtr<Chunk>; CHUNKS] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; CHUNKS];

const IDLE: u8 = 0;
const UNPATCHED: u8 = 1;
const PATCHED: u8 = 2;
const PENDING: u8 = 4;

/// Encodes a thread state in one byte.
pub fn pack(ts: ThreadState) -> u8 {
    let s = match ts.state {
        PatchState::Idle => IDLE,
        PatchState::Unpatched => UNPATCHED,
        PatchState::Patched => PATCHED,
    };
    if ts.pending { s | PENDING } else { s }
}

/// Decodes [`pack`].
pub fn unpack(b: u8) -> ThreadState {
    let state = match b & 3 {
        UNPATCHED => PatchState::Unpatched,
        PATCHED => PatchState::Patched,
        _ => PatchState::Idle,
    };
    ThreadState {
        state,
        pending: b & PENDING != 0,
    }
}

/// `klp_target_state`, [`pack`]ed: what a switch point switches a pending
/// thread to.
static TARGET: AtomicU8 = AtomicU8::new(IDLE);

/// [`pack`]ed state of threads born from now on (`klp_copy_process`).
static NEW_THREAD: AtomicU8 = AtomicU8::new(IDLE);

/// Publishes the state of threads born from now on.
pub fn set_new_thread_state(ts: ThreadState) {
    NEW_THREAD.store(pack(ts), Ordering::SeqCst);
}

/// The state of a thread found after its birth, whose past is unknown: like
/// a thread that existed before the transition, the initial state, pending
/// once the transition started (new threads are at the target then).
fn discovered_state() -> u8 {
    let new = unpack(NEW_THREAD.load(Ordering::SeqCst));
    let target = unpack(TARGET.load(Ordering::SeqCst)).state;
    if new.state == PatchState::Idle || target == PatchState::Idle {
        IDLE
    } else if new.state == target {
        pack(ThreadState {
            state: target.opposite(),
            pending: true,
        })
    } else {
        pack(new)
    }
}

/// Publishes `klp_target_state`.
pub fn set_target(target: PatchState) {
    TARGET.store(
        pack(ThreadState {
            state: target,
            pending: false,
        }),
        Ordering::SeqCst,
    );
}

/// The published `klp_target_state`.
pub fn target() -> PatchState {
    unpack(TARGET.load(Ordering::SeqCst)).state
}

pub use livepatch_arch::signals::gettid;

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

/// The record slot of `tid`, allocating its chunk (control thread only).
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
/// if it had none (control thread only).
pub fn register(tid: Tid) -> Option<&'static ThreadRecord> {
    let rec = ensure_slot(tid)?;
    claim(rec, tid, discovered_state(), Claim::IfUnclaimed);
    Some(rec)
}

/// Registers the calling thread at its birth, before it runs any code of
/// the program, in the state of new threads.
pub fn register_birth() {
    let tid = gettid();
    if let Some(rec) = ensure_slot(tid) {
        claim(rec, tid, NEW_THREAD.load(Ordering::SeqCst), Claim::Always);
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

/// Takes a slot for `tid` in `state`. Claims exclude each other through the `CLAIMING` id, so
/// a thread's birth and the control thread discovering it cannot mix their states.
fn claim(rec: &ThreadRecord, tid: Tid, state: u8, how: Claim) {
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
    rec.state.store(state, Ordering::SeqCst);
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
        rec.state.store(IDLE, Ordering::SeqCst);
        rec.tid.store(0, Ordering::Release);
    }
}

/// A thread's state, `None` if it has no record.
pub fn state_of(tid: Tid) -> Option<ThreadState> {
    record(tid).map(|r| unpack(r.state.load(Ordering::SeqCst)))
}

/// Sets a thread's state (control thread only). Uses compare-and-swap so
/// that a concurrent self-switch is never overwritten with a decision made
/// on older information: the new value is derived from the value replaced.
pub fn set_state(tid: Tid, f: impl Fn(ThreadState) -> ThreadState) {
    let Some(rec) = register(tid) else { return };
    let mut cur = rec.state.load(Ordering::SeqCst);
    loop {
        let new = pack(f(unpack(cur)));
        match rec
            .state
            .compare_exchange(cur, new, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => return,
            Err(actual) => cur = actual,
        }
    }
}

/// The state the calling thread runs in, for the stub's slow path. A thread
/// without a record was not seen being born: it gets the state of a
/// discovered thread, recorded if its slot exists.
pub fn current_state() -> PatchState {
    let tid = gettid();
    match slot_record(tid) {
        Some(rec) if rec.tid.load(Ordering::Acquire) == tid => {
            unpack(rec.state.load(Ordering::SeqCst)).state
        }
        Some(rec) => {
            claim(rec, tid, discovered_state(), Claim::IfUnclaimed);
            unpack(rec.state.load(Ordering::SeqCst)).state
        }
        None => unpack(discovered_state()).state,
    }
}

/// `klp_update_patch_state()` for the calling thread: a pending thread takes
/// the target state; no stack check (the caller promises nothing patched is
/// on its stack).
pub fn update_patch_state() {
    let Some(rec) = record(gettid()) else { return };
    let cur = rec.state.load(Ordering::SeqCst);
    if cur & PENDING == 0 {
        return;
    }
    let target = TARGET.load(Ordering::SeqCst);
    // Fails only if the control thread or a handler changed the state in
    // between; then there is nothing left to do here.
    let _ = rec
        .state
        .compare_exchange(cur, target, Ordering::SeqCst, Ordering::SeqCst);
}

/// The switch point at a function's entry, from the stub's slow path: a pending thread whose
/// stack above `entry_sp` (its callers) holds nothing in transition takes the target state.
/// Only while a check round publishes the ranges; the round's signal finds it switched.
pub fn switch_at_entry(entry_sp: u64) {
    with_published_config(|cfg| {
        if let Some(rec) = record(gettid())
            && rec.state.load(Ordering::SeqCst) == cfg.from
            && !on_alt_stack()
            && matches!(
                check_stack(cfg, WalkStart::FunctionEntry { sp: entry_sp }),
                Verdict::Clean
            )
        {
            // Fails only when the thread's own signal handler switched it meanwhile.
            let _ =
                rec.state
                    .compare_exchange(cfg.from, cfg.to, Ordering::SeqCst, Ordering::SeqCst);
        }
    });
}

/// Runs `f` with the configuration of the round in progress, if one is published, counted in
/// `IN_FLIGHT` for the whole call so the control thread does not free it meanwhile (rule 3).
fn with_published_config(f: impl FnOnce(&CheckConfig)) {
    IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
    let cfg = CONFIG.load(Ordering::SeqCst);
    if !cfg.is_null() {
        // SAFETY: a published configuration stays valid while IN_FLIGHT counts us (rule 3).
        f(unsafe { &*cfg });
    }
    IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
}

/// Marks the calling thread as inside (or out of) the stub's slow path, for
/// [`synchronize`].
pub fn set_in_slow_path(inside: bool) {
    if let Some(rec) = record(gettid()) {
        rec.in_slow_path.store(u8::from(inside), Ordering::SeqCst);
    }
}

/// Waits until no thread of `tids` is inside the slow path
/// (`klp_synchronize_transition`).
pub fn synchronize(tids: &[Tid]) {
    for &tid in tids {
        if let Some(rec) = record(tid) {
            let start = Instant::now();
            while rec.in_slow_path.load(Ordering::SeqCst) != 0 {
                // A thread can be preempted in the slow path; it leaves it
                // within a few instructions once it runs.
                if start.elapsed() > Duration::from_secs(5) {
                    break;
                }
                std::thread::yield_now();
            }
        }
    }
}

/// A code range for the handler: `[start, end)` and the index of the core's
/// range it stands for (the lowest index when several overlap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Index of the blocking range in the core's order.
    pub index: u32,
}

/// What the handlers of one check round need, prepared by the control
/// thread.
#[derive(Debug)]
pub struct CheckConfig {
    round: u64,
    /// Packed state a clean thread switches from (initial, pending).
    from: u8,
    /// Packed state it switches to.
    to: u8,
    /// Disjoint ranges sorted by start.
    ranges: Vec<CheckRange>,
    /// Writable mappings that may hold stacks, sorted by start.
    stacks: Vec<(u64, u64)>,
    /// Code where a thread must not be interrupted to switch (slow paths).
    unsafe_pcs: Vec<(u64, u64)>,
    /// The precise walk, when the control thread could build it.
    unwinder: Option<Arc<StackUnwinder>>,
}

static CONFIG: AtomicPtr<CheckConfig> = AtomicPtr::new(std::ptr::null_mut());
static IN_FLIGHT: AtomicU32 = AtomicU32::new(0);
static ACKS: AtomicU32 = AtomicU32::new(0);
/// How many answers the round waits for, once every signal is sent (`u32::MAX` before): the
/// answer that completes the count wakes the control thread, the others do not.
static EXPECTED_ACKS: AtomicU32 = AtomicU32::new(u32::MAX);
static ROUND: AtomicU64 = AtomicU64::new(0);

const RESULT_SWITCHED: u8 = 1;
const RESULT_BLOCKED: u8 = 2;
const RESULT_UNRELIABLE: u8 = 3;
const RESULT_RACED: u8 = 4;

/// Splits possibly overlapping ranges into disjoint ones, each carrying the
/// lowest index of the ranges that cover it.
pub fn disjoint(ranges: &[(u64, u64, u32)]) -> Vec<CheckRange> {
    // A sweep over the range ends, keeping the indices of the ranges open at each point: a
    // patch of 10,000 functions gives 10,000 ranges, too many to test each against each.
    let mut events: Vec<(u64, bool, u32)> = ranges
        .iter()
        .filter(|r| r.0 < r.1)
        .flat_map(|&(start, end, index)| [(start, true, index), (end, false, index)])
        .collect();
    events.sort_unstable();
    let mut open: std::collections::BTreeMap<u32, usize> = std::collections::BTreeMap::new();
    let mut out: Vec<CheckRange> = Vec::new();
    let mut i = 0;
    while i < events.len() {
        let at = events[i].0;
        while i < events.len() && events[i].0 == at {
            let (_, starts, index) = events[i];
            if starts {
                *open.entry(index).or_default() += 1;
            } else if let Some(count) = open.get_mut(&index) {
                *count -= 1;
                if *count == 0 {
                    open.remove(&index);
                }
            }
            i += 1;
        }
        let (Some(&(next, _, _)), Some((&index, _))) = (events.get(i), open.first_key_value())
        else {
            continue;
        };
        match out.last_mut() {
            Some(last) if last.end == at && last.index == index => last.end = next,
            _ => out.push(CheckRange {
                start: at,
                end: next,
                index,
            }),
        }
    }
    out
}

fn find(ranges: &[CheckRange], addr: u64) -> Option<u32> {
    let i = ranges.partition_point(|r| r.start <= addr);
    let r = ranges.get(i.checked_sub(1)?)?;
    (addr < r.end).then_some(r.index)
}

fn mapping_end(stacks: &[(u64, u64)], sp: u64) -> Option<u64> {
    let i = stacks.partition_point(|m| m.0 <= sp);
    let m = stacks.get(i.checked_sub(1)?)?;
    (sp < m.1).then_some(m.1)
}

/// The longest stack the handler scans; beyond it the stack is unreliable.
const MAX_SCAN: u64 = 64 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Clean,
    Blocked(u32),
    Unreliable,
    Raced,
}

/// The stack check of one thread, from its interrupted registers or from a
/// function's entry: the PC and every return address against the ranges.
///
/// First the conservative scan, which is never wrongly clean: a clean scan
/// settles it. A thread the scan suspects gets a precise walk over the unwind
/// tables: when it reaches the outermost frame by their own rules, its frames
/// are the whole call chain and its verdict stands, so a stale word that only
/// looks like a return address holds nothing. Anywhere else (code without
/// unwind tables, a rule the walk does not rely on, a slot outside the stack,
/// no unwinder or no free cache) the scan's verdict stands.
fn check_stack(cfg: &CheckConfig, start: WalkStart) -> Verdict {
    let (pc, sp) = match start {
        WalkStart::Interrupted { pc, sp, .. } => (pc, sp),
        // No instruction of the entered function ran: only its callers are on the stack.
        WalkStart::FunctionEntry { sp } => (0, sp),
    };
    if cfg.unsafe_pcs.iter().any(|&(a, b)| pc >= a && pc < b) {
        return Verdict::Unreliable;
    }
    let Some(top) = mapping_end(&cfg.stacks, sp) else {
        return Verdict::Unreliable;
    };
    if top - sp > MAX_SCAN || !sp.is_multiple_of(8) {
        return Verdict::Unreliable;
    }
    // The scan is cheap and never wrongly clean, so a clean scan settles it; the walk, which
    // costs a table lookup per frame, only runs to clear a thread the scan suspects.
    let scanned = scan_stack(cfg, pc, sp, top);
    if !matches!(scanned, Verdict::Blocked(_)) {
        return scanned;
    }
    if let Some(unwinder) = &cfg.unwinder {
        let mut best: Option<u32> = None;
        let complete = unwinder.walk(start, top, |address| {
            if let Some(i) = find(&cfg.ranges, address) {
                best = Some(best.map_or(i, |b| b.min(i)));
            }
        });
        if complete {
            return best.map_or(Verdict::Clean, Verdict::Blocked);
        }
    }
    scanned
}

/// The conservative check: the PC and every word between the stack pointer
/// and the top of its stack against the ranges. Every return address of
/// every live frame is on the stack, so it never says clean wrongly; a stale
/// word that looks like a return address only delays the switch.
///
/// A word counts as a return address into a function when the byte before
/// it lies in the function (the call instruction's last byte), as unwinders
/// do with `pc - 1`. A pointer to a function's entry, which a program may
/// keep in a local for as long as it runs, is never taken for a call into it.
fn scan_stack(cfg: &CheckConfig, pc: u64, sp: u64, top: u64) -> Verdict {
    let mut best = find(&cfg.ranges, pc);
    // Most stack words are data far from any patched code: one comparison
    // against the span of all ranges rules them out.
    let (low, high) = match (cfg.ranges.first(), cfg.ranges.last()) {
        (Some(first), Some(last)) => (first.start, last.end),
        _ => (0, 0),
    };
    let mut p = sp;
    while p < top {
        // SAFETY: [sp, top) lies in the mapping that holds this thread's
        // stack pointer (rule 4), which stays mapped while the thread runs
        // this handler on it; `p` is 8-byte aligned.
        let word = unsafe { std::ptr::read_volatile(p as *const u64) };
        let call_byte = word.wrapping_sub(1);
        if (low..high).contains(&call_byte)
            && let Some(i) = find(&cfg.ranges, call_byte)
        {
            best = Some(best.map_or(i, |b| b.min(i)));
        }
        p += 8;
    }
    match best {
        Some(i) => Verdict::Blocked(i),
        None => Verdict::Clean,
    }
}

/// Whether the calling thread runs on its alternate signal stack.
fn on_alt_stack() -> bool {
    let mut ss = std::mem::MaybeUninit::<libc::stack_t>::zeroed();
    // SAFETY: querying only (NULL new stack); `ss` is valid for writes.
    let r = unsafe { libc::sigaltstack(std::ptr::null(), ss.as_mut_ptr()) };
    // SAFETY: zero-initialized and filled by a successful call.
    r == 0 && unsafe { ss.assume_init() }.ss_flags & libc::SS_ONSTACK != 0
}

/// The body of the check signal's handler.
///
/// # Safety
/// `ctx` is the `ucontext_t` the kernel passed to a SA_SIGINFO handler.
pub unsafe fn handle_check_signal(ctx: *mut c_void) {
    // SAFETY: the caller passes the handler's ucontext.
    with_published_config(|cfg| unsafe { answer(cfg, ctx) });
}

/// # Safety
/// As [`handle_check_signal`].
unsafe fn answer(cfg: &CheckConfig, ctx: *mut c_void) {
    let Some(rec) = record(gettid()) else { return };
    if rec.request.load(Ordering::Acquire) != cfg.round {
        return;
    }
    if rec.answered.load(Ordering::Acquire) == cfg.round {
        return;
    }
    let start = WalkStart::Interrupted {
        pc: signals::interrupted_pc(ctx) as u64,
        sp: signals::interrupted_sp(ctx) as u64,
        bp: signals::interrupted_bp(ctx) as u64,
    };
    let verdict = if rec.in_slow_path.load(Ordering::SeqCst) != 0 {
        // Interrupted while choosing a target from its state: switching now could let it run
        // the code of the state it just left.
        Verdict::Raced
    } else if on_alt_stack() {
        Verdict::Unreliable
    } else {
        check_stack(cfg, start)
    };
    let (kind, index) = match verdict {
        Verdict::Clean => {
            // The switch and the check are one step: the thread is in this
            // handler and cannot enter any code between them.
            match rec
                .state
                .compare_exchange(cfg.from, cfg.to, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => (RESULT_SWITCHED, 0),
                Err(now) if now == cfg.to => (RESULT_SWITCHED, 0),
                Err(_) => (RESULT_RACED, 0),
            }
        }
        Verdict::Blocked(i) => (RESULT_BLOCKED, i),
        Verdict::Raced => (RESULT_RACED, 0),
        Verdict::Unreliable => (RESULT_UNRELIABLE, 0),
    };
    rec.result_kind.store(kind, Ordering::Relaxed);
    rec.result_index.store(index, Ordering::Relaxed);
    rec.answered.store(cfg.round, Ordering::Release);
    let acks = ACKS.fetch_add(1, Ordering::SeqCst) + 1;
    if acks >= EXPECTED_ACKS.load(Ordering::SeqCst) {
        signals::futex_wake(&ACKS);
    }
}

/// What a check round needs besides the threads.
#[derive(Debug, Default)]
pub struct RoundInput {
    /// Ranges in the core's order: (start, end).
    pub ranges: Vec<(u64, u64)>,
    /// Writable mappings that may hold stacks.
    pub stacks: Vec<(u64, u64)>,
    /// Code where no thread may switch (slow paths of stubs).
    pub unsafe_pcs: Vec<(u64, u64)>,
    /// The precise walk over the loaded objects' unwind tables; without it every check is the
    /// conservative scan.
    pub unwinder: Option<Arc<StackUnwinder>>,
}

/// Asks each thread of `tids` (all pending) to check its stack and switch to
/// `target`; waits up to `deadline` for their answers. `send` delivers the
/// check signal to one thread and says whether the thread exists. The
/// calling thread, if listed, is switched directly: nothing of the code
/// being checked is on the control thread's stack.
pub fn check_round(
    tids: &[Tid],
    target: PatchState,
    input: RoundInput,
    deadline: Duration,
    send: impl Fn(Tid) -> bool,
) -> Vec<SwitchResult> {
    let round = ROUND.fetch_add(1, Ordering::SeqCst) + 1;
    let from = pack(ThreadState {
        state: target.opposite(),
        pending: true,
    });
    let to = pack(ThreadState {
        state: target,
        pending: false,
    });
    let indexed: Vec<(u64, u64, u32)> = input
        .ranges
        .iter()
        .enumerate()
        .map(|(i, r)| (r.0, r.1, i as u32))
        .collect();
    let mut stacks = input.stacks;
    stacks.sort_unstable();
    let cfg = Box::new(CheckConfig {
        round,
        from,
        to,
        ranges: disjoint(&indexed),
        stacks,
        unsafe_pcs: input.unsafe_pcs,
        unwinder: input.unwinder,
    });
    let cfg_ptr = Box::into_raw(cfg);
    ACKS.store(0, Ordering::SeqCst);
    EXPECTED_ACKS.store(u32::MAX, Ordering::SeqCst);
    CONFIG.store(cfg_ptr, Ordering::SeqCst);

    let me = gettid();
    let mut results: Vec<Option<SwitchResult>> = vec![None; tids.len()];
    let mut sent = 0u32;
    for (i, &tid) in tids.iter().enumerate() {
        let Some(rec) = register(tid) else {
            results[i] = Some(SwitchResult::Other(livepatch_core::Errno::EINVAL));
            continue;
        };
        if tid == me {
            let ok = rec
                .state
                .compare_exchange(from, to, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok();
            results[i] = Some(if ok {
                SwitchResult::Switched
            } else {
                SwitchResult::Running
            });
            continue;
        }
        rec.request.store(round, Ordering::Release);
        if send(tid) {
            sent += 1;
        } else {
            results[i] = Some(SwitchResult::Exited);
        }
    }

    EXPECTED_ACKS.store(sent, Ordering::SeqCst);
    let start = Instant::now();
    loop {
        let acks = ACKS.load(Ordering::SeqCst);
        if acks >= sent {
            break;
        }
        let elapsed = start.elapsed();
        if elapsed >= deadline {
            break;
        }
        signals::futex_wait(
            &ACKS,
            acks,
            Some((deadline - elapsed).min(Duration::from_millis(10))),
        );
    }

    // Retire the configuration (rule 3).
    CONFIG.store(std::ptr::null_mut(), Ordering::SeqCst);
    while IN_FLIGHT.load(Ordering::SeqCst) != 0 {
        std::hint::spin_loop();
    }
    // SAFETY: unpublished and no handler uses it any more. This also drops the configuration's
    // hold on the unwinder, here on the control thread, never in a handler.
    drop(unsafe { Box::from_raw(cfg_ptr) });

    tids.iter()
        .zip(results)
        .map(|(&tid, r)| {
            if let Some(r) = r {
                return r;
            }
            let Some(rec) = record(tid) else {
                return SwitchResult::Exited;
            };
            if rec.answered.load(Ordering::Acquire) != round {
                return SwitchResult::Running;
            }
            match rec.result_kind.load(Ordering::Relaxed) {
                RESULT_SWITCHED => SwitchResult::Switched,
                RESULT_BLOCKED => {
                    SwitchResult::Blocked(rec.result_index.load(Ordering::Relaxed) as usize)
                }
                RESULT_RACED => SwitchResult::Running,
                _ => SwitchResult::UnreliableStack,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unwind;
    use crate::unwind::tests::{function_range, interrupt_self};

    /// A configuration as `check_round` builds it, with one range (index 0) to block on.
    fn config_for(range: (u64, u64), unwinder: Option<Arc<StackUnwinder>>) -> CheckConfig {
        let mut stacks: Vec<(u64, u64)> = livepatch_arch::maps::read()
            .unwrap()
            .iter()
            .filter(|m| m.prot & libc::PROT_WRITE != 0)
            .map(|m| (m.start as u64, m.end as u64))
            .collect();
        stacks.sort_unstable();
        CheckConfig {
            round: 0,
            from: 0,
            to: 0,
            ranges: disjoint(&[(range.0, range.1, 0)]),
            stacks,
            unsafe_pcs: Vec::new(),
            unwinder,
        }
    }

    /// What the checks said about one stack.
    #[derive(Debug, Clone, Copy)]
    struct Checked {
        /// `check_stack`: the walk, or the scan when the walk is incomplete.
        verdict: Verdict,
        /// The conservative scan alone.
        scanned: Verdict,
        /// Whether the walk reached the outermost frame.
        walk_complete: bool,
    }

    fn check(cfg: &CheckConfig, start: WalkStart) -> Checked {
        let sp = start.sp();
        let pc = match start {
            WalkStart::Interrupted { pc, .. } => pc,
            WalkStart::FunctionEntry { .. } => 0,
        };
        let top = mapping_end(&cfg.stacks, sp).expect("the stack is a listed mapping");
        let walk_complete = cfg
            .unwinder
            .as_ref()
            .is_some_and(|u| u.walk(start, top, |_| {}));
        Checked {
            verdict: check_stack(cfg, start),
            scanned: scan_stack(cfg, pc, sp, top),
            walk_complete,
        }
    }

    /// The checks of the calling thread's stack, run in a signal handler as the agent runs them.
    fn check_in_handler(cfg: &CheckConfig) -> Checked {
        let mut checked = None;
        interrupt_self(&mut |context| {
            checked = Some(check(
                cfg,
                WalkStart::Interrupted {
                    pc: signals::interrupted_pc(context) as u64,
                    sp: signals::interrupted_sp(context) as u64,
                    bp: signals::interrupted_bp(context) as u64,
                },
            ));
        });
        checked.expect("the handler ran")
    }

    /// Stands for a function being patched that is not running during the checks.
    #[inline(never)]
    fn patched_stand_in(x: u64) -> u64 {
        std::hint::black_box(x).wrapping_mul(3) ^ 0x55
    }

    /// Stands for a function being patched that is on the stack during the check.
    #[inline(never)]
    fn patched_caller_of_the_check(cfg: &CheckConfig) -> Checked {
        let checked = check_in_handler(cfg);
        std::hint::black_box(checked)
    }

    /// Keeps a word that looks like a return address into `patched_stand_in` in a local array,
    /// as a program's stale data would, while its thread is checked.
    #[inline(never)]
    fn holder_of_a_stale_word(cfg: &CheckConfig, stale: u64) -> Checked {
        let words = [0u64, stale, 0, 0];
        std::hint::black_box(&words);
        let checked = check_in_handler(cfg);
        std::hint::black_box(&words);
        checked
    }

    #[test]
    fn a_return_address_of_a_live_frame_blocks_by_the_complete_walk() {
        let range = function_range(patched_caller_of_the_check as *const () as usize);
        let cfg = config_for(range, Some(unwind::current()));
        let checked = patched_caller_of_the_check(&cfg);
        assert!(checked.walk_complete, "{checked:?}");
        assert_eq!(checked.verdict, Verdict::Blocked(0));
        assert_eq!(checked.scanned, Verdict::Blocked(0));
    }

    #[test]
    fn a_stale_word_holds_nothing_after_a_complete_walk_though_the_scan_alone_blocks_on_it() {
        let range = function_range(patched_stand_in as *const () as usize);
        // The byte before the word is the stand-in's first: a call's return address to a scan.
        let stale = range.0 + 1;
        let cfg = config_for(range, Some(unwind::current()));
        let checked = holder_of_a_stale_word(&cfg, stale);
        assert!(checked.walk_complete, "{checked:?}");
        assert_eq!(checked.scanned, Verdict::Blocked(0));
        assert_eq!(checked.verdict, Verdict::Clean);

        let without_unwinder = config_for(range, None);
        let checked = holder_of_a_stale_word(&without_unwinder, stale);
        assert_eq!(checked.verdict, Verdict::Blocked(0));
        std::hint::black_box(patched_stand_in(1));
    }

    #[test]
    fn an_incomplete_walk_falls_back_to_the_scan() {
        let range = function_range(patched_stand_in as *const () as usize);
        let cfg = config_for(range, Some(unwind::current()));
        let words = [0u64, range.0 + 1, 0, 0];
        std::hint::black_box(&words);
        let sp = (&raw const words) as u64;
        // No unwind table covers this PC: the walk stops at once, and the scan finds the word.
        let checked = check(
            &cfg,
            WalkStart::Interrupted {
                pc: 0x10,
                sp,
                bp: 0,
            },
        );
        assert!(!checked.walk_complete);
        assert_eq!(checked.verdict, Verdict::Blocked(0));
        std::hint::black_box(&words);
    }

    /// Calls `callback(entry_sp, context)` where `entry_sp` is the stack pointer at this
    /// function's entry, pointing to the return address into its caller: what the stub's slow
    /// path passes to `switch_at_entry`.
    #[unsafe(naked)]
    extern "C" fn call_with_entry_sp(
        context: *mut c_void,
        callback: extern "C" fn(entry_sp: u64, context: *mut c_void),
    ) {
        core::arch::naked_asm!(
            "mov rax, rsi",
            "mov rsi, rdi",
            "mov rdi, rsp",
            // Realign the stack for the call (the entry leaves it 8 off 16).
            "sub rsp, 8",
            "call rax",
            "add rsp, 8",
            "ret",
        )
    }

    /// The configuration to check with and the verdict, shared with `check_at_entry`.
    type EntryCheck<'a> = (&'a CheckConfig, Option<Checked>);

    extern "C" fn check_at_entry(entry_sp: u64, context: *mut c_void) {
        // SAFETY: `holder_at_an_entry` passes a pointer to its live `EntryCheck`.
        let (cfg, checked) = unsafe { &mut *context.cast::<EntryCheck<'_>>() };
        *checked = Some(check(cfg, WalkStart::FunctionEntry { sp: entry_sp }));
    }

    /// Enters a function (`call_with_entry_sp`) while keeping a stale word, and checks its stack
    /// from that entry.
    #[inline(never)]
    fn holder_at_an_entry(cfg: &CheckConfig, stale: u64) -> Checked {
        let words = [0u64, stale, 0, 0];
        std::hint::black_box(&words);
        let mut entry: EntryCheck<'_> = (cfg, None);
        call_with_entry_sp((&raw mut entry).cast(), check_at_entry);
        std::hint::black_box(&words);
        entry.1.expect("the callback ran")
    }

    /// A local the compiler must align beyond the ABI's 16 bytes: its function realigns the
    /// stack and bases its frame on `rbp`.
    #[repr(C, align(64))]
    struct OverAligned([u64; 8]);

    /// Calls `holder_at_an_entry` from a frame whose unwind rule needs `rbp`.
    #[inline(never)]
    fn frame_based_on_rbp(cfg: &CheckConfig, stale: u64) -> Checked {
        let aligned = OverAligned([0; 8]);
        std::hint::black_box(&aligned);
        let checked = holder_at_an_entry(cfg, stale);
        std::hint::black_box(&aligned);
        checked
    }

    /// Runs `holder_at_an_entry` on a thread started by `pthread_create` itself, so that
    /// between the entry and the thread's start there are only the frames of the test (the test
    /// harness's frames differ between versions), with one based on `rbp` in between if asked.
    /// The configuration is made on that thread, once its stack is mapped.
    fn check_at_entry_on_a_plain_thread(range: (u64, u64), stale: u64, via_rbp: bool) -> Checked {
        type Shared = ((u64, u64), u64, bool, Option<Checked>);
        extern "C" fn run(argument: *mut c_void) -> *mut c_void {
            // SAFETY: the spawning function passes its live `Shared` and joins this thread
            // before that goes away.
            let (range, stale, via_rbp, result) = unsafe { &mut *argument.cast::<Shared>() };
            let cfg = config_for(*range, Some(unwind::current()));
            *result = Some(if *via_rbp {
                frame_based_on_rbp(&cfg, *stale)
            } else {
                holder_at_an_entry(&cfg, *stale)
            });
            std::ptr::null_mut()
        }
        let mut shared: Shared = (range, stale, via_rbp, None);
        let mut thread: libc::pthread_t = 0;
        // SAFETY: `run` has the start routine's signature; `shared` outlives the thread, which
        // is joined below.
        let created = unsafe {
            libc::pthread_create(&mut thread, std::ptr::null(), run, (&raw mut shared).cast())
        };
        assert_eq!(created, 0);
        // SAFETY: `thread` was created above and is joined once.
        let joined = unsafe { libc::pthread_join(thread, std::ptr::null_mut()) };
        assert_eq!(joined, 0);
        shared.3.expect("the thread ran the check")
    }

    #[test]
    fn at_a_function_entry_the_walk_starts_in_the_caller() {
        // The caller of the entered function is on the stack: blocked.
        let holder = function_range(holder_at_an_entry as *const () as usize);
        let checked = check_at_entry_on_a_plain_thread(holder, 0, false);
        assert!(checked.walk_complete, "{checked:?}");
        assert_eq!(checked.verdict, Verdict::Blocked(0));

        // Only a stale word points into the stand-in: clean by the walk, blocked by the scan.
        let range = function_range(patched_stand_in as *const () as usize);
        let checked = check_at_entry_on_a_plain_thread(range, range.0 + 1, false);
        assert!(checked.walk_complete, "{checked:?}");
        assert_eq!(checked.scanned, Verdict::Blocked(0));
        assert_eq!(checked.verdict, Verdict::Clean);
        std::hint::black_box(patched_stand_in(1));
    }

    #[test]
    fn at_a_function_entry_a_frame_based_on_the_unknown_rbp_ends_the_walk() {
        // The entry does not know `rbp`: the walk stops at the frame based on it, and the scan
        // decides (and finds the stale word).
        let range = function_range(patched_stand_in as *const () as usize);
        let checked = check_at_entry_on_a_plain_thread(range, range.0 + 1, true);
        assert!(!checked.walk_complete, "{checked:?}");
        assert_eq!(checked.verdict, Verdict::Blocked(0));
        std::hint::black_box(patched_stand_in(1));
    }

    #[test]
    fn states_pack_into_one_byte() {
        for state in [PatchState::Idle, PatchState::Unpatched, PatchState::Patched] {
            for pending in [false, true] {
                let ts = ThreadState { state, pending };
                assert_eq!(unpack(pack(ts)), ts);
            }
        }
    }

    #[test]
    fn overlapping_ranges_become_disjoint_with_the_lowest_index() {
        let d = disjoint(&[(10, 20, 1), (15, 30, 0), (40, 50, 2)]);
        assert_eq!(
            d,
            vec![
                CheckRange {
                    start: 10,
                    end: 15,
                    index: 1
                },
                CheckRange {
                    start: 15,
                    end: 30,
                    index: 0
                },
                CheckRange {
                    start: 40,
                    end: 50,
                    index: 2
                },
            ]
        );
        assert_eq!(find(&d, 14), Some(1));
        assert_eq!(find(&d, 15), Some(0));
        assert_eq!(find(&d, 30), None);
        assert_eq!(find(&d, 9), None);
        assert_eq!(find(&d, 49), Some(2));
    }

    #[test]
    fn every_address_finds_the_lowest_index_covering_it() {
        // Many small overlapping ranges, nested ones and repeated ones, from a fixed LCG.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |bound: u64| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 33) % bound
        };
        let ranges: Vec<(u64, u64, u32)> = (0..300)
            .map(|i| {
                let start = next(1000);
                (start, start + next(40), next(50) as u32 + i % 3)
            })
            .collect();
        let d = disjoint(&ranges);
        assert!(
            d.windows(2).all(|w| w[0].end <= w[1].start),
            "sorted and disjoint"
        );
        for addr in 0..1100 {
            let expected = ranges
                .iter()
                .filter(|r| r.0 <= addr && addr < r.1)
                .map(|r| r.2)
                .min();
            assert_eq!(find(&d, addr), expected, "address {addr}");
        }
    }
}
