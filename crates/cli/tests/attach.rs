//! Attach: a program started with neither `livepatch run` nor `LD_PRELOAD` gets the agent with
//! ptrace (`livepatch attach`, or `livepatch load` by itself) and is patched; its threads, in
//! `read`, `nanosleep`, `pthread_cond_wait`, `epoll_wait`, a busy loop, a signal handler and an
//! allocation loop, notice nothing: no EINTR, no lost allocation, no thread mixing versions. A
//! process that cannot be attached to is refused with the reason, and left as it was.

mod support;

use std::os::unix::process::CommandExt;
use std::process::Command;

use support::refusal::assert_refused;
use support::{
    BUSY_PATCH, BUSY_SERVICE, Cc, Target, VALUE_PATCH, agent, cli, euid, livepatch, path_str,
    scratch, status_json, stderr, stdout,
};

const THREADS: &str = "attach/threads.c";
const CONFINED: &str = "attach/confined.c";

/// The counters of the threads fixture's `report` line.
#[derive(Debug)]
struct Report {
    eintr: u64,
    spins: u64,
    went_back: u64,
    allocations: u64,
    checksum_ok: bool,
}

fn report(target: &mut Target) -> Report {
    target.send("report");
    let line = target.expect("report ");
    let field = |name: &str| -> &str {
        line.split(' ')
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
    };
    let number = |name: &str| -> u64 { field(name).parse().unwrap() };
    Report {
        eintr: number("eintr"),
        spins: number("spins"),
        went_back: number("went_back"),
        allocations: number("allocations"),
        checksum_ok: field("checksum") == "ok",
    }
}

#[test]
fn a_program_started_without_the_agent_is_attached_and_patched_and_its_threads_notice_nothing() {
    let program = Cc::program(THREADS).build("attach-threads");
    let patch = Cc::library(VALUE_PATCH).build("attach-value");
    let mut target = Target::start_without_agent(&program, &[]);
    let pid = target.pid();
    let before = report(&mut target);

    let attach = cli(&["attach", &pid]);
    assert!(attach.status.success(), "{}", stderr(&attach));
    assert!(
        stdout(&attach).contains(&format!(
            "livepatch: agent attached to process {pid} (its thread "
        )),
        "{}",
        stdout(&attach)
    );
    let attached = report(&mut target);
    assert_eq!(
        attached.eintr, 0,
        "the attach interrupted a sleeping call: {attached:?}"
    );
    assert!(attached.checksum_ok, "{attached:?}");
    assert!(attached.spins > before.spins && attached.allocations > before.allocations);
    // The agent adopted every thread: the program's seven and its own.
    let status = status_json(&pid);
    assert_eq!(status["threads"].as_array().unwrap().len(), 8, "{status}");
    let again = cli(&["attach", &pid]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stdout(&again).contains("has an agent already"),
        "{}",
        stdout(&again)
    );

    let load = cli(&["load", &pid, path_str(&patch)]);
    assert!(load.status.success(), "{}", stderr(&load));
    target.send("value");
    target.expect("value 2");
    let patched = report(&mut target);
    assert_eq!(patched.went_back, 0, "{patched:?}");
    assert!(patched.checksum_ok, "{patched:?}");
    // The transition's checks interrupt no sleeping thread. The two code writes of a first
    // load into an attached process (the agent's redirect of dlopen and the others, then the
    // patch's), each with every other thread parked by a signal, interrupt each of the two
    // sleepers at most once each.
    assert!(patched.eintr <= 4, "{patched:?}");

    let disable = cli(&["disable", &pid, "attach-value"]);
    assert!(disable.status.success(), "{}", stderr(&disable));
    target.send("value");
    target.expect("value 1");
    let unpatched = report(&mut target);
    assert!(unpatched.checksum_ok, "{unpatched:?}");
    assert!(unpatched.eintr <= 6, "{unpatched:?}");
}

