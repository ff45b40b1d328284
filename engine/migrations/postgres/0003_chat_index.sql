-- Server side: the chat index, from which a user's inbox is read (ARCHITECTURE.md, "Members
-- and the inbox"). Written by the transaction that stores each update to a chat room, from
-- what the server's chat guard found in it (engine::chat::ChatFacts), so it never disagrees
-- with the log.

-- The index's version: raised by every transaction that changes the index (which on
-- PostgreSQL also serialises those transactions' commits, so versions are in commit order).
-- Each changed row records the version it changed at; "what changed since version v" is then
-- exact.
CREATE TABLE chat_version (
    id      BIGINT PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL
);
INSERT INTO chat_version (id, version) VALUES (1, 0);

-- Who joined (1) or left (0) each room, and when (the member's clock).
CREATE TABLE chat_members (
    room    TEXT NOT NULL,
    user_id TEXT NOT NULL,
    joined  BIGINT NOT NULL,
    at      BIGINT NOT NULL,
    changed BIGINT NOT NULL,
    PRIMARY KEY (room, user_id)
);
CREATE INDEX chat_members_user ON chat_members (user_id, room);

-- Each room's last message (greatest sort key).
CREATE TABLE chat_rooms (
    room         TEXT PRIMARY KEY,
    last_sort    TEXT COLLATE "C" NOT NULL,
    last_id      TEXT NOT NULL,
    last_author  TEXT NOT NULL,
    last_kind    TEXT NOT NULL,
    last_text    TEXT NOT NULL,
    last_deleted BIGINT NOT NULL,
    last_at      BIGINT NOT NULL,
    changed      BIGINT NOT NULL
);

-- Sort keys compare byte by byte, as everywhere else (COLLATE "C").
-- Every message, for unread counts: counted = 0 for deleted and system messages.
CREATE TABLE chat_messages (
    room    TEXT NOT NULL,
    sort    TEXT COLLATE "C" NOT NULL,
    author  TEXT NOT NULL,
    counted BIGINT NOT NULL,
    PRIMARY KEY (room, sort)
);

-- Each user's read receipt per room (the greatest over their devices).
CREATE TABLE chat_reads (
    room    TEXT NOT NULL,
    user_id TEXT NOT NULL,
    sort    TEXT COLLATE "C" NOT NULL,
    changed BIGINT NOT NULL,
    PRIMARY KEY (room, user_id)
);

-- When each user was last connected (milliseconds since the Unix epoch, the server's clock):
-- "last seen", shown to the members of their rooms.
CREATE TABLE user_seen (
    user_id TEXT PRIMARY KEY,
    at      BIGINT NOT NULL
);
