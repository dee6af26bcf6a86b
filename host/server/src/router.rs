//! In-process routing: which devices of which user are connected here, handing frames to them, and presence.
//!
//! Architecture invariant: the router never blocks and never awaits. Frames go into each
//! connection's bounded queue without waiting; a full queue marks the connection a slow
//! consumer and closes it, so one stalled client cannot hold up anyone else.

use foldhash::HashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use im_proto::v1;
use im_proto::v1::CloseReason;
use parking_lot::{Mutex, RwLock};

use crate::presence::PresenceBook;
use crate::transport::Transport;
use crate::transport::direct::{DirectSocket, DirectWrite, WriteState};

/// A message push shared by every device it goes to: encoded once.
#[derive(Debug)]
pub struct DeliverPush {
    pub conversation_id: Arc<str>,
    pub seq: u64,
    /// When the message's commit returned (delivery latency is measured from here).
    pub committed_at: std::time::Instant,
    /// The encoded `Frame{deliver}` (without a length prefix).
    pub frame: Bytes,
}

/// What a connection's writer receives.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// An encoded frame (a response, an ack, an error).
    Frame(Bytes),
    /// A message push, tracked until the device acknowledges it.
    Deliver(Arc<DeliverPush>),
    /// A direct write left part of a frame in the connection's [`DirectSocket`]: the task
    /// writes it before anything else.
    FinishDirectWrite,
}

/// What the router and other tasks share with one connection's task: its bounded outbound
/// queue, close requests from outside the task (the first reason wins) and when its client
/// was last heard from (for the node's idle sweep, which replaces a timer in every
/// connection's task).
///
/// The queue lives here, not in a channel of its own: a channel (flume) took three
/// allocations per idle connection (its shared state, the waiting receiver's hook and the
/// waiters' list, 320 bytes by a heap profile) beside this one. One waker serves the queue
/// and close requests: the task waits on both at once.
#[derive(Debug)]
pub struct ConnControl {
    /// Boxed: a pointer's room in every connection until the rare close request.
    reason: OnceLock<Box<(CloseReason, String)>>,
    /// The connection task, woken by a close request or a queued item.
    waker: AtomicWaker,
    /// `monotonic_ms()` when the last complete frame arrived (or the login).
    last_heard_ms: AtomicU64,
    queue: Mutex<OutboundQueue>,
    /// Plain TCP: the socket, which [`ConnHandle::offer_now`] writes to directly.
    direct: Option<DirectSocket>,
}

#[derive(Debug)]
struct OutboundQueue {
    items: VecDeque<Outbound>,
    capacity: u32,
    /// The task is gone (its session or [`OutboundReceiver`] dropped): nothing more is
    /// taken.
    closed: bool,
}

/// A queue emptied after a burst keeps at most this many slots' room.
const KEPT_QUEUE_SLOTS: usize = 16;

impl ConnControl {
    /// A connection heard from at `now_ms` (on the `monotonic_ms()` clock) whose queue
    /// holds at most `queue_capacity` items.
    pub fn new(now_ms: u64, queue_capacity: usize) -> Self {
        Self {
            reason: OnceLock::new(),
            waker: AtomicWaker::new(),
            last_heard_ms: AtomicU64::new(now_ms),
            queue: Mutex::new(OutboundQueue {
                items: VecDeque::new(),
                capacity: u32::try_from(queue_capacity).unwrap_or(u32::MAX),
                closed: false,
            }),
            direct: None,
        }
    }

    /// Lets [`ConnHandle::offer_now`] write to `socket` directly.
    pub fn with_direct_socket(self, socket: DirectSocket) -> Self {
        Self {
            direct: Some(socket),
            ..self
        }
    }

    /// The socket direct writes go to, if the transport has one.
    pub fn direct_socket(&self) -> Option<&DirectSocket> {
        self.direct.as_ref()
    }

    /// Requests the close. Later calls are ignored.
    pub fn close(&self, reason: CloseReason, message: impl Into<String>) {
        if self.reason.set(Box::new((reason, message.into()))).is_ok() {
            self.waker.wake();
        }
    }

