//! Sans-IO tracking of pushed-but-unacknowledged messages on one connection, with re-push back-off.
//!
//! Time is passed in (`now`), so the schedule is tested without sleeping.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::router::DeliverPush;

struct Pending {
    push: Arc<DeliverPush>,
    attempts: u32,
    due: Instant,
}

/// Unacknowledged pushes of one connection.
pub struct PendingDeliveries {
    /// (conversation, seq) -> pending push.
    entries: HashMap<(Arc<str>, u64), Pending>,
    /// (due, order) -> key: the re-push schedule.
    schedule: BTreeMap<(Instant, u64), (Arc<str>, u64)>,
    order: u64,
    initial: Duration,
    max_delay: Duration,
    capacity: usize,
    evicted: u64,
}

impl PendingDeliveries {
    pub fn new(initial: Duration, max_delay: Duration, capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            schedule: BTreeMap::new(),
            order: 0,
            initial,
            max_delay,
            capacity: capacity.max(1),
            evicted: 0,
        }
    }

    /// Records a first push made at `now`. Beyond capacity the earliest-due entry stops being
    /// tracked (the device repairs any gap by sync).
    pub fn pushed(&mut self, push: Arc<DeliverPush>, now: Instant) {
        let key = (push.conversation_id.clone(), push.seq);
        if self.entries.contains_key(&key) {
            return;
        }
        while self.entries.len() >= self.capacity {
            let Some((_, oldest)) = self.schedule.pop_first() else {
                break;
            };
            if self.entries.remove(&oldest).is_some() {
                self.evicted += 1;
            }
        }
        let due = now + self.initial;
        let order = self.next_order();
        self.schedule.insert((due, order), key.clone());
        self.entries.insert(
            key,
            Pending {
                push,
                attempts: 1,
                due,
            },
        );
    }

    /// A cumulative ack: everything of `conversation_id` up to `seq` is delivered.
    ///
    /// Schedule entries of acknowledged pushes are left in place and skipped when reached,
    /// which keeps an ack O(pending) rather than O(pending x schedule).
    pub fn acked(&mut self, conversation_id: &str, seq: u64) {
        self.entries
            .retain(|(conv, s), _| !(&**conv == conversation_id && *s <= seq));
    }

    /// Pushes due for another attempt at `now`, in (conversation, seq) order; each is
    /// rescheduled with doubled delay, capped.
    pub fn take_due(&mut self, now: Instant) -> Vec<Arc<DeliverPush>> {
        let mut due_keys = Vec::new();
        while let Some(entry) = self.schedule.first_entry() {
            let due = entry.key().0;
            if due > now {
                break;
            }
            let key = entry.remove();
            // Skip entries of acknowledged (or since re-pushed) deliveries.
            if self.entries.get(&key).is_some_and(|p| p.due == due) {
                due_keys.push(key);
            }
        }
        due_keys.sort();
        let mut out = Vec::with_capacity(due_keys.len());
        for key in due_keys {
            let order = self.next_order();
            let Some(pending) = self.entries.get_mut(&key) else {
                continue;
            };
            let delay = self
                .initial
                .saturating_mul(1 << pending.attempts.min(16))
                .min(self.max_delay);
            pending.attempts += 1;
            pending.due = now + delay;
            self.schedule.insert((pending.due, order), key);
            out.push(pending.push.clone());
        }
        out
    }

    /// When the next re-push is due.
    pub fn next_due(&mut self) -> Option<Instant> {
        while let Some(entry) = self.schedule.first_entry() {
            let due = entry.key().0;
            if self.entries.get(entry.get()).is_some_and(|p| p.due == due) {
                return Some(due);
            }
            entry.remove();
        }
        None
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

    fn next_order(&mut self) -> u64 {
        self.order += 1;
        self.order
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
