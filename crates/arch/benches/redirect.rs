//! What redirection costs, measured on real machine code built by this bench:
//!
//! - per call: a redirected function on the fast path (its stub jumps through the slot to the
//!   new function) and on the slow path (the decider is asked on every call), against calling
//!   the new function directly, for a patchable entry and a plain (relocated prologue) entry;
//! - per batch: the wall time of `redirect` and `restore` for 1, 100 and 10,000 functions of one
//!   library in one stop of the world.
//!
//! `cargo bench -p livepatch-arch --bench redirect` measures and prints a table. Run without
//! `--bench` (as `cargo test --benches` does) it makes a quick smoke pass instead: a small
//! library, short loops, one run per number. With `--list` (test listers) it prints nothing.

use std::collections::HashMap;
use std::ffi::{CString, c_void};
use std::fmt::Write as _;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use livepatch_arch::redirect::{self, Dispatch, SiteSpec};
use livepatch_arch::symbols::SymbolTable;

type Unary = extern "C" fn(i32) -> i32;

/// How much to measure.
struct Config {
    /// A full measurement (`--bench`) rather than a smoke pass.
    full: bool,
    /// Calls per timed loop.
    calls: u64,
    /// Timed runs per number (the median is reported), after one untimed warm-up run.
    runs: usize,
    /// Functions in the many-function library.
    functions: usize,
    /// Batch sizes to redirect and restore.
    batches: &'static [usize],
}

const FULL: Config = Config {
    full: true,
    calls: 20_000_000,
    runs: 5,
    functions: 10_000,
    batches: &[1, 100, 10_000],
};

const SMOKE: Config = Config {
    full: false,
    calls: 100_000,
    runs: 1,
    functions: 200,
    batches: &[1, 100, 200],
};

/// `answer` is what gets redirected; `better` is its replacement. The volatile global keeps
/// `answer` from being a two-byte function a plain entry could not hold a jump in.
const TWO_FUNCTIONS: &str = "volatile int bias = 1;\n\
    int answer(int x) { return x + bias; }\n\
    int better(int x) { return x * 3 + bias; }\n";

/// What the decider answers on the slow path.
static DECISION: AtomicUsize = AtomicUsize::new(0);

extern "C" fn decide(_cookie: u64, _entry_sp: usize) -> usize {
    DECISION.load(Ordering::Relaxed)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        // A test lister asking for tests: this binary has none.
        return;
    }
    let config = if args.iter().any(|a| a == "--bench") {
        &FULL
    } else {
        &SMOKE
    };
    let started = Instant::now();
    livepatch_arch::install_stop_signal(libc::SIGRTMIN() + 5).expect("install the stop signal");
    livepatch_arch::register_sync_core();
    redirect::set_decider(decide);
    let dir = BuildDir::new();

    let patchable = call_costs(
        config,
        &dir.0,
        "patchable",
        &["-fpatchable-function-entry=16,14", "-fcf-protection=none"],
        "patchable entry",
    );
    let plain = call_costs(
        config,
        &dir.0,
        "plain",
        &["-fcf-protection=none"],
        "plain entry",
    );
    let batches = batch_times(config, &dir.0);

    print_report(
        config,
        &[("patchable", &patchable), ("plain", &plain)],
        &batches,
    );
    println!(
        "\n(total bench time {:.1} s)",
        started.elapsed().as_secs_f64()
    );
}

/// A scratch directory for sources and libraries, removed at the end (the loaded libraries stay
/// mapped).
struct BuildDir(PathBuf);

impl BuildDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("livepatch-arch-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the build directory");
        Self(dir)
    }
}

impl Drop for BuildDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn spawn_cc(args: &[&str], paths: &[&Path]) -> Child {
    Command::new("cc")
        .args(args)
        .args(paths)
        .spawn()
        .expect("a C compiler (cc)")
}

