//! The structures of `include/livepatch.h` that a patch library declares, their `#[repr(C)]`
//! mirrors, and their translation into the core's descriptors.
//!
//! Safety model of this module:
//! 1. A `klp_patch` pointer comes from `dlsym` of a library this agent
//!    loaded and keeps loaded; its memory lives as long as the library.
//! 2. Arrays are read only up to their terminator, and only through the
//!    layout the header defines (`#[repr(C)]` mirrors below).
//! 3. Strings are NUL-terminated C strings; invalid UTF-8 is refused with an
//!    error, never read past the terminator.
//! 4. Nothing here calls into the patch library but [`Declaration::call_object`] and
//!    [`Declaration::call_state`]: a callback is read from the very object or state of a loaded
//!    declaration it is called with, and called with the type the header declares for it.

use std::ffi::{CStr, c_char, c_int, c_ulong, c_void};

use livepatch_core::{
    CallbackId, FuncDesc, ObjectCallbackKind, ObjectCallbacks, ObjectDesc, PatchDesc,
    StateCallbackKind, StateCallbacks, StateDesc,
};

/// `struct klp_func`.
#[repr(C)]
#[derive(Debug)]
pub struct KlpFunc {
    /// `old_name`.
    pub old_name: *const c_char,
    /// `new_func`.
    pub new_func: *mut c_void,
    /// `old_sympos`.
    pub old_sympos: c_ulong,
}

/// A per-object callback.
pub type ObjectCallbackFn = unsafe extern "C" fn(*mut KlpObject) -> c_int;
/// A per-object callback that returns nothing.
pub type ObjectVoidCallbackFn = unsafe extern "C" fn(*mut KlpObject);

/// `struct klp_callbacks`.
#[repr(C)]
#[derive(Debug)]
pub struct KlpCallbacks {
    /// `pre_patch`.
    pub pre_patch: Option<ObjectCallbackFn>,
    /// `post_patch`.
    pub post_patch: Option<ObjectVoidCallbackFn>,
    /// `pre_unpatch`.
    pub pre_unpatch: Option<ObjectVoidCallbackFn>,
    /// `post_unpatch`.
    pub post_unpatch: Option<ObjectVoidCallbackFn>,
    /// `post_unpatch_enabled` (the core keeps its own copy).
    pub post_unpatch_enabled: bool,
}

/// `struct klp_object`.
#[repr(C)]
#[derive(Debug)]
pub struct KlpObject {
    /// `name`.
    pub name: *const c_char,
    /// `funcs`.
    pub funcs: *mut KlpFunc,
    /// `callbacks`.
    pub callbacks: KlpCallbacks,
    /// `build_id`: NULL, or the GNU build id (hex) the object must have.
    pub build_id: *const c_char,
}

/// A per-state callback.
pub type StateCallbackFn = unsafe extern "C" fn(*mut KlpPatch, *mut KlpState) -> c_int;
/// A per-state callback that returns nothing.
pub type StateVoidCallbackFn = unsafe extern "C" fn(*mut KlpPatch, *mut KlpState);

/// `struct klp_state_callbacks`.
#[repr(C)]
#[derive(Debug)]
pub struct KlpStateCallbacks {
    /// `setup`.
    pub setup: Option<StateCallbackFn>,
    /// `enable`.
    pub enable: Option<StateVoidCallbackFn>,
    /// `disable`.
    pub disable: Option<StateVoidCallbackFn>,
    /// `release`.
    pub release: Option<StateVoidCallbackFn>,
    /// `setup_succeeded` (the core keeps its own copy).
    pub setup_succeeded: bool,
}

/// `struct klp_state`.
#[repr(C)]
#[derive(Debug)]
pub struct KlpState {
    /// `id`.
    pub id: c_ulong,
    /// `version`.
    pub version: u32,
    /// `callbacks`.
    pub callbacks: KlpStateCallbacks,
    /// `data`.
    pub data: *mut c_void,
}

