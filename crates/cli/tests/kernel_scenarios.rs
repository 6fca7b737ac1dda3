//! The kernel's livepatch selftest scenarios that make sense for a process, on real programs:
//! stacked patches, atomic replace, callbacks of libraries loaded before and after a patch,
//! shadow variables (the kernel's shadow-fix samples) and system states. Each test compares the
//! agent's log with the lines the kernel prints for the same scenario
//! (reference/kernel-livepatch.md §8; the simulator's transcripts in crates/sim/tests).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{BUSY_SERVICE, Target, cli, compile, examples, status_json, stderr, stdout};

/// The agent's signals interrupt `poll()` (a handler runs, so it is not restarted), and the
/// example programs then run one more iteration of their loop: an extra line, and for
/// shadow-host an extra object. The tests link this wrapper in, so that every line a program
/// prints answers exactly one command of the test.
const RESTARTING_POLL: &str = r#"
#include <errno.h>
#include <poll.h>
int __real_poll(struct pollfd *fds, nfds_t nfds, int timeout);
int __wrap_poll(struct pollfd *fds, nfds_t nfds, int timeout)
{
    int r;
    do
        r = __real_poll(fds, nfds, timeout);
    while (r < 0 && errno == EINTR);
    return r;
}
"#;

/// examples/programs/NAME.c built as examples/build.sh builds it, with [`RESTARTING_POLL`], and
/// with patchable function entries if `patchable_entries`.
fn example_program(name: &str, patchable_entries: bool) -> PathBuf {
    let dir = support::scratch();
    let wrapper = dir.join("restarting-poll.c");
    std::fs::write(&wrapper, RESTARTING_POLL).unwrap();
    let out = dir.join(format!("{name}-restarting-poll"));
    let mut cc = Command::new("cc");
    cc.args(["-O2", "-g", "-rdynamic", "-Wl,--wrap=poll", "-o"])
        .arg(&out)
        .arg(Path::new(support::WORKSPACE).join(format!("examples/programs/{name}.c")))
        .arg(&wrapper)
        .arg("-ldl");
    if patchable_entries {
        cc.arg("-fpatchable-function-entry=16,14");
    }
    assert!(cc.status().expect("cc runs").success(), "building {name}");
    out
}

/// The agent's log as dmesg shows it in the kernel selftests: the core's lines and the lines
/// patch code writes with `klp_log`, in the order they were written. It is read from the agent's
/// ring rather than from the target's stderr so that lines with and without the `livepatch: `
/// prefix keep their relative order. The per-thread lines of `klp_try_switch_task` are left out,
/// as the selftests switch them off.
fn dmesg(pid: &str) -> Vec<String> {
    let log = cli(&["log", pid]);
    assert!(log.status.success(), "{}", stderr(&log));
    stdout(&log)
        .lines()
        .filter(|l| !l.contains("klp_try_switch_task: "))
        .map(String::from)
        .collect()
}

/// `P(X)` of the selftests: enabling a patch without callbacks.
fn patching(patch: &str) -> Vec<String> {
    vec![
        format!("livepatch: enabling patch '{patch}'"),
        format!("livepatch: '{patch}': initializing patching transition"),
        format!("livepatch: '{patch}': starting patching transition"),
        format!("livepatch: '{patch}': completing patching transition"),
        format!("livepatch: '{patch}': patching complete"),
    ]
}

/// `U(X)` of the selftests without the `echo` line: disabling a patch without callbacks.
fn unpatching(patch: &str) -> Vec<String> {
    vec![
        format!("livepatch: '{patch}': initializing unpatching transition"),
        format!("livepatch: '{patch}': starting unpatching transition"),
        format!("livepatch: '{patch}': completing unpatching transition"),
        format!("livepatch: '{patch}': unpatching complete"),
    ]
}

/// How long a transition of these idle programs may take; it completes at the first attempt
/// unless something is wrong, and a failing test should not hang for the CLI's default minute.
const TRANSITION_TIMEOUT: &str = "5";

fn load(pid: &str, library: &Path) {
    let load = cli(&[
        "load",
        pid,
        library.to_str().unwrap(),
        "--timeout",
        TRANSITION_TIMEOUT,
    ]);
    assert!(load.status.success(), "{}", stderr(&load));
}

fn disable(pid: &str, patch: &str) {
    let disable = cli(&["disable", pid, patch, "--timeout", TRANSITION_TIMEOUT]);
    assert!(disable.status.success(), "{}", stderr(&disable));
}

fn unload(pid: &str, patch: &str) {
    let unload = cli(&["unload", pid, patch]);
    assert!(unload.status.success(), "{}", stderr(&unload));
}

