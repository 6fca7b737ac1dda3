//! The dispatch of every redirected function as its stub's slow path reads it: the kernel
//! handler's inputs for one site (`klp_ftrace_handler`), published by the core, and the
//! decision the slow path asks for on the calling thread.
//!
//! Safety model of this module: a site's record is leaked when it is made and never freed (a
//! thread may be reading it in the slow path), and is the stub's cookie; the decider only
//! turns cookies made here back into records.
//!
//! A record's three fields change together, under a sequence counter (a seqlock): the slow
//! path never acts on a new top with an old transition flag. Records are written only under the
//! agent's lock (so one writer at a time), by the control thread or by a program thread in the
//! notifier, which blocks the program's signals meanwhile: no handler of the program can run on
//! a writer between its two counter stores and spin forever on the odd counter.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering, fence};

use livepatch_arch::redirect::{self, RedirectError};
use livepatch_core::{Addr, Dispatch, Target};

use crate::check;
use crate::threads;

/// What a redirected function's slow path reads. Never freed (a thread may be reading it);
/// reused for the same address.
#[derive(Debug)]
struct SiteDispatch {
    /// Odd while the control thread writes the fields.
    sequence: AtomicU32,
    /// Top func's target, 0 for the original.
    top: AtomicUsize,
    /// Target below the top, 0 for the original.
    previous: AtomicUsize,
    /// The top func's transition flag.
    transition: AtomicBool,
}

fn address_of(target: Target) -> usize {
    match target {
        Target::Original => 0,
        Target::Code(address) => address as usize,
    }
}

fn target_of(address: usize) -> Target {
    match address {
        0 => Target::Original,
        address => Target::Code(address as u64),
    }
}

impl SiteDispatch {
    /// The fields as one consistent value. The Acquire fence pairs with the Release fence of
    /// [`SiteDispatch::store`]: a reader that saw a field written after the counter went odd
    /// sees the counter changed and reads again.
    fn dispatch(&self) -> Dispatch {
        loop {
            let before = self.sequence.load(Ordering::Acquire);
            if before & 1 != 0 {
                std::hint::spin_loop();
                continue;
            }
            let dispatch = Dispatch {
                top: target_of(self.top.load(Ordering::Relaxed)),
                previous: target_of(self.previous.load(Ordering::Relaxed)),
                transition: self.transition.load(Ordering::Relaxed),
            };
            fence(Ordering::Acquire);
            if self.sequence.load(Ordering::Relaxed) == before {
                return dispatch;
            }
        }
    }

    /// Writes the fields (under the agent's lock: one writer). The Release fence orders
    /// the odd counter before the fields; the final Release store publishes them with the
    /// even counter.
    fn store(&self, dispatch: Dispatch) {
        let sequence = self.sequence.load(Ordering::Relaxed);
        self.sequence
            .store(sequence.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        self.top.store(address_of(dispatch.top), Ordering::Relaxed);
        self.previous
            .store(address_of(dispatch.previous), Ordering::Relaxed);
        self.transition
            .store(dispatch.transition, Ordering::Relaxed);
        self.sequence
            .store(sequence.wrapping_add(2), Ordering::Release);
    }
}

/// The stub's decision for a site in transition, on the calling thread: the core's rule
/// ([`Dispatch::choose`]) for the thread's state. A pending thread whose callers are clean
/// switches first: entering a function is its switch point, so a thread that calls patched
/// functions back to back, and is never found outside them by a signal, still switches.
extern "C" fn decide(cookie: u64, entry_sp: usize) -> usize {
    // SAFETY: cookies are addresses of leaked `SiteDispatch` records (see `Sites::record`).
    let site = unsafe { &*(cookie as *const SiteDispatch) };
    threads::set_in_slow_path(true);
    check::switch_at_entry(entry_sp as u64);
    let target = site.dispatch().choose(threads::dispatch_state());
    threads::set_in_slow_path(false);
    address_of(target)
}

/// The dispatch records of every function redirected so far.
#[derive(Debug, Default)]
pub struct Sites {
    dispatch: BTreeMap<Addr, &'static SiteDispatch>,
}

impl Sites {
    /// Makes the slow path of every stub ask [`decide`].
    pub fn install() {
        redirect::set_decider(decide);
    }

    fn record(&mut self, address: Addr) -> &'static SiteDispatch {
        self.dispatch.entry(address).or_insert_with(|| {
            Box::leak(Box::new(SiteDispatch {
                sequence: AtomicU32::new(0),
                top: AtomicUsize::new(0),
                previous: AtomicUsize::new(0),
                transition: AtomicBool::new(false),
            }))
        })
    }

    /// The cookie of the function's stub: its record's address.
    pub fn cookie(&mut self, address: Addr) -> u64 {
        std::ptr::from_ref(self.record(address)) as u64
    }

    /// Publishes what the stub at `address` does from now on. The record is written before the
    /// slot: a thread that reaches the slow path through the new slot reads the new targets.
    pub fn publish(&mut self, address: Addr, dispatch: Dispatch) -> Result<(), RedirectError> {
        self.record(address).store(dispatch);
        let stub = if dispatch.transition {
            redirect::Dispatch::Decide
        } else {
            match dispatch.top {
                Target::Original => redirect::Dispatch::Original,
                Target::Code(code) => redirect::Dispatch::Jump(code as usize),
            }
        };
        redirect::set_dispatch(address as usize, stub)
    }

    /// Before a restore: a thread that has just entered the stub may still be on its way to the
    /// decision, and must find the original function, not the last target.
    pub fn clear(&mut self, address: Addr) {
        self.record(address).store(Dispatch::ORIGINAL);
    }
}
