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

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[path = "../tests/support/mod.rs"]
mod support;
#[path = "common/target.rs"]
mod target;

use support::{Cc, Profile, VALUE_PATCH, build_agent, path_str, scratch, wait_for_socket};
use target::Target;

const RUNS: usize = 7;

/// The C of the bench, in `benches/fixtures`.
fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("benches/fixtures")
        .join(name)
}

/// The bench's builds: the code as it ships, without debug information.
const FLAGS: [&str; 2] = ["-O2", "-pthread"];

/// A program with `count` patchable functions, and a patch replacing all of them.
fn many_functions(count: usize) -> (PathBuf, PathBuf) {
    // The fixtures define one function for each FUNCTION(N) line of this list.
    let list = scratch().join(format!("functions-{count}.h"));
    let lines: String = (0..count).map(|i| format!("FUNCTION({i})\n")).collect();
    std::fs::write(&list, lines).unwrap();
    let with_list = |cc: Cc| cc.flags(&FLAGS).define_string("FUNCTIONS", path_str(&list));
    (
        with_list(Cc::program(fixture("many-functions.c"))).build(&format!("functions-{count}")),
        with_list(Cc::library(fixture("many-functions-patch.c")))
            .build(&format!("livepatch-functions-{count}")),
    )
}

/// The program with the agent preloaded, once its agent answers.
fn start(agent: &Path, program: &Path, args: &[String]) -> Target {
    let target = Target::start(Some(agent), program, args);
    wait_for_socket(&target.pid());
    target
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
    let agent = build_agent(Profile::Release);
    let threads_program = Cc::program(fixture("threads.c"))
        .flags(&FLAGS)
        .build("threads");
    let value_patch = Cc::library(VALUE_PATCH)
        .flags(&FLAGS)
        .build("livepatch-value");
    let value_probe = ("value", "value 1", "value 2");

    println!("median of {RUNS} runs; baseline: `livepatch status` on the same process");
    let idle_counts: &[usize] = if quick {
        &[10]
    } else {
        &[10, 100, 1000, 10_000]
    };
    for &idle in idle_counts {
        let args = [idle.to_string(), "0".to_string()];
        let mut target = start(&agent, &threads_program, &args);
        report(
            &format!("{idle} idle threads"),
            &measure(&mut target, &value_patch, value_probe),
        );
    }
    if !quick {
        for &idle in &[10usize, 1000] {
            let args = [idle.to_string(), "4".to_string()];
            let mut target = start(&agent, &threads_program, &args);
            report(
                &format!("{idle} idle + 4 busy threads"),
                &measure(&mut target, &value_patch, value_probe),
            );
        }
    }
    let function_counts: &[usize] = if quick { &[1] } else { &[1, 100, 10_000] };
    for &count in function_counts {
        let (program, patch) = many_functions(count);
        let mut target = start(&agent, &program, &[]);
        report(
            &format!("{count} functions"),
            &measure(&mut target, &patch, ("call", "1", "-1")),
        );
    }
    let _ = std::fs::remove_dir_all(scratch());
}
