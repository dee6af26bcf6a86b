//! The send pipeline: group-commits messages to the store, then acks senders and pushes to devices in seq order.
//!
//! One task commits: while one batch is being committed, new sends queue up and form the
//! next batch, so durability costs one commit per batch, not per message. Group changes go
//! through the same task, in arrival order between the batches, because their announcements
//! take seqs in the group's conversation too. A second task answers and pushes each
//! committed batch, in commit order, while the committer already stores the next one.
//! Architecture invariant: acks and pushes are issued only after the commit returned, and
//! in commit order, so every device sees each conversation's pushes in seq order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use im_proto::v1::{self, frame::Body};
use im_proto::{encode, ids};
use im_store::{Appended, GroupInfo, NewMessage, Store, StoreError, StoreResult, StoredMessage};
use tokio::sync::{mpsc, oneshot};

use crate::groups::{GroupDirectory, Members, PreparedChange, group_to_proto};
use crate::metrics::{MessageKind, NodeMetrics};
use crate::router::{ConnHandle, DeliverPush, LocalRouter, Outbound};

/// Who gets the answer to a job.
pub enum ReplyTo<T> {
    /// A client connection: answered with a frame for `request_id`; it gets no push of
    /// what it stored itself.
    Connection { handle: ConnHandle, request_id: u64 },
    /// An in-process caller (the HTTP API).
    Caller(oneshot::Sender<StoreResult<T>>),
}

/// One send waiting for its commit.
pub struct SendJob {
    pub message: NewMessage,
    pub reply: ReplyTo<Appended>,
}

/// One group change waiting for its commit.
pub struct GroupJob {
    pub prepared: PreparedChange,
    pub reply: ReplyTo<(GroupInfo, StoredMessage)>,
}

/// What the pipeline stores.
pub enum Job {
    Send(SendJob),
    Group(GroupJob),
}

/// Handle for submitting sends.
#[derive(Clone)]
pub struct Pipeline {
    jobs: mpsc::Sender<Job>,
}

impl Pipeline {
    /// Starts the pipeline's committer and dispatcher; the returned task ends when every
    /// `Pipeline` handle is dropped and the last commit is answered.
    pub fn start(
        store: Arc<dyn Store>,
        router: Arc<LocalRouter>,
        directory: Arc<GroupDirectory>,
        metrics: Arc<NodeMetrics>,
        max_batch: usize,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (jobs, rx) = mpsc::channel(max_batch.saturating_mul(4).max(64));
        let (committed, to_dispatch) = mpsc::channel(DISPATCH_QUEUE);
        let dispatcher = Dispatcher {
            router,
            metrics: metrics.clone(),
        };
        let committer = Committer {
            store,
            directory,
            metrics,
            committed,
        };
        let task = tokio::spawn(async move {
            let dispatching = tokio::spawn(dispatcher.run(to_dispatch));
            committer.run(rx, max_batch).await;
            // The committer dropped its sender: the dispatcher ends after the last batch.
            let _ = dispatching.await;
        });
        (Self { jobs }, task)
    }

    /// Queues a send if the pipeline has room, without waiting.
    // The refusal hands the job back as it came, like tokio's `TrySendError`: boxing it
    // would allocate for nothing on the path that matters.
    #[allow(clippy::result_large_err)]
    pub fn try_submit(&self, job: SendJob) -> Result<(), Refused> {
        self.jobs.try_send(Job::Send(job)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(Job::Send(job)) => Refused::Full(job),
            mpsc::error::TrySendError::Closed(Job::Send(job)) => Refused::Stopped(job),
            _ => unreachable!("a send was submitted"),
        })
    }

    /// Queues a send; waits while the pipeline is full (back-pressure on the sender).
    pub async fn submit(&self, job: SendJob) -> Result<(), SendJob> {
        self.jobs.send(Job::Send(job)).await.map_err(|e| match e.0 {
            Job::Send(job) => job,
            Job::Group(_) => unreachable!("a send was submitted"),
        })
    }

    /// Queues a group change; fails only when the pipeline has stopped.
    pub async fn submit_group(&self, job: GroupJob) -> Result<(), ()> {
        self.jobs.send(Job::Group(job)).await.map_err(|_| ())
    }
}

