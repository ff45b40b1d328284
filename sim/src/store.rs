//! [`MemStore`]: an in-memory [`Store`] with the semantics of the SQL store for everything a
//! server calls, plus a seeded fault knob that makes appends fail ("failing commits").
//!
//! Everything is synchronous inside (one `std::sync::Mutex`, futures that are ready at once), so
//! a simulation on a current-thread runtime stays deterministic. The reference is
//! `engine/src/store/sql.rs`:
//!
//! * `append`: one transaction for the whole group; cursors are `head + 1, head + 2, …` per
//!   document in the order of the group; a batch whose `(client id, batch)` is at or below the
//!   client's last stored batch for that document is answered `Duplicate(cursor of that last
//!   batch)` and stores nothing. Every document of the group gets a row, even when all of its
//!   updates were duplicates (the SQL upsert creates it).
//! * `load`: the snapshot and every log entry after the snapshot cursor.
//! * `log_after`: `Pruned` when `after` is below `pruned_through`; no entries at or past the head.
//! * `compact`: folds snapshot + tail into a new snapshot covering the last entry, keeps the
//!   newest `retain_entries` entries in the log (`pruned_through` never moves back) and recounts
//!   `log_bytes` as the entries after the new snapshot (none: compaction here is atomic).
//! * `claim_client`: first writer wins, for good.
//!
//! The client-side methods are not used by the simulation's clients (they keep their state in
//! memory) and return an error.

use std::collections::{BTreeMap, BTreeSet};
use std::future::{ready, Future};
use std::sync::{Mutex, MutexGuard, PoisonError};

use driftsync_engine::store::{
    Append, Appended, Compacted, CompactionPolicy, DeviceIdentity, DocMeta, LogEntry, LogTail, OutboxEntry, Store,
    StoredDoc,
};
use driftsync_engine::{Error, Result};
use driftsync_protocol::Cursor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One stored document.
#[derive(Debug, Clone, Default)]
struct DocRow {
    head: Cursor,
    snapshot: Option<Vec<u8>>,
    snapshot_cursor: Cursor,
    pruned_through: Cursor,
    log_bytes: u64,
    /// The log entries still kept (after `pruned_through`), by cursor.
    log: BTreeMap<Cursor, Vec<u8>>,
    /// Per pushing client: its last stored batch and that batch's cursor.
    batches: BTreeMap<u64, (u64, Cursor)>,
}

/// The fault knob: while `probability > 0`, each append fails with that probability (drawn from
/// a seeded generator, so the same calls fail in every run of a seed).
#[derive(Debug)]
struct Faults {
    probability: f64,
    rng: StdRng,
    /// Appends refused so far.
    failed: u64,
}

#[derive(Debug)]
struct Inner {
    docs: BTreeMap<String, DocRow>,
    owners: BTreeMap<u64, String>,
    faults: Faults,
    /// Appends committed so far (groups, not updates).
    commits: u64,
}

/// An in-memory store shared by every server instance of a simulation.
#[derive(Debug)]
pub struct MemStore {
    inner: Mutex<Inner>,
}

