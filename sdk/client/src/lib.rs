//! Async Rust client for the im.v1 protocol: connect over TCP, TLS, WebSocket or QUIC, log in, send reliably, receive in order.
//!
//! Layout:
//! - this file: [`Client`], [`ClientConfig`], [`Event`], [`ClientError`];
//! - [`conn`]: dialing the transports and moving whole frames;
//! - `driver`: the background task that owns the connection, reconnects and resumes;
//! - [`timeline`]: sans-IO ordering that makes delivery in-order and exactly-once.
//!
//! Guarantees to the application: [`Event::Message`]s of a conversation arrive in seq order,
//! each once per `Client`, across reconnects; [`Client::send`] resolves only once the server
//! stored the message, resending with the same client message id (so never storing twice)
//! until then. Messages this client sent are not echoed as events.
//!
//! ```no_run
//! # async fn demo() -> Result<(), im_client::ClientError> {
//! use im_client::{Client, ClientConfig, Event};
//! let config = ClientConfig::new("tcp://127.0.0.1:7100", "<token>", "laptop")?;
//! let (client, mut events) = Client::connect(config).await?;
//! client.send_text("bob", "hello").await?;
//! while let Some(event) = events.next().await {
//!     if let Event::Message(m) = event {
//!         println!("{}: {}", m.sender_id, String::from_utf8_lossy(&m.body));
//!     }
//! }
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use im_proto::v1::frame::Body;
pub use im_proto::{ids, v1};
use tokio::sync::{mpsc, oneshot};

pub mod conn;
mod driver;
pub mod timeline;

pub use conn::{Connection, ServerUrl, Trust};

/// Where a fresh client starts reading the conversations that already exist.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Resume {
    /// After what this device acknowledged before (the server's delivery cursor).
    #[default]
    DeviceCursor,
    /// Only messages that arrive from now on.
    Latest,
    /// Every stored message.
    Beginning,
}

/// How to connect and behave.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub server: ServerUrl,
    pub token: String,
    pub device_id: String,
    pub trust: Trust,
    /// Where to start in existing conversations on the first connection.
    pub resume: Resume,
    /// Conversation cursors the application already holds (conversation id -> last seq);
    /// they take precedence over `resume`.
    pub cursors: HashMap<String, u64>,
    /// Reconnect after a lost connection (not after `AUTH_FAILED` or `REPLACED`).
    pub reconnect: bool,
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
    /// Resend an unacknowledged send after this long.
    pub ack_timeout: Duration,
    /// Give up on a send after this long.
    pub send_deadline: Duration,
    /// Fail other requests after this long.
    pub request_timeout: Duration,
    /// Ping interval; `None` uses a third of the server's idle timeout.
    pub heartbeat: Option<Duration>,
    /// Largest frame accepted from the server.
    pub max_frame_bytes: usize,
    /// Share one QUIC endpoint (one UDP socket) among many clients.
    pub quic_endpoint: Option<quinn::Endpoint>,
    pub client_info: String,
    /// Events buffered for the application before the client stops reading the network.
    pub event_buffer: usize,
}

impl ClientConfig {
    /// A configuration with defaults, for `server` like `tcp://host:7100`, `ws://host:7101`,
    /// `quic://host:7102`, `tls://…` or `wss://…`.
    pub fn new(
        server: &str,
        token: impl Into<String>,
        device_id: impl Into<String>,
    ) -> Result<Self, ClientError> {
        Ok(Self {
            server: server.parse()?,
            token: token.into(),
            device_id: device_id.into(),
            trust: Trust::default(),
            resume: Resume::default(),
            cursors: HashMap::new(),
            reconnect: true,
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(5),
            send_deadline: Duration::from_secs(120),
            request_timeout: Duration::from_secs(15),
            heartbeat: None,
            // The largest frame a server can be configured to send; the reader allocates
            // per frame, so a generous limit costs nothing.
            max_frame_bytes: 16 * 1024 * 1024,
            quic_endpoint: None,
            client_info: format!("im-client/{}", env!("CARGO_PKG_VERSION")),
            event_buffer: 4096,
        })
    }
}