/// Why [`Pipeline::try_submit`] gave a send back.
pub enum Refused {
    /// No room now: wait with [`Pipeline::submit`].
    Full(SendJob),
    /// The pipeline has stopped.
    Stopped(SendJob),
}

/// Committed batches the dispatcher may lag behind the committer.
const DISPATCH_QUEUE: usize = 4;

/// Largest batch whose acks are written directly ([`ConnHandle::offer_now`]).
const DIRECT_ANSWERS_MAX_BATCH: usize = 4;

/// A commit's outcome, on its way to the dispatcher, with the members of each group it
/// wrote to as they were at the commit (the dispatcher may run a few commits behind).
enum Committed {
    Sends {
        jobs: Vec<SendJob>,
        result: StoreResult<Vec<Appended>>,
        audiences: Audiences,
    },
    Group {
        group_id: String,
        removed: Vec<String>,
        reply: ReplyTo<(GroupInfo, StoredMessage)>,
        /// Boxed: a group and a message are much larger than a batch's vectors.
        result: Box<StoreResult<(GroupInfo, StoredMessage)>>,
        members: Option<Members>,
    },
}

/// Group id -> its members at the commit (`None`: unknown group or unreadable).
type Audiences = HashMap<String, Option<Members>>;

/// The members a group message goes to, from its commit's audiences; `None` for 1:1.
fn audience<'a>(audiences: &'a Audiences, m: &StoredMessage) -> Option<&'a Members> {
    let group_id = ids::conversation_group(&m.conversation_id)?;
    audiences.get(group_id)?.as_ref()
}

/// Stores batches and group changes, one commit at a time, in arrival order, and keeps the
/// group-member cache current before the next commit.
struct Committer {
    store: Arc<dyn Store>,
    directory: Arc<GroupDirectory>,
    metrics: Arc<NodeMetrics>,
    committed: mpsc::Sender<Committed>,
}

impl Committer {
    async fn run(self, mut rx: mpsc::Receiver<Job>, max_batch: usize) {
        let mut jobs = Vec::with_capacity(max_batch);
        let mut sends = Vec::with_capacity(max_batch);
        while rx.recv_many(&mut jobs, max_batch).await > 0 {
            for job in jobs.drain(..) {
                match job {
                    Job::Send(send) => sends.push(send),
                    Job::Group(group) => {
                        // Keep arrival order: the sends queued before it commit first.
                        self.commit_sends(&mut sends).await;
                        self.commit_group(group).await;
                    }
                }
            }
            self.commit_sends(&mut sends).await;
        }
    }

    /// Commits the queued sends in one transaction.
    async fn commit_sends(&self, jobs: &mut Vec<SendJob>) {
        if jobs.is_empty() {
            return;
        }
        // Moved, not copied: only the reply is needed once the batch is stored, and the
        // store moves the strings on into the stored messages.
        let messages: Vec<NewMessage> = jobs
            .iter_mut()
            .map(|j| std::mem::take(&mut j.message))
            .collect();
        let started = Instant::now();
        let result = self.store.append_owned(messages).await;
        self.metrics.store_commit(started.elapsed());
        let mut audiences = Audiences::new();
        if let Ok(outcomes) = &result {
            for outcome in outcomes {
                let Appended::New(stored) = outcome else {
                    continue;
                };
                let Some(group_id) = ids::conversation_group(&stored.conversation_id) else {
                    continue;
                };
                if !audiences.contains_key(group_id) {
                    let members = self.members(group_id).await;
                    audiences.insert(group_id.to_owned(), members);
                }
            }
        }
        let jobs = std::mem::replace(jobs, Vec::with_capacity(jobs.capacity()));
        self.hand_over(Committed::Sends {
            jobs,
            result,
            audiences,
        })
        .await;
    }

