//! `fork` (the kernel's `klp_copy_process`): a child of a patched process has a working agent of
//! its own at once, keeps every patch, and is patched and unpatched on its own; a fork during a
//! transition goes on in the child and completes there; `--children` reaches a process and all
//! its descendants with one command.

mod support;

use support::{
    BUSY_PATCH, Cc, Target, cli, library, path_str, pending_tids, status_json, stderr, stdout,
    wait_for_socket,
};

const PREFORK: &str = "fork/prefork.c";

fn prefork() -> std::path::PathBuf {
    Cc::program(PREFORK).build("fork-prefork")
}

/// Sends `fork` to process `parent` and returns the child's pid once its agent answers.
fn fork_child(target: &mut Target, parent: &str) -> String {
    target.send(&format!("at {parent} fork"));
    let line = target.expect(&format!(" of {parent} ready"));
    let child = line
        .strip_prefix("child ")
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("no child pid in {line:?}"))
        .to_owned();
    wait_for_socket(&child);
    child
}

/// `value` in process `pid`.
fn value_in(target: &mut Target, pid: &str) -> String {
    target.send(&format!("at {pid} value"));
    target.expect(&format!("{pid} value "))
}

#[test]
fn a_forked_child_keeps_the_patches_and_is_patched_on_its_own() {
    let mut target = Target::start(&prefork());
    let parent = target.pid();
    let patch = library("fork-busy-patch", BUSY_PATCH);
    let load = cli(&["load", &parent, path_str(&patch)]);
    assert!(load.status.success(), "{}", stderr(&load));
    assert_eq!(value_in(&mut target, &parent), format!("{parent} value 2"));

    let child = fork_child(&mut target, &parent);
    assert_eq!(value_in(&mut target, &child), format!("{child} value 2"));
    let status = status_json(&child);
    assert_eq!(status["pid"], child.parse::<u64>().unwrap());
    assert_eq!(status["patches"][0]["name"], "fork-busy-patch");
    assert_eq!(status["patches"][0]["enabled"], true);
    assert!(status["transition"].is_null(), "{status}");
    // The forking thread and the child's own control thread; none of the parent's others.
    let threads = status["threads"].as_array().unwrap();
    assert_eq!(threads.len(), 2, "{status}");
    assert_eq!(threads[0]["tid"], status["pid"], "{status}");
    assert_eq!(threads[1]["name"], "livepatch", "{status}");

    // The child is a process of its own: unpatching it leaves the parent patched.
    let disable = cli(&["disable", &child, "fork-busy-patch"]);
    assert!(disable.status.success(), "{}", stderr(&disable));
    assert_eq!(value_in(&mut target, &child), format!("{child} value 1"));
    assert_eq!(value_in(&mut target, &parent), format!("{parent} value 2"));
    let unload = cli(&["unload", &child, "fork-busy-patch"]);
    assert!(unload.status.success(), "{}", stderr(&unload));

    // The child's exit removes its socket and leaves the parent's.
    target.send(&format!("at {child} exit"));
    support::wait_for("the child's socket to go", || {
        if support::socket(&child).exists() {
            Err("it is still there".into())
        } else {
            Ok(())
        }
    });
    assert!(support::socket(&parent).exists());
    let status = cli(&["status", &parent]);
    assert!(status.status.success(), "{}", stderr(&status));
    assert!(
        stdout(&status).contains("fork-busy-patch"),
        "{}",
        stdout(&status)
    );
}

#[test]
fn a_fork_during_a_transition_completes_it_in_the_child() {
    let mut target = Target::start(&prefork());
    let parent = target.pid();
    let patch = library("fork-transition-patch", BUSY_PATCH);
    // A worker inside `stuck` holds the parent's transition.
    target.send("worker");
    target.expect("worker: inside stuck");
    let load = cli(&["load", &parent, path_str(&patch), "--no-wait"]);
    assert!(load.status.success(), "{}", stderr(&load));
    let status = status_json(&parent);
    assert_eq!(status["transition"]["patch"], "fork-transition-patch");
    assert_eq!(pending_tids(&status).len(), 1, "{status}");

    // The child has no worker: nothing holds its transition.
    let child = fork_child(&mut target, &parent);
    target.saw_or_expect(&format!(
        "livepatch: 'fork-transition-patch': forked during the patching transition; it goes on in process {child}"
    ));
    support::wait_for("the child's transition to complete", || {
        let status = status_json(&child);
        if status["transition"].is_null() {
            Ok(status)
        } else {
            Err(status.to_string())
        }
    });
    assert_eq!(value_in(&mut target, &child), format!("{child} value 2"));
    let status = status_json(&parent);
    assert_eq!(
        status["transition"]["patch"], "fork-transition-patch",
        "the parent's transition still waits for its worker: {status}"
    );

    // Released, the worker lets the parent's transition complete too.
    target.send("release");
    target.expect(&format!("{parent} joined"));
    support::wait_for("the parent's transition to complete", || {
        let status = status_json(&parent);
        if status["transition"].is_null() {
            Ok(())
        } else {
            Err(status.to_string())
        }
    });
    assert_eq!(value_in(&mut target, &parent), format!("{parent} value 2"));
}