/// What the client tells the application.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A message from someone else, or from this user's other devices; in seq order per
    /// conversation, once.
    Message(v1::Message),
    /// Logged in (again); `resumed` is true after a reconnect.
    Connected { user_id: String, resumed: bool },
    /// The connection was lost; the client is reconnecting if configured to.
    Disconnected { reason: String },
    /// A watched user came online or went offline (see [`Client::watch_presence`]); after a
    /// reconnect, the current state of every watched user.
    Presence(v1::PresenceState),
    /// A message in a live room this client is in (not stored: nothing is re-sent).
    RoomMessage(v1::RoomMessage),
    /// A system broadcast to everyone online (not stored).
    Broadcast(v1::Broadcast),
    /// The server closed the session for good (for example `REPLACED`); no more events.
    Closed {
        reason: v1::CloseReason,
        message: String,
    },
}

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("server closed the session: {reason:?}: {message}")]
    Closed {
        reason: v1::CloseReason,
        message: String,
    },
    #[error("server refused: {code:?}: {message}")]
    Server {
        code: v1::ErrorCode,
        message: String,
    },
    #[error("no answer in time")]
    Timeout,
    #[error("connection lost before the answer")]
    Disconnected,
    #[error("the client is shut down")]
    Shutdown,
    #[error("unexpected answer from the server")]
    UnexpectedAnswer,
}

impl ClientError {
    /// The server's error code, if the server refused the request.
    pub fn code(&self) -> Option<v1::ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A conversation-list request continuing after `after`.
pub(crate) fn list_request(
    limit: u32,
    after: Option<&v1::Conversation>,
) -> v1::ListConversationsRequest {
    let before_time_ms = after
        .and_then(|c| c.last_message.as_ref())
        .map_or(0, |m| m.server_time_ms);
    v1::ListConversationsRequest {
        limit,
        before_time_ms,
        after_conversation_id: after.map(|c| c.conversation_id.clone()).unwrap_or_default(),
    }
}

pub(crate) type Reply = oneshot::Sender<Result<Body, ClientError>>;

pub(crate) enum Command {
    Send {
        client_msg_id: String,
        target: v1::send_request::Target,
        body: Bytes,
        content_type: String,
        reply: oneshot::Sender<Result<v1::SendAck, ClientError>>,
    },
    Request {
        body: Body,
        reply: Reply,
    },
    Cursors {
        reply: oneshot::Sender<HashMap<String, u64>>,
    },
    Close {
        done: oneshot::Sender<()>,
    },
}

/// A connected client. Cheap to clone; the connection closes when the last clone is
/// dropped or [`Client::close`] is called.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    user_id: Arc<str>,
    device_id: Arc<str>,
    login: Arc<v1::LoginResponse>,
    next_client_id: Arc<AtomicU64>,
    client_id_prefix: Arc<str>,
}

/// The ack of a queued send (see [`Client::queue_send`]).
pub struct PendingAck {
    answer: oneshot::Receiver<Result<v1::SendAck, ClientError>>,
}

impl std::future::Future for PendingAck {
    type Output = Result<v1::SendAck, ClientError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.answer)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(ClientError::Shutdown)))
    }
}

/// The stream of [`Event`]s.
pub struct Events {
    rx: mpsc::Receiver<Event>,
}

impl Events {
    /// The next event; `None` once the client is closed.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next message, skipping connection events; `None` once closed.
    pub async fn next_message(&mut self) -> Option<v1::Message> {
        loop {
            match self.rx.recv().await? {
                Event::Message(m) => return Some(m),
                Event::Closed { .. } => return None,
                _ => continue,
            }
        }
    }
}

impl Client {
    /// Connects and logs in. Fails if the first connection or login fails; later losses
    /// are repaired in the background.
    pub async fn connect(config: ClientConfig) -> Result<(Client, Events), ClientError> {
        let (conn, login) = driver::establish(&config).await?;
        let (commands, commands_rx) = mpsc::channel(1024);
        let (events_tx, rx) = mpsc::channel(config.event_buffer.max(1));
        let client = Client {
            commands,
            user_id: login.user_id.as_str().into(),
            device_id: login.device_id.as_str().into(),
            login: Arc::new(login.clone()),
            next_client_id: Arc::new(AtomicU64::new(1)),
            client_id_prefix: format!("{:016x}", rand::random::<u64>()).into(),
        };
        tokio::spawn(driver::Driver::new(config, commands_rx, events_tx).run(conn, login));
        Ok((client, Events { rx }))
    }

    /// The logged-in user.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// What the server said at login (limits, idle timeout).
    pub fn login_info(&self) -> &v1::LoginResponse {
        &self.login
    }

