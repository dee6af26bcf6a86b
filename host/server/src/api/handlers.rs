//! The business endpoints of the HTTP API: push to users, groups, rooms and everyone; users; groups; history; presence.
//!
//! The back-end is trusted: its pushes skip the message-filter and risk plugins and its
//! group changes skip the group policy, but every structural check and limit of the
//! client protocol applies, and everything stored goes through the same pipeline (so
//! acks, seqs and pushes keep their order and dedup rules).

use std::collections::HashSet;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use im_proto::ids;
use im_proto::v1::{self, CloseReason, ErrorCode, frame::Body, group_request::Action};
use im_store::{Appended, NewMessage};
use sha2::Digest as _;
use tokio::sync::oneshot;

use super::schema::*;
use super::{ApiError, ApiState, Caller};
use crate::groups::{self, Actor};
use crate::metrics::MessageKind;
use crate::pipeline::{GroupJob, ReplyTo, SendJob};
use crate::session::{check_content, now_ms, room_push};

/// Most recipients of one push.
const MAX_PUSH_USERS: usize = 1000;
/// Default and largest pages.
const DEFAULT_PAGE: u32 = 100;
const MAX_ID_PAGE: u32 = 1000;
const MAX_MESSAGE_PAGE: u32 = 500;

type ApiResult<T> = Result<Json<T>, ApiError>;

fn unavailable() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the server is shutting down",
    )
}

fn page_limit(limit: Option<u32>, max: u32) -> Result<u32, ApiError> {
    match limit {
        None => Ok(DEFAULT_PAGE.min(max)),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::invalid(format!("limit must be 1..={max}"))),
    }
}

fn valid_id(id: &str, what: &str) -> Result<(), ApiError> {
    if ids::is_valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "{what} must be 1-64 of [A-Za-z0-9_.@-]"
        )))
    }
}

async fn known_user(state: &ApiState, user_id: &str, what: &str) -> Result<(), ApiError> {
    valid_id(user_id, what)?;
    match state.ctx.known_users.exists(user_id).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(ApiError::from_protocol(
            ErrorCode::UnknownUser,
            format!("no user {user_id:?}"),
        )),
        Err(err) => Err(ApiError::internal(err)),
    }
}

/// The body and content type of a push, checked against the limits.
fn payload(
    state: &ApiState,
    text: Option<String>,
    body_base64: Option<String>,
    content_type: Option<String>,
) -> Result<(bytes::Bytes, String), ApiError> {
    let (body, content_type) =
        decode_payload(text, body_base64, content_type).map_err(ApiError::invalid)?;
    check_content(&state.ctx.config.limits, &body, &content_type)
        .map_err(|(code, message)| ApiError::from_protocol(code, message))?;
    Ok((body, content_type))
}

/// The client message id stored for the push of `client_msg_id` to `recipient`: derived,
/// so a repeated push dedups per recipient, and always within the id length limit.
fn per_recipient_id(client_msg_id: &str, recipient: &str) -> String {
    let mut hash = sha2::Sha256::new();
    hash.update(client_msg_id.as_bytes());
    hash.update([0]);
    hash.update(recipient.as_bytes());
    format!("api-{}", &sha2_hex::encode(hash.finalize())[..40])
}

fn stored(target: &str, outcome: &Appended) -> Stored {
    let m = outcome.message();
    Stored {
        target: target.to_owned(),
        conversation_id: m.conversation_id.clone(),
        seq: m.seq,
        server_msg_id: m.server_msg_id.clone(),
        server_time_ms: m.server_time_ms,
        duplicate: matches!(outcome, Appended::Duplicate(_)),
    }
}

/// Queues `message` in the pipeline; the receiver answers once it is stored.
async fn submit(
    state: &ApiState,
    message: NewMessage,
) -> Result<oneshot::Receiver<im_store::StoreResult<Appended>>, ApiError> {
    let (reply, answer) = oneshot::channel();
    let job = SendJob {
        message,
        reply: ReplyTo::Caller(reply),
    };
    state
        .ctx
        .pipeline
        .submit(job)
        .await
        .map_err(|_| unavailable())?;
    Ok(answer)
}

