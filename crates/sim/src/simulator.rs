//! The simulator as a program driven by one seed, in the manner of TigerBeetle's: the seed
//! decides every parameter of a run (how long it is, how often each kind of operation and each
//! fault comes) and then every operation, thread move and fault of it, through one generator.
//! A run prints its seed and parameters first; a failing run says how to run it again.
//!
//! The knobs, read by [`seeds_from_env`]:
//!
//! - `LIVEPATCH_SIM_SEED`: run this one seed (decimal or `0x` hex).
//! - `LIVEPATCH_SIM_SEEDS`: how many seeds the test runs (default 300), from a fixed first seed
//!   so that CI is repeatable; `LIVEPATCH_SIM_SEED=random` draws a first seed from the clock.

use crate::workload::{MAX_THREADS, OBJECTS, Op, PatchSpec, Run, SiteFault};

/// SplitMix64: small, fast, and good enough to spread one seed over a run.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    /// True with probability `per_mille` / 1000.
    pub fn chance(&mut self, per_mille: u32) -> bool {
        self.below(1000) < u64::from(per_mille)
    }

    /// An index into a slice of `len` (> 0) elements.
    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }
}

/// Everything the seed decides before the first operation.
#[derive(Clone, Debug)]
pub struct Parameters {
    /// Operations of the run.
    pub steps: usize,
    /// Relative weight of each kind of operation, in the order of [`KINDS`].
    pub weights: [u32; KINDS.len()],
    /// How often a new patch replaces (‰).
    pub replace: u32,
    /// How often a patch has callbacks, and how often its `pre_patch` then fails (‰).
    pub callbacks: u32,
    /// See `callbacks`.
    pub pre_patch_fails: u32,
    /// How often a patch carries a system state, and how often state 1's setup fails (‰).
    pub states: u32,
    /// See `states`.
    pub setup_fails: u32,
    /// How often an entry fault is of the kind found when planning rather than writing (‰).
    pub unredirectable: u32,
}

/// The kinds of operation, as [`Parameters::weights`] orders them.
pub const KINDS: [&str; 16] = [
    "enable",
    "disable",
    "reverse",
    "force",
    "load",
    "unload",
    "enter",
    "leave",
    "spawn",
    "discover",
    "exit",
    "switch",
    "busy",
    "unreliable",
    "fault",
    "work",
];

impl Parameters {
    /// The parameters of the run of `seed`'s generator.
    pub fn draw(rng: &mut Rng) -> Parameters {
        // Every kind gets some weight; which ones dominate changes from seed to seed, so that
        // some runs are mostly transitions blocked by busy threads and others mostly libraries
        // coming and going.
        let mut weights = [0u32; KINDS.len()];
        for w in &mut weights {
            *w = 1 + rng.below(6) as u32;
        }
        // Patches, the retry work and the threads' own moves keep the run going; what holds
        // transitions back (busy threads, unreliable stacks, broken entries) comes less often.
        for (kind, extra) in [
            ("enable", 4),
            ("disable", 2),
            ("enter", 4),
            ("leave", 6),
            ("work", 8),
        ] {
            weights[KINDS.iter().position(|k| *k == kind).expect("a kind")] += extra;
        }
        Parameters {
            steps: 20 + rng.index(120),
            weights,
            replace: rng.below(700) as u32,
            callbacks: rng.below(1000) as u32,
            pre_patch_fails: rng.below(300) as u32,
            states: rng.below(600) as u32,
            setup_fails: rng.below(300) as u32,
            unredirectable: rng.below(1000) as u32,
        }
    }
}

fn draw_patch(rng: &mut Rng, p: &Parameters) -> PatchSpec {
    let funcs = (0..rng.below(4))
        .map(|_| (rng.index(OBJECTS.len()), rng.index(4)))
        .collect();
    PatchSpec {
        replace: rng.chance(p.replace),
        funcs,
        callbacks: rng.chance(p.callbacks),
        pre_patch_fails: rng.chance(p.pre_patch_fails),
        state: rng
            .chance(p.states)
            .then(|| (1 + rng.below(2), 1 + rng.below(3) as u32)),
        setup_fails: rng.chance(p.setup_fails),
    }
}

