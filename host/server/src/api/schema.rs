//! The JSON bodies of the HTTP API: requests, responses and the error body, with their OpenAPI schemas.

use base64::Engine as _;
use im_store::StoredMessage;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Every error answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable, machine-readable: `unauthorized`, `bad_request`, `invalid_argument`,
    /// `body_too_large`, `unknown_user`, `unknown_group`, `unknown_conversation`,
    /// `not_found`, `not_a_member`, `conflict`, `rejected`, `internal`, `unavailable`.
    pub code: String,
    /// Human-readable detail; not for program logic.
    pub message: String,
}

/// Decodes a message payload given as exactly one of `text` and `body_base64`; returns
/// the body and content type, or what is wrong with them.
pub fn decode_payload(
    text: Option<String>,
    body_base64: Option<String>,
    content_type: Option<String>,
) -> Result<(bytes::Bytes, String), String> {
    match (text, body_base64) {
        (Some(text), None) => Ok((
            text.into(),
            content_type.unwrap_or_else(|| "text/plain".into()),
        )),
        (None, Some(b64)) => {
            let body = base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|e| format!("body_base64: {e}"))?;
            Ok((
                body.into(),
                content_type.unwrap_or_else(|| "application/octet-stream".into()),
            ))
        }
        _ => Err("give exactly one of `text` and `body_base64`".into()),
    }
}

/// Push a message to users: stored in each 1:1 conversation between the sender and a
/// recipient, delivered like a message the sender sent.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PushToUsers {
    /// A known user the messages come from (create one, e.g. `system`, with PUT /v1/users/{user_id}).
    pub sender_id: String,
    /// 1..=1000 known users.
    pub user_ids: Vec<String>,
    /// Makes the push idempotent: repeating it with the same id stores nothing new and
    /// answers the original results with `duplicate` set.
    pub client_msg_id: Option<String>,
    /// A UTF-8 body (content type defaults to `text/plain`). Exactly one of `text` and `body_base64`.
    pub text: Option<String>,
    /// A binary body, standard base64 (content type defaults to `application/octet-stream`).
    pub body_base64: Option<String>,
    /// At most 128 bytes; opaque to the server.
    pub content_type: Option<String>,
}

/// Push a message to a group: stored once in the group's timeline and delivered to its
/// members. The sender need not be a member.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PushToGroup {
    /// A known user the message comes from.
    pub sender_id: String,
    pub group_id: String,
    /// Makes the push idempotent (per sender).
    pub client_msg_id: Option<String>,
    /// A UTF-8 body (content type defaults to `text/plain`). Exactly one of `text` and `body_base64`.
    pub text: Option<String>,
    /// A binary body, standard base64 (content type defaults to `application/octet-stream`).
    pub body_base64: Option<String>,
    /// At most 128 bytes; opaque to the server.
    pub content_type: Option<String>,
}

/// A system message to every online connection of this node: not stored.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PushToEveryone {
    /// A UTF-8 body (content type defaults to `text/plain`). Exactly one of `text` and `body_base64`.
    pub text: Option<String>,
    /// A binary body, standard base64 (content type defaults to `application/octet-stream`).
    pub body_base64: Option<String>,
    /// At most 128 bytes; opaque to the server.
    pub content_type: Option<String>,
}

/// A message to a live room: not stored.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PushToRoom {
    /// Shown to the room as the sender; any valid id.
    pub sender_id: String,
    /// A UTF-8 body (content type defaults to `text/plain`). Exactly one of `text` and `body_base64`.
    pub text: Option<String>,
    /// A binary body, standard base64 (content type defaults to `application/octet-stream`).
    pub body_base64: Option<String>,
    /// At most 128 bytes; opaque to the server.
    pub content_type: Option<String>,
}

/// One stored push.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Stored {
    /// The recipient (a user, or the group).
    pub target: String,
    pub conversation_id: String,
    pub seq: u64,
    pub server_msg_id: String,
    pub server_time_ms: i64,
    /// True when an earlier push with the same `client_msg_id` stored it.
    pub duplicate: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StoredList {
    /// One entry per recipient, in request order.
    pub results: Vec<Stored>,
}

/// An unstored push.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Published {
    /// The broadcast's id, or the room.
    pub id: String,
    /// Connections it was handed to.
    pub delivered: u64,
}

