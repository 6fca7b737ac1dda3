//! Calling the callbacks a patch library declares, as `livepatch.h` types them.
//!
//! Safety model of this module: a callback handle is the address of a function read from the
//! `struct klp_callbacks` or `struct klp_state_callbacks` of a patch whose library is loaded
//! (the core hands back exactly the handles the descriptor gave it), and it is called with the
//! object or state of that same declaration, as the header declares its type.

use livepatch_core::{CallbackId, ObjectCallbackKind, StateCallbackKind};

use super::descriptor::{
    KlpObject, KlpPatch, KlpState, ObjectCallbackFn, ObjectVoidCallbackFn, StateCallbackFn,
    StateVoidCallbackFn,
};

/// Calls a per-object callback with its object; the result of `pre_patch`, 0 for the others.
///
/// # Safety
/// `callback` is the `kind` callback of `object`, which belongs to a loaded patch library.
pub unsafe fn call_object(
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
pub unsafe fn call_state(
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
