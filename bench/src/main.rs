//! `driftsync-bench`: a load generator that measures driftsync and the sync servers Yjs users run
//! (the y-websocket reference server, Hocuspocus, y-sweet) on the same workloads.
//!
//! It is built to stay out of the way on a small machine: one single-threaded tokio runtime
//! (pin it to its own core with `taskset`), real yrs updates built by the writers only, and
//! readers that find a marker in the bytes they receive instead of applying updates. Every
//! subcommand prints its parameters with its results and can append them, as one JSON object
//! per line, to a results file; `report` turns that file into the tables of BENCHMARKS.md and
//! the fan-out chart. `bench/run-all.sh` starts every server and runs every workload.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use driftsync_bench::clients::{Endpoint, System};
use driftsync_bench::{b4, cross, load, relay, report, writers};

#[derive(Parser)]
#[command(
    name = "driftsync-bench",
    about = "Side-by-side benchmarks of driftsync and the Yjs sync servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The inbox of a user with many rooms (a server in this process, on a fresh SQLite
    /// store): a fresh device's first inbox and a returning device's after some rooms changed,
    /// bytes and time; one JSON line per room count; then what the chat index costs a message's
    /// append (one transaction each, with and without).
    Inbox {
        /// Room counts, one run each.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        rooms: Vec<usize>,
        /// Rooms that change before the returning device asks.
        #[arg(long, default_value_t = 10)]
        changed: usize,
    },
    /// One writer, N readers in one room: latency from send to the last reader, server CPU.
    Fanout {
        #[command(flatten)]
        target: Target,
        /// Reader counts, one run each.
        #[arg(long, value_delimiter = ',', default_value = "10,100,500")]
        readers: Vec<usize>,
        /// Updates per second from the writer.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Seconds measured per run (after a one-second warm-up).
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
    },
    /// Cross-instance fan-out: one writer on the first URL, readers round-robin over all of
    /// them (instances sharing rooms, e.g. through Redis), all in one room; latency from the
    /// send to each reader, for the readers on the writer's instance and on the others.
    Cross {
        /// The systems' protocol (driftsync's: native or ds-yjs).
        #[arg(long, value_enum, default_value = "native")]
        system: System,
        /// The instances, `ws://IP:PORT`, comma-separated; the writer connects to the first.
        #[arg(long, value_delimiter = ',', required = true)]
        urls: Vec<String>,
        /// The instances' process ids, for CPU time and RSS from /proc (summed).
        #[arg(long, value_delimiter = ',')]
        pids: Vec<u32>,
        /// Reader counts (over all instances), one run each.
        #[arg(long, value_delimiter = ',', default_value = "100,1500")]
        readers: Vec<usize>,
        /// Updates per second from the writer.
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        /// Seconds measured per run (after a warm-up).
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        /// Append results here, one JSON object per line.
        #[arg(long)]
        out: Option<PathBuf>,
        /// A tag making document names unique to this run.
        #[arg(long, default_value = "run")]
        tag: String,
        /// Spread connections over source addresses 127.0.0.1 ..= 127.0.0.N.
        #[arg(long, default_value_t = 1)]
        source_ips: u8,
    },
    /// Chat-like rooms of many writers: acknowledgement (native) and delivery latency,
    /// committed and delivered updates per second, server CPU and RSS.
    Writers {
        #[command(flatten)]
        target: Target,
        /// Rooms.
        #[arg(long, default_value_t = 1)]
        rooms: usize,
        /// Writers per room (each also receives the others' updates).
        #[arg(long, default_value_t = 50)]
        writers: usize,
        /// Readers per room.
        #[arg(long, default_value_t = 50)]
        readers: usize,
        /// Updates per second from each writer.
        #[arg(long, default_value_t = 2.0)]
        rate: f64,
        /// Seconds measured (after a warm-up in which every writer sends at least once).
        #[arg(long, default_value_t = 20.0)]
        secs: f64,
    },
    /// The bare relay (the floor): relays every message to the other connections of its room
    /// (URL path), stores nothing; speaks enough y-websocket for the fan-out clients.
    Relay {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:18787")]
        listen: SocketAddr,
    },
    /// Idle connections: server RSS per connection and per room.
    Idle {
        #[command(flatten)]
        target: Target,
        /// Open connections.
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        /// Connections per room.
        #[arg(long, default_value_t = 1)]
        per_room: usize,
        /// Seconds to wait with everything open before reading the RSS.
        #[arg(long, default_value_t = 5.0)]
        settle: f64,
    },
    /// Many rooms with a few clients each, ramped until p99 passes 50 ms.
    Throughput {
        #[command(flatten)]
        target: Target,
        /// Rooms.
        #[arg(long, default_value_t = 100)]
        rooms: usize,
        /// Clients per room: one writer, the rest read.
        #[arg(long, default_value_t = 3)]
        per_room: usize,
        /// Total update rates (per second) to go through.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "250,500,1000,1500,2000,3000,4000,6000,8000,12000,16000,20000,24000,32000"
        )]
        rates: Vec<f64>,
        /// Seconds per step.
        #[arg(long, default_value_t = 5.0)]
        step_secs: f64,
    },
    /// A client holding the B4 document misses K operations: bytes each way and time to sync.
    Resync {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        b4: B4Args,
        /// Operations missed (at most 10,000).
        #[arg(long, value_delimiter = ',', default_value = "0,10,100,1000,10000")]
        ks: Vec<usize>,
        /// Runs per K (times are the median).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// The document to write B4 into.
        #[arg(long, default_value = "b4")]
        doc: String,
    },
    /// The stored B4 document (written by `resync`) after a server restart: connect to content.
    Cold {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        b4: B4Args,
        /// The document `resync` wrote.
        #[arg(long, default_value = "b4")]
        doc: String,
    },
    /// Replays the B4 trace once and caches it for `resync` and `cold`.
    PrepareB4 {
        #[command(flatten)]
        b4: B4Args,
    },
    /// Turns a results file into markdown tables and the fan-out chart.
    Report {
        /// The results file (JSON lines).
        #[arg(long)]
        results: PathBuf,
        /// Where to write the markdown.
        #[arg(long)]
        md: PathBuf,
        /// Where to write the fan-out chart (PNG).
        #[arg(long)]
        chart: PathBuf,
        /// How the chart is linked from the markdown.
        #[arg(long, default_value = "bench/results/fanout.png")]
        chart_link: String,
    },
}

