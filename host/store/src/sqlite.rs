//! The embedded SQLite backend: one writer connection (SQLite has one writer), a small reader pool, WAL.
//!
//! Durability: WAL with `synchronous=NORMAL` survives a crash or SIGKILL of the server
//! process (a commit is in the OS page cache when it returns); `synchronous=FULL`
//! (`SqliteOptions::fsync_each_commit`) also survives power loss at one fsync per batch.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Row, SqliteConnection, SqlitePool};
use tokio::sync::Notify;

use crate::{
    Appended, ConversationSummary, DeliveryCursor, GroupChange, GroupInfo, GroupMember, GroupRole,
    KvRecord, ListPosition, NewMessage, ReadState, Store, StoreError, StoreResult, StoreStats,
    StoredMessage, UserRecord,
};

mod journal;
mod raw_writes;

use journal::Journal;

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
    writer: Writer,
    readers: SqlitePool,
    journal: Arc<Journal>,
}

/// The one writer connection, and the checkpointer its commits wake.
#[derive(Clone)]
struct Writer {
    pool: SqlitePool,
    checkpointer: Arc<Checkpointer>,
}

/// WAL size (in frames, one page each) past which the log is restarted. Restarting makes
/// later commits overwrite the WAL file from its start instead of growing it. Under steady
/// writes it never happens by itself (a passive pass copies only the frames it saw when it
/// started, and the applier commits during every pass), and the restart holds the applier
/// up while it copies the rest, so it runs once per this many frames, not per commit.
const RESTART_WAL_FRAMES: i64 = if cfg!(test) { 64 } else { 65_536 };

/// Least time between two checkpoints: each one syncs the WAL and the database file.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(200);

/// How many times a piece of background work ran, and for how long in all.
#[derive(Default)]
struct BusyTime {
    runs: AtomicU64,
    nanos: AtomicU64,
}

impl BusyTime {
    fn record(&self, took: Duration) {
        self.runs.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    fn seconds(&self) -> f64 {
        self.nanos.load(Ordering::Relaxed) as f64 / 1e9
    }
}

/// Copies the WAL into the database file on a connection of its own, so that commits never
/// run a checkpoint (with SQLite's automatic checkpoints a commit every 1,000 pages copies
/// them and waits for two fsyncs). Woken after commits; stops when the store is closed.
struct Checkpointer {
    wake: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
    /// Checkpoints done, for [`Store::stats`].
    done: Arc<BusyTime>,
    /// A passive pass found the WAL long: the journal's applier restarts it between two of
    /// its transactions, where no writer is in the way and the wait for readers is short
    /// (a restart from this task waited for the applier's lock, then held the applier up,
    /// with SQLite's busy handler sleeping up to a second and more).
    restart_wanted: Arc<AtomicBool>,
    /// Restarts the applier did, for [`Store::stats`].
    restarts: BusyTime,
    /// Restarts that gave up (a reader's snapshot or a checkpoint in the way), and the
    /// applier's time waiting in them.
    restarts_given_up: BusyTime,
}

impl Checkpointer {
    fn start(mut conn: SqliteConnection) -> Self {
        let wake = Arc::new(Notify::new());
        let woken = wake.clone();
        let done = Arc::new(BusyTime::default());
        let counted = done.clone();
        let restart_wanted = Arc::new(AtomicBool::new(false));
        let long = restart_wanted.clone();
        let task = tokio::spawn(async move {
            loop {
                woken.notified().await;
                let started = Instant::now();
                match checkpoint(&mut conn).await {
                    Ok(wal_frames) => {
                        counted.record(started.elapsed());
                        if wal_frames >= RESTART_WAL_FRAMES {
                            long.store(true, Ordering::Release);
                        }
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "WAL checkpoint failed; retrying after the next commit");
                    }
                }
                tokio::time::sleep(CHECKPOINT_INTERVAL).await;
            }
        });
        Self {
            wake,
            task,
            done,
            restart_wanted,
            restarts: BusyTime::default(),
            restarts_given_up: BusyTime::default(),
        }
    }

    /// Called after each commit.
    fn committed(&self) {
        self.wake.notify_one();
    }

    /// Whether the WAL is long enough to be restarted now.
    fn restart_wanted(&self) -> bool {
        self.restart_wanted.load(Ordering::Acquire)
    }

    /// The applier restarted the WAL, which took `took`.
    fn restarted(&self, took: Duration) {
        self.restart_wanted.store(false, Ordering::Release);
        self.restarts.record(took);
    }

    /// A restart gave up after waiting `waited`; the WAL stays long, so it is wanted still.
    fn restart_gave_up(&self, waited: Duration) {
        self.restarts_given_up.record(waited);
    }

    fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One PASSIVE checkpoint (never waits for the writer); returns the WAL's length in frames.
async fn checkpoint(conn: &mut SqliteConnection) -> Result<i64, sqlx::Error> {
    let (_busy, wal_frames, _copied): (i64, i64, i64) =
        sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&mut *conn)
            .await?;
    Ok(wal_frames)
}

fn backend(err: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(err.to_string())
}

const MESSAGE_COLUMNS: &str = "conversation_id, seq, server_msg_id, sender_id, sender_device_id, \
     recipient_id, client_msg_id, body, content_type, server_time_ms";

/// Applies the migrations on a connection of their own: one that may spill the sorts of a
/// table's rebuild to temporary files (the store's other connections keep temporary data
/// in memory), and that gives the WAL's space back after a large migration.
async fn migrate(options: &SqliteConnectOptions) -> StoreResult<()> {
    let mut conn = options.connect().await.map_err(backend)?;
    MIGRATOR.run(&mut conn).await.map_err(backend)?;
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut conn)
        .await
        .map_err(backend)?;
    sqlx::Connection::close(conn).await.map_err(backend)
}

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
        let base = SqliteConnectOptions::from_str("sqlite://")
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
            .pragma("cache_size", "-16000");
        migrate(&base).await?;
        // Statement journals and temporary tables stay off the disk (multi-row and
        // upsert statements open one per commit otherwise).
        let connect = base
            .pragma("temp_store", "memory")
            .statement_cache_capacity(64);
        // Commits never checkpoint; the checkpointer's own connection does.
        let writing = connect.clone().pragma("wal_autocheckpoint", "0");
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .connect_with(writing.clone())
            .await
            .map_err(backend)?;
        let checkpointer = Checkpointer::start(writing.connect().await.map_err(backend)?);
        let writer = Writer {
            pool: writer,
            checkpointer: Arc::new(checkpointer),
        };
        let journal =
            Journal::open(path, options.fsync_each_commit, writer.checkpointer.clone()).await?;
        let readers = SqlitePoolOptions::new()
            .max_connections(options.reader_connections.max(1))
            .connect_with(connect.read_only(true))
            .await
            .map_err(backend)?;
        Ok(Self {
            writer,
            readers,
            journal: Arc::new(journal),
        })
    }

    /// Closes all connections, checkpointing the WAL, after the journal is applied.
    pub async fn close(&self) {
        self.journal.close().await;
        self.writer.checkpointer.stop();
        self.readers.close().await;
        self.writer.pool.close().await;
    }
}

impl Writer {
    /// A write transaction that holds the write lock from its start. (A deferred one that
    /// reads first cannot wait for the lock later: it would fail with SQLITE_BUSY while the
    /// applier restarts the WAL.)
    async fn begin_write(&self) -> StoreResult<sqlx::Transaction<'static, sqlx::Sqlite>> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)
    }

    /// Runs `work` on the writer connection's raw handle, on this thread: one hand-off to
    /// sqlx's worker (to take its lock) instead of one per statement.
    async fn write_raw<T>(
        &self,
        work: impl FnOnce(&rusqlite::Connection) -> StoreResult<T>,
    ) -> StoreResult<T> {
        let mut conn = self.pool.acquire().await.map_err(backend)?;
        let mut handle = conn.lock_handle().await.map_err(backend)?;
        let raw = handle.as_raw_handle().as_ptr();
        let run = || {
            // SAFETY: `raw` is the writer's open connection, locked for us by `handle` until
            // after this closure returns, so nothing else uses it meanwhile; the borrowed
            // rusqlite `Connection` does not close it when dropped.
            let db = unsafe { rusqlite::Connection::from_handle(raw) }.map_err(backend)?;
            work(&db)
        };
        // Any write may hold this thread for milliseconds: a large one by itself, and even a
        // one-row write waits in `BEGIN IMMEDIATE` (the busy handler sleeps) while the
        // journal's applier holds the write lock. Let the runtime move this thread's other
        // tasks elsewhere meanwhile (possible only on a multi-threaded runtime).
        let result = if on_multi_threaded_runtime() {
            tokio::task::block_in_place(run)
        } else {
            run()
        };
        drop(handle);
        drop(conn);
        if result.is_ok() {
            self.checkpointer.committed();
        }
        result
    }

    /// Called after each sqlx transaction's commit.
    fn committed(&self) {
        self.checkpointer.committed();
    }
}

/// Whether the caller runs on a multi-threaded tokio runtime, where `block_in_place` may
/// hand the worker's other tasks to another thread.
fn on_multi_threaded_runtime() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
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