    /// The close requested, if any.
    pub fn close_requested(&self) -> Option<&(CloseReason, String)> {
        self.reason.get().map(|reason| &**reason)
    }

    /// Waits until a close is requested and returns its reason. (A hand-written future of
    /// one reference: it sits in every idle connection's task, where a `Notified` took ten
    /// times the room.)
    pub fn requested(&self) -> impl Future<Output = (CloseReason, String)> + '_ {
        std::future::poll_fn(move |cx| {
            if let Some(reason) = self.close_requested() {
                return Poll::Ready(reason.clone());
            }
            self.waker.register(cx.waker());
            // Checked again: a close between the first check and the registration woke no one.
            match self.close_requested() {
                Some(reason) => Poll::Ready(reason.clone()),
                None => Poll::Pending,
            }
        })
    }

    /// Records that a frame arrived at `now_ms` (on the `monotonic_ms()` clock).
    pub fn heard(&self, now_ms: u64) {
        self.last_heard_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Wakes the connection's task (or resumes it when parked: its waker is then this).
    pub fn wake(&self) {
        self.waker.wake();
    }

    /// Makes `waker` the one woken by close requests and queued items (a parking
    /// connection's own `ConnControl`, see `crate::park`).
    pub fn register_waker(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }

    /// When the client was last heard from, on the `monotonic_ms()` clock.
    pub fn last_heard_ms(&self) -> u64 {
        self.last_heard_ms.load(Ordering::Relaxed)
    }

    /// Appends `item` unless the queue is full or its task gone.
    fn push(&self, item: Outbound) -> Result<(), QueueRefused> {
        {
            let mut queue = self.queue.lock();
            if queue.closed {
                return Err(QueueRefused::Gone);
            }
            if queue.items.len() >= queue.capacity as usize {
                return Err(QueueRefused::Full);
            }
            queue.items.push_back(item);
        }
        self.waker.wake();
        Ok(())
    }

    /// Moves up to `max` queued items to `take`, oldest first, under one lock; returns how
    /// many.
    pub fn take_queued(&self, max: usize, mut take: impl FnMut(Outbound)) -> usize {
        let mut queue = self.queue.lock();
        let n = queue.items.len().min(max);
        queue.items.drain(..n).for_each(&mut take);
        if queue.items.is_empty() && queue.items.capacity() > KEPT_QUEUE_SLOTS {
            queue.items = VecDeque::new();
        }
        n
    }

    /// Whether nothing is queued.
    pub fn queue_is_empty(&self) -> bool {
        self.queue.lock().items.is_empty()
    }

    /// [`Self::take_queued`], ready with how many it took when it took any; otherwise
    /// registers the task to be woken when something is queued (or a close is requested).
    pub fn poll_take_queued(
        &self,
        cx: &mut Context<'_>,
        max: usize,
        mut take: impl FnMut(Outbound),
    ) -> Poll<usize> {
        let taken = self.take_queued(max, &mut take);
        if taken > 0 {
            return Poll::Ready(taken);
        }
        self.waker.register(cx.waker());
        // Taken again: an item queued between the first look and the registration woke no one.
        match self.take_queued(max, take) {
            0 => Poll::Pending,
            taken => Poll::Ready(taken),
        }
    }

    /// The connection's task is gone: later offers are refused and what is queued is freed.
    pub fn close_queue(&self) {
        let items = {
            let mut queue = self.queue.lock();
            queue.closed = true;
            std::mem::take(&mut queue.items)
        };
        // Freed outside the lock.
        drop(items);
    }
}

/// A parked connection's waker is its `ConnControl` (no allocation): queued frames, a close
/// request or a partial direct write wake it as they would its task, and this resumes it
/// (`crate::park`): it takes the parker's slot lock, registers the socket with the runtime
/// again and spawns the task, never the router's, a room's or the socket's lock, which its
/// wakers may hold.
impl std::task::Wake for ConnControl {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let Some(socket) = &self.direct else {
            return;
        };
        if let Some(key) = socket.take_parked()
            && let Some(parker) = socket.parker()
        {
            parker.resume(key, Some(self));
        }
    }
}