/// Which server, where, and where the results go.
#[derive(Args, Clone)]
struct Target {
    /// The system's protocol.
    #[arg(long, value_enum)]
    system: System,
    /// The server's address.
    #[arg(long)]
    addr: SocketAddr,
    /// The server's process id, for CPU time and RSS from /proc.
    #[arg(long)]
    pid: Option<u32>,
    /// Append results here, one JSON object per line.
    #[arg(long)]
    out: Option<PathBuf>,
    /// A tag making document names unique to this run.
    #[arg(long, default_value = "run")]
    tag: String,
    /// Spread connections over source addresses 127.0.0.1 ..= 127.0.0.N.
    #[arg(long, default_value_t = 1)]
    source_ips: u8,
}

#[derive(Args, Clone)]
struct B4Args {
    /// The automerge-paper trace.
    #[arg(long, env = "DRIFTSYNC_TRACE")]
    trace: Option<PathBuf>,
    /// The replay cache.
    #[arg(long)]
    cache: Option<PathBuf>,
}

impl B4Args {
    fn load(&self) -> anyhow::Result<b4::B4> {
        let trace = self
            .trace
            .clone()
            .unwrap_or_else(driftsync_engine::trace::default_trace_path);
        let cache = self.cache.clone().unwrap_or_else(b4::default_cache);
        b4::B4::load_or_build(&trace, &cache)
    }
}

impl Target {
    fn endpoint(&self) -> Endpoint {
        Endpoint {
            system: self.system,
            addr: self.addr,
            source_ips: self.source_ips.max(1),
        }
    }

    /// Prints a result and appends it to the results file.
    fn emit(&self, workload: &str, params: serde_json::Value, result: impl serde::Serialize) -> anyhow::Result<()> {
        emit(self.out.as_deref(), self.system, workload, params, result)
    }
}

