//! End-to-end: the stack check walks stacks by their unwind tables, so a stale word that only
//! looks like a return address into a patched function holds nothing, while a thread really
//! inside one still holds the transition.
mod support;

use serde_json::Value;
use support::{Target, cli, compile, status_json, stderr};

/// A service whose idle reader thread sleeps in `read()` with words in its frame that look like
/// return addresses into `value()` and `stuck()` (the byte before each is the function's first,
/// as the byte before a real return address is its call's last), and a worker that can be sent
/// into `stuck()`, which it leaves only when released.
const SERVICE: &str = r#"
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

volatile int release_worker;
static int pipe_fds[2];

static long tid(void) { return (long)syscall(SYS_gettid); }

__attribute__((noinline, noipa)) int value(void) { return 1; }
__attribute__((noinline, noipa)) void stuck(void) {
    printf("worker: inside stuck, tid %ld\n", tid());
    while (!release_worker) __asm__ volatile("pause");
    puts("worker: left stuck");
}
static void *worker(void *arg) { (void)arg; stuck(); return NULL; }

static void *idle_reader(void *arg) {
    (void)arg;
    volatile uintptr_t stale[4];
    stale[0] = (uintptr_t)&value + 1;
    stale[1] = (uintptr_t)&stuck + 1;
    stale[2] = 0;
    stale[3] = 0;
    printf("reader: holding stale words, tid %ld\n", tid());
    char c;
    ssize_t n = read(pipe_fds[0], &c, 1);
    int kept = stale[0] == (uintptr_t)&value + 1 && stale[1] == (uintptr_t)&stuck + 1;
    printf("reader: read %zd, value %d, stale words %s\n", n, value(), kept ? "kept" : "lost");
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pipe(pipe_fds);
    pthread_t reader, busy;
    puts("ready");
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "value", 5)) printf("main: value %d\n", value());
        else if (!strncmp(line, "reader", 6)) pthread_create(&reader, NULL, idle_reader, NULL);
        else if (!strncmp(line, "write", 5)) { write(pipe_fds[1], "x", 1); pthread_join(reader, NULL); }
        else if (!strncmp(line, "worker", 6)) { release_worker = 0; pthread_create(&busy, NULL, worker, NULL); }
        else if (!strncmp(line, "release", 7)) { release_worker = 1; pthread_join(busy, NULL); puts("worker: joined"); }
    }
    return 0;
}
"#;

const PATCH: &str = r#"
#include <livepatch.h>
#include <stdio.h>
extern volatile int release_worker;
static int new_value(void) { return 2; }
static void new_stuck(void) {
    puts("worker: inside new stuck");
    while (!release_worker) __asm__ volatile("pause");
    puts("worker: left new stuck");
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

/// The number after the last space of a line such as "reader: ..., tid 1234".
fn last_number(line: &str) -> u64 {
    line.rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number at the end of {line:?}"))
}

fn thread(status: &Value, tid: u64) -> &Value {
    status["threads"]
        .as_array()
        .expect("threads is an array")
        .iter()
        .find(|t| t["tid"] == tid)
        .unwrap_or_else(|| panic!("no thread {tid} in {status}"))
}

fn pending_tids(status: &Value) -> Vec<u64> {
    status["threads"]
        .as_array()
        .expect("threads is an array")
        .iter()
        .filter(|t| t["pending"] == true)
        .map(|t| t["tid"].as_u64().expect("tid is a number"))
        .collect()
}

#[test]
fn stale_return_address_words_on_an_idle_stack_do_not_hold_the_transition() {
    let program = compile("unwinding_stale", SERVICE, false);
    let patch = compile("livepatch-unwinding-stale", PATCH, true);
    let mut target = Target::start(&program);
    let pid = target.pid();
    target.send("reader");
    let reader = last_number(&target.expect("reader: holding stale words"));

    // A conservative scan alone takes the reader's stale words for calls into both functions
    // and keeps it pending until the timeout (exit 3); the walk of its real frames finds none.
    let load = cli(&["load", &pid, patch.to_str().unwrap(), "--timeout", "10"]);
    assert!(load.status.success(), "{}", stderr(&load));
    target.saw_or_expect("livepatch: 'livepatch-unwinding-stale': patching complete");

    // The transition is over, the reader among the threads it switched (all idle again).
    let status = status_json(&pid);
    assert_eq!(status["transition"], Value::Null, "{status}");
    assert_eq!(thread(&status, reader)["pending"], false, "{status}");

    // The reader wakes up in the patched state, its words untouched.
    target.send("write");
    target.expect("reader: read 1, value 2, stale words kept");
}

#[test]
fn a_thread_inside_a_patched_function_holds_the_transition_beside_stale_words() {
    let program = compile("unwinding_busy", SERVICE, false);
    let patch = compile("livepatch-unwinding-busy", PATCH, true);
    let mut target = Target::start(&program);
    let pid = target.pid();
    target.send("reader");
    let reader = last_number(&target.expect("reader: holding stale words"));
    target.send("worker");
    let worker = last_number(&target.expect("worker: inside stuck"));

    let load = cli(&["load", &pid, patch.to_str().unwrap(), "--timeout", "1"]);
    assert_eq!(load.status.code(), Some(3), "{}", stderr(&load));
    let status = status_json(&pid);
    assert_eq!(
        status["transition"]["patch"], "livepatch-unwinding-busy",
        "{status}"
    );
    // Only the worker, really inside `stuck`, holds the transition; the reader switched.
    assert_eq!(pending_tids(&status), [worker], "{status}");
    assert_eq!(thread(&status, worker)["blocking"], "stuck", "{status}");
    assert_eq!(thread(&status, reader)["patch_state"], 1, "{status}");

    // Once the worker leaves the old function, the transition completes by itself.
    target.send("release");
    target.expect("worker: left stuck");
    target.expect("worker: joined");
    target.saw_or_expect("livepatch: 'livepatch-unwinding-busy': patching complete");
    target.send("write");
    target.expect("reader: read 1, value 2, stale words kept");
}
