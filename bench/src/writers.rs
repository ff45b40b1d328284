//! The many-writers workload: chat-like rooms in which many clients write small updates at a
//! modest rate while every other client of the room receives them.
//!
//! Each writer is its own client with its own yrs document (a distinct random client id) and
//! writes real yrs updates, one small insert carrying a sequence number each (the same updates
//! as the fan-out workload). Sequence number `seq` is always written by writer `seq % writers`
//! (see [`crate::load::drive`]), so a writer recognises its own echo and a native writer's
//! acknowledgement of batch `k` maps back to its sequence number ([`seq_of_batch`]).
//!
//! Two latencies are measured: the acknowledgement latency (driftsync native only: from the
//! `Push` sent to its `Ack`, which the server sends once the update is durably stored) and the
//! delivery latency (from the send to the last other client of the room), which is all the
//! y-websocket protocol allows measuring: it has no acknowledgements.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::SplitStream;
use futures_util::{SinkExt, StreamExt};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use driftsync_protocol::{ClientFrame, ServerFrame};

use crate::clients::{find_markers, Client, Endpoint, System, Ws};
use crate::load::{drive, join_many, Pusher, Tracker};
use crate::procfs;
use crate::stats::{summarize, Summary};

/// The largest server frame a member decodes (acknowledgements, errors and pings are small).
const MAX_FRAME: usize = 1024 * 1024;

/// The writer (an index among all `writers`) that sends sequence number `seq`.
pub fn author_of(seq: u32, writers: usize) -> usize {
    seq as usize % writers.max(1)
}

/// The sequence number a writer sent as its batch `batch` (batches count from 1 on each
/// connection, one per update), or `None` for batch 0.
pub fn seq_of_batch(batch: u64, writer: usize, writers: usize) -> Option<u32> {
    let k = batch.checked_sub(1)?;
    u32::try_from(k * writers as u64 + writer as u64).ok()
}

/// What a member of a room counts from the messages it receives.
struct Member {
    /// The protocol.
    system: System,
    /// This member's index among the writers, or `None` for a reader: a writer's own updates
    /// (echoed by some servers) are not deliveries.
    writer: Option<usize>,
    /// All writers of the run, to find the author of a sequence number.
    writers: usize,
    /// Where deliveries and acknowledgements are stamped.
    tracker: Arc<Tracker>,
    /// Native `Error` frames received (a refused update would show here).
    refused: Arc<AtomicU64>,
}

impl Member {
    /// Handles one binary message; returns the pong to send if it was a native ping.
    fn handle(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        let mut markers = false;
        for seq in find_markers(bytes) {
            markers = true;
            if Some(author_of(seq, self.writers)) != self.writer {
                self.tracker.received(seq);
            }
        }
        if markers || self.system != System::Native {
            return None;
        }
        match ServerFrame::decode(bytes, MAX_FRAME) {
            Ok(ServerFrame::Ack { batch, .. }) => {
                if let Some(seq) = self.writer.and_then(|w| seq_of_batch(batch, w, self.writers)) {
                    self.tracker.acked(seq);
                }
                None
            }
            Ok(ServerFrame::Error { .. }) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                None
            }
            Ok(ServerFrame::Ping { nonce }) => Some(ClientFrame::Pong { nonce }.encode()),
            _ => None,
        }
    }
}

/// Reads a reader's messages until the connection ends, answering native pings.
fn spawn_reader(mut client: Client, member: Member) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(Ok(msg)) = client.ws.next().await {
            if let Message::Binary(bytes) = msg {
                if let Some(pong) = member.handle(&bytes) {
                    if client.ws.send(Message::Binary(pong.into())).await.is_err() {
                        break;
                    }
                }
            }
        }
    })
}

/// Reads what a writer receives (the others' updates, its acknowledgements). Its pushes keep
/// the connection alive, so pings go unanswered.
fn spawn_writer_reader(mut stream: SplitStream<Ws>, member: Member) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            if let Message::Binary(bytes) = msg {
                let _ = member.handle(&bytes);
            }
        }
    })
}

