-- The chat history store in SQLite, schema version 1. Ids, ts and read positions are INTEGER
-- (64-bit); a conversation's key is 'r:{room}' or 'd:{a}:{b}' with a < b.

CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;

-- Bumped on every direct message: orders the inbox, even within one millisecond.
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO counters (name, value) VALUES ('appends', 0);

-- Each conversation's newest id: the next append takes last_id + 1.
CREATE TABLE conversations (
    key TEXT PRIMARY KEY,
    last_id INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE messages (
    conversation TEXT NOT NULL,
    id INTEGER NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT,
    body TEXT NOT NULL,
    ts INTEGER NOT NULL,
    PRIMARY KEY (conversation, id)
) WITHOUT ROWID;
CREATE INDEX messages_by_ts ON messages (ts);

-- Retries: the first message stored under each (conversation, sender, ref), in the order they
-- were stored. Only ever appended to (and trimmed from the front), so writing it costs no random
-- page writes: the writer looks refs up in memory, loaded from here when the store opens.
CREATE TABLE ref_log (
    seq INTEGER PRIMARY KEY,
    conversation TEXT NOT NULL,
    sender TEXT NOT NULL,
    ref TEXT NOT NULL,
    id INTEGER NOT NULL,
    ts INTEGER NOT NULL
);

CREATE TABLE reads (
    reader TEXT NOT NULL,
    conversation TEXT NOT NULL,
    id INTEGER NOT NULL,
    PRIMARY KEY (reader, conversation)
) WITHOUT ROWID;

-- Each user's direct conversations, for the inbox.
CREATE TABLE partners (
    owner TEXT NOT NULL,
    partner TEXT NOT NULL,
    conversation TEXT NOT NULL,
    recency INTEGER NOT NULL,
    PRIMARY KEY (owner, partner)
) WITHOUT ROWID;
