//! Sans-IO tracking of pushed-but-unacknowledged messages on one connection, with re-push back-off.
//!
//! Time is passed in (`now`), so the schedule is tested without sleeping.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::router::DeliverPush;

struct Pending {
    /// The push's seq, kept beside it: every push and ack compares it with each entry,
    /// and reading it through `push` cost a cache miss per entry (the push's scan was
    /// 2.1 % of the server's samples in the kit's group fan-out, where each device acks
    /// every 100 ms; 1.7 % with the seq here: docs/benchmarks.md, 2026-12-07 later).
    seq: u64,
    push: Arc<DeliverPush>,
    attempts: u32,
    due: Instant,
}

impl Pending {
    fn is(&self, conversation_id: &str, seq: u64) -> bool {
        self.seq == seq && &*self.push.conversation_id == conversation_id
    }
}

/// Unacknowledged pushes of one connection.
///
/// A flat list in push order: a connection rarely has more than a few pushes awaiting acks
/// (at most `capacity`), and scanning a few entries costs less than keeping a hash map and
/// an ordered schedule current on every push and ack, which was a tenth of the server's
/// time in a group fan-out.
pub struct PendingDeliveries {
    entries: VecDeque<Pending>,
    /// The earliest `due` among `entries`, when known; `None` with entries means "recompute".
    next_due: Option<Instant>,
    initial: Duration,
    max_delay: Duration,
    capacity: usize,
    evicted: u64,
}

