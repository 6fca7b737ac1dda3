//! Running a patch's callbacks for the core, and answering `klp_get_prev_state` from inside
//! them: a callback runs on the control thread while it holds the agent's lock, so the core
//! cannot be asked; the callback is answered from the states the core handed over for it.

#![forbid(unsafe_code)]

use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};

use livepatch_arch::signals::gettid;
use livepatch_core::{LogRecord, ObjectCallback, PrevStates, StateCallback};

use crate::ffi::descriptor::KlpState;
use crate::library::PatchLibraries;

/// What `klp_get_prev_state` answers while a callback runs.
#[derive(Debug)]
struct Answers {
    in_transition: bool,
    /// State ids and the address of their `struct klp_state`.
    states: Vec<(u64, usize)>,
}

/// The callback running now, if any, and what it may ask.
#[derive(Debug, Default)]
pub struct CallbackScope {
    /// The thread running the callback; 0 when none runs.
    tid: AtomicI32,
    answers: Mutex<Option<Answers>>,
}

/// What `klp_get_prev_state` returns from inside a callback.
#[derive(Debug, PartialEq, Eq)]
pub enum PrevStateAnswer {
    /// The state, or NULL when no earlier patch has it.
    Found(Option<*mut KlpState>),
    /// Called outside a transition: NULL, with this warning.
    OutsideTransition(LogRecord),
}

impl CallbackScope {
    fn run<R>(
        &self,
        prev: PrevStates<'_>,
        libraries: &PatchLibraries,
        call: impl FnOnce() -> R,
    ) -> R {
        let states = prev
            .states
            .iter()
            .filter_map(|s| {
                let state = libraries.declaration(&s.patch)?.state(s.index)?;
                Some((s.id, state as usize))
            })
            .collect();
        *self.answers.lock().unwrap_or_else(|e| e.into_inner()) = Some(Answers {
            in_transition: prev.in_transition,
            states,
        });
        self.tid.store(gettid(), Ordering::SeqCst);
        let result = call();
        self.tid.store(0, Ordering::SeqCst);
        *self.answers.lock().unwrap_or_else(|e| e.into_inner()) = None;
        result
    }

    /// Runs a per-object callback of a loaded patch; 0 when its library is gone.
    pub fn run_object(&self, libraries: &PatchLibraries, call: ObjectCallback<'_>) -> i32 {
        let Some(declaration) = libraries.declaration(call.patch) else {
            return 0;
        };
        self.run(call.prev_states, libraries, || {
            declaration.call_object(call.object_index, call.kind)
        })
    }

    /// Runs a per-state callback of a loaded patch; 0 when its library is gone.
    pub fn run_state(&self, libraries: &PatchLibraries, call: StateCallback<'_>) -> i32 {
        let Some(declaration) = libraries.declaration(call.patch) else {
            return 0;
        };
        self.run(call.prev_states, libraries, || {
            declaration.call_state(call.state_index, call.kind)
        })
    }

    /// `klp_get_prev_state(id)` asked by a callback the agent is running on this thread;
    /// `None` when the caller is not such a callback.
    pub fn prev_state(&self, id: u64) -> Option<PrevStateAnswer> {
        if self.tid.load(Ordering::SeqCst) != gettid() {
            return None;
        }
        let answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        let answers = answers.as_ref()?;
        let query = PrevStates {
            in_transition: answers.in_transition,
            states: &[],
        };
        if let Err(warning) = query.get(id) {
            return Some(PrevStateAnswer::OutsideTransition(warning));
        }
        Some(PrevStateAnswer::Found(
            answers
                .states
                .iter()
                .find(|(sid, _)| *sid == id)
                .map(|&(_, p)| p as *mut KlpState),
        ))
    }
}
