//! The SQLite backend's hot writes as rusqlite code, each one transaction: delivery cursors and plugin key-value flushes on the sqlx writer's raw handle, journaled message batches on the journal applier's connection.
//!
//! sqlx runs every statement on its connection's worker thread, and on this kind of machine
//! each hand-off (a futex wake and an eventfd write, both ways) costs more than the SQLite
//! work of a small batch. So these writes take the writer once, with one hand-off, and then
//! run every statement here, prepared once per transaction and executed per row.

use std::sync::Arc;

use bytes::Bytes;
use foldhash::{HashMap, HashMapExt};
use rusqlite::{Connection, OptionalExtension, params};

use crate::{DeliveryCursor, KvRecord, StoreError, StoreResult, StoredMessage};

fn backend(err: rusqlite::Error) -> StoreError {
    StoreError::Backend(err.to_string())
}

/// A row of `MESSAGE_COLUMNS`, in their order.
pub(super) fn stored_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredMessage> {
    Ok(StoredMessage {
        conversation_id: row.get(0)?,
        seq: row.get::<_, i64>(1)? as u64,
        server_msg_id: row.get(2)?,
        sender_id: row.get(3)?,
        sender_device_id: row.get(4)?,
        recipient_id: row.get(5)?,
        client_msg_id: row.get(6)?,
        body: Bytes::from(row.get::<_, Vec<u8>>(7)?),
        content_type: row.get(8)?,
        server_time_ms: row.get(9)?,
    })
}

/// Runs `work` in one `BEGIN IMMEDIATE` transaction and commits it; rolls back on error.
fn in_transaction<T>(
    db: &Connection,
    work: impl FnOnce(&Connection) -> StoreResult<T>,
) -> StoreResult<T> {
    db.execute_batch("BEGIN IMMEDIATE").map_err(backend)?;
    match work(db) {
        Ok(outcomes) => {
            db.execute_batch("COMMIT").map_err(backend)?;
            Ok(outcomes)
        }
        Err(err) => {
            if let Err(rollback) = db.execute_batch("ROLLBACK") {
                tracing::warn!(error = %rollback, "rollback of a failed write failed");
            }
            Err(err)
        }
    }
}

/// Moves delivery cursors forward (never backwards), all in one transaction.
pub(super) fn store_cursors(db: &Connection, cursors: &[DeliveryCursor]) -> StoreResult<()> {
    in_transaction(db, |db| {
        let mut upsert = db
            .prepare(
                "INSERT INTO device_cursors (user_id, device_id, conversation_id, delivered_seq) \
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (user_id, device_id, conversation_id) \
                 DO UPDATE SET delivered_seq = MAX(delivered_seq, excluded.delivered_seq)",
            )
            .map_err(backend)?;
        for cursor in cursors {
            upsert
                .execute(params![
                    cursor.user_id,
                    cursor.device_id,
                    cursor.conversation_id,
                    cursor.seq.min(i64::MAX as u64) as i64,
                ])
                .map_err(backend)?;
        }
        Ok(())
    })
}

/// Applies one flush of a plugin's key-value changes in one transaction.
pub(super) fn store_plugin_kv(
    db: &Connection,
    plugin_id: &str,
    upserts: &[KvRecord],
    deletes: &[String],
) -> StoreResult<()> {
    in_transaction(db, |db| {
        let mut upsert = db
            .prepare(
                "INSERT INTO plugin_kv (plugin_id, key, value, expires_at_ms) \
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (plugin_id, key) DO UPDATE \
                 SET value = excluded.value, expires_at_ms = excluded.expires_at_ms",
            )
            .map_err(backend)?;
        for record in upserts {
            upsert
                .execute(params![
                    plugin_id,
                    record.key,
                    record.value,
                    record.expires_at_ms
                ])
                .map_err(backend)?;
        }
        let mut delete = db
            .prepare("DELETE FROM plugin_kv WHERE plugin_id = ?1 AND key = ?2")
            .map_err(backend)?;
        for key in deletes {
            delete.execute(params![plugin_id, key]).map_err(backend)?;
        }
        Ok(())
    })
}

/// In a commit of at most [`YIELD_MAX_BATCH`] messages, the applier offers its cpu to
/// waiting threads after every this many messages.
const YIELD_EVERY: usize = 8;

/// The largest commit that yields. A commit at 10,000 messages/s (about 100 messages at the
/// 10 ms apply interval) took one of this machine's two cores for 0.4-0.7 ms, and the round
/// trips in flight waited for it: those sent just before a commit took 790-920 µs at the
/// median instead of 270-280 (`im-bench --rtt-samples` lined up with a log of the commits;
/// docs/benchmarks.md, 2026-12-05 afternoon).
/// Yielding removes that wait. Larger commits mean a load near what the applier can keep up
/// with; yielding there let it fall behind (p99 ack 18-26 ms instead of 9-10 ms at 50,000
/// durable messages/s), so they run through. The yields happen inside the transaction, so
/// they also lengthen how long the write lock is held: writes through sqlx (delivery
/// cursors, plugin KV, users, group changes, read marks) wait that much longer, none of them
/// on a message's way to its recipient.
const YIELD_MAX_BATCH: usize = 256;

/// Writes messages whose seqs the journal assigned, in one transaction: their rows, their
/// conversations' last seqs, a new 1:1 conversation's two members, and each sender's read
/// cursor (a sender has read its own message). A message at or below its conversation's
/// stored last seq is already here (a replay after a crash) and is skipped. Returns how many
/// were written.
pub(super) fn persist_sequenced(
    db: &Connection,
    batch: &[Arc<StoredMessage>],
) -> StoreResult<usize> {
    in_transaction(db, |db| persist_in_transaction(db, batch))
}

