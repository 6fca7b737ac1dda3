//! Shadow variables on a real program: the kernel's shadow variable samples
//! (samples/livepatch/livepatch-shadow-mod.c, -fix1.c and -fix2.c), ported to
//! examples/patches/livepatch-shadow-fix1.c and -fix2.c. The test compares the agent's log with
//! the lines the kernel prints for the same scenario.
//! See: tools/testing/selftests/livepatch/test-shadow-vars.sh (reference/kernel-livepatch.md
//! §8.3; the simulator's port is crates/sim/tests/test_shadow_vars.rs).

mod support;

use support::selftest::{disable, dmesg, example_program, load, patching, unload, unpatching};
use support::{Target, examples};

// Shadow variables: the kernel's livepatch-shadow-mod/fix1/fix2 samples, on
// examples/programs/shadow-host.c.

/// What one line of shadow-host counts.
struct Tick {
    objects: i64,
    leaked: i64,
}

/// Runs one iteration of shadow-host (allocate one object, free the expired ones).
fn shadow_tick(target: &mut Target) -> Tick {
    target.send("tick");
    let line = target.expect("shadow-host: tick ");
    let numbers: Vec<i64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let [_, objects, leaked] = numbers[..] else {
        panic!("unexpected line {line}")
    };
    Tick { objects, leaked }
}

fn fix2_counts(pid: &str) -> Vec<i64> {
    dmesg(pid)
        .iter()
        .filter_map(|l| l.strip_prefix("livepatch_shadow_fix2: dummy "))
        .map(|l| {
            let count = l.split(" checked ").nth(1).unwrap();
            count.strip_suffix(" times").unwrap().parse().unwrap()
        })
        .collect()
}

/// An object lives at most three ticks after the one that allocated it.
const OBJECT_LIFETIME: usize = 3;

/// The kernel's shadow variable samples: fix1 keeps the buffer each new object leaked in a
/// shadow variable and frees it with the object, so leaks stop; fix2, stacked on fix1, counts
/// the checks of each object in a second shadow variable; disabling fix2 stops the counting and
/// disabling fix1 releases the buffers of the objects still alive. Only buffers of objects
/// allocated before fix1 stay leaked.
#[test]
fn shadow_variables_fix_a_leak_count_checks_and_are_released_on_disable() {
    // dummy_free() calls free() within its first five bytes: only a patchable entry lets the
    // agent redirect it.
    let host = example_program("shadow-host", true);
    let mut target = Target::start_with(&host, &["600000"], "shadow-host: tick 0:");
    let pid = target.pid();
    let mut before_fix = 1;
    for _ in 0..4 {
        before_fix += 1;
        assert_eq!(
            shadow_tick(&mut target).leaked,
            before_fix,
            "one leak per object"
        );
    }

    load(&pid, &examples().join("livepatch-shadow-fix1.so"));
    for _ in 0..OBJECT_LIFETIME {
        let tick = shadow_tick(&mut target);
        assert!(tick.leaked <= before_fix + tick.objects);
    }
    // Every object allocated before fix1 is gone: only live objects hold a buffer now.
    for _ in 0..3 {
        let tick = shadow_tick(&mut target);
        assert_eq!(tick.leaked, before_fix + tick.objects);
    }

    load(&pid, &examples().join("livepatch-shadow-fix2.so"));
    for _ in 0..=OBJECT_LIFETIME {
        let tick = shadow_tick(&mut target);
        assert_eq!(tick.leaked, before_fix + tick.objects);
    }
    let counts = fix2_counts(&pid);
    assert!(!counts.is_empty(), "fix2 logged no freed object");
    assert!(
        counts
            .iter()
            .all(|&c| (1..=OBJECT_LIFETIME as i64 + 1).contains(&c)),
        "{counts:?}"
    );

    disable(&pid, "livepatch_shadow_fix2");
    for _ in 0..=OBJECT_LIFETIME {
        let tick = shadow_tick(&mut target);
        assert_eq!(tick.leaked, before_fix + tick.objects, "fix1 still frees");
    }
    assert_eq!(fix2_counts(&pid), counts, "fix2 counts no more");

    disable(&pid, "livepatch_shadow_fix1");
    // fix1's post_unpatch released every buffer still held; the new object leaks again.
    assert_eq!(shadow_tick(&mut target).leaked, before_fix + 1);
    assert_eq!(shadow_tick(&mut target).leaked, before_fix + 2);
    unload(&pid, "livepatch_shadow_fix2");
    unload(&pid, "livepatch_shadow_fix1");

    let log: Vec<String> = dmesg(&pid)
        .into_iter()
        .filter(|l| !l.starts_with("livepatch_shadow_fix2: dummy "))
        .collect();
    assert_eq!(
        log,
        [
            patching("livepatch_shadow_fix1"),
            patching("livepatch_shadow_fix2"),
            unpatching("livepatch_shadow_fix2"),
            unpatching("livepatch_shadow_fix1"),
        ]
        .concat()
    );
}
