//! Sessions: login, heartbeat, request handling and the per-connection delivery loop, transport-agnostic.
//!
//! Each connection is one task running [`run_session`]. Before login only `Login` and `Ping`
//! are served. After login the task waits, in one hand-written poll, on frames from the
//! client, frames queued for it by the pipeline and the router, re-pushes of unacknowledged
//! deliveries and close requests (replaced, slow consumer, idle, shutdown). Idle connections
//! are found by one node-wide sweep ([`sweep_idle_connections`]), not a timer per task; the
//! same sweep asks plain-TCP connections idle for `park_after_ms` to park (`crate::park`):
//! their task ends and their session waits in the node's parker until woken.
//! Slow requests (sync, history, lists, read cursors) run in spawned tasks, at most
//! [`MAX_REQUESTS_IN_FLIGHT`] per connection, and answer through the connection's queue.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use im_proto::codec::FrameReader;
use im_proto::ids;
use im_proto::v1::{self, CloseReason, ErrorCode, frame::Body};
use im_store::{NewMessage, Store, StoreError};
use parking_lot::RwLock;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use im_plugins::bindings::types;
use im_plugins::{CallOrigin, FilterOutcome, Hook, PluginHost, PluginMessage, RiskOutcome};

use crate::auth::{Authenticator, Credentials};
use crate::config::Config;
use crate::cursors::CursorWriter;
use crate::delivery::PendingDeliveries;
use crate::groups::{self, Actor, GroupDirectory};
use crate::metrics::{MessageKind, NodeMetrics};
use crate::park::{ParkedConn, Parker};
use crate::pipeline::{GroupJob, Pipeline, ReplyTo, SendJob, to_proto};
use crate::rooms::Rooms;
use crate::router::{ConnControl, ConnHandle, LocalRouter, Outbound, monotonic_ms};
use crate::transport::stream::StreamConn;
use crate::transport::{FrameConn, RecvError};

/// Concurrent slow requests per connection; more wait (back-pressure on that client only).
pub const MAX_REQUESTS_IN_FLIGHT: usize = 8;
/// Frames written per batch at most.
const MAX_WRITE_BATCH: usize = 64;
/// Default and largest page sizes for sync, history and conversation lists.
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 500;
/// Longest content type accepted.
const MAX_CONTENT_TYPE_BYTES: usize = 128;

/// Everything sessions share.
pub struct NodeContext {
    pub config: Config,
    /// The plugin host, unless plugins are disabled.
    pub plugins: Option<Arc<PluginHost>>,
    pub store: Arc<dyn Store>,
    pub router: Arc<LocalRouter>,
    pub pipeline: Pipeline,
    pub groups: Arc<GroupDirectory>,
    pub auth: Arc<dyn Authenticator>,
    pub cursors: CursorWriter,
    pub shutdown: CancellationToken,
    pub known_users: KnownUsers,
    pub device_ids: DeviceIds,
    pub stats: SessionStats,
    pub rooms: Rooms,
    pub metrics: Arc<NodeMetrics>,
    /// Where idle plain-TCP connections park; none when parking is off.
    pub parker: Option<Arc<Parker>>,
    next_conn_id: AtomicU64,
}

/// Connection counters, for logs and tests.
#[derive(Default)]
pub struct SessionStats {
    /// Open connections (logged in or not).
    pub open: AtomicUsize,
    /// Logged-in connections.
    pub logged_in: AtomicUsize,
}

impl NodeContext {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Config,
        store: Arc<dyn Store>,
        router: Arc<LocalRouter>,
        pipeline: Pipeline,
        groups: Arc<GroupDirectory>,
        auth: Arc<dyn Authenticator>,
        cursors: CursorWriter,
        shutdown: CancellationToken,
        plugins: Option<Arc<PluginHost>>,
        metrics: Arc<NodeMetrics>,
        parker: Option<Arc<Parker>>,
    ) -> Self {
        Self {
            rooms: Rooms::default(),
            metrics,
            parker,
            config,
            plugins,
            known_users: KnownUsers::new(store.clone()),
            device_ids: DeviceIds::default(),
            store,
            router,
            pipeline,
            groups,
            auth,
            cursors,
            shutdown,
            stats: SessionStats::default(),
            next_conn_id: AtomicU64::new(1),
        }
    }

    pub fn login_timeout(&self) -> Duration {
        Duration::from_millis(self.config.session.login_timeout_ms)
    }
}

/// Distinct device ids shared at most, and the longest shared.
const MAX_SHARED_DEVICE_IDS: usize = 4096;
const MAX_SHARED_DEVICE_ID_BYTES: usize = 24;

/// Device ids shared between connections: clients mostly name their device from a handful
/// of values ("phone", "web", "ios"), so one allocation serves every connection with that
/// name instead of one each. Bounded in count and length (ids unique per install, such as
/// UUIDs, gain nothing and get their own).
#[derive(Default)]
pub struct DeviceIds {
    shared: RwLock<HashSet<Arc<str>>>,
}

impl DeviceIds {
    /// `device_id`, shared with other connections of the same name where it can be.
    pub fn share(&self, device_id: &str) -> Arc<str> {
        if device_id.len() > MAX_SHARED_DEVICE_ID_BYTES {
            return device_id.into();
        }
        if let Some(shared) = self.shared.read().get(device_id) {
            return shared.clone();
        }
        let mut shared = self.shared.write();
        if let Some(id) = shared.get(device_id) {
            return id.clone();
        }
        let id: Arc<str> = device_id.into();
        if shared.len() < MAX_SHARED_DEVICE_IDS {
            shared.insert(id.clone());
        }
        id
    }
}

/// Users the known-users cache holds at most: past it a quarter is forgotten (they are looked
/// up in the store again when next needed), so a node serving millions of distinct users over
/// its life holds a bounded set (an estimate, not a measurement: some 60-70 bytes per id of
/// a dozen characters, its `Arc` allocation and table slot, so tens of MB at this size).
const MAX_KNOWN_USERS: usize = 1_000_000;

/// Users known to exist, cached in front of the store (users are never deleted, so a cached
/// answer never goes stale; a forgotten one costs a lookup). Ids are shared with the router's
/// handles where a login put them here, not copied.
pub struct KnownUsers {
    cache: RwLock<foldhash::HashSet<Arc<str>>>,
    store: Arc<dyn Store>,
    capacity: usize,
}

impl KnownUsers {
    fn new(store: Arc<dyn Store>) -> Self {
        Self::with_capacity(store, MAX_KNOWN_USERS)
    }

    fn with_capacity(store: Arc<dyn Store>, capacity: usize) -> Self {
        Self {
            cache: RwLock::default(),
            store,
            capacity: capacity.max(4),
        }
    }

    pub async fn exists(&self, user_id: &str) -> Result<bool, StoreError> {
        if self.cache.read().contains(user_id) {
            return Ok(true);
        }
        let exists = self.store.user_exists(user_id).await?;
        if exists {
            self.remember(user_id.into());
        }
        Ok(exists)
    }

    pub async fn register(&self, user_id: &Arc<str>) -> Result<(), StoreError> {
        if !self.cache.read().contains(&**user_id) {
            self.store.upsert_user(user_id, now_ms()).await?;
            self.remember(user_id.clone());
        }
        Ok(())
    }

    #[cfg(test)]
    fn cached(&self, user_id: &str) -> bool {
        self.cache.read().contains(user_id)
    }

    fn remember(&self, user_id: Arc<str>) {
        let mut cache = self.cache.write();
        if cache.len() >= self.capacity {
            // Forget every fourth entry in the table's order, an arbitrary quarter: one pass
            // per capacity / 4 inserts keeps the cost per insert constant.
            let mut n = 0usize;
            cache.retain(|_| {
                n += 1;
                !n.is_multiple_of(4)
            });
        }
        cache.insert(user_id);
    }
}

/// Closes logged-in connections whose client has sent nothing for `idle_timeout`, sweeping
/// the router every eighth of it (at most every second, at least every 10 ms), asks those
/// silent for `park_after` (if given) to park, and closes them all with `SERVER_SHUTDOWN`
/// once `shutdown` is cancelled (however it was: this task is what turns the token into
/// close requests). One sweep over the router costs less than a timer in every connection's
/// task, and idle connections are the ones that scale.
pub async fn sweep_idle_connections(
    router: Arc<LocalRouter>,
    idle_timeout: Duration,
    park_after: Option<Duration>,
    shutdown: CancellationToken,
) {
    let period = (idle_timeout / 8).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let idle_ms = u64::try_from(idle_timeout.as_millis()).unwrap_or(u64::MAX);
    let message = format!("nothing received for {idle_ms} ms");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                router.close_all(CloseReason::ServerShutdown, "server shutting down");
                return;
            }
            _ = ticks.tick() => {}
        }
        let park_ms = park_after.map(|after| after.as_millis() as u64);
        router.sweep_idle(monotonic_ms(), idle_ms, park_ms, &message);
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn frame_bytes(request_id: u64, body: Body) -> Bytes {
    v1::Frame::new(request_id, body).to_bytes()
}

