-- Messages are stored in arrival order (a rowid table) with an index by (conversation_id,
-- seq), instead of in a table clustered by (conversation_id, seq). A batch of
-- messages to many conversations then appends its rows to the table's last pages instead
-- of inserting each into its conversation's page of a tree of whole rows (which split
-- often, and each split rewrites pages): with 1,000 conversations the journal's applier
-- wrote less than half the WAL frames and applied about twice as many messages a second
-- (docs/benchmarks.md, 2026-12-06, late). Reading a page of a conversation's messages takes
-- about twice as long, through the index.
CREATE TABLE messages_in_arrival_order (
    conversation_id  TEXT NOT NULL,
    seq              INTEGER NOT NULL,
    server_msg_id    TEXT NOT NULL,
    sender_id        TEXT NOT NULL,
    sender_device_id TEXT NOT NULL,
    recipient_id     TEXT NOT NULL,
    client_msg_id    TEXT NOT NULL,
    body             BLOB NOT NULL,
    content_type     TEXT NOT NULL,
    server_time_ms   INTEGER NOT NULL
);

-- In the old table's order, by conversation: no sort, and a conversation's old messages
-- stay together.
INSERT INTO messages_in_arrival_order (conversation_id, seq, server_msg_id, sender_id,
    sender_device_id, recipient_id, client_msg_id, body, content_type, server_time_ms)
SELECT conversation_id, seq, server_msg_id, sender_id, sender_device_id, recipient_id,
    client_msg_id, body, content_type, server_time_ms
FROM messages;

-- Also drops messages_by_client_id, created again below.
DROP TABLE messages;
ALTER TABLE messages_in_arrival_order RENAME TO messages;

-- A conversation's messages by seq: history and sync. The sender rides along so that
-- unread counts (messages after the read cursor not sent by the reader) read only the
-- index. (conversation_id, seq) alone is unique too: the journal assigns each seq once.
CREATE UNIQUE INDEX messages_by_seq ON messages (conversation_id, seq, sender_id);

-- The idempotency key: a sender's client message id is stored once.
CREATE UNIQUE INDEX messages_by_client_id ON messages (sender_id, client_msg_id);
