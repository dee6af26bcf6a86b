-- Users known to the node: created on first successful login.
CREATE TABLE users (
    user_id    TEXT PRIMARY KEY NOT NULL,
    created_ms INTEGER NOT NULL
) WITHOUT ROWID;

-- One row per conversation: its last assigned seq (the gapless counter) and activity time.
CREATE TABLE conversations (
    conversation_id TEXT PRIMARY KEY NOT NULL,
    last_seq        INTEGER NOT NULL,
    last_time_ms    INTEGER NOT NULL
) WITHOUT ROWID;

-- Which users take part in a conversation, with each user's read cursor.
CREATE TABLE conversation_members (
    user_id         TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    peer_id         TEXT NOT NULL,
    read_seq        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, conversation_id)
) WITHOUT ROWID;

-- Messages, stored once per conversation, keyed by (conversation, seq).
CREATE TABLE messages (
    conversation_id  TEXT NOT NULL,
    seq              INTEGER NOT NULL,
    server_msg_id    TEXT NOT NULL,
    sender_id        TEXT NOT NULL,
    sender_device_id TEXT NOT NULL,
    recipient_id     TEXT NOT NULL,
    client_msg_id    TEXT NOT NULL,
    body             BLOB NOT NULL,
    content_type     TEXT NOT NULL,
    server_time_ms   INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, seq)
) WITHOUT ROWID;

-- The idempotency key: a sender's client message id is stored once.
CREATE UNIQUE INDEX messages_by_client_id ON messages (sender_id, client_msg_id);

-- Per-device delivery cursors, advanced by DeliverAck.
CREATE TABLE device_cursors (
    user_id         TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    delivered_seq   INTEGER NOT NULL,
    PRIMARY KEY (user_id, device_id, conversation_id)
) WITHOUT ROWID;