/// The result of one many-writers run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WritersResult {
    /// Rooms.
    pub rooms: usize,
    /// Writers per room (each also receives the others' updates).
    pub writers_per_room: usize,
    /// Readers per room.
    pub readers_per_room: usize,
    /// Updates per second sent by each writer.
    pub rate_per_writer: f64,
    /// Seconds of the measured phase's sending.
    pub secs: f64,
    /// Measured updates.
    pub updates: u32,
    /// Whether the system acknowledges writes (driftsync native); if not, the acknowledgement
    /// figures are empty and the delivery latency is the one to read.
    pub acknowledges: bool,
    /// From the `Push` sent to its `Ack` (native only).
    pub ack_latency: Summary,
    /// From the send to the last other client of the room.
    pub delivery_latency: Summary,
    /// Measured updates acknowledged.
    pub acked: u64,
    /// Acknowledged updates per second of sending.
    pub committed_per_s: f64,
    /// Deliveries counted (each other client of the room receiving each update once).
    pub deliveries: u64,
    /// Deliveries expected: updates × (clients per room − 1).
    pub expected_deliveries: u64,
    /// Deliveries per second of sending.
    pub delivered_per_s: f64,
    /// Native `Error` frames received during the whole run (refused updates among them).
    pub refused: u64,
    /// Server CPU time (utime + stime) during the measured phase, in seconds.
    pub server_cpu_s: f64,
    /// Server CPU share of one core during the measured phase.
    pub server_cpu: f64,
    /// Server CPU time per delivered message, in microseconds.
    pub cpu_per_delivery_us: f64,
    /// Server RSS at the end, in bytes.
    pub server_rss: u64,
    /// The generator's largest lag behind its sending schedule, in microseconds.
    pub generator_lag_us: f64,
}

/// The shape of a many-writers run.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Rooms.
    pub rooms: usize,
    /// Writers per room.
    pub writers: usize,
    /// Readers per room.
    pub readers: usize,
    /// Updates per second from each writer.
    pub rate: f64,
    /// Seconds measured.
    pub secs: f64,
}

