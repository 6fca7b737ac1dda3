//! Port of tools/testing/selftests/livepatch/test-shadow-vars.sh, and the
//! shadow variable scenarios of §8.9.
//! See: reference/kernel-livepatch.md §8.3 (test 17), §5 and §8.9.
//!
//! `test_klp_shadow_vars` is rebuilt as a target module whose init runs the
//! kernel module's program against the core's [`ShadowVars`], printing
//! pointers as `PTR<n>` in order of first sight, exactly as its `ptr_id()`
//! does.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use livepatch_core::{LogRecord, ShadowData, ShadowVars};
use livepatch_sim::modules::*;
use livepatch_sim::{Sim, TargetModule};

const SV: &str = "test_klp_shadow_vars";
const SV_ID1: u64 = 0x1234;
const SV_ID2: u64 = 0x1235;
const NUM_OBJS: usize = 3;

/// What the module's `ptr_id()` names: an address, or one of its two
/// functions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ptr {
    Null,
    Addr(usize),
    Ctor,
    Dtor,
}

/// The module's state: its `ptr_list` and its output, and (the test's own
/// model) what each constructor stored, by shadow data address.
#[derive(Default)]
struct Module {
    ids: Vec<Ptr>,
    out: Vec<String>,
    stored: BTreeMap<usize, usize>,
}

impl Module {
    fn ptr_id(&mut self, p: Ptr) -> usize {
        match self.ids.iter().position(|q| *q == p) {
            Some(i) => i,
            None => {
                self.ids.push(p);
                self.ids.len() - 1
            }
        }
    }

    fn addr(&mut self, p: Option<usize>) -> usize {
        self.ptr_id(p.map_or(Ptr::Null, Ptr::Addr))
    }

    fn pr_info(&mut self, text: String) {
        self.out.push(format!("{SV}: {text}"));
    }
}