fn wait_cc(mut child: Child, what: &str) {
    let status = child.wait().expect("wait for cc");
    assert!(status.success(), "compiling {what} failed");
}

/// Builds `lib{name}.so` from `sources` with `cc {opt} -fPIC {flags}`: one source directly, several
/// as objects compiled in parallel and then linked.
fn build_library(dir: &Path, name: &str, sources: &[String], opt: &str, flags: &[&str]) -> PathBuf {
    let library = dir.join(format!("lib{name}.so"));
    let mut common = vec![opt, "-fPIC"];
    common.extend_from_slice(flags);
    let source_paths: Vec<PathBuf> = sources
        .iter()
        .enumerate()
        .map(|(i, source)| {
            let path = dir.join(format!("{name}{i}.c"));
            std::fs::write(&path, source).expect("write a C source");
            path
        })
        .collect();
    if let [source] = &source_paths[..] {
        let mut args = common.clone();
        args.extend(["-shared", "-o"]);
        wait_cc(spawn_cc(&args, &[&library, source]), name);
        return library;
    }
    let objects: Vec<PathBuf> = source_paths.iter().map(|s| s.with_extension("o")).collect();
    let mut args = common.clone();
    args.extend(["-c", "-o"]);
    let children: Vec<Child> = source_paths
        .iter()
        .zip(&objects)
        .map(|(source, object)| spawn_cc(&args, &[object, source]))
        .collect();
    for child in children {
        wait_cc(child, name);
    }
    let mut link: Vec<&Path> = vec![&library];
    link.extend(objects.iter().map(PathBuf::as_path));
    wait_cc(spawn_cc(&["-shared", "-o"], &link), name);
    library
}

/// A library opened with `dlopen`. Never closed: redirected code must stay mapped.
struct Library {
    path: PathBuf,
    handle: *mut c_void,
}

impl Library {
    fn open(path: &Path) -> Self {
        let c_path = CString::new(path.to_str().expect("a UTF-8 path")).expect("no NUL in path");
        // SAFETY: loading a library this bench just built from plain C functions; it has no
        // constructors beyond the compiler's own.
        let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        assert!(!handle.is_null(), "dlopen {}", path.display());
        Self {
            path: path.to_owned(),
            handle,
        }
    }

    fn symbol(&self, name: &str) -> usize {
        let c_name = CString::new(name).expect("no NUL in name");
        // SAFETY: a handle from a successful dlopen and a NUL-terminated name.
        let address = unsafe { libc::dlsym(self.handle, c_name.as_ptr()) } as usize;
        assert_ne!(address, 0, "{name} not found in {}", self.path.display());
        address
    }

    fn unary(&self, name: &str) -> Unary {
        let address = self.symbol(name);
        // SAFETY: every function this bench builds is `int f(int)`, which is this signature.
        unsafe { std::mem::transmute::<usize, Unary>(address) }
    }
}

/// Nanoseconds per call of `function` over `calls` calls, loop overhead included.
fn ns_per_call(function: Unary, calls: u64) -> f64 {
    let function = black_box(function);
    let start = Instant::now();
    let mut sum = 0i32;
    for i in 0..calls {
        sum = sum.wrapping_add(function(black_box(i as i32)));
    }
    let elapsed = start.elapsed();
    black_box(sum);
    elapsed.as_secs_f64() * 1e9 / calls as f64
}

fn median(mut samples: Vec<f64>) -> f64 {
    assert!(!samples.is_empty());
    samples.sort_by(f64::total_cmp);
    let mid = samples.len() / 2;
    if samples.len() % 2 == 1 {
        samples[mid]
    } else {
        (samples[mid - 1] + samples[mid]) / 2.0
    }
}

/// The median of `config.runs` timed runs of `measure`, after a warm-up run.
fn median_of(config: &Config, mut measure: impl FnMut() -> f64) -> f64 {
    measure();
    median((0..config.runs).map(|_| measure()).collect())
}

