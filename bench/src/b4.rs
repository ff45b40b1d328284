//! The B4 document (the automerge-paper editing trace) for the resync and cold-load workloads.
//!
//! Replaying the trace through yrs takes about 20 s, so the replay is done once and cached: the
//! document after the first N − 10,000 operations as one update, and each of the last 10,000
//! operations as its own update. A client that misses K ≤ 10,000 operations holds the base plus
//! the first 10,000 − K of those.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use driftsync_engine::doc::{apply_bytes, encode_state, new_doc, state_vector, TEXT_ROOT};
use driftsync_engine::trace;
use driftsync_protocol::ServerFrame;
use yrs::Doc;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use crate::clients::{classify, strip_prefix, Endpoint, Holding, JoinStats, Kind, System};

/// The writing replica's client id, as in the engine's benchmarks (a 32-bit value, like Yjs's).
const CLIENT_ID: u64 = 2_654_435_769;
/// Operations kept as separate updates at the end of the trace.
pub const TAIL: usize = 10_000;
const MAGIC: &[u8; 8] = b"dsbB4v1\n";

/// The B4 document split into a base and a tail of single operations.
pub struct B4 {
    /// Operations in the whole trace.
    pub ops: usize,
    /// The document after the first `ops - TAIL` operations, as one v1 update.
    pub base: Vec<u8>,
    /// The last `TAIL` operations, one v1 update each.
    pub tail: Vec<Vec<u8>>,
}

impl B4 {
    /// Loads the cache at `cache`, or replays the trace at `trace_path` and writes the cache.
    pub fn load_or_build(trace_path: &Path, cache: &Path) -> anyhow::Result<B4> {
        if let Ok(b4) = Self::read(cache) {
            return Ok(b4);
        }
        eprintln!("replaying {} (about 20-30 s, once) ...", trace_path.display());
        let t = trace::load(trace_path).with_context(|| format!("loading the trace {}", trace_path.display()))?;
        let doc = new_doc(CLIENT_ID)?;
        let text = doc.get_or_insert_text(TEXT_ROOT);
        let ops = t.patches.len();
        if ops <= TAIL {
            bail!("the trace has only {ops} operations");
        }
        let mut base = Vec::new();
        let mut tail = Vec::with_capacity(TAIL);
        for (i, patch) in t.patches.iter().enumerate() {
            if i == ops - TAIL {
                base = encode_state(&doc);
            }
            let update = trace::apply_patch(&doc, &text, patch)?;
            if i >= ops - TAIL {
                tail.push(update);
            }
        }
        let b4 = B4 { ops, base, tail };
        if let Err(e) = b4.write(cache) {
            eprintln!("could not write the cache {}: {e}", cache.display());
        }
        Ok(b4)
    }

    fn write(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        f.write_all(MAGIC)?;
        f.write_all(&(self.ops as u64).to_le_bytes())?;
        for chunk in std::iter::once(&self.base).chain(&self.tail) {
            f.write_all(&(chunk.len() as u64).to_le_bytes())?;
            f.write_all(chunk)?;
        }
        f.flush()?;
        Ok(())
    }

    fn read(path: &Path) -> anyhow::Result<B4> {
        let mut bytes = Vec::new();
        std::fs::File::open(path)?.read_to_end(&mut bytes)?;
        let mut rest = bytes.strip_prefix(MAGIC).context("not a cache file")?;
        let mut take = |n: usize| -> anyhow::Result<&[u8]> {
            if rest.len() < n {
                bail!("truncated cache");
            }
            let (a, b) = rest.split_at(n);
            rest = b;
            Ok(a)
        };
        let num = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or_default()) as usize;
        let ops = num(take(8)?);
        let mut chunks = Vec::with_capacity(TAIL + 1);
        for _ in 0..=TAIL {
            let len = num(take(8)?);
            chunks.push(take(len)?.to_vec());
        }
        let base = chunks.remove(0);
        Ok(B4 {
            ops,
            base,
            tail: chunks,
        })
    }

    /// The document of a client that misses the last `k` operations.
    pub fn client_doc(&self, k: usize) -> anyhow::Result<Doc> {
        let doc = new_doc(CLIENT_ID.wrapping_add(1))?;
        apply_bytes(&doc, &self.base)?;
        for update in &self.tail[..TAIL - k.min(TAIL)] {
            apply_bytes(&doc, update)?;
        }
        Ok(doc)
    }

    /// The encoded size of the last `k` operations (what a client missing them lacks at least).
    pub fn floor(&self, k: usize) -> usize {
        self.tail[TAIL - k.min(TAIL)..].iter().map(Vec::len).sum()
    }

    /// The whole document, encoded (v1).
    pub fn encoded_size(&self) -> anyhow::Result<usize> {
        Ok(encode_state(&self.client_doc(0)?).len())
    }
}