/// The module's program, run against `vars`. Returns its output lines.
// The loops index several arrays at once, as the C module's do.
#[allow(clippy::needless_range_loop)]
fn run_program(vars: &RefCell<ShadowVars>) -> Vec<String> {
    let m = RefCell::new(Module::default());
    // Three "stack objects", and the fields the shadow variables point to.
    let objs = [[0u64; 2]; NUM_OBJS];
    let nfields1 = [0u8; NUM_OBJS];
    let nfields2 = [0i32; NUM_OBJS];
    let obj = |i: usize| std::ptr::from_ref(&objs[i]).addr();
    let pnfields1 = |i: usize| std::ptr::from_ref(&nfields1[i]).addr();
    let pnfields2 = |i: usize| std::ptr::from_ref(&nfields2[i]).addr();

    // shadow_ctor: stores *ctor_data (a pointer) in the new variable.
    let ctor_for = |var: usize| {
        let m = &m;
        move |_obj: usize, data: ShadowData<'_>| -> i32 {
            data.write(0, &var.to_ne_bytes());
            let mut m = m.borrow_mut();
            let sv = data.as_ptr().addr();
            m.stored.insert(sv, var);
            let (a, b) = (m.addr(Some(sv)), m.addr(Some(var)));
            m.pr_info(format!("shadow_ctor: PTR{a} -> PTR{b}"));
            0
        }
    };
    let shadow_get = |o: usize, id: u64| -> Option<usize> {
        let sv = vars.borrow().get(o, id).map(|p| p.as_ptr().addr());
        let mut m = m.borrow_mut();
        let (a, b) = (m.addr(Some(o)), m.addr(sv));
        m.pr_info(format!("klp_shadow_get(obj=PTR{a}, id={id:#x}) = PTR{b}"));
        sv
    };
    let shadow_alloc = |o: usize, id: u64, var: usize, get_or: bool| -> Option<usize> {
        let mut ctor = ctor_for(var);
        let sv = if get_or {
            vars.borrow_mut().get_or_alloc(o, id, 8, Some(&mut ctor))
        } else {
            vars.borrow_mut().alloc(o, id, 8, Some(&mut ctor))
        }
        .map(|p| p.as_ptr().addr());
        let mut m = m.borrow_mut();
        let a = m.addr(Some(o));
        let c = m.ptr_id(Ptr::Ctor);
        let d = m.addr(Some(var));
        let s = m.addr(sv);
        let func = if get_or {
            "klp_shadow_get_or_alloc"
        } else {
            "klp_shadow_alloc"
        };
        m.pr_info(format!(
            "{func}(obj=PTR{a}, id={id:#x}, size=8, gfp_flags=GFP_KERNEL), ctor=PTR{c}, ctor_data=PTR{d} = PTR{s}"
        ));
        sv
    };
    let expect_ptr = |got: Option<usize>, sv: Option<usize>, var: usize| {
        // `if (sv == sv1[i] && *sv1[i] == pnfields1[i])`.
        if got.is_some() && got == sv && m.borrow().stored.get(&got.unwrap()) == Some(&var) {
            let mut m = m.borrow_mut();
            let (a, b) = (m.addr(got), m.addr(Some(var)));
            m.pr_info(format!("  got expected PTR{a} -> PTR{b} result"));
        }
    };
    let expect_null = |got: Option<usize>| {
        if got.is_none() {
            m.borrow_mut().pr_info("  got expected NULL result".into());
        }
    };

    m.borrow_mut().addr(None);
    expect_null(shadow_get(obj(0), SV_ID1));

    // Pass 1: a pair of variables per object.
    let mut sv1 = [None; NUM_OBJS];
    let mut sv2 = [None; NUM_OBJS];
    for i in 0..NUM_OBJS {
        m.borrow_mut().addr(Some(pnfields1(i)));
        sv1[i] = shadow_alloc(obj(i), SV_ID1, pnfields1(i), i % 2 == 0);
        assert!(sv1[i].is_some(), "allocating <obj{i}, SV_ID1> failed");
        m.borrow_mut().addr(Some(pnfields2(i)));
        sv2[i] = shadow_alloc(obj(i), SV_ID2, pnfields2(i), false);
        assert!(sv2[i].is_some(), "allocating <obj{i}, SV_ID2> failed");
    }
    // Pass 2: they are found and point where they should.
    for i in 0..NUM_OBJS {
        expect_ptr(shadow_get(obj(i), SV_ID1), sv1[i], pnfields1(i));
        expect_ptr(shadow_get(obj(i), SV_ID2), sv2[i], pnfields2(i));
    }
    // Pass 3: get_or_alloc returns the existing variables, no ctor runs.
    for i in 0..NUM_OBJS {
        let pndup = pnfields1(i);
        m.borrow_mut().addr(Some(pndup));
        let sv = shadow_alloc(obj(i), SV_ID1, pndup, true);
        expect_ptr(sv, sv1[i], pnfields1(i));
    }
    // Pass 4: free <objs[*], SV_ID1> with the dtor; they are gone.
    for i in 0..NUM_OBJS {
        let mut dtor = |o: usize, data: ShadowData<'_>| {
            // The data the ctor stored is intact when the dtor sees it.
            let mut bytes = [0u8; 8];
            data.read(0, &mut bytes);
            assert_eq!(usize::from_ne_bytes(bytes), pnfields1(i));
            let mut m = m.borrow_mut();
            let (a, b) = (m.addr(Some(o)), m.addr(Some(data.as_ptr().addr())));
            m.pr_info(format!("shadow_dtor(obj=PTR{a}, shadow_data=PTR{b})"));
        };
        vars.borrow_mut().free(obj(i), SV_ID1, Some(&mut dtor));
        {
            let mut m = m.borrow_mut();
            let a = m.addr(Some(obj(i)));
            let d = m.ptr_id(Ptr::Dtor);
            m.pr_info(format!(
                "klp_shadow_free(obj=PTR{a}, id={SV_ID1:#x}, dtor=PTR{d})"
            ));
        }
        expect_null(shadow_get(obj(i), SV_ID1));
    }
    // Pass 5: <objs[*], SV_ID2> are still there.
    for i in 0..NUM_OBJS {
        expect_ptr(shadow_get(obj(i), SV_ID2), sv2[i], pnfields2(i));
    }
    // Pass 6: free_all SV_ID2 without a dtor; they are gone.
    vars.borrow_mut().free_all(SV_ID2, None);
    {
        let mut m = m.borrow_mut();
        let d = m.addr(None);
        m.pr_info(format!("klp_shadow_free_all(id={SV_ID2:#x}, dtor=PTR{d})"));
    }
    for i in 0..NUM_OBJS {
        expect_null(shadow_get(obj(i), SV_ID2));
    }
    assert!(vars.borrow().is_empty());
    m.into_inner().out
}

