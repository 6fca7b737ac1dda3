//! The verdict on one thread's stack: the PC and every return address against the blocking
//! ranges, first by a conservative scan of the stack's words, then, for a thread the scan
//! suspects, by a precise walk over the unwind tables (rules 2 and 4 of the module).

use livepatch_arch::unwind::WalkStart;

use super::config::CheckConfig;

/// The end of the listed stack mapping that holds `sp`.
pub(crate) fn mapping_end(stacks: &[(u64, u64)], sp: u64) -> Option<u64> {
    let i = stacks.partition_point(|m| m.0 <= sp);
    let m = stacks.get(i.checked_sub(1)?)?;
    (sp < m.1).then_some(m.1)
}

/// The longest stack the handler scans; beyond it the stack is unreliable.
pub(crate) const MAX_SCAN: u64 = 64 << 20;

/// What the check found on one stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing in transition is on the stack.
    Clean,
    /// The blocking range of this index is.
    Blocked(u32),
    /// The stack could not be checked.
    Unreliable,
    /// The thread stands where it may have chosen a version already.
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
pub fn check_stack(cfg: &CheckConfig, start: WalkStart) -> Verdict {
    let (pc, sp) = match start {
        WalkStart::Interrupted { pc, sp, .. } | WalkStart::Asleep { pc, sp } => (pc, sp),
        // No instruction of the entered function ran: only its callers are on the stack.
        WalkStart::FunctionEntry { sp } => (0, sp),
    };
    if cfg.no_switch_code.iter().any(|&(a, b)| pc >= a && pc < b) {
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
            if let Some(i) = cfg.ranges.find(address) {
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
pub fn scan_stack(cfg: &CheckConfig, pc: u64, sp: u64, top: u64) -> Verdict {
    let words = (sp..top).step_by(8).map(|p| {
        // SAFETY: [sp, top) lies in the mapping that holds this thread's stack pointer (rule
        // 2), which stays mapped while the thread runs this handler on it; `p` is 8-byte
        // aligned.
        unsafe { std::ptr::read_volatile(p as *const u64) }
    });
    scan_words(cfg, pc, words)
}

/// [`scan_stack`] over words already read: a copy of a stack.
pub fn scan_words(cfg: &CheckConfig, pc: u64, words: impl Iterator<Item = u64>) -> Verdict {
    let mut best = cfg.ranges.find(pc);
    // Most stack words are data far from any patched code: one comparison
    // against the span of all ranges rules them out.
    let (low, high) = cfg.ranges.span();
    for word in words {
        let call_byte = word.wrapping_sub(1);
        if (low..high).contains(&call_byte)
            && let Some(i) = cfg.ranges.find(call_byte)
        {
            best = Some(best.map_or(i, |b| b.min(i)));
        }
    }
    match best {
        Some(i) => Verdict::Blocked(i),
        None => Verdict::Clean,
    }
}

/// Whether the calling thread runs on its alternate signal stack (its stack pointer is then
/// in a mapping that is not its stack).
pub fn on_alt_stack() -> bool {
    livepatch_arch::signals::on_alternate_signal_stack()
}

#[cfg(test)]
mod tests {
    use std::ffi::c_void;
    use std::sync::Arc;

    use livepatch_arch::signals;
    use livepatch_arch::test_support::{function_range, interrupt_self};
    use livepatch_arch::unwind::{self, StackUnwinder, WalkStart};
    use livepatch_core::{DisjointRanges, ThreadState};

    use super::*;
    use crate::check::config::CheckConfig;

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
            from: ThreadState::IDLE,
            to: ThreadState::IDLE,
            ranges: DisjointRanges::from_indexed(&[(range.0, range.1, 0)]),
            stacks,
            no_switch_code: Vec::new(),
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
            WalkStart::Interrupted { pc, .. } | WalkStart::Asleep { pc, .. } => pc,
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
}
