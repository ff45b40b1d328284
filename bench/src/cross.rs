//! Cross-instance fan-out: one writer on the first server instance, readers spread round-robin
//! over every instance (instances of one deployment sharing rooms through their fan-out, e.g.
//! `driftsync serve --database-url postgres://… --redis-url redis://…`).
//!
//! Unlike [`crate::load::fanout`], which times each update until its *last* reader has it, this
//! workload keeps every delivery: the latency from the writer's send to each reader's receipt,
//! over all readers, and separately for the readers on the writer's instance and for those on
//! the others (whose updates took the hop between instances). With one instance every reader
//! is on the writer's: the same workload, for the comparison.
//!
//! driftsync sends an update to the other subscribers of the writer's instance before its commit,
//! and publishes it to the other instances once stored: the hop includes the durable commit.
//! With the native protocol the writer's `Ack` (sent after the commit) is timed too, to tell the
//! commit from the rest of the hop.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use driftsync_protocol::ServerFrame;
use futures_util::stream::SplitStream;
use futures_util::{stream, SinkExt, StreamExt};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::clients::{find_markers, native_pong, Client, Endpoint, Holding, System, Ws};
use crate::load::{drive, Pusher, Tracker, CONNECT_CONCURRENCY};
use crate::procfs;
use crate::stats::{summarize, Summary};

/// Parses a server URL (`ws://127.0.0.1:18787`, `ws://127.0.0.1:18787/`, or `127.0.0.1:18787`)
/// into its address.
pub fn parse_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url.strip_prefix("ws://").unwrap_or(url);
    if rest.starts_with("wss://") || url.starts_with("wss://") {
        bail!("{url}: wss:// is not supported by the generator");
    }
    let host = rest.split('/').next().unwrap_or(rest);
    host.parse()
        .with_context(|| format!("{url}: expected ws://IP:PORT (the generator connects to addresses, not names)"))
}

/// The result of one cross-instance fan-out run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CrossResult {
    /// Readers, over all instances.
    pub readers: usize,
    /// Server instances (the writer on the first).
    pub instances: usize,
    /// Readers on the writer's instance.
    pub same_readers: usize,
    /// Updates per second sent by the writer.
    pub rate: f64,
    /// Measured updates.
    pub updates: u32,
    /// Deliveries counted (each reader receiving each measured update once).
    pub deliveries: u64,
    /// Deliveries expected: updates × readers.
    pub expected_deliveries: u64,
    /// Send to each reader's receipt, every delivery.
    pub latency: Summary,
    /// The same, readers on the writer's instance only.
    pub same_instance: Summary,
    /// The same, readers on the other instances only (empty with one instance).
    pub other_instances: Summary,
    /// Send to the last reader, per update (what the `fanout` workload reports).
    pub last_reader: Summary,
    /// Send to the writer's `Ack`, which follows the commit (native only; empty otherwise).
    #[serde(default)]
    pub ack: Summary,
    /// CPU time (utime + stime) of all the instances during the measured phase, in seconds.
    pub server_cpu_s: f64,
    /// That CPU time per delivered message, in microseconds.
    pub cpu_per_delivery_us: f64,
    /// RSS of all the instances at the end, summed, in bytes.
    pub server_rss: u64,
    /// The generator's largest lag behind its sending schedule, in microseconds.
    pub generator_lag_us: f64,
}

/// When each reader received each sequence number: the latency (send to receipt) + 1, in
/// nanoseconds; 0 for not (yet) received.
struct Receipts {
    capacity: usize,
    at: Vec<AtomicU64>,
}

