//! Persists per-device delivery cursors from `DeliverAck`s in batches, off the connection tasks.
//!
//! Cursors are advisory (a client without local state resumes from them; anything it
//! already has is dropped by seq), so under overload acks are coalesced or dropped rather
//! than slowing connections down.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use im_store::{DeliveryCursor, Store};
use tokio::sync::mpsc;

use crate::router::ConnHandle;

/// (user id, device id).
type DeviceKey = (Arc<str>, Arc<str>);

/// Acks waiting for the next write; beyond it they are dropped (cursors are advisory). Holds
/// one interval of a 1,000-member group receiving 500 messages/s.
const QUEUE: usize = 64 * 1024;
const BATCH: usize = 16 * 1024;
/// Least time between two writes: acks arriving meanwhile coalesce into the next one, so
/// cursors cost one transaction per interval and one row per device and conversation in
/// it, however many acks came (in a group fan-out, every member acks every few
/// messages). A crash loses at most this much cursor progress: a device resuming from
/// its cursor is sent those messages again and drops them by seq.
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

struct CursorUpdate {
    user_id: Arc<str>,
    device_id: Arc<str>,
    conversation_id: Arc<str>,
    seq: u64,
}

/// Handle for recording delivery acks.
#[derive(Clone)]
pub struct CursorWriter {
    updates: mpsc::Sender<CursorUpdate>,
}

impl CursorWriter {
    /// Starts the writer task; it ends when every handle is dropped, after flushing.
    pub fn start(store: Arc<dyn Store>) -> (Self, tokio::task::JoinHandle<()>) {
        let (updates, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(run(rx, store));
        (Self { updates }, task)
    }

    /// Records that `device` holds `conversation_id` up to `seq`.
    pub fn record(&self, device: &ConnHandle, conversation_id: Arc<str>, seq: u64) {
        let update = CursorUpdate {
            user_id: device.user_id.clone(),
            device_id: device.device_id.clone(),
            conversation_id,
            seq,
        };
        if self.updates.try_send(update).is_err() {
            tracing::debug!(user = %device.user_id, "delivery cursor writer behind; ack not persisted");
        }
    }
}

async fn run(mut rx: mpsc::Receiver<CursorUpdate>, store: Arc<dyn Store>) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        // Coalesce to the highest seq per (user, device, conversation).
        let mut highest: HashMap<(DeviceKey, Arc<str>), u64> = HashMap::new();
        for u in batch.drain(..) {
            let seq = highest
                .entry(((u.user_id, u.device_id), u.conversation_id))
                .or_default();
            *seq = (*seq).max(u.seq);
        }
        let cursors: Vec<DeliveryCursor> = highest
            .into_iter()
            .map(|(((user, device), conversation), seq)| DeliveryCursor {
                user_id: user.to_string(),
                device_id: device.to_string(),
                conversation_id: conversation.to_string(),
                seq,
            })
            .collect();
        if let Err(err) = store.ack_delivered(&cursors).await {
            tracing::warn!(error = %err, "storing delivery cursors failed");
        }
        tokio::time::sleep(FLUSH_INTERVAL).await;
    }
}