/// `struct klp_patch`.
#[repr(C)]
#[derive(Debug)]
pub struct KlpPatch {
    /// `name`.
    pub name: *const c_char,
    /// `objs`.
    pub objs: *mut KlpObject,
    /// `states`.
    pub states: *mut KlpState,
    /// `replace`.
    pub replace: bool,
}

/// The symbol `KLP_PATCH()` defines: a pointer to the library's patch.
pub const PATCH_SYMBOL: &CStr = c"klp_patch_declaration";

/// Upper bounds that catch a missing terminator before reading far.
const MAX_OBJECTS: usize = 4096;
const MAX_FUNCS: usize = 1 << 20;
const MAX_STATES: usize = 4096;

/// Why a declared patch is malformed.
#[derive(Debug, thiserror::Error)]
pub enum AbiError {
    /// A pointer that must be set is NULL.
    #[error("{0} is NULL")]
    Null(String),
    /// A string is not UTF-8.
    #[error("{0} is not valid UTF-8")]
    NotUtf8(String),
    /// An array has no terminator within the bound.
    #[error("{what} has no terminating entry within {limit} entries")]
    Unterminated {
        /// The array.
        what: String,
        /// The bound.
        limit: usize,
    },
}

/// A function pointer as the core's opaque callback handle.
fn handle<F: Copy + Into<FnAddr>>(f: Option<F>) -> Option<CallbackId> {
    f.map(|f| f.into().0)
}

/// The address of a C function.
#[derive(Debug, Clone, Copy)]
pub struct FnAddr(pub CallbackId);

macro_rules! fn_addr {
    ($($t:ty),*) => {$(
        impl From<$t> for FnAddr {
            fn from(f: $t) -> Self {
                FnAddr(f as usize as CallbackId)
            }
        }
    )*};
}
fn_addr!(
    ObjectCallbackFn,
    ObjectVoidCallbackFn,
    StateCallbackFn,
    StateVoidCallbackFn
);

/// Reads a C string.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that stays valid.
unsafe fn c_str(p: *const c_char, what: &str) -> Result<Option<String>, AbiError> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-null and NUL-terminated by the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(|s| Some(s.to_string()))
        .map_err(|_| AbiError::NotUtf8(what.to_string()))
}

/// Translates a declared patch into the core's descriptor. `default_name`
/// is used when the patch has no `name`.
///
/// # Safety
/// `patch` points to a `struct klp_patch` laid out as in livepatch.h, whose
/// arrays and strings are valid and terminated (rule 1 and 2 of this
/// module), and stays valid for the call.
unsafe fn read_patch(patch: *const KlpPatch, default_name: &str) -> Result<PatchDesc, AbiError> {
    if patch.is_null() {
        return Err(AbiError::Null("the declared patch".into()));
    }
    // SAFETY: non-null, points to a klp_patch by the caller's contract.
    let p = unsafe { &*patch };
    // SAFETY: p.name is NULL or a C string of the library.
    let name = unsafe { c_str(p.name, "patch name") }?.unwrap_or_else(|| default_name.to_string());
    if p.objs.is_null() {
        return Err(AbiError::Null(format!("objs of patch '{name}'")));
    }
    let mut objs = Vec::new();
    for i in 0..=MAX_OBJECTS {
        if i == MAX_OBJECTS {
            return Err(AbiError::Unterminated {
                what: format!("objs of patch '{name}'"),
                limit: MAX_OBJECTS,
            });
        }
        // SAFETY: within the array: every entry before the terminator is an
        // object, and we stop at the terminator.
        let o = unsafe { &*p.objs.add(i) };
        if o.name.is_null() && o.funcs.is_null() {
            break;
        }
        // SAFETY: a C string of the library or NULL.
        let obj_name = unsafe { c_str(o.name, "object name") }?;
        let shown = obj_name
            .clone()
            .unwrap_or_else(|| livepatch_core::MAIN_OBJECT_NAME.into());
        if o.funcs.is_null() {
            return Err(AbiError::Null(format!(
                "funcs of object '{shown}' in patch '{name}'"
            )));
        }
        // SAFETY: non-null array of klp_func terminated by old_name == NULL.
        let funcs = unsafe { read_funcs(o.funcs, &shown) }?;
        // SAFETY: a C string of the library or NULL.
        let build_id = unsafe { c_str(o.build_id, "build_id") }?;
        objs.push(ObjectDesc {
            name: obj_name,
            funcs,
            build_id,
            callbacks: ObjectCallbacks {
                pre_patch: handle(o.callbacks.pre_patch),
                post_patch: handle(o.callbacks.post_patch),
                pre_unpatch: handle(o.callbacks.pre_unpatch),
                post_unpatch: handle(o.callbacks.post_unpatch),
            },
        });
    }
    let mut states = Vec::new();
    if !p.states.is_null() {
        for i in 0..=MAX_STATES {
            if i == MAX_STATES {
                return Err(AbiError::Unterminated {
                    what: format!("states of patch '{name}'"),
                    limit: MAX_STATES,
                });
            }
            // SAFETY: within the array, stopping at the id-0 terminator.
            let s = unsafe { &*p.states.add(i) };
            if s.id == 0 {
                break;
            }
            states.push(StateDesc {
                id: s.id,
                version: s.version,
                callbacks: StateCallbacks {
                    setup: handle(s.callbacks.setup),
                    enable: handle(s.callbacks.enable),
                    disable: handle(s.callbacks.disable),
                    release: handle(s.callbacks.release),
                },
            });
        }
    }
    Ok(PatchDesc {
        name,
        objs,
        states,
        replace: p.replace,
    })
}

