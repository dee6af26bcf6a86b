//! Live rooms: which connections are in which room, and fan-out of room messages to them (never stored).
//!
//! A room exists while a connection is in it. Membership belongs to connections, not
//! users, so every device joins for itself and a closing connection leaves its rooms.
//! Publishing encodes the push once and offers it to every member's queue with the
//! router's never-block rule.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use crate::router::{ConnHandle, Outbound};

/// The live rooms of one node. The map's lock is held only to find, add or drop a room;
/// each room has its own lock, so a busy room never stalls the others.
#[derive(Default)]
pub struct Rooms {
    rooms: RwLock<HashMap<Arc<str>, Arc<Mutex<Room>>>>,
}

struct Room {
    members: HashMap<u64, ConnHandle>,
    /// Messages published so far; the next one gets `published + 1`.
    published: u64,
}

/// A room as listed for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomSummary {
    pub room_id: String,
    pub members: usize,
}

impl Rooms {
    /// Puts `member` in `room_id` (creating the room); returns the room's size after.
    pub fn join(&self, room_id: &str, member: &ConnHandle) -> usize {
        let mut rooms = self.rooms.write();
        let room = rooms.entry(room_id.into()).or_insert_with(|| {
            Arc::new(Mutex::new(Room {
                members: HashMap::new(),
                published: 0,
            }))
        });
        let mut room = room.lock();
        room.members.insert(member.conn_id, member.clone());
        room.members.len()
    }

    /// Takes `conn_id` out of `room_id`; returns the room's size after, or `None` when the
    /// connection was not in it. An empty room ends.
    pub fn leave(&self, room_id: &str, conn_id: u64) -> Option<usize> {
        let mut rooms = self.rooms.write();
        let left = {
            let mut room = rooms.get(room_id)?.lock();
            room.members.remove(&conn_id)?;
            room.members.len()
        };
        if left == 0 {
            rooms.remove(room_id);
        }
        Some(left)
    }

    /// Whether `conn_id` is in `room_id`.
    pub fn contains(&self, room_id: &str, conn_id: u64) -> bool {
        self.rooms
            .read()
            .get(room_id)
            .is_some_and(|r| r.lock().members.contains_key(&conn_id))
    }

    /// Connections in `room_id`.
    pub fn size(&self, room_id: &str) -> usize {
        self.rooms
            .read()
            .get(room_id)
            .map_or(0, |r| r.lock().members.len())
    }

    /// Hands the push built by `frame(room_seq)` to every member but `except`; returns the
    /// message's room seq and how many connections it was handed to, or `None` when the
    /// room does not exist. Room seqs restart when a room ends (its last member left).
    pub fn publish(
        &self,
        room_id: &str,
        except: Option<u64>,
        frame: impl FnOnce(u64) -> Bytes,
    ) -> Option<(u64, usize)> {
        let room = self.rooms.read().get(room_id)?.clone();
        // The room's lock orders its publications: members see room seqs increase.
        let mut room = room.lock();
        room.published += 1;
        let push = frame(room.published);
        let mut delivered = 0;
        for (conn_id, member) in &room.members {
            if Some(*conn_id) != except && member.offer(Outbound::Frame(push.clone())) {
                delivered += 1;
            }
        }
        Some((room.published, delivered))
    }

    /// Up to `limit` rooms whose ids sort after `after`, in id order, with their sizes.
    pub fn list(&self, after: Option<&str>, limit: usize) -> Vec<RoomSummary> {
        let rooms = self.rooms.read();
        let mut ids: Vec<(&Arc<str>, usize)> = rooms
            .iter()
            .filter(|(id, _)| after.is_none_or(|after| &***id > after))
            .map(|(id, room)| (id, room.lock().members.len()))
            .collect();
        ids.sort_unstable();
        ids.truncate(limit);
        ids.into_iter()
            .map(|(id, members)| RoomSummary {
                room_id: id.to_string(),
                members,
            })
            .collect()
    }

    /// Number of rooms.
    pub fn count(&self) -> usize {
        self.rooms.read().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::ConnControl;

    fn member(conn_id: u64) -> (ConnHandle, crate::router::OutboundReceiver) {
        let (control, rx) = crate::router::outbound_queue(ConnControl::new(0, 4));
        let handle = ConnHandle {
            conn_id,
            user_id: format!("u{conn_id}").into(),
            device_id: "d".into(),
            transport: crate::transport::Transport::Tcp,
            control,
        };
        (handle, rx)
    }

    #[test]
    fn publish_reaches_members_but_the_sender_with_increasing_seqs() {
        let rooms = Rooms::default();
        let (a, ra) = member(1);
        let (b, rb) = member(2);
        assert_eq!(rooms.join("live", &a), 1);
        assert_eq!(rooms.join("live", &b), 2);
        let seq_frame = |seq: u64| Bytes::from(seq.to_string());
        assert_eq!(rooms.publish("live", Some(1), seq_frame), Some((1, 1)));
        assert_eq!(rooms.publish("live", None, seq_frame), Some((2, 2)));
        assert!(ra.try_recv().is_some());
        assert!(ra.try_recv().is_none());
        let frames: Vec<_> = std::iter::from_fn(|| rb.try_recv())
            .map(|o| match o {
                Outbound::Frame(f) => f,
                other => panic!("a room push is a plain frame, not {other:?}"),
            })
            .collect();
        assert_eq!(frames, [Bytes::from("1"), Bytes::from("2")]);
        assert_eq!(rooms.publish("nowhere", None, seq_frame), None);
    }

    #[test]
    fn the_last_member_leaving_ends_the_room() {
        let rooms = Rooms::default();
        let (a, _ra) = member(1);
        rooms.join("r", &a);
        assert!(rooms.contains("r", 1));
        assert_eq!(rooms.leave("r", 2), None);
        assert_eq!(rooms.leave("r", 1), Some(0));
        assert_eq!(rooms.count(), 0);
        assert!(rooms.list(None, 10).is_empty());
    }
}
