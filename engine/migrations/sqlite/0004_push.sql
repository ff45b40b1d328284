-- Server side: chat notifications owed to members who are offline (`serve --push-webhook-url`).
-- One row per room and member, written in the same transaction as the message that makes it
-- due (see ARCHITECTURE.md, "Push notifications"); a burst of messages coalesces into it.
-- `first_id` (the first message it covers) names the notification, so its webhook id stays the
-- same across retries; `version` changes with every message coalesced into it. `state`: 0 due
-- (or waiting for its next attempt), 1 dead letter. A delivered notification is deleted.
CREATE TABLE push_due (
    room          TEXT NOT NULL,
    user_id       TEXT NOT NULL,
    first_id      TEXT NOT NULL,
    unread        BIGINT NOT NULL,
    latest_id     TEXT NOT NULL,
    latest_sender TEXT NOT NULL,
    latest_text   TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    due_at        BIGINT NOT NULL,
    attempts      BIGINT NOT NULL DEFAULT 0,
    lease_until   BIGINT NOT NULL DEFAULT 0,
    state         INTEGER NOT NULL DEFAULT 0,
    version       BIGINT NOT NULL,
    last_error    TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (room, user_id)
);
CREATE INDEX push_due_next ON push_due (state, due_at);
CREATE INDEX push_due_user ON push_due (user_id);
-- Users whose webhook answered 410 Gone: nothing is owed to them until they connect again.
CREATE TABLE push_stopped (
    user_id TEXT PRIMARY KEY NOT NULL,
    at      BIGINT NOT NULL
);
