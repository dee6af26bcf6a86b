//! The client's background task: owns the connection, matches answers to requests, resends, reconnects and resumes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use bytes::Bytes;
use im_proto::v1::{self, CloseReason, frame::Body};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::conn::Connection;
use crate::timeline::{Progress, Timelines};
use crate::{ClientConfig, ClientError, Command, Event, Reply, Resume};

/// How often timeouts are checked.
const TICK: Duration = Duration::from_millis(250);

/// How long a delivery ack may wait for company: acks ride along with the next frame this
/// device writes, or leave on their own after this long (acks are cumulative, so a wait
/// also folds several pushes of a conversation into one). Far below the server's re-push
/// delay (seconds).
const ACK_DELAY: Duration = Duration::from_millis(100);

/// Conversations with unwritten acks past which they are written without waiting.
const ACK_BATCH: usize = 64;

/// Dials and logs in.
pub(crate) async fn establish(
    config: &ClientConfig,
) -> Result<(Connection, v1::LoginResponse), ClientError> {
    let login = async {
        let mut conn = Connection::dial(
            &config.server,
            &config.trust,
            config.max_frame_bytes,
            config.quic_endpoint.as_ref(),
        )
        .await?;
        let request = v1::Frame::new(
            1,
            Body::Login(v1::LoginRequest {
                token: config.token.clone(),
                device_id: config.device_id.clone(),
                client_info: config.client_info.clone(),
            }),
        );
        conn.send(&[request.to_bytes()])
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        loop {
            let Some(bytes) = conn
                .recv()
                .await
                .map_err(|e| ClientError::Connect(e.to_string()))?
            else {
                return Err(ClientError::Connect(
                    "server closed the connection during login".into(),
                ));
            };
            let frame = v1::Frame::from_bytes(&bytes).map_err(|_| ClientError::UnexpectedAnswer)?;
            match frame.body {
                Some(Body::LoginOk(ok)) => return Ok((conn, ok)),
                Some(Body::Close(close)) => return Err(closed(&close)),
                Some(Body::Error(e)) => return Err(server_error(&e)),
                _ => continue,
            }
        }
    };
    tokio::time::timeout(config.request_timeout, login)
        .await
        .map_err(|_| ClientError::Timeout)?
}

fn closed(close: &v1::Close) -> ClientError {
    ClientError::Closed {
        reason: close.reason(),
        message: close.message.clone(),
    }
}

fn server_error(e: &v1::Error) -> ClientError {
    ClientError::Server {
        code: e.code(),
        message: e.message.clone(),
    }
}

struct PendingSend {
    request: v1::SendRequest,
    reply: oneshot::Sender<Result<v1::SendAck, ClientError>>,
    deadline: Instant,
    /// When it was last written (None: not on the current connection yet).
    sent_at: Option<Instant>,
}

enum Internal {
    Sync(String),
    List,
    Heartbeat,
    /// Re-establishing presence watches after a reconnect.
    RestorePresence,
    /// Re-joining a room after a reconnect.
    RestoreRoom(String),
}

/// Users per presence request when restoring watches (keeps each frame small).
const RESTORE_CHUNK: usize = 200;

/// What a presence or room request changes once the server accepts it; kept so a
/// reconnect restores it.
enum Intent {
    Watch {
        add: Vec<String>,
        remove: Vec<String>,
    },
    Join(String),
    Leave(String),
}

/// The terminal close reasons: reconnecting would not help.
fn is_terminal(reason: CloseReason) -> bool {
    matches!(
        reason,
        CloseReason::AuthFailed | CloseReason::Replaced | CloseReason::Kicked
    )
}

/// Why the connected phase ended.
enum Outcome {
    /// Reconnect (if configured).
    Lost(String),
    /// Terminal close from the server.
    Closed(CloseReason, String),
    /// The application closed the client.
    Shutdown(Option<oneshot::Sender<()>>),
}

