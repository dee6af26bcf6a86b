//! Sans-IO per-conversation ordering: turns pushes, sync pages and own acks into an in-order, exactly-once stream.
//!
//! Each conversation keeps `last` (everything up to it was handed to the application) and
//! a buffer of messages that arrived ahead of a gap. A gap asks for a sync from `last`;
//! messages at or below `last` are duplicates and are dropped.

use std::collections::{BTreeMap, HashMap};

use im_proto::v1::Message;

#[derive(Default)]
struct Timeline {
    last: u64,
    /// Arrived ahead of `last + 1`: `Some` to hand out, `None` for this client's own sends
    /// (the application has them from `send`).
    ahead: BTreeMap<u64, Option<Message>>,
    sync_in_flight: bool,
    /// `last` is a [`Timelines::set_latest_floor`] that nothing has confirmed yet.
    latest_floor: bool,
}

/// What processing produced.
#[derive(Debug, Default, PartialEq)]
pub struct Progress {
    /// Messages to hand to the application, in order.
    pub ready: Vec<Message>,
    /// Ask the server for this conversation after this seq.
    pub sync_from: Option<(String, u64)>,
}

/// The ordering state of every conversation this client has seen.
#[derive(Default)]
pub struct Timelines {
    conversations: HashMap<String, Timeline>,
}

impl Timelines {
    /// Everything of `conversation_id` up to `seq` is already known to the application.
    pub fn set_floor(&mut self, conversation_id: &str, seq: u64) {
        let t = self
            .conversations
            .entry(conversation_id.to_owned())
            .or_default();
        t.last = t.last.max(seq);
        t.ahead = t.ahead.split_off(&(t.last + 1));
    }

    /// Only what comes after `seq` is wanted, where `seq` is the conversation's last seq as
    /// read some time after this client logged in: it may already count messages stored
    /// since the login, which are pushed to this client and are news, not history. So the
    /// first push of the conversation lowers the floor to just below itself, unless a sync
    /// page or an own send came first (then the floor stands: later pushes follow them).
    pub fn set_latest_floor(&mut self, conversation_id: &str, seq: u64) {
        self.set_floor(conversation_id, seq);
        if let Some(t) = self.conversations.get_mut(conversation_id) {
            t.latest_floor = true;
        }
    }

    /// The highest seq handed out for `conversation_id` (0 if none).
    pub fn last(&self, conversation_id: &str) -> u64 {
        self.conversations
            .get(conversation_id)
            .map_or(0, |t| t.last)
    }

    /// Every known conversation and its last seq.
    pub fn cursors(&self) -> impl Iterator<Item = (&str, u64)> {
        self.conversations.iter().map(|(c, t)| (c.as_str(), t.last))
    }

    /// A pushed (or otherwise received) message.
    pub fn on_message(&mut self, message: Message) -> Progress {
        let conversation_id = message.conversation_id.clone();
        let seq = message.seq;
        self.accept(&conversation_id, seq, Some(message))
    }

    /// This client's own send was stored at `seq`.
    pub fn on_own_send(&mut self, conversation_id: &str, seq: u64) -> Progress {
        self.confirm_floor(conversation_id);
        self.accept(conversation_id, seq, None)
    }

    /// A latest floor is final once anything but a push has moved past it.
    fn confirm_floor(&mut self, conversation_id: &str) {
        if let Some(t) = self.conversations.get_mut(conversation_id) {
            t.latest_floor = false;
        }
    }

    /// The server holds `conversation_id` up to `server_last`: sync if behind.
    pub fn on_server_last(&mut self, conversation_id: &str, server_last: u64) -> Progress {
        let t = self
            .conversations
            .entry(conversation_id.to_owned())
            .or_default();
        let mut progress = Progress::default();
        if server_last > t.last && !t.sync_in_flight {
            t.sync_in_flight = true;
            progress.sync_from = Some((conversation_id.to_owned(), t.last));
        }
        progress
    }

    /// A sync page answered a request this type asked for (or a reset after a reconnect).
    pub fn on_sync_page(
        &mut self,
        conversation_id: &str,
        messages: Vec<Message>,
        has_more: bool,
    ) -> Progress {
        let mut progress = Progress::default();
        let got_any = !messages.is_empty();
        self.confirm_floor(conversation_id);
        for m in messages {
            let p = self.accept(conversation_id, m.seq, Some(m));
            progress.ready.extend(p.ready);
        }
        let t = self
            .conversations
            .entry(conversation_id.to_owned())
            .or_default();
        t.sync_in_flight = false;
        // Continue while the server says there is more, or while a gap remains and the
        // last page made progress (a page without messages cannot fill the gap).
        let gap = t
            .ahead
            .first_key_value()
            .is_some_and(|(s, _)| *s > t.last + 1);
        if has_more || (gap && got_any) {
            t.sync_in_flight = true;
            progress.sync_from = Some((conversation_id.to_owned(), t.last));
        }
        progress
    }

