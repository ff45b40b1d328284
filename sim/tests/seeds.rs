//! Runs simulation seeds: `DRIFTSYNC_SIM_SEEDS` of them (default 500, about a minute in a dev build) starting at
//! `DRIFTSYNC_SIM_FIRST_SEED` (default 1). A failure prints the seed, the violation, the end of
//! its trace and the one command that replays it. Also checks that a run is deterministic: the
//! same seed twice gives the same digest of events.

use driftsync_sim::{run, Options};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[test]
fn seeds() {
    let first = env("DRIFTSYNC_SIM_FIRST_SEED", 1);
    let count = env("DRIFTSYNC_SIM_SEEDS", 500);
    println!(
        "simulating seeds {first}..{} (DRIFTSYNC_SIM_FIRST_SEED, DRIFTSYNC_SIM_SEEDS)",
        first + count
    );
    let started = std::time::Instant::now();
    // Every seed runs; the first failure is shown whole, the others in a line each.
    let mut failures = Vec::new();
    for seed in first..first + count {
        if let Err(failure) = run(seed, Options::default()) {
            if failures.is_empty() {
                eprintln!("{failure}");
            }
            failures.push(failure);
        }
    }
    println!("{count} seeds in {:.1} s", started.elapsed().as_secs_f64());
    if !failures.is_empty() {
        let lines: Vec<String> = failures
            .iter()
            .map(|f| format!("seed {}: {}", f.seed, f.violation))
            .collect();
        panic!(
            "{} of {count} seeds failed:\n{}\nreplay one: {}",
            failures.len(),
            lines.join("\n"),
            driftsync_sim::replay_command(failures[0].seed)
        );
    }
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [3, 17, 4242] {
        let a = run(seed, Options::default()).unwrap_or_else(|f| panic!("{f}"));
        let b = run(seed, Options::default()).unwrap_or_else(|f| panic!("{f}"));
        assert_eq!(
            a.digest, b.digest,
            "seed {seed} ran differently twice:\n{}\n{}",
            a.summary, b.summary
        );
    }
}
