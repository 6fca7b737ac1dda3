//! Reaching processes: how long `livepatch attach` takes on a process started without the
//! agent, and how long it stops the one thread it uses, beside the start-up the agent costs a
//! program started with it (`LD_PRELOAD`, as `livepatch run` does), measured in the same run;
//! and how many system calls of sleeping threads a transition makes fail with EINTR: a server
//! whose workers wait in `epoll_wait`, through 100 cycles of load, disable and unload.
//!
//! Run with `cargo bench -p livepatch-cli --bench reach`. Needs `cc`; attaching needs the
//! right to trace (root, or the same user with ptrace_scope 0).

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
const FLAGS: [&str; 2] = ["-O2", "-pthread"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("benches/fixtures")
        .join(name)
}

fn livepatch(agent: &Path, args: &[&str]) -> (Duration, String) {
    let start = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_livepatch"))
        .args(args)
        .env("LIVEPATCH_AGENT", agent)
        .env("LIVEPATCH_SOCKET_DIR", scratch().join("sockets"))
        .output()
        .expect("livepatch runs");
    let elapsed = start.elapsed();
    assert!(
        output.status.success(),
        "livepatch {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (
        elapsed,
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// The "stopped for X ms" of an attach's output.
fn stopped_ms(output: &str) -> f64 {
    output
        .split("stopped for ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no stop time in {output:?}"))
}

fn attach_figures(agent: &Path, program: &Path, threads: usize, runs: usize) {
    let args = [threads.to_string(), "0".to_string()];
    let (mut attach, mut stopped, mut preloaded, mut plain) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let start = Instant::now();
        drop(Target::start(None, program, &args));
        plain.push(start.elapsed().as_secs_f64() * 1e3);

        let start = Instant::now();
        let target = Target::start(Some(agent), program, &args);
        wait_for_socket(&target.pid());
        preloaded.push(start.elapsed().as_secs_f64() * 1e3);
        drop(target);

        let mut target = Target::start(None, program, &args);
        let (took, output) = livepatch(agent, &["attach", &target.pid()]);
        attach.push(took.as_secs_f64() * 1e3);
        stopped.push(stopped_ms(&output));
        assert_eq!(target.ask("value"), "value 1");
    }
    let (attach, stopped, preloaded, plain) = (
        median(attach),
        median(stopped),
        median(preloaded),
        median(plain),
    );
    println!(
        "{threads:>5} threads: attach {attach:>7.2} ms (x{:.2} of the start-up with the agent), \
         one thread stopped {stopped:>6.2} ms   start-up with the agent {preloaded:>7.2} ms, \
         without {plain:>6.2} ms",
        attach / preloaded
    );
}

fn eintr_figures(agent: &Path, program: &Path, patch: &Path, cycles: usize) {
    let workers = 4;
    let mut target = Target::start(Some(agent), program, &[workers.to_string()]);
    let pid = target.pid();
    wait_for_socket(&pid);
    let name = patch.file_stem().unwrap().to_str().unwrap().to_owned();
    let before = target.ask("eintr");
    let start = Instant::now();
    for _ in 0..cycles {
        livepatch(agent, &["load", &pid, path_str(patch)]);
        assert_eq!(target.ask("value"), "value 2");
        livepatch(agent, &["disable", &pid, &name]);
        livepatch(agent, &["unload", &pid, &name]);
    }
    let took = start.elapsed();
    let count = |line: &str| -> u64 { line.trim_start_matches("eintr ").parse().unwrap() };
    let eintr = count(&target.ask("eintr")) - count(&before);
    println!(
        "{cycles} cycles, {workers} workers in epoll_wait: {eintr} EINTR ({:.2} per cycle per \
         worker; 2 code writes per cycle), {:.1} ms per cycle",
        eintr as f64 / (cycles * workers) as f64,
        took.as_secs_f64() * 1e3 / cycles as f64
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs benches as tests: then one
    // small case only, so the bench cannot rot.
    let quick = !std::env::args().any(|a| a == "--bench");
    let agent = build_agent(Profile::Release);
    let threads = Cc::program(fixture("threads.c"))
        .flags(&FLAGS)
        .build("reach-threads");
    let server = Cc::program(fixture("epoll-server.c"))
        .flags(&FLAGS)
        .build("reach-epoll-server");
    let patch = Cc::library(VALUE_PATCH).flags(&FLAGS).build("reach-value");
    println!("median of {RUNS} runs");
    let counts: &[usize] = if quick { &[1] } else { &[1, 100, 1000] };
    for &count in counts {
        attach_figures(&agent, &threads, count, if quick { 1 } else { RUNS });
    }
    eintr_figures(&agent, &server, &patch, if quick { 2 } else { 100 });
}