pub(crate) struct Driver {
    config: ClientConfig,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    timelines: Timelines,
    /// Sends awaiting their ack, by request id (request ids increase, so this is send order).
    sends: BTreeMap<u64, PendingSend>,
    requests: HashMap<u64, (Reply, Instant)>,
    internal: HashMap<u64, Internal>,
    next_request_id: u64,
    out: Vec<Bytes>,
    /// Conversations whose cursor advanced since the last ack was written.
    unacked: HashMap<String, u64>,
    /// Whether the first connection's resume (which applies `Resume`) is done.
    first_resume_done: bool,
    /// Pushes held while the conversation list of a (re)connect is being read, so that
    /// cursors are known before they are ordered.
    held: Option<Vec<v1::Message>>,
    /// Presence requests and room requests in flight, by request id.
    intents: HashMap<u64, Intent>,
    /// Users watched and rooms joined (as the server accepted), restored on reconnect.
    watched: BTreeSet<String>,
    rooms: BTreeSet<String>,
}

impl Driver {
    pub(crate) fn new(
        config: ClientConfig,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<Event>,
    ) -> Self {
        let mut timelines = Timelines::default();
        for (conversation, seq) in &config.cursors {
            timelines.set_floor(conversation, *seq);
        }
        Self {
            config,
            commands,
            events,
            timelines,
            sends: BTreeMap::new(),
            requests: HashMap::new(),
            internal: HashMap::new(),
            next_request_id: 2,
            out: Vec::new(),
            unacked: HashMap::new(),
            first_resume_done: false,
            held: None,
            intents: HashMap::new(),
            watched: BTreeSet::new(),
            rooms: BTreeSet::new(),
        }
    }

    fn request_id(&mut self) -> u64 {
        self.next_request_id += 1;
        self.next_request_id
    }

    async fn emit(&self, event: Event) {
        // An application that dropped its Events no longer wants them.
        let _ = self.events.send(event).await;
    }

    pub(crate) async fn run(mut self, first: Connection, login: v1::LoginResponse) {
        let mut conn = Some((first, login));
        let mut resumed = false;
        let mut backoff = self.config.reconnect_initial;
        loop {
            let (c, login) = match conn.take() {
                Some(c) => c,
                None => match self.reconnect(&mut backoff).await {
                    Ok(c) => c,
                    Err(outcome) => return self.finish(outcome).await,
                },
            };
            backoff = self.config.reconnect_initial;
            self.emit(Event::Connected {
                user_id: login.user_id.clone(),
                resumed,
            })
            .await;
            resumed = true;
            let outcome = self.connected(c, &login).await;
            self.connection_lost();
            match outcome {
                Outcome::Lost(reason) if self.config.reconnect => {
                    self.emit(Event::Disconnected { reason }).await;
                }
                Outcome::Lost(reason) => {
                    self.emit(Event::Disconnected { reason }).await;
                    return self.finish(Outcome::Shutdown(None)).await;
                }
                other => return self.finish(other).await,
            }
        }
    }