async fn stored_outcome(
    answer: oneshot::Receiver<im_store::StoreResult<Appended>>,
) -> Result<Appended, ApiError> {
    answer
        .await
        .map_err(|_| unavailable())?
        .map_err(ApiError::internal)
}

fn new_message(
    conversation_id: String,
    sender_id: &str,
    recipient_id: &str,
    client_msg_id: String,
    body: bytes::Bytes,
    content_type: String,
) -> NewMessage {
    NewMessage {
        conversation_id,
        sender_id: sender_id.to_owned(),
        sender_device_id: "api".into(),
        recipient_id: recipient_id.to_owned(),
        client_msg_id,
        body,
        content_type,
        server_msg_id: uuid::Uuid::now_v7().to_string(),
        server_time_ms: now_ms(),
    }
}

fn check_client_msg_id(id: &Option<String>) -> Result<(), ApiError> {
    match id {
        Some(id) if !ids::is_valid_client_msg_id(id) => Err(ApiError::invalid(
            "client_msg_id must be 1-64 bytes without control characters",
        )),
        _ => Ok(()),
    }
}

/// Push a message to users.
#[utoipa::path(post, path = "/v1/messages/users", tag = "push", security(("api_key" = [])),
    request_body = PushToUsers,
    responses(
        (status = 200, description = "Stored for every recipient", body = StoredList),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "An unknown sender or recipient", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody)))]
pub async fn push_to_users(
    State(state): State<ApiState>,
    body: Result<Json<PushToUsers>, JsonRejection>,
) -> ApiResult<StoredList> {
    let Json(push) = body?;
    if push.user_ids.is_empty() || push.user_ids.len() > MAX_PUSH_USERS {
        return Err(ApiError::invalid(format!(
            "user_ids must list 1..={MAX_PUSH_USERS} users"
        )));
    }
    let mut seen = HashSet::new();
    if let Some(twice) = push.user_ids.iter().find(|u| !seen.insert(u.as_str())) {
        return Err(ApiError::invalid(format!("{twice:?} is listed twice")));
    }
    check_client_msg_id(&push.client_msg_id)?;
    let (body, content_type) = payload(&state, push.text, push.body_base64, push.content_type)?;
    known_user(&state, &push.sender_id, "sender_id").await?;
    for user in &push.user_ids {
        known_user(&state, user, "every user id").await?;
    }
    // Queue every recipient's message first: the pipeline commits them together.
    let mut answers = Vec::with_capacity(push.user_ids.len());
    for user in &push.user_ids {
        let client_msg_id = match &push.client_msg_id {
            Some(id) => per_recipient_id(id, user),
            None => format!("api-{}", uuid::Uuid::now_v7().simple()),
        };
        let message = new_message(
            ids::direct_conversation_id(&push.sender_id, user),
            &push.sender_id,
            user,
            client_msg_id,
            body.clone(),
            content_type.clone(),
        );
        answers.push(submit(&state, message).await?);
    }
    let mut results = Vec::with_capacity(answers.len());
    for (user, answer) in push.user_ids.iter().zip(answers) {
        results.push(stored(user, &stored_outcome(answer).await?));
    }
    Ok(Json(StoredList { results }))
}

/// Push a message to a group.
#[utoipa::path(post, path = "/v1/messages/group", tag = "push", security(("api_key" = [])),
    request_body = PushToGroup,
    responses(
        (status = 200, description = "Stored in the group's timeline", body = Stored),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "An unknown sender or group", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody)))]