/// A table whose warnings and errors are collected for the log.
fn logged_table() -> (ShadowVars, Arc<Mutex<Vec<LogRecord>>>) {
    let records = Arc::new(Mutex::new(Vec::new()));
    let sink = records.clone();
    let vars = ShadowVars::with_log(move |r| sink.lock().unwrap().push(r));
    (vars, records)
}

/// Test 17, "basic shadow variable API".
#[test]
fn basic_shadow_variable_api() {
    let mut sim = Sim::default();
    let (vars, records) = logged_table();
    let vars = Rc::new(RefCell::new(vars));
    let module_vars = vars.clone();
    sim.load_mod(
        TargetModule {
            name: SV.into(),
            functions: vec![],
            init: Box::new(move |w| {
                for line in run_program(&module_vars) {
                    w.print(line);
                }
            }),
            exit: Box::new(|_| {}),
        },
        "",
    );
    sim.unload_mod(SV);
    assert!(records.lock().unwrap().is_empty());
    assert!(vars.borrow().is_empty());

    let p = |s: &str| format!("{SV}: {s}");
    let want: Vec<String> = [
        insmod(SV, ""),
        p("klp_shadow_get(obj=PTR1, id=0x1234) = PTR0"),
        p("  got expected NULL result"),
        p("shadow_ctor: PTR3 -> PTR2"),
        p("klp_shadow_get_or_alloc(obj=PTR1, id=0x1234, size=8, gfp_flags=GFP_KERNEL), ctor=PTR4, ctor_data=PTR2 = PTR3"),
        p("shadow_ctor: PTR6 -> PTR5"),
        p("klp_shadow_alloc(obj=PTR1, id=0x1235, size=8, gfp_flags=GFP_KERNEL), ctor=PTR4, ctor_data=PTR5 = PTR6"),
        p("shadow_ctor: PTR8 -> PTR7"),
        p("klp_shadow_alloc(obj=PTR9, id=0x1234, size=8, gfp_flags=GFP_KERNEL), ctor=PTR4, ctor_data=PTR7 = PTR8"),
        p("shadow_ctor: PTR11 -> PTR10"),
        p("klp_shadow_alloc(obj=PTR9, id=0x1235, size=8, gfp_flags=GFP_KERNEL), ctor=PTR4, ctor_data=PTR10 = PTR11"),
        p("shadow_ctor: PTR13 -> PTR12"),
        p("klp_shadow_get_or_alloc(obj=PTR14, id=0x1234, size=8, gfp_flags=GFP_KERNEL), ctor=PTR4, ctor_data=PTR12 = PTR13"),
        p("shadow_ctor: PTR16 -> PTR15"),
        p("klp_shadow_alloc(obj=PTR14, id=0x1235, size=8, gfp_flags=GFP_KERNEL), ctor=PTR4, ctor_data=PTR15 = PTR16"),
        p("klp_shadow_get(obj=PTR1, id=0x1234) = PTR3"),
        p("  got expected PTR3 -> PTR2 result"),
        p("klp_shadow_get(obj=PTR1, id=0x1235) = PTR6"),
        p("  got expected PTR6 -> PTR5 result"),
        p("klp_shadow_get(obj=PTR9, id=0x1234) = PTR8"),
        p("  got expected PTR8 -> PTR7 result"),
        p("klp_shadow_get(obj=PTR9, id=0x1235) = PTR11"),
        p("  got expected PTR11 -> PTR10 result"),
        p("klp_shadow_get(obj=PTR14, id=0x1234) = PTR13"),
        p("  got expected PTR13 -> PTR12 result"),
        p("klp_shadow_get(obj=PTR14, id=0x1235) = PTR16"),
        p("  got expected PTR16 -> PTR15 result"),
        p("klp_shadow_get_or_alloc(obj=PTR1, id=0x1234, size=8, gfp_flags=GFP_KERNEL), ctor=PTR4, ctor_data=PTR2 = PTR3"),
        p("  got expected PTR3 -> PTR2 result"),
        p("klp_shadow_get_or_alloc(obj=PTR9, id=0x1234, size=8, gfp_flags=GFP_KERNEL), ctor=PTR4, ctor_data=PTR7 = PTR8"),
        p("  got expected PTR8 -> PTR7 result"),
        p("klp_shadow_get_or_alloc(obj=PTR14, id=0x1234, size=8, gfp_flags=GFP_KERNEL), ctor=PTR4, ctor_data=PTR12 = PTR13"),
        p("  got expected PTR13 -> PTR12 result"),
        p("shadow_dtor(obj=PTR1, shadow_data=PTR3)"),
        p("klp_shadow_free(obj=PTR1, id=0x1234, dtor=PTR17)"),
        p("klp_shadow_get(obj=PTR1, id=0x1234) = PTR0"),
        p("  got expected NULL result"),
        p("shadow_dtor(obj=PTR9, shadow_data=PTR8)"),
        p("klp_shadow_free(obj=PTR9, id=0x1234, dtor=PTR17)"),
        p("klp_shadow_get(obj=PTR9, id=0x1234) = PTR0"),
        p("  got expected NULL result"),
        p("shadow_dtor(obj=PTR14, shadow_data=PTR13)"),
        p("klp_shadow_free(obj=PTR14, id=0x1234, dtor=PTR17)"),
        p("klp_shadow_get(obj=PTR14, id=0x1234) = PTR0"),
        p("  got expected NULL result"),
        p("klp_shadow_get(obj=PTR1, id=0x1235) = PTR6"),
        p("  got expected PTR6 -> PTR5 result"),
        p("klp_shadow_get(obj=PTR9, id=0x1235) = PTR11"),
        p("  got expected PTR11 -> PTR10 result"),
        p("klp_shadow_get(obj=PTR14, id=0x1235) = PTR16"),
        p("  got expected PTR16 -> PTR15 result"),
        p("klp_shadow_free_all(id=0x1235, dtor=PTR0)"),
        p("klp_shadow_get(obj=PTR1, id=0x1235) = PTR0"),
        p("  got expected NULL result"),
        p("klp_shadow_get(obj=PTR9, id=0x1235) = PTR0"),
        p("  got expected NULL result"),
        p("klp_shadow_get(obj=PTR14, id=0x1235) = PTR0"),
        p("  got expected NULL result"),
        rmmod(SV),
    ]
    .into();
    assert_transcript(&sim.transcript(), &want);
}