fn error_bytes(request_id: u64, code: ErrorCode, message: impl Into<String>) -> Bytes {
    v1::Frame::error(request_id, code, message).to_bytes()
}

/// How a session ends when the server stops under it.
fn shutting_down() -> End {
    End::Close(CloseReason::ServerShutdown, "server shutting down".into())
}

/// A frame's handler still to run: boxed, so that no handler's state sits in an idle
/// connection's task.
type Handler<'a> = std::pin::Pin<Box<dyn Future<Output = Result<(), End>> + Send + 'a>>;

/// Why a session ended.
enum End {
    /// Close with a reason, telling the client.
    Close(CloseReason, String),
    /// The peer went away or the connection broke: nothing to tell.
    Gone,
    /// Not an end: the connection parks (its session waits in the node's parker).
    Park,
}

/// How a logged-in session ended, for the close that follows.
struct Ended {
    end: End,
    ctx: Arc<NodeContext>,
    remote_ip: IpAddr,
    /// What a direct write left half-written, finished before the close frame.
    unwritten: Option<Box<[u8]>>,
}

/// What woke a logged-in connection's task ([`LoggedIn::poll_wake`]).
enum Wake {
    Ended(End),
    /// Queued frames were taken into `out`.
    Queued,
    Frame(Bytes),
    /// The re-push timer fired; what is due again is in `out`.
    Repush,
    /// Asked to park, with nothing to do.
    Park,
}

/// How a logged-in session's run finished.
enum Run {
    Ended(Box<Ended>),
    /// It has nothing to do and was asked to park.
    Park(LoggedIn),
}

/// A logged-in connection and its session, handed from the login to its first run, or from
/// a parked connection's resumption to its run.
struct Resumable<C> {
    conn: C,
    session: LoggedIn,
}

/// A parked plain-TCP connection (`crate::park`): what of its session an idle connection
/// needs, and its reader's part of a frame still arriving, if any. Dropped unresumed, it
/// closes the connection's queue like a session.
struct ParkedTcp {
    ctx: Arc<NodeContext>,
    remote_ip: Ipv6Addr,
    handle: OwnedHandle,
    on_demand: Option<Box<OnDemand>>,
    reader: Option<Box<FrameReader>>,
    /// Keeps the node's session tracker waiting while parked.
    tracked: TaskTrackerToken,
}

impl ParkedConn for ParkedTcp {
    fn control(&self) -> &Arc<ConnControl> {
        &self.handle.control
    }

    /// Rebuilds the connection here, on the waker's thread (registering its socket with the
    /// runtime), and spawns its run: the task holds the run alone, as a fresh connection's
    /// does, not a resume step around it.
    fn resume(self: Box<Self>, tasks: &TaskTracker, runtime: &tokio::runtime::Handle) {
        let ParkedTcp {
            ctx,
            remote_ip,
            handle,
            on_demand,
            reader,
            tracked,
        } = *self;
        let reader = reader.map_or_else(
            || FrameReader::new(ctx.config.limits.max_frame_bytes),
            |reader| *reader,
        );
        let control = handle.control.clone();
        let session = LoggedIn {
            ctx,
            remote_ip,
            handle,
            deliveries: None,
            out: Vec::new(),
            on_demand,
        };
        let resumed = {
            let _runtime = runtime.enter();
            StreamConn::resumed_tcp(control, reader)
        };
        match resumed {
            Ok(conn) => {
                tasks.spawn_on(drive(Box::new(Resumable { conn, session })), runtime);
            }
            Err(err) => {
                tracing::warn!(error = %err, "a parked connection could not resume: dropped");
                // Logged out in a task of its own: the waker may hold the router's lock, a
                // room's or the socket's.
                tasks.spawn_on(async move { session.abandon() }, runtime);
            }
        }
        // Dropped once the new task is tracked: a shutdown never sees the connection
        // untracked.
        drop(tracked);
    }
}

/// Runs one connection from its first byte to its close.
///
/// The task's future is what every idle connection costs, so it holds only the connection
/// and the logged-in session: the login (authentication, plugin checks, a failed login's
/// close) runs in a box created here, which owns the connection and its peer's address until
/// it hands them back, and is freed once logged in. (Anything the `async` block captured
/// would keep its room in every state of the future; an `async fn` would keep its
/// arguments twice. rustc's `-Zprint-type-sizes` shows the layout.)
pub fn run_session<C: FrameConn>(
    ctx: Arc<NodeContext>,
    conn: C,
    peer: SocketAddr,
) -> impl Future<Output = ()> + Send {
    let login = Box::pin(log_in(ctx, conn, peer));
    async move {
        let Some(logged_in) = login.await else {
            return;
        };
        drive(logged_in).await;
    }
}

/// Serves a logged-in connection until it ends, then closes it, or until it parks (its task
/// then ends; the parker spawns this again when the connection is woken). Takes one box:
/// an `async fn` keeps its arguments twice in its future, which here is a pointer.
async fn drive<C: FrameConn>(resumable: Box<Resumable<C>>) {
    // Unboxed in a block of its own: the box is freed here, not when the task ends.
    let Resumable { mut conn, session } = {
        let resumable = resumable;
        *resumable
    };
    // The match ends before the close's await: its scrutinee (the run's outcome, a
    // session's size) is not kept in the task.
    let ended = match session.run(&mut conn).await {
        Run::Ended(ended) => ended,
        Run::Park(parking) => return park(conn, parking),
    };
    let Ended {
        end,
        ctx,
        remote_ip,
        unwritten,
    } = *ended;
    Box::pin(close_connection(&mut conn, &remote_ip, end, unwritten)).await;
    ctx.stats.open.fetch_sub(1, Ordering::Relaxed);
}

/// Parks a connection with nothing to do: its socket's registration goes, its socket
/// becomes the waker of its queue and close requests, and what of the session an idle
/// connection needs waits in the node's parker. Something that woke it meanwhile has it
/// resumed at once, in a new task.
///
/// Only a connection that can park is asked to (plain TCP on a node that parks); one that
/// cannot would be dropped here, its client left to reconnect. (Giving it back to run on
/// would keep a second session's room in every connection's task.)
fn park<C: FrameConn>(conn: C, session: LoggedIn) {
    let control = session.handle.control.clone();
    let parking = control
        .direct_socket()
        .and_then(|socket| Some((socket.parker()?, socket)));
    let (Some((parker, socket)), Ok(reader)) = (parking, conn.into_parked()) else {
        tracing::error!("a connection that cannot park was asked to: dropped");
        session.abandon();
        return;
    };
    let key = parker.reserve();
    if !socket.set_parked(key) {
        parker.cancel(key);
        tracing::error!("too many parked connections: this one is dropped");
        session.abandon();
        return;
    }
    control.register_waker(&Waker::from(control.clone()));
    // What came since the task last looked woke the task's own waker, not this one.
    let woken =
        control.close_requested().is_some() || !control.queue_is_empty() || socket.has_unwritten();
    let LoggedIn {
        ctx,
        remote_ip,
        handle,
        on_demand,
        ..
    } = session;
    let parked = Box::new(ParkedTcp {
        ctx,
        remote_ip,
        handle,
        on_demand,
        reader: (!reader.holds_nothing()).then(|| Box::new(reader)),
        tracked: parker.track(),
    });
    let refused = if woken {
        parker.cancel(key);
        Some(parked)
    } else {
        parker.fill(key, parked).err()
    };
    if let Some(parked) = refused {
        parker.respawn(parked);
    }
}