/// Prints a result and appends it to the results file `out`, if any.
fn emit(
    out: Option<&Path>,
    system: System,
    workload: &str,
    params: serde_json::Value,
    result: impl serde::Serialize,
) -> anyhow::Result<()> {
    let line = json!({
        "workload": workload,
        "system": system,
        "params": params,
        "result": result,
    });
    println!("{}", serde_json::to_string_pretty(&line)?);
    if let Some(out) = out {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out)
            .with_context(|| format!("opening {}", out.display()))?;
        writeln!(f, "{}", serde_json::to_string(&line)?)?;
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    let result = runtime
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(cli.command)));
    if let Err(e) = result {
        eprintln!("driftsync-bench: {e:#}");
        std::process::exit(1);
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Inbox { rooms, changed } => {
            for n in rooms {
                let line = driftsync_bench::inbox::run(n, changed).await?;
                println!("{line}");
            }
            println!("{}", driftsync_bench::inbox::append_cost(2_000).await?);
        }
        Command::Fanout {
            target,
            readers,
            rate,
            secs,
        } => {
            let ep = target.endpoint();
            for n in readers {
                eprintln!("fanout {} N={n} rate={rate}/s for {secs} s", ep.system.name());
                let r = load::fanout(&ep, target.pid, n, rate, secs, &target.tag).await?;
                eprintln!(
                    "  p50 {:.0} us  p99 {:.0} us  max {:.0} us  cpu/msg {:.2} us  delivered {}/{}",
                    r.latency.p50_us,
                    r.latency.p99_us,
                    r.latency.max_us,
                    r.cpu_per_delivery_us,
                    r.deliveries,
                    u64::from(r.updates) * n as u64
                );
                target.emit("fanout", json!({"readers": n, "rate": rate, "secs": secs}), &r)?;
            }
        }
        Command::Cross {
            system,
            urls,
            pids,
            readers,
            rate,
            secs,
            out,
            tag,
            source_ips,
        } => {
            let endpoints = urls
                .iter()
                .map(|u| {
                    Ok(Endpoint {
                        system,
                        addr: cross::parse_addr(u)?,
                        source_ips: source_ips.max(1),
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            for n in readers {
                eprintln!(
                    "cross {} N={n} over {} instance(s), rate={rate}/s for {secs} s",
                    system.name(),
                    endpoints.len()
                );
                let r = cross::cross(&endpoints, &pids, n, rate, secs, &tag).await?;
                eprintln!(
                    "  p50 {:.0} us  p99 {:.0} us  max {:.0} us; writer's instance p50 {:.0} us p99 {:.0} us, others p50 {:.0} us p99 {:.0} us; cpu/msg {:.2} us  delivered {}/{}  lag {:.0} us",
                    r.latency.p50_us,
                    r.latency.p99_us,
                    r.latency.max_us,
                    r.same_instance.p50_us,
                    r.same_instance.p99_us,
                    r.other_instances.p50_us,
                    r.other_instances.p99_us,
                    r.cpu_per_delivery_us,
                    r.deliveries,
                    r.expected_deliveries,
                    r.generator_lag_us
                );
                emit(
                    out.as_deref(),
                    system,
                    "cross",
                    json!({"readers": n, "instances": endpoints.len(), "rate": rate, "secs": secs, "urls": urls}),
                    &r,
                )?;
            }
        }
        Command::Writers {
            target,
            rooms,
            writers,
            readers,
            rate,
            secs,
        } => {
            let ep = target.endpoint();
            eprintln!(
                "writers {} rooms={rooms} writers={writers} readers={readers} rate={rate}/s per writer for {secs} s",
                ep.system.name()
            );
            let shape = writers::Shape {
                rooms,
                writers,
                readers,
                rate,
                secs,
            };
            let r = writers::writers(&ep, target.pid, shape, &target.tag).await?;
            let ack = if r.acknowledges {
                format!(
                    "ack p50 {:.0} us p99 {:.0} us, {:.0} committed/s",
                    r.ack_latency.p50_us, r.ack_latency.p99_us, r.committed_per_s
                )
            } else {
                "no acknowledgements".to_string()
            };
            eprintln!(
                "  {ack}; delivery p50 {:.0} us p99 {:.0} us, {:.0} delivered/s ({}/{}), cpu {:.2} of a core, {:.2} us/msg, rss {:.1} MB, refused {}, lag {:.0} us",
                r.delivery_latency.p50_us,
                r.delivery_latency.p99_us,
                r.delivered_per_s,
                r.deliveries,
                r.expected_deliveries,
                r.server_cpu,
                r.cpu_per_delivery_us,
                r.server_rss as f64 / 1e6,
                r.refused,
                r.generator_lag_us
            );
            target.emit(
                "writers",
                json!({"rooms": rooms, "writers": writers, "readers": readers, "rate": rate, "secs": secs}),
                &r,
            )?;
        }
        Command::Relay { listen } => relay::serve(listen).await?,
        Command::Idle {
            target,
            conns,
            per_room,
            settle,
        } => {
            let ep = target.endpoint();
            eprintln!("idle {} conns={conns} per_room={per_room}", ep.system.name());
            let r = load::idle(&ep, target.pid, conns, per_room, settle, &target.tag).await?;
            let delta = r.rss_after.saturating_sub(r.rss_before) as f64;
            eprintln!(
                "  RSS +{:.1} MB: {:.0} B per connection, {:.0} B per room (document {} B)",
                delta / 1e6,
                delta / r.connections as f64,
                delta / r.rooms as f64,
                r.doc_bytes
            );
            target.emit(
                "idle",
                json!({"conns": conns, "per_room": per_room, "settle": settle}),
                &r,
            )?;
        }
        Command::Throughput {
            target,
            rooms,
            per_room,
            rates,
            step_secs,
        } => {
            let ep = target.endpoint();
            eprintln!("throughput {} rooms={rooms} per_room={per_room}", ep.system.name());
            let r = load::throughput(&ep, target.pid, rooms, per_room, &rates, step_secs, &target.tag).await?;
            eprintln!("  knee: {} updates/s", r.knee_rate);
            target.emit(
                "throughput",
                json!({"rooms": rooms, "per_room": per_room, "step_secs": step_secs}),
                &r,
            )?;
        }
        Command::Resync {
            target,
            b4,
            ks,
            runs,
            doc,
        } => {
            let b4 = b4.load()?;
            let ep = target.endpoint();
            let doc = format!("{doc}-{}", target.tag);
            eprintln!("resync {} doc={doc}", ep.system.name());
            let r = b4::resync(&ep, &b4, &doc, &ks, runs).await?;
            for row in &r.rows {
                eprintln!(
                    "  K={:>6}: up {:>7} B  down {:>7} B  synced {:>9.0} us  (floor {} B)",
                    row.missing.map_or("full".to_string(), |k| k.to_string()),
                    row.stats.bytes_up,
                    row.stats.bytes_down,
                    row.stats.synced_us,
                    row.floor
                );
            }
            target.emit("resync", json!({"doc": doc, "ks": ks, "runs": runs}), &r)?;
        }
        Command::Cold { target, b4, doc } => {
            let b4 = b4.load()?;
            let ep = target.endpoint();
            let doc = format!("{doc}-{}", target.tag);
            let size = b4.encoded_size()?;
            let r = b4::cold(&ep, &doc, size).await?;
            eprintln!(
                "cold {}: first content {:.1} ms, complete {:.1} ms (warm: {:.1} / {:.1} ms)",
                ep.system.name(),
                r.cold.first_content_us / 1e3,
                r.cold.synced_us / 1e3,
                r.warm.first_content_us / 1e3,
                r.warm.synced_us / 1e3
            );
            target.emit("cold", json!({"doc": doc, "doc_bytes": size}), &r)?;
        }
        Command::PrepareB4 { b4 } => {
            let b4 = b4.load()?;
            eprintln!(
                "B4: {} operations, base {} B, tail {} updates ({} B), document {} B",
                b4.ops,
                b4.base.len(),
                b4.tail.len(),
                b4.floor(b4::TAIL),
                b4.encoded_size()?
            );
        }
        Command::Report {
            results,
            md,
            chart,
            chart_link,
        } => report::report(&results, &md, &chart, &chart_link)?,
    }
    Ok(())
}
