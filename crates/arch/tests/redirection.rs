//! Redirection of real machine code: C libraries built by the test with and without patchable
//! entries, a C++ library throwing through a redirected frame, a libc function and a Rust
//! function, with other threads running.

use std::ffi::{CString, c_void};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, Once};

use livepatch_arch::code_write::CommitError;
use livepatch_arch::redirect::{self, Dispatch, SiteSpec};
use livepatch_arch::stop_world::StopError;
use livepatch_arch::{RedirectError, objects, symbols::SymbolTable};

/// The tests of one binary share the process-wide decider and sites: run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn setup() -> MutexGuard<'static, ()> {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        livepatch_arch::install_stop_signal(libc::SIGRTMIN() + 5).expect("stop signal");
        livepatch_arch::register_sync_core();
        redirect::set_decider(decide);
    });
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the decider answers for every cookie (0: the original).
static DECISION: AtomicUsize = AtomicUsize::new(0);
static DECISIONS_ASKED: AtomicUsize = AtomicUsize::new(0);

/// The word at the entry stack pointer of the last decision: the return address into the
/// caller, if the slow path passes the right stack pointer.
static LAST_ENTRY_WORD: AtomicUsize = AtomicUsize::new(0);
static LAST_ENTRY_SP: AtomicUsize = AtomicUsize::new(0);

extern "C" fn decide(_cookie: u64, entry_sp: usize) -> usize {
    DECISIONS_ASKED.fetch_add(1, Ordering::Relaxed);
    LAST_ENTRY_SP.store(entry_sp, Ordering::Relaxed);
    // SAFETY: the slow path passes the calling thread's stack pointer at the function's entry,
    // which points at the caller's return address on this very stack.
    LAST_ENTRY_WORD.store(unsafe { *(entry_sp as *const usize) }, Ordering::Relaxed);
    DECISION.load(Ordering::Relaxed)
}

fn build_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("livepatch-arch-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Compiles `source` into a shared library and opens it.
fn library(name: &str, compiler: &str, source: &str, flags: &[&str]) -> Library {
    let dir = build_dir();
    let extension = if compiler == "c++" { "cc" } else { "c" };
    let source_path = dir.join(format!("{name}.{extension}"));
    std::fs::write(&source_path, source).unwrap();
    let path = dir.join(format!("lib{name}.so"));
    let status = Command::new(compiler)
        .args(["-O2", "-shared", "-fPIC", "-g", "-o"])
        .arg(&path)
        .arg(&source_path)
        .args(flags)
        .status()
        .expect("a C compiler");
    assert!(status.success(), "compiling {name} failed");
    let c_path = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: loading a library we just built; its constructors are the compiler's own.
    let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!handle.is_null(), "dlopen {}", path.display());
    Library { path, handle }
}

struct Library {
    path: PathBuf,
    handle: *mut c_void,
}

impl Library {
    fn symbol(&self, name: &str) -> usize {
        let c_name = CString::new(name).unwrap();
        // SAFETY: a valid handle and a NUL-terminated name.
        let address = unsafe { libc::dlsym(self.handle, c_name.as_ptr()) } as usize;
        assert_ne!(address, 0, "{name} not found");
        address
    }

    fn spec<'a>(&self, name: &'a str) -> SiteSpec<'a> {
        spec_in(&self.path, name, self.symbol(name))
    }
}

/// A site for the function at `address` named `name`, sized from the symbol table of `path`.
fn spec_in<'a>(path: &Path, name: &'a str, address: usize) -> SiteSpec<'a> {
    let table = SymbolTable::read(path).unwrap();
    let symbol = table.lookup(name, 0).unwrap();
    SiteSpec {
        name,
        address,
        size: symbol.size as usize,
        cookie: address as u64,
    }
}

fn code(address: usize, len: usize) -> Vec<u8> {
    // SAFETY: reading the first bytes of a function of a loaded library.
    unsafe { std::slice::from_raw_parts(address as *const u8, len) }.to_vec()
}

const ARITHMETIC: &str = r#"
int answer(int x) { return x + 1; }
int better(int x) { return x * 100; }
"#;