/// # Safety
/// `funcs` is a valid array terminated by an entry whose `old_name` is NULL.
unsafe fn read_funcs(funcs: *const KlpFunc, object: &str) -> Result<Vec<FuncDesc>, AbiError> {
    let mut out = Vec::new();
    for i in 0..=MAX_FUNCS {
        if i == MAX_FUNCS {
            return Err(AbiError::Unterminated {
                what: format!("funcs of object '{object}'"),
                limit: MAX_FUNCS,
            });
        }
        // SAFETY: within the array, stopping at the terminator.
        let f = unsafe { &*funcs.add(i) };
        // SAFETY: a C string of the library or NULL.
        let Some(old_name) = (unsafe { c_str(f.old_name, "old_name") })? else {
            break;
        };
        out.push(FuncDesc {
            old_name,
            new_func: f.new_func as usize as u64,
            old_sympos: f.old_sympos,
        });
    }
    Ok(out)
}

/// A patch declaration that [`read_patch`] accepted, of a library that stays loaded while the
/// value lives (its owner keeps both together): its objects and states can be reached by
/// index without `unsafe`, bounds checked against what was read.
#[derive(Debug)]
pub struct Declaration {
    patch: std::ptr::NonNull<KlpPatch>,
    objects: usize,
    states: usize,
}

// SAFETY: the declaration is static data of a loaded library; the agent reads it and hands
// pointers into it to C callbacks, from whichever thread holds the agent's lock.
unsafe impl Send for Declaration {}

impl Declaration {
    /// Reads the declaration at `patch` (see [`read_patch`]).
    ///
    /// # Safety
    /// As [`read_patch`]; and the library that holds it stays loaded while the returned
    /// declaration lives.
    pub unsafe fn read(
        patch: std::ptr::NonNull<KlpPatch>,
        default_name: &str,
    ) -> Result<(Declaration, PatchDesc), AbiError> {
        // SAFETY: the caller's promise.
        let desc = unsafe { read_patch(patch.as_ptr(), default_name) }?;
        // SAFETY: read_patch accepted it, so the states array is terminated (or NULL).
        let states = unsafe { count_states(patch.as_ptr()) };
        let declaration = Declaration {
            patch,
            objects: desc.objs.len(),
            states,
        };
        Ok((declaration, desc))
    }

    /// The `struct klp_patch`.
    pub fn patch(&self) -> *mut KlpPatch {
        self.patch.as_ptr()
    }

    fn object_ref(&self, index: usize) -> Option<&KlpObject> {
        // SAFETY: the objects array holds `objects` entries before its terminator (read_patch
        // walked them) and stays mapped while `self` lives.
        (index < self.objects).then(|| unsafe { &*(*self.patch.as_ptr()).objs.add(index) })
    }

