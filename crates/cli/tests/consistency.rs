mod support;

// The per-thread consistency model on real processes: a thread never mixes old and new code,
// threads born during a transition start at its target, exited threads are forgotten, and only
// a patched function on a thread's stack (or a thread that cannot be examined) holds a
// transition.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Target, cli, compile, status_json, stderr};

/// Worker threads call `step()` in a loop; `step` calls `produce` and hands the item to
/// `consume`. Each function puts its version in its own decimal digit of the result (produce in
/// the ones, consume in the tens, step in the hundreds), so a worker sees exactly which versions
/// one call of `step` ran. With the argument `back-to-back` the workers do nothing between two
/// steps.
const PRODUCER_CONSUMER: &str = r#"
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#define WORKERS 4
static volatile int stop_workers;
static int back_to_back;
static atomic_int running;
static long same_v1[WORKERS], same_v2[WORKERS], mixed[WORKERS];
static char first_mixed[WORKERS][64];

__attribute__((noinline, noipa)) long produce(void) { return 1; }
__attribute__((noinline, noipa)) long consume(long item) { return 10 + item; }
/* The patchable entry: without it the call to produce sits in the bytes a plain entry relocates. */
__attribute__((noinline, noipa, patchable_function_entry(16, 14))) long step(void) {
    return 100 + consume(produce());
}

/* A moment outside every patched function between two steps, as real workers spend. */
__attribute__((noinline, noipa)) void other_work(void) {
    for (int i = 0; i < 3000; i++) __asm__ volatile("");
}

static void *worker(void *arg) {
    long id = (long)arg;
    atomic_fetch_add(&running, 1);
    while (!stop_workers) {
        if (!back_to_back) other_work();
        long r = step();
        long p = r % 10, c = r / 10 % 10, s = r / 100;
        if (p == 1 && c == 1 && s == 1) {
            same_v1[id]++;
        } else if (p == 2 && c == 2 && s == 2) {
            same_v2[id]++;
        } else if (mixed[id]++ == 0) {
            snprintf(first_mixed[id], sizeof first_mixed[id], "step-v%ld/produce-v%ld/consume-v%ld",
                     s, p, c);
            printf("MIXED %s\n", first_mixed[id]);
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    back_to_back = argc > 1 && !strcmp(argv[1], "back-to-back");
    pthread_t workers[WORKERS];
    for (long i = 0; i < WORKERS; i++) pthread_create(&workers[i], NULL, worker, (void *)i);
    /* Ready once every worker runs, so that the first patch meets them all at work. */
    while (atomic_load(&running) < WORKERS) __asm__ volatile("pause");
    puts("ready");
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "stop", 4)) {
            stop_workers = 1;
            long v1 = 0, v2 = 0, mix = 0;
            const char *first = "none";
            for (int i = 0; i < WORKERS; i++) {
                pthread_join(workers[i], NULL);
                v1 += same_v1[i];
                v2 += same_v2[i];
                mix += mixed[i];
                if (mixed[i] && !strcmp(first, "none")) first = first_mixed[i];
            }
            printf("totals v1=%ld v2=%ld mixed=%ld first-mixed=%s\n", v1, v2, mix, first);
        }
    }
    return 0;
}
"#;

/// Calls `produce` and `consume` through the program's symbols, so that each call goes through
/// the redirection and its per-thread decision like the old `step`'s calls do.
const PATCH_STEPS: &str = r#"
#include <livepatch.h>
extern long produce(void);
extern long consume(long item);
static long new_produce(void) { return 2; }
static long new_consume(long item) { return 20 + item; }
static long new_step(void) { return 200 + consume(produce()); }
static struct klp_func funcs[] = {
    { .old_name = "produce", .new_func = new_produce },
    { .old_name = "consume", .new_func = new_consume },
    { .old_name = "step", .new_func = new_step },
    { }
};
static struct klp_object objs[] = { { .name = NULL, .funcs = funcs }, { } };
static struct klp_patch patch = { .objs = objs };
KLP_PATCH(patch);
"#;