fn patch_names(status: &serde_json::Value) -> Vec<&str> {
    status["patches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect()
}

fn unloadable_names(status: &serde_json::Value) -> Vec<&str> {
    status["unloadable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["patch"].as_str().unwrap())
        .collect()
}

// Stacked patches and atomic replace, on examples/programs/greeter.c.

/// A greeter that prints only when told to, so that every line answers one command.
fn start_greeter() -> Target {
    let greeter = example_program("greeter", false);
    let mut target = Target::start_with(&greeter, &["600000"], "greeter: pid");
    assert_eq!(
        greeting_line(&mut target),
        "hello from the original greeting"
    );
    target
}

/// The text of the greeter's next "greeter: N: TEXT" line.
fn greeting_line(target: &mut Target) -> String {
    let line = target.expect("greeter: ");
    let tick = line.strip_prefix("greeter: ").unwrap();
    match tick.split_once(": ") {
        Some((n, text)) if n.parse::<u64>().is_ok() => text.to_string(),
        _ => panic!("not a greeting: {line}"),
    }
}

/// What `greeting()` returns now.
fn greeting(target: &mut Target) -> String {
    target.send("greet");
    greeting_line(target)
}

/// What `farewell()` writes now.
fn farewell(target: &mut Target) -> String {
    target.send("bye");
    let line = target.expect("greeter: ");
    greeting_line(target);
    line.strip_prefix("greeter: ").unwrap().to_string()
}

const ORIGINAL_GREETING: &str = "hello from the original greeting";
const ORIGINAL_FAREWELL: &str = "goodbye from the original farewell";

const STACK_A: &str = r#"
#include <livepatch.h>
static const char *greeting_a(void) { return "greeting of patch a"; }
static struct klp_func funcs[] = { { .old_name = "greeting", .new_func = greeting_a }, { } };
static struct klp_object objs[] = { { .funcs = funcs }, { } };
static struct klp_patch patch = { .name = "livepatch_stack_a", .objs = objs };
KLP_PATCH(patch);
"#;

const STACK_B: &str = r#"
#include <stdio.h>
#include <livepatch.h>
static const char *greeting_b(void) { return "greeting of patch b"; }
static int farewell_b(char *buf, size_t len) { return snprintf(buf, len, "farewell of patch b"); }
static struct klp_func funcs[] = {
    { .old_name = "greeting", .new_func = greeting_b },
    { .old_name = "farewell", .new_func = farewell_b },
    { }
};
static struct klp_object objs[] = { { .funcs = funcs }, { } };
static struct klp_patch patch = { .name = "livepatch_stack_b", .objs = objs };
KLP_PATCH(patch);
"#;

/// Kernel test "multiple livepatches": two non-replacing patches stack; the newest one runs,
/// and disabling it shows the one below again, for the function both patch, while a function
/// only the top one patched goes back to the original.
#[test]
fn disabling_the_top_of_two_stacked_patches_reveals_the_lower_patch() {
    let a = compile("livepatch-stack-a", STACK_A, true);
    let b = compile("livepatch-stack-b", STACK_B, true);
    let mut target = start_greeter();
    let pid = target.pid();

    load(&pid, &a);
    assert_eq!(greeting(&mut target), "greeting of patch a");
    load(&pid, &b);
    assert_eq!(greeting(&mut target), "greeting of patch b");
    assert_eq!(farewell(&mut target), "farewell of patch b");
    let status = status_json(&pid);
    assert_eq!(
        patch_names(&status),
        ["livepatch_stack_a", "livepatch_stack_b"]
    );
    assert_eq!(status["patches"][0]["stack_order"], 1, "{status}");
    assert_eq!(status["patches"][1]["stack_order"], 2, "{status}");
    // An enabled patch's library is in use.
    let refused = cli(&["unload", &pid, "livepatch_stack_a"]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));

    disable(&pid, "livepatch_stack_b");
    assert_eq!(greeting(&mut target), "greeting of patch a");
    assert_eq!(farewell(&mut target), ORIGINAL_FAREWELL);
    unload(&pid, "livepatch_stack_b");
    disable(&pid, "livepatch_stack_a");
    unload(&pid, "livepatch_stack_a");
    assert_eq!(greeting(&mut target), ORIGINAL_GREETING);

    assert_eq!(
        dmesg(&pid),
        [
            patching("livepatch_stack_a"),
            patching("livepatch_stack_b"),
            unpatching("livepatch_stack_b"),
            unpatching("livepatch_stack_a"),
        ]
        .concat()
    );
}

/// Since Linux 5.1 any enabled patch may be disabled, not only the newest: disabling the bottom
/// of the stack leaves the top one running, renumbered to stack_order 1.
#[test]
fn disabling_the_bottom_of_two_stacked_patches_keeps_the_top_one_running() {
    let a = compile("livepatch-stack-a", STACK_A, true);
    let b = compile("livepatch-stack-b", STACK_B, true);
    let mut target = start_greeter();
    let pid = target.pid();

    load(&pid, &a);
    load(&pid, &b);
    disable(&pid, "livepatch_stack_a");
    assert_eq!(greeting(&mut target), "greeting of patch b");
    assert_eq!(farewell(&mut target), "farewell of patch b");
    let status = status_json(&pid);
    assert_eq!(patch_names(&status), ["livepatch_stack_b"]);
    assert_eq!(status["patches"][0]["stack_order"], 1, "{status}");
    assert_eq!(unloadable_names(&status), ["livepatch_stack_a"]);

    disable(&pid, "livepatch_stack_b");
    assert_eq!(greeting(&mut target), ORIGINAL_GREETING);
    assert_eq!(farewell(&mut target), ORIGINAL_FAREWELL);
    assert_eq!(
        dmesg(&pid),
        [
            patching("livepatch_stack_a"),
            patching("livepatch_stack_b"),
            unpatching("livepatch_stack_a"),
            unpatching("livepatch_stack_b"),
        ]
        .concat()
    );
}

const FAREWELL_FIX: &str = r#"
#include <stdio.h>
#include <livepatch.h>
static int fixed_farewell(char *buf, size_t len) { return snprintf(buf, len, "goodbye from the farewell fix"); }
static struct klp_func funcs[] = { { .old_name = "farewell", .new_func = fixed_farewell }, { } };
static struct klp_object objs[] = { { .funcs = funcs }, { } };
static struct klp_patch patch = { .name = "livepatch_farewell_fix", .objs = objs };
KLP_PATCH(patch);
"#;

/// A cumulative patch that carries a greeting fix and no farewell fix.
const GREETING_ONLY_REPLACE: &str = r#"
#include <livepatch.h>
static const char *cumulative_greeting(void) { return "hello from the cumulative greeting"; }
static struct klp_func funcs[] = { { .old_name = "greeting", .new_func = cumulative_greeting }, { } };
static struct klp_object objs[] = { { .funcs = funcs }, { } };
static struct klp_patch patch = { .name = "livepatch_greeting_only", .objs = objs, .replace = true };
KLP_PATCH(patch);
"#;

/// Kernel test "atomic replace livepatch": a cumulative patch replaces every enabled patch in one
/// transition; a function only a replaced patch had (here `farewell`) goes back to the original
/// through a nop; none of the replaced patches logs an unpatching transition, and their libraries
/// become unloadable.
#[test]
fn a_cumulative_patch_replaces_every_patch_and_reverts_the_functions_it_does_not_carry() {
    let farewell_fix = compile("livepatch-farewell-fix", FAREWELL_FIX, true);
    let replacement = compile("livepatch-greeting-only", GREETING_ONLY_REPLACE, true);
    let mut target = start_greeter();
    let pid = target.pid();

    load(&pid, &examples().join("livepatch-sample.so"));
    load(&pid, &farewell_fix);
    assert_eq!(greeting(&mut target), "this has been live patched");
    assert_eq!(farewell(&mut target), "goodbye from the farewell fix");

    load(&pid, &replacement);
    assert_eq!(greeting(&mut target), "hello from the cumulative greeting");
    assert_eq!(farewell(&mut target), ORIGINAL_FAREWELL);
    let status = status_json(&pid);
    assert_eq!(patch_names(&status), ["livepatch_greeting_only"]);
    assert_eq!(status["patches"][0]["replace"], true, "{status}");
    assert_eq!(status["patches"][0]["stack_order"], 1, "{status}");
    // The nop for farewell is discarded once the transition completed.
    let funcs: Vec<_> = status["patches"][0]["objects"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|o| o["funcs"].as_array().unwrap())
        .map(|f| (f["name"].as_str().unwrap(), f["nop"].as_bool().unwrap()))
        .collect();
    assert_eq!(funcs, [("greeting", false)], "{status}");
    assert_eq!(
        unloadable_names(&status),
        ["livepatch_sample", "livepatch_farewell_fix"]
    );
    assert!(
        status["unloadable"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["forced"] == false),
        "{status}"
    );
    unload(&pid, "livepatch_sample");
    unload(&pid, "livepatch_farewell_fix");
    assert_eq!(status_json(&pid)["unloadable"], serde_json::json!([]));

    disable(&pid, "livepatch_greeting_only");
    assert_eq!(greeting(&mut target), ORIGINAL_GREETING);
    assert_eq!(farewell(&mut target), ORIGINAL_FAREWELL);
    assert_eq!(
        dmesg(&pid),
        [
            patching("livepatch_sample"),
            patching("livepatch_farewell_fix"),
            patching("livepatch_greeting_only"),
            unpatching("livepatch_greeting_only"),
        ]
        .concat()
    );
}

fn value_patch(name: &str, value: i32) -> String {
    format!(
        r#"
#include <livepatch.h>
static int new_value(void) {{ return {value}; }}
static struct klp_func funcs[] = {{ {{ .old_name = "value", .new_func = new_value }}, {{ }} }};
static struct klp_object objs[] = {{ {{ .funcs = funcs }}, {{ }} }};
static struct klp_patch patch = {{ .name = "{name}", .objs = objs }};
KLP_PATCH(patch);
"#
    )
}

const STUCK_PATCH: &str = r#"
#include <stdio.h>
#include <livepatch.h>
extern volatile int release_worker;
static void new_stuck(void) {
    puts("worker: inside new stuck");
    while (!release_worker) __asm__ volatile("pause");
}
static struct klp_func funcs[] = { { .old_name = "stuck", .new_func = new_stuck }, { } };
static struct klp_object objs[] = { { .funcs = funcs }, { } };
static struct klp_patch patch = { .name = "livepatch_stuck", .objs = objs };
KLP_PATCH(patch);
"#;

/// One transition at a time: while a patch's transition runs, another patch can be neither
/// disabled nor enabled (`-EBUSY`, and no "enabling patch" line for the refused one); both work
/// once it completed.
#[test]
fn no_patch_is_enabled_or_disabled_while_another_patch_is_in_transition() {
    let program = compile("service_busy", BUSY_SERVICE, false);
    let value_two = compile(
        "livepatch-value-two",
        &value_patch("livepatch_value_two", 2),
        true,
    );
    let value_three = compile(
        "livepatch-value-three",
        &value_patch("livepatch_value_three", 3),
        true,
    );
    let stuck = compile("livepatch-stuck", STUCK_PATCH, true);
    let mut target = Target::start(&program);
    let pid = target.pid();

    load(&pid, &value_two);
    target.send("worker");
    target.expect("worker: inside stuck");
    let pending = cli(&["load", &pid, stuck.to_str().unwrap(), "--no-wait"]);
    assert!(pending.status.success(), "{}", stderr(&pending));
    assert_eq!(status_json(&pid)["transition"]["patch"], "livepatch_stuck");

    let busy_disable = cli(&["disable", &pid, "livepatch_value_two"]);
    assert_eq!(
        busy_disable.status.code(),
        Some(1),
        "{}",
        stderr(&busy_disable)
    );
    assert!(
        stderr(&busy_disable).contains("'livepatch_stuck' is in transition"),
        "{}",
        stderr(&busy_disable)
    );
    let busy_load = cli(&["load", &pid, value_three.to_str().unwrap()]);
    assert_eq!(busy_load.status.code(), Some(1), "{}", stderr(&busy_load));
    target.send("value");
    target.expect("value 2");
    let status = status_json(&pid);
    assert_eq!(
        patch_names(&status),
        ["livepatch_value_two", "livepatch_stuck"]
    );
    assert_eq!(status["unloadable"], serde_json::json!([]), "{status}");

    target.send("release");
    target.expect("joined");
    target.saw_or_expect("livepatch: 'livepatch_stuck': patching complete");
    disable(&pid, "livepatch_value_two");
    target.send("value");
    target.expect("value 1");
    load(&pid, &value_three);
    target.send("value");
    target.expect("value 3");

    assert_eq!(
        dmesg(&pid),
        [
            patching("livepatch_value_two"),
            patching("livepatch_stuck"),
            unpatching("livepatch_value_two"),
            patching("livepatch_value_three"),
        ]
        .concat()
    );
}

// Callbacks, on examples/programs/plugin-host.c, which dlopens libcallbacks-mod.so on demand.

const DEMO: &str = "livepatch_callbacks_demo";
const PLUGIN: &str = "libcallbacks-mod.so";

fn start_plugin_host() -> Target {
    let host = examples().join("plugin-host");
    let plugin = examples().join(PLUGIN);
    Target::start_with(&host, &[plugin.to_str().unwrap()], "plugin-host: ready")
}

/// The line a callback of `patch` logs for `object`, as the demo patch writes it.
fn callback(patch: &str, which: &str, object: &str) -> String {
    format!("{patch}: {which}_callback: {object}")
}

/// Enabling `patch` whose callbacks log for each of `objects`, loaded at the time.
fn patching_with_callbacks(patch: &str, objects: &[&str]) -> Vec<String> {
    let each = |which| objects.iter().map(move |o| callback(patch, which, o));
    [
        vec![
            format!("livepatch: enabling patch '{patch}'"),
            format!("livepatch: '{patch}': initializing patching transition"),
        ],
        each("pre_patch").collect(),
        vec![
            format!("livepatch: '{patch}': starting patching transition"),
            format!("livepatch: '{patch}': completing patching transition"),
        ],
        each("post_patch").collect(),
        vec![format!("livepatch: '{patch}': patching complete")],
    ]
    .concat()
}

/// Disabling `patch` whose callbacks log for each of `objects`, loaded at the time.
fn unpatching_with_callbacks(patch: &str, objects: &[&str]) -> Vec<String> {
    let each = |which| objects.iter().map(move |o| callback(patch, which, o));
    [
        vec![format!(
            "livepatch: '{patch}': initializing unpatching transition"
        )],
        each("pre_unpatch").collect(),
        vec![
            format!("livepatch: '{patch}': starting unpatching transition"),
            format!("livepatch: '{patch}': completing unpatching transition"),
        ],
        each("post_unpatch").collect(),
        vec![format!("livepatch: '{patch}': unpatching complete")],
    ]
    .concat()
}

/// `COMING` of the selftests: the library is loaded while `patch` is enabled.
fn coming(patch: &str) -> Vec<String> {
    vec![
        format!("livepatch: applying patch '{patch}' to loading module '{PLUGIN}'"),
        callback(patch, "pre_patch", PLUGIN),
        callback(patch, "post_patch", PLUGIN),
    ]
}

/// `GOING` of the selftests: the library is unloaded while `patch` is enabled.
fn going(patch: &str) -> Vec<String> {
    vec![
        callback(patch, "pre_unpatch", PLUGIN),
        format!("livepatch: reverting patch '{patch}' on unloading module '{PLUGIN}'"),
        callback(patch, "post_unpatch", PLUGIN),
    ]
}

/// Kernel test "target module before livepatch": every callback runs for the main program and
/// for the library, each kind for all objects before the next step of the transition.
#[test]
fn callbacks_run_for_the_program_and_a_library_loaded_before_the_patch() {
    let mut target = start_plugin_host();
    let pid = target.pid();
    target.send("load");
    target.expect("plugin-host: loaded: hello from the plugin");

    load(&pid, &examples().join("livepatch-callbacks-demo.so"));
    target.send("call");
    target.expect("plugin-host: hello from the patched plugin");
    disable(&pid, DEMO);
    target.send("call");
    target.expect("plugin-host: hello from the plugin");
    unload(&pid, DEMO);
    // With the patch gone, unloading the library involves livepatch no more.
    target.send("unload");
    target.expect("callbacks_mod: callbacks_mod_exit");
    target.expect("plugin-host: unloaded");

    assert_eq!(
        dmesg(&pid),
        [
            patching_with_callbacks(DEMO, &["vmlinux", PLUGIN]),
            unpatching_with_callbacks(DEMO, &["vmlinux", PLUGIN]),
        ]
        .concat()
    );
}

/// Kernel tests "module_coming notifier" and "module_going notifier": a library loaded while the
/// patch is enabled is patched before `dlopen` returns, with its pre_patch and post_patch
/// callbacks; unloading it runs its pre_unpatch and post_unpatch callbacks around the revert;
/// loading it again patches it again.
#[test]
fn a_library_loaded_after_the_patch_is_patched_when_dlopen_returns_and_reverted_on_dlclose() {
    let mut target = start_plugin_host();
    let pid = target.pid();
    load(&pid, &examples().join("livepatch-callbacks-demo.so"));
    let status = status_json(&pid);
    assert_eq!(
        status["patches"][0]["objects"][1]["name"], PLUGIN,
        "{status}"
    );
    assert_eq!(
        status["patches"][0]["objects"][1]["patched"], false,
        "{status}"
    );

    // plugin-host calls plugin_hello() right after dlopen returns.
    target.send("load");
    target.expect("plugin-host: loaded: hello from the patched plugin");
    let status = status_json(&pid);
    assert_eq!(
        status["patches"][0]["objects"][1]["patched"], true,
        "{status}"
    );
    target.send("unload");
    target.expect("plugin-host: unloaded");
    assert_eq!(
        status_json(&pid)["patches"][0]["objects"][1]["patched"],
        false
    );
    target.send("load");
    target.expect("plugin-host: loaded: hello from the patched plugin");

    disable(&pid, DEMO);
    target.send("call");
    target.expect("plugin-host: hello from the plugin");
    target.send("unload");
    target.expect("plugin-host: unloaded");

    assert_eq!(
        dmesg(&pid),
        [
            patching_with_callbacks(DEMO, &["vmlinux"]),
            coming(DEMO),
            going(DEMO),
            coming(DEMO),
            unpatching_with_callbacks(DEMO, &["vmlinux", PLUGIN]),
        ]
        .concat()
    );
}

/// Like the callbacks demo, but the pre_patch callback of the library refuses it (-ENODEV).
const REFUSING_CALLBACKS: &str = r#"
#include <livepatch.h>
#define NAME "livepatch_callbacks_enodev"
static const char *name_of(struct klp_object *obj) { return obj->name ? obj->name : "vmlinux"; }
static int pre_patch(struct klp_object *obj) {
    klp_log(NAME ": pre_patch_callback: %s", name_of(obj));
    return obj->name ? -19 : 0;
}
static void post_patch(struct klp_object *obj) { klp_log(NAME ": post_patch_callback: %s", name_of(obj)); }
static void pre_unpatch(struct klp_object *obj) { klp_log(NAME ": pre_unpatch_callback: %s", name_of(obj)); }
static void post_unpatch(struct klp_object *obj) { klp_log(NAME ": post_unpatch_callback: %s", name_of(obj)); }
static const char *refused_plugin_hello(void) { return "hello from the refused patch"; }
static struct klp_func no_funcs[] = { { } };
static struct klp_func plugin_funcs[] = { { .old_name = "plugin_hello", .new_func = refused_plugin_hello }, { } };
#define CALLBACKS { .pre_patch = pre_patch, .post_patch = post_patch, \
                    .pre_unpatch = pre_unpatch, .post_unpatch = post_unpatch }
