//! The scenarios of the kernel's test-callbacks.sh on real programs: the callbacks of the main
//! program and of a library loaded before or after the patch, and failing pre_patch callbacks.
//! Each test compares the agent's log with the lines the kernel prints for the same scenario.
//! See: tools/testing/selftests/livepatch/test-callbacks.sh (reference/kernel-livepatch.md §8.2;
//! the simulator's port is crates/sim/tests/test_callbacks.rs and test_callbacks_more.rs).

mod support;

use support::selftest::{disable, dmesg, load, unload};
use support::{Target, cli, examples, library, patch_names, status_json, stderr};

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
const REFUSING_CALLBACKS: &str = "kernel/callbacks-enodev-patch.c";

const ENODEV: &str = "livepatch_callbacks_enodev";

/// Kernel test "module_coming + pre-patch callback -ENODEV": the library's pre_patch callback
/// fails, so the library is refused (`dlopen` fails) and the patch stays enabled for the program.
#[test]
fn a_failing_pre_patch_callback_makes_dlopen_of_a_later_library_fail() {
    let refusing = library("livepatch-callbacks-enodev", REFUSING_CALLBACKS);
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
    let refusing = library("livepatch-callbacks-enodev", REFUSING_CALLBACKS);
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