/// Waits for the login; on success returns the connection and its session, on failure
/// closes the connection (telling the client why, where there is something to tell).
async fn log_in<C: FrameConn>(
    ctx: Arc<NodeContext>,
    mut conn: C,
    peer: SocketAddr,
) -> Option<Box<Resumable<C>>> {
    ctx.stats.open.fetch_add(1, Ordering::Relaxed);
    let origin = CallOrigin {
        transport: conn.transport().as_str(),
        remote_ip: Some(peer.ip()),
    };
    let handle = match await_login(&ctx, &mut conn, &origin).await {
        Ok(handle) => handle,
        Err(end) => {
            close_connection(&mut conn, &peer, end, None).await;
            ctx.stats.open.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
    };
    let transport = origin.transport;
    tracing::debug!(%peer, transport, user = %handle.user_id, device = %handle.device_id, "logged in");
    ctx.stats.logged_in.fetch_add(1, Ordering::Relaxed);
    ctx.metrics.connection(transport, 1.0);
    // Most clients go quiet once logged in: park as soon as there is nothing to do.
    if let Some(socket) = handle.control.direct_socket() {
        socket.request_park();
    }
    let session = LoggedIn::new(&ctx, handle, origin);
    Some(Box::new(Resumable { conn, session }))
}

/// Tells the client why its connection ends, if there is anything to tell, within 2 s.
/// `unwritten` is what a direct write left half-written, finished before the close frame.
async fn close_connection<C: FrameConn>(
    conn: &mut C,
    peer: &(dyn std::fmt::Display + Sync),
    end: End,
    unwritten: Option<Box<[u8]>>,
) {
    let End::Close(reason, message) = end else {
        return;
    };
    let transport = conn.transport().as_str();
    tracing::debug!(%peer, transport, reason = reason.as_str_name(), %message, "closing connection");
    let frame = v1::Frame::close(reason, message).to_bytes();
    let close = async {
        if let Some(rest) = &unwritten
            && conn.write_raw(rest).await.is_err()
        {
            return;
        }
        conn.close(reason, frame).await;
    };
    // Boxed, and only when there is a close frame to write: the closing write's state is
    // not part of the connection's task for its life.
    let _ = Box::pin(tokio::time::timeout(Duration::from_secs(2), close)).await;
}

/// Serves `Ping` and waits for a valid `Login`.
async fn await_login<C: FrameConn>(
    ctx: &Arc<NodeContext>,
    conn: &mut C,
    origin: &CallOrigin,
) -> Result<ConnHandle, End> {
    let deadline = Instant::now() + ctx.login_timeout();
    loop {
        let received = tokio::select! {
            _ = ctx.shutdown.cancelled() => return Err(shutting_down()),
            _ = tokio::time::sleep_until(deadline) => return Err(End::Close(CloseReason::IdleTimeout, "no login in time".into())),
            received = conn.recv() => received,
        };
        let bytes = match received {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Err(End::Gone),
            Err(err) => return Err(recv_error_end(err)),
        };
        let frame = match v1::Frame::from_bytes(&bytes) {
            Ok(frame) => frame,
            Err(err) => {
                reply(
                    conn,
                    error_bytes(0, ErrorCode::BadFrame, format!("undecodable frame: {err}")),
                )
                .await?;
                continue;
            }
        };
        let request_id = frame.request_id;
        match frame.body {
            Some(Body::Login(login)) => {
                return login_with(ctx, conn, origin, request_id, login).await;
            }
            Some(Body::Ping(ping)) => reply(conn, pong(request_id, ping.nonce)).await?,
            Some(_) => {
                reply(
                    conn,
                    error_bytes(request_id, ErrorCode::NotLoggedIn, "log in first"),
                )
                .await?;
            }
            None => {
                reply(
                    conn,
                    error_bytes(request_id, ErrorCode::BadFrame, "frame has no known body"),
                )
                .await?
            }
        }
    }
}

async fn login_with<C: FrameConn>(
    ctx: &Arc<NodeContext>,
    conn: &mut C,
    origin: &CallOrigin,
    request_id: u64,
    login: v1::LoginRequest,
) -> Result<ConnHandle, End> {
    if !ids::is_valid_id(&login.device_id) {
        reply(
            conn,
            error_bytes(
                request_id,
                ErrorCode::InvalidArgument,
                "device_id must be 1-64 of [A-Za-z0-9_.@-]",
            ),
        )
        .await?;
        return Err(End::Close(
            CloseReason::AuthFailed,
            "invalid device id".into(),
        ));
    }
    let credentials = Credentials {
        token: &login.token,
        device_id: &login.device_id,
        origin,
    };
    let identity =
        match tokio::time::timeout(ctx.login_timeout(), ctx.auth.authenticate(credentials)).await {
            Ok(Ok(identity)) => identity,
            Ok(Err(reason)) => return Err(End::Close(CloseReason::AuthFailed, reason)),
            Err(_) => {
                return Err(End::Close(
                    CloseReason::AuthFailed,
                    "authentication timed out".into(),
                ));
            }
        };
    if let Some(plugins) = &ctx.plugins {
        match plugins
            .assess_login(origin, &identity.user_id, &login.device_id)
            .await
        {
            RiskOutcome::Allow => {}
            RiskOutcome::Throttle {
                retry_after_ms,
                reason,
            } => {
                let message = format!("{reason}; retry after {retry_after_ms} ms");
                return Err(End::Close(CloseReason::AuthFailed, message));
            }
            RiskOutcome::Block { reason } => {
                return Err(End::Close(CloseReason::AuthFailed, reason));
            }
        }
    }
    let user_id: Arc<str> = identity.user_id.as_str().into();
    if let Err(err) = ctx.known_users.register(&user_id).await {
        tracing::error!(error = %err, "recording a user failed");
        reply(
            conn,
            error_bytes(
                request_id,
                ErrorCode::Internal,
                "login could not be completed; retry",
            ),
        )
        .await?;
        return Err(End::Gone);
    }
    // Plain TCP made its control with its socket when accepted; heard from now.
    let control = match conn.control() {
        Some(control) => {
            control.heard(monotonic_ms());
            control
        }
        None => Arc::new(ConnControl::new(
            monotonic_ms(),
            ctx.config.limits.outbound_queue,
        )),
    };
    let handle = ConnHandle {
        conn_id: ctx.next_conn_id.fetch_add(1, Ordering::Relaxed),
        user_id,
        device_id: ctx.device_ids.share(&login.device_id),
        transport: conn.transport(),
        control,
    };
    let ok = frame_bytes(
        request_id,
        Body::LoginOk(v1::LoginResponse {
            user_id: identity.user_id.clone(),
            device_id: login.device_id.clone(),
            server_time_ms: now_ms(),
            idle_timeout_ms: ctx.config.session.idle_timeout_ms.min(u64::from(u32::MAX)) as u32,
            max_frame_bytes: ctx.config.limits.max_frame_bytes as u32,
            max_body_bytes: ctx.config.limits.max_body_bytes as u32,
        }),
    );
    // Register before answering, so a message sent right after the answer reaches this device.
    if let Some(replaced) = ctx.router.register(handle.clone(), now_ms()) {
        replaced.control.close(
            CloseReason::Replaced,
            "another connection logged in with this device id",
        );
    }
    if let Err(end) = reply(conn, ok).await {
        ctx.router
            .unregister(&handle.user_id, handle.conn_id, now_ms());
        return Err(end);
    }
    Ok(handle)
}

fn pong(request_id: u64, nonce: i64) -> Bytes {
    frame_bytes(
        request_id,
        Body::Pong(v1::Pong {
            nonce,
            server_time_ms: now_ms(),
        }),
    )
}

fn recv_error_end(err: RecvError) -> End {
    match err {
        RecvError::TooLarge { len, max } => End::Close(
            CloseReason::FrameTooLarge,
            format!("frame of {len} bytes exceeds {max}"),
        ),
        RecvError::Protocol(msg) => End::Close(CloseReason::ProtocolViolation, msg),
        RecvError::Io(_) => End::Gone,
    }
}

/// Writes one frame before login (nothing else is queued then).
async fn reply<C: FrameConn>(conn: &mut C, frame: Bytes) -> Result<(), End> {
    match tokio::time::timeout(Duration::from_secs(10), conn.send(&[frame])).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::Gone),
        Err(_) => Err(End::Close(
            CloseReason::SlowConsumer,
            "write timed out".into(),
        )),
    }
}

/// A connection's record of pushes in flight, as configured.
fn new_deliveries(ctx: &NodeContext) -> Box<Deliveries> {
    let s = &ctx.config.session;
    Box::new(Deliveries {
        pending: PendingDeliveries::new(
            Duration::from_millis(s.retry_initial_ms),
            Duration::from_millis(s.retry_max_ms),
            s.max_pending_deliveries,
        ),
        first_pushes: Vec::new(),
        retry_timer: None,
    })
}

/// A logged-in connection's state.
struct LoggedIn {
    ctx: Arc<NodeContext>,
    /// The client's address (with the handle's transport, the plugins' [`CallOrigin`]);
    /// an IPv4 address mapped into IPv6, which takes no discriminant's room.
    remote_ip: Ipv6Addr,
    /// The router's handle; its `ConnControl` holds the outbound queue, closed when the
    /// session is dropped.
    handle: OwnedHandle,
    /// Pushes in flight; created by the first push and freed when the re-push timer next
    /// fires with none waiting, so an idle connection holds none.
    deliveries: Option<Box<Deliveries>>,
    /// Frames to write at the end of the current loop turn.
    out: Vec<Bytes>,
    /// Presence watches, rooms and the slow requests' bound, allocated on first use: most
    /// connections use none of them, and every idle connection would carry them.
    on_demand: Option<Box<OnDemand>>,
}

/// A connection's pushes in flight.
struct Deliveries {
    /// Pushes awaiting their acks.
    pending: PendingDeliveries,
    /// Commit times of the first pushes in `out`, for the delivery-latency metric.
    first_pushes: Vec<std::time::Instant>,
    /// Fires when the next unacknowledged push is due again.
    retry_timer: Option<Pin<Box<Sleep>>>,
}

impl Deliveries {
    /// Nothing awaits an ack, nothing waits to be counted, and no timer is left: the
    /// record can go.
    fn settled(&self) -> bool {
        self.pending.is_empty() && self.first_pushes.is_empty() && self.retry_timer.is_none()
    }
}

/// A session's router handle: dropping it (with the session, running or parked) closes the
/// connection's outbound queue.
struct OwnedHandle(ConnHandle);

impl std::ops::Deref for OwnedHandle {
    type Target = ConnHandle;
    fn deref(&self) -> &ConnHandle {
        &self.0
    }
}

impl Drop for OwnedHandle {
    fn drop(&mut self) {
        self.0.control.close_queue();
    }
}