impl Receipts {
    fn new(readers: usize, capacity: usize) -> Arc<Self> {
        Arc::new(Receipts {
            capacity,
            at: (0..readers * capacity).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// Records `reader`'s receipt of `seq`, `latency_ns` after its send; `false` if it had it
    /// already (a repair or resync may bring an update twice) or `seq` is out of range.
    fn record(&self, reader: usize, seq: u32, latency_ns: u64) -> bool {
        let seq = seq as usize;
        if seq >= self.capacity {
            return false;
        }
        self.at.get(reader * self.capacity + seq).is_some_and(|slot| {
            slot.compare_exchange(0, latency_ns.saturating_add(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        })
    }

    /// The latencies (ns) of `reader`'s receipts of the sequence numbers in `range`.
    fn latencies(&self, reader: usize, range: std::ops::Range<u32>) -> impl Iterator<Item = u64> + '_ {
        range.filter_map(move |seq| {
            let v = self.at[reader * self.capacity + seq as usize].load(Ordering::Relaxed);
            (v != 0).then(|| v - 1)
        })
    }
}

/// Reads reader `index`'s messages until the connection ends: stamps every marker (a catch-up
/// may carry several) and answers native pings.
fn spawn_reader(mut client: Client, index: usize, tracker: Arc<Tracker>, receipts: Arc<Receipts>) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(Ok(msg)) = client.ws.next().await {
            let Message::Binary(bytes) = msg else { continue };
            let mut any = false;
            for seq in find_markers(&bytes) {
                any = true;
                if let Some(latency) = tracker.since_sent(seq) {
                    if receipts.record(index, seq, latency) {
                        tracker.received(seq);
                    }
                }
            }
            if !any && client.system == System::Native {
                if let Some(pong) = native_pong(&bytes) {
                    if client.ws.send(Message::Binary(pong.into())).await.is_err() {
                        break;
                    }
                }
            }
        }
    })
}

/// Reads what the writer receives, stamping its acknowledgements (native: batch `k` is the
/// writer's `k`-th push, sequence number `k - 1`).
fn spawn_writer_reader(mut stream: SplitStream<Ws>, tracker: Arc<Tracker>) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            let Message::Binary(bytes) = msg else { continue };
            // Variant index 3 of ServerFrame is Ack.
            if bytes.first() != Some(&3) {
                continue;
            }
            if let Ok(ServerFrame::Ack { batch, .. }) = ServerFrame::decode(&bytes, 1 << 20) {
                if let Some(seq) = crate::writers::seq_of_batch(batch, 0, 1) {
                    tracker.acked(seq);
                }
            }
        }
    })
}

/// The instance reader `i` of `instances` connects to: round-robin, reader 0 on the writer's.
pub fn instance_of(reader: usize, instances: usize) -> usize {
    reader % instances.max(1)
}