pub async fn push_to_group(
    State(state): State<ApiState>,
    body: Result<Json<PushToGroup>, JsonRejection>,
) -> ApiResult<Stored> {
    let Json(push) = body?;
    check_client_msg_id(&push.client_msg_id)?;
    valid_id(&push.group_id, "group_id")?;
    let (body, content_type) = payload(&state, push.text, push.body_base64, push.content_type)?;
    known_user(&state, &push.sender_id, "sender_id").await?;
    match state.ctx.groups.members(&push.group_id).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return Err(ApiError::from_protocol(
                ErrorCode::UnknownGroup,
                format!("no group {:?}", push.group_id),
            ));
        }
        Err(err) => return Err(ApiError::internal(err)),
    }
    // Derived per group: the store dedups per (sender, id) across all conversations.
    let client_msg_id = match &push.client_msg_id {
        Some(id) => per_recipient_id(id, &ids::group_conversation_id(&push.group_id)),
        None => format!("api-{}", uuid::Uuid::now_v7().simple()),
    };
    let message = new_message(
        ids::group_conversation_id(&push.group_id),
        &push.sender_id,
        &push.group_id,
        client_msg_id,
        body,
        content_type,
    );
    let outcome = stored_outcome(submit(&state, message).await?).await?;
    Ok(Json(stored(&push.group_id, &outcome)))
}

/// Broadcast a system message to every online connection (not stored).
#[utoipa::path(post, path = "/v1/messages/broadcast", tag = "push", security(("api_key" = [])),
    request_body = PushToEveryone,
    responses(
        (status = 200, description = "Handed to every online connection", body = Published),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody)))]
pub async fn push_to_everyone(
    State(state): State<ApiState>,
    body: Result<Json<PushToEveryone>, JsonRejection>,
) -> ApiResult<Published> {
    let Json(push) = body?;
    let (body, content_type) = payload(&state, push.text, push.body_base64, push.content_type)?;
    let broadcast_id = uuid::Uuid::now_v7().to_string();
    let frame = v1::Frame::new(
        0,
        Body::Broadcast(v1::Broadcast {
            broadcast_id: broadcast_id.clone(),
            body,
            content_type,
            server_time_ms: now_ms(),
        }),
    )
    .to_bytes();
    let mut delivered = 0u64;
    state.ctx.router.for_each_connection(|conn| {
        if conn.offer(crate::router::Outbound::Frame(frame.clone())) {
            delivered += 1;
        }
    });
    let metrics = &state.ctx.metrics;
    metrics.message_in(MessageKind::Broadcast, 1);
    metrics.message_out(MessageKind::Broadcast, delivered);
    Ok(Json(Published {
        id: broadcast_id,
        delivered,
    }))
}

/// Live rooms with at least one connection, in id order.
#[utoipa::path(get, path = "/v1/rooms", tag = "rooms", security(("api_key" = [])),
    params(PageQuery),
    responses(
        (status = 200, description = "A page of rooms", body = RoomPage),
        (status = 400, description = "Invalid paging", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody)))]
pub async fn list_rooms(
    State(state): State<ApiState>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> ApiResult<RoomPage> {
    let Query(page) = query?;
    let limit = page_limit(page.limit, MAX_ID_PAGE)? as usize;
    let mut rooms = state.ctx.rooms.list(page.after.as_deref(), limit + 1);
    let has_more = rooms.len() > limit;
    rooms.truncate(limit);
    Ok(Json(RoomPage {
        rooms: rooms
            .into_iter()
            .map(|r| RoomView {
                room_id: r.room_id,
                members: r.members as u64,
            })
            .collect(),
        has_more,
    }))
}

/// Send a message to whoever is in a live room now (not stored).
#[utoipa::path(post, path = "/v1/rooms/{room_id}/messages", tag = "rooms", security(("api_key" = [])),
    params(("room_id" = String, Path, description = "The room")),
    request_body = PushToRoom,
    responses(
        (status = 200, description = "Handed to the room's connections", body = Published),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "No one is in the room", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody)))]
pub async fn push_to_room(
    State(state): State<ApiState>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    body: Result<Json<PushToRoom>, JsonRejection>,
) -> ApiResult<Published> {
    let Path(room_id) = path?;
    let Json(push) = body?;
    valid_id(&room_id, "room_id")?;
    valid_id(&push.sender_id, "sender_id")?;
    let (body, content_type) = payload(&state, push.text, push.body_base64, push.content_type)?;
    let (_, delivered) = state
        .ctx
        .rooms
        .publish(&room_id, None, |seq| {
            room_push(&room_id, (&push.sender_id, "api"), body, content_type, seq)
        })
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no one is in room {room_id:?}"),
            )
        })?;
    let metrics = &state.ctx.metrics;
    metrics.message_in(MessageKind::Room, 1);
    metrics.message_out(MessageKind::Room, delivered as u64);
    Ok(Json(Published {
        id: room_id,
        delivered: delivered as u64,
    }))
}

