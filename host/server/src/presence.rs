//! Presence bookkeeping: who watches whose online state, and when each user last changed.
//!
//! The book holds no lock of its own: it lives inside the router's lock, so a user's
//! transitions (first device in, last device out) and the subscriptions that observe them
//! are serialized, and every watcher sees a user's changes in the order they happened.

use std::collections::HashMap;
use std::sync::Arc;

use im_proto::v1::{self, frame::Body};

use crate::router::{ConnHandle, Outbound};

/// Watchers and change times of the users of one node.
#[derive(Default)]
pub struct PresenceBook {
    /// Watched user -> the connections watching it, by connection id.
    watchers: HashMap<Arc<str>, HashMap<u64, ConnHandle>>,
    /// When each online or watched user last came online or went offline.
    changed_ms: HashMap<Arc<str>, i64>,
}

impl PresenceBook {
    /// Starts `watcher` watching `user`.
    pub fn watch(&mut self, user: Arc<str>, watcher: &ConnHandle) {
        self.watchers
            .entry(user)
            .or_default()
            .insert(watcher.conn_id, watcher.clone());
    }

    /// Stops `conn_id` watching `user`.
    pub fn unwatch(&mut self, user: &str, conn_id: u64) {
        if let Some(watching) = self.watchers.get_mut(user) {
            watching.remove(&conn_id);
            if watching.is_empty() {
                self.watchers.remove(user);
            }
        }
    }

    /// The state of `user` with `devices` connected.
    pub fn state(&self, user: &str, devices: usize) -> v1::PresenceState {
        v1::PresenceState {
            user_id: user.to_owned(),
            online: devices > 0,
            devices: devices as u32,
            changed_ms: self.changed_ms.get(user).copied().unwrap_or(0),
        }
    }

    /// Records that `user` came online (`devices` > 0) or went offline, and pushes the new
    /// state to its watchers.
    pub fn changed(&mut self, user: &Arc<str>, devices: usize, now_ms: i64) {
        let Some(watching) = self.watchers.get(&**user) else {
            // Kept for online users only while nobody watches, so the book does not grow
            // with every user ever seen.
            if devices > 0 {
                self.changed_ms.insert(user.clone(), now_ms);
            } else {
                self.changed_ms.remove(&**user);
            }
            return;
        };
        self.changed_ms.insert(user.clone(), now_ms);
        let frame = v1::Frame::new(
            0,
            Body::Presence(v1::PresenceEvent {
                state: Some(self.state(user, devices)),
            }),
        )
        .to_bytes();
        for watcher in watching.values() {
            watcher.offer(Outbound::Frame(frame.clone()));
        }
    }

    /// Users watched by at least one connection.
    pub fn watched_users(&self) -> usize {
        self.watchers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::ConnControl;

    fn watcher(conn_id: u64) -> (ConnHandle, crate::router::OutboundReceiver) {
        let (control, rx) = crate::router::outbound_queue(ConnControl::new(0, 8));
        let handle = ConnHandle {
            conn_id,
            user_id: "w".into(),
            device_id: "d".into(),
            transport: crate::transport::Transport::Tcp,
            control,
        };
        (handle, rx)
    }

    fn pushed(rx: &mut crate::router::OutboundReceiver) -> Option<v1::PresenceState> {
        match rx.try_recv()? {
            Outbound::Frame(bytes) => match v1::Frame::from_bytes(&bytes).unwrap().body {
                Some(Body::Presence(event)) => event.state,
                other => panic!("not a presence push: {other:?}"),
            },
            other => panic!("not a frame: {other:?}"),
        }
    }

    #[test]
    fn watchers_get_changes_until_they_unwatch() {
        let mut book = PresenceBook::default();
        let (w1, mut rx1) = watcher(1);
        let (w2, mut rx2) = watcher(2);
        let alice: Arc<str> = "alice".into();
        book.watch(alice.clone(), &w1);
        book.watch(alice.clone(), &w2);
        book.changed(&alice, 1, 100);
        let state = pushed(&mut rx1).unwrap();
        assert!(state.online);
        assert_eq!((state.devices, state.changed_ms), (1, 100));
        assert!(pushed(&mut rx2).unwrap().online);
        book.unwatch("alice", 1);
        book.changed(&alice, 0, 200);
        assert!(pushed(&mut rx1).is_none());
        let state = pushed(&mut rx2).unwrap();
        assert!(!state.online);
        assert_eq!(state.changed_ms, 200);
        book.unwatch("alice", 2);
        assert_eq!(book.watched_users(), 0);
        assert_eq!(book.state("alice", 0).changed_ms, 200);
        assert_eq!(book.state("bob", 0).changed_ms, 0);
    }
}