static struct klp_object objs[] = {
    { .name = NULL, .funcs = no_funcs, .callbacks = CALLBACKS },
    { .name = "libcallbacks-mod.so", .funcs = plugin_funcs, .callbacks = CALLBACKS },
    { }
};
static struct klp_patch patch = { .name = NAME, .objs = objs };
KLP_PATCH(patch);
"#;

const ENODEV: &str = "livepatch_callbacks_enodev";

/// Kernel test "module_coming + pre-patch callback -ENODEV": the library's pre_patch callback
/// fails, so the library is refused (`dlopen` fails) and the patch stays enabled for the program.
#[test]
fn a_failing_pre_patch_callback_makes_dlopen_of_a_later_library_fail() {
    let refusing = compile("livepatch-callbacks-enodev", REFUSING_CALLBACKS, true);
    let mut target = start_plugin_host();
    let pid = target.pid();
    load(&pid, &refusing);

    target.send("load");
    target.expect("plugin-host: load failed");
    target.send("call");
    target.expect("plugin-host: (no plugin)");
    let status = status_json(&pid);
    assert_eq!(patch_names(&status), [ENODEV]);
    assert_eq!(status["patches"][0]["enabled"], true, "{status}");
    assert_eq!(
        status["patches"][0]["objects"][1]["patched"], false,
        "{status}"
    );
    disable(&pid, ENODEV);

    let mut log = dmesg(&pid);
    // The agent says why dlopen failed; the kernel has no such line (insmod reports it).
    let refusal = log
        .iter()
        .position(|l| l.starts_with("livepatch: dlopen refused: "))
        .unwrap_or_else(|| panic!("no dlopen refusal in {log:#?}"));
    log.remove(refusal);
    assert_eq!(
        log,
        [
            patching_with_callbacks(ENODEV, &["vmlinux"]),
            vec![
                format!("livepatch: applying patch '{ENODEV}' to loading module '{PLUGIN}'"),
                callback(ENODEV, "pre_patch", PLUGIN),
                format!("livepatch: pre-patch callback failed for object '{PLUGIN}'"),
                format!(
                    "livepatch: patch '{ENODEV}' failed for module '{PLUGIN}', \
                     refusing to load module '{PLUGIN}'"
                ),
            ],
            unpatching_with_callbacks(ENODEV, &["vmlinux"]),
        ]
        .concat()
    );
}

