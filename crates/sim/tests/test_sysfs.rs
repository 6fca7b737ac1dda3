//! Port of tools/testing/selftests/livepatch/test-sysfs.sh, and the write
//! errors of the attributes.
//! See: reference/kernel-livepatch.md §8.6 (tests 24 to 28), §4.7 and §8.9.

mod common;

use std::cell::Cell;
use std::rc::Rc;

use common::{cdp_vml, cdu_vml, coming, going, ins_p, lines, one};
use livepatch_core::Errno;
use livepatch_sim::Sim;
use livepatch_sim::modules::*;

/// `stat -c %A` of an attribute (`check_sysfs_rights`).
fn rights(sim: &Sim, path: &str) -> String {
    let entry = sim
        .core
        .sysfs_entries()
        .into_iter()
        .find(|e| e.path == path)
        .unwrap_or_else(|| panic!("no sysfs entry {path}"));
    let mut s = String::from(if entry.is_dir { "d" } else { "-" });
    for shift in [6, 3, 0] {
        let bits = (entry.mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

/// `cat` of an attribute (`check_sysfs_value`), without the newline.
fn value(sim: &Sim, path: &str) -> String {
    let v = sim
        .sysfs_read(path)
        .unwrap_or_else(|e| panic!("reading {path} failed: {e}"));
    v.strip_suffix('\n')
        .unwrap_or_else(|| panic!("{path} reads {v:?}, without a newline"))
        .to_string()
}

/// Test 24, "sysfs test".
#[test]
fn sysfs_test() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let lp = livepatch(&k, &mut sim.world);

    sim.load_lp(&lp, "");
    assert_eq!(rights(&sim, LP), "drwxr-xr-x");
    assert_eq!(rights(&sim, &format!("{LP}/enabled")), "-rw-r--r--");
    assert_eq!(value(&sim, &format!("{LP}/enabled")), "1");
    assert_eq!(rights(&sim, &format!("{LP}/force")), "--w-------");
    assert_eq!(rights(&sim, &format!("{LP}/replace")), "-r--r--r--");
    assert_eq!(value(&sim, &format!("{LP}/replace")), "0");
    assert_eq!(rights(&sim, &format!("{LP}/transition")), "-r--r--r--");
    assert_eq!(value(&sim, &format!("{LP}/transition")), "0");
    assert_eq!(rights(&sim, &format!("{LP}/stack_order")), "-r--r--r--");
    assert_eq!(value(&sim, &format!("{LP}/stack_order")), "1");
    assert_eq!(rights(&sim, &format!("{LP}/vmlinux")), "drwxr-xr-x");
    assert_eq!(rights(&sim, &format!("{LP}/vmlinux/patched")), "-r--r--r--");
    assert_eq!(value(&sim, &format!("{LP}/vmlinux/patched")), "1");
    // The func directory, named "<old_name>,<sympos or 1>", has no
    // attributes.
    let func_dir = format!("{LP}/vmlinux/cmdline_proc_show,1");
    assert_eq!(rights(&sim, &func_dir), "drwxr-xr-x");
    assert!(
        sim.core
            .sysfs_entries()
            .iter()
            .all(|e| !e.path.starts_with(&format!("{func_dir}/")))
    );
    sim.disable_lp(LP);
    sim.unload_lp(LP);
    assert_eq!(sim.sysfs_read(&format!("{LP}/enabled")), Err(Errno::ENOENT));
    assert!(sim.core.sysfs_entries().is_empty());

    assert_transcript(
        &sim.transcript(),
        &lines(&[ins_p(LP, ""), u_block(LP), one(&rmmod(LP))]),
    );
}

/// Test 25, "sysfs test object/patched": follows the target module.
#[test]
fn sysfs_test_object_patched() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let cd = callbacks_demo(&k, &mut sim.world, Rc::new(Cell::new(0)));
    let patched = format!("{CD}/{MOD}/patched");

    sim.load_lp(&cd, "");
    // The object directory exists though the module is not loaded.
    assert_eq!(rights(&sim, &format!("{CD}/{MOD}")), "drwxr-xr-x");
    assert_eq!(value(&sim, &patched), "0");
    sim.load_mod(callbacks_mod(), "");
    assert_eq!(value(&sim, &patched), "1");
    sim.unload_mod(MOD);
    assert_eq!(value(&sim, &patched), "0");
    sim.disable_lp(CD);
    sim.unload_lp(CD);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            one(&insmod(CD, "")),
            cdp_vml(CD),
            coming(),
            going(),
            cdu_vml(CD),
            one(&rmmod(CD)),
        ]),
    );
}