/// Per-call costs (ns, loop overhead included) for one entry kind.
struct CallCosts {
    /// `answer` before it is redirected.
    original: f64,
    /// `better` called directly: the baseline for both paths.
    direct: f64,
    /// `answer` redirected, `Dispatch::Jump(better)`.
    fast: f64,
    /// `answer` redirected, `Dispatch::Decide` with the decider answering `better`.
    slow: f64,
    /// `answer` redirected, `Dispatch::Original`: through the stub back to the original code.
    via_stub: f64,
    /// `answer` after `restore`.
    restored: f64,
}

fn call_costs(
    config: &Config,
    dir: &Path,
    name: &str,
    flags: &[&str],
    expected_kind: &str,
) -> CallCosts {
    let path = build_library(dir, name, &[TWO_FUNCTIONS.to_owned()], "-O2", flags);
    let lib = Library::open(&path);
    let (answer_address, better_address) = (lib.symbol("answer"), lib.symbol("better"));
    let (answer, better) = (lib.unary("answer"), lib.unary("better"));
    assert_eq!((answer(2), better(2)), (3, 7));
    let table = SymbolTable::read(&path).expect("read the symbol table");
    let size = table.lookup("answer", 0).expect("answer's symbol").size as usize;

    let original = median_of(config, || ns_per_call(answer, config.calls));

    let sites = redirect::redirect(&[SiteSpec {
        name: "answer",
        address: answer_address,
        size,
        cookie: 1,
    }])
    .expect("redirect answer");
    assert_eq!(sites[0].kind, expected_kind);
    DECISION.store(better_address, Ordering::Relaxed);
    let set = |dispatch| redirect::set_dispatch(answer_address, dispatch).expect("set dispatch");
    for (dispatch, expected) in [
        (Dispatch::Jump(better_address), 7),
        (Dispatch::Decide, 7),
        (Dispatch::Original, 3),
    ] {
        set(dispatch);
        assert_eq!(answer(2), expected, "{name}: {dispatch:?}");
    }

    // Interleaved, so that drift in clock speed affects every variant alike.
    let mut samples: [Vec<f64>; 4] = Default::default();
    for run in 0..=config.runs {
        let direct = ns_per_call(better, config.calls);
        set(Dispatch::Jump(better_address));
        let fast = ns_per_call(answer, config.calls);
        set(Dispatch::Decide);
        let slow = ns_per_call(answer, config.calls);
        set(Dispatch::Original);
        let via_stub = ns_per_call(answer, config.calls);
        if run > 0 {
            for (list, value) in samples.iter_mut().zip([direct, fast, slow, via_stub]) {
                list.push(value);
            }
        }
    }
    redirect::restore(&[answer_address]).expect("restore answer");
    assert_eq!(answer(2), 3);
    let restored = median_of(config, || ns_per_call(answer, config.calls));
    let [direct, fast, slow, via_stub] = samples.map(median);
    CallCosts {
        original,
        direct,
        fast,
        slow,
        via_stub,
        restored,
    }
}

/// Wall times (seconds) of one batch size.
struct BatchTimes {
    functions: usize,
    /// `redirect` of functions never redirected before (blocks prepared, trampolines encoded).
    first: f64,
    /// `redirect` of functions redirected and restored before (their blocks are reused).
    again: f64,
    /// `restore`.
    restore: f64,
}

/// The sources of the many-function library, split in `chunks` files to compile in parallel.
fn many_sources(functions: usize, chunks: usize) -> Vec<String> {
    let per_chunk = functions.div_ceil(chunks);
    (0..chunks)
        .map(|chunk| {
            let mut source = String::from(if chunk == 0 {
                "volatile int bias = 1;\n"
            } else {
                "extern volatile int bias;\n"
            });
            for i in chunk * per_chunk..((chunk + 1) * per_chunk).min(functions) {
                writeln!(
                    source,
                    "int f{i}(int x) {{ return x * {} + bias; }}",
                    2 * i + 3
                )
                .expect("write to a String");
            }
            source
        })
        .collect()
}

