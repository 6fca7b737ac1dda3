//! The functions the agent interposes (it is preloaded, so the program's calls reach it
//! first): `dlopen`, `dlclose` and `dlerror` for the kernel's module coming and going
//! notifiers, and `pthread_create` so that a new thread records itself at birth. Each forwards
//! to the next definition.
//!
//! A library the program loads is patched before `dlopen` returns to the program; one it
//! unloads is reverted after its finalizers ran. The library's own constructors run before it
//! is patched: `dlopen` runs them before it returns.
//!
//! Safety model of this module:
//! 1. Every interposer forwards the program's arguments unchanged to the next definition
//!    (`super::dl`), and returns what it returned, unless a patch refuses a library.
//! 2. A thread start routine and its argument are moved into a heap block owned by the new
//!    thread, which frees it before calling the routine.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::sync::OnceLock;

use super::dl::{next, real_dlclose, real_dlerror, real_dlopen};

type StartRoutine = extern "C" fn(*mut c_void) -> *mut c_void;
type PthreadCreateFn = unsafe extern "C" fn(
    *mut libc::pthread_t,
    *const libc::pthread_attr_t,
    StartRoutine,
    *mut c_void,
) -> c_int;

thread_local! {
    /// Why this thread's last `dlopen` was refused by a patch, until `dlerror` reports it.
    static REFUSAL: std::cell::RefCell<Option<CString>> = const { std::cell::RefCell::new(None) };
    /// The message `dlerror` returned last; it must stay valid until the next call.
    static REPORTED: std::cell::RefCell<Option<CString>> = const { std::cell::RefCell::new(None) };
}

/// `dlopen` as the program sees it: a library that enabled patches target
/// is patched before `dlopen` returns; if a patch refuses it, it is
/// unloaded again and `dlopen` fails.
///
/// # Safety
/// As `dlopen(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void {
    // SAFETY: forwarding the caller's arguments unchanged (rule 1).
    let handle = unsafe { real_dlopen()(filename, flags) };
    if handle.is_null() {
        return handle;
    }
    let Some(agent) = crate::current_agent().filter(|a| !a.is_control_thread()) else {
        return handle;
    };
    let Some(refusal) = agent.objects_changed() else {
        return handle;
    };
    // SAFETY: the handle we just got, closed once.
    unsafe { real_dlclose()(handle) };
    agent.objects_changed();
    let file = if filename.is_null() {
        "the program".into()
    } else {
        // SAFETY: a non-null dlopen file name is a C string.
        unsafe { CStr::from_ptr(filename) }.to_string_lossy()
    };
    let message = format!("{file}: refused by livepatch: {refusal}");
    REFUSAL.with(|r| *r.borrow_mut() = CString::new(message).ok());
    std::ptr::null_mut()
}

/// `dlerror` as the program sees it: after a `dlopen` the agent refused, it describes the
/// refusal once, as the dynamic linker describes its own failures.
///
/// # Safety
/// As `dlerror(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlerror() -> *mut c_char {
    if let Some(message) = REFUSAL.with(|r| r.borrow_mut().take()) {
        let pointer = message.as_ptr() as *mut c_char;
        REPORTED.with(|r| *r.borrow_mut() = Some(message));
        return pointer;
    }
    match real_dlerror() {
        // SAFETY: the next definition of dlerror, called as dlerror(3) says (rule 1).
        Some(real) => unsafe { real() },
        None => std::ptr::null_mut(),
    }
}

/// `dlclose` as the program sees it: libraries that went away are reverted
/// from every patch, after their finalizers ran.
///
/// # Safety
/// As `dlclose(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlclose(handle: *mut c_void) -> c_int {
    // SAFETY: forwarding the caller's argument unchanged (rule 1).
    let r = unsafe { real_dlclose()(handle) };
    if let Some(agent) = crate::current_agent().filter(|a| !a.is_control_thread()) {
        agent.objects_changed();
    }
    r
}

struct ThreadStart {
    routine: StartRoutine,
    arg: *mut c_void,
}

extern "C" fn thread_start(p: *mut c_void) -> *mut c_void {
    // SAFETY: `p` is the block pthread_create below made for this thread
    // (rule 2), reclaimed exactly once here.
    let start = unsafe { Box::from_raw(p as *mut ThreadStart) };
    crate::threads::register_birth();
    (start.routine)(start.arg)
}

/// `pthread_create` as the program sees it: the new thread records itself
/// before it runs the program's start routine, so that it gets the state of
/// a thread born at that moment.
///
/// # Safety
/// As `pthread_create(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_create(
    thread: *mut libc::pthread_t,
    attr: *const libc::pthread_attr_t,
    routine: StartRoutine,
    arg: *mut c_void,
) -> c_int {
    static NEXT: OnceLock<usize> = OnceLock::new();
    let Some(real) = next::<PthreadCreateFn>(&NEXT, c"pthread_create") else {
        return libc::EAGAIN;
    };
    let block = Box::into_raw(Box::new(ThreadStart { routine, arg }));
    // SAFETY: forwarding the caller's arguments, with our start routine and
    // block (rules 1 and 2).
    let r = unsafe { real(thread, attr, thread_start, block.cast()) };
    if r != 0 {
        // SAFETY: the thread was not created; the block is still ours.
        drop(unsafe { Box::from_raw(block) });
    }
    r
}
