//! `driftsync-sim`: runs simulation seeds.
//!
//! * `driftsync-sim --seed N [--verbose]`: one run (with `--verbose`, its whole trace);
//! * `driftsync-sim --seeds A..B`: every seed from A up to (not including) B; stops at the first
//!   failure and prints the command that replays it.

use std::process::ExitCode;
use std::time::Instant;

use driftsync_sim::{run, Options};

fn usage() -> ExitCode {
    eprintln!("usage: driftsync-sim --seed N [--verbose] | --seeds A..B");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let verbose = args.iter().any(|a| a == "--verbose");
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1));
    if let Some(seed) = value("--seed") {
        let Ok(seed) = seed.parse::<u64>() else { return usage() };
        return match run(seed, Options { verbose }) {
            Ok(report) => {
                println!("seed {seed} ok (digest {:016x}): {}", report.digest, report.summary);
                ExitCode::SUCCESS
            }
            Err(failure) => {
                eprintln!("{failure}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(range) = value("--seeds") {
        let Some((a, b)) = range.split_once("..") else {
            return usage();
        };
        let (Ok(a), Ok(b)) = (a.parse::<u64>(), b.parse::<u64>()) else {
            return usage();
        };
        let started = Instant::now();
        for seed in a..b {
            if let Err(failure) = run(seed, Options { verbose }) {
                eprintln!("{failure}");
                return ExitCode::FAILURE;
            }
            if (seed - a + 1) % 100 == 0 {
                println!("{} seeds ok ({:.0} s)", seed - a + 1, started.elapsed().as_secs_f64());
            }
        }
        println!("seeds {a}..{b} ok in {:.1} s", started.elapsed().as_secs_f64());
        return ExitCode::SUCCESS;
    }
    usage()
}