#[test]
fn load_attaches_the_agent_by_itself() {
    let program = Cc::program(BUSY_SERVICE).build("attach-busy-service");
    let patch = Cc::library(BUSY_PATCH).build("attach-busy-patch");
    let mut target = Target::start_without_agent(&program, &[]);
    let pid = target.pid();
    target.send("value");
    target.expect("value 1");
    let load = cli(&["load", &pid, path_str(&patch)]);
    assert!(load.status.success(), "{}", stderr(&load));
    assert!(
        stdout(&load).contains(&format!("agent attached to process {pid}")),
        "{}",
        stdout(&load)
    );
    assert!(
        stdout(&load).contains("enabled in process"),
        "{}",
        stdout(&load)
    );
    // The main thread was stopped in `read`; the call goes on and reads the next command.
    target.send("value");
    target.expect("value 2");
}

/// `livepatch attach PID` fails with a refusal naming each of `names`, and the program still
/// answers as before, without an agent.
fn assert_attach_refused(target: &mut Target, names: &[&str]) {
    let pid = target.pid();
    let out = cli(&["attach", &pid]);
    assert_refused(&out, names);
    assert!(!support::socket(&pid).exists(), "an agent started anyway");
}

fn assert_still_answers(target: &mut Target) {
    target.send("value");
    target.expect("value 1");
}

#[test]
fn a_process_already_traced_is_refused() {
    let program = Cc::program(CONFINED).build("attach-confined");
    let mut target = Target::start_without_agent(&program, &[]);
    let pid: i32 = target.pid().parse().unwrap();
    // SAFETY: seizing a child of this test; it keeps running, traced by this thread.
    let seized = unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0) };
    assert_eq!(seized, 0, "{}", std::io::Error::last_os_error());
    // TracerPid names the tracing thread.
    // SAFETY: gettid has no arguments and cannot fail.
    let me = unsafe { libc::gettid() }.to_string();
    assert_attach_refused(
        &mut target,
        &["already traced by process", &me, "detach it first"],
    );
    assert_still_answers(&mut target);
}

#[test]
fn a_statically_linked_program_is_refused_by_attach_and_by_run() {
    let program = Cc::program(CONFINED).arg("-static").build("attach-static");
    let mut target = Target::start_without_agent(&program, &[]);
    assert_attach_refused(&mut target, &["statically linked", "no dynamic loader"]);
    assert_still_answers(&mut target);
    let run = cli(&["run", path_str(&program)]);
    assert_refused(&run, &["cannot run", "statically linked"]);
}

#[test]
fn a_process_under_a_seccomp_filter_is_refused() {
    let program = Cc::program(CONFINED)
        .define("SECCOMP", 1)
        .build("attach-seccomp");
    let mut target = Target::start_without_agent(&program, &[]);
    assert_attach_refused(&mut target, &["seccomp filter", "livepatch run"]);
    assert_still_answers(&mut target);
}

#[test]
fn a_stopped_process_is_refused() {
    let program = Cc::program(CONFINED).build("attach-confined");
    let mut target = Target::start_without_agent(&program, &[]);
    let pid: i32 = target.pid().parse().unwrap();
    // SAFETY: signals to a child of this test.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    support::wait_for("the target to stop", || {
        let status = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let state = status
            .rsplit(')')
            .next()
            .unwrap()
            .trim_start()
            .chars()
            .next();
        if state == Some('T') {
            Ok(())
        } else {
            Err(format!("state {state:?}"))
        }
    });
    assert_attach_refused(&mut target, &["is stopped", "kill -CONT"]);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    assert_still_answers(&mut target);
}

#[test]
fn without_the_right_to_trace_the_refusal_says_what_is_needed() {
    assert_eq!(
        euid(),
        0,
        "this test runs the command as another user (uid 65534) and needs root"
    );
    let program = Cc::program(CONFINED).build("attach-confined");
    let mut target = Target::start_without_agent(&program, &[]);
    let pid = target.pid();
    let out = livepatch()
        .args(["attach", &pid])
        .uid(65534)
        .output()
        .unwrap();
    assert_refused(
        &out,
        &["no permission to trace process", &pid, "CAP_SYS_PTRACE"],
    );
    assert_still_answers(&mut target);
}

