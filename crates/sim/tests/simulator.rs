//! The seeded simulator (see `livepatch_sim::simulator`): many seeds, each a whole run with its
//! own parameters, operations and faults; and one seed run twice, which must do exactly the
//! same. A failing seed prints itself and the command that runs it again.

use livepatch_sim::simulator::{seeds_from_env, simulate};

#[test]
fn every_seed_keeps_every_invariant_and_settles() {
    let seeds = seeds_from_env(300);
    let verbose = seeds.len() == 1;
    for seed in seeds {
        simulate(seed, verbose);
    }
}

#[test]
fn a_seed_run_twice_does_exactly_the_same() {
    for seed in seeds_from_env(20).into_iter().take(20) {
        assert_eq!(
            simulate(seed, false),
            simulate(seed, false),
            "seed {seed:#x}"
        );
    }
}
