//! The send pipeline: group-commits messages to the store, then acks senders and pushes to devices in seq order.
//!
//! One task owns the pipeline. While one batch is being committed, new sends queue up and
//! form the next batch, so durability costs one commit per batch, not per message.
//! Architecture invariant: acks and pushes are issued only after the commit returned, and
//! in commit order, so every device sees each conversation's pushes in seq order.

use std::sync::Arc;

use im_proto::v1::{self, frame::Body};
use im_store::{Appended, NewMessage, Store, StoredMessage};
use tokio::sync::mpsc;

use crate::router::{ConnHandle, DeliverPush, LocalRouter, Outbound};

/// One send waiting for its commit.
pub struct SendJob {
    pub request_id: u64,
    pub message: NewMessage,
    /// The sending connection: gets the ack and no push.
    pub sender: ConnHandle,
}

/// Handle for submitting sends.
#[derive(Clone)]
pub struct Pipeline {
    jobs: mpsc::Sender<SendJob>,
}

impl Pipeline {
    /// Starts the pipeline task; it ends when every `Pipeline` handle is dropped.
    pub fn start(
        store: Arc<dyn Store>,
        router: Arc<LocalRouter>,
        max_batch: usize,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (jobs, rx) = mpsc::channel(max_batch.saturating_mul(4).max(64));
        let task = tokio::spawn(run(rx, store, router, max_batch));
        (Self { jobs }, task)
    }

    /// Queues a send; waits while the pipeline is full (back-pressure on the sender).
    pub async fn submit(&self, job: SendJob) -> Result<(), SendJob> {
        self.jobs.send(job).await.map_err(|e| e.0)
    }
}

async fn run(
    mut rx: mpsc::Receiver<SendJob>,
    store: Arc<dyn Store>,
    router: Arc<LocalRouter>,
    max_batch: usize,
) {
    let mut jobs = Vec::with_capacity(max_batch);
    let mut messages = Vec::with_capacity(max_batch);
    while rx.recv_many(&mut jobs, max_batch).await > 0 {
        messages.extend(jobs.iter().map(|j| j.message.clone()));
        match store.append_messages(&messages).await {
            Ok(outcomes) => {
                for (job, outcome) in jobs.drain(..).zip(outcomes) {
                    let duplicate = matches!(outcome, Appended::Duplicate(_));
                    let stored = match outcome {
                        Appended::New(m) | Appended::Duplicate(m) => m,
                    };
                    job.sender.offer(Outbound::Frame(ack_frame(
                        job.request_id,
                        &stored,
                        duplicate,
                    )));
                    if !duplicate {
                        dispatch(&router, &stored, job.sender.conn_id);
                    }
                }
            }
            Err(err) => {
                tracing::error!(error = %err, batch = jobs.len(), "storing a batch of messages failed");
                for job in jobs.drain(..) {
                    let frame = v1::Frame::error(
                        job.request_id,
                        v1::ErrorCode::Internal,
                        "message could not be stored; retry",
                    );
                    job.sender.offer(Outbound::Frame(frame.to_bytes()));
                }
            }
        }
        messages.clear();
    }
}

fn ack_frame(request_id: u64, m: &StoredMessage, duplicate: bool) -> bytes::Bytes {
    v1::Frame::new(
        request_id,
        Body::SendAck(v1::SendAck {
            client_msg_id: m.client_msg_id.clone(),
            conversation_id: m.conversation_id.clone(),
            seq: m.seq,
            server_msg_id: m.server_msg_id.clone(),
            server_time_ms: m.server_time_ms,
            duplicate,
        }),
    )
    .to_bytes()
}

/// The wire form of a stored message.
pub fn to_proto(m: &StoredMessage) -> v1::Message {
    v1::Message {
        conversation_id: m.conversation_id.clone(),
        seq: m.seq,
        server_msg_id: m.server_msg_id.clone(),
        sender_id: m.sender_id.clone(),
        sender_device_id: m.sender_device_id.clone(),
        recipient_id: m.recipient_id.clone(),
        client_msg_id: m.client_msg_id.clone(),
        body: m.body.clone(),
        content_type: m.content_type.clone(),
        server_time_ms: m.server_time_ms,
    }
}

/// Pushes a newly stored message to the recipient's devices and the sender's other devices.
fn dispatch(router: &LocalRouter, m: &StoredMessage, sending_conn: u64) {
    let push = Arc::new(DeliverPush {
        conversation_id: m.conversation_id.as_str().into(),
        seq: m.seq,
        frame: v1::Frame::new(
            0,
            Body::Deliver(v1::Deliver {
                message: Some(to_proto(m)),
            }),
        )
        .to_bytes(),
    });
    let mut offer = |device: &ConnHandle| {
        if device.conn_id != sending_conn {
            device.offer(Outbound::Deliver(push.clone()));
        }
    };
    router.for_each_device(&m.recipient_id, &mut offer);
    if m.recipient_id != m.sender_id {
        router.for_each_device(&m.sender_id, &mut offer);
    }
}