impl PendingDeliveries {
    pub fn new(initial: Duration, max_delay: Duration, capacity: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            next_due: None,
            initial,
            max_delay,
            capacity: capacity.max(1),
            evicted: 0,
        }
    }

    /// Records a first push made at `now`. Beyond capacity the earliest-due entry stops being
    /// tracked (the device repairs any gap by sync).
    pub fn pushed(&mut self, push: Arc<DeliverPush>, now: Instant) {
        if self
            .entries
            .iter()
            .any(|p| p.is(&push.conversation_id, push.seq))
        {
            return;
        }
        while self.entries.len() >= self.capacity {
            let Some(earliest) = self.position_of_earliest() else {
                break;
            };
            self.entries.remove(earliest);
            self.evicted += 1;
            self.next_due = None;
        }
        let due = now + self.initial;
        if self.entries.is_empty() || self.next_due.is_some_and(|next| due < next) {
            self.next_due = Some(due);
        }
        self.entries.push_back(Pending {
            seq: push.seq,
            push,
            attempts: 1,
            due,
        });
    }

    /// A cumulative ack: everything of `conversation_id` up to `seq` is delivered.
    pub fn acked(&mut self, conversation_id: &str, seq: u64) {
        let before = self.entries.len();
        self.entries
            .retain(|p| !(p.seq <= seq && &*p.push.conversation_id == conversation_id));
        if self.entries.len() != before {
            self.next_due = None;
        }
        // A burst's buffer is not kept by a connection that has gone quiet.
        if self.entries.is_empty() && self.entries.capacity() > 64 {
            self.entries = VecDeque::new();
        }
    }

    /// Pushes due for another attempt at `now`, in (conversation, seq) order; each is
    /// rescheduled with doubled delay, capped.
    pub fn take_due(&mut self, now: Instant) -> Vec<Arc<DeliverPush>> {
        let mut out: Vec<Arc<DeliverPush>> = Vec::new();
        for pending in self.entries.iter_mut().filter(|p| p.due <= now) {
            let delay = self
                .initial
                .saturating_mul(1 << pending.attempts.min(16))
                .min(self.max_delay);
            pending.attempts += 1;
            pending.due = now + delay;
            out.push(pending.push.clone());
        }
        if !out.is_empty() {
            self.next_due = None;
        }
        out.sort_by(|a, b| (&*a.conversation_id, a.seq).cmp(&(&*b.conversation_id, b.seq)));
        out
    }

    /// When the next re-push is due.
    pub fn next_due(&mut self) -> Option<Instant> {
        if self.next_due.is_none() {
            self.next_due = self.entries.iter().map(|p| p.due).min();
        }
        self.next_due
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many entries were dropped for capacity.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    fn position_of_earliest(&self) -> Option<usize> {
        (0..self.entries.len()).min_by_key(|&i| self.entries[i].due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn push(conv: &str, seq: u64) -> Arc<DeliverPush> {
        Arc::new(DeliverPush {
            conversation_id: conv.into(),
            seq,
            committed_at: std::time::Instant::now(),
            frame: Bytes::new(),
        })
    }

    fn seqs(pushes: &[Arc<DeliverPush>]) -> Vec<(String, u64)> {
        pushes
            .iter()
            .map(|p| (p.conversation_id.to_string(), p.seq))
            .collect()
    }

    #[test]
    fn unacked_pushes_come_back_with_doubling_capped_delays() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut p = PendingDeliveries::new(s, 4 * s, 100);
        p.pushed(push("c", 1), t0);
        p.pushed(push("c", 2), t0);
        assert!(p.take_due(t0).is_empty());
        assert_eq!(p.next_due(), Some(t0 + s));
        assert_eq!(
            seqs(&p.take_due(t0 + s)),
            vec![("c".into(), 1), ("c".into(), 2)]
        );
        // Second delay is 2 s, then 4 s, then capped at 4 s.
        assert!(p.take_due(t0 + 2 * s).is_empty());
        assert_eq!(p.take_due(t0 + 3 * s).len(), 2);
        assert!(p.take_due(t0 + 6 * s).is_empty());
        assert_eq!(p.take_due(t0 + 7 * s).len(), 2);
        assert_eq!(p.next_due(), Some(t0 + 11 * s));
    }

    #[test]
    fn cumulative_ack_clears_only_its_conversation() {
        let t0 = Instant::now();
        let mut p = PendingDeliveries::new(Duration::from_secs(1), Duration::from_secs(8), 100);
        for seq in 1..=3 {
            p.pushed(push("a", seq), t0);
            p.pushed(push("b", seq), t0);
        }
        p.acked("a", 2);
        assert_eq!(p.len(), 4);
        let due = p.take_due(t0 + Duration::from_secs(1));
        assert_eq!(
            seqs(&due),
            vec![
                ("a".into(), 3),
                ("b".into(), 1),
                ("b".into(), 2),
                ("b".into(), 3)
            ]
        );
        p.acked("b", 10);
        p.acked("a", 3);
        assert!(p.is_empty());
        assert_eq!(p.next_due(), None);
    }

    #[test]
    fn a_repeated_push_is_tracked_once_and_acks_move_the_next_due_time() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut p = PendingDeliveries::new(s, 8 * s, 100);
        p.pushed(push("a", 1), t0);
        p.pushed(push("a", 1), t0 + s / 2);
        p.pushed(push("b", 1), t0 + s / 4);
        assert_eq!(p.len(), 2);
        assert_eq!(p.next_due(), Some(t0 + s));
        p.acked("a", 1);
        assert_eq!(p.next_due(), Some(t0 + s + s / 4));
        assert_eq!(seqs(&p.take_due(t0 + 2 * s)), vec![("b".into(), 1)]);
        // Re-pushed with a doubled delay from the time it was taken.
        assert_eq!(p.next_due(), Some(t0 + 4 * s));
        p.acked("b", 1);
        assert_eq!(p.next_due(), None);
    }

    #[test]
    fn capacity_evicts_the_oldest() {
        let t0 = Instant::now();
        let mut p = PendingDeliveries::new(Duration::from_secs(1), Duration::from_secs(8), 2);
        p.pushed(push("a", 1), t0);
        p.pushed(push("a", 2), t0 + Duration::from_millis(1));
        p.pushed(push("a", 3), t0 + Duration::from_millis(2));
        assert_eq!(p.len(), 2);
        assert_eq!(p.evicted(), 1);
        assert_eq!(
            seqs(&p.take_due(t0 + Duration::from_secs(2))),
            vec![("a".into(), 2), ("a".into(), 3)]
        );
    }
}
