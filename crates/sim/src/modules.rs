//! The kernel's livepatch selftest modules (reference/kernel-livepatch.md
//! §7.2), rebuilt as simulated patch libraries and target objects, with the
//! lines they print.
//!
//! The simulated kernel image ("vmlinux", the main executable) holds the
//! functions the modules patch. Each patch builder adds its replacement
//! functions to the world, registers its callbacks and returns the
//! descriptor its library would declare.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use livepatch_core::{
    Addr, FuncDesc, ObjectCallbackKind, ObjectCallbacks, ObjectDesc, PatchDesc, StateDesc, Target,
    Tid,
};

use crate::world::{CallbackCall, DEFAULT_FUNC_SIZE, World};
use crate::{Sim, TargetModule};

/// `test_klp_livepatch`.
pub const LP: &str = "test_klp_livepatch";
/// `test_klp_atomic_replace`.
pub const AR: &str = "test_klp_atomic_replace";
/// `test_klp_callbacks_demo`.
pub const CD: &str = "test_klp_callbacks_demo";
/// `test_klp_callbacks_demo2`.
pub const CD2: &str = "test_klp_callbacks_demo2";
/// `test_klp_callbacks_mod`.
pub const MOD: &str = "test_klp_callbacks_mod";
/// `test_klp_callbacks_busy`.
pub const BUSY: &str = "test_klp_callbacks_busy";
/// `test_klp_syscall`.
pub const SC: &str = "test_klp_syscall";
/// `test_klp_state`.
pub const ST1: &str = "test_klp_state";
/// `test_klp_state2`.
pub const ST2: &str = "test_klp_state2";
/// `test_klp_state3`.
pub const ST3: &str = "test_klp_state3";
/// `test_klp_mod_target`.
pub const MOD_TARGET: &str = "test_klp_mod_target";
/// `test_klp_mod_patch`.
pub const MOD_PATCH: &str = "test_klp_mod_patch";

/// What `cat /proc/cmdline` prints unpatched in the simulation.
pub const CMDLINE_ORIGINAL: &str = "BOOT_IMAGE=/vmlinuz root=/dev/vda ro";
/// What `/proc/meminfo` prints unpatched in the simulation.
pub const MEMINFO_ORIGINAL: &str = "MemTotal: 24576000 kB";

/// The functions of the simulated kernel image that the modules patch.
pub const VMLINUX_FUNCTIONS: [&str; 3] =
    ["cmdline_proc_show", "meminfo_proc_show", "__x64_sys_getpid"];

/// The per-state id of the console_loglevel change of `test_klp_state*`.
pub const CONSOLE_LOGLEVEL_STATE: u64 = 1;
/// `CONSOLE_LOGLEVEL_MOTORMOUTH`.
pub const CONSOLE_LOGLEVEL_MOTORMOUTH: i64 = 15;
/// The loglevel the simulated kernel boots with.
pub const CONSOLE_LOGLEVEL_DEFAULT: i64 = 7;

/// Shared, simulated kernel data the modules change: `console_loglevel` and
/// the `data` pointers of states (a number stands for the allocation).
#[derive(Debug, Default)]
pub struct KernelData {
    /// `console_loglevel`.
    pub console_loglevel: i64,
    /// `state->data` per (patch, state id): the allocation's stored loglevel.
    pub state_data: BTreeMap<(String, u64), i64>,
    /// Allocations made minus allocations freed.
    pub live_allocations: i64,
    /// What the code at an address prints when run (`seq_printf` output).
    pub outputs: BTreeMap<Addr, String>,
}

/// The simulated kernel: a world whose main image holds the patched
/// functions, plus its shared data.
#[derive(Debug)]
pub struct Kernel {
    /// The data the modules change.
    pub data: Rc<RefCell<KernelData>>,
    /// A thread that reads files under /proc for the tests.
    pub reader: Tid,
}

