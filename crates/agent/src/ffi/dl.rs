//! The dynamic linker, as the agent uses it: the next definitions of the functions it
//! interposes, and patch libraries opened as handles that close when dropped.
//!
//! Safety model of this module:
//! 1. The next definitions are found once with `dlsym(RTLD_NEXT, ...)` and called with the
//!    arguments of the C functions they are, unchanged.
//! 2. A [`LibraryHandle`] holds a handle `dlopen` returned and closes it exactly once, when it
//!    is dropped; the declaration pointer it hands out is valid while the handle lives.
//! 3. Patch libraries are opened with `RTLD_NOW | RTLD_LOCAL`, so a missing symbol fails the
//!    load instead of a later call.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::OnceLock;

use livepatch_core::PatchDesc;

use super::descriptor::{AbiError, Declaration, KlpPatch, PATCH_SYMBOL};

pub(crate) type DlopenFn = unsafe extern "C" fn(*const c_char, c_int) -> *mut c_void;
pub(crate) type DlcloseFn = unsafe extern "C" fn(*mut c_void) -> c_int;
pub(crate) type DlerrorFn = unsafe extern "C" fn() -> *mut c_char;

/// The functions the agent interposes, in the order of [`ORIGINALS`].
pub(crate) const INTERPOSED: [&CStr; 4] = [c"dlopen", c"dlclose", c"dlerror", c"pthread_create"];

/// In an attached process, where the agent redirected the C library's own entries of
/// [`INTERPOSED`] to its wrappers (see `ffi::interpose::interpose_by_redirect`): where each
/// original runs from; 0 elsewhere. Set before the entries jump to the wrappers.
pub(crate) static ORIGINALS: [std::sync::atomic::AtomicUsize; 4] =
    [const { std::sync::atomic::AtomicUsize::new(0) }; 4];

/// The next definition of `name` after this library's (rule 1): the original code of a C
/// library entry the agent redirected to itself, else what `dlsym(RTLD_NEXT)` finds.
pub(crate) fn next<T: Copy>(cache: &OnceLock<usize>, name: &CStr) -> Option<T> {
    let redirected = INTERPOSED
        .iter()
        .position(|n| *n == name)
        .map(|i| ORIGINALS[i].load(std::sync::atomic::Ordering::Acquire))
        .filter(|&original| original != 0);
    let addr = redirected.unwrap_or_else(|| {
        *cache.get_or_init(|| {
            // SAFETY: dlsym with RTLD_NEXT and a valid symbol name (rule 1).
            unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) as usize }
        })
    });
    if addr == 0 {
        return None;
    }
    debug_assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<usize>());
    // SAFETY: `addr` is the address of the named C function, whose type is
    // `T` (a function pointer type of the same size as usize).
    Some(unsafe { std::mem::transmute_copy::<usize, T>(&addr) })
}

/// The dynamic linker's `dlopen`.
pub(crate) fn real_dlopen() -> DlopenFn {
    static NEXT: OnceLock<usize> = OnceLock::new();
    next(&NEXT, c"dlopen").unwrap_or(libc::dlopen as DlopenFn)
}

/// The dynamic linker's `dlclose`.
pub(crate) fn real_dlclose() -> DlcloseFn {
    static NEXT: OnceLock<usize> = OnceLock::new();
    next(&NEXT, c"dlclose").unwrap_or(libc::dlclose as DlcloseFn)
}

/// The dynamic linker's `dlerror`.
pub(crate) fn real_dlerror() -> Option<DlerrorFn> {
    static NEXT: OnceLock<usize> = OnceLock::new();
    next(&NEXT, c"dlerror")
}

/// Finds the next definitions of everything the agent interposes. Looking one up calls
/// `dlsym`, which clears the thread's pending `dlerror` message: done lazily inside `dlerror`,
/// the first lookup would erase the very message the caller asks for.
pub fn resolve_next_definitions() {
    real_dlopen();
    real_dlclose();
    real_dlerror();
}

