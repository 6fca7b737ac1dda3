//! `simulate [SEED]`: one run of the seeded simulator, with its parameters and every operation
//! printed as it goes. Without a seed, one is drawn from the clock. Exits 1 when the run breaks
//! an invariant (the panic says which, and the seed to run it again).

fn main() {
    let seed = match std::env::args().nth(1) {
        Some(text) => livepatch_sim::simulator::parse_seed(&text).unwrap_or_else(|| {
            eprintln!("simulate: {text:?} is not a seed (decimal or 0x hex)");
            std::process::exit(2)
        }),
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    };
    let outcome = livepatch_sim::simulator::simulate(seed, true);
    let completed = outcome
        .transcript
        .iter()
        .filter(|l| l.ends_with("patching complete"))
        .count();
    println!(
        "seed {seed:#x}: {} operations, {completed} transitions completed, {} log lines, every invariant kept",
        outcome.steps,
        outcome.transcript.len()
    );
}
