//! Property tests: random sequences of the operations of `livepatch_sim::workload`, chosen
//! and shrunk by proptest, with every invariant checked after every step and the wind-down's
//! checks at the end (see the workload module for both).
//!
//! `PROPTEST_CASES` overrides the number of sequences (default 2000). A failing sequence is
//! saved in `tests/properties.regressions` and tried first by every later run: commit it with
//! the fix.

use livepatch_sim::workload::{Op, PatchSpec, Run, SiteFault};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

fn patch_spec() -> impl Strategy<Value = PatchSpec> {
    (
        any::<bool>(),
        prop::collection::vec((0..3usize, 0..4usize), 0..4),
        any::<bool>(),
        prop::bool::weighted(0.1),
        prop::option::weighted(0.3, (1..3u64, 1..4u32)),
        prop::bool::weighted(0.1),
    )
        .prop_map(
            |(replace, funcs, callbacks, pre_patch_fails, state, setup_fails)| PatchSpec {
                replace,
                funcs,
                callbacks,
                pre_patch_fails,
                state,
                setup_fails,
            },
        )
}

fn site_fault() -> impl Strategy<Value = SiteFault> {
    prop_oneof![
        Just(SiteFault::Unredirectable),
        Just(SiteFault::RegisterFails)
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => patch_spec().prop_map(Op::Enable),
        2 => (0..4usize).prop_map(Op::Disable),
        1 => Just(Op::Reverse),
        1 => Just(Op::Force),
        1 => (1..3usize).prop_map(Op::LoadObject),
        1 => (1..3usize).prop_map(Op::UnloadObject),
        4 => (0..6usize, 0..3usize, 0..4usize).prop_map(|(t, o, f)| Op::Enter(t, o, f)),
        4 => (0..6usize).prop_map(Op::Leave),
        1 => Just(Op::Spawn),
        1 => Just(Op::SpawnDiscovered),
        1 => (0..6usize).prop_map(Op::Exit),
        2 => (0..6usize).prop_map(Op::SwitchPoint),
        1 => (0..6usize, any::<bool>()).prop_map(|(t, r)| Op::SetRunning(t, r)),
        1 => (0..6usize, any::<bool>()).prop_map(|(t, u)| Op::SetUnreliable(t, u)),
        1 => (0..3usize, 0..4usize, site_fault()).prop_map(|(o, f, k)| Op::BreakSite(o, f, k)),
        1 => Just(Op::MendSites),
        4 => (1..6u8).prop_map(Op::Work),
    ]
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_sequences_keep_every_invariant(ops in prop::collection::vec(op(), 1..60)) {
        let mut run = Run::new();
        for op in &ops {
            run.apply(op);
        }
        run.wind_down();
    }
}