#[test]
fn a_process_that_cannot_see_the_agent_file_is_refused() {
    assert_eq!(
        euid(),
        0,
        "this test makes a mount namespace and needs root"
    );
    let program = Cc::program(CONFINED).build("attach-confined");
    // The copy of the agent a process maps lives beside the sockets.
    let agent_dir = scratch().join("sockets");
    // The program in a mount namespace of its own, where that directory is an empty tmpfs (as
    // a container sees other files at the same paths).
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none '{}' && exec '{}'",
            path_str(&agent_dir),
            path_str(&program)
        ))
        .env("LIVEPATCH_SOCKET_DIR", scratch().join("sockets"));
    let mut target = Target::spawn(command, "ready");
    assert_attach_refused(&mut target, &["cannot see the agent", "mount namespace"]);
    assert_still_answers(&mut target);
}

#[test]
fn an_attached_agent_lost_by_exec_is_named_so() {
    let program = Cc::program(CONFINED).build("attach-confined");
    let mut target = Target::start_without_agent(&program, &[]);
    let pid = target.pid();
    let attach = cli(&["attach", &pid]);
    assert!(attach.status.success(), "{}", stderr(&attach));
    target.send("exec");
    target.expect("ready");
    let status = cli(&["status", &pid]);
    assert_refused(
        &status,
        &[
            "its agent is gone",
            "exec'd a new program",
            "livepatch attach",
        ],
    );
    // Attached again, the new program is patched as any other.
    let attach = cli(&["attach", &pid]);
    assert!(attach.status.success(), "{}", stderr(&attach));
    assert_still_answers(&mut target);
}

#[test]
fn an_attached_process_has_a_library_it_loads_later_patched_before_dlopen_returns() {
    let library = Cc::library("refusals/target-library.c").build("attach-later-target");
    let program = Cc::program("refusals/later-host.c").build("attach-later-host");
    let patch = Cc::library("refusals/library-value-patch.c")
        .define_string("LIBRARY", "attach-later-target.so")
        .define("VALUE", 31)
        .build("attach-later-patch");
    let mut target = Target::start_without_agent(&program, &[path_str(&library)]);
    let pid = target.pid();
    let load = cli(&["load", &pid, path_str(&patch)]);
    assert!(load.status.success(), "{}", stderr(&load));
    let object = |status: &serde_json::Value| status["patches"][0]["objects"][0].clone();
    assert_eq!(object(&status_json(&pid))["patched"], false);

    // The attached agent redirected the C library's dlopen to its own before the patch
    // applied: the library is patched before dlopen returns, as with a preloaded agent.
    target.send("load");
    target.expect("loaded: lib_value() = 31");
    let status = status_json(&pid);
    assert_eq!(object(&status)["patched"], true, "{status}");
    assert_eq!(object(&status)["name"], "attach-later-target.so");
}

#[test]
fn a_process_whose_threads_all_run_signal_handlers_is_refused() {
    let program = Cc::program(CONFINED)
        .define("IN_HANDLER", 1)
        .build("attach-in-handler");
    let mut target = Target::start_without_agent(&program, &[]);
    target.expect("in handler");
    let pid = target.pid();
    let out = cli(&["attach", &pid]);
    assert_refused(&out, &["no thread of process", "runs a signal handler"]);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let state = stat.rsplit(')').next().unwrap().trim_start().chars().next();
    assert_eq!(
        state,
        Some('R'),
        "the program still runs its handler: {stat}"
    );
    assert!(!support::socket(&pid).exists(), "an agent started anyway");
}

#[test]
fn a_patch_that_calls_the_agent_loads_into_an_attached_process() {
    let program = Cc::program(CONFINED).build("attach-confined");
    let patch = Cc::library("attach/shadow-patch.c").build("attach-shadow-patch");
    let mut target = Target::start_without_agent(&program, &[]);
    let pid = target.pid();
    // The patch's `klp_shadow_get_or_alloc` resolves to the attached agent's.
    let load = cli(&["load", &pid, path_str(&patch)]);
    assert!(load.status.success(), "{}", stderr(&load));
    target.send("value");
    target.expect("value 41");
    target.send("value");
    target.expect("value 42");
}