    /// The server refused for good to fill `conversation_id`'s gap (this user is no longer
    /// part of it): what arrived ahead of the gap is handed out in order and the gap is
    /// skipped. Held, it would wait for a sync nobody will answer, and after the last push
    /// nothing would even ask again.
    pub fn gap_unfillable(&mut self, conversation_id: &str) -> Progress {
        let mut progress = Progress::default();
        let Some(t) = self.conversations.get_mut(conversation_id) else {
            return progress;
        };
        t.sync_in_flight = false;
        for (seq, message) in std::mem::take(&mut t.ahead) {
            t.last = t.last.max(seq);
            progress.ready.extend(message);
        }
        progress
    }

    /// A sync request failed or its connection was lost: allow a new one.
    pub fn sync_abandoned(&mut self, conversation_id: &str) {
        if let Some(t) = self.conversations.get_mut(conversation_id) {
            t.sync_in_flight = false;
        }
    }

    fn accept(&mut self, conversation_id: &str, seq: u64, message: Option<Message>) -> Progress {
        // Looked up before inserting: a known conversation (nearly every message) costs no
        // copy of its id.
        let t = match self.conversations.get_mut(conversation_id) {
            Some(t) => t,
            None => self
                .conversations
                .entry(conversation_id.to_owned())
                .or_default(),
        };
        // Only a push finds a latest floor unconfirmed: own sends and sync pages confirm
        // it before they get here.
        if std::mem::take(&mut t.latest_floor) {
            t.last = t.last.min(seq.saturating_sub(1));
        }
        let mut progress = Progress::default();
        if seq <= t.last {
            return progress;
        }
        // In order, the common case: handed out without passing through `ahead`, unless
        // `ahead` already holds this seq (a floor raised past a gap can leave `last + 1`
        // there, say as an own send's placeholder, which must win).
        if seq == t.last + 1
            && t.ahead
                .first_key_value()
                .is_none_or(|(&first, _)| first > seq)
        {
            t.last = seq;
            progress.ready.extend(message);
        } else {
            t.ahead.entry(seq).or_insert(message);
        }
        while let Some(entry) = t.ahead.first_entry() {
            if *entry.key() != t.last + 1 {
                break;
            }
            t.last += 1;
            if let Some(m) = entry.remove() {
                progress.ready.push(m);
            }
        }
        if !t.ahead.is_empty() && !t.sync_in_flight {
            t.sync_in_flight = true;
            progress.sync_from = Some((conversation_id.to_owned(), t.last));
        }
        progress
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64) -> Message {
        Message {
            conversation_id: "c".into(),
            seq,
            ..Default::default()
        }
    }

    fn seqs(p: &Progress) -> Vec<u64> {
        p.ready.iter().map(|m| m.seq).collect()
    }

    #[test]
    fn in_order_messages_flow_and_duplicates_drop() {
        let mut t = Timelines::default();
        assert_eq!(seqs(&t.on_message(msg(1))), vec![1]);
        assert_eq!(seqs(&t.on_message(msg(2))), vec![2]);
        assert!(t.on_message(msg(2)).ready.is_empty());
        assert!(t.on_message(msg(1)).ready.is_empty());
        assert_eq!(t.last("c"), 2);
    }

    #[test]
    fn a_gap_the_server_will_not_fill_is_skipped_and_what_came_after_it_handed_out() {
        let mut t = Timelines::default();
        assert_eq!(seqs(&t.on_message(msg(1))), vec![1]);
        let p = t.on_message(msg(4));
        assert_eq!(p.sync_from, Some(("c".into(), 1)));
        assert!(t.on_message(msg(5)).ready.is_empty());
        assert!(t.on_own_send("c", 6).ready.is_empty());
        assert_eq!(seqs(&t.gap_unfillable("c")), vec![4, 5]);
        assert_eq!(t.last("c"), 6);
        assert_eq!(seqs(&t.on_message(msg(7))), vec![7]);
        assert!(t.gap_unfillable("unknown").ready.is_empty());
    }

    #[test]
    fn a_gap_asks_for_sync_once_and_the_page_fills_it() {
        let mut t = Timelines::default();
        let p = t.on_message(msg(3));
        assert!(p.ready.is_empty());
        assert_eq!(p.sync_from, Some(("c".into(), 0)));
        // A second early message does not ask again while the sync is in flight.
        assert_eq!(t.on_message(msg(4)).sync_from, None);
        let p = t.on_sync_page("c", vec![msg(1), msg(2), msg(3)], false);
        assert_eq!(seqs(&p), vec![1, 2, 3, 4]);
        assert_eq!(p.sync_from, None);
    }