/// What a connection creates on first use.
#[derive(Default)]
struct OnDemand {
    /// Users whose presence this connection watches.
    watching: HashSet<Arc<str>>,
    /// Rooms this connection is in.
    rooms: HashSet<Arc<str>>,
    /// Bounds this connection's slow requests in flight; created by the first one.
    requests: Option<Arc<Semaphore>>,
}

impl LoggedIn {
    fn new(ctx: &Arc<NodeContext>, handle: ConnHandle, origin: CallOrigin) -> Self {
        Self {
            ctx: ctx.clone(),
            remote_ip: match origin.remote_ip {
                Some(IpAddr::V4(ip)) => ip.to_ipv6_mapped(),
                Some(IpAddr::V6(ip)) => ip,
                None => Ipv6Addr::UNSPECIFIED,
            },
            handle: OwnedHandle(handle),
            deliveries: None,
            out: Vec::new(),
            on_demand: None,
        }
    }

    /// Ends a session whose connection cannot go on (nothing to tell its client).
    fn abandon(mut self) {
        let (ctx, _) = self.log_out(&End::Gone);
        ctx.stats.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// The session ended with `end`: leaves the router, rooms and presence watches and
    /// counts the connection out. Returns the node's context and the client's address, for
    /// the close that follows.
    fn log_out(&mut self, end: &End) -> (Arc<NodeContext>, IpAddr) {
        self.leave_everything();
        let ctx = self.ctx.clone();
        ctx.router
            .unregister(&self.handle.user_id, self.handle.conn_id, now_ms());
        ctx.metrics.connection(self.handle.transport.as_str(), -1.0);
        ctx.stats.logged_in.fetch_sub(1, Ordering::Relaxed);
        if matches!(end, End::Close(CloseReason::SlowConsumer, _)) {
            ctx.metrics.slow_consumer();
        }
        let remote_ip = self.remote_ip.to_canonical();
        (ctx, remote_ip)
    }

    /// Where the plugins' calls about this connection come from.
    fn origin(&self) -> CallOrigin {
        CallOrigin {
            transport: self.handle.transport.as_str(),
            remote_ip: Some(self.remote_ip.to_canonical()),
        }
    }

    /// Leaves every room and stops every presence watch (the connection is closing).
    fn leave_everything(&mut self) {
        let Some(on_demand) = self.on_demand.take() else {
            return;
        };
        for room in &on_demand.rooms {
            self.ctx.rooms.leave(room, self.handle.conn_id);
        }
        self.ctx
            .router
            .unwatch_all(self.handle.conn_id, on_demand.watching.iter());
    }

    /// Whether this connection is in `room`.
    fn in_room(&self, room: &str) -> bool {
        self.on_demand
            .as_ref()
            .is_some_and(|s| s.rooms.contains(room))
    }

    /// Serves the logged-in connection until it ends, then logs it out. Takes the session
    /// by value: what ends it is then never stored beside it in the connection's task.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn stores its arguments twice in its future"
    )]
    fn run<C: FrameConn>(mut self, conn: &mut C) -> impl Future<Output = Run> + Send + '_ {
        async move {
            let end = self.serve(conn).await;
            if let End::Park = end {
                return Run::Park(self);
            }
            // No direct write may follow the task's last one (the close frame).
            let unwritten = self
                .handle
                .control
                .direct_socket()
                .and_then(|socket| socket.retire());
            let (ctx, remote_ip) = self.log_out(&end);
            // Boxed: the connection's task would keep room for it beside the session.
            Run::Ended(Box::new(Ended {
                end,
                ctx,
                remote_ip,
                unwritten,
            }))
        }
    }

    /// Serves the logged-in connection until it ends. (Returns an `async move` block: an
    /// `async fn` would keep its two references twice in every idle task.)
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn stores its arguments twice in its future"
    )]
    fn serve<'a, C: FrameConn>(
        &'a mut self,
        conn: &'a mut C,
    ) -> impl Future<Output = End> + Send + 'a {
        async move {
            // The task waits on its queue, its socket, close requests (replaced, slow consumer,
            // idle, shutdown: all through `ConnControl`) and, while pushes await their acks (and
            // until it next fires after the last is acked), a re-push timer. The idle timeout is
            // the node's sweep (`sweep_idle_connections`), so an idle connection's task holds no
            // timer.
            // A plain TCP socket starts busy (`DirectSocket`): from here on direct writes may go.
            if let Some(socket) = self.handle.control.direct_socket() {
                socket.end_write(|| self.handle.control.queue_is_empty());
            }
            loop {
                self.arm_retry_timer();
                // One hand-written poll over everything the task waits on: a `select!` kept its
                // branches' futures and its output side by side in every idle task.
                let wake = std::future::poll_fn(|cx| self.poll_wake(conn, cx)).await;
                let took_queued = {
                    let (took_queued, handler) = match self.on_wake(wake) {
                        Ok(turn) => turn,
                        Err(end) => return end,
                    };
                    if let Some(handler) = handler
                        && let Err(end) = handler.await
                    {
                        return end;
                    }
                    took_queued
                };
                // A plain TCP socket is busy (no direct writes, see `DirectSocket`) from here
                // until everything is written and the queue is empty. A turn that neither took
                // from the queue nor has anything to write leaves it as it is (no lock).
                let direct = self
                    .handle
                    .control
                    .direct_socket()
                    .filter(|_| took_queued || !self.out.is_empty());
                let unwritten = direct.and_then(|socket| socket.begin_write());
                if !self.out.is_empty() || unwritten.is_some() {
                    let write = async {
                        if let Some(rest) = &unwritten {
                            conn.write_raw(rest).await?;
                        }
                        if self.out.is_empty() {
                            return Ok(());
                        }
                        conn.send(&self.out).await
                    };
                    let write_timeout =
                        Duration::from_millis(self.ctx.config.limits.write_timeout_ms);
                    // Boxed with its deadline: the write's state lives only while it runs.
                    match Box::pin(tokio::time::timeout(write_timeout, write)).await {
                        Ok(Ok(())) => {
                            self.out.clear();
                            if let Some(deliveries) = &mut self.deliveries {
                                for committed in deliveries.first_pushes.drain(..) {
                                    self.ctx.metrics.delivery(committed.elapsed());
                                }
                            }
                        }
                        Ok(Err(_)) => return End::Gone,
                        Err(_) => {
                            return End::Close(CloseReason::SlowConsumer, "write timed out".into());
                        }
                    }
                    // Do not keep a large batch's allocation around on an idle connection.
                    if self.out.capacity() > MAX_WRITE_BATCH * 2 {
                        self.out = Vec::new();
                    }
                }
                if let Some(socket) = direct {
                    socket.end_write(|| self.handle.control.queue_is_empty());
                }
            }
        }
    }

    /// Acts on what woke the task: whether it took from its queue, and the handler still to
    /// await for a frame from the client. (Takes the wake by value: nothing of it stays in
    /// the task while the handler runs.)
    fn on_wake(&mut self, wake: Wake) -> Result<(bool, Option<Handler<'_>>), End> {
        match wake {
            Wake::Ended(end) => Err(end),
            Wake::Queued => Ok((true, None)),
            Wake::Repush => Ok((false, None)),
            Wake::Park => Err(End::Park),
            Wake::Frame(bytes) => {
                self.handle.control.heard(monotonic_ms());
                Ok((false, self.handle_frame(bytes)))
            }
        }
    }

    /// What woke the task, in order of precedence: a close request, queued frames (taken
    /// into `out`), a frame from the client, the re-push timer (its pushes taken into `out`).
    fn poll_wake<C: FrameConn>(&mut self, conn: &mut C, cx: &mut Context<'_>) -> Poll<Wake> {
        if let Some((reason, message)) = self.handle.control.close_requested() {
            return Poll::Ready(Wake::Ended(End::Close(*reason, message.clone())));
        }
        if self.poll_take_queued(cx).is_ready() {
            return Poll::Ready(Wake::Queued);
        }
        // The queue's waker, just registered, also serves close requests, but a close asked
        // for between the check above and the registration found no waker to wake (a wake
        // takes it, and this task runs because of one): looked at again.
        if let Some((reason, message)) = self.handle.control.close_requested() {
            return Poll::Ready(Wake::Ended(End::Close(*reason, message.clone())));
        }
        match conn.poll_recv(cx) {
            Poll::Ready(Ok(Some(bytes))) => return Poll::Ready(Wake::Frame(bytes)),
            Poll::Ready(Ok(None)) => return Poll::Ready(Wake::Ended(End::Gone)),
            Poll::Ready(Err(err)) => return Poll::Ready(Wake::Ended(recv_error_end(err))),
            Poll::Pending => {}
        }
        if let Some(timer) = self
            .deliveries
            .as_mut()
            .and_then(|d| d.retry_timer.as_mut())
            && timer.as_mut().poll(cx).is_ready()
        {
            self.retry_timer_elapsed();
            return Poll::Ready(Wake::Repush);
        }
        // Nothing to do: park if asked (pushes awaiting acks keep the task and its timer).
        if self.deliveries.is_none()
            && self.out.is_empty()
            && let Some(socket) = self.handle.control.direct_socket()
            && socket.take_park_request()
        {
            return Poll::Ready(Wake::Park);
        }
        Poll::Pending
    }

    /// Creates the re-push timer when pushes start waiting for acks, and brings it forward
    /// when one is due earlier. It is not dropped when the last push is acked, nor moved
    /// later: it fires once at its deadline and is then dropped or moved to the next push
    /// due ([`Self::retry_timer_elapsed`]). Creating and dropping a timer for every push
    /// of a busy connection took the timer wheel's lock twice per delivery.
    fn arm_retry_timer(&mut self) {
        let Some(deliveries) = &mut self.deliveries else {
            return;
        };
        let Some(due) = deliveries.pending.next_due() else {
            if deliveries.settled() {
                self.deliveries = None;
            }
            return;
        };
        let due = Instant::from_std(due);
        match &mut deliveries.retry_timer {
            Some(timer) if timer.deadline() <= due => {}
            Some(timer) => timer.as_mut().reset(due),
            None => deliveries.retry_timer = Some(Box::pin(tokio::time::sleep_until(due))),
        }
    }

    /// The re-push timer fired: queues the pushes due again, then moves the timer to the
    /// next one due, or drops it (and the record of pushes in flight) when none waits: an
    /// idle connection holds neither.
    fn retry_timer_elapsed(&mut self) {
        let Some(deliveries) = &mut self.deliveries else {
            return;
        };
        let due = deliveries.pending.take_due(Instant::now().into_std());
        self.out.extend(due.iter().map(|p| p.frame.clone()));
        match (deliveries.pending.next_due(), &mut deliveries.retry_timer) {
            (Some(next), Some(timer)) => timer.as_mut().reset(Instant::from_std(next)),
            _ => {
                deliveries.retry_timer = None;
                if deliveries.settled() {
                    self.deliveries = None;
                }
            }
        }
    }

    /// Moves what is queued (at most a write batch) to `out`, under the queue's lock once;
    /// with nothing queued, registers the task to be woken when something is.
    fn poll_take_queued(&mut self, cx: &mut Context<'_>) -> Poll<usize> {
        let room = MAX_WRITE_BATCH.saturating_sub(self.out.len()).max(1);
        let Self {
            ctx,
            handle,
            deliveries,
            out,
            ..
        } = self;
        handle
            .control
            .poll_take_queued(cx, room, |item| match item {
                Outbound::Frame(frame) => out.push(frame),
                // The rest of that frame is taken from the socket before the next write.
                Outbound::FinishDirectWrite => {}
                Outbound::Deliver(push) => {
                    out.push(push.frame.clone());
                    ctx.metrics
                        .message_out(MessageKind::of(&push.conversation_id), 1);
                    let deliveries = deliveries.get_or_insert_with(|| new_deliveries(ctx));
                    deliveries.first_pushes.push(push.committed_at);
                    deliveries.pending.pushed(push, Instant::now().into_std());
                }
            })
    }

    /// Answers one frame. Immediate answers go to `self.out`; stored sends are answered by
    /// the pipeline; slow reads by a spawned task. Returns the handler still to await, for
    /// frames not answered at once.
    ///
    /// Each kind's handler is boxed: its future would otherwise be part of every idle
    /// connection's task, whatever it is doing. Sends and delivery acks, nearly every frame,
    /// get boxes of their own, small enough for the allocator's per-thread cache; one box
    /// for every kind took the size of the largest handler (3.5 KB), on glibc's slow path
    /// for every frame.
    // Out of line, so that profiles (scripts/callgrind-per-message.py) see a frame's decoding.
    #[inline(never)]
    fn handle_frame(&mut self, bytes: Bytes) -> Option<Handler<'_>> {
        // A send's body shares the frame's buffer (a buffer of its own per frame, see
        // `im_proto::codec`) all the way to the journal and the pushes: no copy.
        let frame = match v1::Frame::from_shared(bytes) {
            Ok(frame) => frame,
            Err(err) => {
                self.out.push(error_bytes(
                    0,
                    ErrorCode::BadFrame,
                    format!("undecodable frame: {err}"),
                ));
                return None;
            }
        };
        let rid = frame.request_id;
        match frame.body {
            None => {
                self.out.push(error_bytes(
                    rid,
                    ErrorCode::BadFrame,
                    "frame has no known body",
                ));
                None
            }
            Some(Body::Ping(ping)) => {
                self.out.push(pong(rid, ping.nonce));
                None
            }
            Some(Body::Send(send)) => Some(Box::pin(self.send(rid, send))),
            Some(Body::DeliverAck(ack)) => Some(Box::pin(self.deliver_ack(ack))),
            Some(body) => Some(Box::pin(self.handle_request(rid, body))),
        }
    }

    /// A device confirms a push.
    async fn deliver_ack(&mut self, ack: v1::DeliverAck) -> Result<(), End> {
        // Always settles this connection's own pushes: a user just removed from a group
        // acks the announcement of the removal.
        if let Some(deliveries) = &mut self.deliveries {
            deliveries.pending.acked(&ack.conversation_id, ack.seq);
        }
        if self.takes_part(&ack.conversation_id).await {
            self.ctx
                .cursors
                .record(&self.handle, ack.conversation_id.as_str().into(), ack.seq);
        }
        Ok(())
    }

    /// Every frame kind but the frequent ones [`Self::handle_frame`] answers itself.
    async fn handle_request(&mut self, rid: u64, body: Body) -> Result<(), End> {
        match body {
            Body::Sync(req) => {
                self.spawn_request(rid, req.conversation_id.clone(), Request::Sync(req))
                    .await
            }
            Body::History(req) => {
                self.spawn_request(rid, req.conversation_id.clone(), Request::History(req))
                    .await
            }
            Body::MarkRead(req) => {
                self.spawn_request(rid, req.conversation_id.clone(), Request::MarkRead(req))
                    .await
            }
            Body::ListConversations(req) => {
                self.spawn_request(rid, String::new(), Request::List(req))
                    .await
            }
            Body::Group(req) => self.group_request(rid, req).await?,
            Body::ListGroupMembers(req) => {
                let conversation_id = ids::group_conversation_id(&req.group_id);
                self.spawn_request(rid, conversation_id, Request::Members(req))
                    .await
            }
            Body::ListGroups(_) => {
                self.spawn_request(rid, String::new(), Request::Groups)
                    .await
            }
            Body::PresenceSubscribe(req) => self.presence_subscribe(rid, req),
            Body::Room(req) => self.room_request(rid, req),
            Body::RoomSend(req) => self.room_send(rid, req).await,
            Body::Login(_) => self.out.push(error_bytes(
                rid,
                ErrorCode::AlreadyLoggedIn,
                "this connection is logged in",
            )),
            _ => self.out.push(error_bytes(
                rid,
                ErrorCode::Unsupported,
                "clients may not send this frame kind",
            )),
        }
        Ok(())
    }

    async fn send(&mut self, rid: u64, mut send: v1::SendRequest) -> Result<(), End> {
        let limits = &self.ctx.config.limits;
        let invalid = |msg: &str| error_bytes(rid, ErrorCode::InvalidArgument, msg);
        if !ids::is_valid_client_msg_id(&send.client_msg_id) {
            self.out.push(invalid(
                "client_msg_id must be 1-64 bytes without control characters",
            ));
            return Ok(());
        }
        if let Err((code, message)) = check_content(limits, &send.body, &send.content_type) {
            self.out.push(error_bytes(rid, code, message));
            return Ok(());
        }
        let to = match send.target.take() {
            Some(v1::send_request::Target::ToUser(to)) => to,
            Some(v1::send_request::Target::ToGroup(group)) => {
                // Boxed: the group lookup's future would otherwise enlarge every send's.
                return Box::pin(self.send_to_group(rid, group, send)).await;
            }
            None => {
                self.out.push(invalid("no target"));
                return Ok(());
            }
        };
        if !ids::is_valid_id(&to) {
            self.out.push(invalid("to_user is not a valid user id"));
            return Ok(());
        }
        match self.ctx.known_users.exists(&to).await {
            Ok(true) => {}
            Ok(false) => {
                self.out.push(error_bytes(
                    rid,
                    ErrorCode::UnknownUser,
                    format!("no user {to:?}"),
                ));
                return Ok(());
            }
            Err(err) => {
                tracing::error!(error = %err, "looking up a user failed");
                self.out.push(error_bytes(
                    rid,
                    ErrorCode::Internal,
                    "lookup failed; retry",
                ));
                return Ok(());
            }
        }
        let conversation_id = ids::direct_conversation_id(&self.handle.user_id, &to);
        self.screen_and_submit(rid, conversation_id, types::MessageTarget::User(to), send)
            .await
    }

    /// Changes the set of users this connection watches and answers their states.
    fn presence_subscribe(&mut self, rid: u64, req: v1::PresenceSubscribeRequest) {
        let cap = self.ctx.config.limits.max_presence_watch;
        if let Some(bad) = req
            .add
            .iter()
            .chain(&req.remove)
            .find(|u| !ids::is_valid_id(u))
        {
            let message = format!("{bad:?} is not a valid user id");
            self.out
                .push(error_bytes(rid, ErrorCode::InvalidArgument, message));
            return;
        }
        let subscriptions = self.on_demand.get_or_insert_with(Box::default);
        let mut after: HashSet<&str> = subscriptions.watching.iter().map(|u| &**u).collect();
        for user in &req.remove {
            after.remove(user.as_str());
        }
        after.extend(req.add.iter().map(String::as_str));
        if after.len() > cap {
            let message = format!("a connection watches at most {cap} users");
            self.out
                .push(error_bytes(rid, ErrorCode::InvalidArgument, message));
            return;
        }
        let add: Vec<Arc<str>> = req.add.iter().map(|u| Arc::from(u.as_str())).collect();
        let states = self
            .ctx
            .router
            .watch_presence(&self.handle, &add, &req.remove);
        for user in &req.remove {
            subscriptions.watching.remove(user.as_str());
        }
        subscriptions.watching.extend(add);
        let answer = v1::PresenceSubscribeResponse {
            states,
            watching: subscriptions.watching.len() as u32,
        };
        self.out
            .push(frame_bytes(rid, Body::PresenceStates(answer)));
    }

    /// Joins or leaves a live room.
    fn room_request(&mut self, rid: u64, req: v1::RoomRequest) {
        if !ids::is_valid_id(&req.room_id) {
            let message = "room_id must be 1-64 of [A-Za-z0-9_.@-]";
            self.out
                .push(error_bytes(rid, ErrorCode::InvalidArgument, message));
            return;
        }
        let room: Arc<str> = req.room_id.as_str().into();
        let (members, joined) = match req.action {
            Some(v1::room_request::Action::Join(_)) => {
                let cap = self.ctx.config.limits.max_rooms_per_connection;
                let rooms = &mut self.on_demand.get_or_insert_with(Box::default).rooms;
                if !rooms.contains(&room) && rooms.len() >= cap {
                    let message = format!("a connection is in at most {cap} rooms");
                    self.out
                        .push(error_bytes(rid, ErrorCode::InvalidArgument, message));
                    return;
                }
                rooms.insert(room.clone());
                (self.ctx.rooms.join(&room, &self.handle), true)
            }
            Some(v1::room_request::Action::Leave(_)) => {
                let was_in = self
                    .on_demand
                    .as_mut()
                    .is_some_and(|s| s.rooms.remove(&room));
                if !was_in {
                    self.out.push(error_bytes(
                        rid,
                        ErrorCode::NotInRoom,
                        "this connection is not in the room",
                    ));
                    return;
                }
                let left = self.ctx.rooms.leave(&room, self.handle.conn_id);
                (left.unwrap_or(0), false)
            }
            None => {
                self.out
                    .push(error_bytes(rid, ErrorCode::InvalidArgument, "no action"));
                return;
            }
        };
        let answer = v1::RoomResponse {
            room_id: req.room_id,
            members: members as u32,
            joined,
        };
        self.out.push(frame_bytes(rid, Body::RoomResult(answer)));
    }

    /// A message to a room this connection is in: screened like any message, then handed
    /// to the room's other connections; never stored.
    async fn room_send(&mut self, rid: u64, req: v1::RoomSendRequest) {
        if !self.in_room(&req.room_id) {
            self.out.push(error_bytes(
                rid,
                ErrorCode::NotInRoom,
                "join the room before sending to it",
            ));
            return;
        }
        if let Err((code, message)) =
            check_content(&self.ctx.config.limits, &req.body, &req.content_type)
        {
            self.out.push(error_bytes(rid, code, message));
            return;
        }
        // The plugins' view of a room message is built only when a plugin screens it.
        let (body, content_type) = match self.screening_plugins() {
            None => (req.body, req.content_type),
            Some(plugins) => {
                let message = self.plugin_message(
                    format!("r:{}", req.room_id),
                    types::MessageTarget::Group(req.room_id.clone()),
                    String::new(),
                    req.body,
                    req.content_type,
                );
                match Box::pin(self.screen_with(&plugins, rid, message)).await {
                    Screened::Pass(message) => (message.body, message.content_type),
                    Screened::Answered => return,
                    Screened::Dropped(_) => {
                        let ack = v1::RoomSendAck {
                            room_id: req.room_id,
                            dropped: true,
                            ..Default::default()
                        };
                        self.out.push(frame_bytes(rid, Body::RoomSendAck(ack)));
                        return;
                    }
                }
            }
        };
        let sender = (&*self.handle.user_id, &*self.handle.device_id);
        let (room_seq, delivered) = self
            .ctx
            .rooms
            .publish(&req.room_id, Some(self.handle.conn_id), |seq| {
                room_push(&req.room_id, sender, body, content_type, seq)
            })
            .unwrap_or((0, 0));
        self.ctx.metrics.message_in(MessageKind::Room, 1);
        self.ctx
            .metrics
            .message_out(MessageKind::Room, delivered as u64);
        let answer = v1::RoomSendAck {
            room_id: req.room_id,
            delivered: delivered as u32,
            dropped: false,
            room_seq,
        };
        self.out.push(frame_bytes(rid, Body::RoomSendAck(answer)));
    }

    /// Whether this user takes part in `conversation_id`: one of its two users, or a member
    /// of its group.
    async fn takes_part(&self, conversation_id: &str) -> bool {
        matches!(
            read_access(&self.ctx, &self.handle.user_id, conversation_id, false).await,
            Ok(ReadAccess::Whole)
        )
    }

    /// A send to a group: the sender must be a member; stored once in `g:<group>`.
    async fn send_to_group(
        &mut self,
        rid: u64,
        group: String,
        send: v1::SendRequest,
    ) -> Result<(), End> {
        if !ids::is_valid_id(&group) {
            self.out.push(error_bytes(
                rid,
                ErrorCode::InvalidArgument,
                "to_group is not a valid group id",
            ));
            return Ok(());
        }
        match self.ctx.groups.members(&group).await {
            Ok(None) => {
                let message = format!("no group {group:?}");
                self.out
                    .push(error_bytes(rid, ErrorCode::UnknownGroup, message));
                return Ok(());
            }
            Ok(Some(members)) => {
                let user: &str = &self.handle.user_id;
                if !groups::contains(&members, user) {
                    let message = "you are not a member of this group";
                    self.out
                        .push(error_bytes(rid, ErrorCode::NotAMember, message));
                    return Ok(());
                }
            }
            Err(err) => {
                tracing::error!(error = %err, "looking up a group failed");
                self.out.push(error_bytes(
                    rid,
                    ErrorCode::Internal,
                    "lookup failed; retry",
                ));
                return Ok(());
            }
        }
        let conversation_id = ids::group_conversation_id(&group);
        self.screen_and_submit(
            rid,
            conversation_id,
            types::MessageTarget::Group(group),
            send,
        )
        .await
    }

    /// Passes a checked send through the plugins and hands what they let through to the
    /// pipeline, which acks it once stored.
    async fn screen_and_submit(
        &mut self,
        rid: u64,
        conversation_id: String,
        target: types::MessageTarget,
        send: v1::SendRequest,
    ) -> Result<(), End> {
        // The strings the plugins see are the stored message's: moved in and back out.
        let message = self.plugin_message(
            conversation_id,
            target,
            send.client_msg_id,
            send.body,
            send.content_type,
        );
        let message = match self.screen(rid, message).await {
            Screened::Pass(message) => message,
            Screened::Answered => return Ok(()),
            Screened::Dropped(message) => {
                let ack = v1::SendAck {
                    client_msg_id: message.client_msg_id,
                    conversation_id: message.conversation_id,
                    dropped: true,
                    ..Default::default()
                };
                self.out.push(frame_bytes(rid, Body::SendAck(ack)));
                return Ok(());
            }
        };
        let (types::MessageTarget::User(recipient_id) | types::MessageTarget::Group(recipient_id)) =
            message.target;
        let message = NewMessage {
            conversation_id: message.conversation_id,
            sender_id: message.sender.user_id,
            sender_device_id: message.sender.device_id,
            recipient_id,
            client_msg_id: message.client_msg_id,
            body: message.body,
            content_type: message.content_type,
            server_msg_id: uuid::Uuid::now_v7().to_string(),
            server_time_ms: now_ms(),
        };
        // Only the wait for room is awaited (boxed): the job never sits in this future.
        match self.submit(rid, message)? {
            Some(wait_for_room) => wait_for_room.await,
            None => Ok(()),
        }
    }

    /// A group change: checked and decided here, stored and announced by the pipeline.
    async fn group_request(&mut self, rid: u64, request: v1::GroupRequest) -> Result<(), End> {
        let origin = self.origin();
        let actor = Actor::User {
            handle: &self.handle,
            origin: &origin,
        };
        match groups::prepare(&self.ctx, actor, request).await {
            Ok(prepared) => {
                let job = GroupJob {
                    prepared,
                    reply: ReplyTo::Connection {
                        handle: self.handle.clone(),
                        request_id: rid,
                    },
                };
                if self.ctx.pipeline.submit_group(job).await.is_err() {
                    return Err(shutting_down());
                }
            }
            Err(refusal) => self
                .out
                .push(error_bytes(rid, refusal.code, refusal.message)),
        }
        Ok(())
    }

    /// Hands a checked message to the pipeline, which acks it once stored. Nearly always
    /// the pipeline has room; when it has not, returns the wait for it.
    fn submit(&mut self, rid: u64, message: NewMessage) -> Result<Option<Handler<'_>>, End> {
        let job = SendJob {
            message,
            reply: ReplyTo::Connection {
                handle: self.handle.clone(),
                request_id: rid,
            },
        };
        match self.ctx.pipeline.try_submit(job) {
            Ok(()) => Ok(None),
            Err(crate::pipeline::Refused::Stopped(_)) => Err(shutting_down()),
            Err(crate::pipeline::Refused::Full(job)) => {
                Ok(Some(Box::pin(self.submit_when_room(job))))
            }
        }
    }

    /// Waits for room in the pipeline: the back-pressure that slows this client's reads.
    async fn submit_when_room(&self, job: SendJob) -> Result<(), End> {
        tokio::select! {
            submitted = self.ctx.pipeline.submit(job) => {
                if submitted.is_err() {
                    return Err(shutting_down());
                }
            }
            _ = self.ctx.shutdown.cancelled() => return Err(shutting_down()),
        }
        Ok(())
    }

    /// Passes a message through the message-filter and risk-control chains. A refusal is
    /// answered here; a silent drop is left to the caller, whose acknowledgement differs
    /// (`SendAck` or `RoomSendAck`).
    async fn screen(&mut self, rid: u64, message: PluginMessage) -> Screened {
        let Some(plugins) = self.screening_plugins() else {
            return Screened::Pass(message);
        };
        // Boxed: the chains' state would otherwise enlarge every send's future, plugins or
        // not, past what the allocator serves from its per-thread cache.
        Box::pin(self.screen_with(&plugins, rid, message)).await
    }

    /// The node's plugins, if any of them screens messages (filters or risk control).
    fn screening_plugins(&self) -> Option<Arc<PluginHost>> {
        let plugins = self.ctx.plugins.as_ref()?;
        (plugins.has_hook(Hook::MessageFilter) || plugins.has_hook(Hook::RiskControl))
            .then(|| plugins.clone())
    }

    /// A message from this connection's user and device, as the plugins see it.
    fn plugin_message(
        &self,
        conversation_id: String,
        target: types::MessageTarget,
        client_msg_id: String,
        body: Bytes,
        content_type: String,
    ) -> PluginMessage {
        PluginMessage {
            conversation_id,
            sender: types::Principal {
                user_id: self.handle.user_id.to_string(),
                device_id: self.handle.device_id.to_string(),
            },
            target,
            client_msg_id,
            content_type,
            body,
        }
    }

    /// [`Self::screen`] through the plugins' chains.
    async fn screen_with(
        &mut self,
        plugins: &PluginHost,
        rid: u64,
        mut message: PluginMessage,
    ) -> Screened {
        let origin = self.origin();
        match plugins.filter(&origin, &mut message).await {
            FilterOutcome::Pass { modified } => {
                if modified
                    && (message.body.is_empty()
                        || message.body.len() > self.ctx.config.limits.max_body_bytes)
                {
                    let reason = "a message filter produced an empty or oversized body";
                    self.out.push(error_bytes(rid, ErrorCode::Rejected, reason));
                    return Screened::Answered;
                }
            }
            FilterOutcome::Reject { reason } => {
                self.out.push(error_bytes(rid, ErrorCode::Rejected, reason));
                return Screened::Answered;
            }
            FilterOutcome::Drop => return Screened::Dropped(message),
        }
        match plugins.assess_send(&origin, &mut message).await {
            RiskOutcome::Allow => {}
            RiskOutcome::Throttle {
                retry_after_ms,
                reason,
            } => {
                let error = v1::Error {
                    code: ErrorCode::Throttled as i32,
                    message: reason,
                    retry_after_ms,
                };
                self.out.push(frame_bytes(rid, Body::Error(error)));
                return Screened::Answered;
            }
            RiskOutcome::Block { reason } => {
                self.out.push(error_bytes(rid, ErrorCode::Rejected, reason));
                return Screened::Answered;
            }
        }
        Screened::Pass(message)
    }

    /// Runs a slow request in its own task (bounded per connection); its answer is queued.
    async fn spawn_request(&mut self, rid: u64, conversation_id: String, request: Request) {
        // Up to which seq the user may read the conversation: all of it as a participant
        // (`None`), up to its removal as a former group member (what its devices missed
        // while a member, synced after the removal).
        let mut readable_until = None;
        if !matches!(request, Request::List(_) | Request::Groups) {
            let former_may_read = request.read_conversation().is_some();
            match read_access(
                &self.ctx,
                &self.handle.user_id,
                &conversation_id,
                former_may_read,
            )
            .await
            {
                Ok(ReadAccess::Whole) => {}
                Ok(ReadAccess::UpTo(seq)) => readable_until = Some(seq),
                Ok(ReadAccess::Refused) => {
                    self.out.push(refused_read(rid, &conversation_id));
                    return;
                }
                // A look-up that failed is no refusal: a client told NOT_A_MEMBER gives up
                // on the conversation's gaps (the SDK skips them).
                Err(err) => {
                    tracing::warn!(error = %err, "checking membership for a read failed");
                    self.out.push(error_bytes(
                        rid,
                        ErrorCode::Internal,
                        "request failed; retry",
                    ));
                    return;
                }
            }
        }
        let requests = self
            .on_demand
            .get_or_insert_with(Box::default)
            .requests
            .get_or_insert_with(|| Arc::new(Semaphore::new(MAX_REQUESTS_IN_FLIGHT)))
            .clone();
        let Ok(permit) = requests.acquire_owned().await else {
            return;
        };
        let ctx = self.ctx.clone();
        let handle = self.handle.clone();
        tokio::spawn(async move {
            let answer = match answer(&ctx, &handle, rid, request, readable_until).await {
                Ok(frame) => frame,
                Err(StoreError::UnknownConversation) => error_bytes(
                    rid,
                    ErrorCode::UnknownConversation,
                    "no such conversation for this user",
                ),
                Err(err) => {
                    tracing::error!(error = %err, "a read request failed");
                    error_bytes(rid, ErrorCode::Internal, "request failed; retry")
                }
            };
            handle.offer_now(answer);
            drop(permit);
        });
    }
}