/// A spawner thread keeps creating short-lived threads, one about every millisecond; each calls
/// `version()` once and counts the answer under the phase the spawner was in when it created the
/// thread. Another thread can be sent into `stuck()` to hold a transition open.
const SPAWNER: &str = r#"
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PHASES 3
volatile int release_stuck;
static atomic_int phase;
static atomic_long ran[PHASES][3];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t changed = PTHREAD_COND_INITIALIZER;
static int want_pause, paused;

__attribute__((noinline, noipa)) int version(void) { return 1; }
__attribute__((noinline, noipa)) void stuck(void) {
    printf("stuck: inside old, tid %ld\n", (long)syscall(SYS_gettid));
    while (!release_stuck) __asm__ volatile("pause");
    puts("stuck: left old");
}

static void *short_lived(void *arg) {
    long born_in = (long)arg;
    atomic_fetch_add(&ran[born_in][version() == 2 ? 2 : 1], 1);
    return NULL;
}

static void *spawner(void *arg) {
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&lock);
        paused = want_pause;
        pthread_cond_broadcast(&changed);
        while (want_pause) pthread_cond_wait(&changed, &lock);
        paused = 0;
        pthread_mutex_unlock(&lock);
        pthread_t t;
        if (pthread_create(&t, NULL, short_lived, (void *)(long)atomic_load(&phase)) == 0)
            pthread_join(t, NULL);
        usleep(1000);
    }
    return NULL;
}

static void *stuck_thread(void *arg) { (void)arg; stuck(); return NULL; }

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_t s, t;
    pthread_create(&s, NULL, spawner, NULL);
    puts("ready");
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "stuck", 5)) {
            release_stuck = 0;
            pthread_create(&t, NULL, stuck_thread, NULL);
        } else if (!strncmp(line, "release", 7)) {
            release_stuck = 1;
            pthread_join(t, NULL);
            puts("stuck: joined");
        } else if (!strncmp(line, "phase ", 6)) {
            atomic_store(&phase, atoi(line + 6));
            printf("phase %d begins\n", atomic_load(&phase));
        } else if (!strncmp(line, "count ", 6)) {
            /* Waits for enough threads of the phase, at most ten seconds. */
            int p = atoi(line + 6);
            for (int i = 0; i < 10000 && ran[p][1] + ran[p][2] < 50; i++) usleep(1000);
            printf("born in phase %d: v1=%ld v2=%ld\n", p, atomic_load(&ran[p][1]),
                   atomic_load(&ran[p][2]));
        } else if (!strncmp(line, "pause", 5)) {
            pthread_mutex_lock(&lock);
            want_pause = 1;
            pthread_cond_broadcast(&changed);
            while (!paused) pthread_cond_wait(&changed, &lock);
            pthread_mutex_unlock(&lock);
            puts("spawner paused");
        } else if (!strncmp(line, "resume", 6)) {
            pthread_mutex_lock(&lock);
            want_pause = 0;
            pthread_cond_broadcast(&changed);
            pthread_mutex_unlock(&lock);
            puts("spawner resumed");
        }
    }
    return 0;
}
"#;

const PATCH_VERSION: &str = r#"
#include <livepatch.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>
extern volatile int release_stuck;
static int new_version(void) { return 2; }
static void new_stuck(void) {
    printf("stuck: inside new, tid %ld\n", (long)syscall(SYS_gettid));
    while (!release_stuck) __asm__ volatile("pause");
    puts("stuck: left new");
}
static struct klp_func funcs[] = {
    { .old_name = "version", .new_func = new_version },
    { .old_name = "stuck", .new_func = new_stuck },
    { }
};
static struct klp_object objs[] = { { .name = NULL, .funcs = funcs }, { } };
static struct klp_patch patch = { .objs = objs };
KLP_PATCH(patch);
"#;

/// A service whose main thread answers commands, with threads that can be started to spin in
/// unpatched code, to run with signals blocked, or to sleep in `read` and `pthread_cond_wait`.
/// Only `value()` is ever patched.
const SERVICE: &str = r#"
#include <errno.h>
#include <livepatch.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Defined by the preloaded agent; weak so that the program links without it. */
#pragma weak klp_update_patch_state

static volatile int stop_spinning;
static volatile unsigned long laps[2];
static atomic_int blocker_request;
static int pipe_fds[2];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static int woken;

