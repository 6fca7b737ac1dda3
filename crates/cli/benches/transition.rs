//! How long a transition takes on a real process, measured end to end with the `livepatch`
//! command: from starting `livepatch load` until it returns, which it does when the agent
//! reports "patching complete".
//!
//! Cases: a one-function patch in a process with 10, 100, 1,000 and 10,000 idle threads (blocked
//! in `read`), the same with threads busy in unrelated code, and patches of 1, 100 and 10,000
//! functions. Each figure is the median of several runs, reported next to the baseline measured
//! in the same run: `livepatch status` on the same process, a round trip through the same
//! command, socket and agent that does no patching.
//!
//! Run with `cargo bench -p livepatch-cli --bench transition`. Needs `cc`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
const RUNS: usize = 7;

/// Idle threads blocked in `read` on a pipe nobody writes, busy ones spinning outside any
/// patched function, and a main thread answering commands.
const THREADS_PROGRAM: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static int never[2];
static volatile int stop;
__attribute__((noinline, noipa)) int value(void) { return 1; }
__attribute__((noinline, noipa)) static unsigned long mix(unsigned long x) { return x * 6364136223846793005ul + 1; }
static void *idle(void *arg) { char c; (void)arg; return (void *)(long)read(never[0], &c, 1); }
static void *busy(void *arg) { unsigned long x = (unsigned long)arg; while (!stop) x = mix(x); return (void *)x; }
int main(int argc, char **argv) {
    int idle_count = atoi(argv[1]), busy_count = atoi(argv[2]);
    pthread_attr_t attr;
    pthread_t t;
    char line[64];
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (pipe(never)) return 1;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    for (int i = 0; i < idle_count; i++)
        if (pthread_create(&t, &attr, idle, NULL)) { perror("pthread_create"); return 1; }
    for (int i = 0; i < busy_count; i++)
        if (pthread_create(&t, &attr, busy, (void *)(long)i)) { perror("pthread_create"); return 1; }
    puts("ready");
    while (fgets(line, sizeof line, stdin))
        if (!strncmp(line, "value", 5)) printf("value %d\n", value());
    return 0;
}
"#;

const VALUE_PATCH: &str = r#"
#include <livepatch.h>
static int new_value(void) { return 2; }
static struct klp_func funcs[] = { { .old_name = "value", .new_func = new_value }, { } };
static struct klp_object objs[] = { { .name = NULL, .funcs = funcs }, { } };
static struct klp_patch patch = { .objs = objs };
KLP_PATCH(patch);
"#;

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("livepatch-bench-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("sockets")).unwrap();
    dir
}

fn release_agent() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "-q", "--release", "-p", "livepatch-agent"])
        .current_dir(WORKSPACE)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the agent failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| Path::new(WORKSPACE).join("target"), PathBuf::from);
    target.join("release/liblivepatch_agent.so")
}

fn compile(name: &str, source: &str, shared: bool) -> PathBuf {
    let dir = scratch();
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source).unwrap();
    let out = dir.join(if shared {
        format!("{name}.so")
    } else {
        name.to_string()
    });
    let mut cc = Command::new("cc");
    cc.args(["-O2", "-pthread", "-o"]).arg(&out).arg(&src);
    cc.arg(format!("-I{WORKSPACE}/include"));
    if shared {
        cc.args(["-shared", "-fPIC"]);
    } else {
        cc.arg("-rdynamic");
    }
    assert!(cc.status().expect("cc").success(), "compiling {name}");
    out
}

/// A program with `count` patchable functions, and a patch replacing all of them.
fn many_functions(count: usize) -> (PathBuf, PathBuf) {
    // The volatile read makes each function long enough for a jump (5 bytes), as real ones are.
    let mut program =
        String::from("#include <stdio.h>\n#include <string.h>\nvolatile int offset;\n");
    let mut patch = String::from("#include <livepatch.h>\n");
    for i in 0..count {
        program += &format!(
            "__attribute__((noinline, noipa)) int f{i}(int x) {{ return x + offset + {i}; }}\n"
        );
        patch += &format!("static int new_f{i}(int x) {{ return -x - {i}; }}\n");
    }
    program += "int main(void) { char line[64]; setvbuf(stdout, NULL, _IOLBF, 0); puts(\"ready\");\n\
                while (fgets(line, sizeof line, stdin)) printf(\"%d\\n\", f0(1)); return 0; }\n";
    patch += "static struct klp_func funcs[] = {\n";
    for i in 0..count {
        patch += &format!("{{ .old_name = \"f{i}\", .new_func = new_f{i} }},\n");
    }
    patch += "{ } };\nstatic struct klp_object objs[] = { { .name = NULL, .funcs = funcs }, { } };\n\
              static struct klp_patch patch = { .objs = objs };\nKLP_PATCH(patch);\n";
    (
        compile(&format!("functions-{count}"), &program, false),
        compile(&format!("livepatch-functions-{count}"), &patch, true),
    )
}