/// Checks a message body and content type against the limits.
pub fn check_content(
    limits: &crate::config::LimitsConfig,
    body: &[u8],
    content_type: &str,
) -> Result<(), (ErrorCode, String)> {
    if body.is_empty() {
        return Err((ErrorCode::InvalidArgument, "body is empty".into()));
    }
    if body.len() > limits.max_body_bytes {
        let message = format!(
            "body of {} bytes exceeds {}",
            body.len(),
            limits.max_body_bytes
        );
        return Err((ErrorCode::BodyTooLarge, message));
    }
    if content_type.len() > MAX_CONTENT_TYPE_BYTES {
        return Err((
            ErrorCode::InvalidArgument,
            "content_type exceeds 128 bytes".into(),
        ));
    }
    Ok(())
}

/// The encoded push of a room message.
pub fn room_push(
    room_id: &str,
    sender: (&str, &str),
    body: Bytes,
    content_type: String,
    room_seq: u64,
) -> Bytes {
    frame_bytes(
        0,
        Body::RoomMessage(v1::RoomMessage {
            room_id: room_id.to_owned(),
            sender_id: sender.0.to_owned(),
            sender_device_id: sender.1.to_owned(),
            body,
            content_type,
            server_time_ms: now_ms(),
            room_seq,
        }),
    )
}

