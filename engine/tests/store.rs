//! The [`Store`] contract, checked on every backend.
//!
//! Each case is written once, as an `async fn` generic over a [`Fixture`] that opens (and
//! re-opens) a store, and `cases!` turns it into one `#[tokio::test]` per backend:
//!
//! * `sqlite_store::<case>`: a database file in a temporary directory, always;
//! * `sqlite_memory_store::<case>`: [`SqliteStore::open_in_memory`], always;
//! * `postgres_store::<case>`: a schema of its own in the database `DRIFTSYNC_TEST_POSTGRES_URL`
//!   names (dropped afterwards), or skipped with one line on stderr when that is not set.
//!
//! Writing the cases once keeps the backends honest: they pass the same tests or the difference
//! shows.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use driftsync_engine::doc::{load_document, new_doc, text, text_insert, MAX_CLIENT_ID};
use driftsync_engine::store::{
    AnyStore, Append, Appended, Compacted, CompactionPolicy, LogEntry, LogTail, Origin, OutboxEntry, PgStore,
    SqliteStore, Store, StoredDoc,
};
use driftsync_engine::{Error, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::{Connection, Executor};
use yrs::Doc;

/// The environment variable naming the PostgreSQL database the tests may use.
const POSTGRES_URL: &str = "DRIFTSYNC_TEST_POSTGRES_URL";

// ----- backends -----

/// A backend under test: one database, which `open` opens (again).
trait Fixture {
    /// The store type.
    type Store: Store + Hooks;

    /// Opens a store on this fixture's database; a second call is a re-open (a restart, or a
    /// second server instance sharing the database).
    fn open(&self) -> impl Future<Output = Self::Store>;
}

/// A SQLite database file in a temporary directory, in a subdirectory that `open` must create.
struct SqliteFixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl SqliteFixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested").join("store.db");
        SqliteFixture { _dir: dir, path }
    }
}

impl Fixture for SqliteFixture {
    type Store = SqliteStore;

    async fn open(&self) -> SqliteStore {
        SqliteStore::open(&self.path).await.unwrap()
    }
}

/// An in-memory SQLite database; re-opening hands out the same store (which shares the pool).
struct MemoryFixture {
    store: SqliteStore,
}

impl MemoryFixture {
    async fn new() -> Self {
        MemoryFixture {
            store: SqliteStore::open_in_memory().await.unwrap(),
        }
    }
}

impl Fixture for MemoryFixture {
    type Store = SqliteStore;

    async fn open(&self) -> SqliteStore {
        self.store.clone()
    }
}

/// A schema of its own in the test database, dropped when the fixture is.
struct PgFixture {
    url: String,
    schema: String,
}

impl PgFixture {
    /// The fixture, or `None` (saying so on stderr) when no test database is configured.
    fn new() -> Option<Self> {
        let Ok(url) = std::env::var(POSTGRES_URL) else {
            eprintln!("skipped: {POSTGRES_URL} is not set");
            return None;
        };
        let schema = format!("driftsync_test_{:016x}", rand::random::<u64>());
        Some(PgFixture { url, schema })
    }
}

impl Fixture for PgFixture {
    type Store = PgStore;

    async fn open(&self) -> PgStore {
        PgStore::connect_isolated(&self.url, &self.schema).await.unwrap()
    }
}

impl Drop for PgFixture {
    /// Drops the schema, also when the test failed. A destructor cannot await, so this runs on a
    /// runtime of its own in a thread of its own.
    fn drop(&mut self) {
        let url = self.url.clone();
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema);
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&url).await?;
                conn.execute(sqlx::raw_sql(&sql)).await?;
                conn.close().await?;
                Ok::<_, sqlx::Error>(())
            })?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not drop test schema {}: {e}", self.schema),
            Err(_) => eprintln!(
                "could not drop test schema {}: the cleanup thread panicked",
                self.schema
            ),
        }
    }
}

/// The stores' hidden test hooks, for the generic cases.
trait Hooks {
    async fn raw_insert_update(&self, doc: &str, seq: i64, data: &[u8]);
    async fn raw_set_snapshot(&self, doc: &str, snapshot: Option<&[u8]>);
    async fn raw_set_head(&self, doc: &str, head: i64);
    async fn compact_with_pause(
        &self,
        doc: &str,
        policy: &CompactionPolicy,
        pause: impl Future<Output = ()>,
    ) -> Result<Option<Compacted>>;
}

macro_rules! hooks {
    ($store:ty) => {
        impl Hooks for $store {
            async fn raw_insert_update(&self, doc: &str, seq: i64, data: &[u8]) {
                <$store>::raw_insert_update(self, doc, seq, data).await.unwrap()
            }
            async fn raw_set_snapshot(&self, doc: &str, snapshot: Option<&[u8]>) {
                <$store>::raw_set_snapshot(self, doc, snapshot).await.unwrap()
            }
            async fn raw_set_head(&self, doc: &str, head: i64) {
                <$store>::raw_set_head(self, doc, head).await.unwrap()
            }
            async fn compact_with_pause(
                &self,
                doc: &str,
                policy: &CompactionPolicy,
                pause: impl Future<Output = ()>,
            ) -> Result<Option<Compacted>> {
                <$store>::compact_with_pause(self, doc, policy, pause).await
            }
        }
    };
}

hooks!(SqliteStore);
hooks!(PgStore);

/// Generates one test per backend for each generic case.
macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        mod sqlite_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(&super::SqliteFixture::new()).await;
                }
            )*
        }

        mod sqlite_memory_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(&super::MemoryFixture::new().await).await;
                }
            )*
        }

        mod postgres_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(fixture) = super::PgFixture::new() else { return };
                    super::$case(&fixture).await;
                }
            )*
        }
    };
}

cases!(
    append_assigns_cursors_per_document,
    append_batch_across_documents_is_atomic,
    duplicate_batches_are_not_stored,
    large_groups_span_several_statements,
    concurrent_writers_get_gap_free_cursors,
    compaction_keeps_the_text,
    compaction_prunes_old_entries,
    append_during_compaction_survives,
    competing_compactors_one_wins,
    concurrent_appends_and_compactions,
    corrupt_log_row_names_the_document,
    corrupt_counters_are_refused,
    random_garbage_never_panics,
    device_identity_is_stable,
    outbox_and_acknowledge,
    server_cursor_never_moves_backwards,
    reopen_keeps_everything,
    heads_of_many_documents_in_one_call,
    chat_index_keeps_inboxes,
);

/// A chat room as a server holds it: every update goes through the guard, and its facts are
/// stored with it.
struct GuardedRoom {
    id: String,
    doc: Doc,
    guard: driftsync_engine::chat::ChatGuard,
}

