//! Refusals end to end: a real program runs under the agent, the `livepatch` command attempts
//! something the agent must refuse, and the test checks the refusal (exit status 1, a
//! `livepatch: error: ` line that names the thing and the reason) and that the process is exactly
//! as before: the same status, the same answers from its functions, the same first bytes of the
//! functions the patch targeted. Where it applies, a correct patch loads afterwards, so nothing
//! half-applied is left in its way.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Output;

use livepatch_protocol as protocol;
use support::{Target, cli, compile, scratch, status_json, stderr, stdout};

const ENOMEM: i32 = 12;
const EBUSY: i32 = 16;
const ENODEV: i32 = 19;
const EINVAL: i32 = 22;

/// What every test program starts with: a table of functions the test can call and whose
/// first bytes it can read, by name.
const HEAD: &str = r#"
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#define KEEP __attribute__((noinline, noipa))
typedef int (*int_fn)(void);
struct entry { const char *name; int_fn call; const void *code; };
static struct entry entries[16];
static int n_entries;
static void add(const char *name, int_fn call, const void *code) {
    entries[n_entries++] = (struct entry){ name, call, code };
}
static int setup(int argc, char **argv);
static int command(const char *line);
"#;

/// The command loop: `call NAME` prints `call NAME = RESULT`, `bytes NAME` prints
/// `bytes NAME HEX` (the first 16 bytes of the function's code); other commands go to the
/// program's own `command`.
const MAIN: &str = r#"
/* Code addresses are handled only in these callees, never kept in main's frame: the agent
   scans the stacks of threads for words that point into functions being patched. */
static KEEP void print_call(const char *name, int_fn call) {
    printf("call %s = %d\n", name, call());
}
static KEEP void print_code(const char *name, const unsigned char *code) {
    printf("bytes %s ", name);
    for (int b = 0; b < 16; b++) printf("%02x", code[b]);
    putchar('\n');
}
int main(int argc, char **argv) {
    char line[256];
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (setup(argc, argv)) return 1;
    puts("ready");
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        int done = command(line);
        for (int i = 0; !done && i < n_entries; i++) {
            if (!strncmp(line, "call ", 5) && !strcmp(line + 5, entries[i].name) && entries[i].call) {
                print_call(entries[i].name, entries[i].call);
                done = 1;
            } else if (!strncmp(line, "bytes ", 6) && !strcmp(line + 6, entries[i].name)) {
                print_code(entries[i].name, entries[i].code);
                done = 1;
            }
        }
        if (!done) printf("unknown command: %s\n", line);
    }
    return 0;
}
"#;

/// Two functions in the main program.
const BASIC: &str = r#"
KEEP int value(void) { return 1; }
KEEP int other(void) { return 7; }
static int setup(int argc, char **argv) {
    (void)argc; (void)argv;
    add("value", value, (const void *)value);
    add("other", other, (const void *)other);
    return 0;
}
static int command(const char *line) { (void)line; return 0; }
"#;

/// `value` becomes 2.
const PATCH_VALUE: &str = r#"
#include <livepatch.h>
static int new_value(void) { return 2; }
static struct klp_func funcs[] = { { .old_name = "value", .new_func = new_value }, { } };
static struct klp_object objs[] = { { .name = NULL, .funcs = funcs }, { } };
static struct klp_patch patch = { .objs = objs };
KLP_PATCH(patch);
"#;

fn program(name: &str, body: &str) -> PathBuf {
    compile(name, &format!("{HEAD}{body}{MAIN}"), false)
}

/// A program linked from several C files (`compile` takes one), as the kernel sees a module
/// built from several files with static functions of the same name.
fn program_from_files(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = scratch();
    let out = dir.join(name);
    let mut cc = std::process::Command::new("cc");
    cc.args(["-rdynamic", "-O2", "-g", "-pthread", "-o"])
        .arg(&out);
    for (file, source) in files {
        let path = dir.join(format!("{name}-{file}.c"));
        std::fs::write(&path, source).unwrap();
        cc.arg(path);
    }
    let status = cc.status().expect("cc runs");
    assert!(status.success(), "compiling {name}");
    out
}

/// The GNU build id of an ELF file, as `readelf -n` prints it.
fn build_id(file: &Path) -> String {
    let out = std::process::Command::new("readelf")
        .arg("-n")
        .arg(file)
        .output()
        .expect("readelf runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: ").map(str::to_owned))
        .unwrap_or_else(|| panic!("{} has no build id", file.display()))
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

fn load(pid: &str, patch: &Path) -> Output {
    cli(&["load", pid, path_str(patch)])
}

fn assert_loads(pid: &str, patch: &Path) {
    let out = load(pid, patch);
    assert!(
        out.status.success(),
        "loading {} failed: {}",
        patch.display(),
        stderr(&out)
    );
}

fn assert_succeeds(args: &[&str]) {
    let out = cli(args);
    assert!(out.status.success(), "{args:?} failed: {}", stderr(&out));
}

/// Exit status 1 and one error that names every one of `names`; returns the message.
fn assert_refused(output: &Output, names: &[&str]) -> String {
    let message = stderr(output);
    assert_eq!(
        output.status.code(),
        Some(1),
        "stdout: {}\nstderr: {message}",
        stdout(output)
    );
    assert!(message.starts_with("livepatch: error: "), "{message}");
    for name in names {
        assert!(message.contains(name), "{message:?} does not name {name:?}");
    }
    message
}

/// `call NAME = RESULT` from the program.
fn call(target: &mut Target, function: &str) -> String {
    target.send(&format!("call {function}"));
    target.expect(&format!("call {function} = "))
}

/// `bytes NAME HEX`: the first 16 bytes of the function's code.
fn code(target: &mut Target, function: &str) -> String {
    target.send(&format!("bytes {function}"));
    target.expect(&format!("bytes {function} "))
}