    /// A fresh client message id, unique per client instance.
    pub fn new_client_msg_id(&self) -> String {
        format!(
            "{}-{}",
            self.client_id_prefix,
            self.next_client_id.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Sends a UTF-8 text message to `to`.
    pub async fn send_text(&self, to: &str, text: &str) -> Result<v1::SendAck, ClientError> {
        self.send(to, Bytes::copy_from_slice(text.as_bytes()), "text/plain")
            .await
    }

    /// Sends a message with a generated client message id; resolves once it is stored.
    pub async fn send(
        &self,
        to: &str,
        body: Bytes,
        content_type: &str,
    ) -> Result<v1::SendAck, ClientError> {
        self.send_with_id(to, &self.new_client_msg_id(), body, content_type)
            .await
    }

    /// Sends with the caller's client message id (idempotent: repeating it returns the
    /// original ack with `duplicate` set).
    pub async fn send_with_id(
        &self,
        to: &str,
        client_msg_id: &str,
        body: Bytes,
        content_type: &str,
    ) -> Result<v1::SendAck, ClientError> {
        self.queue_send(to, client_msg_id, body, content_type)
            .await?
            .await
    }

    /// Queues a send and returns at once with a future of its ack, so many sends can be in
    /// flight; they are written, stored and acknowledged in the order they were queued.
    pub async fn queue_send(
        &self,
        to: &str,
        client_msg_id: &str,
        body: Bytes,
        content_type: &str,
    ) -> Result<PendingAck, ClientError> {
        let target = v1::send_request::Target::ToUser(to.to_owned());
        self.queue_send_to(target, client_msg_id, body, content_type)
            .await
    }

    /// Sends a message to a group the user is a member of; resolves once it is stored.
    pub async fn send_to_group(
        &self,
        group_id: &str,
        body: Bytes,
        content_type: &str,
    ) -> Result<v1::SendAck, ClientError> {
        let target = v1::send_request::Target::ToGroup(group_id.to_owned());
        self.queue_send_to(target, &self.new_client_msg_id(), body, content_type)
            .await?
            .await
    }

    /// Queues a send to a user or a group (see [`Client::queue_send`]).
    pub async fn queue_send_to(
        &self,
        target: v1::send_request::Target,
        client_msg_id: &str,
        body: Bytes,
        content_type: &str,
    ) -> Result<PendingAck, ClientError> {
        let (reply, answer) = oneshot::channel();
        let command = Command::Send {
            client_msg_id: client_msg_id.to_owned(),
            target,
            body,
            content_type: content_type.to_owned(),
            reply,
        };
        self.commands
            .send(command)
            .await
            .map_err(|_| ClientError::Shutdown)?;
        Ok(PendingAck { answer })
    }

    async fn request(&self, body: Body) -> Result<Body, ClientError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Request { body, reply })
            .await
            .map_err(|_| ClientError::Shutdown)?;
        answer.await.map_err(|_| ClientError::Shutdown)?
    }