/// What the plugins made of a message.
enum Screened {
    /// Store (or publish) the message, its body and content type possibly rewritten.
    Pass(PluginMessage),
    /// A filter dropped it silently: the caller acknowledges it as dropped.
    Dropped(PluginMessage),
    /// Refused or throttled; the answer is queued already.
    Answered,
}

#[derive(Clone)]
enum Request {
    Sync(v1::SyncRequest),
    History(v1::HistoryRequest),
    MarkRead(v1::MarkReadRequest),
    List(v1::ListConversationsRequest),
    Members(v1::ListGroupMembersRequest),
    Groups,
}

impl Request {
    /// The conversation a sync or history request reads (what a former member may ask).
    fn read_conversation(&self) -> Option<&str> {
        match self {
            Request::Sync(req) => Some(&req.conversation_id),
            Request::History(req) => Some(&req.conversation_id),
            _ => None,
        }
    }
}

fn page_size(limit: u32) -> u32 {
    if limit == 0 {
        DEFAULT_PAGE
    } else {
        limit.min(MAX_PAGE)
    }
}

/// Frame bytes kept for the envelope and the response's own fields.
const ENVELOPE_RESERVE: usize = 1024;

/// Converts stored messages to wire messages while they fit in `budget` encoded bytes (at
/// least one always fits: bodies are limited well below the frame size). Returns whether
/// any were left out.
fn fit_messages(messages: &[im_store::StoredMessage], budget: usize) -> (Vec<v1::Message>, bool) {
    let mut out = Vec::with_capacity(messages.len());
    let mut used = 0;
    for m in messages {
        let wire = to_proto(m);
        let len = prost::Message::encoded_len(&wire) + 8;
        if used + len > budget && !out.is_empty() {
            return (out, true);
        }
        used += len;
        out.push(wire);
    }
    (out, false)
}

