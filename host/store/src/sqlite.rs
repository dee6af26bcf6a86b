//! The embedded SQLite backend: one writer connection (SQLite has one writer), a small reader pool, WAL.
//!
//! Durability: WAL with `synchronous=NORMAL` survives a crash or SIGKILL of the server
//! process (a commit is in the OS page cache when it returns); `synchronous=FULL`
//! (`SqliteOptions::fsync_each_commit`) also survives power loss at one fsync per batch.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};

use crate::{
    Appended, ConversationSummary, KvRecord, ListPosition, NewMessage, ReadState, Store,
    StoreError, StoreResult, StoredMessage,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Tuning of the SQLite backend.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// fsync every commit (power-loss durable) instead of relying on the OS page cache.
    pub fsync_each_commit: bool,
    /// Connections used for reads.
    pub reader_connections: u32,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            fsync_each_commit: false,
            reader_connections: 4,
        }
    }
}

/// The SQLite [`Store`].
#[derive(Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    readers: SqlitePool,
}

fn backend(err: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(err.to_string())
}

const MESSAGE_COLUMNS: &str = "conversation_id, seq, server_msg_id, sender_id, sender_device_id, \
     recipient_id, client_msg_id, body, content_type, server_time_ms";

fn message_from_row(row: &SqliteRow) -> StoredMessage {
    StoredMessage {
        conversation_id: row.get("conversation_id"),
        seq: row.get::<i64, _>("seq") as u64,
        server_msg_id: row.get("server_msg_id"),
        sender_id: row.get("sender_id"),
        sender_device_id: row.get("sender_device_id"),
        recipient_id: row.get("recipient_id"),
        client_msg_id: row.get("client_msg_id"),
        body: Bytes::from(row.get::<Vec<u8>, _>("body")),
        content_type: row.get("content_type"),
        server_time_ms: row.get("server_time_ms"),
    }
}