/// Builds the simulated kernel inside `sim`'s world.
pub fn boot(sim: &mut Sim) -> Kernel {
    let funcs: Vec<(&str, u64)> = VMLINUX_FUNCTIONS.iter().map(|n| (*n, 0x80)).collect();
    let addrs = sim.world.add_functions(None, &funcs);
    let data = Rc::new(RefCell::new(KernelData {
        console_loglevel: CONSOLE_LOGLEVEL_DEFAULT,
        ..Default::default()
    }));
    data.borrow_mut()
        .outputs
        .insert(addrs[0], CMDLINE_ORIGINAL.to_string());
    data.borrow_mut()
        .outputs
        .insert(addrs[1], MEMINFO_ORIGINAL.to_string());
    let reader = sim.world.spawn("cat");
    Kernel { data, reader }
}

impl Kernel {
    /// Runs the function `name` of the kernel image on the reader thread and
    /// returns what it prints (`cat /proc/cmdline` for
    /// `cmdline_proc_show`).
    pub fn read(&self, world: &mut World, name: &str) -> String {
        self.run(world, self.reader, None, name)
    }

    /// Runs `object`'s function `name` on `tid` and returns its output.
    pub fn run(&self, world: &mut World, tid: Tid, object: Option<&str>, name: &str) -> String {
        let func = world.func_addr(object, name, 0);
        let target = world.call(tid, func);
        world.ret(tid);
        let addr = match target {
            Target::Original => func,
            Target::Code(a) => a,
        };
        self.data
            .borrow()
            .outputs
            .get(&addr)
            .cloned()
            .unwrap_or_default()
    }

    /// The selftests' `G`: grep "live patched" in /proc/cmdline and
    /// /proc/meminfo and print the matching lines into the log.
    pub fn grep_live_patched(&self, world: &mut World) {
        for f in ["cmdline_proc_show", "meminfo_proc_show"] {
            let out = self.read(world, f);
            if out.contains("live patched") {
                world.print(out);
            }
        }
    }

    fn add_output(&self, world: &mut World, patch: &str, name: &str, text: String) -> Addr {
        let addr = world.add_replacement(patch, name);
        self.data.borrow_mut().outputs.insert(addr, text);
        addr
    }
}

fn func(old_name: &str, new_func: Addr) -> FuncDesc {
    FuncDesc {
        old_name: old_name.into(),
        new_func,
        old_sympos: 0,
    }
}

