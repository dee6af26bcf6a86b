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

use bytes::Bytes;

pub mod conformance;
pub mod sqlite;

pub use sqlite::SqliteStore;

/// A message to store; the store assigns its seq.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// The outcome of appending one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Newly stored with the given seq.
    New(StoredMessage),
    /// The (sender, client message id) was already stored: this is the original.
    Duplicate(StoredMessage),
}

impl Appended {
    /// The stored message, new or original.
    pub fn message(&self) -> &StoredMessage {
        match self {
            Appended::New(m) | Appended::Duplicate(m) => m,
        }
    }
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

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The conversation does not exist or the user is not a member.
    #[error("unknown conversation")]
    UnknownConversation,
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

    /// Stores a batch in one transaction, in order, and returns one outcome per message.
    ///
    /// Each new message gets its conversation's next seq; a message whose (sender, client
    /// message id) is already stored yields [`Appended::Duplicate`] with the original and
    /// stores nothing. Conversation membership is created with the first message, and the
    /// sender's read cursor advances to the new message. The call returns only after the
    /// transaction committed (durable); on error nothing of the batch is stored.
    async fn append_messages(&self, batch: &[NewMessage]) -> StoreResult<Vec<Appended>>;

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

    /// Moves a device's delivery cursors forward (never backwards), one entry per
    /// (conversation, seq); applied in one transaction.
    async fn ack_delivered(
        &self,
        user_id: &str,
        device_id: &str,
        acks: &[(String, u64)],
    ) -> StoreResult<()>;
}