/// The default cache location: `target/driftsync-bench/b4-tail10000.bin` in the workspace.
pub fn default_cache() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .unwrap_or(manifest)
        .join("target")
        .join("driftsync-bench")
        .join("b4-tail10000.bin")
}

/// Writes the B4 document into `doc` on the server: the base, then the tail one operation per
/// update. Returns the writing client (kept open, so that servers keep the document loaded) and,
/// for the native protocol, the cursor each tail operation was stored at.
pub async fn setup(ep: &Endpoint, doc: &str, b4: &B4) -> anyhow::Result<(Holder, Vec<u64>)> {
    let (mut client, _) = ep.join(doc, 0, &Holding::default()).await?;
    let mut cursors = Vec::with_capacity(TAIL + 1);
    let msgs: Vec<Vec<u8>> = std::iter::once(&b4.base)
        .chain(&b4.tail)
        .map(|u| client.update_message(u))
        .collect();
    // driftsync limits each connection to 500 frames/s after a burst of 2,000 (and closes a
    // y-websocket connection that goes faster): stay below that.
    let start = Instant::now();
    // y-sweet drops messages to a connection whose queue is full (its echo of our own updates),
    // so the anchors are paced too.
    let allowed = |start: Instant| {
        if client_is_driftsync(ep.system) {
            1_500 + (start.elapsed().as_secs_f64() * 450.0) as usize
        } else {
            500 + (start.elapsed().as_secs_f64() * 2_000.0) as usize
        }
    };
    if client.system == System::Native {
        // Pipelined, at most 256 unacknowledged.
        let mut sent = 0;
        while cursors.len() < msgs.len() {
            while sent < msgs.len() && sent - cursors.len() < 256 && sent < allowed(start) {
                client.send(msgs[sent].clone()).await?;
                sent += 1;
            }
            if sent - cursors.len() == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            let bytes = client.recv().await?;
            match ServerFrame::decode(&bytes, usize::MAX)? {
                ServerFrame::Ack { cursor, .. } => cursors.push(cursor),
                ServerFrame::Error { code, .. } => bail!("push refused: {code:?}"),
                _ => {}
            }
        }
        return Ok((
            Holder {
                client: Some(client),
                writer: None,
                reader: None,
            },
            cursors,
        ));
    }
    // Read while writing: servers echo updates, and one that cannot send stops reading.
    let prefix = hocus_prefix(&client);
    let hocus = client.system.hocuspocus_framing();
    let (mut writer, mut stream) = client.into_parts();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let reader = tokio::spawn(async move {
        let mut tx = Some(tx);
        while let Some(Ok(msg)) = stream.next().await {
            if let Message::Binary(bytes) = msg {
                let body = if hocus { strip_prefix(&bytes) } else { &bytes[..] };
                if let (Kind::Step2(_), Some(tx)) = (classify(body), tx.take()) {
                    let _ = tx.send(());
                }
            }
        }
    });
    for (i, m) in msgs.into_iter().enumerate() {
        while i >= allowed(start) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        writer.send(m).await?;
    }
    // A barrier: the answer to a SyncStep1 comes after every update sent before it is applied.
    // Asked again every 5 s, in case an answer was dropped.
    let full = b4.client_doc(0)?;
    let step1 = crate::clients::y_sync(&prefix, 0, &state_vector(&full));
    let mut rx = rx;
    let mut answered = false;
    for _ in 0..60 {
        writer.send(step1.clone()).await?;
        if tokio::time::timeout(Duration::from_secs(5), &mut rx).await.is_ok() {
            answered = true;
            break;
        }
    }
    if !answered {
        bail!("the server did not answer the barrier in 300 s");
    }
    Ok((
        Holder {
            client: None,
            writer: Some(writer),
            reader: Some(reader),
        },
        cursors,
    ))
}