/// Redirect, all three dispatches, the decider's two answers, restore: for one built library.
fn round_trip(lib: &Library, expected_kind: &str) {
    type Unary = extern "C" fn(i32) -> i32;
    let answer_addr = lib.symbol("answer");
    // SAFETY: `answer` has this C signature.
    let answer: Unary = unsafe { std::mem::transmute::<usize, Unary>(answer_addr) };
    let better = lib.symbol("better");
    let before = code(answer_addr, 8);
    assert_eq!(answer(2), 3);

    let sites = redirect::redirect(&[lib.spec("answer")]).unwrap();
    assert_eq!(sites[0].kind, expected_kind);
    assert_ne!(code(answer_addr, 8), before, "the entry was rewritten");
    assert_eq!(answer(2), 3, "a new site runs the original");
    redirect::set_dispatch(answer_addr, Dispatch::Jump(better)).unwrap();
    assert_eq!(answer(2), 200);
    redirect::set_dispatch(answer_addr, Dispatch::Original).unwrap();
    assert_eq!(answer(2), 3);
    redirect::set_dispatch(answer_addr, Dispatch::Decide).unwrap();
    DECISION.store(better, Ordering::Relaxed);
    let asked = DECISIONS_ASKED.load(Ordering::Relaxed);
    assert_eq!(answer(3), 300);
    assert!(DECISIONS_ASKED.load(Ordering::Relaxed) > asked);
    DECISION.store(0, Ordering::Relaxed);
    assert_eq!(answer(3), 4, "the decider's 0 runs the original");

    redirect::restore(&[answer_addr]).unwrap();
    assert_eq!(answer(2), 3);
    assert!(redirect::site(answer_addr).is_none());
    let after = code(answer_addr, 8);
    if expected_kind == "plain entry" {
        assert_eq!(after, before, "the original bytes are back");
    }
    // A second redirect reuses the site and works the same, through the same kind of entry.
    let again = redirect::redirect(&[lib.spec("answer")]).unwrap();
    assert_eq!(again, sites, "the second redirect is the first one's site");
    redirect::set_dispatch(answer_addr, Dispatch::Jump(better)).unwrap();
    assert_eq!(answer(1), 100);
    redirect::restore(&[answer_addr]).unwrap();
    assert_eq!(answer(1), 2);
}

#[test]
fn patchable_entry_redirects_and_restores() {
    let _serial = setup();
    let lib = library(
        "patchable",
        "cc",
        ARITHMETIC,
        &["-fpatchable-function-entry=16,14", "-fcf-protection=none"],
    );
    round_trip(&lib, "patchable entry");
    // GCC's two one-byte nops became one two-byte nop.
    let answer = lib.symbol("answer");
    assert_eq!(code(answer, 2), [0x66, 0x90]);
}

/// A function too short for a plain entry, with a patchable one.
const TINY: &str = "void nothing(void) { }\nint better(int x) { return x; }\n";

#[test]
fn a_tiny_patchable_function_is_redirected_again_after_a_restore() {
    let _serial = setup();
    let lib = library(
        "tiny_patchable",
        "cc",
        TINY,
        &["-fpatchable-function-entry=16,14", "-fcf-protection=none"],
    );
    let nothing = lib.symbol("nothing");
    assert_eq!(code(nothing, 3), [0x90, 0x90, 0xc3], "a 3-byte function");
    for round in 0..3 {
        let sites = redirect::redirect(&[lib.spec("nothing")])
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(sites[0].kind, "patchable entry", "round {round}");
        redirect::restore(&[nothing]).unwrap();
        assert_eq!(code(nothing, 3), [0x66, 0x90, 0xc3]);
    }
}

#[test]
fn patchable_entry_after_endbr64_redirects_and_restores() {
    let _serial = setup();
    let lib = library(
        "patchable_endbr",
        "cc",
        ARITHMETIC,
        &["-fpatchable-function-entry=16,14", "-fcf-protection=full"],
    );
    round_trip(&lib, "patchable entry");
    assert_eq!(
        code(lib.symbol("answer"), 6),
        [0xf3, 0x0f, 0x1e, 0xfa, 0x66, 0x90]
    );
}

#[test]
fn plain_entry_redirects_and_restores() {
    let _serial = setup();
    let lib = library(
        "plain",
        "cc",
        "volatile int bias = 1;\nint answer(int x) { return x + bias; }\nint better(int x) { return x * 100; }\n",
        &["-fcf-protection=none"],
    );
    round_trip(&lib, "plain entry");
}

#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn livepatch_test_rust_target(x: u64) -> u64 {
    std::hint::black_box(x).wrapping_mul(31).rotate_left(7) ^ 0x55
}