/// `rooms` rooms, each with `writers` writers and `readers` readers; every writer sends
/// `rate` updates per second, for `secs` seconds after a warm-up in which every writer sends
/// at least once.
pub async fn writers(ep: &Endpoint, pid: Option<u32>, shape: Shape, tag: &str) -> anyhow::Result<WritersResult> {
    let Shape {
        rooms,
        writers,
        readers,
        rate,
        secs,
    } = shape;
    anyhow::ensure!(
        rooms > 0 && writers > 0 && rate > 0.0,
        "rooms, writers and rate must be positive"
    );
    anyhow::ensure!(writers + readers > 1, "a room needs someone to deliver to");
    let all_writers = rooms * writers;
    let total_rate = rate * all_writers as f64;
    let rounds = rate.ceil().max(1.0) as u32;
    let warmup = rounds * all_writers as u32;
    let updates = (total_rate * secs).round() as u32;
    let expected = (writers + readers - 1) as u32;
    let tracker = Tracker::new((warmup + updates) as usize, expected);
    let refused = Arc::new(AtomicU64::new(0));
    let member = |writer: Option<usize>| Member {
        system: ep.system,
        writer,
        writers: all_writers,
        tracker: Arc::clone(&tracker),
        refused: Arc::clone(&refused),
    };
    let doc_of = |i: usize| format!("writers-{tag}-{rooms}x{writers}-{}", i % rooms);
    let mut tasks: Vec<JoinHandle<()>> = join_many(ep, rooms * readers, doc_of)
        .await?
        .into_iter()
        .map(|c| spawn_reader(c, member(None)))
        .collect();
    // A writer's index is its place in `pushers`, whichever room it joined.
    let mut pushers = Vec::with_capacity(all_writers);
    for (w, client) in join_many(ep, all_writers, doc_of).await?.into_iter().enumerate() {
        let (writer, stream) = client.into_parts();
        pushers.push(Pusher::new(writer)?);
        tasks.push(spawn_writer_reader(stream, member(Some(w))));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    drive(&mut pushers, &tracker, 0, warmup, total_rate).await?;
    tracker.settle(warmup as usize, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (cpu0, _) = procfs::sample(pid);
    let t0 = Instant::now();
    let lag = drive(&mut pushers, &tracker, warmup, updates, total_rate).await?;
    let sending = t0.elapsed().as_secs_f64();
    let end = warmup + updates;
    tracker.settle(end as usize, Duration::from_secs(10)).await;
    let acknowledges = ep.system.acknowledges();
    if acknowledges {
        let deadline = Instant::now() + Duration::from_secs(10);
        while tracker.acked_count(warmup..end) < updates as usize && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let (cpu1, rss) = procfs::sample(pid);
    let wall = t0.elapsed().as_secs_f64();
    let (lat, deliveries) = tracker.latencies(warmup..end);
    let acks = tracker.ack_latencies(warmup..end);
    for mut p in pushers {
        p.close().await;
    }
    for t in tasks {
        t.abort();
    }
    let cpu = cpu1 - cpu0;
    let acked = acks.len() as u64;
    Ok(WritersResult {
        rooms,
        writers_per_room: writers,
        readers_per_room: readers,
        rate_per_writer: rate,
        secs,
        updates,
        acknowledges,
        ack_latency: summarize(acks),
        delivery_latency: summarize(lat),
        acked,
        committed_per_s: acked as f64 / sending,
        deliveries,
        expected_deliveries: u64::from(updates) * u64::from(expected),
        delivered_per_s: deliveries as f64 / sending,
        refused: refused.load(Ordering::Relaxed),
        server_cpu_s: cpu,
        server_cpu: cpu / wall,
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
    use crate::clients::marker_text;
    use driftsync_protocol::DocId;

    #[test]
    fn batches_map_back_to_sequence_numbers() {
        // 3 writers: writer 1 sends 1, 4, 7, … as its batches 1, 2, 3, …
        assert_eq!(seq_of_batch(1, 1, 3), Some(1));
        assert_eq!(seq_of_batch(3, 1, 3), Some(7));
        assert_eq!(seq_of_batch(0, 1, 3), None);
        for seq in 0..30 {
            let w = author_of(seq, 3);
            let batch = u64::from(seq) / 3 + 1;
            assert_eq!(seq_of_batch(batch, w, 3), Some(seq));
        }
        assert_eq!(author_of(5, 0), 0);
    }

    fn member(system: System, writer: Option<usize>, tracker: &Arc<Tracker>) -> Member {
        Member {
            system,
            writer,
            writers: 2,
            tracker: Arc::clone(tracker),
            refused: Arc::new(AtomicU64::new(0)),
        }
    }

    #[test]
    fn own_echoes_are_not_deliveries_and_acks_are_stamped() {
        let tracker = Tracker::new(4, 1);
        let w0 = member(System::Native, Some(0), &tracker);
        // Writer 0 sent seq 0 and 2; seq 1 and 3 are writer 1's.
        for seq in 0..4 {
            assert_eq!(w0.handle(marker_text(seq).as_bytes()), None);
        }
        let (_, deliveries) = tracker.latencies(0..4);
        assert_eq!(deliveries, 2);
        let ack = ServerFrame::Ack {
            doc: DocId::new("d").unwrap(),
            batch: 2,
            cursor: 9,
        }
        .encode();
        assert_eq!(w0.handle(&ack), None);
        // Batch 2 of writer 0 is seq 2; nothing was stamped as sent, so no latency yet, but
        // the acknowledgement is recorded.
        assert_eq!(tracker.acked_count(2..3), 1);
        assert_eq!(tracker.acked_count(0..4), 1);
        let ping = ServerFrame::Ping { nonce: 4 }.encode();
        assert_eq!(w0.handle(&ping), Some(ClientFrame::Pong { nonce: 4 }.encode()));
        let error = ServerFrame::Error {
            code: driftsync_protocol::ErrorCode::Malformed,
            doc: None,
            batch: Some(1),
        }
        .encode();
        assert_eq!(w0.handle(&error), None);
        assert_eq!(w0.refused.load(Ordering::Relaxed), 1);
        // A reader of the y-websocket protocol counts every marker and decodes nothing else.
        let r = member(System::YWebsocket, None, &tracker);
        assert_eq!(r.handle(marker_text(0).as_bytes()), None);
        assert_eq!(r.handle(&ping), None);
        assert_eq!(tracker.latencies(0..4).1, 3);
    }
}
