//! Helpers shared by the scenario tests: the expected-output building blocks
//! of reference/kernel-livepatch.md §8 and small patch builders for the
//! scenarios that have no kernel selftest module.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use livepatch_core::{FuncDesc, ObjectDesc, PatchDesc};
use livepatch_sim::World;
use livepatch_sim::modules::*;

/// Concatenates expected blocks.
pub fn lines(parts: &[Vec<String>]) -> Vec<String> {
    parts.concat()
}

/// One expected line as a block.
pub fn one(s: &str) -> Vec<String> {
    vec![s.to_string()]
}

/// `CDP_vml` (§8.2) for patch `x` (`test_klp_callbacks_demo` or
/// `test_klp_callbacks_demo2`): enabling it with only vmlinux loaded.
pub fn cdp_vml(x: &str) -> Vec<String> {
    vec![
        format!("livepatch: enabling patch '{x}'"),
        format!("livepatch: '{x}': initializing patching transition"),
        format!("{x}: pre_patch_callback: vmlinux"),
        format!("livepatch: '{x}': starting patching transition"),
        format!("livepatch: '{x}': completing patching transition"),
        format!("{x}: post_patch_callback: vmlinux"),
        format!("livepatch: '{x}': patching complete"),
    ]
}

/// `CDU_vml` (§8.2) for patch `x`: disabling it with only vmlinux loaded,
/// the `echo` command included.
pub fn cdu_vml(x: &str) -> Vec<String> {
    vec![
        format!("% echo 0 > /sys/kernel/livepatch/{x}/enabled"),
        format!("livepatch: '{x}': initializing unpatching transition"),
        format!("{x}: pre_unpatch_callback: vmlinux"),
        format!("livepatch: '{x}': starting unpatching transition"),
        format!("livepatch: '{x}': completing unpatching transition"),
        format!("{x}: post_unpatch_callback: vmlinux"),
        format!("livepatch: '{x}': unpatching complete"),
    ]
}

/// `COMING` (§8.2): `test_klp_callbacks_mod` loads while
/// `test_klp_callbacks_demo` is enabled and not in transition.
pub fn coming() -> Vec<String> {
    vec![
        insmod(MOD, ""),
        format!("livepatch: applying patch '{CD}' to loading module '{MOD}'"),
        format!(
            "{CD}: pre_patch_callback: {MOD} -> [MODULE_STATE_COMING] Full formed, running module_init"
        ),
        format!(
            "{CD}: post_patch_callback: {MOD} -> [MODULE_STATE_COMING] Full formed, running module_init"
        ),
        format!("{MOD}: {MOD}_init"),
    ]
}

/// `GOING` (§8.2): `test_klp_callbacks_mod` unloads while
/// `test_klp_callbacks_demo` is enabled and not in transition.
pub fn going() -> Vec<String> {
    vec![
        rmmod(MOD),
        format!("{MOD}: {MOD}_exit"),
        format!("{CD}: pre_unpatch_callback: {MOD} -> [MODULE_STATE_GOING] Going away"),
        format!("livepatch: reverting patch '{CD}' on unloading module '{MOD}'"),
        format!("{CD}: post_unpatch_callback: {MOD} -> [MODULE_STATE_GOING] Going away"),
    ]
}

/// The `P(X)` block preceded by its `insmod` line.
pub fn ins_p(x: &str, args: &str) -> Vec<String> {
    lines(&[one(&insmod(x, args)), p_block(x)])
}

/// A patch `name` without callbacks that replaces `func` of the kernel image
/// with a function printing `text` (what [`Kernel::read`] returns).
pub fn text_patch(
    k: &Kernel,
    world: &mut World,
    name: &str,
    func: &str,
    text: &str,
    replace: bool,
) -> PatchDesc {
    let new_func = world.add_replacement(name, &format!("{name}_{func}"));
    k.data
        .borrow_mut()
        .outputs
        .insert(new_func, text.to_string());
    PatchDesc {
        name: name.into(),
        objs: vec![ObjectDesc {
            name: None,
            funcs: vec![FuncDesc {
                old_name: func.into(),
                new_func,
                old_sympos: 0,
            }],
            ..Default::default()
        }],
        replace,
        ..Default::default()
    }
}

/// The output of `livepatch_<...>` replacements made by [`text_patch`].
pub fn patched_text(name: &str) -> String {
    format!("{name}: this has been live patched")
}
