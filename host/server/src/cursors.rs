//! Persists per-device delivery cursors from `DeliverAck`s in batches, off the connection tasks.
//!
//! Cursors are advisory (a client without local state resumes from them; anything it
//! already has is dropped by seq), so under overload acks are coalesced or dropped rather
//! than slowing connections down.

use std::collections::HashMap;
use std::sync::Arc;

use im_store::Store;
use tokio::sync::mpsc;

use crate::router::ConnHandle;

/// (user id, device id).
type DeviceKey = (Arc<str>, Arc<str>);

const QUEUE: usize = 16 * 1024;
const BATCH: usize = 1024;

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
        let mut by_device: HashMap<DeviceKey, HashMap<Arc<str>, u64>> = HashMap::new();
        for u in batch.drain(..) {
            let seq = by_device
                .entry((u.user_id, u.device_id))
                .or_default()
                .entry(u.conversation_id)
                .or_default();
            *seq = (*seq).max(u.seq);
        }
        for ((user, device), convs) in by_device {
            let acks: Vec<(String, u64)> =
                convs.into_iter().map(|(c, s)| (c.to_string(), s)).collect();
            if let Err(err) = store.ack_delivered(&user, &device, &acks).await {
                tracing::warn!(error = %err, "storing delivery cursors failed");
            }
        }
    }
}