/// A tree: the first process, a child, a grandchild, and a child that runs `cat` without the
/// agent; their pids in that order.
fn tree(target: &mut Target) -> [String; 4] {
    let parent = target.pid();
    let child = fork_child(target, &parent);
    let grandchild = fork_child(target, &child);
    target.send("exec");
    let line = target.expect(&format!("{parent} exec'd "));
    let without_agent = line.rsplit(' ').next().unwrap().to_owned();
    [parent, child, grandchild, without_agent]
}

#[test]
fn children_patches_and_unpatches_a_process_and_every_descendant_with_an_agent() {
    let mut target = Target::start(&prefork());
    let [parent, child, grandchild, without_agent] = tree(&mut target);
    let patch = library("fork-children-patch", BUSY_PATCH);

    let load = cli(&["load", "--children", &parent, path_str(&patch)]);
    assert!(load.status.success(), "{}", stderr(&load));
    for pid in [&parent, &child, &grandchild] {
        assert!(
            stdout(&load).contains(&format!(
                "patch 'fork-children-patch' enabled in process {pid}\n"
            )),
            "{}",
            stdout(&load)
        );
        assert_eq!(value_in(&mut target, pid), format!("{pid} value 2"));
    }
    assert!(
        stderr(&load).contains(&format!(
            "process {without_agent} (cat), a descendant of {parent}, has no agent and runs \
             another program: passed over"
        )),
        "{}",
        stderr(&load)
    );

    let disable = cli(&["disable", "--children", &parent, "fork-children-patch"]);
    assert!(disable.status.success(), "{}", stderr(&disable));
    let unload = cli(&["unload", "--children", &parent, "fork-children-patch"]);
    assert!(unload.status.success(), "{}", stderr(&unload));
    for pid in [&parent, &child, &grandchild] {
        assert_eq!(value_in(&mut target, pid), format!("{pid} value 1"));
        assert!(
            stdout(&unload).contains(&format!("unloaded from process {pid}\n")),
            "{}",
            stdout(&unload)
        );
        assert!(status_json(pid)["patches"].as_array().unwrap().is_empty());
    }
}

#[test]
fn a_descendant_that_refuses_the_patch_undoes_it_in_the_others() {
    let mut target = Target::start(&prefork());
    let [parent, child, grandchild, _] = tree(&mut target);
    let patch = library("fork-refused-patch", BUSY_PATCH);
    // The grandchild has the patch already: loading it again there is refused.
    let load = cli(&["load", &grandchild, path_str(&patch)]);
    assert!(load.status.success(), "{}", stderr(&load));

    let load = cli(&["load", "--children", &parent, path_str(&patch)]);
    assert_eq!(load.status.code(), Some(1), "{}", stderr(&load));
    let refusal = format!(
        "livepatch: error: process {grandchild} refused the patch; disabled and unloaded again \
         in process {parent}, {child}: "
    );
    assert!(stderr(&load).contains(&refusal), "{}", stderr(&load));
    assert!(stderr(&load).contains("[File exists"), "{}", stderr(&load));
    for pid in [&parent, &child] {
        assert_eq!(value_in(&mut target, pid), format!("{pid} value 1"));
        let status = status_json(pid);
        assert!(status["patches"].as_array().unwrap().is_empty(), "{status}");
        assert!(
            status["unloadable"].as_array().unwrap().is_empty(),
            "{status}"
        );
    }
    assert_eq!(
        value_in(&mut target, &grandchild),
        format!("{grandchild} value 2")
    );
}

#[test]
fn a_copy_made_by_a_raw_clone_is_refused_with_the_reason() {
    let mut target = Target::start(&prefork());
    let parent = target.pid();
    target.send("rawfork");
    let line = target.expect(&format!(" of {parent} ready"));
    let copy = line.split(' ').nth(1).unwrap().to_owned();
    // No fork handler ran: the copy has the parent's agent but not its thread, and no socket.
    let attach = cli(&["attach", &copy]);
    support::refusal::assert_refused(&attach, &[&copy, "made without fork()", "CLONE_VM"]);
    target.send(&format!("at {copy} value"));
    target.expect(&format!("{copy} value 1"));
}