fn time_redirect(specs: &[SiteSpec<'_>]) -> f64 {
    let start = Instant::now();
    let sites = redirect::redirect(specs).expect("redirect a batch");
    let elapsed = start.elapsed().as_secs_f64();
    assert_eq!(sites.len(), specs.len());
    elapsed
}

fn time_restore(specs: &[SiteSpec<'_>]) -> f64 {
    let addresses: Vec<usize> = specs.iter().map(|s| s.address).collect();
    let start = Instant::now();
    redirect::restore(&addresses).expect("restore a batch");
    start.elapsed().as_secs_f64()
}

fn batch_times(config: &Config, dir: &Path) -> Vec<BatchTimes> {
    let chunks = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4);
    let compile = Instant::now();
    let path = build_library(
        dir,
        "many",
        &many_sources(config.functions, chunks),
        "-O1",
        &["-fcf-protection=none"],
    );
    println!(
        "compiled {} functions ({chunks} parallel cc -O1) in {:.1} s",
        config.functions,
        compile.elapsed().as_secs_f64()
    );
    let table = SymbolTable::read(&path).expect("read the symbol table");
    let sizes: HashMap<&str, usize> = table
        .functions()
        .iter()
        .map(|f| (f.name.as_str(), f.size as usize))
        .collect();
    let names: Vec<String> = (0..config.functions).map(|i| format!("f{i}")).collect();
    let specs_in = |lib: &Library| -> Vec<SiteSpec<'_>> {
        names
            .iter()
            .enumerate()
            .map(|(i, name)| SiteSpec {
                name,
                address: lib.symbol(name),
                size: sizes[name.as_str()],
                cookie: i as u64,
            })
            .collect()
    };
    let [mut first, mut again, mut restore]: [Vec<Vec<f64>>; 3] =
        std::array::from_fn(|_| vec![Vec::new(); config.batches.len()]);
    for run in 0..config.runs {
        // Fresh copies (distinct files, so distinct loads) for first-time redirects: one for the
        // whole-library batch, one to draw the smaller batches from.
        let copy = |label: &str| {
            let copy = dir.join(format!("libmany_{label}{run}.so"));
            std::fs::copy(&path, &copy).expect("copy the library");
            Library::open(&copy)
        };
        let (small_lib, whole_lib) = (copy("small"), copy("whole"));
        let (small, whole) = (specs_in(&small_lib), specs_in(&whole_lib));
        let mut next = 0;
        for (b, &n) in config.batches.iter().enumerate() {
            let specs = if n == config.functions {
                &whole[..]
            } else {
                next += n;
                &small[next - n..next]
            };
            first[b].push(time_redirect(specs));
            if n == config.functions && run == 0 {
                check_whole_library(&whole_lib, specs);
            }
            restore[b].push(time_restore(specs));
        }
        for (b, &n) in config.batches.iter().enumerate() {
            again[b].push(time_redirect(&whole[..n]));
            restore[b].push(time_restore(&whole[..n]));
        }
        let f0 = whole_lib.unary("f0");
        assert_eq!(f0(1), 4, "f0 is back to its original code");
    }
    config
        .batches
        .iter()
        .enumerate()
        .map(|(b, &functions)| BatchTimes {
            functions,
            first: median(first[b].clone()),
            again: median(again[b].clone()),
            restore: median(restore[b].clone()),
        })
        .collect()
}