    fn state_ref(&self, index: usize) -> Option<&KlpState> {
        // SAFETY: as for objects, with the states array's `states` entries.
        (index < self.states).then(|| unsafe { &*(*self.patch.as_ptr()).states.add(index) })
    }

    /// The object at `index` of the descriptor's `objs`.
    pub fn object(&self, index: usize) -> Option<*mut KlpObject> {
        self.object_ref(index)
            .map(|o| std::ptr::from_ref(o).cast_mut())
    }

    /// The state at `index` of the descriptor's `states`.
    pub fn state(&self, index: usize) -> Option<*mut KlpState> {
        self.state_ref(index)
            .map(|s| std::ptr::from_ref(s).cast_mut())
    }

    /// The function the object at `index` declares for `kind`, as a core callback handle.
    pub fn object_callback(&self, index: usize, kind: ObjectCallbackKind) -> Option<CallbackId> {
        let c = &self.object_ref(index)?.callbacks;
        match kind {
            ObjectCallbackKind::PrePatch => handle(c.pre_patch),
            ObjectCallbackKind::PostPatch => handle(c.post_patch),
            ObjectCallbackKind::PreUnpatch => handle(c.pre_unpatch),
            ObjectCallbackKind::PostUnpatch => handle(c.post_unpatch),
        }
    }

    /// The function the state at `index` declares for `kind`, as a core callback handle.
    pub fn state_callback(&self, index: usize, kind: StateCallbackKind) -> Option<CallbackId> {
        let c = &self.state_ref(index)?.callbacks;
        match kind {
            StateCallbackKind::Setup => handle(c.setup),
            StateCallbackKind::Enable => handle(c.enable),
            StateCallbackKind::Disable => handle(c.disable),
            StateCallbackKind::Release => handle(c.release),
        }
    }

    /// Runs the object's `kind` callback, if it declares one: `pre_patch`'s result, 0 for the
    /// others and for a missing callback.
    pub fn call_object(&self, index: usize, kind: ObjectCallbackKind) -> i32 {
        let (Some(object), Some(callback)) =
            (self.object(index), self.object_callback(index, kind))
        else {
            return 0;
        };
        // SAFETY: the callback was read from this very object of a loaded declaration.
        unsafe { call_object(kind, callback, object) }
    }

    /// Runs the state's `kind` callback, if it declares one: `setup`'s result, 0 otherwise.
    pub fn call_state(&self, index: usize, kind: StateCallbackKind) -> i32 {
        let (Some(state), Some(callback)) = (self.state(index), self.state_callback(index, kind))
        else {
            return 0;
        };
        // SAFETY: the callback was read from this very state of a loaded declaration.
        unsafe { call_state(kind, callback, self.patch(), state) }
    }
}

/// How many states precede the id-0 terminator.
///
/// # Safety
/// As for [`read_patch`], which must have accepted `patch`.
unsafe fn count_states(patch: *const KlpPatch) -> usize {
    // SAFETY: the caller's promise.
    let states = unsafe { (*patch).states };
    if states.is_null() {
        return 0;
    }
    let mut n = 0;
    // SAFETY: within the array, stopping at the terminator read_patch found.
    while unsafe { (*states.add(n)).id } != 0 {
        n += 1;
    }
    n
}

/// Calls a per-object callback with its object; the result of `pre_patch`, 0 for the others.
///
/// # Safety
/// `callback` is the `kind` callback of `object`, which belongs to a loaded patch library.
unsafe fn call_object(
    kind: ObjectCallbackKind,
    callback: CallbackId,
    object: *mut KlpObject,
) -> i32 {
    let function = callback as usize;
    match kind {
        ObjectCallbackKind::PrePatch => {
            // SAFETY: the caller's promise: the handle is a pre_patch pointer.
            let f: ObjectCallbackFn = unsafe { std::mem::transmute(function) };
            // SAFETY: a C callback of the patch library, called as livepatch.h declares.
            unsafe { f(object) }
        }
        _ => {
            // SAFETY: the other object callbacks return nothing.
            let f: ObjectVoidCallbackFn = unsafe { std::mem::transmute(function) };
            // SAFETY: as above.
            unsafe { f(object) };
            0
        }
    }
}