/// Known users, in id order.
#[utoipa::path(get, path = "/v1/users", tag = "users", security(("api_key" = [])),
    params(PageQuery),
    responses(
        (status = 200, description = "A page of users", body = UserPage),
        (status = 400, description = "Invalid paging", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody)))]
pub async fn list_users(
    State(state): State<ApiState>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> ApiResult<UserPage> {
    let Query(page) = query?;
    let limit = page_limit(page.limit, MAX_ID_PAGE)?;
    let mut users = state
        .ctx
        .store
        .list_users(page.after.as_deref(), limit + 1)
        .await
        .map_err(ApiError::internal)?;
    let has_more = users.len() > limit as usize;
    users.truncate(limit as usize);
    Ok(Json(UserPage {
        users: users
            .into_iter()
            .map(|u| UserRecordView {
                user_id: u.user_id,
                created_ms: u.created_ms,
            })
            .collect(),
        has_more,
    }))
}

fn user_view(state: &ApiState, user_id: &str) -> UserView {
    let mut devices = Vec::new();
    state.ctx.router.for_each_device(user_id, |d| {
        devices.push(DeviceView {
            device_id: d.device_id.to_string(),
            transport: d.transport.as_str().to_owned(),
        })
    });
    devices.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    UserView {
        user_id: user_id.to_owned(),
        online: !devices.is_empty(),
        devices,
    }
}

/// Create a user (idempotent): it can then receive messages and be added to groups
/// before it first logs in.
#[utoipa::path(put, path = "/v1/users/{user_id}", tag = "users", security(("api_key" = [])),
    params(("user_id" = String, Path, description = "The user")),
    responses(
        (status = 200, description = "The user exists", body = UserView),
        (status = 400, description = "Invalid id", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody)))]
pub async fn put_user(
    State(state): State<ApiState>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> ApiResult<UserView> {
    let Path(user_id) = path?;
    valid_id(&user_id, "user_id")?;
    state
        .ctx
        .known_users
        .register(&user_id.as_str().into())
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(user_view(&state, &user_id)))
}