/// With the whole library redirected: the first and last functions dispatch as set.
fn check_whole_library(lib: &Library, specs: &[SiteSpec<'_>]) {
    let (first, last) = (&specs[0], &specs[specs.len() - 1]);
    let f0 = lib.unary(first.name);
    let f_last = lib.unary(last.name);
    let expected_last = f_last(1);
    assert_eq!(f0(1), 4);
    redirect::set_dispatch(first.address, Dispatch::Jump(last.address)).expect("set dispatch");
    assert_eq!(f0(1), expected_last);
    redirect::set_dispatch(first.address, Dispatch::Original).expect("set dispatch");
    assert_eq!(f0(1), 4);
}

fn human_time(seconds: f64) -> String {
    if seconds < 1e-3 {
        format!("{:.1} µs", seconds * 1e6)
    } else if seconds < 1.0 {
        format!("{:.2} ms", seconds * 1e3)
    } else {
        format!("{seconds:.2} s")
    }
}

/// A row of the per-call table: its label and which number of a kind it shows.
type CostRow = (&'static str, fn(&CallCosts) -> f64);

fn print_report(config: &Config, kinds: &[(&str, &CallCosts)], batches: &[BatchTimes]) {
    println!();
    println!(
        "livepatch-arch redirect bench ({}): {} calls per loop, median of {} run{}, \
         loop overhead included",
        if config.full {
            "full"
        } else {
            "smoke pass; `cargo bench` for real numbers"
        },
        config.calls,
        config.runs,
        if config.runs == 1 { "" } else { "s" },
    );
    println!();
    let rows: [CostRow; 6] = [
        ("answer, not redirected", |c| c.original),
        ("better, called directly", |c| c.direct),
        ("fast path: Jump(better)", |c| c.fast),
        ("slow path: Decide -> better", |c| c.slow),
        ("stub -> original: Original", |c| c.via_stub),
        ("answer, after restore", |c| c.restored),
    ];
    print!("{:<30}", "ns/call");
    for (kind, _) in kinds {
        print!("{:>12}", kind);
    }
    println!();
    for (label, value) in rows {
        print!("{label:<30}");
        for (_, costs) in kinds {
            print!("{:>12.2}", value(costs));
        }
        println!();
    }
    println!();
    for (kind, c) in kinds {
        println!(
            "fast path ({kind}): {:.2} ns/call, direct {:.2} ns/call, {:+.2} ns, x{:.2}",
            c.fast,
            c.direct,
            c.fast - c.direct,
            c.fast / c.direct
        );
    }
    for (kind, c) in kinds {
        println!(
            "slow path ({kind}): {:.2} ns/call, direct {:.2} ns/call, {:+.2} ns, x{:.2} \
             (x{:.2} the fast path)",
            c.slow,
            c.direct,
            c.slow - c.direct,
            c.slow / c.direct,
            c.slow / c.fast
        );
    }
    for (kind, c) in kinds {
        println!(
            "stub -> original ({kind}): {:.2} ns/call, not redirected {:.2} ns/call, {:+.2} ns, \
             x{:.2}",
            c.via_stub,
            c.original,
            c.via_stub - c.original,
            c.via_stub / c.original
        );
    }
    println!();
    println!(
        "{:<44}{:>16}{:>16}{:>16}",
        format!("batch ({} -O1 functions, plain entries)", config.functions),
        "redirect first",
        "redirect again",
        "restore"
    );
    for batch in batches {
        println!(
            "{:>6} function{:<29}{:>16}{:>16}{:>16}",
            batch.functions,
            if batch.functions == 1 { "" } else { "s" },
            human_time(batch.first),
            human_time(batch.again),
            human_time(batch.restore),
        );
    }
    println!();
    let one = &batches[0];
    for batch in &batches[1..] {
        let n = batch.functions as f64;
        println!(
            "batch of {}: redirect first {} ({} per function, x{:.1} one function), \
             again {} (x{:.1}), restore {} (x{:.1})",
            batch.functions,
            human_time(batch.first),
            human_time(batch.first / n),
            batch.first / one.first,
            human_time(batch.again),
            batch.again / one.again,
            human_time(batch.restore),
            batch.restore / one.restore,
        );
    }
}