    #[test]
    fn paging_continues_while_the_server_has_more() {
        let mut t = Timelines::default();
        assert_eq!(t.on_server_last("c", 5).sync_from, Some(("c".into(), 0)));
        let p = t.on_sync_page("c", vec![msg(1), msg(2)], true);
        assert_eq!(seqs(&p), vec![1, 2]);
        assert_eq!(p.sync_from, Some(("c".into(), 2)));
        let p = t.on_sync_page("c", vec![msg(3), msg(4), msg(5)], false);
        assert_eq!(seqs(&p), vec![3, 4, 5]);
        assert_eq!(p.sync_from, None);
        assert_eq!(t.on_server_last("c", 5).sync_from, None);
    }

    #[test]
    fn own_sends_advance_without_being_handed_out() {
        let mut t = Timelines::default();
        assert_eq!(seqs(&t.on_message(msg(1))), vec![1]);
        assert!(t.on_own_send("c", 2).ready.is_empty());
        assert_eq!(seqs(&t.on_message(msg(3))), vec![3]);
        // An own send past a gap waits; the sync page must not hand the own message out.
        let p = t.on_own_send("c", 5);
        assert_eq!(p.sync_from, Some(("c".into(), 3)));
        let mut own = msg(5);
        own.body = bytes::Bytes::from_static(b"mine");
        let p = t.on_sync_page("c", vec![msg(4), own], false);
        assert_eq!(seqs(&p), vec![4]);
        assert_eq!(t.last("c"), 5);
    }

    #[test]
    fn an_in_order_message_releases_what_waited_behind_it() {
        let mut t = Timelines::default();
        assert_eq!(seqs(&t.on_message(msg(1))), vec![1]);
        assert!(t.on_message(msg(3)).ready.is_empty());
        assert!(t.on_message(msg(5)).ready.is_empty());
        assert_eq!(seqs(&t.on_message(msg(2))), vec![2, 3]);
        assert!(t.on_message(msg(3)).ready.is_empty());
        assert_eq!(seqs(&t.on_message(msg(4))), vec![4, 5]);
        assert_eq!(t.last("c"), 5);
    }

    #[test]
    fn an_own_send_kept_behind_a_floor_is_not_handed_out() {
        let mut t = Timelines::default();
        // The own send's ack arrives before the history that holds seq 1.
        assert!(t.on_own_send("c", 2).ready.is_empty());
        t.set_floor("c", 1);
        let mut own = msg(2);
        own.body = bytes::Bytes::from_static(b"mine");
        assert!(t.on_message(own).ready.is_empty());
        assert_eq!(t.last("c"), 2);
        assert_eq!(seqs(&t.on_message(msg(3))), vec![3]);
    }

    #[test]
    fn a_latest_floor_gives_way_to_the_first_push_after_it() {
        let mut t = Timelines::default();
        // The list said 5, but 4 and 5 were stored after the login and are pushed.
        t.set_latest_floor("c", 5);
        assert_eq!(seqs(&t.on_message(msg(4))), vec![4]);
        assert_eq!(seqs(&t.on_message(msg(5))), vec![5]);
        assert!(t.on_message(msg(4)).ready.is_empty());
        // A first push above the floor confirms it: a lower one after it is a repeat.
        let mut other = Timelines::default();
        other.set_latest_floor("c", 5);
        assert_eq!(seqs(&other.on_message(msg(6))), vec![6]);
        assert!(other.on_message(msg(5)).ready.is_empty());
    }

    #[test]
    fn a_latest_floor_passed_by_a_sync_or_an_own_send_stands() {
        let mut t = Timelines::default();
        t.set_latest_floor("c", 5);
        assert_eq!(seqs(&t.on_sync_page("c", vec![msg(6)], false)), vec![6]);
        assert!(t.on_message(msg(5)).ready.is_empty());
        let mut own = Timelines::default();
        own.set_latest_floor("c", 5);
        assert!(own.on_own_send("c", 6).ready.is_empty());
        assert!(own.on_message(msg(5)).ready.is_empty());
        assert_eq!(seqs(&own.on_message(msg(7))), vec![7]);
    }

    #[test]
    fn floors_skip_what_the_application_already_has() {
        let mut t = Timelines::default();
        t.set_floor("c", 10);
        assert!(t.on_message(msg(10)).ready.is_empty());
        assert_eq!(seqs(&t.on_message(msg(11))), vec![11]);
    }
}