    /// A group's members from the cache (loaded on a miss).
    async fn members(&self, group_id: &str) -> Option<Members> {
        match self.directory.members(group_id).await {
            Ok(members) => members,
            // Members sync the gap on their next pull.
            Err(err) => {
                tracing::warn!(error = %err, group = group_id, "reading group members for a push failed");
                None
            }
        }
    }

    async fn commit_group(&self, job: GroupJob) {
        let PreparedChange {
            group_id,
            change,
            announcement,
            removed,
        } = job.prepared;
        let result = self
            .store
            .apply_group_change(&group_id, &change, &announcement)
            .await;
        // Refreshed before the next commit, so later messages reach the new membership.
        let members = match &result {
            Ok(_) => match self.directory.refresh(&group_id).await {
                Ok(members) => members,
                Err(err) => {
                    tracing::warn!(error = %err, group = %group_id, "re-reading group members failed");
                    None
                }
            },
            Err(_) => None,
        };
        self.hand_over(Committed::Group {
            group_id,
            removed,
            reply: job.reply,
            result: Box::new(result),
            members,
        })
        .await;
    }

    async fn hand_over(&self, committed: Committed) {
        if self.committed.send(committed).await.is_err() {
            tracing::error!("the pipeline's dispatcher stopped; a committed batch goes unanswered");
        }
    }
}

/// Answers and pushes committed batches, in commit order.
struct Dispatcher {
    router: Arc<LocalRouter>,
    metrics: Arc<NodeMetrics>,
}

impl Dispatcher {
    async fn run(self, mut committed: mpsc::Receiver<Committed>) {
        while let Some(batch) = committed.recv().await {
            match batch {
                Committed::Sends {
                    jobs,
                    result,
                    audiences,
                } => self.answer_sends(jobs, result, &audiences),
                Committed::Group {
                    group_id,
                    removed,
                    reply,
                    result,
                    members,
                } => self.answer_group(&group_id, &removed, reply, *result, members.as_ref()),
            }
        }
    }

    fn answer_sends(
        &self,
        jobs: Vec<SendJob>,
        result: StoreResult<Vec<Appended>>,
        audiences: &Audiences,
    ) {
        // A small batch's acks are written from this thread where the connection allows it:
        // waking each sender's task to write one ack would also wake a parked runtime worker
        // (see `DirectSocket`). A large batch's acks go through the queues, where a sender's
        // task writes all of its acks in one write.
        let direct = jobs.len() <= DIRECT_ANSWERS_MAX_BATCH;
        match result {
            Ok(outcomes) => {
                for (job, outcome) in jobs.into_iter().zip(outcomes) {
                    let duplicate = matches!(outcome, Appended::Duplicate(_));
                    let stored = outcome.message();
                    if !duplicate {
                        self.metrics
                            .message_in(MessageKind::of(&stored.conversation_id), 1);
                    }
                    // The ack goes before the pushes; a caller's answer takes the outcome.
                    match job.reply {
                        ReplyTo::Connection { handle, request_id } => {
                            let ack = ack_frame(request_id, stored, duplicate);
                            if direct {
                                handle.offer_now(ack);
                            } else {
                                handle.offer(Outbound::Frame(ack));
                            }
                            if !duplicate {
                                let members = audience(audiences, stored);
                                self.dispatch(stored, Some(handle.conn_id), members, &[]);
                            }
                        }
                        ReplyTo::Caller(answer) => {
                            if !duplicate {
                                self.dispatch(stored, None, audience(audiences, stored), &[]);
                            }
                            let _ = answer.send(Ok(outcome));
                        }
                    }
                }
            }
            Err(err) => {
                tracing::error!(error = %err, batch = jobs.len(), "storing a batch of messages failed");
                for job in jobs {
                    match job.reply {
                        ReplyTo::Connection { handle, request_id } => {
                            let frame = v1::Frame::error(
                                request_id,
                                v1::ErrorCode::Internal,
                                "message could not be stored; retry",
                            );
                            handle.offer(Outbound::Frame(frame.to_bytes()));
                        }
                        ReplyTo::Caller(answer) => {
                            let _ = answer.send(Err(StoreError::Backend(err.to_string())));
                        }
                    }
                }
            }
        }
    }