impl GuardedRoom {
    fn new(id: &str) -> Self {
        let doc = new_doc(7).unwrap();
        let guard = driftsync_engine::chat::ChatGuard::attach(&doc);
        GuardedRoom {
            id: id.to_string(),
            doc,
            guard,
        }
    }

    /// Applies `update` from `user` and stores it with its facts.
    async fn push<S: Store>(&self, store: &S, user: &str, update: Vec<u8>) {
        self.guard.reset();
        driftsync_engine::doc::apply_bytes(&self.doc, &update).unwrap();
        self.guard.check(Some(user), u64::MAX / 4).unwrap();
        let facts = self.guard.take_facts();
        let mut append = append(&self.id, &update);
        append.chat = (!facts.is_empty()).then(|| Box::new(facts));
        store.append(&[append]).await.unwrap();
    }
}

/// The chat index: a user's inbox lists the rooms they joined with the last message and their
/// unread count, and later only what changed; leaving shows as `joined: false` to a device
/// that knew the room.
async fn chat_index_keeps_inboxes<F: Fixture>(fixture: &F) {
    use driftsync_engine::chat::{Author, ChatRoom};
    let store = fixture.open().await;
    let (alice, bob) = (
        Author {
            user: "alice".into(),
            device: "a1".into(),
        },
        Author {
            user: "bob".into(),
            device: "b1".into(),
        },
    );
    let mut rooms = Vec::new();
    for name in ["chat/one", "chat/two", "chat/three"] {
        rooms.push((
            GuardedRoom::new(name),
            ChatRoom::new(new_doc(11).unwrap()),
            ChatRoom::new(new_doc(12).unwrap()),
        ));
    }
    let empty = store.inbox("alice", 0).await.unwrap();
    assert!(empty.rooms.is_empty());
    // Both join every room; bob sends two messages in each, alice one in the first.
    for (server, a, b) in &rooms {
        let update = a.join(&alice, 1_000).unwrap();
        server.push(&store, "alice", update.clone()).await;
        driftsync_engine::doc::apply_bytes(b.doc(), &update).unwrap();
        let update = b.join(&bob, 1_001).unwrap();
        server.push(&store, "bob", update.clone()).await;
        driftsync_engine::doc::apply_bytes(a.doc(), &update).unwrap();
        for text in ["hello", "there"] {
            let (_, update) = b.send(&bob, text, 2_000);
            server.push(&store, "bob", update.clone()).await;
            driftsync_engine::doc::apply_bytes(a.doc(), &update).unwrap();
        }
    }
    let (_, update) = rooms[0].1.send(&alice, "mine", 3_000);
    rooms[0].0.push(&store, "alice", update).await;
    let inbox = store.inbox("alice", 0).await.unwrap();
    assert_eq!(inbox.rooms.len(), 3);
    assert_eq!(inbox.rooms[0].room, "chat/one", "most recently active first");
    assert_eq!(inbox.rooms[0].last.as_ref().unwrap().text, "mine");
    assert!(inbox.rooms.iter().all(|room| room.unread == 2 && room.joined));
    assert_eq!(store.inbox("bob", 0).await.unwrap().rooms[0].unread, 1);

    // Alice reads room two; bob deletes a message in room three.
    let last = rooms[1].1.messages().last().unwrap().id.clone();
    let update = rooms[1].1.mark_read(&alice, &last, 4_000).unwrap().unwrap();
    rooms[1].0.push(&store, "alice", update).await;
    let first = rooms[2].2.messages()[0].id.clone();
    let update = rooms[2].2.delete(&bob, &first, 4_000).unwrap();
    rooms[2].0.push(&store, "bob", update).await;
    let changed = store.inbox("alice", inbox.version).await.unwrap();
    assert!(changed.version > inbox.version);
    let unread: Vec<(String, u64)> = changed.rooms.iter().map(|r| (r.room.clone(), r.unread)).collect();
    assert_eq!(unread.len(), 2, "only what changed: {unread:?}");
    assert!(unread.contains(&("chat/two".into(), 0)), "{unread:?}");
    assert!(unread.contains(&("chat/three".into(), 1)), "{unread:?}");
    assert!(store.inbox("alice", changed.version).await.unwrap().rooms.is_empty());

    // Alice leaves room one: gone from a fresh inbox, `joined: false` for a device that knew it.
    let update = rooms[0].1.leave(&alice, 5_000).unwrap();
    rooms[0].0.push(&store, "alice", update).await;
    let left = store.inbox("alice", changed.version).await.unwrap();
    assert_eq!(left.rooms.len(), 1);
    assert!(!left.rooms[0].joined);
    assert_eq!(store.inbox("alice", 0).await.unwrap().rooms.len(), 2);
    let members = store.members("chat/one").await.unwrap();
    assert_eq!(
        members.iter().map(|m| (m.user.as_str(), m.joined)).collect::<Vec<_>>(),
        [("alice", false), ("bob", true)]
    );
    store.set_seen(&[("bob".to_string(), 9_000)]).await.unwrap();
    store.set_seen(&[("bob".to_string(), 8_000)]).await.unwrap();
    let members = store.members("chat/one").await.unwrap();
    assert_eq!(members[1].last_seen_ms, Some(9_000), "last seen never moves back");
    assert_eq!(members[0].last_seen_ms, None);
}

// ----- helpers -----

/// An append without origin.
fn append(doc: &str, update: &[u8]) -> Append {
    Append {
        doc: doc.to_string(),
        origin: None,
        update: update.to_vec(),
        chat: None,
    }
}

/// An append pushed by `client_id` as `batch`.
fn pushed(doc: &str, client_id: u64, batch: u64, update: &[u8]) -> Append {
    Append {
        doc: doc.to_string(),
        origin: Some(Origin { client_id, batch }),
        update: update.to_vec(),
        chat: None,
    }
}

/// Keeping `retain_entries` log entries.
fn retaining(retain_entries: u64) -> CompactionPolicy {
    CompactionPolicy {
        min_log_bytes: 0,
        retain_entries,
    }
}

/// An editor whose inserts (at the end of the text) are the updates the tests store.
struct Editor {
    doc: Doc,
}

impl Editor {
    fn new(client_id: u64) -> Self {
        Editor {
            doc: new_doc(client_id).unwrap(),
        }
    }

    /// Appends `chunk` to the text and returns the update.
    fn type_text(&self, chunk: &str) -> Vec<u8> {
        let end = driftsync_engine::doc::text_len(&self.doc);
        text_insert(&self.doc, end, chunk).unwrap()
    }

    fn text(&self) -> String {
        text(&self.doc)
    }
}

/// Stores each update with its own `append` call.
async fn append_each<S: Store>(store: &S, doc: &str, updates: &[Vec<u8>]) {
    for update in updates {
        store.append(&[append(doc, update)]).await.unwrap();
    }
}