/// Test 26, "sysfs test replace enabled".
#[test]
fn sysfs_test_replace_enabled() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let ar = atomic_replace(&k, &mut sim.world, true);

    sim.load_lp(&ar, "replace=1");
    assert_eq!(rights(&sim, &format!("{AR}/replace")), "-r--r--r--");
    assert_eq!(value(&sim, &format!("{AR}/replace")), "1");
    sim.disable_lp(AR);
    sim.unload_lp(AR);

    assert_transcript(
        &sim.transcript(),
        &lines(&[ins_p(AR, "replace=1"), u_block(AR), one(&rmmod(AR))]),
    );
}

/// Test 27, "sysfs test replace disabled".
#[test]
fn sysfs_test_replace_disabled() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let ar = atomic_replace(&k, &mut sim.world, false);

    sim.load_lp(&ar, "replace=0");
    assert_eq!(rights(&sim, &format!("{AR}/replace")), "-r--r--r--");
    assert_eq!(value(&sim, &format!("{AR}/replace")), "0");
    sim.disable_lp(AR);
    sim.unload_lp(AR);

    assert_transcript(
        &sim.transcript(),
        &lines(&[ins_p(AR, "replace=0"), u_block(AR), one(&rmmod(AR))]),
    );
}

/// Test 28, "sysfs test stack_order value": positions renumber when an
/// earlier patch goes away.
#[test]
fn sysfs_test_stack_order_value() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let lp = livepatch(&k, &mut sim.world);
    let cd = callbacks_demo(&k, &mut sim.world, Rc::new(Cell::new(0)));
    let sc = syscall(&k, &mut sim.world);
    let order = |sim: &Sim, p: &str| value(sim, &format!("{p}/stack_order"));

    sim.load_lp(&lp, "");
    assert_eq!(order(&sim, LP), "1");
    sim.load_lp(&cd, "");
    assert_eq!(order(&sim, CD), "2");
    sim.load_lp(&sc, "");
    assert_eq!(order(&sim, SC), "3");
    sim.disable_lp(CD);
    sim.unload_lp(CD);
    assert_eq!(order(&sim, LP), "1");
    assert_eq!(order(&sim, SC), "2");
    sim.disable_lp(SC);
    sim.unload_lp(SC);
    sim.disable_lp(LP);
    sim.unload_lp(LP);

    assert_transcript(
        &sim.transcript(),
        &lines(&[
            ins_p(LP, ""),
            one(&insmod(CD, "")),
            cdp_vml(CD),
            ins_p(SC, ""),
            cdu_vml(CD),
            one(&rmmod(CD)),
            u_block(SC),
            one(&rmmod(SC)),
            u_block(LP),
            one(&rmmod(LP)),
        ]),
    );
}

/// §4.7: `stack_order` counts the patch in transition, and `enabled` reads
/// 1 during a patching and 0 during an unpatching transition; `transition`
/// reads 1 only for the patch in transition.
#[test]
fn sysfs_values_during_transitions() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let lp = livepatch(&k, &mut sim.world);
    let cd = callbacks_demo(&k, &mut sim.world, Rc::new(Cell::new(0)));

    sim.load_lp(&lp, "");
    sim.load_mod(
        callbacks_busy(Rc::new(Cell::new(true))),
        "block_transition=Y",
    );
    sim.load_lp_nowait(&cd, "");
    assert_eq!(value(&sim, &format!("{CD}/transition")), "1");
    assert_eq!(value(&sim, &format!("{CD}/enabled")), "1");
    assert_eq!(value(&sim, &format!("{CD}/stack_order")), "2");
    assert_eq!(value(&sim, &format!("{LP}/transition")), "0");
    sim.sysfs_write(&format!("{CD}/enabled"), "0").unwrap();
    assert_eq!(value(&sim, &format!("{CD}/transition")), "1");
    assert_eq!(value(&sim, &format!("{CD}/enabled")), "0");
    assert!(sim.settle());
    assert!(!sim.core.has_patch(CD));
    assert_eq!(value(&sim, &format!("{LP}/stack_order")), "1");
    sim.unload_mod(BUSY);
    sim.disable_lp(LP);
}