/// Everything a refusal must leave as it was.
#[derive(Debug, PartialEq)]
struct Snapshot {
    status: serde_json::Value,
    answers: Vec<String>,
    code: Vec<String>,
}

fn snapshot(target: &mut Target, calls: &[&str], code_of: &[&str]) -> Snapshot {
    Snapshot {
        status: status_json(&target.pid()),
        answers: calls.iter().map(|f| call(target, f)).collect(),
        code: code_of.iter().map(|f| code(target, f)).collect(),
    }
}

/// The agent's log (`livepatch log`): core lines, agent lines and the lines patch code wrote,
/// in order, complete when a request has been answered.
fn agent_log(pid: &str) -> Vec<String> {
    let out = cli(&["log", pid]);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).lines().map(str::to_owned).collect()
}

/// Sends `command` straight to the agent and returns the errno and message of its refusal;
/// the command prints only the message, and the errno is part of the kernel's contract.
fn refusal_errno(pid: &str, command: protocol::Command) -> (i32, String) {
    let socket = scratch().join("sockets").join(format!("{pid}.sock"));
    let mut stream = UnixStream::connect(&socket).expect("agent socket");
    let mut line = serde_json::to_string(&protocol::Request::new(command.clone())).unwrap();
    line.push('\n');
    stream.write_all(line.as_bytes()).unwrap();
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).unwrap();
    let response: protocol::Response = serde_json::from_str(&reply).unwrap();
    match response.outcome {
        protocol::Outcome::Error { errno, message } => (errno, message),
        other => panic!("{command:?} was not refused: {other:?}"),
    }
}

fn load_request(patch: &Path) -> protocol::Command {
    protocol::Command::Load {
        path: path_str(&patch.canonicalize().unwrap()).to_owned(),
    }
}

