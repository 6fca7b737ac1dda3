//! The C ABI of `include/livepatch.h`: the structures a patch library
//! declares, and their translation into the core's descriptors.
//!
//! Safety model of this module:
//! 1. A `klp_patch` pointer comes from `dlsym` of a library this agent
//!    loaded and keeps loaded; its memory lives as long as the library.
//! 2. Arrays are read only up to their terminator, and only through the
//!    layout the header defines (`#[repr(C)]` mirrors below).
//! 3. Strings are NUL-terminated C strings; invalid UTF-8 is refused with an
//!    error, never read past the terminator.
//! 4. Nothing here calls into the patch library.

use std::ffi::{CStr, c_char, c_int, c_ulong, c_void};

use livepatch_core::{
    CallbackId, FuncDesc, ObjectCallbacks, ObjectDesc, PatchDesc, StateCallbacks, StateDesc,
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
    /// A `build_id` is not hex.
    #[error("build_id of object '{object}' is {text:?}, not a build id in hex")]
    BadBuildId {
        /// The object.
        object: String,
        /// What the patch wrote.
        text: String,
    },
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
pub unsafe fn read_patch(
    patch: *const KlpPatch,
    default_name: &str,
) -> Result<PatchDesc, AbiError> {
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
        objs.push(ObjectDesc {
            name: obj_name,
            funcs,
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

/// An object of a patch that names the build id it was written for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildIdRequirement {
    /// The object's name (`vmlinux` for the main executable).
    pub object: String,
    /// The build id in lower-case hex.
    pub build_id: String,
}

/// The build ids a declared patch requires of its objects.
///
/// # Safety
/// As for [`read_patch`], which must have accepted `patch` (so its arrays are terminated).
pub unsafe fn read_build_ids(patch: *const KlpPatch) -> Result<Vec<BuildIdRequirement>, AbiError> {
    let mut out = Vec::new();
    // SAFETY: non-null and valid, as read_patch checked.
    let objs = unsafe { (*patch).objs };
    for i in 0..MAX_OBJECTS {
        // SAFETY: within the array, stopping at the terminator read_patch found.
        let o = unsafe { &*objs.add(i) };
        if o.name.is_null() && o.funcs.is_null() {
            break;
        }
        // SAFETY: C strings of the library or NULL.
        let (Some(text), name) = (unsafe { c_str(o.build_id, "build_id") }?, unsafe {
            c_str(o.name, "object name")
        }?) else {
            continue;
        };
        let object = name.unwrap_or_else(|| livepatch_core::MAIN_OBJECT_NAME.into());
        let build_id = text.trim().to_ascii_lowercase();
        if build_id.is_empty()
            || build_id.len() % 2 != 0
            || !build_id.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(AbiError::BadBuildId { object, text });
        }
        out.push(BuildIdRequirement { object, build_id });
    }
    Ok(out)
}

/// The object at `index` of a declared patch.
///
/// # Safety
/// As for [`read_patch`]; `index` is below the object count it returned.
pub unsafe fn object_ptr(patch: *const KlpPatch, index: usize) -> *mut KlpObject {
    // SAFETY: the caller guarantees the patch and the index are valid.
    unsafe { (*patch).objs.add(index) }
}

/// The state at `index` of a declared patch.
///
/// # Safety
/// As for [`read_patch`]; `index` is below the state count it returned.
pub unsafe fn state_ptr(patch: *const KlpPatch, index: usize) -> *mut KlpState {
    // SAFETY: the caller guarantees the patch and the index are valid.
    unsafe { (*patch).states.add(index) }
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