/// How much of a conversation a user may read.
enum ReadAccess {
    /// One of a direct conversation's two users, or a member of its group: all of it.
    Whole,
    /// Removed from its group by the announcement at this seq: up to it.
    UpTo(u64),
    Refused,
}

/// How much of `conversation_id` `user_id` may read; a group's former members count only
/// when `former_may_read` (sync and history).
async fn read_access(
    ctx: &NodeContext,
    user_id: &str,
    conversation_id: &str,
    former_may_read: bool,
) -> Result<ReadAccess, StoreError> {
    if ids::direct_peer(conversation_id, user_id).is_some() {
        return Ok(ReadAccess::Whole);
    }
    let Some(group) = ids::conversation_group(conversation_id) else {
        return Ok(ReadAccess::Refused);
    };
    if ctx.groups.is_member(group, user_id).await? {
        return Ok(ReadAccess::Whole);
    }
    if !former_may_read {
        return Ok(ReadAccess::Refused);
    }
    Ok(
        match ctx.store.removed_at(user_id, conversation_id).await? {
            Some(seq) => ReadAccess::UpTo(seq),
            None => ReadAccess::Refused,
        },
    )
}

/// The answer to a request about a conversation its user may not read.
fn refused_read(rid: u64, conversation_id: &str) -> Bytes {
    if ids::conversation_group(conversation_id).is_some() {
        error_bytes(
            rid,
            ErrorCode::NotAMember,
            "you are not a member of this group",
        )
    } else {
        error_bytes(
            rid,
            ErrorCode::UnknownConversation,
            "no such conversation for this user",
        )
    }
}