/// A user and its connected devices.
#[utoipa::path(get, path = "/v1/users/{user_id}", tag = "users", security(("api_key" = [])),
    params(("user_id" = String, Path, description = "The user")),
    responses(
        (status = 200, description = "The user", body = UserView),
        (status = 400, description = "Invalid id", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown user", body = ErrorBody)))]
pub async fn get_user(
    State(state): State<ApiState>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> ApiResult<UserView> {
    let Path(user_id) = path?;
    known_user(&state, &user_id, "user_id").await?;
    Ok(Json(user_view(&state, &user_id)))
}

/// Close every connection of a user (`CLOSE_REASON_KICKED`; clients do not reconnect by
/// themselves after it).
#[utoipa::path(post, path = "/v1/users/{user_id}/disconnect", tag = "users", security(("api_key" = [])),
    params(("user_id" = String, Path, description = "The user")),
    responses(
        (status = 200, description = "Connections closed", body = Disconnected),
        (status = 400, description = "Invalid id", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown user", body = ErrorBody)))]
pub async fn disconnect_user(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> ApiResult<Disconnected> {
    let Path(user_id) = path?;
    known_user(&state, &user_id, "user_id").await?;
    let message = format!("disconnected by the operator ({})", caller.key_name);
    let closed = state
        .ctx
        .router
        .close_user(&user_id, CloseReason::Kicked, &message);
    tracing::info!(user = %user_id, key = %caller.key_name, closed, "disconnected a user");
    Ok(Json(Disconnected {
        closed: closed as u64,
    }))
}

/// Prepares a group change as the operator and stores it through the pipeline.
async fn change_group(
    state: &ApiState,
    caller: &Caller,
    owner: Option<&str>,
    request: v1::GroupRequest,
) -> ApiResult<GroupChanged> {
    let actor = Actor::Operator {
        key_name: &caller.key_name,
        owner,
    };
    let prepared = groups::prepare(&state.ctx, actor, request)
        .await
        .map_err(|refusal| ApiError::from_protocol(refusal.code, refusal.message))?;
    let (reply, answer) = oneshot::channel();
    let job = GroupJob {
        prepared,
        reply: ReplyTo::Caller(reply),
    };
    state
        .ctx
        .pipeline
        .submit_group(job)
        .await
        .map_err(|_| unavailable())?;
    match answer.await.map_err(|_| unavailable())? {
        Ok((group, event)) => Ok(Json(GroupChanged {
            group: GroupView::from(&group),
            event: MessageView::from(&event),
        })),
        Err(im_store::StoreError::UnknownConversation) => Err(ApiError::from_protocol(
            ErrorCode::UnknownGroup,
            "no such group",
        )),
        Err(im_store::StoreError::Conflict(why)) => {
            Err(ApiError::from_protocol(ErrorCode::Conflict, why))
        }
        Err(err) => Err(ApiError::internal(err)),
    }
}

/// Create a group owned by a user.
#[utoipa::path(post, path = "/v1/groups", tag = "groups", security(("api_key" = [])),
    request_body = CreateGroup,
    responses(
        (status = 200, description = "Created and announced", body = GroupChanged),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "An unknown owner or member", body = ErrorBody),
        (status = 409, description = "The id is taken, or the group would be too large", body = ErrorBody)))]
pub async fn create_group(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<CreateGroup>, JsonRejection>,
) -> ApiResult<GroupChanged> {
    let Json(create) = body?;
    let request = v1::GroupRequest {
        group_id: create.group_id.unwrap_or_default(),
        action: Some(Action::Create(v1::CreateGroup {
            name: create.name,
            members: create.members,
        })),
    };
    change_group(&state, &caller, Some(&create.owner_id), request).await
}

async fn existing_group(state: &ApiState, group_id: &str) -> Result<im_store::GroupInfo, ApiError> {
    valid_id(group_id, "group_id")?;
    match state.ctx.store.group(group_id).await {
        Ok(Some(group)) => Ok(group),
        Ok(None) => Err(ApiError::from_protocol(
            ErrorCode::UnknownGroup,
            format!("no group {group_id:?}"),
        )),
        Err(err) => Err(ApiError::internal(err)),
    }
}

/// A group.
#[utoipa::path(get, path = "/v1/groups/{group_id}", tag = "groups", security(("api_key" = [])),
    params(("group_id" = String, Path, description = "The group")),
    responses(
        (status = 200, description = "The group", body = GroupView),
        (status = 400, description = "Invalid id", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown group", body = ErrorBody)))]
pub async fn get_group(
    State(state): State<ApiState>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> ApiResult<GroupView> {
    let Path(group_id) = path?;
    Ok(Json(GroupView::from(
        &existing_group(&state, &group_id).await?,
    )))
}

/// A page of a group's members, in user id order.
#[utoipa::path(get, path = "/v1/groups/{group_id}/members", tag = "groups", security(("api_key" = [])),
    params(("group_id" = String, Path, description = "The group"), PageQuery),
    responses(
        (status = 200, description = "A page of members", body = MemberPage),
        (status = 400, description = "Invalid id or paging", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown group", body = ErrorBody)))]
pub async fn list_members(
    State(state): State<ApiState>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> ApiResult<MemberPage> {
    let Path(group_id) = path?;
    let Query(page) = query?;
    let limit = page_limit(page.limit, MAX_ID_PAGE)?;
    existing_group(&state, &group_id).await?;
    let mut members = state
        .ctx
        .store
        .group_members(&group_id, page.after.as_deref(), limit + 1)
        .await
        .map_err(ApiError::internal)?;
    let has_more = members.len() > limit as usize;
    members.truncate(limit as usize);
    Ok(Json(MemberPage {
        members: members
            .into_iter()
            .map(|m| MemberView {
                user_id: m.user_id,
                role: m.role.as_str().to_owned(),
                joined_ms: m.joined_ms,
            })
            .collect(),
        has_more,
    }))
}

/// Add members (each must be a known user and not yet a member).
#[utoipa::path(post, path = "/v1/groups/{group_id}/members", tag = "groups", security(("api_key" = [])),
    params(("group_id" = String, Path, description = "The group")),
    request_body = UserList,
    responses(
        (status = 200, description = "Added and announced", body = GroupChanged),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown group or user", body = ErrorBody),
        (status = 409, description = "Already a member, or the group would be too large", body = ErrorBody)))]
pub async fn add_members(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    body: Result<Json<UserList>, JsonRejection>,
) -> ApiResult<GroupChanged> {
    let Path(group_id) = path?;
    let Json(list) = body?;
    let request = v1::GroupRequest {
        group_id,
        action: Some(Action::Invite(v1::GroupUsers {
            user_ids: list.user_ids,
        })),
    };
    change_group(&state, &caller, None, request).await
}

/// Remove a member.
#[utoipa::path(delete, path = "/v1/groups/{group_id}/members/{user_id}", tag = "groups", security(("api_key" = [])),
    params(("group_id" = String, Path, description = "The group"), ("user_id" = String, Path, description = "The member")),
    responses(
        (status = 200, description = "Removed and announced", body = GroupChanged),
        (status = 400, description = "Invalid id", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown group", body = ErrorBody),
        (status = 409, description = "Not a member, or the owner", body = ErrorBody)))]
pub async fn remove_member(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
) -> ApiResult<GroupChanged> {
    let Path((group_id, user_id)) = path?;
    let request = v1::GroupRequest {
        group_id,
        action: Some(Action::Kick(v1::GroupUsers {
            user_ids: vec![user_id],
        })),
    };
    change_group(&state, &caller, None, request).await
}

/// Make a member an admin or a plain member.
#[utoipa::path(put, path = "/v1/groups/{group_id}/members/{user_id}/role", tag = "groups", security(("api_key" = [])),
    params(("group_id" = String, Path, description = "The group"), ("user_id" = String, Path, description = "The member")),
    request_body = RoleBody,
    responses(
        (status = 200, description = "Changed and announced", body = GroupChanged),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown group", body = ErrorBody),
        (status = 409, description = "Not a member, or the owner", body = ErrorBody)))]
pub async fn set_role(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
    body: Result<Json<RoleBody>, JsonRejection>,
) -> ApiResult<GroupChanged> {
    let Path((group_id, user_id)) = path?;
    let Json(role) = body?;
    let role = match role.role.as_str() {
        "admin" => v1::GroupRole::Admin,
        "member" => v1::GroupRole::Member,
        _ => return Err(ApiError::invalid("role must be \"admin\" or \"member\"")),
    };
    let request = v1::GroupRequest {
        group_id,
        action: Some(Action::SetRole(v1::RoleChange {
            user_id,
            role: role as i32,
        })),
    };
    change_group(&state, &caller, None, request).await
}

/// Transfer ownership to a member.
#[utoipa::path(put, path = "/v1/groups/{group_id}/owner", tag = "groups", security(("api_key" = [])),
    params(("group_id" = String, Path, description = "The group")),
    request_body = OwnerBody,
    responses(
        (status = 200, description = "Transferred and announced", body = GroupChanged),
        (status = 400, description = "Malformed or invalid request", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown group", body = ErrorBody),
        (status = 409, description = "Not a member", body = ErrorBody)))]
pub async fn transfer_owner(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    body: Result<Json<OwnerBody>, JsonRejection>,
) -> ApiResult<GroupChanged> {
    let Path(group_id) = path?;
    let Json(owner) = body?;
    let request = v1::GroupRequest {
        group_id,
        action: Some(Action::TransferTo(owner.user_id)),
    };
    change_group(&state, &caller, None, request).await
}

/// A page of a conversation's messages (`u:<a>:<b>` or `g:<group>`).
#[utoipa::path(get, path = "/v1/conversations/{conversation_id}/messages", tag = "history", security(("api_key" = [])),
    params(("conversation_id" = String, Path, description = "`u:<a>:<b>` (a < b) or `g:<group>`"), HistoryQuery),
    responses(
        (status = 200, description = "A page of messages", body = MessagePage),
        (status = 400, description = "Invalid id or paging", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody)))]
pub async fn history(
    State(state): State<ApiState>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> ApiResult<MessagePage> {
    let Path(conversation_id) = path?;
    let Query(query) = query?;
    let valid = ids::direct_conversation_users(&conversation_id).is_some()
        || ids::conversation_group(&conversation_id).is_some_and(ids::is_valid_id);
    if !valid {
        return Err(ApiError::invalid(
            "conversation_id must be u:<a>:<b> with a < b, or g:<group>",
        ));
    }
    let limit = page_limit(query.limit, MAX_MESSAGE_PAGE)?;
    // Seqs are stored as SQL integers: larger values are no seq at all.
    if [query.after_seq, query.before_seq]
        .iter()
        .flatten()
        .any(|seq| *seq > i64::MAX as u64)
    {
        return Err(ApiError::invalid(
            "after_seq and before_seq are at most 2^63 - 1",
        ));
    }
    let store = &state.ctx.store;
    let last_seq = store
        .last_seq(&conversation_id)
        .await
        .map_err(ApiError::internal)?;
    let mut messages = match (query.after_seq, query.before_seq) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "give at most one of after_seq and before_seq",
            ));
        }
        (Some(after), None) => {
            let mut page = store
                .messages_after(&conversation_id, after, limit + 1)
                .await
                .map_err(ApiError::internal)?;
            page.retain(|m| m.seq <= last_seq);
            page
        }
        (None, before) => store
            .messages_before(&conversation_id, before.unwrap_or(0), limit + 1)
            .await
            .map_err(ApiError::internal)?,
    };
    let has_more = messages.len() > limit as usize;
    messages.truncate(limit as usize);
    Ok(Json(MessagePage {
        messages: messages.iter().map(MessageView::from).collect(),
        has_more,
        last_seq,
    }))
}