/// The next operation of a run.
pub fn draw_op(rng: &mut Rng, p: &Parameters) -> Op {
    let total: u32 = p.weights.iter().sum();
    let mut pick = rng.below(u64::from(total)) as u32;
    let mut kind = 0;
    while pick >= p.weights[kind] {
        pick -= p.weights[kind];
        kind += 1;
    }
    let thread = rng.index(MAX_THREADS);
    // A busy thread, an unreliable stack or a broken entry lasts a while: each also has its
    // undoing drawn now and then, and the retry work follows most moves.
    match KINDS[kind] {
        "enable" => Op::Enable(draw_patch(rng, p)),
        "disable" => Op::Disable(rng.index(4)),
        "reverse" => Op::Reverse,
        "force" => Op::Force,
        "load" => Op::LoadObject(1 + rng.index(2)),
        "unload" => Op::UnloadObject(1 + rng.index(2)),
        "enter" => Op::Enter(thread, rng.index(OBJECTS.len()), rng.index(4)),
        "leave" => Op::Leave(thread),
        "work" => Op::Work(1 + rng.below(5) as u8),
        "spawn" => Op::Spawn,
        "discover" => Op::SpawnDiscovered,
        "exit" => Op::Exit(thread),
        "switch" => Op::SwitchPoint(thread),
        "busy" => Op::SetRunning(thread, rng.chance(400)),
        "unreliable" => Op::SetUnreliable(thread, rng.chance(300)),
        _ if rng.chance(500) => Op::MendSites,
        _ => Op::BreakSite(
            rng.index(OBJECTS.len()),
            rng.index(4),
            if rng.chance(p.unredirectable) {
                SiteFault::Unredirectable
            } else {
                SiteFault::RegisterFails
            },
        ),
    }
}

/// What a run did, to compare two runs of one seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The seed.
    pub seed: u64,
    /// Operations applied.
    pub steps: usize,
    /// The log of the run, as the kernel's selftests read it.
    pub transcript: Vec<String>,
}

/// Prints the seed and how to run it again if the run it guards panics.
struct ReproduceOnPanic(u64);

impl Drop for ReproduceOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "simulation failed: seed {0:#x}\n  run it again with: LIVEPATCH_SIM_SEED={0:#x} cargo test -p livepatch-sim --test simulator",
                self.0
            );
        }
    }
}

/// Runs the simulation of `seed`: its parameters, then its operations with every invariant
/// checked after each, then the wind-down. `verbose` prints the seed, the parameters and each
/// operation first, as a trace to read.
///
/// # Panics
/// When an invariant breaks, after printing the seed and how to reproduce it.
pub fn simulate(seed: u64, verbose: bool) -> Outcome {
    let _reproduce = ReproduceOnPanic(seed);
    let mut rng = Rng::new(seed);
    let params = Parameters::draw(&mut rng);
    if verbose {
        eprintln!("seed {seed:#x}: {params:?}");
    }
    let mut run = Run::new();
    for step in 0..params.steps {
        let op = draw_op(&mut rng, &params);
        if verbose {
            eprintln!("{step:4} {op:?}");
        }
        run.apply(&op);
    }
    run.wind_down();
    Outcome {
        seed,
        steps: params.steps,
        transcript: run.sim.transcript(),
    }
}

/// The seeds a test run covers: `LIVEPATCH_SIM_SEED` alone, or `LIVEPATCH_SIM_SEEDS` (default
/// `default_count`) consecutive seeds from a fixed first one (or from the clock with
/// `LIVEPATCH_SIM_SEED=random`).
pub fn seeds_from_env(default_count: u64) -> Vec<u64> {
    let count = std::env::var("LIVEPATCH_SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_count);
    match std::env::var("LIVEPATCH_SIM_SEED").ok().as_deref() {
        Some("random") => {
            let first = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            eprintln!("simulating {count} seeds from {first:#x}");
            (0..count).map(|i| first.wrapping_add(i)).collect()
        }
        Some(text) => vec![parse_seed(text).unwrap_or_else(|| {
            panic!("LIVEPATCH_SIM_SEED={text}: not a seed (decimal, 0x hex, or random)")
        })],
        None => (0..count).map(|i| 0x5eed_0000 + i).collect(),
    }
}

/// A seed from decimal or `0x` hex.
pub fn parse_seed(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_seed_gives_one_sequence() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let first: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let second: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        assert_eq!(first, second);
        assert_ne!(Rng::new(8).next_u64(), first[0]);
        assert_eq!(parse_seed("0x1f"), Some(31));
        assert_eq!(parse_seed("31"), Some(31));
        assert_eq!(parse_seed("x"), None);
    }
}
