//! The functions `include/livepatch.h` declares, exported for patch code: shadow variables,
//! system states, the switch point and the log.
//!
//! Safety model of this module:
//! 1. Pointers from C are used only as the header documents: `obj` of a shadow variable is a
//!    key and never dereferenced; `ctor_data` is only passed back to the constructor; `patch`
//!    of `klp_get_state` must be a patch the caller declared; `line` a C string.
//! 2. Constructors and destructors are called with the data block the shadow table owns,
//!    valid for the call.

use std::ffi::{CStr, c_char, c_int, c_ulong, c_void};

use livepatch_core::ShadowData;

use super::descriptor::{KlpPatch, KlpState};

/// `klp_shadow_ctor_t`.
pub type ShadowCtorFn = unsafe extern "C" fn(*mut c_void, *mut c_void, *mut c_void) -> c_int;
/// `klp_shadow_dtor_t`.
pub type ShadowDtorFn = unsafe extern "C" fn(*mut c_void, *mut c_void);

fn ptr_or_null(p: Option<std::ptr::NonNull<u8>>) -> *mut c_void {
    p.map_or(std::ptr::null_mut(), |p| p.as_ptr().cast())
}

/// `klp_shadow_get`.
#[unsafe(no_mangle)]
pub extern "C" fn klp_shadow_get(obj: *mut c_void, id: c_ulong) -> *mut c_void {
    let Some(agent) = crate::current_agent() else {
        return std::ptr::null_mut();
    };
    ptr_or_null(agent.shadow().get(obj as usize, id))
}

fn alloc(
    obj: *mut c_void,
    id: c_ulong,
    size: usize,
    ctor: Option<ShadowCtorFn>,
    ctor_data: *mut c_void,
    get_or_alloc: bool,
) -> *mut c_void {
    let Some(agent) = crate::current_agent() else {
        return std::ptr::null_mut();
    };
    let mut call = |o: usize, data: ShadowData<'_>| -> i32 {
        match ctor {
            // SAFETY: the constructor gets the object key, the new block and
            // the caller's data, as the header documents (rules 1 and 2).
            Some(f) => unsafe { f(o as *mut c_void, data.as_ptr().cast(), ctor_data) },
            None => 0,
        }
    };
    let ctor_ref: Option<livepatch_core::shadow::ShadowCtor<'_>> = ctor.map(|_| &mut call as _);
    let shadow = agent.shadow();
    ptr_or_null(if get_or_alloc {
        shadow.get_or_alloc(obj as usize, id, size, ctor_ref)
    } else {
        shadow.alloc(obj as usize, id, size, ctor_ref)
    })
}

/// `klp_shadow_alloc`.
#[unsafe(no_mangle)]
pub extern "C" fn klp_shadow_alloc(
    obj: *mut c_void,
    id: c_ulong,
    size: usize,
    _gfp_flags: u32,
    ctor: Option<ShadowCtorFn>,
    ctor_data: *mut c_void,
) -> *mut c_void {
    alloc(obj, id, size, ctor, ctor_data, false)
}

/// `klp_shadow_get_or_alloc`.
#[unsafe(no_mangle)]
pub extern "C" fn klp_shadow_get_or_alloc(
    obj: *mut c_void,
    id: c_ulong,
    size: usize,
    _gfp_flags: u32,
    ctor: Option<ShadowCtorFn>,
    ctor_data: *mut c_void,
) -> *mut c_void {
    alloc(obj, id, size, ctor, ctor_data, true)
}

fn dtor_call(dtor: Option<ShadowDtorFn>) -> impl FnMut(usize, ShadowData<'_>) {
    move |o, data| {
        if let Some(f) = dtor {
            // SAFETY: the destructor gets the object key and the block about
            // to be freed (rules 1 and 2).
            unsafe { f(o as *mut c_void, data.as_ptr().cast()) }
        }
    }
}

/// `klp_shadow_free`.
#[unsafe(no_mangle)]
pub extern "C" fn klp_shadow_free(obj: *mut c_void, id: c_ulong, dtor: Option<ShadowDtorFn>) {
    let Some(agent) = crate::current_agent() else {
        return;
    };
    let mut call = dtor_call(dtor);
    agent
        .shadow()
        .free(obj as usize, id, dtor.map(|_| &mut call as _));
}

/// `klp_shadow_free_all`.
#[unsafe(no_mangle)]
pub extern "C" fn klp_shadow_free_all(id: c_ulong, dtor: Option<ShadowDtorFn>) {
    let Some(agent) = crate::current_agent() else {
        return;
    };
    let mut call = dtor_call(dtor);
    agent.shadow().free_all(id, dtor.map(|_| &mut call as _));
}

/// `klp_get_state`: the state `id` of `patch`, or NULL.
///
/// # Safety
/// `patch` is a `struct klp_patch` the caller declared (rule 1).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_get_state(patch: *mut KlpPatch, id: c_ulong) -> *mut KlpState {
    if patch.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: a declared patch; its states array is terminated by id 0.
    let states = unsafe { (*patch).states };
    if states.is_null() {
        return std::ptr::null_mut();
    }
    let mut i = 0;
    loop {
        // SAFETY: within the array, stopping at the terminator.
        let s = unsafe { states.add(i) };
        // SAFETY: `s` points into the declared array.
        let sid = unsafe { (*s).id };
        if sid == 0 {
            return std::ptr::null_mut();
        }
        if sid == id {
            return s;
        }
        i += 1;
    }
}

/// `klp_get_prev_state`: the state `id` of the newest patch enabled before
/// the one in transition, or NULL (with a warning outside a transition).
#[unsafe(no_mangle)]
pub extern "C" fn klp_get_prev_state(id: c_ulong) -> *mut KlpState {
    crate::current_agent()
        .and_then(|agent| agent.prev_state(id))
        .unwrap_or(std::ptr::null_mut())
}

/// `klp_update_patch_state`: a switch point for the calling thread.
#[unsafe(no_mangle)]
pub extern "C" fn klp_update_patch_state() {
    crate::threads::update_patch_state();
}

/// `klp_log_line`: one line of patch code into the agent's log.
///
/// # Safety
/// `line` is NULL or a NUL-terminated string (rule 1).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_log_line(line: *const c_char) {
    if line.is_null() {
        return;
    }
    let Some(agent) = crate::current_agent() else {
        return;
    };
    // SAFETY: a NUL-terminated string by the caller's contract.
    let text = unsafe { CStr::from_ptr(line) }.to_string_lossy();
    agent.log().patch_line(text.trim_end_matches('\n'));
}
