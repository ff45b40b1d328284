//! `driftsync-sim`: runs simulation seeds.
//!
//! * `driftsync-sim --seed N [--verbose]`: one run (with `--verbose`, its whole trace);
//! * `driftsync-sim --seeds A..B`: every seed from A up to (not including) B; stops at the first
//!   failure and prints the command that replays it (`--keep-going`: one line per failure;
//!   `--twice`: every seed runs twice and must give the same digest).
//!
//! With `RUST_LOG` set (`RUST_LOG=driftsync_server=debug`), the server's logs are printed among
//! the trace lines (they are not part of the digest).

use std::process::ExitCode;
use std::time::Instant;

use driftsync_sim::{run, Options};

fn usage() -> ExitCode {
    eprintln!("usage: driftsync-sim --seed N [--verbose] | --seeds A..B [--keep-going] [--twice]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .without_time()
            .with_writer(std::io::stdout)
            .init();
    }
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
        let keep_going = args.iter().any(|a| a == "--keep-going");
        let twice = args.iter().any(|a| a == "--twice");
        let started = Instant::now();
        let mut failed = 0u64;
        for seed in a..b {
            let mut result = run(seed, Options { verbose });
            if twice {
                // The determinism check: the same seed again must give the same digest.
                if let Ok(first) = &result {
                    match run(seed, Options { verbose }) {
                        Ok(again) if again.digest != first.digest => {
                            result = Err(driftsync_sim::Failure {
                                seed,
                                violation: format!(
                                    "ran differently twice (digests {:016x} and {:016x})",
                                    first.digest, again.digest
                                ),
                                trace_tail: Vec::new(),
                            });
                        }
                        Ok(_) => {}
                        Err(failure) => {
                            result = Err(driftsync_sim::Failure {
                                violation: format!("failed only the second time: {}", failure.violation),
                                ..failure
                            });
                        }
                    }
                }
            }
            if let Err(failure) = result {
                if !keep_going {
                    eprintln!("{failure}");
                    return ExitCode::FAILURE;
                }
                failed += 1;
                eprintln!("seed {seed}: {}", failure.violation);
            }
            if (seed - a + 1) % 100 == 0 {
                println!("{} seeds ok ({:.0} s)", seed - a + 1, started.elapsed().as_secs_f64());
            }
        }
        println!(
            "seeds {a}..{b}: {failed} failed, {:.1} s",
            started.elapsed().as_secs_f64()
        );
        return if failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    usage()
}