/// The text of a stored document.
async fn stored_text<S: Store>(store: &S, doc: &str) -> String {
    let stored = store.load(doc).await.unwrap().expect("the document is stored");
    text(&load_document(doc, &stored, 99).unwrap())
}

/// The entries of a log tail that must not be pruned.
fn entries(tail: LogTail) -> Vec<LogEntry> {
    match tail {
        LogTail::Entries(entries) => entries,
        LogTail::Pruned => panic!("the log tail was pruned"),
    }
}

/// The cursors of log entries.
fn cursors(entries: &[LogEntry]) -> Vec<u64> {
    entries.iter().map(|entry| entry.cursor).collect()
}

/// Asserts `result` is [`Error::Corrupt`] naming `doc`.
#[track_caller]
fn assert_corrupt<T: std::fmt::Debug>(result: Result<T>, doc: &str) {
    match result {
        Err(Error::Corrupt { doc: named, reason }) => {
            assert_eq!(named, doc, "the error names the wrong document ({reason})")
        }
        other => panic!("expected a corrupt-data error for {doc:?}, got {other:?}"),
    }
}

// ----- cases -----

async fn heads_of_many_documents_in_one_call<F: Fixture>(fixture: &F) {
    let store = fixture.open().await;
    let editor = Editor::new(41);
    // More documents than one query asks about, some never stored, one with a quote in its id.
    let docs: Vec<String> = (0..1203).map(|i| format!("heads/{i}'x")).collect();
    for (i, doc) in docs.iter().enumerate().filter(|(i, _)| i % 3 != 0) {
        let updates: Vec<Vec<u8>> = (0..=i % 4).map(|_| editor.type_text("h")).collect();
        append_each(&store, doc, &updates).await;
    }
    let ids: Vec<&str> = docs.iter().map(String::as_str).collect();
    let heads = store.heads(&ids).await.unwrap();
    assert_eq!(heads.len(), docs.len());
    for (i, head) in heads.iter().enumerate() {
        let expected = if i % 3 == 0 { 0 } else { (i % 4 + 1) as u64 };
        assert_eq!(*head, expected, "head of {}", docs[i]);
    }
    // The same answers as one `meta` call per document, in the order asked.
    let reversed: Vec<&str> = ids.iter().rev().copied().collect();
    let heads_reversed = store.heads(&reversed).await.unwrap();
    assert_eq!(heads_reversed, heads.iter().rev().copied().collect::<Vec<_>>());
    assert!(store.heads(&[]).await.unwrap().is_empty());
}

async fn append_assigns_cursors_per_document<F: Fixture>(fixture: &F) {
    let store = fixture.open().await;
    assert_eq!(store.load("a").await.unwrap(), None);
    assert_eq!(store.meta("a").await.unwrap(), None);
    assert_eq!(store.log_after("a", 0).await.unwrap(), LogTail::Entries(vec![]));
    assert_eq!(store.log_after("a", 7).await.unwrap(), LogTail::Entries(vec![]));
    assert_eq!(store.documents().await.unwrap(), Vec::<String>::new());
    assert_eq!(store.append(&[]).await.unwrap(), vec![]);

    for i in 1..=3u8 {
        assert_eq!(
            store.append(&[append("a", &[i])]).await.unwrap(),
            vec![Appended::Stored(u64::from(i))]
        );
    }
    assert_eq!(
        store.append(&[append("b", &[10])]).await.unwrap(),
        vec![Appended::Stored(1)]
    );
    assert_eq!(
        store.append(&[append("Z", &[20, 21])]).await.unwrap(),
        vec![Appended::Stored(1)]
    );
    assert_eq!(
        store.append(&[append("b", &[11])]).await.unwrap(),
        vec![Appended::Stored(2)]
    );
    assert_eq!(
        store.append(&[append("a", &[4])]).await.unwrap(),
        vec![Appended::Stored(4)]
    );

    // Sorted by bytes, whatever the database's collation would say.
    assert_eq!(store.documents().await.unwrap(), ["Z", "a", "b"]);
    let meta = store.meta("a").await.unwrap().unwrap();
    assert_eq!(
        (
            meta.head,
            meta.snapshot_cursor,
            meta.snapshot_bytes,
            meta.log_bytes,
            meta.pruned_through
        ),
        (4, 0, 0, 4, 0)
    );
    assert_eq!(store.meta("Z").await.unwrap().unwrap().log_bytes, 2);

    let tail = entries(store.log_after("a", 1).await.unwrap());
    assert_eq!(
        tail,
        vec![
            LogEntry {
                cursor: 2,
                update: vec![2]
            },
            LogEntry {
                cursor: 3,
                update: vec![3]
            },
            LogEntry {
                cursor: 4,
                update: vec![4]
            },
        ]
    );
    assert_eq!(entries(store.log_after("a", 4).await.unwrap()), vec![]);
    assert_eq!(entries(store.log_after("a", 100).await.unwrap()), vec![]);
    let stored = store.load("b").await.unwrap().unwrap();
    assert_eq!(
        stored,
        StoredDoc {
            snapshot: None,
            snapshot_cursor: 0,
            tail: vec![
                LogEntry {
                    cursor: 1,
                    update: vec![10]
                },
                LogEntry {
                    cursor: 2,
                    update: vec![11]
                }
            ],
            head: 2,
        }
    );
}

async fn append_batch_across_documents_is_atomic<F: Fixture>(fixture: &F) {
    let store = fixture.open().await;
    let batch = [
        append("a", b"a1"),
        append("b", b"b1"),
        append("a", b"a2"),
        append("b", b"b2"),
        append("a", b"a3"),
    ];
    let appended = store.append(&batch).await.unwrap();
    assert_eq!(
        appended.into_iter().map(Appended::cursor).collect::<Vec<_>>(),
        [1, 1, 2, 2, 3]
    );
    let a = entries(store.log_after("a", 0).await.unwrap());
    assert_eq!(
        a.iter().map(|e| e.update.as_slice()).collect::<Vec<_>>(),
        [b"a1", b"a2", b"a3"]
    );
    assert_eq!(cursors(&entries(store.log_after("b", 0).await.unwrap())), [1, 2]);

    // One bad append fails the whole batch: the good one before it is not stored either.
    let bad = [append("c", b"c1"), append("a", b"a4"), pushed("c", u64::MAX, 1, b"c2")];
    assert!(matches!(store.append(&bad).await, Err(Error::Invalid(_))));
    assert_eq!(store.meta("c").await.unwrap(), None);
    assert_eq!(store.meta("a").await.unwrap().unwrap().head, 3);
    assert_eq!(store.documents().await.unwrap(), ["a", "b"]);
}