extern "C" fn rust_replacement(x: u64) -> u64 {
    x + 1000
}

#[test]
fn a_rust_function_takes_a_plain_entry() {
    let _serial = setup();
    let target = livepatch_test_rust_target as *const () as usize;
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    let spec = spec_in(&exe, "livepatch_test_rust_target", target);
    let call = std::hint::black_box(livepatch_test_rust_target as extern "C" fn(u64) -> u64);
    let expected = call(5);
    let site = redirect::redirect(&[spec]).unwrap();
    assert_eq!(site[0].kind, "plain entry");
    redirect::set_dispatch(
        target,
        Dispatch::Jump(rust_replacement as *const () as usize),
    )
    .unwrap();
    assert_eq!(call(5), 1005);
    redirect::set_dispatch(target, Dispatch::Original).unwrap();
    assert_eq!(call(5), expected);
    redirect::restore(&[target]).unwrap();
    assert_eq!(call(5), expected);
}

extern "C" fn fake_labs(_: libc::c_long) -> libc::c_long {
    4242
}

#[test]
fn a_libc_function_is_redirected_through_its_plain_entry() {
    let _serial = setup();
    let libc_object = objects::loaded_objects()
        .into_iter()
        .find(|o| o.file_name().is_some_and(|n| n.starts_with("libc.so")))
        .expect("libc is loaded");
    let table = SymbolTable::read(libc_object.path.as_ref().unwrap()).unwrap();
    let symbol = table.lookup("labs", 0).unwrap();
    let address = libc_object.bias + symbol.address as usize;
    let labs =
        std::hint::black_box(libc::labs as unsafe extern "C" fn(libc::c_long) -> libc::c_long);
    let spec = SiteSpec {
        name: "labs",
        address,
        size: symbol.size as usize,
        cookie: 7,
    };
    redirect::redirect(&[spec]).unwrap();
    redirect::set_dispatch(address, Dispatch::Jump(fake_labs as *const () as usize)).unwrap();
    // SAFETY: labs is a pure libc function.
    assert_eq!(unsafe { labs(-5) }, 4242);
    redirect::set_dispatch(address, Dispatch::Original).unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { labs(-5) }, 5);
    redirect::restore(&[address]).unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { labs(-6) }, 6);
}

#[test]
fn ten_thousand_redirects_while_another_thread_calls_in_a_loop() {
    let _serial = setup();
    for (name, flags) in [
        (
            "torture_patchable",
            &["-fpatchable-function-entry=16,14"][..],
        ),
        ("torture_plain", &["-fcf-protection=none"][..]),
    ] {
        let lib = library(
            name,
            "cc",
            "volatile int bias = 1;\nint answer(int x) { return x + bias; }\nint better(int x) { return x * 100; }\n",
            flags,
        );
        type Unary = extern "C" fn(i32) -> i32;
        let answer_addr = lib.symbol("answer");
        let better = lib.symbol("better");
        // SAFETY: `answer` has this C signature.
        let answer: Unary = unsafe { std::mem::transmute::<usize, Unary>(answer_addr) };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let caller = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut old, mut new) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    match answer(7) {
                        8 => old += 1,
                        700 => new += 1,
                        other => panic!("answer(7) returned {other}"),
                    }
                }
                (old, new)
            })
        };
        for i in 0..5_000 {
            redirect::redirect(&[lib.spec("answer")]).unwrap();
            let dispatch = if i % 2 == 0 {
                Dispatch::Jump(better)
            } else {
                Dispatch::Decide
            };
            DECISION.store(better, Ordering::Relaxed);
            redirect::set_dispatch(answer_addr, dispatch).unwrap();
            redirect::restore(&[answer_addr]).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let (old, new) = caller.join().expect("the calling thread never crashed");
        assert!(old > 0, "{name}: the original ran");
        assert!(new > 0 || old > 0, "{name}: calls happened");
        DECISION.store(0, Ordering::Relaxed);
    }
}

