//! Helpers for tests of code that runs in signal handlers or walks stacks: interrupting the
//! calling thread with a signal and running a closure in the handler, and finding a function's
//! address range. Compiled for this crate's tests and, with the `test-support` feature, for
//! other crates' tests; not part of the API.

use std::ffi::c_void;
use std::sync::Mutex;
use std::sync::atomic::{AtomicPtr, Ordering};

use crate::signals;

/// The signal the tests interrupt themselves with (not the agent's default check signals).
fn test_signal() -> i32 {
    libc::SIGRTMIN() + 2
}

/// What the test handler calls: set by `interrupt_self` for the duration of one signal.
static ON_SIGNAL: AtomicPtr<&mut dyn FnMut(*mut c_void)> = AtomicPtr::new(std::ptr::null_mut());
/// One interrupting test at a time (the handler slot is global).
static INTERRUPTING: Mutex<()> = Mutex::new(());

extern "C" fn test_handler(signo: libc::c_int, _: *mut libc::siginfo_t, context: *mut c_void) {
    let f = ON_SIGNAL.load(Ordering::SeqCst);
    if signo == test_signal() && !f.is_null() {
        // SAFETY: `interrupt_self` stores a pointer to its live `&mut dyn FnMut` and clears
        // it before that returns; the signal runs on the same thread, in between.
        unsafe { (*f)(context) };
    }
}

/// Sends a signal to the calling thread and runs `on_signal` inside the handler with the
/// interrupted context. The handler runs before `tgkill` returns to user space, so the
/// frames of the callers of this function are live, interrupted frames.
#[inline(never)]
pub fn interrupt_self(mut on_signal: &mut dyn FnMut(*mut c_void)) {
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

/// The run-time `[start, end)` of a function of the running executable, from its symbol table.
pub fn function_range(function: usize) -> (u64, u64) {
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    let table = crate::symbols::SymbolTable::read(&exe).unwrap();
    let bias = crate::objects::loaded_objects()[0].bias;
    let (symbol, offset) = table
        .containing((function - bias) as u64)
        .expect("the function has a symbol");
    assert_eq!(offset, 0, "{} is not at the function's start", symbol.name);
    assert!(symbol.size > 0);
    let start = function as u64;
    (start, start + symbol.size)
}

/// The end of the writable mapping that holds `address` (the calling thread's stack).
pub fn stack_end(address: u64) -> u64 {
    let maps = crate::maps::read().unwrap();
    crate::maps::find(&maps, address as usize)
        .expect("the stack is mapped")
        .end as u64
}