async fn duplicate_batches_are_not_stored<F: Fixture>(fixture: &F) {
    let store = &fixture.open().await;
    let one = |append: Append| async move { store.append(&[append]).await.unwrap()[0] };
    assert_eq!(one(pushed("a", 7, 1, b"x1")).await, Appended::Stored(1));
    assert_eq!(one(append("a", b"local")).await, Appended::Stored(2));
    assert_eq!(one(pushed("a", 7, 2, b"x2")).await, Appended::Stored(3));
    // Re-sent after a lost acknowledgement: the cursor of the client's latest batch.
    assert_eq!(one(pushed("a", 7, 2, b"x2")).await, Appended::Duplicate(3));
    assert_eq!(one(pushed("a", 7, 1, b"x1")).await, Appended::Duplicate(3));
    // Batch ids are per client and per document.
    assert_eq!(one(pushed("a", 8, 1, b"y1")).await, Appended::Stored(4));
    assert_eq!(one(pushed("b", 7, 1, b"x1")).await, Appended::Stored(1));
    // The same batch twice in one call.
    let twice = store
        .append(&[pushed("a", 7, 3, b"x3"), pushed("a", 7, 3, b"x3")])
        .await
        .unwrap();
    assert_eq!(twice, [Appended::Stored(5), Appended::Duplicate(5)]);

    let log = entries(store.log_after("a", 0).await.unwrap());
    assert_eq!(cursors(&log), [1, 2, 3, 4, 5]);
    assert_eq!(
        log.iter().map(|e| e.update.as_slice()).collect::<Vec<_>>(),
        [&b"x1"[..], b"local", b"x2", b"y1", b"x3"]
    );
    assert_eq!(store.meta("a").await.unwrap().unwrap().log_bytes, 2 + 5 + 2 + 2 + 2);
}

/// A group commit larger than one multi-row statement carries (256 rows): 1,500 appends over
/// 300 documents from 3 clients, each batch sent twice in the same call and some re-sent from an
/// earlier call, get gap-free cursors per document in call order, and only the first copy of a
/// batch is stored.
async fn large_groups_span_several_statements<F: Fixture>(fixture: &F) {
    let store = &fixture.open().await;
    let docs = 300;
    // Call 1: batch 1 of client 0 on every document.
    let first: Vec<Append> = (0..docs)
        .map(|d| pushed(&format!("doc-{d:03}"), 100, 1, format!("c0b1-{d}").as_bytes()))
        .collect();
    let stored = store.append(&first).await.unwrap();
    assert!(stored.iter().all(|a| *a == Appended::Stored(1)), "{stored:?}");

    // Call 2: batch 1 of client 0 again (duplicates), then batches 2 of clients 0..3, each
    // twice, and an update without origin, on every document.
    let mut second = Vec::new();
    for d in 0..docs {
        let doc = format!("doc-{d:03}");
        second.push(pushed(&doc, 100, 1, b"again"));
        for client in 0..3 {
            let update = format!("c{client}b2-{d}");
            second.push(pushed(&doc, 100 + client, 2, update.as_bytes()));
            second.push(pushed(&doc, 100 + client, 2, update.as_bytes()));
        }
        second.push(append(&doc, b"local"));
    }
    let result = store.append(&second).await.unwrap();
    assert_eq!(result.len(), docs * 8);
    for (d, per_doc) in result.chunks(8).enumerate() {
        assert_eq!(
            per_doc,
            [
                Appended::Duplicate(1),
                Appended::Stored(2),
                Appended::Duplicate(2),
                Appended::Stored(3),
                Appended::Duplicate(3),
                Appended::Stored(4),
                Appended::Duplicate(4),
                Appended::Stored(5),
            ],
            "document {d}"
        );
    }
    for d in [0, 151, 299] {
        let doc = format!("doc-{d:03}");
        let log = entries(store.log_after(&doc, 0).await.unwrap());
        assert_eq!(cursors(&log), [1, 2, 3, 4, 5]);
        let texts: Vec<String> = log
            .iter()
            .map(|e| String::from_utf8_lossy(&e.update).into_owned())
            .collect();
        assert_eq!(
            texts,
            [
                format!("c0b1-{d}"),
                format!("c0b2-{d}"),
                format!("c1b2-{d}"),
                format!("c2b2-{d}"),
                "local".to_string()
            ]
        );
        let meta = store.meta(&doc).await.unwrap().unwrap();
        assert_eq!(meta.head, 5);
        assert_eq!(meta.log_bytes, texts.iter().map(|t| t.len() as u64).sum::<u64>());
    }
    assert_eq!(store.documents().await.unwrap().len(), docs);
}

/// Two stores on one database (two server instances, or two processes on one SQLite file) append
/// to the same documents at once, in batches that touch them in opposite orders, while both
/// receive the same re-sent batch several times.
async fn concurrent_writers_get_gap_free_cursors<F: Fixture>(fixture: &F) {
    let stores = [Arc::new(fixture.open().await), Arc::new(fixture.open().await)];
    let mut tasks = Vec::new();
    for i in 0..24usize {
        let store = Arc::clone(&stores[i % 2]);
        tasks.push(tokio::spawn(async move {
            let batch = match i % 3 {
                0 => vec![append("x", b"u"), append("y", b"u")],
                1 => vec![append("y", b"u"), append("x", b"u")],
                _ => vec![pushed("x", 42, 1, b"resent")],
            };
            let appended = store.append(&batch).await.unwrap();
            (batch, appended)
        }));
    }
    let mut stored = std::collections::HashMap::<String, Vec<u64>>::new();
    let mut resent = Vec::new();
    for task in tasks {
        let (batch, appended) = task.await.unwrap();
        for (append, appended) in batch.iter().zip(appended) {
            if let Appended::Stored(cursor) = appended {
                stored.entry(append.doc.clone()).or_default().push(cursor);
            }
            if append.origin.is_some() {
                resent.push(appended);
            }
        }
    }
    for (doc, mut cursors) in stored {
        cursors.sort_unstable();
        let head = store_head(&*stores[0], &doc).await;
        assert_eq!(
            cursors,
            (1..=head).collect::<Vec<_>>(),
            "cursors of {doc} are not gap-free"
        );
    }
    // The re-sent batch is stored once; every copy reports that cursor.
    let stored_at: Vec<_> = resent.iter().filter(|a| matches!(a, Appended::Stored(_))).collect();
    assert_eq!(stored_at.len(), 1, "{resent:?}");
    assert!(resent.iter().all(|a| a.cursor() == stored_at[0].cursor()), "{resent:?}");
    assert_eq!(store_head(&*stores[1], "x").await, 16 + 1);
    assert_eq!(store_head(&*stores[1], "y").await, 16);
}