const MANY_ARGUMENTS: &str = r#"
#include <stdarg.h>
double mix(int a, int b, int c, int d, int e, int f, int g, int h,
           double x0, double x1, double x2, double x3, double x4, double x5, double x6, double x7,
           double x8, long tail) {
    return a + 2*b + 3*c + 4*d + 5*e + 6*f + 7*g + 8*h
        + 1.5*x0 + 2.5*x1 + 3.5*x2 + 4.5*x3 + 5.5*x4 + 6.5*x5 + 7.5*x6 + 8.5*x7 + 9.5*x8 + tail;
}
double mix_new(int a, int b, int c, int d, int e, int f, int g, int h,
               double x0, double x1, double x2, double x3, double x4, double x5, double x6, double x7,
               double x8, long tail) {
    return 1000000 + a + 2*b + 3*c + 4*d + 5*e + 6*f + 7*g + 8*h
        + 1.5*x0 + 2.5*x1 + 3.5*x2 + 4.5*x3 + 5.5*x4 + 6.5*x5 + 7.5*x6 + 8.5*x7 + 9.5*x8 + tail;
}
long sum(int n, ...) {
    va_list ap; long total = 0;
    va_start(ap, n);
    for (int i = 0; i < n; i++) total += (i % 2) ? (long)va_arg(ap, double) : va_arg(ap, long);
    va_end(ap);
    return total;
}
long sum_new(int n, ...) {
    va_list ap; long total = 0;
    va_start(ap, n);
    for (int i = 0; i < n; i++) total += (i % 2) ? (long)va_arg(ap, double) : va_arg(ap, long);
    va_end(ap);
    return -total;
}
double call_mix(void) {
    return mix(1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5, 100);
}
long call_sum(void) { return sum(6, 10L, 20.0, 30L, 40.0, 50L, 60.0); }
"#;

#[test]
fn every_argument_register_survives_both_stub_paths() {
    let _serial = setup();
    for (name, flags) in [
        ("args_patchable", &["-fpatchable-function-entry=16,14"][..]),
        ("args_plain", &["-fcf-protection=none"][..]),
    ] {
        let lib = library(name, "cc", MANY_ARGUMENTS, flags);
        // SAFETY: both have these C signatures.
        let call_mix: extern "C" fn() -> f64 =
            unsafe { std::mem::transmute::<usize, _>(lib.symbol("call_mix")) };
        // SAFETY: as above.
        let call_sum: extern "C" fn() -> libc::c_long =
            unsafe { std::mem::transmute::<usize, _>(lib.symbol("call_sum")) };
        let (mix_expected, sum_expected) = (call_mix(), call_sum());
        assert_eq!(sum_expected, 210);
        let (mix, sum) = (lib.symbol("mix"), lib.symbol("sum"));
        redirect::redirect(&[lib.spec("mix"), lib.spec("sum")]).unwrap();
        for dispatch in [Dispatch::Original, Dispatch::Decide] {
            DECISION.store(0, Ordering::Relaxed);
            redirect::set_dispatch(mix, dispatch).unwrap();
            redirect::set_dispatch(sum, dispatch).unwrap();
            assert_eq!(call_mix(), mix_expected, "{name} {dispatch:?}");
            assert_eq!(call_sum(), sum_expected, "{name} {dispatch:?}");
        }
        // The slow path picking the new functions passes every argument on too.
        redirect::set_dispatch(mix, Dispatch::Jump(lib.symbol("mix_new"))).unwrap();
        assert_eq!(call_mix(), mix_expected + 1_000_000.0);
        redirect::set_dispatch(sum, Dispatch::Decide).unwrap();
        DECISION.store(lib.symbol("sum_new"), Ordering::Relaxed);
        assert_eq!(call_sum(), -sum_expected);
        DECISION.store(0, Ordering::Relaxed);
        redirect::restore(&[mix, sum]).unwrap();
        assert_eq!(call_mix(), mix_expected);
    }
}

const UNWINDING: &str = r#"
#include <execinfo.h>
#include <stdexcept>
#include <cstring>
extern "C" {
__attribute__((noinline)) int thrower(int x) {
    if (x > 0) throw std::runtime_error("from thrower");
    return x;
}
__attribute__((noinline)) int thrower_new(int x) {
    if (x > 0) throw std::runtime_error("from thrower_new");
    return -x;
}
__attribute__((noinline)) int catcher(int x, char *message, int len) {
    try { return thrower(x); }
    catch (const std::exception &e) { strncpy(message, e.what(), len); return -1; }
}
void *frames[64];
int depth;
__attribute__((noinline)) int traced(int x) {
    depth = backtrace(frames, 64);
    return x + 1;
}
__attribute__((noinline)) int tracer_caller(int x) { return traced(x) * 2; }
__attribute__((noinline)) int fib(int n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }
}
"#;