/// One writer on `endpoints[0]` and `readers` readers spread round-robin over `endpoints`, in
/// one room; `rate` updates per second for `secs` seconds. `pids`: the instances' processes, for
/// CPU time and RSS.
pub async fn cross(
    endpoints: &[Endpoint],
    pids: &[u32],
    readers: usize,
    rate: f64,
    secs: f64,
    tag: &str,
) -> anyhow::Result<CrossResult> {
    let Some(first) = endpoints.first() else {
        bail!("no server URL")
    };
    let k = endpoints.len();
    let doc = format!("cross-{tag}-{readers}-{k}");
    let warmup = (rate as u32).clamp(10, 100);
    let updates = (rate * secs).round() as u32;
    let capacity = (warmup + updates) as usize;
    let tracker = Tracker::new(capacity, readers as u32);
    let receipts = Receipts::new(readers, capacity);
    let joins = stream::iter((0..readers).map(|i| {
        let ep = &endpoints[instance_of(i, k)];
        let doc = &doc;
        async move {
            ep.join(doc, i, &Holding::default())
                .await
                .with_context(|| format!("reader {i} to {}", ep.addr))
                .map(|(c, _)| (i, c))
        }
    }))
    .buffer_unordered(CONNECT_CONCURRENCY)
    .collect::<Vec<_>>()
    .await;
    let mut tasks = Vec::with_capacity(readers);
    for joined in joins {
        let (i, client) = joined?;
        tasks.push(spawn_reader(client, i, Arc::clone(&tracker), Arc::clone(&receipts)));
    }
    let (client, _) = first.join(&doc, readers, &Holding::default()).await?;
    let (writer, stream) = client.into_parts();
    let drain = spawn_writer_reader(stream, Arc::clone(&tracker));
    let mut pushers = vec![Pusher::new(writer)?];
    // The other instances subscribe to the room's channel when their first reader joins; the
    // warm-up (and its settling) covers what is left of that.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drive(&mut pushers, &tracker, 0, warmup, rate).await?;
    tracker.settle(warmup as usize, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sample = || {
        pids.iter().fold((0.0, 0), |(cpu, rss), &pid| {
            let (c, r) = procfs::sample(Some(pid));
            (cpu + c, rss + r)
        })
    };
    let (cpu0, _) = sample();
    let lag = drive(&mut pushers, &tracker, warmup, updates, rate).await?;
    tracker.settle(capacity, Duration::from_secs(10)).await;
    let (cpu1, rss) = sample();
    let measured = warmup..warmup + updates;
    let (last, _) = tracker.latencies(measured.clone());
    let acks = tracker.ack_latencies(measured.clone());
    let (mut same, mut other) = (Vec::new(), Vec::new());
    for reader in 0..readers {
        let into = if instance_of(reader, k) == 0 {
            &mut same
        } else {
            &mut other
        };
        into.extend(receipts.latencies(reader, measured.clone()));
    }
    for mut p in pushers {
        p.close().await;
    }
    drain.abort();
    for t in tasks {
        t.abort();
    }
    let deliveries = (same.len() + other.len()) as u64;
    let all: Vec<u64> = same.iter().chain(&other).copied().collect();
    let cpu = cpu1 - cpu0;
    Ok(CrossResult {
        readers,
        instances: k,
        same_readers: (0..readers).filter(|&r| instance_of(r, k) == 0).count(),
        rate,
        updates,
        deliveries,
        expected_deliveries: u64::from(updates) * readers as u64,
        latency: summarize(all),
        same_instance: summarize(same),
        other_instances: summarize(other),
        last_reader: summarize(last),
        ack: summarize(acks),
        server_cpu_s: cpu,
        cpu_per_delivery_us: if deliveries > 0 {
            cpu / deliveries as f64 * 1e6
        } else {
            0.0
        },
        server_rss: rss,
        generator_lag_us: lag,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_to_addresses() {
        let a: SocketAddr = "127.0.0.1:18787".parse().unwrap();
        assert_eq!(parse_addr("ws://127.0.0.1:18787").unwrap(), a);
        assert_eq!(parse_addr("ws://127.0.0.1:18787/").unwrap(), a);
        assert_eq!(parse_addr("127.0.0.1:18787").unwrap(), a);
        assert!(parse_addr("wss://127.0.0.1:18787").is_err());
        assert!(parse_addr("ws://localhost:18787").is_err());
    }

    #[test]
    fn readers_go_round_robin_from_the_writers_instance() {
        let on: Vec<usize> = (0..7).map(|r| instance_of(r, 3)).collect();
        assert_eq!(on, vec![0, 1, 2, 0, 1, 2, 0]);
        assert!((0..5).all(|r| instance_of(r, 1) == 0));
    }

    #[test]
    fn receipts_count_once_and_keep_their_latency() {
        let r = Receipts::new(2, 4);
        assert!(r.record(1, 2, 500));
        assert!(!r.record(1, 2, 900), "a second receipt of the same update is ignored");
        assert!(r.record(0, 0, 0), "a zero latency is still a receipt");
        assert!(!r.record(0, 4, 1), "out of range");
        assert_eq!(r.latencies(1, 0..4).collect::<Vec<_>>(), vec![500]);
        assert_eq!(r.latencies(0, 0..4).collect::<Vec<_>>(), vec![0]);
        assert_eq!(r.latencies(0, 1..4).count(), 0);
    }
}
