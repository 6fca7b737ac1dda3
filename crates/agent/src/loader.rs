//! Libraries: loading patch libraries, and noticing the program load and
//! unload libraries that patches target (the kernel's module coming and
//! going notifiers), and threads being born.
//!
//! The agent interposes `dlopen`, `dlclose`, `dlerror` and `pthread_create` (it is
//! preloaded, so the program's calls reach it first) and forwards to the
//! next definition. A library the program loads is patched before `dlopen`
//! returns to the program; one it unloads is reverted after its finalizers
//! ran. The library's own constructors run before it is patched: `dlopen`
//! runs them before it returns.
//!
//! Safety model of this module:
//! 1. The next definitions are found once with `dlsym(RTLD_NEXT, ...)` and
//!    called with the program's arguments unchanged.
//! 2. A thread start routine and its argument are moved into a heap block
//!    owned by the new thread, which frees it before calling the routine.
//! 3. Patch libraries are opened with `RTLD_NOW | RTLD_LOCAL`, so a
//!    missing symbol fails the load instead of a later call.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::sync::OnceLock;

use crate::abi::{KlpPatch, PATCH_SYMBOL};
use crate::runtime;

type DlopenFn = unsafe extern "C" fn(*const c_char, c_int) -> *mut c_void;
type DlcloseFn = unsafe extern "C" fn(*mut c_void) -> c_int;
type StartRoutine = extern "C" fn(*mut c_void) -> *mut c_void;
type PthreadCreateFn = unsafe extern "C" fn(
    *mut libc::pthread_t,
    *const libc::pthread_attr_t,
    StartRoutine,
    *mut c_void,
) -> c_int;

fn next<T: Copy>(cache: &OnceLock<usize>, name: &CStr) -> Option<T> {
    let addr = *cache.get_or_init(|| {
        // SAFETY: dlsym with RTLD_NEXT and a valid symbol name (rule 1).
        unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) as usize }
    });
    if addr == 0 {
        return None;
    }
    debug_assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<usize>());
    // SAFETY: `addr` is the address of the named C function, whose type is
    // `T` (a function pointer type of the same size as usize).
    Some(unsafe { std::mem::transmute_copy::<usize, T>(&addr) })
}

fn real_dlopen() -> DlopenFn {
    static NEXT: OnceLock<usize> = OnceLock::new();
    next(&NEXT, c"dlopen").unwrap_or(libc::dlopen as DlopenFn)
}

fn real_dlclose() -> DlcloseFn {
    static NEXT: OnceLock<usize> = OnceLock::new();
    next(&NEXT, c"dlclose").unwrap_or(libc::dlclose as DlcloseFn)
}

type DlerrorFn = unsafe extern "C" fn() -> *mut c_char;

fn real_dlerror() -> Option<DlerrorFn> {
    static NEXT: OnceLock<usize> = OnceLock::new();
    next(&NEXT, c"dlerror")
}

/// Finds the next definitions of everything this module interposes. Looking one up calls
/// `dlsym`, which clears the thread's pending `dlerror` message: done lazily inside `dlerror`,
/// the first lookup would erase the very message the caller asks for.
pub fn resolve_next_definitions() {
    real_dlopen();
    real_dlclose();
    real_dlerror();
}

fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a valid C string.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: non-null C string from dlerror.
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

/// Opens a patch library without telling the patches about it.
pub fn open_patch_library(path: &str) -> Result<*mut c_void, String> {
    let c = CString::new(path).map_err(|_| format!("{path}: the path contains a NUL byte"))?;
    // SAFETY: a valid C string and flags (rule 3).
    let h = unsafe { real_dlopen()(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        return Err(format!("cannot load patch library: {}", dl_error()));
    }
    Ok(h)
}

/// The `KLP_PATCH()` declaration of a loaded library.
///
/// # Safety
/// `handle` comes from [`open_patch_library`] and is still open.
pub unsafe fn patch_declaration(handle: *mut c_void) -> Result<*const KlpPatch, String> {
    // SAFETY: a handle from dlopen and a valid symbol name.
    let sym = unsafe { libc::dlsym(handle, PATCH_SYMBOL.as_ptr()) };
    if sym.is_null() {
        return Err("not a patch library: it declares no patch (KLP_PATCH missing)".into());
    }
    // SAFETY: KLP_PATCH defines the symbol as `struct klp_patch *const`.
    let decl = unsafe { *(sym as *const *const KlpPatch) };
    if decl.is_null() {
        return Err("its KLP_PATCH declaration is NULL".into());
    }
    Ok(decl)
}

/// Closes a library opened with [`open_patch_library`].
///
/// # Safety
/// `handle` comes from [`open_patch_library`] and is closed only once.
pub unsafe fn close_library(handle: *mut c_void) {
    // SAFETY: a handle from dlopen, closed once.
    unsafe { real_dlclose()(handle) };
}

/// The control thread's id: its own `dlopen` calls (a patch library's
/// constructors) must not wait for the lock it holds.
static CONTROL_TID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Records the calling thread as the control thread.
pub fn set_control_thread() {
    CONTROL_TID.store(
        crate::threads::gettid(),
        std::sync::atomic::Ordering::SeqCst,
    );
}

fn on_control_thread() -> bool {
    CONTROL_TID.load(std::sync::atomic::Ordering::SeqCst) == crate::threads::gettid()
}

/// `dlopen` as the program sees it: a library that enabled patches target
/// is patched before `dlopen` returns; if a patch refuses it, it is
/// unloaded again and `dlopen` fails.
///
/// # Safety
/// As `dlopen(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void {
    // SAFETY: forwarding the caller's arguments unchanged.
    let handle = unsafe { real_dlopen()(filename, flags) };
    if handle.is_null() || on_control_thread() {
        return handle;
    }
    let Some(agent) = runtime::agent() else {
        return handle;
    };
    let refused = agent.lock().sync_objects();
    if let Some(e) = refused {
        agent
            .log
            .agent("warn", &format!("livepatch: dlopen refused: {e}"));
        // SAFETY: the handle we just got, closed once.
        unsafe { real_dlclose()(handle) };
        agent.lock().sync_objects();
        let file = if filename.is_null() {
            "the program".into()
        } else {
            // SAFETY: a non-null dlopen file name is a C string.
            unsafe { CStr::from_ptr(filename) }.to_string_lossy()
        };
        let message = format!("{file}: refused by livepatch: {e}");
        REFUSAL.with(|r| *r.borrow_mut() = CString::new(message).ok());
        return std::ptr::null_mut();
    }
    handle
}

thread_local! {
    /// Why this thread's last `dlopen` was refused by a patch, until `dlerror` reports it.
    static REFUSAL: std::cell::RefCell<Option<CString>> = const { std::cell::RefCell::new(None) };
    /// The message `dlerror` returned last; it must stay valid until the next call.
    static REPORTED: std::cell::RefCell<Option<CString>> = const { std::cell::RefCell::new(None) };
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
        // SAFETY: the next definition of dlerror, called as dlerror(3) says.
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
    // SAFETY: forwarding the caller's argument unchanged.
    let r = unsafe { real_dlclose()(handle) };
    if !on_control_thread()
        && let Some(agent) = runtime::agent()
    {
        agent.lock().sync_objects();
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
    // block (rule 2).
    let r = unsafe { real(thread, attr, thread_start, block.cast()) };
    if r != 0 {
        // SAFETY: the thread was not created; the block is still ours.
        drop(unsafe { Box::from_raw(block) });
    }
    r
}