/// §8.9: a duplicate `klp_shadow_alloc` warns and returns NULL; the existing
/// variable and its data stay, and its constructor is not run again.
#[test]
fn duplicate_shadow_alloc_warns_and_returns_null() {
    let (mut vars, records) = logged_table();
    let obj = 0x1000usize;
    let mut ctor_calls = 0;
    let mut ctor = |_: usize, data: ShadowData<'_>| {
        ctor_calls += 1;
        data.write(0, &[0xab]);
        0
    };
    let first = vars.alloc(obj, SV_ID1, 8, Some(&mut ctor));
    assert!(first.is_some());
    let second = vars.alloc(obj, SV_ID1, 8, Some(&mut ctor));
    assert_eq!(second, None);
    assert_eq!(ctor_calls, 1);
    assert_eq!(vars.get(obj, SV_ID1), first);
    assert_eq!(vars.len(), 1);

    let records = records.lock().unwrap();
    let texts: Vec<&str> = records.iter().map(|r| r.text.as_str()).collect();
    assert_eq!(texts, vec!["Duplicate shadow variable <0x1000, 1234>"]);
    assert_eq!(records[0].level, livepatch_core::Level::Warn);

    // get_or_alloc of the same pair is not a duplicate: it returns it.
    drop(records);
    assert_eq!(vars.get_or_alloc(obj, SV_ID1, 8, None), first);
    let mut seen = Vec::new();
    let mut dtor = |_: usize, data: ShadowData<'_>| {
        let mut b = [0u8; 1];
        data.read(0, &mut b);
        seen.push(b[0]);
    };
    vars.free(obj, SV_ID1, Some(&mut dtor));
    assert_eq!(seen, vec![0xab]);
}