enum QueueRefused {
    Full,
    Gone,
}

/// Milliseconds on a monotonic clock that starts with the process: the time base of
/// [`ConnControl`]'s activity stamps.
pub fn monotonic_ms() -> u64 {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// A receiving side of a connection's outbound queue, for tests (a session takes from its
/// [`ConnControl`] directly). Dropping it closes the queue: later offers are refused and
/// what is queued is freed.
#[derive(Debug)]
pub struct OutboundReceiver {
    control: Arc<ConnControl>,
}

impl OutboundReceiver {
    /// Takes the oldest item, if any.
    pub fn try_recv(&self) -> Option<Outbound> {
        let mut item = None;
        self.control.take_queued(1, |taken| item = Some(taken));
        item
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.control.queue_is_empty()
    }

    /// Waits for the next item.
    pub async fn recv(&self) -> Outbound {
        let mut item = None;
        std::future::poll_fn(|cx| {
            self.control
                .poll_take_queued(cx, 1, |taken| item = Some(taken))
        })
        .await;
        item.expect("one item taken")
    }
}

impl Drop for OutboundReceiver {
    fn drop(&mut self) {
        self.control.close_queue();
    }
}

/// A connection's control with its bounded outbound queue, and the task's side of the queue.
pub fn outbound_queue(control: ConnControl) -> (Arc<ConnControl>, OutboundReceiver) {
    let control = Arc::new(control);
    (control.clone(), OutboundReceiver { control })
}

/// The router's reference to one logged-in connection.
#[derive(Debug, Clone)]
pub struct ConnHandle {
    pub conn_id: u64,
    pub user_id: Arc<str>,
    pub device_id: Arc<str>,
    /// The transport, for listings and metrics.
    pub transport: Transport,
    /// Its close requests, activity stamp and outbound queue.
    pub control: Arc<ConnControl>,
}

impl ConnHandle {
    /// Queues `item`; a full queue closes the connection as a slow consumer.
    /// Returns false when the item was not queued.
    pub fn offer(&self, item: Outbound) -> bool {
        match &self.control.direct {
            None => self.enqueue(item),
            Some(socket) => self.enqueue_marked(&mut socket.lock(), item),
        }
    }

    /// Delivers `frame` like [`Self::offer`], but writes it from the calling thread when the
    /// connection allows it (plain TCP, nothing queued or being written ahead of it), so the
    /// connection's task is not woken. For answers, which are not tracked like pushes.
    pub fn offer_now(&self, frame: Bytes) -> bool {
        let Some(socket) = &self.control.direct else {
            return self.enqueue(Outbound::Frame(frame));
        };
        let mut state = socket.lock();
        let item = match socket.write_now(&mut state, &frame) {
            DirectWrite::Written => return true,
            // The task finishes the frame; this wakes it.
            DirectWrite::Partial => Outbound::FinishDirectWrite,
            DirectWrite::NotWritten => Outbound::Frame(frame),
        };
        self.enqueue_marked(&mut state, item)
    }

    /// Queues `item` under the socket's lock (`state`), marking the socket busy, so no
    /// direct write overtakes it.
    fn enqueue_marked(&self, state: &mut WriteState, item: Outbound) -> bool {
        let queued = self.enqueue(item);
        if queued {
            state.mark_queued();
        }
        queued
    }

    fn enqueue(&self, item: Outbound) -> bool {
        match self.control.push(item) {
            Ok(()) => true,
            Err(QueueRefused::Full) => {
                self.control
                    .close(CloseReason::SlowConsumer, "outbound queue overflowed");
                false
            }
            Err(QueueRefused::Gone) => false,
        }
    }
}

/// Online devices on this node, and who watches their presence.
#[derive(Default)]
pub struct LocalRouter {
    state: RwLock<RouterState>,
}

#[derive(Default)]
struct RouterState {
    users: HashMap<Arc<str>, Vec<ConnHandle>>,
    presence: PresenceBook,
    connections: usize,
    /// Set by `close_all`: every connection registered after it is closed the same way.
    closing: Option<(CloseReason, String)>,
}

/// One online user, as listed for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnlineUser {
    pub user_id: String,
    /// (device id, transport) of each connected device.
    pub devices: Vec<(String, &'static str)>,
}

impl LocalRouter {
    /// Registers a logged-in connection; returns the connection it replaces (same user and
    /// device), which the caller must close. A user's first device announces it online.
    pub fn register(&self, handle: ConnHandle, now_ms: i64) -> Option<ConnHandle> {
        let mut state = self.state.write();
        let state = &mut *state;
        let devices = state.users.entry(handle.user_id.clone()).or_default();
        let replaced = devices
            .iter()
            .position(|d| d.device_id == handle.device_id)
            .map(|i| devices.swap_remove(i));
        let came_online = devices.is_empty() && replaced.is_none();
        let user = handle.user_id.clone();
        // Most users have one device: an exact reservation keeps the list at one handle
        // (72 bytes), where a plain push would allocate room for four.
        devices.reserve_exact(1);
        devices.push(handle);
        let count = devices.len();
        if replaced.is_none() {
            state.connections += 1;
        }
        if let Some((reason, message)) = &state.closing {
            devices[count - 1].control.close(*reason, message.clone());
        }
        if came_online {
            state.presence.changed(&user, count, now_ms);
        }
        replaced
    }

    /// Removes a connection if it is still the registered one for its device. A user's
    /// last device leaving announces it offline.
    pub fn unregister(&self, user_id: &str, conn_id: u64, now_ms: i64) {
        let mut state = self.state.write();
        let state = &mut *state;
        let Some(devices) = state.users.get_mut(user_id) else {
            return;
        };
        let Some(index) = devices.iter().position(|d| d.conn_id == conn_id) else {
            return;
        };
        let gone = devices.swap_remove(index);
        state.connections -= 1;
        if devices.is_empty() {
            state.users.remove(user_id);
            state.presence.changed(&gone.user_id, 0, now_ms);
        }
    }

    /// Calls `f` for every online device of `user_id`.
    pub fn for_each_device(&self, user_id: &str, mut f: impl FnMut(&ConnHandle)) {
        if let Some(devices) = self.state.read().users.get(user_id) {
            devices.iter().for_each(&mut f);
        }
    }

    /// Calls `f` for every online device of each of `users`, under one acquisition of the
    /// router's lock (a group's fan-out takes the lock once, not once per member).
    pub fn for_each_device_of<'a>(
        &self,
        users: impl IntoIterator<Item = &'a str>,
        mut f: impl FnMut(&ConnHandle),
    ) {
        let state = self.state.read();
        for user in users {
            if let Some(devices) = state.users.get(user) {
                devices.iter().for_each(&mut f);
            }
        }
    }

    /// Calls `f` for every logged-in connection of this node.
    pub fn for_each_connection(&self, mut f: impl FnMut(&ConnHandle)) {
        for devices in self.state.read().users.values() {
            devices.iter().for_each(&mut f);
        }
    }

    /// Number of online devices of `user_id`.
    pub fn device_count(&self, user_id: &str) -> usize {
        self.state.read().users.get(user_id).map_or(0, Vec::len)
    }

    /// Online users and logged-in connections.
    pub fn counts(&self) -> (usize, usize) {
        let state = self.state.read();
        (state.users.len(), state.connections)
    }

    /// The presence of `user_id` now.
    pub fn presence(&self, user_id: &str) -> v1::PresenceState {
        let state = self.state.read();
        let devices = state.users.get(user_id).map_or(0, Vec::len);
        state.presence.state(user_id, devices)
    }

    /// Starts `watcher` watching the users in `add` and stops it watching those in
    /// `remove`; returns the current state of each user in `add`. Done under the router's
    /// lock, so no change between the answer and the first push is lost.
    pub fn watch_presence(
        &self,
        watcher: &ConnHandle,
        add: &[Arc<str>],
        remove: &[String],
    ) -> Vec<v1::PresenceState> {
        let mut state = self.state.write();
        let state = &mut *state;
        for user in remove {
            state.presence.unwatch(user, watcher.conn_id);
        }
        add.iter()
            .map(|user| {
                state.presence.watch(user.clone(), watcher);
                let devices = state.users.get(user).map_or(0, Vec::len);
                state.presence.state(user, devices)
            })
            .collect()
    }

    /// Stops `conn_id` watching any of `users` (a closing connection).
    pub fn unwatch_all<'a>(&self, conn_id: u64, users: impl IntoIterator<Item = &'a Arc<str>>) {
        let mut state = self.state.write();
        for user in users {
            state.presence.unwatch(user, conn_id);
        }
    }

    /// Up to `limit` online users whose ids sort after `after`, in id order.
    pub fn online_users(&self, after: Option<&str>, limit: usize) -> Vec<OnlineUser> {
        let state = self.state.read();
        let mut ids: Vec<&Arc<str>> = state
            .users
            .keys()
            .filter(|u| after.is_none_or(|after| &***u > after))
            .collect();
        let limit = limit.min(ids.len());
        if limit < ids.len() {
            ids.select_nth_unstable(limit);
            ids.truncate(limit);
        }
        ids.sort_unstable();
        ids.into_iter()
            .map(|user| OnlineUser {
                user_id: user.to_string(),
                devices: state.users[user]
                    .iter()
                    .map(|d| (d.device_id.to_string(), d.transport.as_str()))
                    .collect(),
            })
            .collect()
    }

    /// Closes every connection of `user_id` with `reason`; returns how many.
    pub fn close_user(&self, user_id: &str, reason: CloseReason, message: &str) -> usize {
        let mut closed = 0;
        self.for_each_device(user_id, |d| {
            d.control.close(reason, message);
            closed += 1;
        });
        closed
    }

    /// Closes every connection with `reason`, and every one registered from now on
    /// (shutdown: a login finishing meanwhile cannot slip through).
    pub fn close_all(&self, reason: CloseReason, message: &str) {
        let mut state = self.state.write();
        state.closing = Some((reason, message.to_owned()));
        for devices in state.users.values() {
            devices
                .iter()
                .for_each(|d| d.control.close(reason, message));
        }
    }

    /// One pass of the idle sweep at `now_ms` (on the `monotonic_ms()` clock): closes, with
    /// `IDLE_TIMEOUT`, every connection not heard from for `idle_ms` or more, and asks every
    /// other plain-TCP one quiet for `park_ms` or more (if given) to park (`crate::park`)
    /// once it has nothing to do; parked ones and ones already asked are left alone. Returns
    /// how many were closed.
    pub fn sweep_idle(
        &self,
        now_ms: u64,
        idle_ms: u64,
        park_ms: Option<u64>,
        message: &str,
    ) -> usize {
        let mut closed = 0;
        self.for_each_connection(|d| {
            let quiet_ms = now_ms.saturating_sub(d.control.last_heard_ms());
            if quiet_ms >= idle_ms {
                d.control.close(CloseReason::IdleTimeout, message);
                closed += 1;
            } else if park_ms.is_some_and(|park_ms| quiet_ms >= park_ms)
                && let Some(socket) = d.control.direct_socket()
                && socket.request_park()
            {
                d.control.wake();
            }
        });
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(
        conn_id: u64,
        user: &str,
        device: &str,
        cap: usize,
    ) -> (ConnHandle, OutboundReceiver) {
        handle_with(conn_id, user, device, ConnControl::new(0, cap))
    }

    fn handle_with(
        conn_id: u64,
        user: &str,
        device: &str,
        control: ConnControl,
    ) -> (ConnHandle, OutboundReceiver) {
        let (control, rx) = outbound_queue(control);
        let h = ConnHandle {
            conn_id,
            user_id: user.into(),
            device_id: device.into(),
            transport: Transport::Tcp,
            control,
        };
        (h, rx)
    }

    #[test]
    fn same_device_replaces_and_other_devices_coexist() {
        let router = LocalRouter::default();
        let (phone1, _r1) = handle(1, "alice", "phone", 4);
        let (laptop, _r2) = handle(2, "alice", "laptop", 4);
        let (phone2, _r3) = handle(3, "alice", "phone", 4);
        assert!(router.register(phone1, 1).is_none());
        assert!(router.register(laptop, 1).is_none());
        assert_eq!(router.register(phone2, 1).unwrap().conn_id, 1);
        assert_eq!(router.device_count("alice"), 2);
        assert_eq!(router.counts(), (1, 2));
        // The replaced connection unregistering later must not remove its successor.
        router.unregister("alice", 1, 2);
        assert_eq!(router.device_count("alice"), 2);
        router.unregister("alice", 3, 2);
        router.unregister("alice", 2, 2);
        assert_eq!(router.device_count("alice"), 0);
        assert_eq!(router.counts(), (0, 0));
    }

    #[tokio::test]
    async fn an_answer_written_at_once_never_overtakes_what_is_queued() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let socket = DirectSocket::new(
            listener.accept().await.unwrap().0.into_std().unwrap(),
            std::sync::Weak::new(),
        )
        .unwrap();
        let (h, rx) = handle_with(
            1,
            "carol",
            "phone",
            ConnControl::new(0, 8).with_direct_socket(socket),
        );
        let socket = h.control.direct_socket().unwrap();
        // The task's loop has not run yet: the answer is queued.
        assert!(h.offer_now(Bytes::from_static(b"a")));
        assert!(matches!(rx.try_recv(), Some(Outbound::Frame(f)) if f == "a"));
        socket.end_write(|| rx.is_empty());
        // Idle: written at once, nothing queued.
        assert!(h.offer_now(Bytes::from_static(b"b")));
        assert!(rx.is_empty());
        // A push queued first: the answer queues behind it.
        assert!(h.offer(Outbound::Frame(Bytes::from_static(b"c"))));
        assert!(h.offer_now(Bytes::from_static(b"d")));
        let queued: Vec<_> = std::iter::from_fn(|| rx.try_recv())
            .map(|o| match o {
                Outbound::Frame(f) => f,
                other => panic!("queued {other:?}"),
            })
            .collect();
        assert_eq!(queued, ["c", "d"]);
        // The task has written them and found the queue empty: direct again.
        socket.end_write(|| rx.is_empty());
        assert!(h.offer_now(Bytes::from_static(b"e")));
        assert!(rx.is_empty());
        let mut wire = [0u8; 10];
        client.read_exact(&mut wire).await.unwrap();
        assert_eq!(wire, *b"\0\0\0\x01b\0\0\0\x01e");
    }

    #[test]
    fn offers_to_a_connection_whose_task_is_gone_are_refused_and_not_kept() {
        let (h, rx) = handle(1, "bob", "phone", 4);
        assert!(h.offer(Outbound::Frame(Bytes::from_static(b"1"))));
        drop(rx);
        assert!(!h.offer(Outbound::Frame(Bytes::from_static(b"2"))));
        assert!(h.control.queue_is_empty(), "what was queued is freed");
        assert!(
            h.control.close_requested().is_none(),
            "a gone task is not a slow consumer"
        );
    }

    #[tokio::test]
    async fn a_full_queue_closes_the_connection_as_slow_consumer() {
        let (h, _rx) = handle(1, "bob", "phone", 1);
        assert!(h.offer(Outbound::Frame(Bytes::from_static(b"1"))));
        assert!(!h.offer(Outbound::Frame(Bytes::from_static(b"2"))));
        assert_eq!(h.control.requested().await.0, CloseReason::SlowConsumer);
    }

    #[test]
    fn close_all_also_closes_connections_registered_after_it() {
        use futures_util::FutureExt;
        let router = LocalRouter::default();
        let (before, _r1) = handle(1, "alice", "phone", 4);
        router.register(before.clone(), 1);
        router.close_all(CloseReason::ServerShutdown, "bye");
        let (after, _r2) = handle(2, "bob", "phone", 4);
        router.register(after.clone(), 2);
        for conn in [before, after] {
            assert_eq!(
                conn.control.requested().now_or_never(),
                Some((CloseReason::ServerShutdown, "bye".to_owned()))
            );
        }
    }

    #[tokio::test]
    async fn close_idle_closes_only_connections_not_heard_from() {
        use futures_util::FutureExt;
        let router = LocalRouter::default();
        let (quiet, _r1) = handle(1, "alice", "phone", 4);
        let (chatty, _r2) = handle(2, "bob", "phone", 4);
        quiet.control.heard(1_000);
        chatty.control.heard(1_000);
        router.register(quiet.clone(), 1);
        router.register(chatty.clone(), 1);
        chatty.control.heard(5_000);
        assert_eq!(router.sweep_idle(5_999, 5_000, None, "idle"), 0);
        assert_eq!(router.sweep_idle(6_000, 5_000, None, "idle"), 1);
        assert_eq!(
            quiet.control.requested().await,
            (CloseReason::IdleTimeout, "idle".to_owned())
        );
        assert!(chatty.control.requested().now_or_never().is_none());
    }

    #[tokio::test]
    async fn a_close_wakes_the_waiting_task_and_the_first_reason_wins() {
        let control = Arc::new(ConnControl::new(0, 1));
        let waiter = tokio::spawn({
            let control = control.clone();
            async move { control.requested().await }
        });
        tokio::task::yield_now().await;
        control.close(CloseReason::Replaced, "first");
        control.close(CloseReason::SlowConsumer, "second");
        assert_eq!(
            waiter.await.unwrap(),
            (CloseReason::Replaced, "first".to_owned())
        );
    }

    #[test]
    fn presence_changes_only_on_first_and_last_device() {
        let router = LocalRouter::default();
        let (watcher, pushes) = handle(9, "carol", "phone", 16);
        router.register(watcher.clone(), 1);
        let states = router.watch_presence(&watcher, &["alice".into()], &[]);
        assert!(!states[0].online);
        let (phone, _r1) = handle(1, "alice", "phone", 4);
        let (laptop, _r2) = handle(2, "alice", "laptop", 4);
        router.register(phone, 10);
        router.register(laptop, 11);
        router.unregister("alice", 1, 12);
        router.unregister("alice", 2, 13);
        let mut seen = Vec::new();
        while let Some(Outbound::Frame(bytes)) = pushes.try_recv() {
            if let Some(v1::frame::Body::Presence(event)) =
                v1::Frame::from_bytes(&bytes).unwrap().body
            {
                let state = event.state.unwrap();
                seen.push((state.online, state.changed_ms));
            }
        }
        assert_eq!(seen, vec![(true, 10), (false, 13)]);
        assert_eq!(router.presence("alice").changed_ms, 13);
    }

    #[test]
    fn online_users_page_in_id_order() {
        let router = LocalRouter::default();
        let mut keep = Vec::new();
        for (i, user) in ["dave", "bob", "erin", "alice", "carol"].iter().enumerate() {
            let (h, rx) = handle(i as u64 + 1, user, "d", 4);
            keep.push(rx);
            router.register(h, 1);
        }
        let first: Vec<_> = router
            .online_users(None, 2)
            .into_iter()
            .map(|u| u.user_id)
            .collect();
        assert_eq!(first, ["alice", "bob"]);
        let rest: Vec<_> = router
            .online_users(Some("bob"), 10)
            .into_iter()
            .map(|u| u.user_id)
            .collect();
        assert_eq!(rest, ["carol", "dave", "erin"]);
    }
}