#[test]
fn exceptions_backtraces_and_recursion_pass_through_redirected_frames() {
    let _serial = setup();
    for (name, flags) in [
        (
            "unwind_patchable",
            &["-fpatchable-function-entry=16,14"][..],
        ),
        (
            "unwind_plain",
            &["-fcf-protection=none", "-fno-omit-frame-pointer"][..],
        ),
    ] {
        let lib = library(name, "c++", UNWINDING, flags);
        type Catcher = extern "C" fn(i32, *mut u8, i32) -> i32;
        // SAFETY: these have the C signatures declared in UNWINDING.
        let catcher: Catcher = unsafe { std::mem::transmute::<usize, _>(lib.symbol("catcher")) };
        // SAFETY: as above.
        let tracer: extern "C" fn(i32) -> i32 =
            unsafe { std::mem::transmute::<usize, _>(lib.symbol("tracer_caller")) };
        // SAFETY: as above.
        let fib: extern "C" fn(i32) -> i32 =
            unsafe { std::mem::transmute::<usize, _>(lib.symbol("fib")) };
        let (thrower, traced, fib_addr) = (
            lib.symbol("thrower"),
            lib.symbol("traced"),
            lib.symbol("fib"),
        );
        redirect::redirect(&[lib.spec("thrower"), lib.spec("traced"), lib.spec("fib")]).unwrap();
        redirect::set_dispatch(thrower, Dispatch::Jump(lib.symbol("thrower_new"))).unwrap();
        let mut message = [0u8; 64];
        assert_eq!(catcher(1, message.as_mut_ptr(), 63), -1);
        let text = CString::from_vec_with_nul(
            message[..=message.iter().position(|&b| b == 0).unwrap()].to_vec(),
        )
        .unwrap();
        assert_eq!(text.to_str().unwrap(), "from thrower_new", "{name}");
        assert_eq!(catcher(-4, message.as_mut_ptr(), 63), 4);

        redirect::set_dispatch(traced, Dispatch::Decide).unwrap();
        DECISION.store(0, Ordering::Relaxed);
        assert_eq!(tracer(1), 4);
        let depth_addr = lib.symbol("depth");
        let frames_addr = lib.symbol("frames");
        // SAFETY: `depth` is an int and `frames` an array of 64 pointers in the library.
        let (depth, frames) = unsafe {
            (
                *(depth_addr as *const i32),
                std::slice::from_raw_parts(frames_addr as *const usize, 64),
            )
        };
        let caller = lib.symbol("tracer_caller");
        let caller_size = spec_in(&lib.path, "tracer_caller", caller).size;
        assert!(
            frames[..depth as usize]
                .iter()
                .any(|&pc| (caller..caller + caller_size).contains(&pc)),
            "{name}: the backtrace from the redirected function shows its caller"
        );

        redirect::set_dispatch(fib_addr, Dispatch::Decide).unwrap();
        assert_eq!(fib(20), 6765, "{name}: recursion through the slow path");
        redirect::set_dispatch(fib_addr, Dispatch::Original).unwrap();
        assert_eq!(fib(15), 610);
        redirect::restore(&[thrower, traced, fib_addr]).unwrap();
    }
}

const REFUSED: &str = r#"
void nothing(void) {}
__attribute__((naked)) int loops(void) {
    __asm__("xor %eax, %eax\n1: inc %eax\n cmp $10, %eax\n jne 1b\n ret\n");
}
__attribute__((naked)) int calls_first(void) {
    __asm__("call nothing\n nop\n nop\n ret\n");
}
int fine(int x) { return x * 7 + 3; }
"#;