static long tid(void) { return (long)syscall(SYS_gettid); }

__attribute__((noinline, noipa)) int value(void) { return 1; }

__attribute__((noinline, noipa)) void spin_unrelated(volatile unsigned long *counter) {
    while (!stop_spinning) { ++*counter; __asm__ volatile("pause"); }
}
static void *spinner(void *arg) { spin_unrelated(arg); return NULL; }

/* The agent's check signal: LIVEPATCH_SIGNAL when set, else its default. */
static int check_signal(void) {
    const char *chosen = getenv("LIVEPATCH_SIGNAL");
    return chosen ? atoi(chosen) : SIGRTMIN + 8;
}

enum { NOTHING, REPORT, SWITCH };
static void *blocker(void *every_signal) {
    sigset_t set;
    sigemptyset(&set);
    if (every_signal) sigfillset(&set);
    else sigaddset(&set, check_signal());
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    printf("blocker: %s blocked, tid %ld\n", every_signal ? "every signal" : "the check signal",
           tid());
    for (;;) {
        int request = atomic_exchange(&blocker_request, NOTHING);
        if (request == REPORT) {
            printf("blocker: value %d\n", value());
        } else if (request == SWITCH) {
            klp_update_patch_state();
            printf("blocker: passed its switch point, value %d\n", value());
        }
        __asm__ volatile("pause");
    }
    return NULL;
}

static void *reader(void *arg) {
    (void)arg;
    char c;
    printf("reader: tid %ld\n", tid());
    ssize_t n = read(pipe_fds[0], &c, 1);
    if (n == 1) printf("reader: read '%c', value %d\n", c, value());
    else printf("reader: read failed: %s\n", n < 0 ? strerror(errno) : "end of file");
    return NULL;
}

static void *waiter(void *arg) {
    (void)arg;
    pthread_mutex_lock(&lock);
    printf("waiter: tid %ld\n", tid());
    while (!woken) pthread_cond_wait(&wake, &lock);
    pthread_mutex_unlock(&lock);
    printf("waiter: woken, value %d\n", value());
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pipe(pipe_fds);
    pthread_t spinners[2], t;
    puts("ready");
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "value", 5)) {
            printf("main: value %d\n", value());
        } else if (!strncmp(line, "update", 6)) {
            klp_update_patch_state();
            printf("main: passed its switch point, value %d\n", value());
        } else if (!strncmp(line, "spin", 4)) {
            for (int i = 0; i < 2; i++)
                pthread_create(&spinners[i], NULL, spinner, (void *)&laps[i]);
            while (!laps[0] || !laps[1]) __asm__ volatile("pause");
            puts("spinners: spinning");
        } else if (!strncmp(line, "unspin", 6)) {
            stop_spinning = 1;
            for (int i = 0; i < 2; i++) pthread_join(spinners[i], NULL);
            puts("spinners: joined");
        } else if (!strncmp(line, "blocker-value", 13)) {
            atomic_store(&blocker_request, REPORT);
        } else if (!strncmp(line, "blocker-switch", 14)) {
            atomic_store(&blocker_request, SWITCH);
        } else if (!strncmp(line, "block-every-signal", 18)) {
            pthread_create(&t, NULL, blocker, "every");
        } else if (!strncmp(line, "block-check-signal", 18)) {
            pthread_create(&t, NULL, blocker, NULL);
        } else if (!strncmp(line, "read", 4)) {
            pthread_create(&t, NULL, reader, NULL);
        } else if (!strncmp(line, "write", 5)) {
            write(pipe_fds[1], "x", 1);
        } else if (!strncmp(line, "wait", 4)) {
            pthread_create(&t, NULL, waiter, NULL);
        } else if (!strncmp(line, "wake", 4)) {
            pthread_mutex_lock(&lock);
            woken = 1;
            pthread_cond_signal(&wake);
            pthread_mutex_unlock(&lock);
        }
    }
    return 0;
}
"#;

const PATCH_VALUE: &str = r#"
#include <livepatch.h>
static int new_value(void) { return 2; }
static struct klp_func funcs[] = { { .old_name = "value", .new_func = new_value }, { } };
static struct klp_object objs[] = { { .name = NULL, .funcs = funcs }, { } };
static struct klp_patch patch = { .objs = objs };
KLP_PATCH(patch);
"#;

