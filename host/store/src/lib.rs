//! Message storage behind the [`Store`] trait: users, conversations with gapless seqs, messages, cursors.
//!
//! Layout:
//! - this file: the data types and the [`Store`] trait every backend implements;
//! - [`sqlite`]: the embedded default backend (sqlx, WAL, migrations);
//! - [`conformance`]: the backend-independent test suite; every backend runs all of it.
//!
//! Architecture invariant: sequence numbers are assigned by the backend inside the same
//! transaction that stores the message, so a seq exists only for a durable message and
//! seqs of a conversation are gapless and strictly increasing.

use std::sync::Arc;

use bytes::Bytes;

pub mod conformance;
pub mod sqlite;

pub use sqlite::SqliteStore;

/// A message to store; the store assigns its seq.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewMessage {
    pub conversation_id: String,
    pub sender_id: String,
    pub sender_device_id: String,
    pub recipient_id: String,
    pub client_msg_id: String,
    pub body: Bytes,
    pub content_type: String,
    /// Globally unique id, chosen by the caller.
    pub server_msg_id: String,
    pub server_time_ms: i64,
}

/// A stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub conversation_id: String,
    pub seq: u64,
    pub server_msg_id: String,
    pub sender_id: String,
    pub sender_device_id: String,
    pub recipient_id: String,
    pub client_msg_id: String,
    pub body: Bytes,
    pub content_type: String,
    pub server_time_ms: i64,
}

impl NewMessage {
    /// The message as stored with `seq`, its strings moved rather than copied.
    pub fn into_stored(self, seq: u64) -> StoredMessage {
        StoredMessage {
            conversation_id: self.conversation_id,
            seq,
            server_msg_id: self.server_msg_id,
            sender_id: self.sender_id,
            sender_device_id: self.sender_device_id,
            recipient_id: self.recipient_id,
            client_msg_id: self.client_msg_id,
            body: self.body,
            content_type: self.content_type,
            server_time_ms: self.server_time_ms,
        }
    }

    /// The message as stored with `seq`, copied.
    pub fn stored(&self, seq: u64) -> StoredMessage {
        self.clone().into_stored(seq)
    }
}

/// How far one device holds one conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryCursor {
    pub user_id: String,
    pub device_id: String,
    pub conversation_id: String,
    pub seq: u64,
}

/// The outcome of appending one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Newly stored with the given seq. Shared with the store's own copy (the journal's
    /// pending message), so answering a send copies none of its strings.
    New(Arc<StoredMessage>),
    /// The (sender, client message id) was already stored: this is the original.
    Duplicate(Arc<StoredMessage>),
}

impl Appended {
    /// The stored message, new or original.
    pub fn message(&self) -> &StoredMessage {
        match self {
            Appended::New(m) | Appended::Duplicate(m) => m,
        }
    }
}

/// A backend's own work behind the acks, for operators: how far its background writing is
/// behind and what it costs. Counters are totals since the store opened.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StoreStats {
    /// Messages acked (journaled) but not yet in the queryable tables.
    pub pending_messages: u64,
    /// Transactions that copied journaled messages into the tables.
    pub applier_commits: u64,
    /// Messages those transactions copied.
    pub applier_messages: u64,
    /// Time spent in those transactions.
    pub applier_seconds: f64,
    /// Write-ahead-log checkpoints.
    pub checkpoints: u64,
    /// Time spent in them.
    pub checkpoint_seconds: f64,
    /// Restarts of the write-ahead log (its file is written from the start again), each a
    /// pause of the applier.
    pub wal_restarts: u64,
    /// Time spent in them.
    pub wal_restart_seconds: f64,
    /// Restarts that gave up because a reader kept its snapshot (or a checkpoint ran), or
    /// that failed: retried later and later; while they give up, the WAL file grows.
    pub wal_restarts_given_up: u64,
    /// Time the applier waited in them.
    pub wal_restart_wait_seconds: f64,
}