fn clamp_limit(limit: u32) -> i64 {
    i64::from(limit.max(1))
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path` and applies migrations.
    pub async fn open(path: &Path, options: SqliteOptions) -> StoreResult<Self> {
        let connect = SqliteConnectOptions::from_str("sqlite://")
            .map_err(backend)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(if options.fsync_each_commit {
                SqliteSynchronous::Full
            } else {
                SqliteSynchronous::Normal
            })
            .busy_timeout(Duration::from_secs(10))
            .pragma("cache_size", "-16000")
            .statement_cache_capacity(64);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .connect_with(connect.clone())
            .await
            .map_err(backend)?;
        MIGRATOR.run(&writer).await.map_err(backend)?;
        let readers = SqlitePoolOptions::new()
            .max_connections(options.reader_connections.max(1))
            .connect_with(connect.read_only(true))
            .await
            .map_err(backend)?;
        Ok(Self { writer, readers })
    }

    /// Closes all connections, checkpointing the WAL.
    pub async fn close(&self) {
        self.readers.close().await;
        self.writer.close().await;
    }
}

async fn unread_count(
    conn: &mut sqlx::SqliteConnection,
    user_id: &str,
    conversation_id: &str,
    read_seq: u64,
) -> StoreResult<u64> {
    let count: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM messages WHERE conversation_id = ? AND seq > ? AND sender_id <> ?",
    )
    .bind(conversation_id)
    .bind(read_seq as i64)
    .bind(user_id)
    .fetch_one(&mut *conn)
    .await
    .map_err(backend)?;
    Ok(count as u64)
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn upsert_user(&self, user_id: &str, now_ms: i64) -> StoreResult<()> {
        sqlx::query("INSERT INTO users (user_id, created_ms) VALUES (?, ?) ON CONFLICT DO NOTHING")
            .bind(user_id)
            .bind(now_ms)
            .execute(&self.writer)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn user_exists(&self, user_id: &str) -> StoreResult<bool> {
        let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM users WHERE user_id = ?")
            .bind(user_id)
            .fetch_optional(&self.readers)
            .await
            .map_err(backend)?;
        Ok(found.is_some())
    }

    async fn append_messages(&self, batch: &[NewMessage]) -> StoreResult<Vec<Appended>> {
        let mut tx = self.writer.begin().await.map_err(backend)?;
        let mut outcomes = Vec::with_capacity(batch.len());
        let select_original = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE sender_id = ? AND client_msg_id = ?"
        );
        for msg in batch {
            let original = sqlx::query(&select_original)
                .bind(&msg.sender_id)
                .bind(&msg.client_msg_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(backend)?;
            if let Some(row) = original {
                outcomes.push(Appended::Duplicate(message_from_row(&row)));
                continue;
            }
            let seq: i64 = sqlx::query_scalar(
                "INSERT INTO conversations (conversation_id, last_seq, last_time_ms) VALUES (?, 1, ?) \
                 ON CONFLICT (conversation_id) DO UPDATE \
                 SET last_seq = last_seq + 1, last_time_ms = excluded.last_time_ms \
                 RETURNING last_seq",
            )
            .bind(&msg.conversation_id)
            .bind(msg.server_time_ms)
            .fetch_one(&mut *tx)
            .await
            .map_err(backend)?;
            sqlx::query(
                "INSERT INTO messages (conversation_id, seq, server_msg_id, sender_id, sender_device_id, \
                 recipient_id, client_msg_id, body, content_type, server_time_ms) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&msg.conversation_id)
            .bind(seq)
            .bind(&msg.server_msg_id)
            .bind(&msg.sender_id)
            .bind(&msg.sender_device_id)
            .bind(&msg.recipient_id)
            .bind(&msg.client_msg_id)
            .bind(msg.body.as_ref())
            .bind(&msg.content_type)
            .bind(msg.server_time_ms)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
            if seq == 1 {
                sqlx::query(
                    "INSERT INTO conversation_members (user_id, conversation_id, peer_id) \
                     VALUES (?, ?, ?), (?, ?, ?) ON CONFLICT DO NOTHING",
                )
                .bind(&msg.sender_id)
                .bind(&msg.conversation_id)
                .bind(&msg.recipient_id)
                .bind(&msg.recipient_id)
                .bind(&msg.conversation_id)
                .bind(&msg.sender_id)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
            }
            sqlx::query(
                "UPDATE conversation_members SET read_seq = MAX(read_seq, ?) \
                 WHERE user_id = ? AND conversation_id = ?",
            )
            .bind(seq)
            .bind(&msg.sender_id)
            .bind(&msg.conversation_id)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
            outcomes.push(Appended::New(StoredMessage {
                conversation_id: msg.conversation_id.clone(),
                seq: seq as u64,
                server_msg_id: msg.server_msg_id.clone(),
                sender_id: msg.sender_id.clone(),
                sender_device_id: msg.sender_device_id.clone(),
                recipient_id: msg.recipient_id.clone(),
                client_msg_id: msg.client_msg_id.clone(),
                body: msg.body.clone(),
                content_type: msg.content_type.clone(),
                server_time_ms: msg.server_time_ms,
            }));
        }
        tx.commit().await.map_err(backend)?;
        Ok(outcomes)
    }

    async fn messages_after(
        &self,
        conversation_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> StoreResult<Vec<StoredMessage>> {
        let rows = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? AND seq > ? \
             ORDER BY seq ASC LIMIT ?"
        ))
        .bind(conversation_id)
        .bind(after_seq as i64)
        .bind(clamp_limit(limit))
        .fetch_all(&self.readers)
        .await
        .map_err(backend)?;
        Ok(rows.iter().map(message_from_row).collect())
    }

    async fn messages_before(
        &self,
        conversation_id: &str,
        before_seq: u64,
        limit: u32,
    ) -> StoreResult<Vec<StoredMessage>> {
        let before = if before_seq == 0 {
            i64::MAX
        } else {
            before_seq as i64
        };
        let rows = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? AND seq < ? \
             ORDER BY seq DESC LIMIT ?"
        ))
        .bind(conversation_id)
        .bind(before)
        .bind(clamp_limit(limit))
        .fetch_all(&self.readers)
        .await
        .map_err(backend)?;
        Ok(rows.iter().map(message_from_row).collect())
    }

    async fn last_seq(&self, conversation_id: &str) -> StoreResult<u64> {
        let seq: Option<i64> =
            sqlx::query_scalar("SELECT last_seq FROM conversations WHERE conversation_id = ?")
                .bind(conversation_id)
                .fetch_optional(&self.readers)
                .await
                .map_err(backend)?;
        Ok(seq.unwrap_or(0) as u64)
    }

    async fn is_member(&self, user_id: &str, conversation_id: &str) -> StoreResult<bool> {
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM conversation_members WHERE user_id = ? AND conversation_id = ?",
        )
        .bind(user_id)
        .bind(conversation_id)
        .fetch_optional(&self.readers)
        .await
        .map_err(backend)?;
        Ok(found.is_some())
    }

    async fn list_conversations(
        &self,
        user_id: &str,
        device_id: &str,
        after: Option<ListPosition<'_>>,
        limit: u32,
    ) -> StoreResult<Vec<ConversationSummary>> {
        let (before_time, after_id) =
            after.map_or((i64::MAX, ""), |p| (p.last_time_ms, p.conversation_id));
        let mut conn = self.readers.acquire().await.map_err(backend)?;
        let rows = sqlx::query(
            "SELECT m.conversation_id, m.peer_id, m.read_seq, c.last_seq, c.last_time_ms, \
                    COALESCE(d.delivered_seq, 0) AS delivered_seq \
             FROM conversation_members m \
             JOIN conversations c ON c.conversation_id = m.conversation_id \
             LEFT JOIN device_cursors d ON d.user_id = m.user_id AND d.device_id = ? \
                                       AND d.conversation_id = m.conversation_id \
             WHERE m.user_id = ? \
               AND (c.last_time_ms < ? OR (c.last_time_ms = ? AND m.conversation_id > ?)) \
             ORDER BY c.last_time_ms DESC, m.conversation_id LIMIT ?",
        )
        .bind(device_id)
        .bind(user_id)
        .bind(before_time)
        .bind(before_time)
        .bind(after_id)
        .bind(clamp_limit(limit))
        .fetch_all(&mut *conn)
        .await
        .map_err(backend)?;
        let mut summaries = Vec::with_capacity(rows.len());
        let select_message =
            format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? AND seq = ?");
        for row in rows {
            let conversation_id: String = row.get("conversation_id");
            let last_seq = row.get::<i64, _>("last_seq") as u64;
            let read_seq = row.get::<i64, _>("read_seq") as u64;
            let last_message = sqlx::query(&select_message)
                .bind(&conversation_id)
                .bind(last_seq as i64)
                .fetch_optional(&mut *conn)
                .await
                .map_err(backend)?
                .map(|r| message_from_row(&r));
            let unread_count = unread_count(&mut conn, user_id, &conversation_id, read_seq).await?;
            summaries.push(ConversationSummary {
                conversation_id,
                peer_id: row.get("peer_id"),
                last_seq,
                last_message,
                read_seq,
                unread_count,
                delivered_seq: row.get::<i64, _>("delivered_seq") as u64,
                last_time_ms: row.get("last_time_ms"),
            });
        }
        Ok(summaries)
    }

    async fn mark_read(
        &self,
        user_id: &str,
        conversation_id: &str,
        read_seq: u64,
    ) -> StoreResult<ReadState> {
        let mut tx = self.writer.begin().await.map_err(backend)?;
        let updated: Option<i64> = sqlx::query_scalar(
            "UPDATE conversation_members \
             SET read_seq = MAX(read_seq, MIN(?, (SELECT last_seq FROM conversations c \
                                                  WHERE c.conversation_id = conversation_members.conversation_id))) \
             WHERE user_id = ? AND conversation_id = ? RETURNING read_seq",
        )
        .bind(read_seq.min(i64::MAX as u64) as i64)
        .bind(user_id)
        .bind(conversation_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend)?;
        let Some(read_seq) = updated else {
            return Err(StoreError::UnknownConversation);
        };
        let read_seq = read_seq as u64;
        let unread_count = unread_count(&mut tx, user_id, conversation_id, read_seq).await?;
        tx.commit().await.map_err(backend)?;
        Ok(ReadState {
            read_seq,
            unread_count,
        })
    }

    async fn load_plugin_kv(&self, plugin_id: &str, now_ms: i64) -> StoreResult<Vec<KvRecord>> {
        let rows = sqlx::query(
            "SELECT key, value, expires_at_ms FROM plugin_kv \
             WHERE plugin_id = ? AND (expires_at_ms IS NULL OR expires_at_ms > ?)",
        )
        .bind(plugin_id)
        .bind(now_ms)
        .fetch_all(&self.readers)
        .await
        .map_err(backend)?;
        Ok(rows
            .iter()
            .map(|r| KvRecord {
                key: r.get("key"),
                value: r.get("value"),
                expires_at_ms: r.get("expires_at_ms"),
            })
            .collect())
    }

    async fn write_plugin_kv(
        &self,
        plugin_id: &str,
        upserts: &[KvRecord],
        deletes: &[String],
    ) -> StoreResult<()> {
        let mut tx = self.writer.begin().await.map_err(backend)?;
        for r in upserts {
            sqlx::query(
                "INSERT INTO plugin_kv (plugin_id, key, value, expires_at_ms) VALUES (?, ?, ?, ?) \
                 ON CONFLICT (plugin_id, key) DO UPDATE \
                 SET value = excluded.value, expires_at_ms = excluded.expires_at_ms",
            )
            .bind(plugin_id)
            .bind(&r.key)
            .bind(&r.value)
            .bind(r.expires_at_ms)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        }
        for key in deletes {
            sqlx::query("DELETE FROM plugin_kv WHERE plugin_id = ? AND key = ?")
                .bind(plugin_id)
                .bind(key)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)?;
        Ok(())
    }

    async fn ack_delivered(
        &self,
        user_id: &str,
        device_id: &str,
        acks: &[(String, u64)],
    ) -> StoreResult<()> {
        let mut tx = self.writer.begin().await.map_err(backend)?;
        for (conversation_id, seq) in acks {
            sqlx::query(
                "INSERT INTO device_cursors (user_id, device_id, conversation_id, delivered_seq) \
                 VALUES (?, ?, ?, ?) ON CONFLICT (user_id, device_id, conversation_id) \
                 DO UPDATE SET delivered_seq = MAX(delivered_seq, excluded.delivered_seq)",
            )
            .bind(user_id)
            .bind(device_id)
            .bind(conversation_id)
            .bind((*seq).min(i64::MAX as u64) as i64)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("im.db"), SqliteOptions::default())
            .await
            .unwrap();
        crate::conformance::run_all(&store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("im.db");
        let store = SqliteStore::open(&path, SqliteOptions::default())
            .await
            .unwrap();
        let batch = crate::conformance::direct_batch("a", "b", "reopen", 3);
        store.append_messages(&batch).await.unwrap();
        store.close().await;
        let store = SqliteStore::open(
            &path,
            SqliteOptions {
                fsync_each_commit: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let conv = &batch[0].conversation_id;
        assert_eq!(store.last_seq(conv).await.unwrap(), 3);
        let again = store.append_messages(&batch[..1]).await.unwrap();
        assert!(matches!(again[0], Appended::Duplicate(ref m) if m.seq == 1));
    }
}