/// The number after the last space of a line such as "stuck: inside old, tid 1234".
fn last_number(line: &str) -> u64 {
    line.rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number at the end of {line:?}"))
}

/// The value of `key=N` in a line such as "totals v1=3 v2=4 mixed=0".
fn field(line: &str, key: &str) -> u64 {
    line.split(' ')
        .find_map(|word| word.strip_prefix(&format!("{key}=")))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

fn threads(status: &Value) -> &[Value] {
    status["threads"].as_array().expect("threads is an array")
}

fn pending_tids(status: &Value) -> Vec<u64> {
    threads(status)
        .iter()
        .filter(|t| t["pending"] == true)
        .map(|t| t["tid"].as_u64().expect("tid is a number"))
        .collect()
}

fn thread(status: &Value, tid: u64) -> &Value {
    threads(status)
        .iter()
        .find(|t| t["tid"] == tid)
        .unwrap_or_else(|| panic!("no thread {tid} in {status}"))
}

fn live_tids(pid: &str) -> BTreeSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the target's task directory")
        .map(|entry| {
            entry
                .unwrap()
                .file_name()
                .to_string_lossy()
                .parse()
                .unwrap()
        })
        .collect()
}

/// Runs a `livepatch` verb and asserts its exit status.
fn run(args: &[&str], code: i32) {
    let output = cli(args);
    assert_eq!(
        output.status.code(),
        Some(code),
        "livepatch {}: {}",
        args.join(" "),
        stderr(&output)
    );
}

#[test]
fn producer_and_consumer_never_run_different_versions_within_one_step() {
    let program = compile("steps", PRODUCER_CONSUMER, false);
    let patch = compile("livepatch-steps", PATCH_STEPS, true);
    let patch = patch.to_str().unwrap();
    let mut target = Target::start(&program);
    let pid = target.pid();

    // `step` is replaced too: were it left alone, a worker inside the old step between produce
    // and consume would be free to switch there (no patched function on its stack), and a new
    // consume would legally receive an old item.
    for _ in 0..10 {
        run(&["load", &pid, patch, "--timeout", "10"], 0);
        run(&["disable", &pid, "livepatch-steps", "--timeout", "10"], 0);
        run(&["unload", &pid, "livepatch-steps"], 0);
    }
    target.send("stop");
    let totals = target.expect("totals");
    assert_eq!(field(&totals, "mixed"), 0, "{totals}");
    assert!(field(&totals, "v1") > 0, "{totals}");
    assert!(field(&totals, "v2") > 0, "{totals}");
}

/// Waits until `status --json` lists exactly the threads of `/proc/PID/task`: a thread that
/// pthread_join reported gone may still be in /proc for a moment, so there is no event to wait
/// for.
fn status_when_threads_settle(pid: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = status_json(pid);
        let listed: BTreeSet<u64> = threads(&status)
            .iter()
            .map(|t| t["tid"].as_u64().unwrap())
            .collect();
        let live = live_tids(pid);
        if listed == live {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "status lists threads {listed:?}, the process has {live:?}"
        );
        std::thread::yield_now();
    }
}