fn client_is_driftsync(system: System) -> bool {
    system.is_driftsync()
}

fn hocus_prefix(client: &crate::clients::Client) -> Vec<u8> {
    if client.system.hocuspocus_framing() {
        crate::clients::hocuspocus_prefix(&client.doc)
    } else {
        Vec::new()
    }
}

/// Keeps the connection that wrote B4 open (servers then keep the document loaded).
pub struct Holder {
    client: Option<crate::clients::Client>,
    writer: Option<crate::clients::Writer>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Some(reader) = self.reader.take() {
            reader.abort();
        }
        self.writer.take();
        self.client.take();
    }
}

/// One resync measurement.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ResyncRow {
    /// Operations the client misses; `None` for a full sync (the client holds nothing).
    pub missing: Option<usize>,
    /// Encoded size of the missed operations (their own updates), in bytes.
    pub floor: usize,
    /// Bytes and times (the median run's times).
    pub stats: JoinStats,
}

/// The result of the resync workload.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ResyncResult {
    /// Operations in the trace.
    pub ops: usize,
    /// The whole document's encoded size (v1).
    pub doc_bytes: usize,
    /// Runs per row (times are the median).
    pub runs: usize,
    /// One row per K, then the full sync.
    pub rows: Vec<ResyncRow>,
}

/// Sets up the B4 document in `doc` and measures a client missing each of `ks` operations, and
/// a client holding nothing, `runs` times each.
pub async fn resync(ep: &Endpoint, b4: &B4, doc: &str, ks: &[usize], runs: usize) -> anyhow::Result<ResyncResult> {
    let t = Instant::now();
    let (holder, cursors) = setup(ep, doc, b4).await?;
    eprintln!(
        "  {}: B4 written in {:.1} s",
        ep.system.name(),
        t.elapsed().as_secs_f64()
    );
    let mut rows = Vec::new();
    for k in ks.iter().copied().map(Some).chain([None]) {
        let client_doc = match k {
            Some(k) => Some(b4.client_doc(k)?),
            None => None,
        };
        let holding = match (&client_doc, k) {
            (Some(d), Some(k)) => Holding {
                sv: state_vector(d),
                doc: Some(d),
                // The cursor of the last operation the client holds (the base is the first push).
                cursor: cursors.get(TAIL - k.min(TAIL)).copied().unwrap_or(0),
                min_down: 0,
            },
            _ => Holding::default(),
        };
        let mut all = Vec::with_capacity(runs);
        for i in 0..runs.max(1) {
            let (client, stats) = ep.join(doc, 1 + i, &holding).await?;
            drop(client);
            all.push(stats);
        }
        all.sort_by(|a, b| a.synced_us.total_cmp(&b.synced_us));
        let stats = all[all.len() / 2];
        rows.push(ResyncRow {
            missing: k,
            floor: k.map_or(0, |k| b4.floor(k)),
            stats,
        });
    }
    drop(holder);
    Ok(ResyncResult {
        ops: b4.ops,
        doc_bytes: b4.encoded_size()?,
        runs,
        rows,
    })
}

/// The result of a cold load.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ColdResult {
    /// The first join after the server started (the document only on disk).
    pub cold: JoinStats,
    /// A second join right after (the document loaded).
    pub warm: JoinStats,
}

/// Joins `doc` holding nothing, twice: the first join loads the stored document. Each join lasts
/// until 90 % of `doc_bytes` came down.
pub async fn cold(ep: &Endpoint, doc: &str, doc_bytes: usize) -> anyhow::Result<ColdResult> {
    let holding = Holding {
        min_down: (doc_bytes as u64) * 9 / 10,
        ..Holding::default()
    };
    let (c1, cold) = ep.join(doc, 0, &holding).await?;
    let (c2, warm) = ep.join(doc, 1, &holding).await?;
    drop((c1, c2));
    Ok(ColdResult { cold, warm })
}
