-- Server and client share this schema; a client store also uses device, outbox and sync_state.
CREATE TABLE documents (
    doc             TEXT PRIMARY KEY,
    -- Last cursor assigned to an update of this document (incremented inside the append
    -- transaction with UPDATE ... RETURNING, whose row lock serialises appends to one document
    -- across server instances, so cursors are gap-free and increase in commit order).
    head            BIGINT NOT NULL DEFAULT 0,
    -- yrs v1 update holding the state up to snapshot_cursor (NULL before the first compaction).
    snapshot        BYTEA,
    snapshot_cursor BIGINT NOT NULL DEFAULT 0,
    -- v1 state vector of the snapshot.
    snapshot_sv     BYTEA,
    -- Log entries up to this cursor were deleted by compaction.
    pruned_through  BIGINT NOT NULL DEFAULT 0,
    -- Total bytes of the log entries after snapshot_cursor.
    log_bytes       BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE updates (
    doc    TEXT NOT NULL,
    seq    BIGINT NOT NULL,
    data   BYTEA NOT NULL,
    PRIMARY KEY (doc, seq)
);

-- The latest batch each client pushed to each document: a re-sent batch (id <= last_batch) is
-- a duplicate.
CREATE TABLE client_batches (
    doc        TEXT NOT NULL,
    client_id  BIGINT NOT NULL,
    last_batch BIGINT NOT NULL,
    last_seq   BIGINT NOT NULL,
    PRIMARY KEY (doc, client_id)
);

-- Client side: this store's identity (one row).
CREATE TABLE device (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    client_id BIGINT NOT NULL,
    device_id TEXT NOT NULL
);

-- Client side: local changes not yet acknowledged by the server.
CREATE TABLE outbox (
    batch BIGSERIAL PRIMARY KEY,
    doc   TEXT NOT NULL,
    data  BYTEA NOT NULL
);
CREATE INDEX outbox_doc ON outbox (doc, batch);

-- Client side: the last server cursor seen per document.
CREATE TABLE sync_state (
    doc    TEXT PRIMARY KEY,
    cursor BIGINT NOT NULL
);
