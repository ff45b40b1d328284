-- Server and client share this schema; a client store also uses device, outbox and sync_state.
CREATE TABLE documents (
    doc             TEXT PRIMARY KEY NOT NULL,
    -- Last cursor assigned to an update of this document (incremented inside the append
    -- transaction, which serialises appends to one document).
    head            INTEGER NOT NULL DEFAULT 0,
    -- yrs v1 update holding the state up to snapshot_cursor (NULL before the first compaction).
    snapshot        BLOB,
    snapshot_cursor INTEGER NOT NULL DEFAULT 0,
    -- v1 state vector of the snapshot.
    snapshot_sv     BLOB,
    -- Log entries up to this cursor were deleted by compaction.
    pruned_through  INTEGER NOT NULL DEFAULT 0,
    -- Total bytes of the log entries after snapshot_cursor.
    log_bytes       INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE updates (
    doc    TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    data   BLOB NOT NULL,
    PRIMARY KEY (doc, seq)
) WITHOUT ROWID;

-- The latest batch each client pushed to each document: a re-sent batch (id <= last_batch) is
-- a duplicate. One row per (document, client), so it stays small.
CREATE TABLE client_batches (
    doc        TEXT NOT NULL,
    client_id  INTEGER NOT NULL,
    last_batch INTEGER NOT NULL,
    last_seq   INTEGER NOT NULL,
    PRIMARY KEY (doc, client_id)
) WITHOUT ROWID;

-- Client side: this store's identity (one row).
CREATE TABLE device (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    client_id INTEGER NOT NULL,
    device_id TEXT NOT NULL
);

-- Client side: local changes not yet acknowledged by the server. batch is the push's batch id.
CREATE TABLE outbox (
    batch INTEGER PRIMARY KEY AUTOINCREMENT,
    doc   TEXT NOT NULL,
    data  BLOB NOT NULL
);
CREATE INDEX outbox_doc ON outbox (doc, batch);

-- Client side: the last server cursor seen per document.
CREATE TABLE sync_state (
    doc    TEXT PRIMARY KEY NOT NULL,
    cursor INTEGER NOT NULL
);
