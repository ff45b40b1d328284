-- Server side: the chat index, from which a user's inbox is read (ARCHITECTURE.md, "Members
-- and the inbox"). Written by the transaction that stores each update to a chat room, from
-- what the server's chat guard found in it (engine::chat::ChatFacts), so it never disagrees
-- with the log.

-- The index's version: raised by every transaction that changes the index (which on
-- PostgreSQL also serialises those transactions' commits, so versions are in commit order).
-- Each changed row records the version it changed at; "what changed since version v" is then
-- exact.
CREATE TABLE chat_version (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT INTO chat_version (id, version) VALUES (1, 0);

-- Who joined (1) or left (0) each room, and when (the member's clock).
CREATE TABLE chat_members (
    room    TEXT NOT NULL,
    user_id TEXT NOT NULL,
    joined  INTEGER NOT NULL,
    at      INTEGER NOT NULL,
    changed INTEGER NOT NULL,
    PRIMARY KEY (room, user_id)
) WITHOUT ROWID;
CREATE INDEX chat_members_user ON chat_members (user_id, room);

-- Each room's last message (greatest sort key).
CREATE TABLE chat_rooms (
    room         TEXT PRIMARY KEY NOT NULL,
    last_sort    TEXT NOT NULL,
    last_id      TEXT NOT NULL,
    last_author  TEXT NOT NULL,
    last_kind    TEXT NOT NULL,
    last_text    TEXT NOT NULL,
    last_deleted INTEGER NOT NULL,
    last_at      INTEGER NOT NULL,
    changed      INTEGER NOT NULL
);

-- Every message, for unread counts: counted = 0 for deleted and system messages.
CREATE TABLE chat_messages (
    room    TEXT NOT NULL,
    sort    TEXT NOT NULL,
    author  TEXT NOT NULL,
    counted INTEGER NOT NULL,
    PRIMARY KEY (room, sort)
) WITHOUT ROWID;

-- Each user's read receipt per room (the greatest over their devices).
CREATE TABLE chat_reads (
    room    TEXT NOT NULL,
    user_id TEXT NOT NULL,
    sort    TEXT NOT NULL,
    changed INTEGER NOT NULL,
    PRIMARY KEY (room, user_id)
) WITHOUT ROWID;

-- When each user was last connected (milliseconds since the Unix epoch, the server's clock):
-- "last seen", shown to the members of their rooms.
CREATE TABLE user_seen (
    user_id TEXT PRIMARY KEY NOT NULL,
    at      INTEGER NOT NULL
);