async fn store_head<S: Store>(store: &S, doc: &str) -> u64 {
    store.meta(doc).await.unwrap().unwrap().head
}

async fn compaction_keeps_the_text<F: Fixture>(fixture: &F) {
    let store = fixture.open().await;
    let editor = Editor::new(11);
    let updates: Vec<_> = (0..20).map(|i| editor.type_text(&format!("word{i} "))).collect();
    append_each(&store, "d", &updates).await;
    let before = stored_text(&store, "d").await;
    assert_eq!(before, editor.text());

    let compacted = store.compact("d", &retaining(1024)).await.unwrap().unwrap();
    assert_eq!((compacted.snapshot_cursor, compacted.deleted_entries), (20, 0));
    let stored = store.load("d").await.unwrap().unwrap();
    assert_eq!((stored.snapshot_cursor, stored.head, stored.tail.len()), (20, 20, 0));
    assert_eq!(
        stored.snapshot.as_ref().map(Vec::len),
        Some(compacted.snapshot_bytes as usize)
    );
    assert_eq!(stored_text(&store, "d").await, before);
    let meta = store.meta("d").await.unwrap().unwrap();
    assert_eq!(
        (meta.snapshot_bytes, meta.log_bytes, meta.pruned_through),
        (compacted.snapshot_bytes, 0, 0)
    );
    // Nothing new to fold.
    assert_eq!(store.compact("d", &retaining(1024)).await.unwrap(), None);
    assert_eq!(store.compact("never-stored", &retaining(0)).await.unwrap(), None);

    // Snapshot plus tail.
    let more: Vec<_> = (0..3).map(|i| editor.type_text(&format!("more{i} "))).collect();
    append_each(&store, "d", &more).await;
    let stored = store.load("d").await.unwrap().unwrap();
    assert_eq!(cursors(&stored.tail), [21, 22, 23]);
    assert_eq!(stored_text(&store, "d").await, editor.text());
    assert_eq!(
        store.meta("d").await.unwrap().unwrap().log_bytes,
        more.iter().map(|u| u.len() as u64).sum::<u64>()
    );
    let compacted = store.compact("d", &CompactionPolicy::default()).await.unwrap().unwrap();
    assert_eq!(compacted.snapshot_cursor, 23);
    assert_eq!(stored_text(&store, "d").await, editor.text());
}

async fn compaction_prunes_old_entries<F: Fixture>(fixture: &F) {
    let store = fixture.open().await;
    let editor = Editor::new(12);
    let updates: Vec<_> = (0..10).map(|i| editor.type_text(&i.to_string())).collect();
    append_each(&store, "p", &updates).await;

    let compacted = store.compact("p", &retaining(2)).await.unwrap().unwrap();
    assert_eq!((compacted.snapshot_cursor, compacted.deleted_entries), (10, 8));
    assert_eq!(store.meta("p").await.unwrap().unwrap().pruned_through, 8);
    assert_eq!(store.log_after("p", 0).await.unwrap(), LogTail::Pruned);
    assert_eq!(store.log_after("p", 7).await.unwrap(), LogTail::Pruned);
    let recent = entries(store.log_after("p", 8).await.unwrap());
    assert_eq!(
        recent,
        vec![
            LogEntry {
                cursor: 9,
                update: updates[8].clone()
            },
            LogEntry {
                cursor: 10,
                update: updates[9].clone()
            },
        ]
    );
    assert_eq!(entries(store.log_after("p", 10).await.unwrap()), vec![]);
    assert_eq!(entries(store.log_after("p", 11).await.unwrap()), vec![]);

    let more = [editor.type_text("a"), editor.type_text("b")];
    append_each(&store, "p", &more).await;
    assert_eq!(
        cursors(&entries(store.log_after("p", 8).await.unwrap())),
        [9, 10, 11, 12]
    );
    assert_eq!(
        store.meta("p").await.unwrap().unwrap().log_bytes,
        (more[0].len() + more[1].len()) as u64
    );
    let compacted = store.compact("p", &retaining(2)).await.unwrap().unwrap();
    assert_eq!((compacted.snapshot_cursor, compacted.deleted_entries), (12, 2));
    assert_eq!(store.log_after("p", 9).await.unwrap(), LogTail::Pruned);
    assert_eq!(cursors(&entries(store.log_after("p", 10).await.unwrap())), [11, 12]);
    assert_eq!(stored_text(&store, "p").await, editor.text());

    // Retaining nothing deletes every folded entry; retaining more than there is deletes none.
    append_each(&store, "p", &[editor.type_text("c")]).await;
    let compacted = store.compact("p", &retaining(0)).await.unwrap().unwrap();
    assert_eq!((compacted.snapshot_cursor, compacted.deleted_entries), (13, 3));
    assert_eq!(store.meta("p").await.unwrap().unwrap().pruned_through, 13);
    assert_eq!(entries(store.log_after("p", 13).await.unwrap()), vec![]);
    assert_eq!(store.log_after("p", 12).await.unwrap(), LogTail::Pruned);
    append_each(&store, "p", &[editor.type_text("d")]).await;
    let compacted = store.compact("p", &retaining(u64::MAX)).await.unwrap().unwrap();
    assert_eq!((compacted.snapshot_cursor, compacted.deleted_entries), (14, 0));
    assert_eq!(store.meta("p").await.unwrap().unwrap().pruned_through, 13);
    assert_eq!(stored_text(&store, "p").await, editor.text());
}

/// An update appended after the compactor read the log but before it wrote the snapshot keeps
/// its place in the log.
async fn append_during_compaction_survives<F: Fixture>(fixture: &F) {
    let store = fixture.open().await;
    let editor = Editor::new(13);
    let updates: Vec<_> = (0..3).map(|i| editor.type_text(&format!("<{i}>"))).collect();
    append_each(&store, "c", &updates).await;
    let late = editor.type_text("<late>");

    let pause = async {
        assert_eq!(
            store.append(&[append("c", &late)]).await.unwrap(),
            [Appended::Stored(4)]
        );
    };
    let compacted = store
        .compact_with_pause("c", &retaining(0), pause)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((compacted.snapshot_cursor, compacted.deleted_entries), (3, 3));

    let stored = store.load("c").await.unwrap().unwrap();
    assert_eq!((stored.snapshot_cursor, stored.head), (3, 4));
    assert_eq!(
        stored.tail,
        vec![LogEntry {
            cursor: 4,
            update: late.clone()
        }]
    );
    assert_eq!(store.meta("c").await.unwrap().unwrap().log_bytes, late.len() as u64);
    assert_eq!(stored_text(&store, "c").await, editor.text());
    assert_eq!(entries(store.log_after("c", 3).await.unwrap()), stored.tail);
}