async fn answer(
    ctx: &NodeContext,
    handle: &ConnHandle,
    rid: u64,
    request: Request,
    readable_until: Option<u64>,
) -> Result<Bytes, StoreError> {
    let store = &ctx.store;
    // A member's reads of a group are looked at again once done: kept to answer it again.
    let again = match request.read_conversation() {
        Some(conversation_id)
            if readable_until.is_none() && ids::conversation_group(conversation_id).is_some() =>
        {
            Some(request.clone())
        }
        _ => None,
    };
    // Pages are cut to fit one frame; `has_more` tells the client to ask again.
    let budget = ctx.config.limits.max_frame_bytes - ENVELOPE_RESERVE;
    let body = match request {
        Request::Sync(req) => {
            let limit = page_size(req.limit);
            // Read last_seq first: every message up to it is stored, so has_more is exact.
            let last_seq = store
                .last_seq(&req.conversation_id)
                .await?
                .min(readable_until.unwrap_or(u64::MAX));
            let mut messages = store
                .messages_after(&req.conversation_id, req.after_seq, limit + 1)
                .await?;
            messages.retain(|m| m.seq <= last_seq);
            let mut has_more = messages.len() > limit as usize;
            messages.truncate(limit as usize);
            let (messages, cut) = fit_messages(&messages, budget);
            has_more |= cut;
            Body::SyncResult(v1::SyncResponse {
                conversation_id: req.conversation_id,
                messages,
                has_more,
                last_seq,
            })
        }
        Request::History(req) => {
            let limit = page_size(req.limit);
            // A former member reads back from its removal (0 means from the latest).
            let before_seq = match readable_until {
                Some(until) if req.before_seq == 0 || req.before_seq > until.saturating_add(1) => {
                    until.saturating_add(1)
                }
                _ => req.before_seq,
            };
            let mut messages = store
                .messages_before(&req.conversation_id, before_seq, limit + 1)
                .await?;
            let mut has_more = messages.len() > limit as usize;
            messages.truncate(limit as usize);
            let (messages, cut) = fit_messages(&messages, budget);
            has_more |= cut;
            Body::HistoryResult(v1::HistoryResponse {
                conversation_id: req.conversation_id,
                messages,
                has_more,
            })
        }
        Request::MarkRead(req) => {
            let state = store
                .mark_read(&handle.user_id, &req.conversation_id, req.read_seq)
                .await?;
            Body::MarkReadOk(v1::MarkReadResponse {
                conversation_id: req.conversation_id,
                read_seq: state.read_seq,
                unread_count: state.unread_count,
            })
        }
        Request::List(req) => {
            let limit = page_size(req.limit);
            let mut list = store
                .list_conversations(
                    &handle.user_id,
                    &handle.device_id,
                    (req.before_time_ms != 0).then_some(im_store::ListPosition {
                        last_time_ms: req.before_time_ms,
                        conversation_id: &req.after_conversation_id,
                    }),
                    limit + 1,
                )
                .await?;
            let mut has_more = list.len() > limit as usize;
            list.truncate(limit as usize);
            let mut conversations = Vec::with_capacity(list.len());
            let mut used = 0;
            for c in list {
                let entry = v1::Conversation {
                    conversation_id: c.conversation_id,
                    peer_id: c.peer_id,
                    last_seq: c.last_seq,
                    last_message: c.last_message.as_ref().map(to_proto),
                    read_seq: c.read_seq,
                    unread_count: c.unread_count,
                    delivered_seq: c.delivered_seq,
                };
                let len = prost::Message::encoded_len(&entry) + 8;
                if used + len > budget && !conversations.is_empty() {
                    has_more = true;
                    break;
                }
                used += len;
                conversations.push(entry);
            }
            Body::Conversations(v1::ListConversationsResponse {
                conversations,
                has_more,
            })
        }
        Request::Members(req) => {
            let limit = page_size(req.limit);
            let after = (!req.after_user_id.is_empty()).then_some(req.after_user_id.as_str());
            let mut members = store.group_members(&req.group_id, after, limit + 1).await?;
            let has_more = members.len() > limit as usize;
            members.truncate(limit as usize);
            Body::GroupMembers(v1::ListGroupMembersResponse {
                group_id: req.group_id,
                members: members
                    .into_iter()
                    .map(|m| v1::GroupMember {
                        user_id: m.user_id,
                        role: groups::role_to_proto(m.role) as i32,
                        joined_ms: m.joined_ms,
                    })
                    .collect(),
                has_more,
            })
        }
        Request::Groups => {
            let list = store.user_groups(&handle.user_id).await?;
            Body::Groups(v1::ListGroupsResponse {
                groups: list.iter().map(groups::group_to_proto).collect(),
            })
        }
    };
    // A removal that landed after the membership check (it is stored before any later
    // message, so one still a member read nothing it may not) makes this a former
    // member's request: answered again up to the removal, or refused.
    if let Some(again) = again {
        let conversation_id = again.read_conversation().unwrap_or_default();
        match read_access(ctx, &handle.user_id, conversation_id, true).await? {
            ReadAccess::Whole => {}
            ReadAccess::UpTo(seq) => {
                return Box::pin(answer(ctx, handle, rid, again, Some(seq))).await;
            }
            ReadAccess::Refused => return Ok(refused_read(rid, conversation_id)),
        }
    }
    Ok(frame_bytes(rid, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_are_shared_up_to_a_bound() {
        let ids = DeviceIds::default();
        let phone = ids.share("phone");
        assert!(Arc::ptr_eq(&phone, &ids.share("phone")));
        assert_eq!(&*ids.share("web"), "web");
        let long = "x".repeat(MAX_SHARED_DEVICE_ID_BYTES + 1);
        assert!(!Arc::ptr_eq(&ids.share(&long), &ids.share(&long)));
        for n in 0..MAX_SHARED_DEVICE_IDS {
            ids.share(&format!("d{n}"));
        }
        let past_bound = format!("d{MAX_SHARED_DEVICE_IDS}");
        assert!(!Arc::ptr_eq(
            &ids.share(&past_bound),
            &ids.share(&past_bound)
        ));
        assert!(Arc::ptr_eq(&phone, &ids.share("phone")));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn known_users_stay_bounded_and_forgotten_ones_are_found_in_the_store() {
        let (_dir, store) = crate::testing::temporary_store().await;
        let known = KnownUsers::with_capacity(Arc::new(store.clone()), 8);
        let users: Vec<Arc<str>> = (0..20).map(|n| format!("user{n}").into()).collect();
        for user in &users {
            known.register(user).await.unwrap();
            assert!(known.cache.read().len() <= 8);
            assert!(known.cached(user));
        }
        let forgotten: Vec<_> = users.iter().filter(|u| !known.cached(u)).collect();
        assert!(!forgotten.is_empty());
        for user in &forgotten {
            assert!(known.exists(user).await.unwrap(), "{user} was registered");
        }
        assert!(!known.exists("nobody").await.unwrap());
        assert!(known.cache.read().len() <= 8);
        store.close().await;
    }
}
