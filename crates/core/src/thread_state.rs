//! A thread's patch state and the rules that change it outside the core's own steps (kernel:
//! `task->patch_state`, `TIF_PATCH_PENDING`, `klp_update_patch_state` and `klp_copy_process`
//! in transition.c).
//!
//! The core sets thread states in its transition steps; between them, threads change their own
//! state: a pending thread switches at a switch point or after a clean stack check, and a
//! thread that appears takes a state of its own. Those rules live here, once, so that the agent
//! (on real threads, from signal handlers and stubs, through [`PackedThreadState`]) and the
//! simulator (on virtual ones) run the same rules.

/// A thread's patch state (`task->patch_state`), also the global target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(i8)]
pub enum PatchState {
    /// No transition in progress (`KLP_TRANSITION_IDLE`, -1).
    #[default]
    Idle = -1,
    /// Runs the code as it was before the transition patch (0).
    Unpatched = 0,
    /// Runs the transition patch's code (1).
    Patched = 1,
}

impl PatchState {
    /// The value `/proc/<pid>/patch_state` shows: -1, 0 or 1.
    pub fn as_i8(self) -> i8 {
        self as i8
    }

    /// The inverse of [`PatchState::as_i8`].
    pub fn from_i8(v: i8) -> Option<PatchState> {
        match v {
            -1 => Some(PatchState::Idle),
            0 => Some(PatchState::Unpatched),
            1 => Some(PatchState::Patched),
            _ => None,
        }
    }

    /// The other non-idle state (`!state` in the kernel).
    pub fn opposite(self) -> PatchState {
        match self {
            PatchState::Patched => PatchState::Unpatched,
            PatchState::Unpatched => PatchState::Patched,
            PatchState::Idle => PatchState::Idle,
        }
    }

    /// The word status pages and JSON use: `idle`, `unpatched` or `patched`.
    pub fn name(self) -> &'static str {
        match self {
            PatchState::Idle => "idle",
            PatchState::Unpatched => "unpatched",
            PatchState::Patched => "patched",
        }
    }
}

/// A thread's state and pending flag (`TIF_PATCH_PENDING`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ThreadState {
    /// Which code the thread runs.
    pub state: PatchState,
    /// The thread still has to switch to the target.
    pub pending: bool,
}

impl ThreadState {
    /// No transition: IDLE, not pending.
    pub const IDLE: ThreadState = ThreadState {
        state: PatchState::Idle,
        pending: false,
    };

    /// A thread of a transition to `target` that still has to switch: the initial state,
    /// pending. Only such a thread may switch.
    pub fn pending_for(target: PatchState) -> ThreadState {
        ThreadState {
            state: target.opposite(),
            pending: true,
        }
    }

    /// A thread that switched to `target`.
    pub fn switched_to(target: PatchState) -> ThreadState {
        ThreadState {
            state: target,
            pending: false,
        }
    }

    /// The state after the thread passed a switch point with nothing patched on its stack
    /// (kernel: `klp_update_patch_state`): a pending thread takes `target`; any other stays.
    pub fn at_switch_point(self, target: PatchState) -> ThreadState {
        if self.pending {
            ThreadState::switched_to(target)
        } else {
            self
        }
    }

    /// The state of a thread the platform finds only after it started, when threads created
    /// now start in `new_threads` and the transition's target is `target` (IDLE: none runs).
    ///
    /// Its past is unknown: it may have run old code before anybody saw it. So it is treated
    /// like a thread that existed when the transition began: the initial state, pending once
    /// the transition started (that is when new threads start at the target). Before the
    /// start, new threads start in the initial state, not pending, and so does this one.
    pub fn discovered(new_threads: ThreadState, target: PatchState) -> ThreadState {
        if new_threads.state == PatchState::Idle || target == PatchState::Idle {
            ThreadState::IDLE
        } else if new_threads.state == target {
            ThreadState::pending_for(target)
        } else {
            new_threads
        }
    }
}

/// A [`ThreadState`] in one byte, for platforms that keep thread states in atomics read by
/// signal handlers and stubs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PackedThreadState(pub u8);

const PACKED_IDLE: u8 = 0;
const PACKED_UNPATCHED: u8 = 1;
const PACKED_PATCHED: u8 = 2;
const PACKED_PENDING: u8 = 4;

impl PackedThreadState {
    /// IDLE, not pending.
    pub const IDLE: PackedThreadState = PackedThreadState(PACKED_IDLE);

    /// Encodes a state.
    pub const fn pack(ts: ThreadState) -> PackedThreadState {
        let state = match ts.state {
            PatchState::Idle => PACKED_IDLE,
            PatchState::Unpatched => PACKED_UNPATCHED,
            PatchState::Patched => PACKED_PATCHED,
        };
        PackedThreadState(if ts.pending {
            state | PACKED_PENDING
        } else {
            state
        })
    }

    /// Decodes a state; bits that no state sets read as IDLE.
    pub const fn unpack(self) -> ThreadState {
        let state = match self.0 & 3 {
            PACKED_UNPATCHED => PatchState::Unpatched,
            PACKED_PATCHED => PatchState::Patched,
            _ => PatchState::Idle,
        };
        ThreadState {
            state,
            pending: self.0 & PACKED_PENDING != 0,
        }
    }
}

impl From<ThreadState> for PackedThreadState {
    fn from(ts: ThreadState) -> Self {
        PackedThreadState::pack(ts)
    }
}

impl From<PackedThreadState> for ThreadState {
    fn from(packed: PackedThreadState) -> Self {
        packed.unpack()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_have_the_kernel_values() {
        assert_eq!(PatchState::Idle.as_i8(), -1);
        assert_eq!(PatchState::Unpatched.as_i8(), 0);
        assert_eq!(PatchState::Patched.as_i8(), 1);
        assert_eq!(PatchState::from_i8(1), Some(PatchState::Patched));
        assert_eq!(PatchState::from_i8(2), None);
        assert_eq!(PatchState::Patched.opposite(), PatchState::Unpatched);
    }

    #[test]
    fn states_pack_into_one_byte() {
        for state in [PatchState::Idle, PatchState::Unpatched, PatchState::Patched] {
            for pending in [false, true] {
                let ts = ThreadState { state, pending };
                assert_eq!(PackedThreadState::pack(ts).unpack(), ts);
            }
        }
    }

    #[test]
    fn only_a_pending_thread_switches_at_a_switch_point() {
        let target = PatchState::Patched;
        let pending = ThreadState::pending_for(target);
        assert_eq!(
            pending.at_switch_point(target),
            ThreadState::switched_to(target)
        );
        let idle = ThreadState::IDLE;
        assert_eq!(idle.at_switch_point(target), idle);
    }

    #[test]
    fn a_discovered_thread_is_treated_as_one_that_existed_at_the_start() {
        let target = PatchState::Patched;
        // No transition.
        assert_eq!(
            ThreadState::discovered(ThreadState::IDLE, PatchState::Idle),
            ThreadState::IDLE
        );
        // Between init and start: new threads start unpatched, not pending; so does it.
        let before_start = ThreadState {
            state: PatchState::Unpatched,
            pending: false,
        };
        assert_eq!(ThreadState::discovered(before_start, target), before_start);
        // After the start new threads start at the target; it may have run old code.
        assert_eq!(
            ThreadState::discovered(ThreadState::switched_to(target), target),
            ThreadState::pending_for(target)
        );
    }
}