/// Two compactors fold the same log; the one that writes second finds the snapshot moved and
/// gives up.
async fn competing_compactors_one_wins<F: Fixture>(fixture: &F) {
    let store = fixture.open().await;
    let editor = Editor::new(14);
    let updates: Vec<_> = (0..3).map(|i| editor.type_text(&format!("<{i}>"))).collect();
    append_each(&store, "c", &updates).await;

    let pause = async {
        let winner = store.compact("c", &retaining(1)).await.unwrap().unwrap();
        assert_eq!((winner.snapshot_cursor, winner.deleted_entries), (3, 2));
    };
    assert_eq!(store.compact_with_pause("c", &retaining(0), pause).await.unwrap(), None);
    let meta = store.meta("c").await.unwrap().unwrap();
    assert_eq!((meta.snapshot_cursor, meta.pruned_through, meta.log_bytes), (3, 2, 0));
    assert_eq!(stored_text(&store, "c").await, editor.text());
}

async fn concurrent_appends_and_compactions<F: Fixture>(fixture: &F) {
    let store = Arc::new(fixture.open().await);
    let editor = Editor::new(15);
    for i in 0..50 {
        let update = editor.type_text(&format!("<{i}>"));
        let appender = {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.append(&[append("r", &update)]).await })
        };
        let compactor = {
            let store = Arc::clone(&store);
            let retain = i % 4;
            tokio::spawn(async move { store.compact("r", &retaining(retain)).await })
        };
        let (appended, compacted) = tokio::join!(appender, compactor);
        assert_eq!(appended.unwrap().unwrap(), [Appended::Stored(i + 1)]);
        compacted.unwrap().unwrap();
    }
    let text = stored_text(&*store, "r").await;
    for i in 0..50 {
        assert!(text.contains(&format!("<{i}>")), "insert {i} is lost: {text}");
    }
    assert_eq!(text, editor.text());
    let stored = store.load("r").await.unwrap().unwrap();
    let meta = store.meta("r").await.unwrap().unwrap();
    assert_eq!(meta.head, 50);
    assert_eq!(
        meta.log_bytes,
        stored.tail.iter().map(|e| e.update.len() as u64).sum::<u64>()
    );
}

async fn corrupt_log_row_names_the_document<F: Fixture>(fixture: &F) {
    let store = fixture.open().await;
    let editor = Editor::new(16);
    let updates: Vec<_> = (0..3).map(|i| editor.type_text(&format!("<{i}>"))).collect();
    append_each(&store, "notes/1", &updates).await;
    append_each(&store, "notes/2", &updates).await;

    store
        .raw_insert_update("notes/1", 2, b"\xff\xfe definitely not an update")
        .await;
    let stored = store.load("notes/1").await.unwrap().unwrap();
    let error = load_document("notes/1", &stored, 5).unwrap_err();
    assert!(error.to_string().contains("log entry 2"), "{error}");
    assert_corrupt::<()>(Err(error), "notes/1");
    // Compaction refuses it too, and leaves the document as it was.
    assert_corrupt(store.compact("notes/1", &retaining(0)).await, "notes/1");
    let meta = store.meta("notes/1").await.unwrap().unwrap();
    assert_eq!((meta.snapshot_cursor, meta.pruned_through, meta.head), (0, 0, 3));
    // Other documents are unaffected.
    assert_eq!(stored_text(&store, "notes/2").await, editor.text());

    // A row past the head (or a hole in the log) is refused when loading.
    store.raw_insert_update("notes/2", 9, &updates[0]).await;
    assert_corrupt(store.load("notes/2").await, "notes/2");
    assert_corrupt(store.log_after("notes/2", 1).await, "notes/2");
}

async fn corrupt_counters_are_refused<F: Fixture>(fixture: &F) {
    let store = fixture.open().await;
    let editor = Editor::new(17);
    let updates: Vec<_> = (0..3).map(|i| editor.type_text(&format!("<{i}>"))).collect();
    append_each(&store, "n", &updates).await;

    store.raw_set_head("n", -1).await;
    assert_corrupt(store.meta("n").await, "n");
    assert_corrupt(store.load("n").await, "n");
    assert_corrupt(store.log_after("n", 0).await, "n");
    assert_corrupt(store.compact("n", &retaining(0)).await, "n");

    // A head short of the log.
    store.raw_set_head("n", 2).await;
    assert_corrupt(store.load("n").await, "n");
    store.raw_set_head("n", 3).await;
    assert_eq!(stored_text(&store, "n").await, editor.text());

    // A snapshot that went missing.
    store.compact("n", &retaining(0)).await.unwrap().unwrap();
    store.raw_set_snapshot("n", None).await;
    assert_corrupt(store.load("n").await, "n");
}

/// Random bytes in snapshots and log rows make loading and compacting fail with
/// [`Error::Corrupt`] or succeed, and never panic. `DRIFTSYNC_TEST_SEED` repeats a run.
async fn random_garbage_never_panics<F: Fixture>(fixture: &F) {
    let seed = std::env::var("DRIFTSYNC_TEST_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("random_garbage_never_panics: seed {seed} (set DRIFTSYNC_TEST_SEED={seed} to repeat)");
    let mut rng = StdRng::seed_from_u64(seed);
    let store = fixture.open().await;
    for round in 0..40 {
        let doc = format!("garbage/{round}");
        let editor = Editor::new(18);
        let updates: Vec<_> = (0..4).map(|i| editor.type_text(&format!("<{i}>"))).collect();
        append_each(&store, &doc, &updates[..2]).await;
        let snapshot = if rng.random_bool(0.5) {
            store.compact(&doc, &retaining(0)).await.unwrap();
            store.load(&doc).await.unwrap().unwrap().snapshot
        } else {
            None
        };
        append_each(&store, &doc, &updates[2..]).await;

        let garbage = |rng: &mut StdRng, valid: &[u8]| -> Vec<u8> {
            if rng.random_bool(0.5) {
                let mut bytes = vec![0u8; rng.random_range(0..48)];
                rng.fill(&mut bytes[..]);
                bytes
            } else {
                // A valid update with a few bytes changed and perhaps cut short: it gets past the
                // first checks of the decoder.
                let mut bytes = valid.to_vec();
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..bytes.len());
                    bytes[at] = rng.random();
                }
                bytes.truncate(rng.random_range(1..=bytes.len()));
                bytes
            }
        };
        if let Some(snapshot) = snapshot.filter(|_| rng.random_bool(0.5)) {
            let bytes = garbage(&mut rng, &snapshot);
            store.raw_set_snapshot(&doc, Some(&bytes)).await;
        }
        if rng.random_bool(0.7) {
            let seq = rng.random_range(3..=4);
            let bytes = garbage(&mut rng, &updates[seq as usize - 1]);
            store.raw_insert_update(&doc, seq, &bytes).await;
        }

        let stored = store.load(&doc).await.unwrap().unwrap();
        match load_document(&doc, &stored, 5) {
            Ok(_) => {}
            Err(error) => assert_corrupt::<()>(Err(error), &doc),
        }
        match store.compact(&doc, &retaining(1)).await {
            Ok(_) => {}
            Err(error) => assert_corrupt::<()>(Err(error), &doc),
        }
    }
}