fn persist_in_transaction(db: &Connection, batch: &[Arc<StoredMessage>]) -> StoreResult<usize> {
    let mut find_last_seq = db
        .prepare_cached("SELECT last_seq FROM conversations WHERE conversation_id = ?1")
        .map_err(backend)?;
    let mut insert = db
        .prepare_cached(
            "INSERT INTO messages (conversation_id, seq, server_msg_id, sender_id, \
             sender_device_id, recipient_id, client_msg_id, body, content_type, server_time_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )
        .map_err(backend)?;
    // Per conversation: its stored last seq, and its last seq and time after this batch.
    let mut conversations: HashMap<&str, (i64, i64, i64)> = HashMap::new();
    // Per (sender, conversation): the highest seq the sender wrote.
    let mut read_cursors: HashMap<(&str, &str), i64> = HashMap::new();
    let mut opened: Vec<&StoredMessage> = Vec::new();
    let mut written = 0;
    let yields = batch.len() <= YIELD_MAX_BATCH;
    for msg in batch {
        let seq = msg.seq.min(i64::MAX as u64) as i64;
        let conversation = match conversations.get_mut(msg.conversation_id.as_str()) {
            Some(entry) => entry,
            None => {
                let stored: i64 = find_last_seq
                    .query_row(params![msg.conversation_id], |row| row.get(0))
                    .optional()
                    .map_err(backend)?
                    .unwrap_or(0);
                conversations
                    .entry(msg.conversation_id.as_str())
                    .or_insert((stored, stored, 0))
            }
        };
        if seq <= conversation.0 {
            continue;
        }
        // The journal assigns seqs one after another, so a gap or a repeat is a bug; the
        // table's index does not catch a repeat by another sender (it holds the sender too).
        if seq != conversation.1 + 1 {
            return Err(StoreError::Backend(format!(
                "seq {seq} of {} does not follow {}; nothing of this batch is written",
                msg.conversation_id, conversation.1
            )));
        }
        conversation.1 = seq;
        conversation.2 = msg.server_time_ms;
        insert
            .execute(params![
                msg.conversation_id,
                seq,
                msg.server_msg_id,
                msg.sender_id,
                msg.sender_device_id,
                msg.recipient_id,
                msg.client_msg_id,
                msg.body.as_ref(),
                msg.content_type,
                msg.server_time_ms,
            ])
            .map_err(backend)?;
        written += 1;
        if yields && written % YIELD_EVERY == 0 {
            std::thread::yield_now();
        }
        if seq == 1 && !super::is_group_conversation(&msg.conversation_id) {
            opened.push(msg);
        }
        let cursor = read_cursors
            .entry((msg.sender_id.as_str(), msg.conversation_id.as_str()))
            .or_insert(0);
        *cursor = (*cursor).max(seq);
    }
    if written == 0 {
        return Ok(0);
    }
    let mut upsert = db
        .prepare_cached(
            "INSERT INTO conversations (conversation_id, last_seq, last_time_ms) VALUES (?1, ?2, ?3) \
             ON CONFLICT (conversation_id) DO UPDATE \
             SET last_seq = excluded.last_seq, last_time_ms = excluded.last_time_ms",
        )
        .map_err(backend)?;
    for (id, (stored, last_seq, time_ms)) in &conversations {
        if last_seq > stored {
            upsert
                .execute(params![id, last_seq, time_ms])
                .map_err(backend)?;
        }
    }
    // A 1:1 conversation's two members come with its first message.
    if !opened.is_empty() {
        let mut member = db
            .prepare_cached(
                "INSERT INTO conversation_members (user_id, conversation_id, peer_id) \
                 VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
            )
            .map_err(backend)?;
        for msg in opened {
            member
                .execute(params![
                    msg.sender_id,
                    msg.conversation_id,
                    msg.recipient_id
                ])
                .map_err(backend)?;
            member
                .execute(params![
                    msg.recipient_id,
                    msg.conversation_id,
                    msg.sender_id
                ])
                .map_err(backend)?;
        }
    }
    // Only existing members move (an operator's sender to a group is not one).
    let mut advance = db
        .prepare_cached(
            "UPDATE conversation_members SET read_seq = MAX(read_seq, ?1) \
             WHERE user_id = ?2 AND conversation_id = ?3",
        )
        .map_err(backend)?;
    for ((user, conversation), seq) in &read_cursors {
        advance
            .execute(params![seq, user, conversation])
            .map_err(backend)?;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_whose_seqs_do_not_follow_on_is_refused_whole() {
        let (_dir, path, store) = crate::sqlite::tests::open_temp().await;
        store.close().await;
        let db = Connection::open(&path).unwrap();
        let sent = crate::conformance::direct_batch("ann", "bob", "gap", 3);
        let count = |db: &Connection| -> i64 {
            db.query_row("SELECT COUNT(*) FROM messages", [], |row| row.get(0))
                .unwrap()
        };
        let gap = [Arc::new(sent[0].stored(1)), Arc::new(sent[1].stored(3))];
        assert!(persist_sequenced(&db, &gap).is_err());
        assert_eq!(count(&db), 0);
        let repeat = [Arc::new(sent[0].stored(1)), Arc::new(sent[1].stored(1))];
        assert!(persist_sequenced(&db, &repeat).is_err());
        assert_eq!(count(&db), 0);
        let in_order = [Arc::new(sent[0].stored(1)), Arc::new(sent[1].stored(2))];
        assert_eq!(persist_sequenced(&db, &in_order).unwrap(), 2);
        // Replayed after a crash: what is stored already is skipped, the rest follows on.
        let replayed = [Arc::new(sent[1].stored(2)), Arc::new(sent[2].stored(3))];
        assert_eq!(persist_sequenced(&db, &replayed).unwrap(), 1);
        assert_eq!(count(&db), 3);
    }
}