/// Write errors of the attributes (§4.7): the same value again, a value
/// `kstrtobool` refuses, `force` outside a transition, read-only and
/// write-only attributes, and missing paths. None of them changes anything
/// or prints a kernel line.
#[test]
fn sysfs_write_errors() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let lp = livepatch(&k, &mut sim.world);

    sim.load_lp(&lp, "");
    let before = sim.transcript().len();
    let enabled = format!("{LP}/enabled");
    // The same value again.
    assert_eq!(sim.sysfs_write(&enabled, "1"), Err(Errno::EINVAL));
    assert_eq!(sim.sysfs_write(&enabled, "Y"), Err(Errno::EINVAL));
    assert_eq!(sim.sysfs_write(&enabled, "on"), Err(Errno::EINVAL));
    // Not a boolean.
    assert_eq!(sim.sysfs_write(&enabled, "2"), Err(Errno::EINVAL));
    assert_eq!(sim.sysfs_write(&enabled, "x"), Err(Errno::EINVAL));
    assert_eq!(sim.sysfs_write(&enabled, ""), Err(Errno::EINVAL));
    // force: a true value needs the patch to be in transition; a false
    // value is accepted and does nothing.
    assert_eq!(sim.force(LP), Err(Errno::EINVAL));
    assert_eq!(sim.sysfs_write(&format!("{LP}/force"), "0"), Ok(()));
    assert_eq!(
        sim.sysfs_write(&format!("{LP}/force"), "z"),
        Err(Errno::EINVAL)
    );
    // Read-only attributes and directories.
    for ro in ["transition", "replace", "stack_order", "vmlinux/patched"] {
        assert_eq!(
            sim.sysfs_write_quiet(&format!("{LP}/{ro}"), "1"),
            Err(Errno::EACCES),
            "{ro}"
        );
    }
    // force is write-only.
    assert_eq!(sim.sysfs_read(&format!("{LP}/force")), Err(Errno::EACCES));
    // Missing paths.
    assert_eq!(sim.sysfs_read("no_such_patch/enabled"), Err(Errno::ENOENT));
    assert_eq!(
        sim.sysfs_write_quiet("no_such_patch/enabled", "0"),
        Err(Errno::ENOENT)
    );
    assert_eq!(sim.sysfs_read(&format!("{LP}/nothing")), Err(Errno::ENOENT));
    assert_eq!(
        sim.sysfs_read(&format!("{LP}/vmlinux/nothing")),
        Err(Errno::ENOENT)
    );
    assert_eq!(
        sim.sysfs_write_quiet(&format!("{LP}/nothing"), "1"),
        Err(Errno::ENOENT)
    );

    // Nothing changed and the kernel printed nothing: only the commands.
    assert_eq!(value(&sim, &enabled), "1");
    assert!(sim.core.transition().is_none());
    assert!(
        sim.transcript()[before..]
            .iter()
            .all(|l| l.starts_with("% echo ")),
        "{:?}",
        &sim.transcript()[before..]
    );
    assert_eq!(
        k.read(&mut sim.world, "cmdline_proc_show"),
        format!("{LP}: this has been live patched")
    );
    sim.disable_lp(LP);
    sim.unload_lp(LP);
}

/// §8.9 "enabled with the same value": writing 0 during the patch's own
/// unpatching transition is the same value too.
#[test]
fn sysfs_enabled_same_value_during_unpatching() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let lp = livepatch(&k, &mut sim.world);
    sim.load_lp(&lp, "");
    let sleeper = sim.world.spawn("sleeper");
    let f = sim.world.func_addr(None, "cmdline_proc_show", 0);
    sim.world.call(sleeper, f);
    sim.sysfs_write(&format!("{LP}/enabled"), "0").unwrap();
    assert_eq!(
        sim.sysfs_write(&format!("{LP}/enabled"), "0"),
        Err(Errno::EINVAL)
    );
    assert_eq!(sim.core.transition().map(|t| t.0), Some(LP));
    sim.world.ret(sleeper);
    assert!(sim.settle());
    assert!(!sim.core.has_patch(LP));
}

/// §8.9 "disable while another patch is in transition": `EBUSY`, and
/// nothing starts.
#[test]
fn sysfs_disable_while_another_patch_in_transition() {
    let mut sim = Sim::default();
    let k = boot(&mut sim);
    let lp = livepatch(&k, &mut sim.world);
    let cd = callbacks_demo(&k, &mut sim.world, Rc::new(Cell::new(0)));

    sim.load_lp(&lp, "");
    sim.load_mod(
        callbacks_busy(Rc::new(Cell::new(true))),
        "block_transition=Y",
    );
    sim.load_lp_nowait(&cd, "");
    let before = sim.transcript().len();
    assert_eq!(
        sim.sysfs_write(&format!("{LP}/enabled"), "0"),
        Err(Errno::EBUSY)
    );
    assert_eq!(
        sim.transcript()[before..].to_vec(),
        vec![format!("% echo 0 > /sys/kernel/livepatch/{LP}/enabled")]
    );
    assert_eq!(value(&sim, &format!("{LP}/enabled")), "1");
    assert_eq!(sim.core.transition().map(|t| t.0), Some(CD));
    // Once the transition is over, the disable works.
    sim.disable_lp(CD);
    sim.disable_lp(LP);
    sim.unload_mod(BUSY);
}