    /// Messages of a conversation after `after_seq`, oldest first.
    pub async fn sync(
        &self,
        conversation_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<v1::SyncResponse, ClientError> {
        let body = Body::Sync(v1::SyncRequest {
            conversation_id: conversation_id.to_owned(),
            after_seq,
            limit,
        });
        match self.request(body).await? {
            Body::SyncResult(r) => Ok(r),
            _ => Err(ClientError::UnexpectedAnswer),
        }
    }

    /// Messages of a conversation before `before_seq` (0: the newest), newest first.
    pub async fn history(
        &self,
        conversation_id: &str,
        before_seq: u64,
        limit: u32,
    ) -> Result<v1::HistoryResponse, ClientError> {
        let body = Body::History(v1::HistoryRequest {
            conversation_id: conversation_id.to_owned(),
            before_seq,
            limit,
        });
        match self.request(body).await? {
            Body::HistoryResult(r) => Ok(r),
            _ => Err(ClientError::UnexpectedAnswer),
        }
    }

    /// One page of this user's conversations, most recent first; pass the last entry of
    /// the previous page as `after` to continue.
    pub async fn list_conversations(
        &self,
        limit: u32,
        after: Option<&v1::Conversation>,
    ) -> Result<v1::ListConversationsResponse, ClientError> {
        let body = Body::ListConversations(list_request(limit, after));
        match self.request(body).await? {
            Body::Conversations(r) => Ok(r),
            _ => Err(ClientError::UnexpectedAnswer),
        }
    }

    /// Advances this user's read cursor.
    pub async fn mark_read(
        &self,
        conversation_id: &str,
        read_seq: u64,
    ) -> Result<v1::MarkReadResponse, ClientError> {
        let body = Body::MarkRead(v1::MarkReadRequest {
            conversation_id: conversation_id.to_owned(),
            read_seq,
        });
        match self.request(body).await? {
            Body::MarkReadOk(r) => Ok(r),
            _ => Err(ClientError::UnexpectedAnswer),
        }
    }

    /// Asks for a group change (create, join, invite, leave, kick, role change, ownership
    /// transfer); answers with the group after it and the announcement stored in its
    /// timeline.
    pub async fn group_request(
        &self,
        request: v1::GroupRequest,
    ) -> Result<v1::GroupResponse, ClientError> {
        match self.request(Body::Group(request)).await? {
            Body::GroupResult(r) => Ok(r),
            _ => Err(ClientError::UnexpectedAnswer),
        }
    }

    /// Creates a group named `name` with this user as owner and `members` as members;
    /// `group_id` empty lets the server choose the id.
    pub async fn create_group(
        &self,
        group_id: &str,
        name: &str,
        members: &[&str],
    ) -> Result<v1::GroupResponse, ClientError> {
        self.group_request(v1::GroupRequest {
            group_id: group_id.to_owned(),
            action: Some(v1::group_request::Action::Create(v1::CreateGroup {
                name: name.to_owned(),
                members: members.iter().map(|m| (*m).to_owned()).collect(),
            })),
        })
        .await
    }

    /// One page of a group's members, ordered by user id, after `after_user_id`.
    pub async fn group_members(
        &self,
        group_id: &str,
        after_user_id: &str,
        limit: u32,
    ) -> Result<v1::ListGroupMembersResponse, ClientError> {
        let body = Body::ListGroupMembers(v1::ListGroupMembersRequest {
            group_id: group_id.to_owned(),
            after_user_id: after_user_id.to_owned(),
            limit,
        });
        match self.request(body).await? {
            Body::GroupMembers(r) => Ok(r),
            _ => Err(ClientError::UnexpectedAnswer),
        }
    }

    /// The groups this user is a member of.
    pub async fn groups(&self) -> Result<Vec<v1::Group>, ClientError> {
        match self
            .request(Body::ListGroups(v1::ListGroupsRequest {}))
            .await?
        {
            Body::Groups(r) => Ok(r.groups),
            _ => Err(ClientError::UnexpectedAnswer),
        }
    }

    /// Starts watching the presence of `add` and stops watching `remove`; answers the
    /// current state of each user in `add`. Changes arrive as [`Event::Presence`]; the
    /// watches survive reconnects.
    pub async fn watch_presence(
        &self,
        add: &[&str],
        remove: &[&str],
    ) -> Result<v1::PresenceSubscribeResponse, ClientError> {
        let body = Body::PresenceSubscribe(v1::PresenceSubscribeRequest {
            add: add.iter().map(|u| (*u).to_owned()).collect(),
            remove: remove.iter().map(|u| (*u).to_owned()).collect(),
        });
        match self.request(body).await? {
            Body::PresenceStates(r) => Ok(r),
            _ => Err(ClientError::UnexpectedAnswer),
        }
    }

    /// Joins a live room; its messages arrive as [`Event::RoomMessage`] until
    /// [`Client::leave_room`]. The client rejoins after a reconnect.
    pub async fn join_room(&self, room_id: &str) -> Result<v1::RoomResponse, ClientError> {
        self.room_request(room_id, v1::room_request::Action::Join(v1::RoomJoin {}))
            .await
    }

    /// Leaves a live room.
    pub async fn leave_room(&self, room_id: &str) -> Result<v1::RoomResponse, ClientError> {
        self.room_request(room_id, v1::room_request::Action::Leave(v1::RoomLeave {}))
            .await
    }

    async fn room_request(
        &self,
        room_id: &str,
        action: v1::room_request::Action,
    ) -> Result<v1::RoomResponse, ClientError> {
        let body = Body::Room(v1::RoomRequest {
            room_id: room_id.to_owned(),
            action: Some(action),
        });
        match self.request(body).await? {
            Body::RoomResult(r) => Ok(r),
            _ => Err(ClientError::UnexpectedAnswer),
        }
    }

    /// Sends to a live room this client is in: handed to whoever is in it now, not stored,
    /// not retried.
    pub async fn send_to_room(
        &self,
        room_id: &str,
        body: Bytes,
        content_type: &str,
    ) -> Result<v1::RoomSendAck, ClientError> {
        let body = Body::RoomSend(v1::RoomSendRequest {
            room_id: room_id.to_owned(),
            body,
            content_type: content_type.to_owned(),
        });
        match self.request(body).await? {
            Body::RoomSendAck(r) => Ok(r),
            _ => Err(ClientError::UnexpectedAnswer),
        }
    }

    /// Round trip to the server.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let start = std::time::Instant::now();
        match self.request(Body::Ping(v1::Ping { nonce: 0 })).await? {
            Body::Pong(_) => Ok(start.elapsed()),
            _ => Err(ClientError::UnexpectedAnswer),
        }
    }

    /// The last seq handed to the application, per conversation.
    pub async fn cursors(&self) -> Result<HashMap<String, u64>, ClientError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Cursors { reply })
            .await
            .map_err(|_| ClientError::Shutdown)?;
        answer.await.map_err(|_| ClientError::Shutdown)
    }

    /// Closes the connection; pending sends fail with [`ClientError::Shutdown`].
    pub async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.commands.send(Command::Close { done }).await.is_ok() {
            let _ = closed.await;
        }
    }
}