/// The presence of listed users.
#[utoipa::path(get, path = "/v1/presence", tag = "presence", security(("api_key" = [])),
    params(PresenceQuery),
    responses(
        (status = 200, description = "One state per user, in request order", body = PresenceList),
        (status = 400, description = "Invalid ids", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody)))]
pub async fn presence(
    State(state): State<ApiState>,
    query: Result<Query<PresenceQuery>, QueryRejection>,
) -> ApiResult<PresenceList> {
    let Query(query) = query?;
    let users: Vec<&str> = query.user_ids.split(',').collect();
    if users.len() > MAX_PUSH_USERS {
        return Err(ApiError::invalid(format!(
            "at most {MAX_PUSH_USERS} users per request"
        )));
    }
    for user in &users {
        valid_id(user, "every user id")?;
    }
    let states = users
        .iter()
        .map(|user| {
            let s = state.ctx.router.presence(user);
            PresenceView {
                user_id: s.user_id,
                online: s.online,
                devices: s.devices,
                changed_ms: s.changed_ms,
            }
        })
        .collect();
    Ok(Json(PresenceList { states }))
}

/// Who is online on this node, in user id order.
#[utoipa::path(get, path = "/v1/online", tag = "presence", security(("api_key" = [])),
    params(PageQuery),
    responses(
        (status = 200, description = "A page of online users", body = OnlinePage),
        (status = 400, description = "Invalid paging", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody)))]
pub async fn online(
    State(state): State<ApiState>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> ApiResult<OnlinePage> {
    let Query(page) = query?;
    let limit = page_limit(page.limit, MAX_ID_PAGE)? as usize;
    let router = &state.ctx.router;
    let mut users = router.online_users(page.after.as_deref(), limit + 1);
    let has_more = users.len() > limit;
    users.truncate(limit);
    let (online_users, connections) = router.counts();
    Ok(Json(OnlinePage {
        users: users
            .into_iter()
            .map(|u| UserView {
                user_id: u.user_id,
                online: true,
                devices: u
                    .devices
                    .into_iter()
                    .map(|(device_id, transport)| DeviceView {
                        device_id,
                        transport: transport.to_owned(),
                    })
                    .collect(),
            })
            .collect(),
        has_more,
        online_users: online_users as u64,
        connections: connections as u64,
    }))
}
