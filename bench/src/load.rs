//! The live-update workloads: fan-out (one writer, N readers in one room) and throughput (many
//! rooms with a few clients each, ramped), and idle connections.
//!
//! Writers build real yrs updates, one small insert each, whose text carries a sequence number
//! (see [`crate::clients::marker_text`]); readers never apply anything, they only find the
//! marker in the bytes they receive and stamp the time.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::stream::{self, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use yrs::Doc;

use crate::clients::{find_marker, marker_text, native_pong, Client, Endpoint, Holding, System, Writer, Ws};
use crate::procfs;
use crate::stats::{summarize, Summary};

/// How many connections are opened at once.
pub(crate) const CONNECT_CONCURRENCY: usize = 64;

/// Send and receive times per sequence number.
pub struct Tracker {
    base: Instant,
    sent: Vec<AtomicU64>,
    last: Vec<AtomicU64>,
    count: Vec<AtomicU32>,
    /// Readers each update must reach.
    expected: u32,
    /// Sequence numbers that reached all their readers.
    complete: AtomicUsize,
    /// Deliveries of any sequence number.
    delivered: AtomicU64,
    /// When the server acknowledged each sequence number (0: not yet; native only).
    acked: Vec<AtomicU64>,
}

impl Tracker {
    /// A tracker for `capacity` sequence numbers, each to be delivered `expected` times.
    pub fn new(capacity: usize, expected: u32) -> Arc<Self> {
        Arc::new(Tracker {
            base: Instant::now(),
            sent: (0..capacity).map(|_| AtomicU64::new(0)).collect(),
            last: (0..capacity).map(|_| AtomicU64::new(0)).collect(),
            count: (0..capacity).map(|_| AtomicU32::new(0)).collect(),
            expected,
            complete: AtomicUsize::new(0),
            delivered: AtomicU64::new(0),
            acked: (0..capacity).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn stamp_sent(&self, seq: u32) {
        if let Some(s) = self.sent.get(seq as usize) {
            s.store(self.now().max(1), Ordering::Relaxed);
        }
    }

    /// Nanoseconds since `seq` was sent (`None` if it was not).
    pub(crate) fn since_sent(&self, seq: u32) -> Option<u64> {
        let sent = self.sent.get(seq as usize)?.load(Ordering::Relaxed);
        (sent != 0).then(|| self.now().saturating_sub(sent))
    }

    /// Records the server's acknowledgement of `seq` (the first one counts).
    pub(crate) fn acked(&self, seq: u32) {
        if let Some(a) = self.acked.get(seq as usize) {
            let _ = a.compare_exchange(0, self.now().max(1), Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// How many sequence numbers in `range` were acknowledged.
    pub(crate) fn acked_count(&self, range: std::ops::Range<u32>) -> usize {
        range
            .filter(|&seq| {
                self.acked
                    .get(seq as usize)
                    .is_some_and(|a| a.load(Ordering::Relaxed) != 0)
            })
            .count()
    }

    /// Acknowledgement latencies (send to acknowledgement) of the acknowledged sequence numbers
    /// in `range`.
    pub(crate) fn ack_latencies(&self, range: std::ops::Range<u32>) -> Vec<u64> {
        range
            .filter_map(|seq| {
                let acked = self.acked.get(seq as usize)?.load(Ordering::Relaxed);
                let sent = self.sent[seq as usize].load(Ordering::Relaxed);
                (acked != 0 && sent != 0).then(|| acked.saturating_sub(sent))
            })
            .collect()
    }

    /// Records one delivery of `seq`.
    pub(crate) fn received(&self, seq: u32) {
        let i = seq as usize;
        let (Some(last), Some(count)) = (self.last.get(i), self.count.get(i)) else {
            return;
        };
        last.store(self.now(), Ordering::Relaxed);
        self.delivered.fetch_add(1, Ordering::Relaxed);
        if count.fetch_add(1, Ordering::Relaxed) + 1 == self.expected {
            self.complete.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Latencies (send to last reader) of the complete sequence numbers in `range`, and how many
    /// of them were delivered in all.
    pub(crate) fn latencies(&self, range: std::ops::Range<u32>) -> (Vec<u64>, u64) {
        let mut lat = Vec::with_capacity(range.len());
        let mut deliveries = 0;
        for seq in range {
            let i = seq as usize;
            let count = self.count[i].load(Ordering::Relaxed);
            deliveries += u64::from(count);
            if count >= self.expected {
                let sent = self.sent[i].load(Ordering::Relaxed);
                lat.push(self.last[i].load(Ordering::Relaxed).saturating_sub(sent));
            }
        }
        (lat, deliveries)
    }

    /// Waits until every sequence number below `end` is complete, or `timeout` passes.
    pub(crate) async fn settle(&self, end: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.complete.load(Ordering::Relaxed) < end && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// A writer: its connection's sending half and its own document.
pub(crate) struct Pusher {
    writer: Writer,
    doc: Doc,
    inserts: u32,
}

impl Pusher {
    /// A writer sending on `writer`, with a document of its own random client id (distinct
    /// writers have distinct ids, as the server's authorship checks expect).
    pub(crate) fn new(writer: Writer) -> anyhow::Result<Self> {
        Ok(Pusher {
            writer,
            doc: driftsync_engine::doc::new_doc(driftsync_engine::doc::new_client_id())?,
            inserts: 0,
        })
    }

    /// Closes the writer's connection.
    pub(crate) async fn close(&mut self) {
        self.writer.close().await;
    }

    /// Builds the next update (an insert at the end of the writer's own text) carrying `seq`.
    pub(crate) fn next_update(&mut self, seq: u32) -> anyhow::Result<Vec<u8>> {
        let text = marker_text(seq);
        let at = self.inserts * text.len() as u32;
        self.inserts += 1;
        Ok(driftsync_engine::doc::text_insert(&self.doc, at, &text)?)
    }
}

/// Sends `count` updates, sequence numbers from `first`, at `rate` per second in all, round-robin
/// over the writers: sequence number `seq` is always sent by writer `seq % writers`, so a
/// writer's k-th update (batch k, counting from 1) is `(k - 1) * writers + its index`. Returns the largest lag of a send behind its schedule, in microseconds
/// (a lag of milliseconds means the generator could not keep up).
pub(crate) async fn drive(
    pushers: &mut [Pusher],
    tracker: &Tracker,
    first: u32,
    count: u32,
    rate: f64,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut sent = 0u32;
    let mut max_lag = 0f64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while sent < count {
        tick.tick().await;
        let elapsed = start.elapsed().as_secs_f64();
        let due = ((elapsed * rate).floor() as u64 + 1).min(u64::from(count)) as u32;
        while sent < due {
            let scheduled = f64::from(sent) / rate;
            max_lag = max_lag.max((start.elapsed().as_secs_f64() - scheduled) * 1e6);
            let seq = first + sent;
            let n = pushers.len();
            let p = &mut pushers[seq as usize % n];
            let update = p.next_update(seq)?;
            tracker.stamp_sent(seq);
            p.writer.push(&update).await?;
            sent += 1;
        }
    }
    Ok(max_lag)
}

/// Reads a reader's messages forever, stamping markers and answering native pings.
fn spawn_reader(mut client: Client, tracker: Arc<Tracker>) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(Ok(msg)) = client.ws.next().await {
            if let Message::Binary(bytes) = msg {
                if let Some(seq) = find_marker(&bytes) {
                    tracker.received(seq);
                } else if client.system == System::Native {
                    if let Some(pong) = native_pong(&bytes) {
                        if client.ws.send(Message::Binary(pong.into())).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
    })
}

/// Drains what a writer receives (acknowledgements, echoes).
pub(crate) fn spawn_drain(mut stream: SplitStream<Ws>) -> JoinHandle<()> {
    tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} })
}

/// Opens `count` connections to the given documents (`doc_of(i)`), `CONNECT_CONCURRENCY` at a
/// time, each joined as an empty client.
pub(crate) async fn join_many(
    ep: &Endpoint,
    count: usize,
    doc_of: impl Fn(usize) -> String,
) -> anyhow::Result<Vec<Client>> {
    let joins = stream::iter((0..count).map(|i| {
        let doc = doc_of(i);
        async move {
            let holding = Holding::default();
            ep.join(&doc, i, &holding)
                .await
                .with_context(|| format!("connection {i} to {doc}"))
                .map(|(c, _)| c)
        }
    }))
    .buffer_unordered(CONNECT_CONCURRENCY)
    .collect::<Vec<_>>()
    .await;
    joins.into_iter().collect()
}

/// A writer joined to `doc`, with a document of a random client id.
async fn pusher(ep: &Endpoint, doc: &str, n: usize) -> anyhow::Result<(Pusher, JoinHandle<()>)> {
    let (client, _) = ep.join(doc, n, &Holding::default()).await?;
    let (writer, stream) = client.into_parts();
    Ok((Pusher::new(writer)?, spawn_drain(stream)))
}

/// The result of one fan-out run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FanoutResult {
    /// Readers.
    pub readers: usize,
    /// Updates per second sent by the writer.
    pub rate: f64,
    /// Measured updates.
    pub updates: u32,
    /// Deliveries counted (each reader receiving each update once).
    pub deliveries: u64,
    /// Send to the last reader.
    pub latency: Summary,
    /// Server CPU time (utime + stime) during the measured phase, in seconds.
    pub server_cpu_s: f64,
    /// Server CPU time per delivered message, in microseconds.
    pub cpu_per_delivery_us: f64,
    /// Server RSS at the end, in bytes.
    pub server_rss: u64,
    /// The generator's largest lag behind its sending schedule, in microseconds.
    pub generator_lag_us: f64,
}

/// One writer and `readers` readers in one room; `rate` updates per second for `secs` seconds.
pub async fn fanout(
    ep: &Endpoint,
    pid: Option<u32>,
    readers: usize,
    rate: f64,
    secs: f64,
    tag: &str,
) -> anyhow::Result<FanoutResult> {
    let doc = format!("fanout-{tag}-{readers}");
    let warmup = (rate as u32).clamp(10, 100);
    let updates = (rate * secs).round() as u32;
    let tracker = Tracker::new((warmup + updates) as usize, readers as u32);
    let clients = join_many(ep, readers, |_| doc.clone()).await?;
    let tasks: Vec<JoinHandle<()>> = clients
        .into_iter()
        .map(|c| spawn_reader(c, Arc::clone(&tracker)))
        .collect();
    let (p, drain) = pusher(ep, &doc, readers).await?;
    let mut pushers = vec![p];
    tokio::time::sleep(Duration::from_millis(300)).await;
    drive(&mut pushers, &tracker, 0, warmup, rate).await?;
    tracker.settle(warmup as usize, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (cpu0, _) = procfs::sample(pid);
    let lag = drive(&mut pushers, &tracker, warmup, updates, rate).await?;
    tracker
        .settle((warmup + updates) as usize, Duration::from_secs(10))
        .await;
    let (cpu1, rss) = procfs::sample(pid);
    let (lat, deliveries) = tracker.latencies(warmup..warmup + updates);
    for mut p in pushers {
        p.writer.close().await;
    }
    drain.abort();
    for t in tasks {
        t.abort();
    }
    let cpu = cpu1 - cpu0;
    Ok(FanoutResult {
        readers,
        rate,
        updates,
        deliveries,
        latency: summarize(lat),
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

/// One step of a throughput ramp.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RampStep {
    /// Updates per second sent, over all rooms.
    pub rate: f64,
    /// Send to the last reader of the room.
    pub latency: Summary,
    /// Share of the expected deliveries that arrived.
    pub delivered: f64,
    /// Server CPU share of one core during the step.
    pub server_cpu: f64,
    /// The generator's largest lag behind its schedule, in microseconds.
    pub generator_lag_us: f64,
}

/// The result of a throughput ramp.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ThroughputResult {
    /// Rooms.
    pub rooms: usize,
    /// Clients per room (one writer, the others read).
    pub clients_per_room: usize,
    /// Seconds per step.
    pub step_secs: f64,
    /// Every step run, the last one the first to fail (if any did).
    pub steps: Vec<RampStep>,
    /// The highest rate whose p99 stayed at or below 50 ms with at least 99 % delivered.
    pub knee_rate: f64,
    /// Server RSS at the end, in bytes.
    pub server_rss: u64,
}

/// The p99 the ramp stops at, in microseconds.
const KNEE_P99_US: f64 = 50_000.0;

/// `rooms` rooms with `per_room` clients each (one writer); the total update rate goes through
/// `rates` until a step's p99 passes 50 ms or deliveries fall short.
pub async fn throughput(
    ep: &Endpoint,
    pid: Option<u32>,
    rooms: usize,
    per_room: usize,
    rates: &[f64],
    step_secs: f64,
    tag: &str,
) -> anyhow::Result<ThroughputResult> {
    let readers = per_room.saturating_sub(1).max(1);
    let capacity: usize = rates.iter().map(|r| (r * step_secs).ceil() as usize).sum();
    let tracker = Tracker::new(capacity + 1, readers as u32);
    let doc_of = |i: usize| format!("tp-{tag}-{}", i % rooms);
    let clients = join_many(ep, rooms * readers, doc_of).await?;
    let tasks: Vec<JoinHandle<()>> = clients
        .into_iter()
        .map(|c| spawn_reader(c, Arc::clone(&tracker)))
        .collect();
    let mut pushers = Vec::with_capacity(rooms);
    let mut drains = Vec::with_capacity(rooms);
    for r in 0..rooms {
        let (p, d) = pusher(ep, &doc_of(r), rooms * readers + r).await?;
        pushers.push(p);
        drains.push(d);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut steps = Vec::new();
    let mut knee = 0.0;
    let mut next = 0u32;
    for &rate in rates {
        let count = (rate * step_secs).round() as u32;
        let (cpu0, _) = procfs::sample(pid);
        let t0 = Instant::now();
        let lag = drive(&mut pushers, &tracker, next, count, rate).await?;
        tracker.settle((next + count) as usize, Duration::from_secs(3)).await;
        let (cpu1, _) = procfs::sample(pid);
        let wall = t0.elapsed().as_secs_f64();
        let (lat, deliveries) = tracker.latencies(next..next + count);
        next += count;
        let latency = summarize(lat);
        let delivered = deliveries as f64 / (f64::from(count) * readers as f64);
        let step = RampStep {
            rate,
            latency,
            delivered,
            server_cpu: (cpu1 - cpu0) / wall,
            generator_lag_us: lag,
        };
        eprintln!(
            "  {} rate {rate:>7.0}/s: p50 {:>8.0} us  p99 {:>8.0} us  delivered {:.3}  server cpu {:.2}  lag {:.0} us",
            ep.system.name(),
            latency.p50_us,
            latency.p99_us,
            delivered,
            step.server_cpu,
            lag
        );
        let ok = latency.p99_us <= KNEE_P99_US && delivered >= 0.99;
        steps.push(step);
        if !ok {
            break;
        }
        knee = rate;
    }
    let (_, rss) = procfs::sample(pid);
    for mut p in pushers {
        p.writer.close().await;
    }
    for t in tasks.into_iter().chain(drains) {
        t.abort();
    }
    Ok(ThroughputResult {
        rooms,
        clients_per_room: per_room,
        step_secs,
        steps,
        knee_rate: knee,
        server_rss: rss,
    })
}

/// The result of an idle run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct IdleResult {
    /// Open connections.
    pub connections: usize,
    /// Connections per room.
    pub per_room: usize,
    /// Rooms.
    pub rooms: usize,
    /// The encoded size of each room's document (v1 update), in bytes.
    pub doc_bytes: usize,
    /// Server RSS before the first connection, in bytes.
    pub rss_before: u64,
    /// Server RSS with every connection open and idle, in bytes.
    pub rss_after: u64,
}

/// A small document with a realistic structure: 100 words typed at scattered places by one
/// client, as one update (about 1 kB).
pub fn idle_document() -> anyhow::Result<Vec<u8>> {
    let doc = driftsync_engine::doc::new_doc(7_777_777)?;
    let words = [
        "lorem ", "ipsum ", "dolor ", "sit ", "amet ", "sync ", "offline ", "first ",
    ];
    let mut len = 0u32;
    let mut x = 12_345u32;
    for i in 0..100 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let at = if len == 0 { 0 } else { (x >> 8) % (len + 1) };
        let w = words[i % words.len()];
        driftsync_engine::doc::text_insert(&doc, at, w)?;
        len += w.len() as u32;
    }
    Ok(driftsync_engine::doc::encode_state(&doc))
}

/// Opens `conns` connections, `per_room` per room, writes the idle document into every room,
/// waits `settle_secs` and reads the server's RSS.
pub async fn idle(
    ep: &Endpoint,
    pid: Option<u32>,
    conns: usize,
    per_room: usize,
    settle_secs: f64,
    tag: &str,
) -> anyhow::Result<IdleResult> {
    let per_room = per_room.max(1);
    let rooms = conns.div_ceil(per_room);
    let content = idle_document()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, rss_before) = procfs::sample(pid);
    let doc_of = |i: usize| format!("idle-{tag}-{}", i / per_room);
    let content = &content;
    let opened = stream::iter((0..conns).map(|i| {
        let doc = doc_of(i);
        async move {
            let (mut client, _) = ep.join(&doc, i, &Holding::default()).await?;
            if i % per_room == 0 {
                let msg = client.update_message(content);
                client.send(msg).await?;
                if client.system == System::Native {
                    // Wait for the acknowledgement: the document is stored.
                    loop {
                        let bytes = client.recv().await?;
                        if bytes.first() == Some(&3) {
                            break;
                        }
                    }
                }
            }
            anyhow::Ok(client)
        }
    }))
    .buffer_unordered(CONNECT_CONCURRENCY)
    .collect::<Vec<_>>()
    .await;
    let tracker = Tracker::new(0, 1);
    let mut tasks = Vec::with_capacity(conns);
    for c in opened {
        tasks.push(spawn_reader(c?, Arc::clone(&tracker)));
    }
    tokio::time::sleep(Duration::from_secs_f64(settle_secs)).await;
    let (_, rss_after) = procfs::sample(pid);
    for t in tasks {
        t.abort();
    }
    Ok(IdleResult {
        connections: conns,
        per_room,
        rooms,
        doc_bytes: content.len(),
        rss_before,
        rss_after,
    })
}