fn patch_names(status: &serde_json::Value) -> Vec<String> {
    status["patches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect()
}

// 1. Missing symbols.

const PATCH_MISSING_IN_MAIN: &str = r#"
#include <livepatch.h>
static int new_value(void) { return 3; }
static struct klp_func funcs[] = {
    { .old_name = "value", .new_func = new_value },
    { .old_name = "no_such_function", .new_func = new_value },
    { }
};
static struct klp_object objs[] = { { .name = NULL, .funcs = funcs }, { } };
static struct klp_patch patch = { .objs = objs };
KLP_PATCH(patch);
"#;

#[test]
fn a_function_missing_from_the_program_is_refused_before_anything_is_written() {
    let program = program("refuse_missing_main_prog", BASIC);
    let bad = compile("refuse-missing-main", PATCH_MISSING_IN_MAIN, true);
    let fix = compile("refuse-missing-main-fix", PATCH_VALUE, true);
    let mut target = Target::start(&program);
    let pid = target.pid();
    let before = snapshot(&mut target, &["value", "other"], &["value"]);
    let log_before = agent_log(&pid).len();

    let out = load(&pid, &bad);
    assert_refused(
        &out,
        &[
            "'refuse-missing-main'",
            "'no_such_function'",
            "'vmlinux'",
            "not found",
        ],
    );
    // The kernel fails in klp_init_object_loaded, before "enabling patch": one line, no
    // transition started and cancelled.
    assert_eq!(
        agent_log(&pid)[log_before..],
        ["livepatch: symbol 'no_such_function' not found in symbol table"]
    );
    assert_eq!(
        snapshot(&mut target, &["value", "other"], &["value"]),
        before
    );
    assert_eq!(before.status["transition"], serde_json::Value::Null);

    assert_loads(&pid, &fix);
    assert_eq!(call(&mut target, "value"), "call value = 2");
}

const TARGET_LIBRARY: &str = r#"
__attribute__((noinline, noipa)) int lib_value(void) { return 10; }
__attribute__((noinline, noipa)) int lib_other(void) { return 11; }
"#;

/// Opens the library `argv[1]` before it is ready, so the library is there when patches come.
const LIBRARY_HOST: &str = r#"
KEEP int value(void) { return 1; }
static int setup(int argc, char **argv) {
    if (argc < 2) { puts("usage: host LIBRARY"); return 1; }
    void *lib = dlopen(argv[1], RTLD_NOW);
    if (!lib) { printf("dlopen failed: %s\n", dlerror()); return 1; }
    int_fn lib_value = (int_fn)dlsym(lib, "lib_value");
    int_fn lib_other = (int_fn)dlsym(lib, "lib_other");
    if (!lib_value || !lib_other) { puts("library symbols missing"); return 1; }
    add("value", value, (const void *)value);
    add("lib_value", lib_value, (const void *)lib_value);
    add("lib_other", lib_other, (const void *)lib_other);
    return 0;
}
static int command(const char *line) { (void)line; return 0; }
"#;

const PATCH_MISSING_IN_LIBRARY: &str = r#"
#include <livepatch.h>
static int new_lib_value(void) { return 12; }
static struct klp_func funcs[] = {
    { .old_name = "lib_value", .new_func = new_lib_value },
    { .old_name = "lib_no_such_function", .new_func = new_lib_value },
    { }
};
static struct klp_object objs[] = { { .name = "refuse_missing_lib_target.so", .funcs = funcs }, { } };
static struct klp_patch patch = { .objs = objs };
KLP_PATCH(patch);
"#;

const PATCH_LIBRARY_VALUE: &str = r#"
#include <livepatch.h>
static int new_lib_value(void) { return 12; }
static struct klp_func funcs[] = { { .old_name = "lib_value", .new_func = new_lib_value }, { } };
static struct klp_object objs[] = { { .name = "refuse_missing_lib_target.so", .funcs = funcs }, { } };
static struct klp_patch patch = { .objs = objs };
KLP_PATCH(patch);
"#;

#[test]
fn a_function_missing_from_a_named_library_is_refused_naming_the_library() {
    let library = compile("refuse_missing_lib_target", TARGET_LIBRARY, true);
    let program = program("refuse_missing_lib_prog", LIBRARY_HOST);
    let bad = compile("refuse-missing-lib", PATCH_MISSING_IN_LIBRARY, true);
    let fix = compile("refuse-missing-lib-fix", PATCH_LIBRARY_VALUE, true);
    let mut target = Target::start_with(&program, &[path_str(&library)], "ready");
    let pid = target.pid();
    let functions = ["value", "lib_value", "lib_other"];
    let before = snapshot(&mut target, &functions, &functions);

    let out = load(&pid, &bad);
    assert_refused(
        &out,
        &[
            "'refuse-missing-lib'",
            "'lib_no_such_function'",
            "'refuse_missing_lib_target.so'",
            "not found",
        ],
    );
    assert_eq!(snapshot(&mut target, &functions, &functions), before);

    assert_loads(&pid, &fix);
    assert_eq!(call(&mut target, "lib_value"), "call lib_value = 12");
    assert_eq!(call(&mut target, "lib_other"), "call lib_other = 11");
}

// 2. Ambiguous symbols.

const DUPLICATE_A: &str = r#"
static __attribute__((noinline, noipa)) int helper(void) { return 10; }
int call_a(void) { return helper(); }
void *helper_a(void) { return (void *)helper; }
"#;

const DUPLICATE_B: &str = r#"
static __attribute__((noinline, noipa)) int helper(void) { return 20; }
int call_b(void) { return helper(); }
void *helper_b(void) { return (void *)helper; }
"#;

const DUPLICATE_MAIN: &str = r#"
int call_a(void);
int call_b(void);
void *helper_a(void);
void *helper_b(void);
static int setup(int argc, char **argv) {
    (void)argc; (void)argv;
    add("call_a", call_a, (const void *)call_a);
    add("call_b", call_b, (const void *)call_b);
    add("helper_a", NULL, helper_a());
    add("helper_b", NULL, helper_b());
    return 0;
}
static int command(const char *line) { (void)line; return 0; }
"#;

/// `helper` at symbol position SYMPOS becomes 99.
const PATCH_HELPER: &str = r#"
#include <livepatch.h>
static int new_helper(void) { return 99; }
static struct klp_func funcs[] = {
    { .old_name = "helper", .new_func = new_helper, .old_sympos = SYMPOS },
    { }
};
static struct klp_object objs[] = { { .name = NULL, .funcs = funcs }, { } };
static struct klp_patch patch = { .objs = objs };
KLP_PATCH(patch);
"#;

/// main.c, a.c, b.c in this order: a.c's `helper` is first in the symbol table.
fn duplicate_program(name: &str) -> PathBuf {
    program_from_files(
        name,
        &[
            ("main", &format!("{HEAD}{DUPLICATE_MAIN}{MAIN}")),
            ("a", DUPLICATE_A),
            ("b", DUPLICATE_B),
        ],
    )
}

fn helper_patch(name: &str, sympos: u32) -> PathBuf {
    compile(
        name,
        &PATCH_HELPER.replace("SYMPOS", &sympos.to_string()),
        true,
    )
}

const DUPLICATE_CALLS: [&str; 2] = ["call_a", "call_b"];
const DUPLICATE_CODE: [&str; 2] = ["helper_a", "helper_b"];

#[test]
fn a_static_function_defined_in_two_files_needs_old_sympos() {
    let program = duplicate_program("refuse_ambiguous_prog");
    let bad = helper_patch("refuse-ambiguous", 0);
    let fix = helper_patch("refuse-ambiguous-second", 2);
    let mut target = Target::start(&program);
    let pid = target.pid();
    let before = snapshot(&mut target, &DUPLICATE_CALLS, &DUPLICATE_CODE);
    assert_eq!(before.answers, ["call call_a = 10", "call call_b = 20"]);

    let out = load(&pid, &bad);
    assert_refused(
        &out,
        &[
            "'refuse-ambiguous'",
            "'helper'",
            "2 times",
            "'vmlinux'",
            "old_sympos",
        ],
    );
    assert!(agent_log(&pid).contains(
        &"livepatch: unresolvable ambiguity for symbol 'helper' in object 'vmlinux'".to_owned()
    ));
    assert_eq!(
        snapshot(&mut target, &DUPLICATE_CALLS, &DUPLICATE_CODE),
        before
    );

    // Position 2 is b.c's helper: only it changes.
    assert_loads(&pid, &fix);
    let after = snapshot(&mut target, &DUPLICATE_CALLS, &DUPLICATE_CODE);
    assert_eq!(after.answers, ["call call_a = 10", "call call_b = 99"]);
    assert_eq!(after.code[0], before.code[0]);
    assert_ne!(after.code[1], before.code[1]);
    let func = &after.status["patches"][0]["objects"][0]["funcs"][0];
    assert_eq!(func["name"], "helper", "{func}");
    assert_eq!(func["sympos"], 2, "{func}");
}

#[test]
fn an_old_sympos_past_the_last_match_is_refused() {
    let program = duplicate_program("refuse_sympos_prog");
    let bad = helper_patch("refuse-sympos-past", 3);
    let fix = helper_patch("refuse-sympos-first", 1);
    let mut target = Target::start(&program);
    let pid = target.pid();
    let before = snapshot(&mut target, &DUPLICATE_CALLS, &DUPLICATE_CODE);

    let out = load(&pid, &bad);
    assert_refused(
        &out,
        &[
            "'refuse-sympos-past'",
            "position 3",
            "'helper'",
            "'vmlinux'",
            "not found",
        ],
    );
    assert!(
        agent_log(&pid).contains(
            &"livepatch: symbol position 3 for symbol 'helper' in object 'vmlinux' not found"
                .to_owned()
        )
    );
    assert_eq!(
        snapshot(&mut target, &DUPLICATE_CALLS, &DUPLICATE_CODE),
        before
    );

    assert_loads(&pid, &fix);
    let after = snapshot(&mut target, &DUPLICATE_CALLS, &DUPLICATE_CODE);
    assert_eq!(after.answers, ["call call_a = 99", "call call_b = 20"]);
    assert_ne!(after.code[0], before.code[0]);
    assert_eq!(after.code[1], before.code[1]);
}

// 3. Build ids.

const FAKE_BUILD_ID: &str = "deadbeefdeadbeefdeadbeefdeadbeefdeadbeef";

const PATCH_VALUE_FOR_BUILD: &str = r#"
#include <livepatch.h>
static int new_value(void) { return 2; }
static struct klp_func funcs[] = { { .old_name = "value", .new_func = new_value }, { } };
static struct klp_object objs[] = { { .name = NULL, .funcs = funcs, .build_id = "BUILD_ID" }, { } };
static struct klp_patch patch = { .objs = objs };
KLP_PATCH(patch);
"#;

#[test]
fn a_patch_written_for_another_build_of_the_program_is_refused_naming_both_ids() {
    let program = program("refuse_build_prog", BASIC);
    let real_id = build_id(&program);
    let bad = compile(
        "refuse-build-wrong",
        &PATCH_VALUE_FOR_BUILD.replace("BUILD_ID", FAKE_BUILD_ID),
        true,
    );
    let fix = compile(
        "refuse-build-right",
        &PATCH_VALUE_FOR_BUILD.replace("BUILD_ID", &real_id),
        true,
    );
    let mut target = Target::start(&program);
    let pid = target.pid();
    let before = snapshot(&mut target, &["value", "other"], &["value"]);

    let out = load(&pid, &bad);
    assert_refused(
        &out,
        &["'refuse-build-wrong'", "'vmlinux'", &real_id, FAKE_BUILD_ID],
    );
    assert_eq!(
        snapshot(&mut target, &["value", "other"], &["value"]),
        before
    );

    assert_loads(&pid, &fix);
    assert_eq!(call(&mut target, "value"), "call value = 2");
}

/// Opens the library `argv[1]` only when told: `load`, and `loaded?` to ask the dynamic
/// linker whether it is there.
const LATER_HOST: &str = r#"
KEEP int value(void) { return 1; }
static const char *library;
static int setup(int argc, char **argv) {
    if (argc < 2) { puts("usage: host LIBRARY"); return 1; }
    library = argv[1];
    add("value", value, (const void *)value);
    return 0;
}
static int command(const char *line) {
    if (!strcmp(line, "load")) {
        void *lib = dlopen(library, RTLD_NOW);
        if (!lib) {
            const char *why = dlerror();
            printf("load failed: %s\n", why ? why : "(dlerror says nothing)");
            return 1;
        }
        int_fn lib_value = (int_fn)dlsym(lib, "lib_value");
        printf("loaded: lib_value() = %d\n", lib_value ? lib_value() : -1);
        return 1;
    }
    if (!strcmp(line, "loaded?")) {
        void *lib = dlopen(library, RTLD_NOW | RTLD_NOLOAD);
        printf("library loaded: %s\n", lib ? "yes" : "no");
        if (lib) dlclose(lib);
        return 1;
    }
    return 0;
}
"#;

const PATCH_LATER_FOR_BUILD: &str = r#"
#include <livepatch.h>
static int new_lib_value(void) { return 31; }
static struct klp_func funcs[] = { { .old_name = "lib_value", .new_func = new_lib_value }, { } };
static struct klp_object objs[] = {
    { .name = "refuse_later_target.so", .funcs = funcs, .build_id = "BUILD_ID" },
    { }
};
static struct klp_patch patch = { .objs = objs };
KLP_PATCH(patch);
"#;

#[test]
fn a_library_loaded_later_from_another_build_fails_to_open_and_the_program_runs_on() {
    let library = compile("refuse_later_target", TARGET_LIBRARY, true);
    let library_id = build_id(&library);
    let program = program("refuse_later_prog", LATER_HOST);
    let wrong = compile(
        "refuse-later-wrong",
        &PATCH_LATER_FOR_BUILD.replace("BUILD_ID", FAKE_BUILD_ID),
        true,
    );
    let right = compile(
        "refuse-later-right",
        &PATCH_LATER_FOR_BUILD.replace("BUILD_ID", &library_id),
        true,
    );
    let mut target = Target::start_with(&program, &[path_str(&library)], "ready");
    let pid = target.pid();

    // The library is not there yet: nothing to check, the patch waits for it.
    assert_loads(&pid, &wrong);
    let status = status_json(&pid);
    assert_eq!(
        status["patches"][0]["name"], "refuse-later-wrong",
        "{status}"
    );
    assert_eq!(status["patches"][0]["enabled"], true, "{status}");
    let object = &status["patches"][0]["objects"][0];
    assert_eq!(object["name"], "refuse_later_target.so", "{status}");
    assert_eq!(object["patched"], false, "{status}");

    target.send("load");
    let failed = target.expect("load failed");
    target.send("loaded?");
    target.expect("library loaded: no");
    assert_eq!(call(&mut target, "value"), "call value = 1");
    let log = agent_log(&pid);
    assert!(
        log.iter().any(|l| l.contains("refuse_later_target.so")
            && l.contains(&library_id)
            && l.contains(FAKE_BUILD_ID)),
        "no log line names the library and both build ids: {log:#?}"
    );
    assert_eq!(status_json(&pid), status);

    assert_succeeds(&["disable", &pid, "refuse-later-wrong"]);
    assert_succeeds(&["unload", &pid, "refuse-later-wrong"]);
    assert_loads(&pid, &right);
    target.send("load");
    target.expect("loaded: lib_value() = 31");

    // dlopen(3): after a NULL return, dlerror() describes the error; programs print it, some
    // without checking it for NULL.
    assert!(
        !failed.contains("(dlerror says nothing)") && failed.contains("refuse_later_target.so"),
        "the program's dlerror() does not say why: {failed:?}"
    );
}

// 4. Functions that cannot be redirected.

/// `tiny` is a lone `ret` (1 byte); `loopy` jumps back to offset 2, inside the 5 bytes a
/// jump would overwrite.
const UNPATCHABLE: &str = r#"
KEEP int value(void) { return 1; }
void tiny(void);
int loopy(void);
__asm__(
    ".text\n"
    ".globl tiny\n"
    ".type tiny, @function\n"
    "tiny:\n"
    "\tret\n"
    ".size tiny, .-tiny\n"
    ".globl loopy\n"
    ".type loopy, @function\n"
    "loopy:\n"
    "\txorl %eax, %eax\n"
    "1:\tincl %eax\n"
    "\tcmpl $3, %eax\n"
    "\tjne 1b\n"
    "\tret\n"
    ".size loopy, .-loopy\n");
KEEP static int run_tiny(void) { tiny(); return 42; }
static int setup(int argc, char **argv) {
    (void)argc; (void)argv;
    add("value", value, (const void *)value);
    add("tiny", run_tiny, (const void *)tiny);
    add("loopy", loopy, (const void *)loopy);
    return 0;
}
static int command(const char *line) { (void)line; return 0; }
"#;

/// `value` first, so a refusal of the second function must leave the first unwritten too.
const PATCH_UNPATCHABLE: &str = r#"
#include <livepatch.h>
static int new_value(void) { return 2; }
static void new_tiny(void) { }
static int new_loopy(void) { return 4; }
static struct klp_func funcs[] = {
    { .old_name = "value", .new_func = new_value },
    { .old_name = "FUNCTION", .new_func = NEW_FUNCTION },
    { }
};
static struct klp_object objs[] = { { .name = NULL, .funcs = funcs }, { } };
static struct klp_patch patch = { .objs = objs };
KLP_PATCH(patch);
"#;

const UNPATCHABLE_FUNCTIONS: [&str; 3] = ["value", "tiny", "loopy"];

fn refuse_unpatchable(function: &str, reason: &str) {
    let program = program(&format!("refuse_unpatchable_{function}_prog"), UNPATCHABLE);
    let name = format!("refuse-unpatchable-{function}");
    let bad = compile(
        &name,
        &PATCH_UNPATCHABLE
            .replace("NEW_FUNCTION", &format!("new_{function}"))
            .replace("FUNCTION", function),
        true,
    );
    let fix = compile(&format!("{name}-fix"), PATCH_VALUE, true);
    let mut target = Target::start(&program);
    let pid = target.pid();
    let before = snapshot(&mut target, &UNPATCHABLE_FUNCTIONS, &UNPATCHABLE_FUNCTIONS);
    assert_eq!(
        before.answers,
        ["call value = 1", "call tiny = 42", "call loopy = 3"]
    );

    let out = load(&pid, &bad);
    assert_refused(
        &out,
        &[&format!("'{name}'"), &format!("'{function}'"), reason],
    );
    assert!(
        agent_log(&pid).contains(&format!(
            "livepatch: failed to find location for function '{function}'"
        )),
        "{:#?}",
        agent_log(&pid)
    );
    assert_eq!(
        snapshot(&mut target, &UNPATCHABLE_FUNCTIONS, &UNPATCHABLE_FUNCTIONS),
        before
    );

    assert_loads(&pid, &fix);
    assert_eq!(call(&mut target, "value"), "call value = 2");
}

#[test]
fn a_function_shorter_than_a_jump_is_refused_with_its_length() {
    refuse_unpatchable("tiny", "1 bytes long, too short for a 5-byte jump");
}

#[test]
fn a_function_branching_into_its_first_bytes_is_refused_with_the_branch() {
    refuse_unpatchable("loopy", "lands at offset 0x2");
}

// 5. System states.

const PATCH_STATE: &str = r#"
#include <livepatch.h>
static int new_value(void) { return RESULT; }
static struct klp_func funcs[] = { { .old_name = "value", .new_func = new_value }, { } };
static struct klp_object objs[] = { { .name = NULL, .funcs = funcs }, { } };
static struct klp_state states[] = { { .id = 7, .version = VERSION }, { } };
static struct klp_patch patch = { .objs = objs, .states = states, .replace = REPLACE };
KLP_PATCH(patch);
"#;

fn state_patch(name: &str, version: u32, replace: bool, result: i32) -> PathBuf {
    let source = PATCH_STATE
        .replace("RESULT", &result.to_string())
        .replace("VERSION", &version.to_string())
        .replace("REPLACE", &replace.to_string());
    compile(name, &source, true)
}

#[test]
fn a_replacing_patch_with_an_older_state_version_is_refused_with_einval() {
    let program = program("refuse_state_prog", BASIC);
    let first = state_patch("refuse-state-v2", 2, false, 2);
    let older = state_patch("refuse-state-v1-replace", 1, true, 3);
    let same = state_patch("refuse-state-v2-replace", 2, true, 4);
    let mut target = Target::start(&program);
    let pid = target.pid();
    assert_loads(&pid, &first);
    let before = snapshot(&mut target, &["value", "other"], &["value"]);
    assert_eq!(before.answers[0], "call value = 2");
    let log_before = agent_log(&pid).len();

    let out = load(&pid, &older);
    assert_refused(
        &out,
        &[
            "'refuse-state-v1-replace'",
            "'refuse-state-v2'",
            "state 7",
            "version 1",
            "not compatible",
        ],
    );
    // As klp_enable_patch: the compatibility check comes before "enabling patch".
    assert_eq!(
        agent_log(&pid)[log_before..],
        [
            "livepatch: Livepatch patch (refuse-state-v1-replace) is not compatible with the already installed livepatches."
        ]
    );
    assert_eq!(
        snapshot(&mut target, &["value", "other"], &["value"]),
        before
    );
    let (errno, _) = refusal_errno(&pid, load_request(&older));
    assert_eq!(errno, EINVAL);

    assert_loads(&pid, &same);
    assert_eq!(call(&mut target, "value"), "call value = 4");
    assert_eq!(patch_names(&status_json(&pid)), ["refuse-state-v2-replace"]);
}

// 6. A failing pre_patch callback.

const PATCH_PRE_PATCH_FAILS: &str = r#"
#include <livepatch.h>
static const char *name_of(struct klp_object *obj) { return obj->name ? obj->name : "vmlinux"; }
static int pre_patch(struct klp_object *obj) {
    klp_log("pre_patch_callback: %s", name_of(obj));
    return -19;
}
static void post_patch(struct klp_object *obj) { klp_log("post_patch_callback: %s", name_of(obj)); }
static void pre_unpatch(struct klp_object *obj) { klp_log("pre_unpatch_callback: %s", name_of(obj)); }
static void post_unpatch(struct klp_object *obj) { klp_log("post_unpatch_callback: %s", name_of(obj)); }
static int new_value(void) { return 2; }
static struct klp_func funcs[] = { { .old_name = "value", .new_func = new_value }, { } };
static struct klp_object objs[] = {
    { .name = NULL, .funcs = funcs, .callbacks = {
        .pre_patch = pre_patch, .post_patch = post_patch,
        .pre_unpatch = pre_unpatch, .post_unpatch = post_unpatch } },
    { }
};
static struct klp_patch patch = { .objs = objs };
KLP_PATCH(patch);
"#;

#[test]
fn a_pre_patch_callback_failing_with_enodev_refuses_the_patch_as_the_kernel_does() {
    let program = program("refuse_pre_patch_prog", BASIC);
    let bad = compile("refuse-pre-patch", PATCH_PRE_PATCH_FAILS, true);
    let fix = compile("refuse-pre-patch-fix", PATCH_VALUE, true);
    let mut target = Target::start(&program);
    let pid = target.pid();
    let before = snapshot(&mut target, &["value", "other"], &["value"]);
    let log_before = agent_log(&pid).len();

    let out = load(&pid, &bad);
    assert_refused(
        &out,
        &["'refuse-pre-patch'", "pre_patch", "'vmlinux'", "-19"],
    );
    // The kernel selftest "pre-patch callback -ENODEV": no post_unpatch, since pre_patch failed.
    assert_eq!(
        agent_log(&pid)[log_before..],
        [
            "livepatch: enabling patch 'refuse-pre-patch'",
            "livepatch: 'refuse-pre-patch': initializing patching transition",
            "pre_patch_callback: vmlinux",
            "livepatch: pre-patch callback failed for object 'vmlinux'",
            "livepatch: failed to enable patch 'refuse-pre-patch'",
            "livepatch: 'refuse-pre-patch': canceling patching transition, going to unpatch",
            "livepatch: 'refuse-pre-patch': completing unpatching transition",
            "livepatch: 'refuse-pre-patch': unpatching complete",
        ]
    );
    assert_eq!(
        snapshot(&mut target, &["value", "other"], &["value"]),
        before
    );
    let (errno, _) = refusal_errno(&pid, load_request(&bad));
    assert_eq!(errno, ENODEV);

    assert_loads(&pid, &fix);
    assert_eq!(call(&mut target, "value"), "call value = 2");
}

// 7. A failing state setup callback.

const PATCH_STATE_SETUP: &str = r#"
#include <livepatch.h>
static int setup(struct klp_patch *patch, struct klp_state *state) {
    (void)patch;
    klp_log("TAG: setup_callback: state %lu", state->id);
    return SETUP_RESULT;
}
static void enable(struct klp_patch *patch, struct klp_state *state) {
    (void)patch;
    klp_log("TAG: enable_callback: state %lu", state->id);
}
static void release(struct klp_patch *patch, struct klp_state *state) {
    (void)patch;
    klp_log("TAG: release_callback: state %lu", state->id);
}
static int pre_patch(struct klp_object *obj) { (void)obj; klp_log("TAG: pre_patch_callback"); return 0; }
static void post_unpatch(struct klp_object *obj) { (void)obj; klp_log("TAG: post_unpatch_callback"); }
static int new_value(void) { return 2; }
static struct klp_func funcs[] = { { .old_name = "value", .new_func = new_value }, { } };
static struct klp_object objs[] = {
    { .name = NULL, .funcs = funcs, .callbacks = { .pre_patch = pre_patch, .post_unpatch = post_unpatch } },
    { }
};
static struct klp_state states[] = {
    { .id = 9, .version = 1, .callbacks = { .setup = setup, .enable = enable, .release = release } },
    { }
};
static struct klp_patch patch = { .objs = objs, .states = states };
KLP_PATCH(patch);
"#;

fn setup_patch(name: &str, setup_result: i32) -> PathBuf {
    let source = PATCH_STATE_SETUP
        .replace("TAG", name)
        .replace("SETUP_RESULT", &setup_result.to_string());
    compile(name, &source, true)
}

#[test]
fn a_failing_state_setup_refuses_the_patch_without_releasing_the_state() {
    let program = program("refuse_setup_prog", BASIC);
    let bad = setup_patch("refuse-setup", -ENOMEM);
    let fix = setup_patch("refuse-setup-fix", 0);
    let mut target = Target::start(&program);
    let pid = target.pid();
    let before = snapshot(&mut target, &["value", "other"], &["value"]);
    let log_before = agent_log(&pid).len();

    let out = load(&pid, &bad);
    assert_refused(&out, &["'refuse-setup'", "setup", "state 9", "-12"]);
    // Setup runs before any pre_patch; nothing was set up, so nothing is released, and no
    // object callback runs at all.
    assert_eq!(
        agent_log(&pid)[log_before..],
        [
            "livepatch: enabling patch 'refuse-setup'",
            "livepatch: 'refuse-setup': initializing patching transition",
            "refuse-setup: setup_callback: state 9",
            "livepatch: failed to enable patch 'refuse-setup'",
            "livepatch: 'refuse-setup': canceling patching transition, going to unpatch",
            "livepatch: 'refuse-setup': completing unpatching transition",
            "livepatch: 'refuse-setup': unpatching complete",
        ]
    );
    assert_eq!(
        snapshot(&mut target, &["value", "other"], &["value"]),
        before
    );
    let (errno, _) = refusal_errno(&pid, load_request(&bad));
    assert_eq!(errno, ENOMEM);

    // The state is still new to the process: the next patch carrying it sets it up again.
    let log_before = agent_log(&pid).len();
    assert_loads(&pid, &fix);
    assert_eq!(call(&mut target, "value"), "call value = 2");
    let log = agent_log(&pid);
    for line in [
        "refuse-setup-fix: setup_callback: state 9",
        "refuse-setup-fix: pre_patch_callback",
        "refuse-setup-fix: enable_callback: state 9",
    ] {
        assert!(
            log[log_before..].iter().any(|l| l == line),
            "no {line:?} in {:#?}",
            &log[log_before..]
        );
    }
}

// 8. Another transition running.

/// A worker thread can be sent into `stuck`, which it leaves only when released.
const BUSY: &str = r#"
volatile int release_worker;
KEEP int value(void) { return 1; }
KEEP int other(void) { return 7; }
KEEP int stuck(void) {
    puts("worker: inside stuck");
    while (!release_worker) __asm__ volatile("pause");
    puts("worker: left stuck");
    return 0;
}
static pthread_t worker_thread;
static void *worker(void *arg) { (void)arg; stuck(); return NULL; }
static int setup(int argc, char **argv) {
    (void)argc; (void)argv;
    add("value", value, (const void *)value);
    add("other", other, (const void *)other);
    add("stuck", NULL, (const void *)stuck);
    return 0;
}
static int command(const char *line) {
    if (!strcmp(line, "worker")) {
        release_worker = 0;
        pthread_create(&worker_thread, NULL, worker, NULL);
        return 1;
    }
    if (!strcmp(line, "release")) {
        release_worker = 1;
        pthread_join(worker_thread, NULL);
        puts("joined");
        return 1;
    }
    return 0;
}
"#;

const PATCH_OTHER: &str = r#"
#include <livepatch.h>
static int new_other(void) { return 8; }
static struct klp_func funcs[] = { { .old_name = "other", .new_func = new_other }, { } };
static struct klp_object objs[] = { { .name = NULL, .funcs = funcs }, { } };
static struct klp_patch patch = { .objs = objs };
KLP_PATCH(patch);
"#;

const PATCH_STUCK: &str = r#"
#include <livepatch.h>
#include <stdio.h>
extern volatile int release_worker;
static int new_value(void) { return 2; }
static int new_stuck(void) {
    puts("worker: inside new stuck");
    while (!release_worker) __asm__ volatile("pause");
    puts("worker: left new stuck");
    return 0;
}
static struct klp_func funcs[] = {
    { .old_name = "value", .new_func = new_value },
    { .old_name = "stuck", .new_func = new_stuck },
    { }
};
static struct klp_object objs[] = { { .name = NULL, .funcs = funcs }, { } };
static struct klp_patch patch = { .objs = objs };
KLP_PATCH(patch);
"#;

const PATCH_VALUE_3: &str = r#"
#include <livepatch.h>
static int new_value(void) { return 3; }
static struct klp_func funcs[] = { { .old_name = "value", .new_func = new_value }, { } };
static struct klp_object objs[] = { { .name = NULL, .funcs = funcs }, { } };
static struct klp_patch patch = { .objs = objs };
KLP_PATCH(patch);
"#;

#[test]
fn while_a_transition_runs_other_loads_disables_and_its_unload_are_refused_with_ebusy() {
    let program = program("refuse_busy_prog", BUSY);
    let done = compile("refuse-busy-done", PATCH_OTHER, true);
    let stuck = compile("refuse-busy-stuck", PATCH_STUCK, true);
    let second = compile("refuse-busy-second", PATCH_VALUE_3, true);
    let mut target = Target::start(&program);
    let pid = target.pid();
    assert_loads(&pid, &done);
    target.send("worker");
    target.expect("worker: inside stuck");
    let load_stuck = cli(&["load", &pid, path_str(&stuck), "--timeout", "1"]);
    assert_eq!(load_stuck.status.code(), Some(3), "{}", stderr(&load_stuck));
    let calls = ["value", "other"];
    let code_of = ["value", "other", "stuck"];
    let before = snapshot(&mut target, &calls, &code_of);
    assert_eq!(before.answers, ["call value = 2", "call other = 8"]);
    assert_eq!(
        before.status["transition"]["patch"], "refuse-busy-stuck",
        "{}",
        before.status
    );

    let out = load(&pid, &second);
    assert_refused(
        &out,
        &[
            "'refuse-busy-second'",
            "'refuse-busy-stuck'",
            "in transition",
        ],
    );
    let out = cli(&["disable", &pid, "refuse-busy-done"]);
    assert_refused(&out, &["'refuse-busy-stuck'", "in transition"]);
    let out = cli(&["unload", &pid, "refuse-busy-stuck"]);
    assert_refused(&out, &["'refuse-busy-stuck'", "in transition"]);
    let out = cli(&["enable", &pid, "refuse-busy-stuck"]);
    assert_refused(&out, &["'refuse-busy-stuck'", "already in transition"]);
    assert_eq!(snapshot(&mut target, &calls, &code_of), before);

    let busy = [
        load_request(&second),
        protocol::Command::Disable {
            patch: "refuse-busy-done".into(),
        },
        protocol::Command::Unload {
            patch: "refuse-busy-stuck".into(),
        },
    ];
    for request in busy {
        let (errno, message) = refusal_errno(&pid, request.clone());
        assert_eq!(errno, EBUSY, "{request:?}: {message}");
    }
    let (errno, _) = refusal_errno(
        &pid,
        protocol::Command::Enable {
            patch: "refuse-busy-stuck".into(),
        },
    );
    assert_eq!(errno, EINVAL);

    // The worker leaves the old function: the first transition completes by itself, and the
    // refused patch now loads.
    target.send("release");
    target.expect("worker: left stuck");
    target.expect("joined");
    target.saw_or_expect("livepatch: 'refuse-busy-stuck': patching complete");
    assert_eq!(status_json(&pid)["transition"], serde_json::Value::Null);
    assert_loads(&pid, &second);
    assert_eq!(call(&mut target, "value"), "call value = 3");
    assert_eq!(
        patch_names(&status_json(&pid)),
        [
            "refuse-busy-done",
            "refuse-busy-stuck",
            "refuse-busy-second"
        ]
    );
}

// 9. Unload while enabled.

#[test]
fn an_enabled_patch_cannot_be_unloaded_until_it_is_disabled() {
    let program = program("refuse_unload_prog", BASIC);
    let patch = compile("refuse-unload-enabled", PATCH_VALUE, true);
    let mut target = Target::start(&program);
    let pid = target.pid();
    let original = snapshot(&mut target, &["value", "other"], &["value"]);
    assert_loads(&pid, &patch);
    let before = snapshot(&mut target, &["value", "other"], &["value"]);
    assert_eq!(before.answers[0], "call value = 2");

    let out = cli(&["unload", &pid, "refuse-unload-enabled"]);
    assert_refused(&out, &["'refuse-unload-enabled'", "is enabled", "disable"]);
    assert_eq!(
        snapshot(&mut target, &["value", "other"], &["value"]),
        before
    );
    let (errno, _) = refusal_errno(
        &pid,
        protocol::Command::Unload {
            patch: "refuse-unload-enabled".into(),
        },
    );
    assert_eq!(errno, EBUSY);

    assert_succeeds(&["disable", &pid, "refuse-unload-enabled"]);
    assert_succeeds(&["unload", &pid, "refuse-unload-enabled"]);
    assert_eq!(
        snapshot(&mut target, &["value", "other"], &["value"]),
        original
    );
}

// 10. Malformed patch libraries.

/// Loads `bad`, expects a refusal naming `names`, checks nothing changed, then loads a
/// correct patch.
fn refuse_malformed(test: &str, bad: &Path, names: &[&str]) -> String {
    let program = program(&format!("{test}_prog"), BASIC);
    let fix = compile(&format!("{test}-fix"), PATCH_VALUE, true);
    let mut target = Target::start(&program);
    let pid = target.pid();
    let before = snapshot(&mut target, &["value", "other"], &["value"]);

    let message = assert_refused(&load(&pid, bad), names);
    assert_eq!(
        snapshot(&mut target, &["value", "other"], &["value"]),
        before
    );
    assert_eq!(before.status["patches"], serde_json::json!([]));

    assert_loads(&pid, &fix);
    assert_eq!(call(&mut target, "value"), "call value = 2");
    message
}

#[test]
fn a_library_without_klp_patch_is_refused_as_not_a_patch() {
    let bad = compile(
        "refuse-no-declaration",
        "int unrelated(void) { return 0; }\n",
        true,
    );
    refuse_malformed(
        "refuse_no_declaration",
        &bad,
        &["refuse-no-declaration.so", "KLP_PATCH"],
    );
}

#[test]
fn a_patch_path_that_does_not_exist_is_refused_naming_the_path() {
    let missing = scratch().join("refuse-no-such-patch.so");
    refuse_malformed(
        "refuse_no_such_path",
        &missing,
        &["refuse-no-such-patch.so", "No such file"],
    );
}

#[test]
fn a_file_that_is_not_a_shared_library_is_refused_with_the_loader_reason() {
    let bad = scratch().join("refuse-not-elf.so");
    // Longer than an ELF header, so the loader reads it and rejects the header.
    std::fs::write(&bad, "this is not an ELF file\n".repeat(8)).unwrap();
    refuse_malformed(
        "refuse_not_elf",
        &bad,
        &["refuse-not-elf.so", "cannot load patch library", "ELF"],
    );
}

const PATCH_NULL_FUNCS: &str = r#"
#include <livepatch.h>
static int new_value(void) { return 5; }
static struct klp_func funcs[] = { { .old_name = "value", .new_func = new_value }, { } };
static struct klp_object objs[] = {
    { .name = NULL, .funcs = funcs },
    { .name = "libc.so.6", .funcs = NULL },
    { }
};
static struct klp_patch patch = { .objs = objs };
KLP_PATCH(patch);
"#;

#[test]
fn an_object_with_null_funcs_is_refused_as_malformed() {
    let bad = compile("refuse-null-funcs", PATCH_NULL_FUNCS, true);
    refuse_malformed(
        "refuse_null_funcs",
        &bad,
        &[
            "refuse-null-funcs",
            "malformed",
            "funcs",
            "'libc.so.6'",
            "NULL",
        ],
    );
}