#[test]
fn processes_map_a_private_copy_of_the_agent_which_an_upgrade_in_place_leaves_alone() {
    let program = Cc::program(BUSY_SERVICE).build("attach-busy-service");
    let patch = Cc::library(VALUE_PATCH).build("attach-copy-value");
    // An installed agent of our own, to rewrite in place.
    let installed = scratch().join("installed").join("liblivepatch_agent.so");
    std::fs::create_dir_all(installed.parent().unwrap()).unwrap();
    std::fs::copy(agent(), &installed).unwrap();
    let with_installed = |args: &[&str]| {
        livepatch()
            .env("LIVEPATCH_AGENT", &installed)
            .args(args)
            .output()
            .unwrap()
    };
    let maps_agent = |pid: &str| -> String {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        let line = maps
            .lines()
            .find(|l| l.contains("liblivepatch_agent"))
            .unwrap_or_else(|| panic!("no agent mapped in {pid}:\n{maps}"))
            .to_owned();
        line.split_whitespace().last().unwrap().to_owned()
    };
    // Root's copies are in a directory every process may read; a user's beside their sockets.
    let copies = scratch().join("sockets").join(match euid() {
        0 => "agents".to_owned(),
        uid => uid.to_string(),
    });

    let mut preloaded = {
        let mut run = livepatch();
        run.env("LIVEPATCH_AGENT", &installed)
            .args(["run", path_str(&program)]);
        Target::spawn(run, "ready")
    };
    support::wait_for_socket(&preloaded.pid());
    let mut attached = Target::start_without_agent(&program, &[]);
    let attach = with_installed(&["attach", &attached.pid()]);
    assert!(attach.status.success(), "{}", stderr(&attach));
    for target in [&preloaded, &attached] {
        let mapped = maps_agent(&target.pid());
        assert!(
            mapped.starts_with(path_str(&copies)) && mapped != path_str(&installed),
            "process {} maps {mapped}",
            target.pid()
        );
    }

    // An upgrade that rewrites the installed file in place (same inode, other bytes).
    let size = std::fs::metadata(&installed).unwrap().len() as usize;
    std::fs::write(&installed, vec![0xccu8; size]).unwrap();
    for target in [&mut preloaded, &mut attached] {
        let load = cli(&["load", &target.pid(), path_str(&patch)]);
        assert!(load.status.success(), "{}", stderr(&load));
        target.send("value");
        target.expect("value 2");
    }
}

/// A 32-bit x86 program, made byte by byte (no multilib needed): it writes `ready` and spins.
fn write_elf32_program(path: &std::path::Path) {
    const BASE: u32 = 0x0804_8000;
    const HEADERS: u32 = 52 + 32;
    let message_at = BASE + HEADERS + 24;
    let mut code = Vec::new();
    code.extend([0xb8, 4, 0, 0, 0]); // mov eax, 4 (write)
    code.extend([0xbb, 1, 0, 0, 0]); // mov ebx, 1
    code.push(0xb9); // mov ecx, message
    code.extend(message_at.to_le_bytes());
    code.extend([0xba, 6, 0, 0, 0]); // mov edx, 6
    code.extend([0xcd, 0x80]); // int 0x80
    code.extend([0xeb, 0xfe]); // jmp .
    code.extend(b"ready\n");
    let total = HEADERS + code.len() as u32;
    let mut elf = b"\x7fELF\x01\x01\x01".to_vec();
    elf.resize(16, 0);
    let half = |v: u16| v.to_le_bytes();
    let word = |v: u32| v.to_le_bytes();
    elf.extend(half(2)); // ET_EXEC
    elf.extend(half(3)); // EM_386
    elf.extend(word(1));
    elf.extend(word(BASE + HEADERS)); // entry
    elf.extend(word(52)); // program headers
    elf.extend(word(0));
    elf.extend(word(0));
    for v in [52, 32, 1, 0, 0, 0] {
        elf.extend(half(v));
    }
    // PT_LOAD of the whole file, read and execute.
    for v in [1, 0, BASE, BASE, total, total, 5, 0x1000] {
        elf.extend(word(v));
    }
    elf.extend(code);
    std::fs::write(path, elf).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

#[test]
fn a_32_bit_program_is_refused() {
    let program = scratch().join("elf32-ready");
    write_elf32_program(&program);
    let target = Target::spawn(Command::new(&program), "ready");
    let out = cli(&["attach", &target.pid()]);
    assert_refused(&out, &["32-bit program", "only 64-bit x86-64"]);
}