async fn device_identity_is_stable<F: Fixture>(fixture: &F) {
    let store = fixture.open().await;
    // Concurrent first calls agree.
    let (first, second) = tokio::join!(store.device(), store.device());
    let device = first.unwrap();
    assert_eq!(second.unwrap(), device);
    assert!(
        device.client_id > 0 && device.client_id < MAX_CLIENT_ID,
        "{}",
        device.client_id
    );
    let uuid = uuid::Uuid::parse_str(&device.device_id).unwrap();
    assert_eq!(uuid.get_version_num(), 7);
    assert_eq!(store.device().await.unwrap(), device);
    assert_eq!(fixture.open().await.device().await.unwrap(), device);
}

async fn outbox_and_acknowledge<F: Fixture>(fixture: &F) {
    let store = fixture.open().await;
    let editor = Editor::new(19);
    let (u1, u2, v1) = (editor.type_text("1"), editor.type_text("2"), b"v1".to_vec());
    let b1 = store.record_local("a", &u1).await.unwrap();
    let b2 = store.record_local("b", &v1).await.unwrap();
    let b3 = store.record_local("a", &u2).await.unwrap();
    assert!(b1 < b2 && b2 < b3, "{b1} {b2} {b3}");
    let entry = |doc: &str, batch, update: &[u8]| OutboxEntry {
        doc: doc.into(),
        batch,
        update: update.to_vec(),
    };
    assert_eq!(
        store.outbox(None).await.unwrap(),
        [entry("a", b1, &u1), entry("b", b2, &v1), entry("a", b3, &u2)]
    );
    assert_eq!(
        store.outbox(Some("a")).await.unwrap(),
        [entry("a", b1, &u1), entry("a", b3, &u2)]
    );
    assert_eq!(store.outbox(Some("c")).await.unwrap(), Vec::<OutboxEntry>::new());
    // Local changes are in the document's log too.
    assert_eq!(cursors(&store.load("a").await.unwrap().unwrap().tail), [1, 2]);
    assert_eq!(stored_text(&store, "a").await, "12");

    store.acknowledge("a", b1).await.unwrap();
    assert_eq!(
        store.outbox(None).await.unwrap(),
        [entry("b", b2, &v1), entry("a", b3, &u2)]
    );
    // Acknowledging one document leaves the others' batches alone, however large the batch id.
    store.acknowledge("a", u64::MAX).await.unwrap();
    assert_eq!(store.outbox(None).await.unwrap(), [entry("b", b2, &v1)]);
    store.acknowledge("b", b2 - 1).await.unwrap();
    assert_eq!(store.outbox(None).await.unwrap(), [entry("b", b2, &v1)]);
    store.acknowledge("b", b2).await.unwrap();
    assert_eq!(store.outbox(None).await.unwrap(), Vec::<OutboxEntry>::new());
    // Batch ids keep increasing after the outbox emptied.
    let b4 = store.record_local("a", &editor.type_text("3")).await.unwrap();
    assert!(b4 > b3, "{b4} after {b3}");
}

async fn server_cursor_never_moves_backwards<F: Fixture>(fixture: &F) {
    let store = fixture.open().await;
    let editor = Editor::new(20);
    assert_eq!(store.server_cursor("a").await.unwrap(), 0);
    store
        .record_remote("a", 10, &[editor.type_text("x"), editor.type_text("y")])
        .await
        .unwrap();
    assert_eq!(store.server_cursor("a").await.unwrap(), 10);
    assert_eq!(cursors(&store.load("a").await.unwrap().unwrap().tail), [1, 2]);
    store.record_remote("a", 5, &[]).await.unwrap();
    assert_eq!(store.server_cursor("a").await.unwrap(), 10);
    store.record_remote("a", 12, &[editor.type_text("z")]).await.unwrap();
    assert_eq!(store.server_cursor("a").await.unwrap(), 12);
    assert_eq!(stored_text(&store, "a").await, "xyz");
    // Remote changes never enter the outbox.
    assert_eq!(store.outbox(None).await.unwrap(), Vec::<OutboxEntry>::new());
    // Cursors are per document.
    store.record_remote("b", 3, &[]).await.unwrap();
    assert_eq!(store.server_cursor("b").await.unwrap(), 3);
    assert_eq!(store.server_cursor("a").await.unwrap(), 12);
    // A cursor SQL cannot hold is refused, and nothing of the call is stored.
    assert!(matches!(
        store.record_remote("a", u64::MAX, &[b"u".to_vec()]).await,
        Err(Error::Invalid(_))
    ));
    assert_eq!(store.server_cursor("a").await.unwrap(), 12);
    assert_eq!(store.meta("a").await.unwrap().unwrap().head, 3);
}

async fn reopen_keeps_everything<F: Fixture>(fixture: &F) {
    let editor = Editor::new(21);
    let before = {
        let store = fixture.open().await;
        append_each(&store, "a", &[editor.type_text("one "), editor.type_text("two ")]).await;
        store.compact("a", &retaining(1)).await.unwrap().unwrap();
        store
            .append(&[pushed("a", 5, 9, &editor.type_text("three "))])
            .await
            .unwrap();
        store.record_local("b", b"local").await.unwrap();
        store.record_remote("a", 77, &[]).await.unwrap();
        (
            store.load("a").await.unwrap(),
            store.meta("a").await.unwrap(),
            store.outbox(None).await.unwrap(),
            store.server_cursor("a").await.unwrap(),
            store.device().await.unwrap(),
            store.documents().await.unwrap(),
        )
    };
    let store = fixture.open().await;
    let after = (
        store.load("a").await.unwrap(),
        store.meta("a").await.unwrap(),
        store.outbox(None).await.unwrap(),
        store.server_cursor("a").await.unwrap(),
        store.device().await.unwrap(),
        store.documents().await.unwrap(),
    );
    assert_eq!(after, before);
    assert_eq!(stored_text(&store, "a").await, editor.text());
    // Deduplication and cursors carry on where they were.
    assert_eq!(
        store.append(&[pushed("a", 5, 9, b"again")]).await.unwrap(),
        [Appended::Duplicate(3)]
    );
    assert_eq!(
        store.append(&[append("a", &editor.type_text("four"))]).await.unwrap(),
        [Appended::Stored(4)]
    );
}