/// The dynamic linker's last error on this thread.
fn dl_error() -> String {
    let Some(dlerror) = real_dlerror() else {
        return "unknown error".into();
    };
    // SAFETY: the next dlerror returns NULL or a valid C string (rule 1).
    let e = unsafe { dlerror() };
    if e.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: non-null C string from dlerror.
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

/// Why a patch library could not be opened or has no patch.
#[derive(Debug, thiserror::Error)]
pub enum DlError {
    /// The path cannot be a C string.
    #[error("{0}: the path contains a NUL byte")]
    NulInPath(String),
    /// `dlopen` refused it.
    #[error("cannot load patch library: {0}")]
    Open(String),
    /// It has no `KLP_PATCH` declaration.
    #[error("not a patch library: it declares no patch (KLP_PATCH missing)")]
    NoDeclaration,
    /// Its declaration is NULL.
    #[error("its KLP_PATCH declaration is NULL")]
    NullDeclaration,
    /// Its declaration is malformed.
    #[error("malformed patch: {0}")]
    Malformed(#[from] AbiError),
}

/// A patch library, open, and the patch it declares: the declaration is valid as long as this
/// value lives, since it holds the library open (rule 2).
#[derive(Debug)]
pub struct OpenPatch {
    // Dropped after `handle` would be unsound to use: fields drop in order, the declaration
    // first, then the handle that closes the library.
    declaration: Declaration,
    handle: LibraryHandle,
}

impl OpenPatch {
    /// Opens the patch library at `path` and reads its declaration; `default_name` names a
    /// patch that has no `name`. Nothing of the library is called but its constructors.
    pub fn open(path: &Path, default_name: &str) -> Result<(OpenPatch, PatchDesc), DlError> {
        let handle = LibraryHandle::open(path)?;
        let patch = handle.declaration()?;
        // SAFETY: the declaration of a library `handle` keeps loaded, and the returned value
        // keeps `handle` with it.
        let (declaration, desc) = unsafe { Declaration::read(patch, default_name) }?;
        Ok((
            OpenPatch {
                declaration,
                handle,
            },
            desc,
        ))
    }

    /// The patch's declaration.
    pub fn declaration(&self) -> &Declaration {
        &self.declaration
    }

    /// Keeps the library loaded for the rest of the process's life: its code may still run
    /// (a patch of a forced transition).
    pub fn keep_forever(self) {
        self.handle.keep_forever();
    }
}

/// An open patch library; closed when dropped (rule 2).
#[derive(Debug)]
pub struct LibraryHandle(NonNull<c_void>);

// SAFETY: a dlopen handle is a process-wide token the dynamic linker locks around; it may be
// used and closed from any thread.
unsafe impl Send for LibraryHandle {}

impl LibraryHandle {
    /// Opens a patch library without telling the patches about it (rule 3).
    pub fn open(path: &Path) -> Result<Self, DlError> {
        let text = path.to_string_lossy();
        let c = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| DlError::NulInPath(text.to_string()))?;
        // SAFETY: a valid C string and flags (rule 3).
        let h = unsafe { real_dlopen()(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        NonNull::new(h)
            .map(LibraryHandle)
            .ok_or_else(|| DlError::Open(dl_error()))
    }

    /// The library's `KLP_PATCH()` declaration, valid while the handle lives.
    pub fn declaration(&self) -> Result<NonNull<KlpPatch>, DlError> {
        // SAFETY: an open handle (rule 2) and a valid symbol name.
        let sym = unsafe { libc::dlsym(self.0.as_ptr(), PATCH_SYMBOL.as_ptr()) };
        if sym.is_null() {
            return Err(DlError::NoDeclaration);
        }
        // SAFETY: KLP_PATCH defines the symbol as `struct klp_patch *const`.
        let decl = unsafe { *(sym as *const *mut KlpPatch) };
        NonNull::new(decl).ok_or(DlError::NullDeclaration)
    }

    /// Keeps the library loaded for the rest of the process's life: its code may still run
    /// (a patch of a forced transition).
    pub fn keep_forever(self) {
        std::mem::forget(self);
    }
}

impl Drop for LibraryHandle {
    fn drop(&mut self) {
        // SAFETY: a handle from dlopen, closed once (rule 2).
        unsafe { real_dlclose()(self.0.as_ptr()) };
    }
}