/// A known user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub user_id: String,
    pub created_ms: i64,
}

/// One entry of a user's conversation list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationSummary {
    pub conversation_id: String,
    pub peer_id: String,
    pub last_seq: u64,
    pub last_message: Option<StoredMessage>,
    pub read_seq: u64,
    /// Messages from others after `read_seq`.
    pub unread_count: u64,
    /// The asking device's delivery cursor.
    pub delivered_seq: u64,
    pub last_time_ms: i64,
}

/// Where a conversation list page ends: the last entry's activity time and id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListPosition<'a> {
    pub last_time_ms: i64,
    pub conversation_id: &'a str,
}

/// A user's read state in a conversation after a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadState {
    pub read_seq: u64,
    pub unread_count: u64,
}

/// One persisted key of a plugin's key-value store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvRecord {
    pub key: String,
    pub value: Vec<u8>,
    /// Expiry, milliseconds since the Unix epoch.
    pub expires_at_ms: Option<i64>,
}

/// A group member's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupRole {
    Owner,
    Admin,
    Member,
}

impl GroupRole {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupRole::Owner => "owner",
            GroupRole::Admin => "admin",
            GroupRole::Member => "member",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "owner" => Some(GroupRole::Owner),
            "admin" => Some(GroupRole::Admin),
            "member" => Some(GroupRole::Member),
            _ => None,
        }
    }
}

/// A group as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    pub group_id: String,
    pub name: String,
    pub owner_id: String,
    pub member_count: u32,
    pub created_ms: i64,
}

/// One member of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    pub user_id: String,
    pub role: GroupRole,
    pub joined_ms: i64,
}