    fn answer_group(
        &self,
        group_id: &str,
        removed: &[String],
        reply: ReplyTo<(GroupInfo, StoredMessage)>,
        result: StoreResult<(GroupInfo, StoredMessage)>,
        members: Option<&Members>,
    ) {
        match reply {
            ReplyTo::Connection { handle, request_id } => {
                let frame = match &result {
                    Ok((group, event)) => v1::Frame::new(
                        request_id,
                        Body::GroupResult(v1::GroupResponse {
                            group: Some(group_to_proto(group)),
                            event: Some(to_proto(event)),
                        }),
                    ),
                    Err(StoreError::UnknownConversation) => {
                        v1::Frame::error(request_id, v1::ErrorCode::UnknownGroup, "no such group")
                    }
                    Err(StoreError::Conflict(why)) => {
                        v1::Frame::error(request_id, v1::ErrorCode::Conflict, why.clone())
                    }
                    Err(err) => {
                        tracing::error!(error = %err, group = %group_id, "storing a group change failed");
                        v1::Frame::error(
                            request_id,
                            v1::ErrorCode::Internal,
                            "the change could not be stored; retry",
                        )
                    }
                };
                handle.offer(Outbound::Frame(frame.to_bytes()));
                if let Ok((_, event)) = &result {
                    self.dispatch(event, Some(handle.conn_id), members, removed);
                }
            }
            ReplyTo::Caller(answer) => {
                if let Ok((_, event)) = &result {
                    self.dispatch(event, None, members, removed);
                }
                let _ = answer.send(result);
            }
        }
    }

    /// Pushes a newly stored message to its audience: for 1:1, the recipient's devices and
    /// the sender's other devices; for a group, `members` (its members as of the commit) and
    /// `also` (users a change just removed). The sending connection gets its ack instead.
    fn dispatch(
        &self,
        m: &StoredMessage,
        sending_conn: Option<u64>,
        members: Option<&Members>,
        also: &[String],
    ) {
        // Encoded for the first device online, once for all of them: a message to users
        // who are all offline is not encoded at all.
        let mut push: Option<Arc<DeliverPush>> = None;
        let mut offer = |device: &ConnHandle| {
            if Some(device.conn_id) != sending_conn {
                let push = push.get_or_insert_with(|| {
                    Arc::new(DeliverPush {
                        conversation_id: m.conversation_id.as_str().into(),
                        seq: m.seq,
                        committed_at: Instant::now(),
                        frame: encode::deliver_frame(&wire_fields(m)),
                    })
                });
                device.offer(Outbound::Deliver(push.clone()));
            }
        };
        if ids::conversation_group(&m.conversation_id).is_some() {
            if let Some(members) = members {
                self.router
                    .for_each_device_of(members.iter().map(|m| &**m), &mut offer);
            }
            self.router
                .for_each_device_of(also.iter().map(String::as_str), &mut offer);
            return;
        }
        self.router.for_each_device(&m.recipient_id, &mut offer);
        if m.recipient_id != m.sender_id {
            self.router.for_each_device(&m.sender_id, &mut offer);
        }
    }
}

fn ack_frame(request_id: u64, m: &StoredMessage, duplicate: bool) -> bytes::Bytes {
    encode::send_ack_frame(
        request_id,
        &encode::SendAckFields {
            client_msg_id: &m.client_msg_id,
            conversation_id: &m.conversation_id,
            seq: m.seq,
            server_msg_id: &m.server_msg_id,
            server_time_ms: m.server_time_ms,
            duplicate,
            dropped: false,
        },
    )
}

