//! Store append benchmarks: what a server's group commit costs on the SQLite store (a file in a
//! temporary directory, WAL, `synchronous = FULL`).
//!
//! * `store_append/one`: one `Store::append` of one small update with a client origin (the
//!   fan-out case: one writer, each update its own transaction and fsync).
//! * `store_append/group_256x64`: one `Store::append` of 256 updates with origins spread over 64
//!   documents (the many-rooms case: a group commit under load).
//!
//! Besides the wall time per call that criterion reports, each benchmark prints the process CPU
//! time (user + system, every thread — appends run on the store's write thread) per
//! appended update, measured over a fixed number of calls.
//!
//! Run with `cargo bench -p driftsync-engine --bench store` (append `-- --quick` for a shorter
//! run). The figures are recorded in `BENCHMARKS.md`.

use std::time::{Duration, Instant};

use criterion::Criterion;
use driftsync_engine::store::{Append, Origin, SqliteStore, Store};
use tokio::runtime::Runtime;

/// A typical small update: one character typed.
const UPDATE: [u8; 24] = [
    1, 1, 177, 221, 200, 241, 9, 5, 132, 177, 221, 200, 241, 9, 4, 1, 97, 0, 0, 0, 0, 0, 0, 0,
];

/// Process CPU time (user + system, all threads) so far, from `/proc/self/stat` (Linux; in clock
/// ticks of 10 ms, so the loop below runs long enough for that to be fine-grained).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which ends with the last ')'): utime and stime are the
    // 12th and 13th of them.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|field| field.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

/// Builds the appends of one call: `n` updates over `docs` documents, each from its own client
/// with an increasing batch id.
struct Batches {
    next_batch: u64,
}

impl Batches {
    fn make(&mut self, n: usize, docs: usize) -> Vec<Append> {
        self.next_batch += 1;
        (0..n)
            .map(|i| Append {
                doc: format!("room-{}", i % docs),
                origin: Some(Origin {
                    client_id: 1_000 + (i / docs) as u64,
                    batch: self.next_batch,
                }),
                update: UPDATE.to_vec(),
                chat: None,
            })
            .collect()
    }
}

fn bench(c: &mut Criterion, rt: &Runtime, name: &str, n: usize, docs: usize) {
    // Honour criterion's name filter for the CPU measurement too.
    let filter = std::env::args().skip(1).find(|arg| !arg.starts_with('-'));
    if filter.is_some_and(|filter| !format!("store_append/{name}").contains(&filter)) {
        return;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = rt
        .block_on(SqliteStore::open(dir.path().join("bench.db")))
        .expect("open the store");
    let mut batches = Batches { next_batch: 0 };
    // CPU time per appended update over a fixed number of calls, outside criterion's timing.
    let calls = (2_000 / n).max(20);
    let (cpu0, wall0) = (cpu_time(), Instant::now());
    for _ in 0..calls {
        rt.block_on(store.append(&batches.make(n, docs))).expect("append");
    }
    let (cpu, wall) = (cpu_time() - cpu0, wall0.elapsed());
    let per = (calls * n) as u32;
    println!(
        "store_append/{name}: {calls} calls of {n} updates over {docs} documents: \
         CPU {:.1} µs per update, wall {:.1} µs per update",
        cpu.as_secs_f64() * 1e6 / f64::from(per),
        wall.as_secs_f64() * 1e6 / f64::from(per),
    );
    let mut group = c.benchmark_group("store_append");
    group.bench_function(name, |b| {
        b.iter_batched(
            || batches.make(n, docs),
            |batch| rt.block_on(store.append(&batch)).expect("append"),
            criterion::BatchSize::SmallInput,
        );
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    bench(&mut c, &rt, "one", 1, 1);
    bench(&mut c, &rt, "group_256x64", 256, 64);
    c.final_summary();
}