#[test]
fn threads_born_during_a_transition_start_at_its_target_and_exited_ones_are_forgotten() {
    let program = compile("spawner", SPAWNER, false);
    let patch = compile("livepatch-version", PATCH_VERSION, true);
    let mut target = Target::start(&program);
    let pid = target.pid();

    target.send("count 0");
    let unpatched = target.expect("born in phase 0");
    assert_eq!(field(&unpatched, "v2"), 0, "{unpatched}");

    // Patching, held open by a thread inside the old `stuck`.
    target.send("stuck");
    let stuck = last_number(&target.expect("stuck: inside old"));
    run(
        &["load", &pid, patch.to_str().unwrap(), "--timeout", "1"],
        3,
    );
    target.send("phase 1");
    target.expect("phase 1 begins");
    target.send("count 1");
    let patching = target.expect("born in phase 1");
    assert_eq!(field(&patching, "v1"), 0, "{patching}");
    assert!(field(&patching, "v2") >= 50, "{patching}");

    // Dozens of threads were born, ran and exited during the transition; none of them is
    // listed, pending or otherwise.
    target.send("pause");
    target.expect("spawner paused");
    let status = status_when_threads_settle(&pid);
    assert_eq!(status["transition"]["target"], "patched", "{status}");
    assert_eq!(pending_tids(&status), [stuck], "{status}");
    target.send("resume");
    target.expect("spawner resumed");

    target.send("release");
    target.expect("stuck: left old");
    target.saw_or_expect("livepatch: 'livepatch-version': patching complete");
    assert_eq!(status_json(&pid)["transition"], Value::Null);

    // Unpatching, held open by a thread inside the new `stuck`.
    target.send("stuck");
    let stuck = last_number(&target.expect("stuck: inside new"));
    run(&["disable", &pid, "livepatch-version", "--timeout", "1"], 3);
    target.send("phase 2");
    target.expect("phase 2 begins");
    target.send("count 2");
    let unpatching = target.expect("born in phase 2");
    assert_eq!(field(&unpatching, "v2"), 0, "{unpatching}");
    assert!(field(&unpatching, "v1") >= 50, "{unpatching}");

    target.send("pause");
    target.expect("spawner paused");
    let status = status_when_threads_settle(&pid);
    assert_eq!(status["transition"]["target"], "unpatched", "{status}");
    assert_eq!(pending_tids(&status), [stuck], "{status}");
    target.send("resume");
    target.expect("spawner resumed");

    target.send("release");
    target.expect("stuck: left new");
    target.saw_or_expect("livepatch: 'livepatch-version': unpatching complete");
    assert_eq!(status_json(&pid)["transition"], Value::Null);
}

#[test]
fn threads_spinning_in_unpatched_code_do_not_hold_the_transition() {
    let program = compile("spinners", SERVICE, false);
    let patch = compile("livepatch-spin", PATCH_VALUE, true);
    let mut target = Target::start(&program);
    let pid = target.pid();
    target.send("spin");
    target.expect("spinners: spinning");

    run(
        &["load", &pid, patch.to_str().unwrap(), "--timeout", "5"],
        0,
    );
    let status = status_json(&pid);
    assert_eq!(status["transition"], Value::Null, "{status}");
    assert_eq!(pending_tids(&status), Vec::<u64>::new(), "{status}");
    target.send("value");
    target.expect("main: value 2");
    // The spinners were interrupted, not stopped for good: they still answer.
    target.send("unspin");
    target.expect("spinners: joined");
}

#[test]
fn workers_calling_patched_functions_back_to_back_do_not_hold_the_transitions() {
    let program = compile("steps_back_to_back", PRODUCER_CONSUMER, false);
    let patch = compile("livepatch-hot-steps", PATCH_STEPS, true);
    let mut target = Target::start_with(&program, &["back-to-back"], "ready");
    let pid = target.pid();

    // Their loop is not patched: at every entry to `step`, before it decides which version to
    // run, nothing patched is on a worker's stack, so a check landing there can switch it.
    run(
        &["load", &pid, patch.to_str().unwrap(), "--timeout", "5"],
        0,
    );
    run(
        &["disable", &pid, "livepatch-hot-steps", "--timeout", "5"],
        0,
    );
    target.send("stop");
    let totals = target.expect("totals");
    assert_eq!(field(&totals, "mixed"), 0, "{totals}");
}

