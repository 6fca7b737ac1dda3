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
    // SAFETY: the caller's arguments, as dlopen(3) takes them.
    unsafe { dlopen_wrapper(filename, flags) }
}

/// The body of [`dlopen`], under a name of this library alone: an exported symbol's address,
/// taken in this library, is the definition that comes first in the process (the C library's
/// in an attached process), which a redirect must not jump to.
///
/// # Safety
/// As `dlopen(3)`.
unsafe extern "C" fn dlopen_wrapper(filename: *const c_char, flags: c_int) -> *mut c_void {
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
    // SAFETY: as dlerror(3).
    unsafe { dlerror_wrapper() }
}

/// The body of [`dlerror`] (see [`dlopen_wrapper`]).
///
/// # Safety
/// As `dlerror(3)`.
unsafe extern "C" fn dlerror_wrapper() -> *mut c_char {
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
    // SAFETY: the caller's argument, as dlclose(3) takes it.
    unsafe { dlclose_wrapper(handle) }
}

/// The body of [`dlclose`] (see [`dlopen_wrapper`]).
///
/// # Safety
/// As `dlclose(3)`.
unsafe extern "C" fn dlclose_wrapper(handle: *mut c_void) -> c_int {
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
    // SAFETY: the caller's arguments, as pthread_create(3) takes them.
    unsafe { pthread_create_wrapper(thread, attr, routine, arg) }
}

/// The body of [`pthread_create`] (see [`dlopen_wrapper`]).
///
/// # Safety
/// As `pthread_create(3)`.
unsafe extern "C" fn pthread_create_wrapper(
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

/// In a process the agent was attached to, nothing resolves the program's calls to the
/// wrappers above: the C library's own entries of `dlopen`, `dlclose`, `dlerror` and
/// `pthread_create` are redirected to them with the agent's own machinery (one stop of the
/// world), their originals run from the redirected sites' relocated code. Done once, before
/// the first patch applies (what a library that comes or goes does to patches matters only
/// then); the reason it could not be, if so, and the agent then looks for libraries itself.
pub fn interpose_by_redirect() -> Result<(), String> {
    INTERPOSITION
        .get_or_init(|| {
            let wrappers: [usize; 4] = [
                dlopen_wrapper as *const () as usize,
                dlclose_wrapper as *const () as usize,
                dlerror_wrapper as *const () as usize,
                pthread_create_wrapper as *const () as usize,
            ];
            let mut specs = Vec::new();
            let agent = object_base(interpose_by_redirect as *const () as usize);
            for name in super::dl::INTERPOSED {
                // SAFETY: dlsym with the default scope and a valid name: the first definition,
                // which the program's calls are bound to.
                let address = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) } as usize;
                if address == 0 {
                    return Err(format!("no {} in the process", name.to_string_lossy()));
                }
                // With a C library older than 2.34 (dlopen in libdl, which the program may not
                // load), the first definition can be the agent's own export: redirecting that
                // would make the wrapper call itself.
                if agent.is_some() && object_base(address) == agent {
                    return Err(format!(
                        "the first {} of the process is the agent's own",
                        name.to_string_lossy()
                    ));
                }
                specs.push((
                    name.to_string_lossy().into_owned(),
                    address,
                    symbol_size(address),
                ));
            }
            let sites: Vec<livepatch_arch::SiteSpec<'_>> = specs
                .iter()
                .map(|(name, address, size)| livepatch_arch::SiteSpec {
                    name,
                    address: *address,
                    size: *size,
                    cookie: 0,
                })
                .collect();
            let infos = livepatch_arch::redirect::redirect(&sites).map_err(|e| e.to_string())?;
            for (i, info) in infos.iter().enumerate() {
                super::dl::ORIGINALS[i]
                    .store(info.original_entry, std::sync::atomic::Ordering::Release);
                REDIRECTED_AT[i].store(info.function, std::sync::atomic::Ordering::Release);
            }
            for (info, wrapper) in infos.iter().zip(wrappers) {
                livepatch_arch::redirect::set_dispatch(
                    info.function,
                    livepatch_arch::Dispatch::Jump(wrapper),
                )
                .map_err(|e| e.to_string())?;
            }
            Ok(())
        })
        .clone()
}

/// How [`interpose_by_redirect`] went, once it was tried.
static INTERPOSITION: OnceLock<Result<(), String>> = OnceLock::new();

/// Whether the C library's entries lead to the wrappers ([`interpose_by_redirect`] did it): then
/// an attached agent is told of libraries and threads as a preloaded agent is.
pub fn interposed() -> bool {
    matches!(INTERPOSITION.get(), Some(Ok(())))
}

/// The C library entries [`interpose_by_redirect`] redirected; 0 before.
static REDIRECTED_AT: [std::sync::atomic::AtomicUsize; 4] =
    [const { std::sync::atomic::AtomicUsize::new(0) }; 4];

/// Whether `address` is an entry the agent redirected to its own wrapper: no patch may take it.
pub fn redirected_by_agent(address: usize) -> bool {
    address != 0
        && REDIRECTED_AT
            .iter()
            .any(|a| a.load(std::sync::atomic::Ordering::Acquire) == address)
}

/// The load address of the object that holds `address`.
fn object_base(address: usize) -> Option<usize> {
    // SAFETY: Dl_info is plain data that dladdr fills.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr only reads the link map for the address.
    let found = unsafe { libc::dladdr(address as *const c_void, &mut info) };
    (found != 0).then_some(info.dli_fbase as usize)
}

/// `dladdr1`'s request for the symbol table entry (`<dlfcn.h>`).
const RTLD_DL_SYMENT: libc::c_int = 1;

/// The size of the function at `address`, from the dynamic symbol table (0 if unknown).
fn symbol_size(address: usize) -> usize {
    // SAFETY: Dl_info and the symbol pointer are plain data filled by dladdr1.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    let mut symbol: *const libc::Elf64_Sym = std::ptr::null();
    // SAFETY: dladdr1 with RTLD_DL_SYMENT writes a pointer to the symbol's table entry, which
    // lives as long as the object (the C library, never unloaded).
    let found = unsafe {
        libc::dladdr1(
            address as *const c_void,
            &mut info,
            (&raw mut symbol).cast(),
            RTLD_DL_SYMENT,
        )
    };
    if found == 0 || symbol.is_null() {
        return 0;
    }
    // SAFETY: a non-null symbol entry dladdr1 gave, read once.
    unsafe { (*symbol).st_size as usize }
}