/// Stores `msg` with its conversation's next seq, or returns the original when its
/// (sender, client message id) is already stored. Membership and read cursors are the
/// caller's: they differ between 1:1 messages and group announcements.
async fn append_one(conn: &mut sqlx::SqliteConnection, msg: &NewMessage) -> StoreResult<Appended> {
    let original = sqlx::query(&format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages WHERE sender_id = ? AND client_msg_id = ?"
    ))
    .bind(&msg.sender_id)
    .bind(&msg.client_msg_id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(backend)?;
    if let Some(row) = original {
        return Ok(Appended::Duplicate(Arc::new(message_from_row(&row))));
    }
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO conversations (conversation_id, last_seq, last_time_ms) VALUES (?, 1, ?) \
         ON CONFLICT (conversation_id) DO UPDATE \
         SET last_seq = last_seq + 1, last_time_ms = excluded.last_time_ms \
         RETURNING last_seq",
    )
    .bind(&msg.conversation_id)
    .bind(msg.server_time_ms)
    .fetch_one(&mut *conn)
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
    .execute(&mut *conn)
    .await
    .map_err(backend)?;
    Ok(Appended::New(Arc::new(msg.stored(seq as u64))))
}

/// Moves a member's read cursor forward to `seq` (a sender has read its own message);
/// no-op for a non-member.
async fn advance_read_cursor(
    conn: &mut sqlx::SqliteConnection,
    user_id: &str,
    conversation_id: &str,
    seq: u64,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE conversation_members SET read_seq = MAX(read_seq, ?) \
         WHERE user_id = ? AND conversation_id = ?",
    )
    .bind(seq as i64)
    .bind(user_id)
    .bind(conversation_id)
    .execute(&mut *conn)
    .await
    .map_err(backend)?;
    Ok(())
}

/// Group conversations are `g:<group_id>`; their membership follows the group's.
const GROUP_CONVERSATION_PREFIX: &str = "g:";

fn is_group_conversation(conversation_id: &str) -> bool {
    conversation_id.starts_with(GROUP_CONVERSATION_PREFIX)
}

const GROUP_COLUMNS: &str = "group_id, name, owner_id, member_count, created_ms";

fn group_from_row(row: &SqliteRow) -> GroupInfo {
    GroupInfo {
        group_id: row.get("group_id"),
        name: row.get("name"),
        owner_id: row.get("owner_id"),
        member_count: row.get::<i64, _>("member_count") as u32,
        created_ms: row.get("created_ms"),
    }
}

fn member_from_row(row: &SqliteRow) -> StoreResult<GroupMember> {
    let role: String = row.get("role");
    Ok(GroupMember {
        user_id: row.get("user_id"),
        role: GroupRole::parse(&role)
            .ok_or_else(|| StoreError::Backend(format!("unknown group role {role:?}")))?,
        joined_ms: row.get("joined_ms"),
    })
}

async fn load_group(
    conn: &mut sqlx::SqliteConnection,
    group_id: &str,
) -> StoreResult<Option<GroupInfo>> {
    let row = sqlx::query(&format!(
        "SELECT {GROUP_COLUMNS} FROM groups WHERE group_id = ?"
    ))
    .bind(group_id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(backend)?;
    Ok(row.as_ref().map(group_from_row))
}

/// Adds a member unless already one; returns whether it was added.
async fn insert_group_member(
    conn: &mut sqlx::SqliteConnection,
    group_id: &str,
    user_id: &str,
    role: GroupRole,
    joined_ms: i64,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "INSERT INTO group_members (group_id, user_id, role, joined_ms) VALUES (?, ?, ?, ?) \
         ON CONFLICT DO NOTHING",
    )
    .bind(group_id)
    .bind(user_id)
    .bind(role.as_str())
    .bind(joined_ms)
    .execute(&mut *conn)
    .await
    .map_err(backend)?;
    Ok(done.rows_affected() == 1)
}

/// Sets a member's role; returns whether `user_id` is a member.
async fn set_group_role(
    conn: &mut sqlx::SqliteConnection,
    group_id: &str,
    user_id: &str,
    role: GroupRole,
) -> StoreResult<bool> {
    let done = sqlx::query("UPDATE group_members SET role = ? WHERE group_id = ? AND user_id = ?")
        .bind(role.as_str())
        .bind(group_id)
        .bind(user_id)
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
    Ok(done.rows_affected() == 1)
}

/// The users a group change added and removed, to mirror into the group conversation.
#[derive(Default)]
struct MembershipDelta {
    added: Vec<String>,
    removed: Vec<String>,
}