struct Target {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Target {
    fn start(agent: &Path, program: &Path, args: &[String]) -> Self {
        let mut child = Command::new(program)
            .args(args)
            .env("LD_PRELOAD", agent)
            .env("LIVEPATCH_SOCKET_DIR", scratch().join("sockets"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("program starts");
        let stdin = child.stdin.take().unwrap();
        let mut target = Target {
            stdout: BufReader::new(child.stdout.take().unwrap()),
            stdin,
            child,
        };
        assert_eq!(target.line(), "ready");
        let socket = scratch()
            .join("sockets")
            .join(format!("{}.sock", target.child.id()));
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            std::thread::yield_now();
        }
        target
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("program output");
        line.trim_end().to_string()
    }

    fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        self.line()
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn livepatch(args: &[&str]) -> Duration {
    let start = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_livepatch"))
        .args(args)
        .env("LIVEPATCH_SOCKET_DIR", scratch().join("sockets"))
        .output()
        .expect("livepatch runs");
    let elapsed = start.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "livepatch {args:?}: {}",
        stderr.chars().take(2000).collect::<String>()
    );
    elapsed
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

struct Figures {
    load: Duration,
    disable: Duration,
    baseline: Duration,
}

/// Loads, disables and unloads `patch` RUNS times; checks the program sees the patch.
fn measure(target: &mut Target, patch: &Path, probe: (&str, &str, &str)) -> Figures {
    let pid = target.pid();
    let name = patch.file_stem().unwrap().to_str().unwrap().to_string();
    let (command, before, after) = probe;
    let mut loads = Vec::new();
    let mut disables = Vec::new();
    let mut baselines = Vec::new();
    for _ in 0..RUNS {
        baselines.push(livepatch(&["status", &pid]));
        assert_eq!(target.ask(command), before);
        loads.push(livepatch(&["load", &pid, patch.to_str().unwrap()]));
        assert_eq!(target.ask(command), after);
        disables.push(livepatch(&["disable", &pid, &name]));
        livepatch(&["unload", &pid, &name]);
    }
    Figures {
        load: median(loads),
        disable: median(disables),
        baseline: median(baselines),
    }
}

fn report(case: &str, figures: &Figures) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{case:<36} load {:>8.2} ms (x{:>6.1})   disable {:>8.2} ms (x{:>6.1})   baseline {:>6.2} ms",
        ms(figures.load),
        ms(figures.load) / ms(figures.baseline),
        ms(figures.disable),
        ms(figures.disable) / ms(figures.baseline),
        ms(figures.baseline),
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs benches as tests: then one
    // small case only, so the bench cannot rot.
    let quick = !std::env::args().any(|a| a == "--bench");
    let agent = release_agent();
    let threads_program = compile("threads", THREADS_PROGRAM, false);
    let value_patch = compile("livepatch-value", VALUE_PATCH, true);
    let value_probe = ("value", "value 1", "value 2");

    println!("median of {RUNS} runs; baseline: `livepatch status` on the same process");
    let idle_counts: &[usize] = if quick {
        &[10]
    } else {
        &[10, 100, 1000, 10_000]
    };
    for &idle in idle_counts {
        let args = [idle.to_string(), "0".to_string()];
        let mut target = Target::start(&agent, &threads_program, &args);
        report(
            &format!("{idle} idle threads"),
            &measure(&mut target, &value_patch, value_probe),
        );
    }
    if !quick {
        for &idle in &[10usize, 1000] {
            let args = [idle.to_string(), "4".to_string()];
            let mut target = Target::start(&agent, &threads_program, &args);
            report(
                &format!("{idle} idle + 4 busy threads"),
                &measure(&mut target, &value_patch, value_probe),
            );
        }
    }
    let function_counts: &[usize] = if quick { &[1] } else { &[1, 100, 10_000] };
    for &count in function_counts {
        let (program, patch) = many_functions(count);
        let mut target = Target::start(&agent, &program, &[]);
        report(
            &format!("{count} functions"),
            &measure(&mut target, &patch, ("call", "1", "-1")),
        );
    }
    let _ = std::fs::remove_dir_all(scratch());
}