/// A stored message's fields as the wire's `Message`, borrowed (for frames encoded
/// without building one).
fn wire_fields(m: &StoredMessage) -> encode::MessageFields<'_> {
    encode::MessageFields {
        conversation_id: &m.conversation_id,
        seq: m.seq,
        server_msg_id: &m.server_msg_id,
        sender_id: &m.sender_id,
        sender_device_id: &m.sender_device_id,
        recipient_id: &m.recipient_id,
        client_msg_id: &m.client_msg_id,
        body: &m.body,
        content_type: &m.content_type,
        server_time_ms: m.server_time_ms,
    }
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use im_store::sqlite::SqliteStore;
    use im_store::{ListPosition, ReadState, StoreResult};

    use super::*;
    use crate::router::ConnControl;

    /// The real SQLite store, counting how many transactions appends use.
    struct CountingStore {
        inner: SqliteStore,
        appends: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Store for CountingStore {
        async fn upsert_user(&self, user_id: &str, now_ms: i64) -> StoreResult<()> {
            self.inner.upsert_user(user_id, now_ms).await
        }
        async fn user_exists(&self, user_id: &str) -> StoreResult<bool> {
            self.inner.user_exists(user_id).await
        }
        async fn removed_at(
            &self,
            user_id: &str,
            conversation_id: &str,
        ) -> StoreResult<Option<u64>> {
            self.inner.removed_at(user_id, conversation_id).await
        }
        async fn list_users(
            &self,
            after: Option<&str>,
            limit: u32,
        ) -> StoreResult<Vec<im_store::UserRecord>> {
            self.inner.list_users(after, limit).await
        }
        async fn append_messages(&self, batch: &[NewMessage]) -> StoreResult<Vec<Appended>> {
            self.appends.fetch_add(1, Ordering::Relaxed);
            self.inner.append_messages(batch).await
        }
        async fn messages_after(
            &self,
            c: &str,
            after: u64,
            limit: u32,
        ) -> StoreResult<Vec<StoredMessage>> {
            self.inner.messages_after(c, after, limit).await
        }
        async fn messages_before(
            &self,
            c: &str,
            before: u64,
            limit: u32,
        ) -> StoreResult<Vec<StoredMessage>> {
            self.inner.messages_before(c, before, limit).await
        }
        async fn last_seq(&self, c: &str) -> StoreResult<u64> {
            self.inner.last_seq(c).await
        }
        async fn is_member(&self, u: &str, c: &str) -> StoreResult<bool> {
            self.inner.is_member(u, c).await
        }
        async fn list_conversations(
            &self,
            u: &str,
            d: &str,
            after: Option<ListPosition<'_>>,
            limit: u32,
        ) -> StoreResult<Vec<im_store::ConversationSummary>> {
            self.inner.list_conversations(u, d, after, limit).await
        }
        async fn mark_read(&self, u: &str, c: &str, seq: u64) -> StoreResult<ReadState> {
            self.inner.mark_read(u, c, seq).await
        }
        async fn load_plugin_kv(&self, p: &str, now: i64) -> StoreResult<Vec<im_store::KvRecord>> {
            self.inner.load_plugin_kv(p, now).await
        }
        async fn write_plugin_kv(
            &self,
            p: &str,
            up: &[im_store::KvRecord],
            del: &[String],
        ) -> StoreResult<()> {
            self.inner.write_plugin_kv(p, up, del).await
        }
        async fn ack_delivered(&self, cursors: &[im_store::DeliveryCursor]) -> StoreResult<()> {
            self.inner.ack_delivered(cursors).await
        }
        async fn apply_group_change(
            &self,
            g: &str,
            change: &im_store::GroupChange,
            announcement: &NewMessage,
        ) -> StoreResult<(im_store::GroupInfo, StoredMessage)> {
            self.inner.apply_group_change(g, change, announcement).await
        }
        async fn group(&self, g: &str) -> StoreResult<Option<im_store::GroupInfo>> {
            self.inner.group(g).await
        }
        async fn group_member(
            &self,
            g: &str,
            u: &str,
        ) -> StoreResult<Option<im_store::GroupMember>> {
            self.inner.group_member(g, u).await
        }
        async fn group_members(
            &self,
            g: &str,
            after: Option<&str>,
            limit: u32,
        ) -> StoreResult<Vec<im_store::GroupMember>> {
            self.inner.group_members(g, after, limit).await
        }
        async fn user_groups(&self, u: &str) -> StoreResult<Vec<im_store::GroupInfo>> {
            self.inner.user_groups(u).await
        }
    }

    fn device(
        conn_id: u64,
        user: &str,
        capacity: usize,
    ) -> (ConnHandle, crate::router::OutboundReceiver) {
        let (control, rx) = crate::router::outbound_queue(ConnControl::new(0, capacity));
        let handle = ConnHandle {
            conn_id,
            user_id: user.into(),
            device_id: "d".into(),
            transport: crate::transport::Transport::Tcp,
            control,
        };
        (handle, rx)
    }

    fn decode(item: Outbound) -> Body {
        let bytes = match item {
            Outbound::Frame(bytes) => bytes,
            Outbound::Deliver(push) => push.frame.clone(),
            Outbound::FinishDirectWrite => panic!("these connections have no socket"),
        };
        v1::Frame::from_bytes(&bytes).unwrap().body.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_sends_share_commits_and_keep_seq_order() {
        let (_dir, inner) = crate::testing::temporary_store().await;
        let store = Arc::new(CountingStore {
            inner,
            appends: AtomicUsize::new(0),
        });
        let router = Arc::new(LocalRouter::default());
        let (recipient, pushes) = device(2, "bob", 4096);
        router.register(recipient, 0);
        let directory = Arc::new(GroupDirectory::new(store.clone()));
        let (pipeline, task) = Pipeline::start(
            store.clone(),
            router,
            directory,
            Arc::new(NodeMetrics::new()),
            512,
        );
        let (sender, acks) = device(1, "alice", 4096);
        const SENDS: u64 = 2000;
        for i in 0..SENDS {
            let message = NewMessage {
                conversation_id: "u:alice:bob".into(),
                sender_id: "alice".into(),
                sender_device_id: "d".into(),
                recipient_id: "bob".into(),
                client_msg_id: format!("c{i}"),
                body: bytes::Bytes::from(format!("{i}")),
                content_type: String::new(),
                server_msg_id: format!("s{i}"),
                server_time_ms: 1,
            };
            let job = SendJob {
                message,
                reply: ReplyTo::Connection {
                    handle: sender.clone(),
                    request_id: i + 1,
                },
            };
            // Half the sends take the path without a wait, as sessions do while there is
            // room; the order holds across both.
            if i % 2 == 0 {
                assert!(pipeline.submit(job).await.is_ok());
                continue;
            }
            match pipeline.try_submit(job) {
                Ok(()) => {}
                Err(Refused::Full(job)) => assert!(pipeline.submit(job).await.is_ok()),
                Err(Refused::Stopped(_)) => panic!("the pipeline is running"),
            }
        }
        for i in 1..=SENDS {
            let Body::SendAck(ack) = decode(acks.recv().await) else {
                panic!("not an ack")
            };
            assert_eq!((ack.seq, ack.client_msg_id), (i, format!("c{}", i - 1)));
            let Body::Deliver(push) = decode(pushes.recv().await) else {
                panic!("not a push")
            };
            assert_eq!(push.message.unwrap().seq, i);
        }
        let commits = store.appends.load(Ordering::Relaxed);
        assert!(
            commits < SENDS as usize / 4,
            "{commits} commits for {SENDS} sends: not grouped"
        );
        drop(pipeline);
        task.await.unwrap();
    }
}