/// Kernel test "pre-patch callback -ENODEV", the failing object being a library already loaded:
/// the patch is refused, its transition is canceled, and only the objects whose pre_patch
/// succeeded get their post_unpatch callback.
#[test]
fn a_failing_pre_patch_callback_of_a_loaded_library_refuses_the_patch() {
    let refusing = compile("livepatch-callbacks-enodev", REFUSING_CALLBACKS, true);
    let mut target = start_plugin_host();
    let pid = target.pid();
    target.send("load");
    target.expect("plugin-host: loaded: hello from the plugin");

    let refused = cli(&["load", &pid, refusing.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(
        stderr(&refused).starts_with("livepatch: error: "),
        "{}",
        stderr(&refused)
    );
    target.send("call");
    target.expect("plugin-host: hello from the plugin");
    let status = status_json(&pid);
    assert_eq!(status["patches"], serde_json::json!([]), "{status}");
    assert_eq!(status["unloadable"], serde_json::json!([]), "{status}");

    assert_eq!(
        dmesg(&pid),
        [
            format!("livepatch: enabling patch '{ENODEV}'"),
            format!("livepatch: '{ENODEV}': initializing patching transition"),
            callback(ENODEV, "pre_patch", "vmlinux"),
            callback(ENODEV, "pre_patch", PLUGIN),
            format!("livepatch: pre-patch callback failed for object '{PLUGIN}'"),
            format!("livepatch: failed to enable patch '{ENODEV}'"),
            format!("livepatch: '{ENODEV}': canceling patching transition, going to unpatch"),
            format!("livepatch: '{ENODEV}': completing unpatching transition"),
            callback(ENODEV, "post_unpatch", "vmlinux"),
            format!("livepatch: '{ENODEV}': unpatching complete"),
        ]
    );
}

// Shadow variables: the kernel's livepatch-shadow-mod/fix1/fix2 samples, on
// examples/programs/shadow-host.c.

/// What one line of shadow-host counts.
struct Tick {
    objects: i64,
    leaked: i64,
}

/// Runs one iteration of shadow-host (allocate one object, free the expired ones).
fn shadow_tick(target: &mut Target) -> Tick {
    target.send("tick");
    let line = target.expect("shadow-host: tick ");
    let numbers: Vec<i64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let [_, objects, leaked] = numbers[..] else {
        panic!("unexpected line {line}")
    };
    Tick { objects, leaked }
}

fn fix2_counts(pid: &str) -> Vec<i64> {
    dmesg(pid)
        .iter()
        .filter_map(|l| l.strip_prefix("livepatch_shadow_fix2: dummy "))
        .map(|l| {
            let count = l.split(" checked ").nth(1).unwrap();
            count.strip_suffix(" times").unwrap().parse().unwrap()
        })
        .collect()
}

/// An object lives at most three ticks after the one that allocated it.
const OBJECT_LIFETIME: usize = 3;

/// The kernel's shadow variable samples: fix1 keeps the buffer each new object leaked in a
/// shadow variable and frees it with the object, so leaks stop; fix2, stacked on fix1, counts
/// the checks of each object in a second shadow variable; disabling fix2 stops the counting and
/// disabling fix1 releases the buffers of the objects still alive. Only buffers of objects
/// allocated before fix1 stay leaked.
#[test]
fn shadow_variables_fix_a_leak_count_checks_and_are_released_on_disable() {
    // dummy_free() calls free() within its first five bytes: only a patchable entry lets the
    // agent redirect it.
    let host = example_program("shadow-host", true);
    let mut target = Target::start_with(&host, &["600000"], "shadow-host: tick 0:");
    let pid = target.pid();
    let mut before_fix = 1;
    for _ in 0..4 {
        before_fix += 1;
        assert_eq!(
            shadow_tick(&mut target).leaked,
            before_fix,
            "one leak per object"
        );
    }

    load(&pid, &examples().join("livepatch-shadow-fix1.so"));
    for _ in 0..OBJECT_LIFETIME {
        let tick = shadow_tick(&mut target);
        assert!(tick.leaked <= before_fix + tick.objects);
    }
    // Every object allocated before fix1 is gone: only live objects hold a buffer now.
    for _ in 0..3 {
        let tick = shadow_tick(&mut target);
        assert_eq!(tick.leaked, before_fix + tick.objects);
    }

    load(&pid, &examples().join("livepatch-shadow-fix2.so"));
    for _ in 0..=OBJECT_LIFETIME {
        let tick = shadow_tick(&mut target);
        assert_eq!(tick.leaked, before_fix + tick.objects);
    }
    let counts = fix2_counts(&pid);
    assert!(!counts.is_empty(), "fix2 logged no freed object");
    assert!(
        counts
            .iter()
            .all(|&c| (1..=OBJECT_LIFETIME as i64 + 1).contains(&c)),
        "{counts:?}"
    );

    disable(&pid, "livepatch_shadow_fix2");
    for _ in 0..=OBJECT_LIFETIME {
        let tick = shadow_tick(&mut target);
        assert_eq!(tick.leaked, before_fix + tick.objects, "fix1 still frees");
    }
    assert_eq!(fix2_counts(&pid), counts, "fix2 counts no more");

    disable(&pid, "livepatch_shadow_fix1");
    // fix1's post_unpatch released every buffer still held; the new object leaks again.
    assert_eq!(shadow_tick(&mut target).leaked, before_fix + 1);
    assert_eq!(shadow_tick(&mut target).leaked, before_fix + 2);
    unload(&pid, "livepatch_shadow_fix2");
    unload(&pid, "livepatch_shadow_fix1");

    let log: Vec<String> = dmesg(&pid)
        .into_iter()
        .filter(|l| !l.starts_with("livepatch_shadow_fix2: dummy "))
        .collect();
    assert_eq!(
        log,
        [
            patching("livepatch_shadow_fix1"),
            patching("livepatch_shadow_fix2"),
            unpatching("livepatch_shadow_fix2"),
            unpatching("livepatch_shadow_fix1"),
        ]
        .concat()
    );
}

// System states: examples/patches/livepatch-state.c (versions 1 and 2) on
// examples/programs/state-host.c, the kernel's test_klp_state modules.

const STATE_V1: &str = "livepatch_state_v1";
const STATE_V2: &str = "livepatch_state_v2";

fn start_state_host() -> Target {
    let host = example_program("state-host", false);
    Target::start_with(&host, &["600000"], "state-host: console_loglevel 7")
}

fn console_loglevel(target: &mut Target) -> i32 {
    target.send("show");
    let line = target.expect("state-host: console_loglevel ");
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// `SP_new(X)` of the selftests: enabling a patch that makes the state change.
fn state_patching_new(patch: &str) -> Vec<String> {
    vec![
        format!("livepatch: enabling patch '{patch}'"),
        format!("livepatch: '{patch}': initializing patching transition"),
        format!("{patch}: setup: allocated room for the console_loglevel"),
        format!("livepatch: '{patch}': starting patching transition"),
        format!("livepatch: '{patch}': completing patching transition"),
        format!("{patch}: enable: console_loglevel raised to 15"),
        format!("livepatch: '{patch}': patching complete"),
    ]
}

/// `SU(X)` of the selftests without the `echo` line: disabling the last patch with the state.
fn state_unpatching(patch: &str) -> Vec<String> {
    vec![
        format!("livepatch: '{patch}': initializing unpatching transition"),
        format!("{patch}: disable: console_loglevel restored to 7"),
        format!("livepatch: '{patch}': starting unpatching transition"),
        format!("livepatch: '{patch}': completing unpatching transition"),
        format!("{patch}: release: freed the room"),
        format!("livepatch: '{patch}': unpatching complete"),
    ]
}

/// Kernel test "system state modification": setup runs before the transition, enable after it,
/// disable before the unpatching transition and release after it.
#[test]
fn a_system_state_is_set_up_enabled_disabled_and_released_in_order() {
    let mut target = start_state_host();
    let pid = target.pid();
    load(&pid, &examples().join("livepatch-state-v1.so"));
    assert_eq!(console_loglevel(&mut target), 15);
    disable(&pid, STATE_V1);
    assert_eq!(console_loglevel(&mut target), 7);
    unload(&pid, STATE_V1);

    assert_eq!(
        dmesg(&pid),
        [state_patching_new(STATE_V1), state_unpatching(STATE_V1)].concat()
    );
}

/// Kernel tests "taking over system state modification" and "incompatible cumulative
/// livepatches": version 2 replaces version 1 and takes the state over (no setup or enable,
/// `klp_get_prev_state` finds version 1's state); version 1 cannot then replace version 2 (a
/// downgrade), refused before "enabling patch"; disabling version 2 restores the state.
#[test]
fn a_newer_state_version_takes_the_state_over_and_an_older_one_is_refused() {
    let mut target = start_state_host();
    let pid = target.pid();
    let v1 = examples().join("livepatch-state-v1.so");
    load(&pid, &v1);
    load(&pid, &examples().join("livepatch-state-v2.so"));
    assert_eq!(console_loglevel(&mut target), 15);
    let status = status_json(&pid);
    assert_eq!(patch_names(&status), [STATE_V2]);
    assert_eq!(unloadable_names(&status), [STATE_V1]);
    unload(&pid, STATE_V1);

    let downgrade = cli(&["load", &pid, v1.to_str().unwrap()]);
    assert_eq!(downgrade.status.code(), Some(1), "{}", stderr(&downgrade));
    assert!(
        stderr(&downgrade).contains(STATE_V1),
        "{}",
        stderr(&downgrade)
    );
    assert_eq!(patch_names(&status_json(&pid)), [STATE_V2]);
    assert_eq!(console_loglevel(&mut target), 15);

    disable(&pid, STATE_V2);
    assert_eq!(console_loglevel(&mut target), 7);

    assert_eq!(
        dmesg(&pid),
        [
            state_patching_new(STATE_V1),
            vec![
                format!("livepatch: enabling patch '{STATE_V2}'"),
                format!("livepatch: '{STATE_V2}': initializing patching transition"),
                format!("{STATE_V2}: pre_patch: taking over the console_loglevel change"),
                format!("livepatch: '{STATE_V2}': starting patching transition"),
                format!("livepatch: '{STATE_V2}': completing patching transition"),
                format!("livepatch: '{STATE_V2}': patching complete"),
                format!(
                    "livepatch: Livepatch patch ({STATE_V1}) is not compatible with the \
                     already installed livepatches."
                ),
            ],
            state_unpatching(STATE_V2),
        ]
        .concat()
    );
}