/// `test_klp_livepatch`: `cmdline_proc_show` prints
/// "test_klp_livepatch: this has been live patched".
pub fn livepatch(k: &Kernel, world: &mut World) -> PatchDesc {
    let new = k.add_output(
        world,
        LP,
        "livepatch_cmdline_proc_show",
        format!("{LP}: this has been live patched"),
    );
    PatchDesc {
        name: LP.into(),
        objs: vec![ObjectDesc {
            name: None,
            funcs: vec![func("cmdline_proc_show", new)],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// `test_klp_atomic_replace replace=<replace>`: `meminfo_proc_show`.
pub fn atomic_replace(k: &Kernel, world: &mut World, replace: bool) -> PatchDesc {
    let new = k.add_output(
        world,
        AR,
        "livepatch_meminfo_proc_show",
        format!("{AR}: this has been live patched"),
    );
    PatchDesc {
        name: AR.into(),
        objs: vec![ObjectDesc {
            name: None,
            funcs: vec![func("meminfo_proc_show", new)],
            ..Default::default()
        }],
        replace,
        ..Default::default()
    }
}

fn callback_name(kind: ObjectCallbackKind) -> &'static str {
    match kind {
        ObjectCallbackKind::PrePatch => "pre_patch_callback",
        ObjectCallbackKind::PostPatch => "post_patch_callback",
        ObjectCallbackKind::PreUnpatch => "pre_unpatch_callback",
        ObjectCallbackKind::PostUnpatch => "post_unpatch_callback",
    }
}

/// The four callbacks of the callbacks demos: each prints its name and the
/// object ("vmlinux", or "<mod> -> <module state>"); `pre_patch` returns
/// `pre_patch_ret`.
fn demo_callbacks(
    world: &mut World,
    module: &str,
    pre_patch_ret: Rc<Cell<i32>>,
) -> ObjectCallbacks {
    let mut ids = Vec::new();
    for kind in [
        ObjectCallbackKind::PrePatch,
        ObjectCallbackKind::PostPatch,
        ObjectCallbackKind::PreUnpatch,
        ObjectCallbackKind::PostUnpatch,
    ] {
        let module = module.to_string();
        let ret = pre_patch_ret.clone();
        ids.push(world.add_callback(move |w, call| {
            let CallbackCall::Object {
                object,
                module_state,
                ..
            } = call
            else {
                return 0;
            };
            let what = match object {
                None => "vmlinux".to_string(),
                Some(o) => format!("{o} -> {}", module_state.describe()),
            };
            w.print(format!("{module}: {}: {what}", callback_name(kind)));
            if kind == ObjectCallbackKind::PrePatch {
                ret.get()
            } else {
                0
            }
        }));
    }
    ObjectCallbacks {
        pre_patch: Some(ids[0]),
        post_patch: Some(ids[1]),
        pre_unpatch: Some(ids[2]),
        post_unpatch: Some(ids[3]),
    }
}

/// `test_klp_callbacks_demo`: callbacks on vmlinux, `test_klp_callbacks_mod`
/// and `test_klp_callbacks_busy`, whose `busymod_work_func` it replaces.
/// `pre_patch_ret` is the module parameter (shared, writable later).
pub fn callbacks_demo(k: &Kernel, world: &mut World, pre_patch_ret: Rc<Cell<i32>>) -> PatchDesc {
    let new = k.add_output(
        world,
        CD,
        "patched_work_func",
        format!("{CD}: patched_work_func"),
    );
    let objs = vec![
        ObjectDesc {
            name: None,
            funcs: vec![],
            callbacks: demo_callbacks(world, CD, pre_patch_ret.clone()),
            build_id: None,
        },
        ObjectDesc {
            name: Some(MOD.into()),
            funcs: vec![],
            callbacks: demo_callbacks(world, CD, pre_patch_ret.clone()),
            build_id: None,
        },
        ObjectDesc {
            name: Some(BUSY.into()),
            funcs: vec![func("busymod_work_func", new)],
            callbacks: demo_callbacks(world, CD, pre_patch_ret),
            build_id: None,
        },
    ];
    PatchDesc {
        name: CD.into(),
        objs,
        ..Default::default()
    }
}

/// `test_klp_callbacks_demo2 replace=<replace>`: the four callbacks on
/// vmlinux only.
pub fn callbacks_demo2(world: &mut World, replace: bool) -> PatchDesc {
    PatchDesc {
        name: CD2.into(),
        objs: vec![ObjectDesc {
            name: None,
            funcs: vec![],
            callbacks: demo_callbacks(world, CD2, Rc::new(Cell::new(0))),
            build_id: None,
        }],
        replace,
        ..Default::default()
    }
}

/// `test_klp_callbacks_mod`: prints its init and exit.
pub fn callbacks_mod() -> TargetModule {
    TargetModule {
        name: MOD.into(),
        functions: vec![("test_klp_callbacks_mod_show".into(), DEFAULT_FUNC_SIZE)],
        init: Box::new(|w| w.print(format!("{MOD}: {MOD}_init"))),
        exit: Box::new(|w| w.print(format!("{MOD}: {MOD}_exit"))),
    }
}

/// `test_klp_callbacks_busy block_transition=<block>`: its init starts a
/// worker thread that enters `busymod_work_func` and, while `block` is set,
/// stays there; its exit clears `block` and waits for the worker.
pub fn callbacks_busy(block: Rc<Cell<bool>>) -> TargetModule {
    let worker: Rc<Cell<Option<Tid>>> = Rc::new(Cell::new(None));
    let init_worker = worker.clone();
    let init_block = block.clone();
    TargetModule {
        name: BUSY.into(),
        functions: vec![("busymod_work_func".into(), DEFAULT_FUNC_SIZE)],
        init: Box::new(move |w| {
            w.print(format!("{BUSY}: {BUSY}_init"));
            let tid = w.spawn("kworker/0:1");
            init_worker.set(Some(tid));
            let f = w.func_addr(Some(BUSY), "busymod_work_func", 0);
            w.call(tid, f);
            w.print(format!("{BUSY}: busymod_work_func enter"));
            if !init_block.get() {
                w.ret(tid);
                w.print(format!("{BUSY}: busymod_work_func exit"));
            }
        }),
        exit: Box::new(move |w| {
            block.set(false);
            if let Some(tid) = worker.get() {
                if w.thread(tid).is_some_and(|t| !t.frames.is_empty()) {
                    w.ret(tid);
                    w.print(format!("{BUSY}: busymod_work_func exit"));
                }
                w.exit(tid);
            }
            w.print(format!("{BUSY}: {BUSY}_exit"));
        }),
    }
}

/// The state modules' behaviour, by version: 1 is `test_klp_state`, 2 is
/// `test_klp_state2` / `test_klp_state3` (aware of `klp_get_prev_state`).
fn state_callbacks(
    k: &Kernel,
    world: &mut World,
    module: &str,
    aware_of_prev: bool,
) -> ObjectCallbacks {
    let mut ids = Vec::new();
    for kind in [
        ObjectCallbackKind::PrePatch,
        ObjectCallbackKind::PostPatch,
        ObjectCallbackKind::PreUnpatch,
        ObjectCallbackKind::PostUnpatch,
    ] {
        let module = module.to_string();
        let data = k.data.clone();
        ids.push(world.add_callback(move |w, call| {
            let CallbackCall::Object { prev_states, .. } = call else {
                return 0;
            };
            w.print(format!("{module}: {}: vmlinux", callback_name(kind)));
            let prev = if aware_of_prev {
                prev_states
                    .as_ref()
                    .and_then(|p| p.iter().find(|s| s.id == CONSOLE_LOGLEVEL_STATE).cloned())
            } else {
                None
            };
            let mut d = data.borrow_mut();
            let key = (module.clone(), CONSOLE_LOGLEVEL_STATE);
            match kind {
                ObjectCallbackKind::PrePatch => {
                    if prev.is_some() {
                        w.print(format!(
                            "{module}: allocate_loglevel_state: space to store console_loglevel already allocated"
                        ));
                    } else {
                        w.print(format!(
                            "{module}: allocate_loglevel_state: allocating space to store console_loglevel"
                        ));
                        d.state_data.insert(key, 0);
                        d.live_allocations += 1;
                    }
                    0
                }
                ObjectCallbackKind::PostPatch => {
                    if let Some(prev) = prev {
                        w.print(format!(
                            "{module}: fix_console_loglevel: taking over the console_loglevel change"
                        ));
                        let stored = d.state_data.remove(&(prev.patch.clone(), prev.id)).unwrap_or_default();
                        d.state_data.insert(key, stored);
                    } else {
                        w.print(format!("{module}: fix_console_loglevel: fixing console_loglevel"));
                        let saved = d.console_loglevel;
                        d.state_data.insert(key, saved);
                        d.console_loglevel = CONSOLE_LOGLEVEL_MOTORMOUTH;
                    }
                    0
                }
                ObjectCallbackKind::PreUnpatch => {
                    if let Some(prev) = prev {
                        w.print(format!(
                            "{module}: restore_console_loglevel: passing the console_loglevel change back to the old livepatch"
                        ));
                        let stored = d.state_data.remove(&key).unwrap_or_default();
                        d.state_data.insert((prev.patch.clone(), prev.id), stored);
                    } else {
                        w.print(format!("{module}: restore_console_loglevel: restoring console_loglevel"));
                        let saved = d.state_data.get(&key).copied().unwrap_or(CONSOLE_LOGLEVEL_DEFAULT);
                        d.console_loglevel = saved;
                    }
                    0
                }
                ObjectCallbackKind::PostUnpatch => {
                    if prev.is_some() {
                        w.print(format!(
                            "{module}: free_loglevel_state: keeping space to store console_loglevel"
                        ));
                    } else {
                        w.print(format!(
                            "{module}: free_loglevel_state: freeing space for the stored console_loglevel"
                        ));
                        d.state_data.remove(&key);
                        d.live_allocations -= 1;
                    }
                    0
                }
            }
        }));
    }
    ObjectCallbacks {
        pre_patch: Some(ids[0]),
        post_patch: Some(ids[1]),
        pre_unpatch: Some(ids[2]),
        post_unpatch: Some(ids[3]),
    }
}

/// `test_klp_state` (version 1), `test_klp_state2` (version 2) or
/// `test_klp_state3` (the same code as 2): a replacing patch with no funcs
/// that changes `console_loglevel` in its callbacks and declares state 1.
///
/// # Panics
/// For another module name.
pub fn state(k: &Kernel, world: &mut World, module: &str) -> PatchDesc {
    let (version, aware) = match module {
        ST1 => (1, false),
        ST2 | ST3 => (2, true),
        other => panic!("{other} is not a state module"),
    };
    PatchDesc {
        name: module.into(),
        objs: vec![ObjectDesc {
            name: None,
            funcs: vec![],
            callbacks: state_callbacks(k, world, module, aware),
            build_id: None,
        }],
        states: vec![StateDesc {
            id: CONSOLE_LOGLEVEL_STATE,
            version,
            callbacks: Default::default(),
        }],
        replace: true,
    }
}

/// `test_klp_syscall`: replaces `__x64_sys_getpid`; the replacement prints
/// nothing (the test counts its callers).
pub fn syscall(k: &Kernel, world: &mut World) -> PatchDesc {
    let new = k.add_output(world, SC, "lp_sys_getpid", String::new());
    PatchDesc {
        name: SC.into(),
        objs: vec![ObjectDesc {
            name: None,
            funcs: vec![func("__x64_sys_getpid", new)],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// `test_klp_mod_target`: `test_klp_mod_target_show` prints
/// "test_klp_mod_target: original output".
pub fn mod_target(k: &Kernel) -> TargetModule {
    let data = k.data.clone();
    TargetModule {
        name: MOD_TARGET.into(),
        functions: vec![("test_klp_mod_target_show".into(), DEFAULT_FUNC_SIZE)],
        init: Box::new(move |w| {
            let addr = w.func_addr(Some(MOD_TARGET), "test_klp_mod_target_show", 0);
            data.borrow_mut()
                .outputs
                .insert(addr, format!("{MOD_TARGET}: original output"));
            w.print(format!("{MOD_TARGET}: {MOD_TARGET}_init"));
        }),
        exit: Box::new(|w| w.print(format!("{MOD_TARGET}: {MOD_TARGET}_exit"))),
    }
}

/// `test_klp_mod_patch`: replaces `test_klp_mod_target_show`.
pub fn mod_patch(k: &Kernel, world: &mut World) -> PatchDesc {
    let new = k.add_output(
        world,
        MOD_PATCH,
        "livepatch_mod_target_show",
        format!("{MOD_PATCH}: this has been live patched"),
    );
    PatchDesc {
        name: MOD_PATCH.into(),
        objs: vec![ObjectDesc {
            name: Some(MOD_TARGET.into()),
            funcs: vec![func("test_klp_mod_target_show", new)],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Expands the selftests' `P(X)` block: the five lines of enabling a patch
/// without callbacks.
pub fn p_block(x: &str) -> Vec<String> {
    vec![
        format!("livepatch: enabling patch '{x}'"),
        format!("livepatch: '{x}': initializing patching transition"),
        format!("livepatch: '{x}': starting patching transition"),
        format!("livepatch: '{x}': completing patching transition"),
        format!("livepatch: '{x}': patching complete"),
    ]
}

/// Expands `U(X)`: the command and the four lines of disabling a patch
/// without callbacks.
pub fn u_block(x: &str) -> Vec<String> {
    vec![
        format!("% echo 0 > /sys/kernel/livepatch/{x}/enabled"),
        format!("livepatch: '{x}': initializing unpatching transition"),
        format!("livepatch: '{x}': starting unpatching transition"),
        format!("livepatch: '{x}': completing unpatching transition"),
        format!("livepatch: '{x}': unpatching complete"),
    ]
}

/// `% insmod test_modules/X.ko [args]`.
pub fn insmod(x: &str, args: &str) -> String {
    if args.is_empty() {
        format!("% insmod test_modules/{x}.ko")
    } else {
        format!("% insmod test_modules/{x}.ko {args}")
    }
}

/// `% rmmod X`.
pub fn rmmod(x: &str) -> String {
    format!("% rmmod {x}")
}

/// Compares a transcript with the expected lines and, on a mismatch, panics
/// with both side by side from the first difference (the selftests' diff).
///
/// # Panics
/// When they differ.
pub fn assert_transcript(got: &[String], want: &[String]) {
    if got == want {
        return;
    }
    let first = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    panic!(
        "transcript differs at line {}\n--- expected\n{}\n--- got\n{}",
        first + 1,
        want.join("\n"),
        got.join("\n")
    );
}