// ----- backend-specific tests -----

#[tokio::test]
async fn sqlite_store_creates_the_file_in_wal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a").join("b").join("store.db");
    let store = SqliteStore::open(&path).await.unwrap();
    store.append(&[append("d", b"x")]).await.unwrap();
    assert!(path.is_file());
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite:{}", path.display()))
        .await
        .unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn sqlite_store_connects_by_url() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("by-url").join("store.db");
    let store = SqliteStore::connect(&format!("sqlite:{}", path.display()))
        .await
        .unwrap();
    store.append(&[append("d", b"x")]).await.unwrap();
    drop(store);
    let store = SqliteStore::open(&path).await.unwrap();
    assert_eq!(store.meta("d").await.unwrap().unwrap().head, 1);

    // Every connection of an in-memory pool must see the same database.
    let store = SqliteStore::connect("sqlite::memory:").await.unwrap();
    let (x, y) = ([append("d", b"x")], [append("d", b"y")]);
    let (a, b) = tokio::join!(store.append(&x), store.append(&y));
    a.unwrap();
    b.unwrap();
    assert_eq!(store.meta("d").await.unwrap().unwrap().head, 2);
}

/// An append whose caller goes away once it was handed to the SQLite write thread still commits
/// whole (a transaction is never left half done), and the next append comes after it.
#[tokio::test]
async fn sqlite_append_abandoned_by_its_caller_still_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("store.db")).await.unwrap();
    let first = [pushed("d", 7, 1, b"first")];
    {
        let mut append = std::pin::pin!(store.append(&first));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(append.as_mut().poll(&mut cx).is_pending());
    }
    let second = store.append(&[pushed("d", 7, 2, b"second")]).await.unwrap();
    assert_eq!(second, vec![Appended::Stored(2)]);
    let tail = entries(store.log_after("d", 0).await.unwrap());
    assert_eq!(
        tail.iter().map(|entry| entry.update.as_slice()).collect::<Vec<_>>(),
        [b"first".as_slice(), b"second".as_slice()]
    );
    // The abandoned batch was recorded as the client's: re-sending it is a duplicate.
    assert_eq!(store.append(&first).await.unwrap(), vec![Appended::Duplicate(2)]);
}

/// The SQLite write thread gives its page cache back after two idle seconds and parks until the
/// next job: appends after that pause, one alone and then twenty at once, are all woken for,
/// stored and answered.
#[tokio::test]
async fn sqlite_appends_after_the_writer_went_idle_are_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("store.db")).await.unwrap();
    assert_eq!(
        store.append(&[append("d", b"0")]).await.unwrap(),
        vec![Appended::Stored(1)]
    );
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    assert_eq!(
        store.append(&[append("d", b"1")]).await.unwrap(),
        vec![Appended::Stored(2)]
    );
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    let appends = (0..20u8).map(|i| {
        let store = store.clone();
        tokio::spawn(async move { store.append(&[append("e", &[i])]).await.unwrap() })
    });
    let mut cursors = Vec::new();
    for task in appends {
        match task.await.unwrap().as_slice() {
            [Appended::Stored(cursor)] => cursors.push(*cursor),
            other => panic!("unexpected answer {other:?}"),
        }
    }
    cursors.sort_unstable();
    assert_eq!(cursors, (1..=20).collect::<Vec<u64>>());
    assert_eq!(store.meta("d").await.unwrap().unwrap().head, 2);
}

/// Under a steady stream of appends the WAL starts over after each checkpoint instead of growing
/// for as long as the writes go on: a checkpoint beside the writer never reached the WAL's end,
/// and the server's WAL grew to 1.5 GB in half a minute of the throughput benchmark. Four
/// writers keep the write thread busy with 6,000 commits (about 70 MB of WAL frames); the file
/// must stay a small fraction of that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_wal_stays_bounded_under_a_steady_stream_of_appends() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = SqliteStore::open(&path).await.unwrap();
    let writers = (0..4u8).map(|w| {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..1_500u32 {
                let doc = format!("doc-{}", (i * 4 + u32::from(w)) % 50);
                let update = vec![w; 200];
                store.append(&[append(&doc, &update)]).await.unwrap();
            }
        })
    });
    for writer in writers {
        writer.await.unwrap();
    }
    let wal = std::fs::metadata(dir.path().join("store.db-wal")).unwrap().len();
    println!("WAL after 6,000 commits: {wal} bytes");
    assert!(wal <= 12 << 20, "the WAL grew to {wal} bytes");
    let mut heads = 0;
    for d in 0..50 {
        heads += store.meta(&format!("doc-{d}")).await.unwrap().unwrap().head;
    }
    assert_eq!(heads, 6_000);
}

/// A database opened read-only refuses appends (no write thread writes behind its back) and
/// still serves reads.
#[tokio::test]
async fn sqlite_store_opened_read_only_refuses_appends() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = SqliteStore::open(&path).await.unwrap();
    store.append(&[append("d", b"x")]).await.unwrap();
    drop(store);
    let store = SqliteStore::connect(&format!("sqlite:{}?mode=ro", path.display()))
        .await
        .unwrap();
    assert!(matches!(store.append(&[append("d", b"y")]).await, Err(Error::Store(_))));
    assert_eq!(store.meta("d").await.unwrap().unwrap().head, 1);
}

#[tokio::test]
async fn any_store_opens_by_url() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("any").join("store.db");
    let store = AnyStore::open(path.to_str().unwrap()).await.unwrap();
    assert!(matches!(store, AnyStore::Sqlite(_)));
    store.append(&[append("d", b"x")]).await.unwrap();
    drop(store);
    let store = AnyStore::open(&format!("sqlite:{}", path.display())).await.unwrap();
    assert_eq!(store.meta("d").await.unwrap().unwrap().head, 1);
    let store = AnyStore::open("sqlite::memory:").await.unwrap();
    assert_eq!(store.documents().await.unwrap(), Vec::<String>::new());

    for url in ["mysql://localhost/db", "", "https://example.com/db"] {
        assert!(
            matches!(AnyStore::open(url).await, Err(Error::UnsupportedUrl(u)) if u == url),
            "{url}"
        );
    }

    let Some(fixture) = PgFixture::new() else { return };
    // Create the schema, then reach it through a plain URL whose connections use it.
    drop(fixture.open().await);
    let separator = if fixture.url.contains('?') { '&' } else { '?' };
    let url = format!("{}{separator}options[search_path]={}", fixture.url, fixture.schema);
    let store = AnyStore::open(&url).await.unwrap();
    assert!(matches!(store, AnyStore::Postgres(_)));
    store.append(&[append("d", b"x")]).await.unwrap();
    assert_eq!(fixture.open().await.meta("d").await.unwrap().unwrap().head, 1);
}