/// A user as the server knows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UserView {
    pub user_id: String,
    pub online: bool,
    /// Connected devices.
    pub devices: Vec<DeviceView>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeviceView {
    pub device_id: String,
    /// `tcp`, `tcp+tls`, `ws`, `wss` or `quic`.
    pub transport: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UserRecordView {
    pub user_id: String,
    /// When the user was first recorded, milliseconds since the Unix epoch.
    pub created_ms: i64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UserPage {
    pub users: Vec<UserRecordView>,
    /// Pass the last user id as `after` for the next page.
    pub has_more: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Disconnected {
    /// Connections closed (with `CLOSE_REASON_KICKED`).
    pub closed: u64,
}

/// Paging by id.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// Continue after this id.
    pub after: Option<String>,
    /// Page size, 1..=1000 (default 100).
    pub limit: Option<u32>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateGroup {
    /// Empty or absent lets the server choose.
    pub group_id: Option<String>,
    /// 1..=128 bytes.
    pub name: String,
    /// A known user who becomes the owner.
    pub owner_id: String,
    /// Initial members besides the owner (known users).
    #[serde(default)]
    pub members: Vec<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserList {
    pub user_ids: Vec<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleBody {
    /// `admin` or `member` (ownership moves with PUT /v1/groups/{group_id}/owner).
    pub role: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OwnerBody {
    /// The member who becomes the owner; the old owner becomes an admin.
    pub user_id: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GroupView {
    pub group_id: String,
    pub name: String,
    pub owner_id: String,
    pub member_count: u32,
    pub created_ms: i64,
}

impl From<&im_store::GroupInfo> for GroupView {
    fn from(g: &im_store::GroupInfo) -> Self {
        Self {
            group_id: g.group_id.clone(),
            name: g.name.clone(),
            owner_id: g.owner_id.clone(),
            member_count: g.member_count,
            created_ms: g.created_ms,
        }
    }
}

/// A stored group change.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GroupChanged {
    /// The group after the change.
    pub group: GroupView,
    /// The announcement stored in the group's timeline.
    pub event: MessageView,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MemberView {
    pub user_id: String,
    /// `owner`, `admin` or `member`.
    pub role: String,
    pub joined_ms: i64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MemberPage {
    pub members: Vec<MemberView>,
    pub has_more: bool,
}

/// A stored message.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MessageView {
    pub conversation_id: String,
    pub seq: u64,
    pub server_msg_id: String,
    pub sender_id: String,
    pub sender_device_id: String,
    pub recipient_id: String,
    pub client_msg_id: String,
    pub content_type: String,
    /// The body, when it is valid UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The body, standard base64.
    pub body_base64: String,
    pub server_time_ms: i64,
}

impl From<&StoredMessage> for MessageView {
    fn from(m: &StoredMessage) -> Self {
        Self {
            conversation_id: m.conversation_id.clone(),
            seq: m.seq,
            server_msg_id: m.server_msg_id.clone(),
            sender_id: m.sender_id.clone(),
            sender_device_id: m.sender_device_id.clone(),
            recipient_id: m.recipient_id.clone(),
            client_msg_id: m.client_msg_id.clone(),
            content_type: m.content_type.clone(),
            text: std::str::from_utf8(&m.body).ok().map(str::to_owned),
            body_base64: base64::engine::general_purpose::STANDARD.encode(&m.body),
            server_time_ms: m.server_time_ms,
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    /// Oldest first, after this seq. Not with `before_seq`.
    pub after_seq: Option<u64>,
    /// Newest first, before this seq (default: from the newest).
    pub before_seq: Option<u64>,
    /// Page size, 1..=500 (default 100).
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MessagePage {
    pub messages: Vec<MessageView>,
    pub has_more: bool,
    /// The conversation's latest seq.
    pub last_seq: u64,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PresenceQuery {
    /// Comma-separated user ids, at most 1000.
    pub user_ids: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PresenceView {
    pub user_id: String,
    pub online: bool,
    pub devices: u32,
    /// Last change since the server started (0: none).
    pub changed_ms: i64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PresenceList {
    pub states: Vec<PresenceView>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OnlinePage {
    pub users: Vec<UserView>,
    pub has_more: bool,
    /// Online users of this node.
    pub online_users: u64,
    /// Logged-in connections of this node.
    pub connections: u64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RoomView {
    pub room_id: String,
    pub members: u64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RoomPage {
    pub rooms: Vec<RoomView>,
    pub has_more: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok`, or why not.
    pub status: String,
}