#[test]
fn every_refusal_names_the_function_and_changes_nothing() {
    let _serial = setup();
    let lib = library("refused", "cc", REFUSED, &["-fcf-protection=none"]);
    let cases = [
        ("nothing", "too short"),
        ("loops", "lands at offset 0x2"),
        ("calls_first", "calls at offset 0x0"),
    ];
    for (function, reason) in cases {
        let address = lib.symbol(function);
        let before = code(address, 6);
        let err = redirect::redirect(&[lib.spec(function)]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("'{function}'")) && text.contains(reason),
            "{text}"
        );
        assert_eq!(code(address, 6), before);
    }
    // A batch with one refused function changes none of the others.
    let fine = lib.symbol("fine");
    let before = code(fine, 5);
    assert!(redirect::redirect(&[lib.spec("fine"), lib.spec("loops")]).is_err());
    assert_eq!(code(fine, 5), before);
    assert!(redirect::site(fine).is_none());
    // Twice is refused; so is restoring what is not redirected.
    redirect::redirect(&[lib.spec("fine")]).unwrap();
    let twice = redirect::redirect(&[lib.spec("fine")]).unwrap_err();
    assert!(twice.to_string().contains("already redirected"), "{twice}");
    redirect::restore(&[fine]).unwrap();
    assert!(matches!(
        redirect::restore(&[fine]),
        Err(RedirectError::NotRedirected(at)) if at == fine
    ));
    let unknown_size = SiteSpec {
        size: 0,
        ..lib.spec("nothing")
    };
    let err = redirect::redirect(&[unknown_size]).unwrap_err().to_string();
    assert!(err.contains("size is unknown"), "{err}");
}

#[test]
fn a_thread_blocking_the_stop_signal_is_refused_not_overrun() {
    let _serial = setup();
    let lib = library(
        "blocked",
        "cc",
        "volatile int bias = 1;\nint answer(int x) { return x + bias; }\n",
        &["-fcf-protection=none"],
    );
    let signal = livepatch_arch::stop_world::signal().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let blocker = std::thread::spawn(move || {
        // SAFETY: masking one signal on this thread only.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, signal);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
        ready_tx.send(livepatch_arch::signals::gettid()).unwrap();
        done_rx.recv().ok();
    });
    let tid = ready_rx.recv().unwrap();
    let answer = lib.symbol("answer");
    let before = code(answer, 8);
    let err = redirect::redirect(&[lib.spec("answer")]).unwrap_err();
    assert!(
        matches!(
            err,
            RedirectError::Commit(CommitError::Stop(StopError::SignalBlocked { tid: t, signal: s }))
                if t == tid && s == signal
        ),
        "{err:?}"
    );
    assert_eq!(code(answer, 8), before);
    done_tx.send(()).unwrap();
    blocker.join().unwrap();
    redirect::redirect(&[lib.spec("answer")]).unwrap();
    redirect::restore(&[answer]).unwrap();
}

const CALLER_AND_CALLEE: &str = r#"
__attribute__((noinline, noipa)) int callee(int x) { return x * 3 + 1; }
__attribute__((noinline, noipa)) int caller(int x) { return callee(x) + 1000; }
"#;

#[test]
fn the_decider_gets_the_stack_pointer_at_the_function_entry() {
    let _serial = setup();
    for (name, flags) in [
        ("entry_sp_plain", &[][..]),
        (
            "entry_sp_patchable",
            &["-fpatchable-function-entry=16,14"][..],
        ),
    ] {
        let lib = library(name, "cc", CALLER_AND_CALLEE, flags);
        type Unary = extern "C" fn(i32) -> i32;
        // SAFETY: `caller` has this C signature.
        let caller: Unary = unsafe { std::mem::transmute::<usize, Unary>(lib.symbol("caller")) };
        redirect::redirect(&[lib.spec("callee")]).unwrap();
        redirect::set_dispatch(lib.symbol("callee"), Dispatch::Decide).unwrap();
        DECISION.store(0, Ordering::Relaxed);
        assert_eq!(caller(2), 1007);
        let table = SymbolTable::read(&lib.path).unwrap();
        let bias = objects::loaded_objects()
            .into_iter()
            .find(|o| o.path.as_deref() == Some(lib.path.as_path()))
            .expect("the library is in the link map")
            .bias;
        let word = LAST_ENTRY_WORD.load(Ordering::Relaxed);
        let (function, offset) = table
            .containing((word - bias) as u64)
            .unwrap_or_else(|| panic!("{name}: {word:#x} is in no function"));
        assert_eq!(function.name, "caller", "{name}: the word at the entry SP");
        assert!(offset > 0, "{name}: a return address lies after the call");
        assert_eq!(
            LAST_ENTRY_SP.load(Ordering::Relaxed) % 16,
            8,
            "{name}: at a function's entry the stack is 8 past a 16-byte boundary"
        );
        redirect::restore(&[lib.symbol("callee")]).unwrap();
    }
}