impl MemStore {
    /// An empty store whose fault generator starts from `seed`.
    pub fn new(seed: u64) -> MemStore {
        MemStore {
            inner: Mutex::new(Inner {
                docs: BTreeMap::new(),
                owners: BTreeMap::new(),
                faults: Faults {
                    probability: 0.0,
                    rng: StdRng::seed_from_u64(seed),
                    failed: 0,
                },
                commits: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// From now on, each append fails (stores nothing, returns an error) with `probability`
    /// (0 turns failures off, 1 fails every append).
    pub fn set_commit_failures(&self, probability: f64) {
        self.lock().faults.probability = probability.clamp(0.0, 1.0);
    }

    /// How many appends failed on purpose and how many committed.
    pub fn counts(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.faults.failed, inner.commits)
    }

    /// The stored document (snapshot and tail), synchronously.
    pub fn stored(&self, doc: &str) -> Option<StoredDoc> {
        self.lock().docs.get(doc).map(stored_doc)
    }

    /// Ids of every stored document, sorted.
    pub fn doc_ids(&self) -> Vec<String> {
        self.lock().docs.keys().cloned().collect()
    }

    fn append_now(&self, batch: &[Append]) -> Result<Vec<Appended>> {
        let mut inner = self.lock();
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let faults = &mut inner.faults;
        if faults.probability > 0.0 && faults.rng.random_bool(faults.probability) {
            faults.failed += 1;
            return Err(Error::Invalid("simulated commit failure".into()));
        }
        // Work on copies of the touched rows and swap them in at the end: all or nothing.
        let touched: BTreeSet<&str> = batch.iter().map(|a| a.doc.as_str()).collect();
        let mut rows: BTreeMap<String, DocRow> = touched
            .iter()
            .map(|doc| (doc.to_string(), inner.docs.get(*doc).cloned().unwrap_or_default()))
            .collect();
        let mut out = Vec::with_capacity(batch.len());
        for append in batch {
            let row = rows
                .get_mut(&append.doc)
                .ok_or_else(|| Error::Invalid("a document row vanished".into()))?;
            if let Some(origin) = append.origin {
                if let Some(&(last, cursor)) = row.batches.get(&origin.client_id) {
                    if origin.batch <= last {
                        out.push(Appended::Duplicate(cursor));
                        continue;
                    }
                }
            }
            row.head = row
                .head
                .checked_add(1)
                .ok_or_else(|| Error::Invalid("head overflow".into()))?;
            let cursor = row.head;
            row.log.insert(cursor, append.update.clone());
            row.log_bytes += append.update.len() as u64;
            if let Some(origin) = append.origin {
                row.batches.insert(origin.client_id, (origin.batch, cursor));
            }
            out.push(Appended::Stored(cursor));
        }
        inner.docs.extend(rows);
        inner.commits += 1;
        Ok(out)
    }

    fn log_after_now(&self, doc: &str, after: Cursor) -> LogTail {
        let inner = self.lock();
        let Some(row) = inner.docs.get(doc) else {
            return LogTail::Entries(Vec::new());
        };
        if after < row.pruned_through {
            return LogTail::Pruned;
        }
        if after >= row.head {
            return LogTail::Entries(Vec::new());
        }
        LogTail::Entries(
            row.log
                .range(after + 1..)
                .map(|(&cursor, update)| LogEntry {
                    cursor,
                    update: update.clone(),
                })
                .collect(),
        )
    }

    fn compact_now(&self, doc: &str, policy: &CompactionPolicy) -> Result<Option<Compacted>> {
        let Some(stored) = self.stored(doc) else {
            return Ok(None);
        };
        let Some(covered) = stored.tail.last().map(|entry| entry.cursor) else {
            return Ok(None);
        };
        let (snapshot, _sv) = driftsync_engine::doc::fold(doc, &stored)?;
        let mut inner = self.lock();
        let Some(row) = inner.docs.get_mut(doc) else {
            return Ok(None);
        };
        // Nothing can have run in between (the fold is synchronous), but stay exact anyway.
        if row.snapshot_cursor != stored.snapshot_cursor {
            return Ok(None);
        }
        let prune_to = covered.saturating_sub(policy.retain_entries);
        row.snapshot_cursor = covered;
        row.pruned_through = row.pruned_through.max(prune_to);
        let snapshot_bytes = snapshot.len() as u64;
        row.snapshot = Some(snapshot);
        let kept = row.log.split_off(&(row.pruned_through + 1));
        let deleted = row.log.len() as u64;
        row.log = kept;
        row.log_bytes = row.log.range(covered + 1..).map(|(_, u)| u.len() as u64).sum();
        Ok(Some(Compacted {
            snapshot_cursor: covered,
            snapshot_bytes,
            deleted_entries: deleted,
        }))
    }
}

fn stored_doc(row: &DocRow) -> StoredDoc {
    StoredDoc {
        snapshot: row.snapshot.clone(),
        snapshot_cursor: row.snapshot_cursor,
        tail: row
            .log
            .range(row.snapshot_cursor + 1..)
            .map(|(&cursor, update)| LogEntry {
                cursor,
                update: update.clone(),
            })
            .collect(),
        head: row.head,
    }
}

fn unsupported<T>(what: &str) -> Result<T> {
    Err(Error::Invalid(format!("MemStore does not implement {what}")))
}

impl Store for MemStore {
    fn append(&self, batch: &[Append]) -> impl Future<Output = Result<Vec<Appended>>> + Send {
        ready(self.append_now(batch))
    }

    fn load(&self, doc: &str) -> impl Future<Output = Result<Option<StoredDoc>>> + Send {
        ready(Ok(self.stored(doc)))
    }

    fn log_after(&self, doc: &str, after: Cursor) -> impl Future<Output = Result<LogTail>> + Send {
        ready(Ok(self.log_after_now(doc, after)))
    }

    fn meta(&self, doc: &str) -> impl Future<Output = Result<Option<DocMeta>>> + Send {
        let meta = self.lock().docs.get(doc).map(|row| DocMeta {
            head: row.head,
            snapshot_cursor: row.snapshot_cursor,
            snapshot_bytes: row.snapshot.as_ref().map_or(0, |s| s.len() as u64),
            log_bytes: row.log_bytes,
            pruned_through: row.pruned_through,
        });
        ready(Ok(meta))
    }

    fn compact(&self, doc: &str, policy: &CompactionPolicy) -> impl Future<Output = Result<Option<Compacted>>> + Send {
        ready(self.compact_now(doc, policy))
    }

    fn documents(&self) -> impl Future<Output = Result<Vec<String>>> + Send {
        ready(Ok(self.doc_ids()))
    }

    fn claim_client(&self, client_id: u64, owner: &str) -> impl Future<Output = Result<String>> + Send {
        let mut inner = self.lock();
        let bound = inner
            .owners
            .entry(client_id)
            .or_insert_with(|| owner.to_string())
            .clone();
        ready(Ok(bound))
    }

    fn device(&self) -> impl Future<Output = Result<DeviceIdentity>> + Send {
        ready(unsupported("device"))
    }

    fn record_local(&self, _doc: &str, _update: &[u8]) -> impl Future<Output = Result<u64>> + Send {
        ready(unsupported("record_local"))
    }

    fn outbox(&self, _doc: Option<&str>) -> impl Future<Output = Result<Vec<OutboxEntry>>> + Send {
        ready(unsupported("outbox"))
    }

    fn acknowledge(&self, _doc: &str, _batch: u64) -> impl Future<Output = Result<()>> + Send {
        ready(unsupported("acknowledge"))
    }

    fn server_cursor(&self, _doc: &str) -> impl Future<Output = Result<Cursor>> + Send {
        ready(unsupported("server_cursor"))
    }

    fn record_remote(
        &self,
        _doc: &str,
        _cursor: Cursor,
        _updates: &[Vec<u8>],
    ) -> impl Future<Output = Result<()>> + Send {
        ready(unsupported("record_remote"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use driftsync_engine::doc::{new_doc, text_insert};
    use driftsync_engine::store::{Origin, SqliteStore};

    fn push(doc: &str, client: u64, batch: u64, update: &[u8]) -> Append {
        Append {
            doc: doc.into(),
            origin: Some(Origin {
                client_id: client,
                batch,
            }),
            update: update.to_vec(),
            chat: None,
        }
    }

    /// The same random sequence of appends, compactions and reads gives the same answers from the
    /// in-memory store and from the SQLite store.
    #[tokio::test]
    async fn behaves_like_sqlite() {
        for seed in 0..12u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mem = MemStore::new(seed);
            let sql = SqliteStore::open_in_memory().await.expect("sqlite");
            let writers: Vec<yrs::Doc> = (1..=3).map(|c| new_doc(c).expect("doc")).collect();
            let mut batches = [0u64; 3];
            let docs = ["a", "b", "chat/c"];
            for step in 0..60 {
                match rng.random_range(0..10) {
                    0..=5 => {
                        let mut group = Vec::new();
                        for _ in 0..rng.random_range(1..4) {
                            let w = rng.random_range(0..3);
                            let doc = docs[rng.random_range(0..3)];
                            let update = text_insert(&writers[w], 0, &format!("{step}")).expect("insert");
                            // Sometimes a re-send of an old batch, sometimes no origin.
                            let append = match rng.random_range(0..6) {
                                0 => Append {
                                    doc: doc.into(),
                                    origin: None,
                                    update,
                                    chat: None,
                                },
                                1 if batches[w] > 0 => {
                                    push(doc, w as u64 + 1, rng.random_range(1..=batches[w]), &update)
                                }
                                _ => {
                                    batches[w] += 1;
                                    push(doc, w as u64 + 1, batches[w], &update)
                                }
                            };
                            group.push(append);
                        }
                        let a = mem.append(&group).await.expect("mem append");
                        let b = sql.append(&group).await.expect("sql append");
                        assert_eq!(a, b, "seed {seed} step {step}: append");
                    }
                    6 => {
                        let policy = CompactionPolicy {
                            min_log_bytes: 0,
                            retain_entries: rng.random_range(0..4),
                        };
                        let doc = docs[rng.random_range(0..3)];
                        let a = mem.compact(doc, &policy).await.expect("mem compact");
                        let b = sql.compact(doc, &policy).await.expect("sql compact");
                        assert_eq!(
                            a.map(|c| (c.snapshot_cursor, c.deleted_entries)),
                            b.map(|c| (c.snapshot_cursor, c.deleted_entries)),
                            "seed {seed} step {step}: compact"
                        );
                    }
                    _ => {
                        let doc = docs[rng.random_range(0..3)];
                        let after = rng.random_range(0..30);
                        assert_eq!(
                            mem.log_after(doc, after).await.expect("mem"),
                            sql.log_after(doc, after).await.expect("sql"),
                            "seed {seed} step {step}: log_after {doc} {after}"
                        );
                        let (ma, sa) = (mem.meta(doc).await.expect("mem"), sql.meta(doc).await.expect("sql"));
                        assert_eq!(
                            ma.map(|m| (m.head, m.snapshot_cursor, m.log_bytes, m.pruned_through)),
                            sa.map(|m| (m.head, m.snapshot_cursor, m.log_bytes, m.pruned_through)),
                            "seed {seed} step {step}: meta"
                        );
                        let (ml, sl) = (mem.load(doc).await.expect("mem"), sql.load(doc).await.expect("sql"));
                        assert_eq!(
                            ml.as_ref().map(|d| (d.head, d.snapshot_cursor, d.tail.clone())),
                            sl.as_ref().map(|d| (d.head, d.snapshot_cursor, d.tail.clone())),
                            "seed {seed} step {step}: load"
                        );
                    }
                }
            }
            assert_eq!(mem.documents().await.expect("mem"), sql.documents().await.expect("sql"));
        }
    }

    #[tokio::test]
    async fn failing_commits_store_nothing_and_owners_stick() {
        let mem = MemStore::new(1);
        let doc = new_doc(5).expect("doc");
        let u = text_insert(&doc, 0, "x").expect("insert");
        mem.set_commit_failures(1.0);
        assert!(mem.append(&[push("d", 5, 1, &u)]).await.is_err());
        assert!(mem.load("d").await.expect("load").is_none());
        mem.set_commit_failures(0.0);
        assert_eq!(
            mem.append(&[push("d", 5, 1, &u)]).await.expect("append"),
            vec![Appended::Stored(1)]
        );
        assert_eq!(mem.counts(), (1, 1));
        assert_eq!(mem.claim_client(7, "ada").await.expect("claim"), "ada");
        assert_eq!(mem.claim_client(7, "bob").await.expect("claim"), "ada");
    }
}