/// Calls a per-state callback with its patch and state; the result of `setup`, 0 for the
/// others.
///
/// # Safety
/// `callback` is the `kind` callback of `state`, a state of `patch`, whose library is loaded.
unsafe fn call_state(
    kind: StateCallbackKind,
    callback: CallbackId,
    patch: *mut KlpPatch,
    state: *mut KlpState,
) -> i32 {
    let function = callback as usize;
    match kind {
        StateCallbackKind::Setup => {
            // SAFETY: the caller's promise: the handle is a setup pointer.
            let f: StateCallbackFn = unsafe { std::mem::transmute(function) };
            // SAFETY: a C callback of the patch library, called as livepatch.h declares.
            unsafe { f(patch, state) }
        }
        _ => {
            // SAFETY: the other state callbacks return nothing.
            let f: StateVoidCallbackFn = unsafe { std::mem::transmute(function) };
            // SAFETY: as above.
            unsafe { f(patch, state) };
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ptr::null_mut;

    unsafe extern "C" fn pre(_: *mut KlpObject) -> c_int {
        0
    }
    extern "C" fn new_f() {}

    #[test]
    fn reads_a_declared_patch() {
        let mut funcs = [
            KlpFunc {
                old_name: c"parse".as_ptr(),
                new_func: new_f as *mut c_void,
                old_sympos: 2,
            },
            KlpFunc {
                old_name: std::ptr::null(),
                new_func: null_mut(),
                old_sympos: 0,
            },
        ];
        let mut objs = [
            KlpObject {
                name: std::ptr::null(),
                funcs: funcs.as_mut_ptr(),
                callbacks: KlpCallbacks {
                    pre_patch: Some(pre),
                    post_patch: None,
                    pre_unpatch: None,
                    post_unpatch: None,
                    post_unpatch_enabled: false,
                },
                build_id: std::ptr::null(),
            },
            KlpObject {
                name: std::ptr::null(),
                funcs: null_mut(),
                callbacks: KlpCallbacks {
                    pre_patch: None,
                    post_patch: None,
                    pre_unpatch: None,
                    post_unpatch: None,
                    post_unpatch_enabled: false,
                },
                build_id: std::ptr::null(),
            },
        ];
        let patch = KlpPatch {
            name: std::ptr::null(),
            objs: objs.as_mut_ptr(),
            states: null_mut(),
            replace: true,
        };
        // SAFETY: the structures above are laid out as livepatch.h says.
        let desc = unsafe { read_patch(&patch, "fix") }.unwrap();
        assert_eq!(desc.name, "fix");
        assert!(desc.replace);
        assert_eq!(desc.objs.len(), 1);
        assert_eq!(desc.objs[0].funcs[0].old_name, "parse");
        assert_eq!(desc.objs[0].funcs[0].old_sympos, 2);
        assert_eq!(
            desc.objs[0].funcs[0].new_func,
            new_f as *const () as usize as u64
        );
        assert_eq!(
            desc.objs[0].callbacks.pre_patch,
            Some(pre as *const () as usize as u64)
        );
    }

    #[test]
    fn refuses_null_funcs() {
        let mut objs = [KlpObject {
            name: c"libz.so.1".as_ptr(),
            funcs: null_mut(),
            callbacks: KlpCallbacks {
                pre_patch: None,
                post_patch: None,
                pre_unpatch: None,
                post_unpatch: None,
                post_unpatch_enabled: false,
            },
            build_id: std::ptr::null(),
        }];
        let patch = KlpPatch {
            name: c"p".as_ptr(),
            objs: objs.as_mut_ptr(),
            states: null_mut(),
            replace: false,
        };
        // SAFETY: valid structures; the object is malformed on purpose.
        let err = unsafe { read_patch(&patch, "p") }.unwrap_err();
        assert_eq!(
            err.to_string(),
            "funcs of object 'libz.so.1' in patch 'p' is NULL"
        );
    }
}
