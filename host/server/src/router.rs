//! In-process routing: which devices of which user are connected here, and handing frames to them.
//!
//! Architecture invariant: the router never blocks and never awaits. Frames go into each
//! connection's bounded queue with `try_send`; a full queue marks the connection a slow
//! consumer and closes it, so one stalled client cannot hold up anyone else.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use im_proto::v1::CloseReason;
use parking_lot::RwLock;
use tokio::sync::{Notify, mpsc};

/// A message push shared by every device it goes to: encoded once.
#[derive(Debug)]
pub struct DeliverPush {
    pub conversation_id: Arc<str>,
    pub seq: u64,
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
}

/// Asks a connection to close, from outside its task; the first reason wins.
#[derive(Debug, Default)]
pub struct CloseSignal {
    reason: OnceLock<(CloseReason, String)>,
    notify: Notify,
}

impl CloseSignal {
    /// Requests the close. Later calls are ignored.
    pub fn close(&self, reason: CloseReason, message: impl Into<String>) {
        if self.reason.set((reason, message.into())).is_ok() {
            // notify_one stores a permit, so a task that waits later still wakes.
            self.notify.notify_one();
        }
    }

    /// Waits until a close is requested and returns its reason.
    pub async fn requested(&self) -> (CloseReason, String) {
        loop {
            if let Some(reason) = self.reason.get() {
                return reason.clone();
            }
            self.notify.notified().await;
        }
    }
}

/// The router's reference to one logged-in connection.
#[derive(Debug, Clone)]
pub struct ConnHandle {
    pub conn_id: u64,
    pub user_id: Arc<str>,
    pub device_id: Arc<str>,
    pub queue: mpsc::Sender<Outbound>,
    pub close: Arc<CloseSignal>,
}

impl ConnHandle {
    /// Queues `item`; a full queue closes the connection as a slow consumer.
    /// Returns false when the item was not queued.
    pub fn offer(&self, item: Outbound) -> bool {
        match self.queue.try_send(item) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.close
                    .close(CloseReason::SlowConsumer, "outbound queue overflowed");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// Online devices on this node.
#[derive(Default)]
pub struct LocalRouter {
    users: RwLock<HashMap<Arc<str>, Vec<ConnHandle>>>,
}

impl LocalRouter {
    /// Registers a logged-in connection; returns the connection it replaces (same user and
    /// device), which the caller must close.
    pub fn register(&self, handle: ConnHandle) -> Option<ConnHandle> {
        let mut users = self.users.write();
        let devices = users.entry(handle.user_id.clone()).or_default();
        let replaced = devices
            .iter()
            .position(|d| d.device_id == handle.device_id)
            .map(|i| devices.swap_remove(i));
        devices.push(handle);
        replaced
    }

    /// Removes a connection if it is still the registered one for its device.
    pub fn unregister(&self, user_id: &str, conn_id: u64) {
        let mut users = self.users.write();
        if let Some(devices) = users.get_mut(user_id) {
            devices.retain(|d| d.conn_id != conn_id);
            if devices.is_empty() {
                users.remove(user_id);
            }
        }
    }

    /// Calls `f` for every online device of `user_id`.
    pub fn for_each_device(&self, user_id: &str, mut f: impl FnMut(&ConnHandle)) {
        if let Some(devices) = self.users.read().get(user_id) {
            devices.iter().for_each(&mut f);
        }
    }

    /// Number of online devices of `user_id`.
    pub fn device_count(&self, user_id: &str) -> usize {
        self.users.read().get(user_id).map_or(0, Vec::len)
    }

    /// Closes every connection with `reason` (shutdown).
    pub fn close_all(&self, reason: CloseReason, message: &str) {
        for devices in self.users.read().values() {
            for d in devices {
                d.close.close(reason, message);
            }
        }
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
    ) -> (ConnHandle, mpsc::Receiver<Outbound>) {
        let (queue, rx) = mpsc::channel(cap);
        let h = ConnHandle {
            conn_id,
            user_id: user.into(),
            device_id: device.into(),
            queue,
            close: Arc::default(),
        };
        (h, rx)
    }

    #[test]
    fn same_device_replaces_and_other_devices_coexist() {
        let router = LocalRouter::default();
        let (phone1, _r1) = handle(1, "alice", "phone", 4);
        let (laptop, _r2) = handle(2, "alice", "laptop", 4);
        let (phone2, _r3) = handle(3, "alice", "phone", 4);
        assert!(router.register(phone1).is_none());
        assert!(router.register(laptop).is_none());
        assert_eq!(router.register(phone2).unwrap().conn_id, 1);
        assert_eq!(router.device_count("alice"), 2);
        // The replaced connection unregistering later must not remove its successor.
        router.unregister("alice", 1);
        assert_eq!(router.device_count("alice"), 2);
        router.unregister("alice", 3);
        router.unregister("alice", 2);
        assert_eq!(router.device_count("alice"), 0);
    }

    #[tokio::test]
    async fn a_full_queue_closes_the_connection_as_slow_consumer() {
        let (h, _rx) = handle(1, "bob", "phone", 1);
        assert!(h.offer(Outbound::Frame(Bytes::from_static(b"1"))));
        assert!(!h.offer(Outbound::Frame(Bytes::from_static(b"2"))));
        assert_eq!(h.close.requested().await.0, CloseReason::SlowConsumer);
    }
}