/// A change to a group, stored atomically with its announcement in the group's timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupChange {
    /// Creates the group: `owner_id` becomes its owner, `members` (without the owner)
    /// members.
    Create {
        name: String,
        owner_id: String,
        members: Vec<String>,
    },
    /// Adds users as members (a join or an invitation); users already in are skipped.
    Add { user_ids: Vec<String> },
    /// Removes members (a leave or a kick); users not in are skipped. Removing the owner
    /// is refused: ownership is transferred first.
    Remove { user_ids: Vec<String> },
    /// Sets a member's role to admin or member (not owner: see `TransferOwnership`).
    SetRole { user_id: String, role: GroupRole },
    /// Makes member `to` the owner; the old owner becomes an admin.
    TransferOwnership { to: String },
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The conversation does not exist or the user is not a member.
    #[error("unknown conversation")]
    UnknownConversation,
    /// The change contradicts the stored state (a group id taken, a target who is not a
    /// member, the owner removed); the message says which.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The backend failed; the operation may be retried.
    #[error("storage backend failed: {0}")]
    Backend(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Storage operations the node needs. Implementations must be safe to call concurrently.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Records that `user_id` exists (idempotent).
    async fn upsert_user(&self, user_id: &str, now_ms: i64) -> StoreResult<()>;

    /// Whether `user_id` exists.
    async fn user_exists(&self, user_id: &str) -> StoreResult<bool>;

    /// Known users whose ids sort after `after_user_id` (all when `None`), in id order, at
    /// most `limit`, with the time each was first recorded.
    async fn list_users(
        &self,
        after_user_id: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<UserRecord>>;

    /// Stores a batch in one transaction, in order, and returns one outcome per message.
    ///
    /// Each new message gets its conversation's next seq; a message whose (sender, client
    /// message id) is already stored yields [`Appended::Duplicate`] with the original and
    /// stores nothing. A 1:1 conversation's membership is created with its first message
    /// (a group conversation's membership is the group's, never created here), and the
    /// sender's read cursor advances to the new message. The call returns only after the
    /// transaction committed (durable); on error nothing of the batch is stored.
    async fn append_messages(&self, batch: &[NewMessage]) -> StoreResult<Vec<Appended>>;

    /// The backend's background work, if it reports any.
    fn stats(&self) -> Option<StoreStats> {
        None
    }

    /// [`Store::append_messages`] taking the batch by value, so a backend may keep the
    /// messages' strings instead of copying them (the send pipeline's path).
    async fn append_owned(&self, batch: Vec<NewMessage>) -> StoreResult<Vec<Appended>> {
        self.append_messages(&batch).await
    }

    /// Messages with seq > `after_seq`, ascending, at most `limit`.
    async fn messages_after(
        &self,
        conversation_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> StoreResult<Vec<StoredMessage>>;

    /// Messages with seq < `before_seq` (all when 0), descending, at most `limit`.
    async fn messages_before(
        &self,
        conversation_id: &str,
        before_seq: u64,
        limit: u32,
    ) -> StoreResult<Vec<StoredMessage>>;

    /// The conversation's last seq (0 if it has no messages or does not exist).
    async fn last_seq(&self, conversation_id: &str) -> StoreResult<u64>;

    /// Whether `user_id` is a member of `conversation_id`.
    async fn is_member(&self, user_id: &str, conversation_id: &str) -> StoreResult<bool>;

    /// For a user removed from a group's conversation (and not added again): the seq of the
    /// announcement that removed them, up to which they may still read it.
    async fn removed_at(&self, user_id: &str, conversation_id: &str) -> StoreResult<Option<u64>>;

    /// The user's conversations ordered by last activity (newest first), then conversation
    /// id, with this device's cursor. `after` continues after an entry of an earlier page.
    async fn list_conversations(
        &self,
        user_id: &str,
        device_id: &str,
        after: Option<ListPosition<'_>>,
        limit: u32,
    ) -> StoreResult<Vec<ConversationSummary>>;

    /// Moves the user's read cursor forward to `read_seq` (never backwards, never past the
    /// last seq). Fails with [`StoreError::UnknownConversation`] for non-members.
    async fn mark_read(
        &self,
        user_id: &str,
        conversation_id: &str,
        read_seq: u64,
    ) -> StoreResult<ReadState>;

    /// A plugin's key-value records that have not expired at `now_ms`.
    async fn load_plugin_kv(&self, plugin_id: &str, now_ms: i64) -> StoreResult<Vec<KvRecord>>;

    /// Applies a plugin's key-value changes in one transaction.
    async fn write_plugin_kv(
        &self,
        plugin_id: &str,
        upserts: &[KvRecord],
        deletes: &[String],
    ) -> StoreResult<()>;

    /// Applies `change` to group `group_id` and appends `announcement` (a message in the
    /// group's conversation `g:<group_id>`, which gets the next seq) in one transaction.
    /// Returns the group after the change and the stored announcement.
    ///
    /// Members are also members of the group's conversation (it is in their conversation
    /// list, with a read cursor starting at the announcement that added them); removed
    /// members leave it. Fails with [`StoreError::UnknownConversation`] when the group does
    /// not exist (except for `Create`) and [`StoreError::Conflict`] when the change does
    /// not fit the stored state; on any error nothing is stored.
    async fn apply_group_change(
        &self,
        group_id: &str,
        change: &GroupChange,
        announcement: &NewMessage,
    ) -> StoreResult<(GroupInfo, StoredMessage)>;

    /// The group, if it exists.
    async fn group(&self, group_id: &str) -> StoreResult<Option<GroupInfo>>;

    /// A member of a group, if `user_id` is one.
    async fn group_member(&self, group_id: &str, user_id: &str)
    -> StoreResult<Option<GroupMember>>;

    /// A group's members ordered by user id, after `after_user_id` when given, at most `limit`.
    async fn group_members(
        &self,
        group_id: &str,
        after_user_id: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<GroupMember>>;

    /// The groups `user_id` is a member of, ordered by group id.
    async fn user_groups(&self, user_id: &str) -> StoreResult<Vec<GroupInfo>>;

    /// Moves delivery cursors forward (never backwards), all in one transaction.
    async fn ack_delivered(&self, cursors: &[DeliveryCursor]) -> StoreResult<()>;
}