/// §8.9: a constructor error logs "Failed to construct shadow variable" and
/// the variable is not created; a later allocation may succeed.
#[test]
fn shadow_ctor_error_is_logged_and_nothing_is_created() {
    let (mut vars, records) = logged_table();
    let obj = 0x2000usize;
    let mut failing = |_: usize, _: ShadowData<'_>| -22;
    assert_eq!(vars.alloc(obj, SV_ID2, 8, Some(&mut failing)), None);
    assert_eq!(vars.get(obj, SV_ID2), None);
    assert!(vars.is_empty());
    assert_eq!(vars.get_or_alloc(obj, SV_ID2, 8, Some(&mut failing)), None);
    assert!(vars.is_empty());
    {
        let records = records.lock().unwrap();
        let texts: Vec<&str> = records.iter().map(|r| r.text.as_str()).collect();
        assert_eq!(
            texts,
            vec![
                "livepatch: Failed to construct shadow variable <0x2000, 1235> (-22)",
                "livepatch: Failed to construct shadow variable <0x2000, 1235> (-22)",
            ]
        );
        assert!(
            records
                .iter()
                .all(|r| r.level == livepatch_core::Level::Err)
        );
    }
    let mut ok = |_: usize, _: ShadowData<'_>| 0;
    assert!(vars.alloc(obj, SV_ID2, 8, Some(&mut ok)).is_some());
    assert_eq!(records.lock().unwrap().len(), 2);
}

/// §5: `klp_shadow_free` of a pair that does not exist does nothing and
/// runs no dtor; `klp_shadow_free_all` only touches its id and runs the dtor
/// once per variable.
#[test]
fn shadow_free_and_free_all_touch_only_their_variables() {
    let mut vars = ShadowVars::new();
    for obj in [1usize, 2, 3] {
        assert!(vars.alloc(obj, SV_ID1, 4, None).is_some());
        assert!(vars.alloc(obj, SV_ID2, 4, None).is_some());
    }
    let mut calls = Vec::new();
    vars.free(
        9,
        SV_ID1,
        Some(&mut |o: usize, _: ShadowData<'_>| calls.push(o)),
    );
    assert!(calls.is_empty());
    assert_eq!(vars.len(), 6);
    vars.free_all(
        SV_ID1,
        Some(&mut |o: usize, _: ShadowData<'_>| calls.push(o)),
    );
    calls.sort_unstable();
    assert_eq!(calls, vec![1, 2, 3]);
    assert_eq!(vars.len(), 3);
    for obj in [1usize, 2, 3] {
        assert_eq!(vars.get(obj, SV_ID1), None);
        assert!(vars.get(obj, SV_ID2).is_some());
    }
    // Data is zero-filled without a ctor.
    let mut zero = true;
    vars.free(
        1,
        SV_ID2,
        Some(&mut |_: usize, d: ShadowData<'_>| {
            let mut b = [0xffu8; 4];
            d.read(0, &mut b);
            zero = b == [0; 4] && d.len() == 4;
        }),
    );
    assert!(zero);
}