/// Applies `change` to the group tables (not its conversation), checking it against the
/// stored group. Duplicate user ids in a list fall out of the per-row outcomes.
async fn change_group(
    conn: &mut sqlx::SqliteConnection,
    group_id: &str,
    change: &GroupChange,
    now_ms: i64,
) -> StoreResult<MembershipDelta> {
    let mut delta = MembershipDelta::default();
    let group = load_group(conn, group_id).await?;
    match (change, group) {
        (
            GroupChange::Create {
                name,
                owner_id,
                members,
            },
            None,
        ) => {
            sqlx::query(
                "INSERT INTO groups (group_id, name, owner_id, member_count, created_ms) \
                 VALUES (?, ?, ?, 0, ?)",
            )
            .bind(group_id)
            .bind(name)
            .bind(owner_id)
            .bind(now_ms)
            .execute(&mut *conn)
            .await
            .map_err(backend)?;
            // The owner goes first, so an owner also listed in `members` stays the owner.
            insert_group_member(conn, group_id, owner_id, GroupRole::Owner, now_ms).await?;
            delta.added.push(owner_id.clone());
            for user_id in members {
                if insert_group_member(conn, group_id, user_id, GroupRole::Member, now_ms).await? {
                    delta.added.push(user_id.clone());
                }
            }
        }
        (GroupChange::Create { .. }, Some(_)) => {
            return Err(StoreError::Conflict(format!(
                "group {group_id} already exists"
            )));
        }
        (_, None) => return Err(StoreError::UnknownConversation),
        (GroupChange::Add { user_ids }, Some(_)) => {
            for user_id in user_ids {
                if insert_group_member(conn, group_id, user_id, GroupRole::Member, now_ms).await? {
                    delta.added.push(user_id.clone());
                }
            }
        }
        (GroupChange::Remove { user_ids }, Some(group)) => {
            if user_ids.contains(&group.owner_id) {
                return Err(StoreError::Conflict(format!(
                    "{} owns group {group_id}: transfer ownership first",
                    group.owner_id
                )));
            }
            for user_id in user_ids {
                let done =
                    sqlx::query("DELETE FROM group_members WHERE group_id = ? AND user_id = ?")
                        .bind(group_id)
                        .bind(user_id)
                        .execute(&mut *conn)
                        .await
                        .map_err(backend)?;
                if done.rows_affected() == 1 {
                    delta.removed.push(user_id.clone());
                }
            }
        }
        (GroupChange::SetRole { user_id, role }, Some(group)) => {
            // Either would leave the group without exactly one owner.
            if *role == GroupRole::Owner || *user_id == group.owner_id {
                return Err(StoreError::Conflict(format!(
                    "ownership of group {group_id} changes only by transfer"
                )));
            }
            if !set_group_role(conn, group_id, user_id, *role).await? {
                return Err(StoreError::Conflict(format!(
                    "{user_id} is not a member of group {group_id}"
                )));
            }
        }
        (GroupChange::TransferOwnership { to }, Some(group)) => {
            if *to == group.owner_id {
                return Err(StoreError::Conflict(format!(
                    "{to} already owns group {group_id}"
                )));
            }
            if !set_group_role(conn, group_id, to, GroupRole::Owner).await? {
                return Err(StoreError::Conflict(format!(
                    "{to} is not a member of group {group_id}"
                )));
            }
            set_group_role(conn, group_id, &group.owner_id, GroupRole::Admin).await?;
            sqlx::query("UPDATE groups SET owner_id = ? WHERE group_id = ?")
                .bind(to)
                .bind(group_id)
                .execute(&mut *conn)
                .await
                .map_err(backend)?;
        }
    }
    let net = delta.added.len() as i64 - delta.removed.len() as i64;
    if net != 0 {
        sqlx::query("UPDATE groups SET member_count = member_count + ? WHERE group_id = ?")
            .bind(net)
            .bind(group_id)
            .execute(&mut *conn)
            .await
            .map_err(backend)?;
    }
    Ok(delta)
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn upsert_user(&self, user_id: &str, now_ms: i64) -> StoreResult<()> {
        sqlx::query("INSERT INTO users (user_id, created_ms) VALUES (?, ?) ON CONFLICT DO NOTHING")
            .bind(user_id)
            .bind(now_ms)
            .execute(&self.writer.pool)
            .await
            .map_err(backend)?;
        self.writer.committed();
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

    async fn list_users(
        &self,
        after_user_id: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<UserRecord>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT user_id, created_ms FROM users WHERE user_id > ? ORDER BY user_id LIMIT ?",
        )
        .bind(after_user_id.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(&self.readers)
        .await
        .map_err(backend)?;
        Ok(rows
            .into_iter()
            .map(|(user_id, created_ms)| UserRecord {
                user_id,
                created_ms,
            })
            .collect())
    }

    async fn append_messages(&self, batch: &[NewMessage]) -> StoreResult<Vec<Appended>> {
        self.append_owned(batch.to_vec()).await
    }

    fn stats(&self) -> Option<StoreStats> {
        let checkpoints = &self.writer.checkpointer.done;
        let restarts = &self.writer.checkpointer.restarts;
        let given_up = &self.writer.checkpointer.restarts_given_up;
        Some(StoreStats {
            checkpoints: checkpoints.runs(),
            checkpoint_seconds: checkpoints.seconds(),
            wal_restarts: restarts.runs(),
            wal_restart_seconds: restarts.seconds(),
            wal_restarts_given_up: given_up.runs(),
            wal_restart_wait_seconds: given_up.seconds(),
            ..self.journal.stats()
        })
    }

    async fn append_owned(&self, batch: Vec<NewMessage>) -> StoreResult<Vec<Appended>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.journal.append(batch).await
    }

    async fn messages_after(
        &self,
        conversation_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> StoreResult<Vec<StoredMessage>> {
        self.journal.settled().await?;
        let rows = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? AND seq > ? \
             ORDER BY seq ASC LIMIT ?"
        ))
        .bind(conversation_id)
        // Seqs above i64::MAX cannot exist; clamping keeps "after" meaning "none".
        .bind(after_seq.min(i64::MAX as u64) as i64)
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
        self.journal.settled().await?;
        let before = if before_seq == 0 {
            i64::MAX
        } else {
            before_seq.min(i64::MAX as u64) as i64
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
        self.journal.settled().await?;
        let seq: Option<i64> =
            sqlx::query_scalar("SELECT last_seq FROM conversations WHERE conversation_id = ?")
                .bind(conversation_id)
                .fetch_optional(&self.readers)
                .await
                .map_err(backend)?;
        Ok(seq.unwrap_or(0) as u64)
    }

    async fn is_member(&self, user_id: &str, conversation_id: &str) -> StoreResult<bool> {
        self.journal.settled().await?;
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

    async fn removed_at(&self, user_id: &str, conversation_id: &str) -> StoreResult<Option<u64>> {
        self.journal.settled().await?;
        let seq: Option<i64> = sqlx::query_scalar(
            "SELECT removed_seq FROM former_members WHERE conversation_id = ? AND user_id = ?",
        )
        .bind(conversation_id)
        .bind(user_id)
        .fetch_optional(&self.readers)
        .await
        .map_err(backend)?;
        Ok(seq.map(|seq| seq as u64))
    }

    async fn list_conversations(
        &self,
        user_id: &str,
        device_id: &str,
        after: Option<ListPosition<'_>>,
        limit: u32,
    ) -> StoreResult<Vec<ConversationSummary>> {
        self.journal.settled().await?;
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
        self.journal.settled().await?;
        let mut tx = self.writer.begin_write().await?;
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
        self.writer.committed();
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
        if upserts.is_empty() && deletes.is_empty() {
            return Ok(());
        }
        self.writer
            .write_raw(|db| raw_writes::store_plugin_kv(db, plugin_id, upserts, deletes))
            .await
    }

    async fn apply_group_change(
        &self,
        group_id: &str,
        change: &GroupChange,
        announcement: &NewMessage,
    ) -> StoreResult<(GroupInfo, StoredMessage)> {
        let conversation_id = format!("{GROUP_CONVERSATION_PREFIX}{group_id}");
        if announcement.conversation_id != conversation_id {
            return Err(StoreError::Conflict(format!(
                "the announcement of group {group_id} belongs in {conversation_id}, not {}",
                announcement.conversation_id
            )));
        }
        // Holding the journal keeps appends out while this change takes its seq in SQLite.
        let mut journal = self.journal.exclusive().await?;
        // Dropping the transaction on any error rolls the whole change back.
        let mut tx = self.writer.begin_write().await?;
        let delta = change_group(&mut tx, group_id, change, announcement.server_time_ms).await?;
        let Appended::New(stored) = append_one(&mut tx, announcement).await? else {
            return Err(StoreError::Conflict(format!(
                "announcement {} of {} is already stored",
                announcement.client_msg_id, announcement.sender_id
            )));
        };
        // Before the commit: should it fail, the filter only holds one pair too many.
        journal.remember_stored(&stored.sender_id, &stored.client_msg_id);
        // New members start having read everything up to the announcement that added them.
        for user_id in &delta.added {
            sqlx::query(
                "INSERT INTO conversation_members (user_id, conversation_id, peer_id, read_seq) \
                 VALUES (?, ?, ?, ?) ON CONFLICT (user_id, conversation_id) DO UPDATE \
                 SET peer_id = excluded.peer_id, read_seq = MAX(read_seq, excluded.read_seq)",
            )
            .bind(user_id)
            .bind(&conversation_id)
            .bind(group_id)
            .bind(stored.seq as i64)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
            sqlx::query("DELETE FROM former_members WHERE conversation_id = ? AND user_id = ?")
                .bind(&conversation_id)
                .bind(user_id)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        // Removed members may still read up to the announcement that removed them.
        for user_id in &delta.removed {
            sqlx::query(
                "DELETE FROM conversation_members WHERE user_id = ? AND conversation_id = ?",
            )
            .bind(user_id)
            .bind(&conversation_id)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
            sqlx::query(
                "INSERT INTO former_members (conversation_id, user_id, removed_seq) \
                 VALUES (?, ?, ?) ON CONFLICT (conversation_id, user_id) DO UPDATE \
                 SET removed_seq = excluded.removed_seq",
            )
            .bind(&conversation_id)
            .bind(user_id)
            .bind(stored.seq as i64)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        }
        advance_read_cursor(&mut tx, &stored.sender_id, &conversation_id, stored.seq).await?;
        let group = load_group(&mut tx, group_id)
            .await?
            .ok_or_else(|| StoreError::Backend(format!("group {group_id} vanished")))?;
        tx.commit().await.map_err(backend)?;
        self.writer.committed();
        Ok((group, Arc::unwrap_or_clone(stored)))
    }

    async fn group(&self, group_id: &str) -> StoreResult<Option<GroupInfo>> {
        let mut conn = self.readers.acquire().await.map_err(backend)?;
        load_group(&mut conn, group_id).await
    }

    async fn group_member(
        &self,
        group_id: &str,
        user_id: &str,
    ) -> StoreResult<Option<GroupMember>> {
        let row = sqlx::query(
            "SELECT user_id, role, joined_ms FROM group_members WHERE group_id = ? AND user_id = ?",
        )
        .bind(group_id)
        .bind(user_id)
        .fetch_optional(&self.readers)
        .await
        .map_err(backend)?;
        row.as_ref().map(member_from_row).transpose()
    }

    async fn group_members(
        &self,
        group_id: &str,
        after_user_id: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<GroupMember>> {
        // Every user id sorts after the empty string.
        let rows = sqlx::query(
            "SELECT user_id, role, joined_ms FROM group_members \
             WHERE group_id = ? AND user_id > ? ORDER BY user_id LIMIT ?",
        )
        .bind(group_id)
        .bind(after_user_id.unwrap_or(""))
        .bind(clamp_limit(limit))
        .fetch_all(&self.readers)
        .await
        .map_err(backend)?;
        rows.iter().map(member_from_row).collect()
    }

    async fn user_groups(&self, user_id: &str) -> StoreResult<Vec<GroupInfo>> {
        let rows = sqlx::query(
            "SELECT g.group_id, g.name, g.owner_id, g.member_count, g.created_ms \
             FROM group_members m JOIN groups g ON g.group_id = m.group_id \
             WHERE m.user_id = ? ORDER BY m.group_id",
        )
        .bind(user_id)
        .fetch_all(&self.readers)
        .await
        .map_err(backend)?;
        Ok(rows.iter().map(group_from_row).collect())
    }

    async fn ack_delivered(&self, cursors: &[DeliveryCursor]) -> StoreResult<()> {
        if cursors.is_empty() {
            return Ok(());
        }
        self.writer
            .write_raw(|db| raw_writes::store_cursors(db, cursors))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store with default options in a new temporary directory (kept while the `TempDir`
    /// lives), and its database path.
    pub(super) async fn open_temp() -> (tempfile::TempDir, std::path::PathBuf, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("im.db");
        let store = SqliteStore::open(&path, SqliteOptions::default())
            .await
            .unwrap();
        (dir, path, store)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_passes_the_conformance_suite() {
        let (_dir, _, store) = open_temp().await;
        crate::conformance::run_all(&store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stats_count_the_appliers_work() {
        let (_dir, _, store) = open_temp().await;
        let before = store.stats().unwrap();
        assert_eq!(before.applier_messages, 0);
        let batch = crate::conformance::direct_batch("st-a", "st-b", "stats", 5);
        store.append_messages(&batch).await.unwrap();
        // A read waits for the applier to copy what was journaled before it.
        let conversation = batch[0].conversation_id.clone();
        assert_eq!(
            store
                .messages_after(&conversation, 0, 10)
                .await
                .unwrap()
                .len(),
            5
        );
        let after = store.stats().unwrap();
        assert_eq!(after.pending_messages, 0);
        assert_eq!(after.applier_messages, 5);
        assert!(after.applier_commits >= 1, "{after:?}");
        assert!(after.applier_seconds > 0.0, "{after:?}");
        // The applier's commit wakes the checkpointer, whose pass is counted once done.
        let deadline = Instant::now() + Duration::from_secs(10);
        let checkpointed = loop {
            let stats = store.stats().unwrap();
            if stats.checkpoints > 0 || Instant::now() > deadline {
                break stats;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(checkpointed.checkpoints >= 1, "{checkpointed:?}");
        assert!(checkpointed.checkpoint_seconds > 0.0, "{checkpointed:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_wal_is_restarted_between_the_appliers_transactions() {
        let (_dir, _, store) = open_temp().await;
        assert_eq!(store.stats().unwrap().wal_restarts, 0);
        // Tests restart at RESTART_WAL_FRAMES (64) frames: rounds of messages, each applied
        // (a read waits for it) and followed by a checkpoint's chance. A round is large
        // enough to pass that length in the few rounds between two checkpoints even on a
        // loaded machine (rounds of 50 could all be checkpointed before the WAL got long).
        const ROUND: usize = 250;
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut round = 0;
        let restarted = loop {
            let batch =
                crate::conformance::direct_batch("wr-a", "wr-b", &format!("wal{round}"), ROUND);
            store.append_messages(&batch).await.unwrap();
            store
                .messages_after(&batch[0].conversation_id, 0, 1)
                .await
                .unwrap();
            let stats = store.stats().unwrap();
            if stats.wal_restarts > 0 || Instant::now() > deadline {
                break stats;
            }
            round += 1;
            tokio::time::sleep(CHECKPOINT_INTERVAL / 4).await;
        };
        assert!(restarted.wal_restarts >= 1, "{restarted:?}");
        assert!(restarted.wal_restart_seconds > 0.0, "{restarted:?}");
        // Every message is still there, in order, after the restart.
        let conversation = crate::conformance::direct_batch("wr-a", "wr-b", "wal0", 1)[0]
            .conversation_id
            .clone();
        let total = (ROUND * (round + 1)) as u64;
        assert_eq!(store.last_seq(&conversation).await.unwrap(), total);
        let last_round = store
            .messages_after(&conversation, total - ROUND as u64, 1000)
            .await
            .unwrap();
        assert_eq!(last_round.len(), ROUND);
        assert_eq!(last_round[ROUND - 1].seq, total);
    }

    /// Appends a round of 50 messages and reads it back (which waits for the applier).
    async fn wal_round(store: &SqliteStore, round: usize) -> StoreStats {
        let batch = crate::conformance::direct_batch("wr-a", "wr-b", &format!("wal{round}"), 50);
        store.append_messages(&batch).await.unwrap();
        let read = store
            .messages_after(&batch[0].conversation_id, 0, 1)
            .await
            .unwrap();
        assert_eq!(read.len(), 1, "round {round}");
        store.stats().unwrap()
    }

    /// Runs [`wal_round`]s, a quarter checkpoint interval apart, until `done` holds of the
    /// stats or 20 s have passed; returns the last stats.
    async fn wal_rounds_until(
        store: &SqliteStore,
        round: &mut usize,
        done: impl Fn(&StoreStats) -> bool,
    ) -> StoreStats {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let stats = wal_round(store, *round).await;
            *round += 1;
            if done(&stats) || Instant::now() > deadline {
                return stats;
            }
            tokio::time::sleep(CHECKPOINT_INTERVAL / 4).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_that_keeps_its_snapshot_delays_the_wal_restart_but_not_the_applier() {
        let (_dir, path, store) = open_temp().await;
        // A reader in the middle of a read transaction holds its snapshot of the WAL (which
        // has frames by then), which a restart must wait for.
        wal_round(&store, 0).await;
        let reader = rusqlite::Connection::open(&path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let _: i64 = reader
            .query_row("SELECT COUNT(*) FROM messages", [], |row| row.get(0))
            .unwrap();
        let mut round = 1;
        let blocked = wal_rounds_until(&store, &mut round, |s| s.wal_restarts_given_up > 0).await;
        assert!(blocked.wal_restarts_given_up >= 1, "{blocked:?}");
        assert_eq!(blocked.wal_restarts, 0, "{blocked:?}");
        // While the reader holds on, the applier keeps applying (each round's read waits
        // for it) and tries the restart later and later, not after each of its commits.
        let watched_until = Instant::now() + Duration::from_millis(1500);
        let mut commits_watched = 0;
        let held = loop {
            let stats = wal_round(&store, round).await;
            round += 1;
            commits_watched += 1;
            if Instant::now() > watched_until {
                break stats;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(held.wal_restarts, 0, "{held:?}");
        let tries = held.wal_restarts_given_up - blocked.wal_restarts_given_up;
        assert!(
            tries <= 6,
            "{tries} restarts tried in {commits_watched} rounds while the reader held on"
        );
        // Once the reader lets go, a later try restarts the WAL.
        reader.execute_batch("COMMIT").unwrap();
        drop(reader);
        let restarted = wal_rounds_until(&store, &mut round, |s| s.wal_restarts > 0).await;
        assert!(restarted.wal_restarts >= 1, "{restarted:?}");
        assert!(restarted.wal_restart_wait_seconds > 0.0, "{restarted:?}");
    }

    /// A database written before migration 0004 (messages clustered by conversation and
    /// seq) keeps every message, its seq and its idempotency key through the upgrade.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn messages_stored_before_arrival_order_survive_the_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("im.db");
        let earlier = dir.path().join("migrations-before-0004");
        std::fs::create_dir(&earlier).unwrap();
        let all = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
        for entry in std::fs::read_dir(all).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name().to_string_lossy().as_ref() < "0004" {
                std::fs::copy(entry.path(), earlier.join(entry.file_name())).unwrap();
            }
        }
        let old = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(
                SqliteConnectOptions::new()
                    .filename(&path)
                    .create_if_missing(true),
            )
            .await
            .unwrap();
        sqlx::migrate::Migrator::new(earlier.as_path())
            .await
            .unwrap()
            .run(&old)
            .await
            .unwrap();
        old.close().await;
        // Two conversations, interleaved, written by the applier as it wrote them before
        // 0004 (its statements name their columns, so they fit either layout).
        let first = crate::conformance::direct_batch("ann", "bob", "old", 3);
        let second = crate::conformance::direct_batch("cid", "dan", "old", 2);
        let mut expected: Vec<Arc<StoredMessage>> = Vec::new();
        for msg in first
            .iter()
            .zip(&second)
            .flat_map(|(a, b)| [a, b])
            .chain(&first[2..])
        {
            let seq = 1 + expected
                .iter()
                .filter(|m| m.conversation_id == msg.conversation_id)
                .count() as u64;
            expected.push(Arc::new(msg.stored(seq)));
        }
        let raw = rusqlite::Connection::open(&path).unwrap();
        raw_writes::persist_sequenced(&raw, &expected).unwrap();
        drop(raw);

        let store = SqliteStore::open(&path, SqliteOptions::default())
            .await
            .unwrap();
        for batch in [&first, &second] {
            let conversation = &batch[0].conversation_id;
            let read = store.messages_after(conversation, 0, 100).await.unwrap();
            let want: Vec<StoredMessage> = expected
                .iter()
                .filter(|m| &m.conversation_id == conversation)
                .map(|m| StoredMessage::clone(m))
                .collect();
            assert_eq!(read, want);
        }
        // Both indexes still refuse what they refused before the upgrade.
        let raw = rusqlite::Connection::open(&path).unwrap();
        let copy_of = |seq: i64, client_msg_id: &str| {
            raw.execute(
                "INSERT INTO messages (conversation_id, seq, server_msg_id, sender_id, \
                 sender_device_id, recipient_id, client_msg_id, body, content_type, \
                 server_time_ms) SELECT conversation_id, ?1, server_msg_id, sender_id, \
                 sender_device_id, recipient_id, ?2, body, content_type, server_time_ms \
                 FROM messages WHERE conversation_id = ?3 AND seq = 1",
                rusqlite::params![seq, client_msg_id, first[0].conversation_id],
            )
        };
        assert!(copy_of(1, "another-id").is_err(), "a seq stored twice");
        assert!(
            copy_of(9, &first[0].client_msg_id).is_err(),
            "a client id stored twice"
        );
        drop(raw);
        let again = store.append_messages(&first[1..2]).await.unwrap();
        assert!(
            matches!(&again[0], Appended::Duplicate(m) if m.seq == 2),
            "{again:?}"
        );
        let next = crate::conformance::direct_batch("ann", "bob", "new", 1);
        let appended = store.append_messages(&next).await.unwrap();
        assert!(
            matches!(&appended[0], Appended::New(m) if m.seq == 4),
            "{appended:?}"
        );
        assert_eq!(
            store
                .messages_after(&next[0].conversation_id, 3, 10)
                .await
                .unwrap()[0]
                .client_msg_id,
            "new-0"
        );
        store.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn data_survives_reopen() {
        let (_dir, path, store) = open_temp().await;
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