    /// Fails everything still waiting and emits the final event.
    async fn finish(mut self, outcome: Outcome) {
        let (error, done) = match outcome {
            Outcome::Closed(reason, message) => {
                self.emit(Event::Closed {
                    reason,
                    message: message.clone(),
                })
                .await;
                (ClientError::Closed { reason, message }, None)
            }
            Outcome::Shutdown(done) => (ClientError::Shutdown, done),
            Outcome::Lost(_) => (ClientError::Disconnected, None),
        };
        for (_, send) in std::mem::take(&mut self.sends) {
            let _ = send.reply.send(Err(error.clone()));
        }
        for (_, (reply, _)) in self.requests.drain() {
            let _ = reply.send(Err(error.clone()));
        }
        // Later commands get Shutdown when the receiver drops.
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            fail_command(command, &error);
        }
        if let Some(done) = done {
            let _ = done.send(());
        }
    }

    /// Reconnects with back-off, serving commands meanwhile.
    async fn reconnect(
        &mut self,
        backoff: &mut Duration,
    ) -> Result<(Connection, v1::LoginResponse), Outcome> {
        loop {
            let jitter =
                Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 / 4 + 1));
            let wake = Instant::now() + *backoff + jitter;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => break,
                    command = self.commands.recv() => match command {
                        None => return Err(Outcome::Shutdown(None)),
                        Some(Command::Close { done }) => return Err(Outcome::Shutdown(Some(done))),
                        Some(command) => self.command_offline(command),
                    },
                }
            }
            *backoff = (*backoff * 2).min(self.config.reconnect_max);
            self.expire(Instant::now());
            match establish(&self.config).await {
                Ok(c) => return Ok(c),
                Err(ClientError::Closed { reason, message }) if is_terminal(reason) => {
                    return Err(Outcome::Closed(reason, message));
                }
                Err(err) => tracing::debug!(error = %err, "reconnect failed"),
            }
        }
    }

    /// Commands while disconnected: sends wait for the next connection; requests fail.
    fn command_offline(&mut self, command: Command) {
        match command {
            Command::Send {
                client_msg_id,
                target,
                body,
                content_type,
                reply,
            } => {
                self.queue_send(client_msg_id, target, body, content_type, reply);
            }
            Command::Request { reply, .. } => {
                let _ = reply.send(Err(ClientError::Disconnected));
            }
            Command::Cursors { reply } => {
                let _ = reply.send(
                    self.timelines
                        .cursors()
                        .map(|(c, s)| (c.to_owned(), s))
                        .collect(),
                );
            }
            Command::Close { .. } => unreachable!("handled by the caller"),
        }
    }

    fn queue_send(
        &mut self,
        client_msg_id: String,
        target: v1::send_request::Target,
        body: Bytes,
        content_type: String,
        reply: oneshot::Sender<Result<v1::SendAck, ClientError>>,
    ) -> u64 {
        let id = self.request_id();
        let request = v1::SendRequest {
            client_msg_id,
            target: Some(target),
            body,
            content_type,
        };
        let deadline = Instant::now() + self.config.send_deadline;
        self.sends.insert(
            id,
            PendingSend {
                request,
                reply,
                deadline,
                sent_at: None,
            },
        );
        id
    }

    fn connection_lost(&mut self) {
        for send in self.sends.values_mut() {
            send.sent_at = None;
        }
        for (_, (reply, _)) in self.requests.drain() {
            let _ = reply.send(Err(ClientError::Disconnected));
        }
        self.intents.clear();
        for (_, internal) in self.internal.drain() {
            if let Internal::Sync(conversation) = internal {
                self.timelines.sync_abandoned(&conversation);
            }
        }
        self.held = None;
        self.out.clear();
    }

    /// Fails sends and requests past their deadlines.
    fn expire(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .sends
            .iter()
            .filter(|(_, s)| s.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(send) = self.sends.remove(&id) {
                let _ = send.reply.send(Err(ClientError::Timeout));
            }
        }
        let expired: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, (_, d))| *d <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            // The intent stays: a late answer still tells what the server did.
            if let Some((reply, _)) = self.requests.remove(&id) {
                let _ = reply.send(Err(ClientError::Timeout));
            }
        }
    }

    /// Queues the frame of send `id`.
    fn write_send(&mut self, id: u64, now: Instant) {
        if let Some(send) = self.sends.get_mut(&id) {
            send.sent_at = Some(now);
            self.out
                .push(v1::Frame::new(id, Body::Send(send.request.clone())).to_bytes());
        }
    }

    /// Queues every send not yet written on this connection, or unacknowledged for too long.
    fn write_due_sends(&mut self, now: Instant) {
        let ack_timeout = self.config.ack_timeout;
        for (id, send) in self.sends.iter_mut() {
            if send
                .sent_at
                .is_none_or(|at| now.duration_since(at) >= ack_timeout)
            {
                send.sent_at = Some(now);
                self.out
                    .push(v1::Frame::new(*id, Body::Send(send.request.clone())).to_bytes());
            }
        }
    }

    fn list_page(&mut self, after: Option<&v1::Conversation>) {
        let id = self.request_id();
        self.internal.insert(id, Internal::List);
        let body = Body::ListConversations(crate::list_request(500, after));
        self.out.push(v1::Frame::new(id, body).to_bytes());
    }

    async fn connected(&mut self, mut conn: Connection, login: &v1::LoginResponse) -> Outcome {
        let heartbeat = self.config.heartbeat.unwrap_or_else(|| {
            Duration::from_millis((u64::from(login.idle_timeout_ms) / 3).max(50))
        });
        // Learn the server's conversations before ordering pushes, then resend what is unacked.
        self.held = Some(Vec::new());
        self.list_page(None);
        self.restore_watches_and_rooms();
        self.write_due_sends(Instant::now());
        let mut last_received = Instant::now();
        let mut next_ping = Instant::now() + heartbeat;
        // A ping sent because work is outstanding and the server went quiet; if nothing at
        // all arrives within `ack_timeout` after it, the connection is presumed dead (a
        // killed server behind QUIC or a dead NAT path gives no error, only silence).
        let mut probe_sent: Option<Instant> = None;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // When the oldest unwritten ack must go; `acks_due` arms it.
        let ack_timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(ack_timer);
        let mut acks_due: Option<Instant> = None;
        loop {
            if !self.unacked.is_empty() {
                let now = Instant::now();
                let due = *acks_due.get_or_insert_with(|| {
                    let due = now + ACK_DELAY;
                    ack_timer.as_mut().reset(due);
                    due
                });
                if !self.out.is_empty() || now >= due || self.unacked.len() >= ACK_BATCH {
                    self.queue_acks();
                    acks_due = None;
                }
            }
            if !self.out.is_empty() {
                if let Err(e) = conn.send(&self.out).await {
                    return Outcome::Lost(format!("write failed: {e}"));
                }
                self.out.clear();
            }
            tokio::select! {
                command = self.commands.recv() => match command {
                    None => {
                        self.flush_acks(&mut conn).await;
                        conn.close().await;
                        return Outcome::Shutdown(None);
                    }
                    Some(Command::Close { done }) => {
                        self.flush_acks(&mut conn).await;
                        conn.close().await;
                        return Outcome::Shutdown(Some(done));
                    }
                    Some(command) => self.command_online(command),
                },
                received = conn.recv() => {
                    let bytes = match received {
                        Ok(Some(bytes)) => bytes,
                        Ok(None) => return Outcome::Lost("server closed the connection".into()),
                        Err(e) => return Outcome::Lost(format!("read failed: {e}")),
                    };
                    last_received = Instant::now();
                    probe_sent = None;
                    // Bodies share the frame's buffer: a push is not copied again.
                    let Ok(frame) = v1::Frame::from_shared(bytes) else {
                        tracing::warn!("undecodable frame from the server");
                        continue;
                    };
                    if let Some(outcome) = self.on_frame(frame).await {
                        return outcome;
                    }
                }
                // The loop's top writes the acks that are due.
                _ = &mut ack_timer, if acks_due.is_some() => {}
                _ = tick.tick() => {
                    let now = Instant::now();
                    self.expire(now);
                    self.write_due_sends(now);
                    if now >= next_ping {
                        let id = self.request_id();
                        self.internal.insert(id, Internal::Heartbeat);
                        self.out.push(v1::Frame::new(id, Body::Ping(v1::Ping { nonce: 0 })).to_bytes());
                        next_ping = now + heartbeat;
                    }
                    if now.duration_since(last_received) > heartbeat * 3 {
                        return Outcome::Lost("server silent for three heartbeats".into());
                    }
                    let ack_timeout = self.config.ack_timeout;
                    let waiting = !self.sends.is_empty() || !self.requests.is_empty();
                    match probe_sent {
                        Some(at) if now.duration_since(at) >= ack_timeout => {
                            return Outcome::Lost("server unresponsive".into());
                        }
                        None if waiting && now.duration_since(last_received) >= ack_timeout => {
                            let id = self.request_id();
                            self.internal.insert(id, Internal::Heartbeat);
                            self.out.push(v1::Frame::new(id, Body::Ping(v1::Ping { nonce: 0 })).to_bytes());
                            probe_sent = Some(now);
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// Moves every unwritten delivery ack into the outgoing frames.
    fn queue_acks(&mut self) {
        for (conversation_id, seq) in self.unacked.drain() {
            self.out.push(
                v1::Frame::new(
                    0,
                    Body::DeliverAck(v1::DeliverAck {
                        conversation_id,
                        seq,
                    }),
                )
                .to_bytes(),
            );
        }
    }

    /// Writes the acks still waiting before a deliberate close (best effort: the server
    /// re-pushes what stays unacknowledged anyway).
    async fn flush_acks(&mut self, conn: &mut Connection) {
        self.queue_acks();
        if !self.out.is_empty() {
            let _ = conn.send(&self.out).await;
            self.out.clear();
        }
    }

    /// Asks the new connection for the presence watches and rooms of the last one.
    fn restore_watches_and_rooms(&mut self) {
        let watched: Vec<String> = self.watched.iter().cloned().collect();
        for chunk in watched.chunks(RESTORE_CHUNK) {
            let id = self.request_id();
            self.internal.insert(id, Internal::RestorePresence);
            let body = Body::PresenceSubscribe(v1::PresenceSubscribeRequest {
                add: chunk.to_vec(),
                remove: Vec::new(),
            });
            self.out.push(v1::Frame::new(id, body).to_bytes());
        }
        for room in self.rooms.clone() {
            let id = self.request_id();
            self.internal
                .insert(id, Internal::RestoreRoom(room.clone()));
            let body = Body::Room(v1::RoomRequest {
                room_id: room,
                action: Some(v1::room_request::Action::Join(v1::RoomJoin {})),
            });
            self.out.push(v1::Frame::new(id, body).to_bytes());
        }
    }

    fn intent_of(body: &Body) -> Option<Intent> {
        match body {
            Body::PresenceSubscribe(req) => Some(Intent::Watch {
                add: req.add.clone(),
                remove: req.remove.clone(),
            }),
            Body::Room(req) => match req.action {
                Some(v1::room_request::Action::Join(_)) => Some(Intent::Join(req.room_id.clone())),
                Some(v1::room_request::Action::Leave(_)) => {
                    Some(Intent::Leave(req.room_id.clone()))
                }
                None => None,
            },
            _ => None,
        }
    }

    fn apply_intent(&mut self, intent: Intent) {
        match intent {
            Intent::Watch { add, remove } => {
                for user in remove {
                    self.watched.remove(&user);
                }
                self.watched.extend(add);
            }
            Intent::Join(room) => {
                self.rooms.insert(room);
            }
            Intent::Leave(room) => {
                self.rooms.remove(&room);
            }
        }
    }

    fn command_online(&mut self, command: Command) {
        match command {
            Command::Send {
                client_msg_id,
                target,
                body,
                content_type,
                reply,
            } => {
                // Only this send: the others were written already, and the tick rewrites
                // those unacknowledged for too long (scanning them all here made each send
                // cost as much as the sends in flight).
                let id = self.queue_send(client_msg_id, target, body, content_type, reply);
                self.write_send(id, Instant::now());
            }
            Command::Request { body, reply } => {
                let id = self.request_id();
                if let Some(intent) = Self::intent_of(&body) {
                    self.intents.insert(id, intent);
                }
                self.requests
                    .insert(id, (reply, Instant::now() + self.config.request_timeout));
                self.out.push(v1::Frame::new(id, body).to_bytes());
            }
            Command::Cursors { reply } => {
                let _ = reply.send(
                    self.timelines
                        .cursors()
                        .map(|(c, s)| (c.to_owned(), s))
                        .collect(),
                );
            }
            Command::Close { .. } => unreachable!("handled by the caller"),
        }
    }

    /// Handles one frame; returns an outcome when the connection must end.
    async fn on_frame(&mut self, frame: v1::Frame) -> Option<Outcome> {
        let id = frame.request_id;
        match frame.body? {
            Body::Deliver(deliver) => {
                let message = deliver.message?;
                match &mut self.held {
                    Some(held) => held.push(message),
                    None => {
                        let progress = self.timelines.on_message(message);
                        self.apply(progress).await;
                    }
                }
            }
            Body::SendAck(ack) => {
                if let Some(send) = self.sends.remove(&id) {
                    let conversation_id = ack.conversation_id.clone();
                    let progress = self.timelines.on_own_send(&conversation_id, ack.seq);
                    let _ = send.reply.send(Ok(ack));
                    self.apply(progress).await;
                    // Own sends count as held by this device, so a later instance of it that
                    // resumes from the server's device cursor does not receive them again.
                    let last = self.timelines.last(&conversation_id);
                    if last > 0 {
                        self.unacked.insert(conversation_id, last);
                    }
                }
            }
            Body::Presence(event) => {
                if let Some(state) = event.state {
                    self.emit(Event::Presence(state)).await;
                }
            }
            Body::RoomMessage(message) => self.emit(Event::RoomMessage(message)).await,
            Body::Broadcast(broadcast) => self.emit(Event::Broadcast(broadcast)).await,
            Body::Close(close) => {
                return Some(match close.reason() {
                    reason if is_terminal(reason) => Outcome::Closed(reason, close.message),
                    reason => Outcome::Lost(format!(
                        "server closed: {}: {}",
                        reason.as_str_name(),
                        close.message
                    )),
                });
            }
            Body::Error(error) => {
                if let Some(send) = self.sends.get(&id) {
                    // Storage trouble is worth retrying (same client id, so never twice);
                    // anything else is final.
                    if error.code() != v1::ErrorCode::Internal {
                        let send = self.sends.remove(&id).expect("present");
                        let _ = send.reply.send(Err(server_error(&error)));
                    } else {
                        tracing::debug!(client_msg_id = %send.request.client_msg_id, "send failed on the server; will resend");
                    }
                } else if self.requests.contains_key(&id) || self.intents.contains_key(&id) {
                    // A leave the server says is moot still leaves.
                    match self.intents.remove(&id) {
                        Some(intent @ Intent::Leave(_))
                            if error.code() == v1::ErrorCode::NotInRoom =>
                        {
                            self.apply_intent(intent)
                        }
                        _ => {}
                    }
                    if let Some((reply, _)) = self.requests.remove(&id) {
                        let _ = reply.send(Err(server_error(&error)));
                    }
                } else if let Some(internal) = self.internal.remove(&id) {
                    match internal {
                        Internal::Sync(conversation) => {
                            tracing::warn!(%conversation, message = %error.message, "sync refused");
                            if matches!(
                                error.code(),
                                v1::ErrorCode::NotAMember | v1::ErrorCode::UnknownConversation
                            ) {
                                // For good: hand out what was pushed past the gap.
                                let progress = self.timelines.gap_unfillable(&conversation);
                                self.apply(progress).await;
                            } else {
                                self.timelines.sync_abandoned(&conversation);
                            }
                        }
                        Internal::RestoreRoom(room) => {
                            tracing::warn!(%room, message = %error.message, "re-joining a room refused");
                            self.rooms.remove(&room);
                        }
                        _ => {}
                    }
                } else if id == 0 {
                    tracing::warn!(message = %error.message, "server reported an error");
                }
            }
            body => {
                if let Some(internal) = self.internal.remove(&id) {
                    self.on_internal(internal, body).await;
                } else {
                    if let Some(intent) = self.intents.remove(&id) {
                        self.apply_intent(intent);
                    }
                    if let Some((reply, _)) = self.requests.remove(&id) {
                        let _ = reply.send(Ok(body));
                    }
                }
            }
        }
        None
    }

    async fn on_internal(&mut self, internal: Internal, body: Body) {
        match (internal, body) {
            (Internal::Sync(conversation), Body::SyncResult(page)) => {
                let progress =
                    self.timelines
                        .on_sync_page(&conversation, page.messages, page.has_more);
                self.apply(progress).await;
            }
            (Internal::RestorePresence, Body::PresenceStates(answer)) => {
                // States may have changed while this client was away.
                for state in answer.states {
                    self.emit(Event::Presence(state)).await;
                }
            }
            (Internal::List, Body::Conversations(list)) => {
                for c in &list.conversations {
                    if !self.first_resume_done
                        && !self.config.cursors.contains_key(&c.conversation_id)
                    {
                        match self.config.resume {
                            Resume::DeviceCursor => self
                                .timelines
                                .set_floor(&c.conversation_id, c.delivered_seq),
                            Resume::Latest => self
                                .timelines
                                .set_latest_floor(&c.conversation_id, c.last_seq),
                            Resume::Beginning => {}
                        }
                    }
                    let progress = self
                        .timelines
                        .on_server_last(&c.conversation_id, c.last_seq);
                    self.apply(progress).await;
                }
                match list.conversations.last() {
                    Some(last) if list.has_more => self.list_page(Some(last)),
                    _ => {
                        self.first_resume_done = true;
                        for message in self.held.take().unwrap_or_default() {
                            let progress = self.timelines.on_message(message);
                            self.apply(progress).await;
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Hands ready messages to the application, schedules acks and syncs.
    async fn apply(&mut self, progress: Progress) {
        for message in progress.ready {
            self.unacked
                .insert(message.conversation_id.clone(), message.seq);
            self.emit(Event::Message(message)).await;
        }
        if let Some((conversation_id, after_seq)) = progress.sync_from {
            let id = self.request_id();
            self.internal
                .insert(id, Internal::Sync(conversation_id.clone()));
            let body = Body::Sync(v1::SyncRequest {
                conversation_id,
                after_seq,
                limit: 500,
            });
            self.out.push(v1::Frame::new(id, body).to_bytes());
        }
    }
}

fn fail_command(command: Command, error: &ClientError) {
    match command {
        Command::Send { reply, .. } => {
            let _ = reply.send(Err(error.clone()));
        }
        Command::Request { reply, .. } => {
            let _ = reply.send(Err(error.clone()));
        }
        Command::Cursors { .. } | Command::Close { .. } => {}
    }
}