#[test]
fn a_thread_blocking_the_check_signal_holds_the_transition_until_its_switch_point() {
    let program = compile("check_blocker", SERVICE, false);
    let patch = compile("livepatch-check-blocked", PATCH_VALUE, true);
    let mut target = Target::start(&program);
    let pid = target.pid();
    let main_tid: u64 = pid.parse().unwrap();

    // With no patch at all, a switch point changes nothing.
    target.send("update");
    target.expect("main: passed its switch point, value 1");
    assert_eq!(thread(&status_json(&pid), main_tid)["patch_state"], -1);

    target.send("block-check-signal");
    let blocker = last_number(&target.expect("blocker: the check signal blocked"));
    run(
        &["load", &pid, patch.to_str().unwrap(), "--timeout", "1"],
        3,
    );
    let status = status_json(&pid);
    assert_eq!(
        status["transition"]["patch"], "livepatch-check-blocked",
        "{status}"
    );
    assert_eq!(pending_tids(&status), [blocker], "{status}");
    let blocked = thread(&status, blocker);
    assert_eq!(blocked["patch_state"], 0, "{status}");
    assert!(blocked["blocking"].is_string(), "{status}");

    // The main thread was examined and switched; its own switch point leaves it patched and
    // does not move the blocker.
    target.send("value");
    target.expect("main: value 2");
    target.send("update");
    target.expect("main: passed its switch point, value 2");
    let status = status_json(&pid);
    let main = thread(&status, main_tid);
    assert_eq!(main["patch_state"], 1, "{status}");
    assert_eq!(main["pending"], false, "{status}");
    assert_eq!(pending_tids(&status), [blocker], "{status}");
    target.send("blocker-value");
    target.expect("blocker: value 1");

    target.send("blocker-switch");
    target.expect("blocker: passed its switch point, value 2");
    target.saw_or_expect("livepatch: 'livepatch-check-blocked': patching complete");
    let status = status_json(&pid);
    assert_eq!(status["transition"], Value::Null, "{status}");
    assert_eq!(pending_tids(&status), Vec::<u64>::new(), "{status}");
}

#[test]
fn a_thread_blocking_every_signal_makes_the_load_refused_and_changes_nothing() {
    let program = compile("signal_blocker", SERVICE, false);
    let patch = compile("livepatch-all-blocked", PATCH_VALUE, true);
    let mut target = Target::start(&program);
    let pid = target.pid();

    // Code is written while every other thread is parked by a signal; a thread that blocks
    // every signal cannot be parked, so the load is refused up front instead of half applied
    // (README, Limits). A thread blocking only the check signal is the case above.
    target.send("block-every-signal");
    let blocker = last_number(&target.expect("blocker: every signal blocked"));
    let before = status_json(&pid);
    let output = cli(&["load", &pid, patch.to_str().unwrap(), "--timeout", "1"]);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{message}");
    assert!(
        message.starts_with("livepatch: error: ")
            && message.contains(&format!("thread {blocker} blocks signal"))
            && message.contains("'value'"),
        "{message}"
    );
    let after = status_json(&pid);
    assert_eq!(after["patches"], before["patches"], "{after}");
    assert_eq!(after["transition"], Value::Null, "{after}");
    assert_eq!(pending_tids(&after), Vec::<u64>::new(), "{after}");
    target.send("value");
    target.expect("main: value 1");
    target.send("blocker-value");
    target.expect("blocker: value 1");
}

/// Waits until thread `tid` sleeps in system call `number` (from /proc/PID/task/TID/syscall):
/// the thread announces itself just before it enters the call, and no event marks the entry.
fn wait_in_syscall(pid: &str, tid: u64, number: &str) {
    let path = format!("/proc/{pid}/task/{tid}/syscall");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.split(' ').next() == Some(number) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "thread {tid} not in system call {number}: {text:?}"
        );
        std::thread::yield_now();
    }
}

#[test]
fn threads_sleeping_in_system_calls_switch_at_once_and_their_calls_go_on() {
    const SYS_READ: &str = "0";
    const SYS_FUTEX: &str = "202";
    let program = compile("sleepers", SERVICE, false);
    let patch = compile("livepatch-sleepers", PATCH_VALUE, true);
    let mut target = Target::start(&program);
    let pid = target.pid();
    target.send("read");
    let reader = last_number(&target.expect("reader: tid"));
    target.send("wait");
    let waiter = last_number(&target.expect("waiter: tid"));
    wait_in_syscall(&pid, reader, SYS_READ);
    wait_in_syscall(&pid, waiter, SYS_FUTEX);

    run(
        &["load", &pid, patch.to_str().unwrap(), "--timeout", "2"],
        0,
    );
    let status = status_json(&pid);
    assert_eq!(status["transition"], Value::Null, "{status}");

    // The check signal interrupted both calls; they go on rather than fail with EINTR.
    target.send("write");
    target.expect("reader: read 'x', value 2");
    target.send("wake");
    target.expect("waiter: woken, value 2");
}
