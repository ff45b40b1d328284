//! A deterministic simulation of the whole of driftsync, after FoundationDB's simulation
//! testing, TigerBeetle's VOPR and zed's randomized collaboration tests.
//!
//! One seed fully determines a run: native and y-websocket clients, one to three server
//! instances over one shared in-memory store ([`store::MemStore`]), and an in-memory network
//! ([`net`]) that delays, drops (cuts connections, losing what was in flight), duplicates
//! (clients re-send pushes, Yjs clients their state) and reorders (independent delays per
//! connection; old connections still delivering after new ones). The fan-out between the
//! instances ([`fanout::LossyFanout`]) drops, duplicates and reorders their messages, the last
//! one of a run included, and each instance's head check repairs what it lost. Servers crash
//! and restart (memory lost, the store kept), commits fail for stretches, clients go offline for minutes to
//! hours and write meanwhile, and all of it runs on tokio's paused clock, so hours pass in
//! milliseconds.
//!
//! After the schedule every fault heals, every client comes online, and the run waits until
//! everybody is synced; then it checks the invariants:
//! * every replica equals the store's document (state vector, text, chat messages in order,
//!   receipts);
//! * every acknowledged batch is in the store;
//! * the cursors a connection receives never decrease (checked as frames arrive);
//! * no presence is shown longer than its TTL (30 s) plus the server's sweep (5 s) plus the
//!   network's delays (checked every virtual second).
//!
//! A failure names the seed, the violation, the end of the trace, and one command that replays
//! it ([`replay_command`]).

pub mod check;
pub mod client;
pub mod fanout;
pub mod net;
pub mod server;
pub mod store;
mod world;
pub mod yjs;

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// How to run a seed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Print every trace line as it happens.
    pub verbose: bool,
}

/// What a successful run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// A digest of every event of the run, in order (frames delivered, faults, writes): two
    /// runs of one seed must have the same.
    pub digest: u64,
    /// One line: the shape of the run and what happened in it.
    pub summary: String,
}

/// A run that broke an invariant.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The seed.
    pub seed: u64,
    /// What was violated.
    pub violation: String,
    /// The last lines of the trace.
    pub trace_tail: Vec<String>,
}

/// The one command that replays a seed with its whole trace.
pub fn replay_command(seed: u64) -> String {
    format!("cargo run -p driftsync-sim --release -- --seed {seed} --verbose")
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "seed {} failed: {}", self.seed, self.violation)?;
        writeln!(f, "last events:")?;
        for line in &self.trace_tail {
            writeln!(f, "  {line}")?;
        }
        write!(f, "replay: {}", replay_command(self.seed))
    }
}

impl std::error::Error for Failure {}

/// Runs one seed on a fresh current-thread runtime with a paused clock.
pub fn run(seed: u64, options: Options) -> Result<Report, Failure> {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .map_err(|e| Failure {
                seed,
                violation: format!("cannot build a runtime: {e}"),
                trace_tail: Vec::new(),
            })?;
        let result = runtime.block_on(world::World::new(seed, options).run());
        // Dropping the runtime aborts every task left (server instances, link pumps).
        drop(runtime);
        result
    }));
    match outcome {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_else(|| "a panic".into());
            Err(Failure {
                seed,
                violation: format!("panicked: {message}"),
                trace_tail: Vec::new(),
            })
        }
    }
}
