//! The message journal: an append-only log that makes a batch of messages durable with one `write`, and the applier that copies it into SQLite behind the acks.
//!
//! A SQLite commit of one message costs about 300 µs on this kind of machine (a dozen WAL
//! page writes and lock calls), and a round trip needs two. Appending the batch to a log
//! file is one system call, and it is just as durable: the bytes are in the OS page cache
//! when `write` returns, so they survive a SIGKILL of the server (with
//! `fsync_each_commit`, `fdatasync` makes them survive power loss too). The applier then
//! writes the journaled batches into SQLite in large transactions, where a message costs a
//! few µs.
//!
//! Rules that keep SQLite and the journal one store:
//! - Only the appender assigns seqs and checks (sender, client message id). For what the
//!   applier has not written yet it keeps the conversations' last seqs and the messages'
//!   keys in memory ([`Pending`]); the applier drops them only after its commit, so a key
//!   or seq that is not pending is in SQLite.
//! - Every read of messages, conversations or their members first waits until the applier
//!   has written everything journaled before the read began ([`Journal::settled`]), so a
//!   reader sees every acknowledged message.
//! - Group changes write SQLite directly; they hold the appender ([`Journal::exclusive`])
//!   and wait until nothing is pending, so their seqs follow the journal's; they also add
//!   their announcement's (sender, client message id) to the appender's filter of stored
//!   pairs, which every path that stores a message must do (a pair the filter lacks is
//!   taken as new without asking SQLite).
//! - The applier commits at most every [`APPLY_INTERVAL`], unless a reader waits for it.
//! - On open, every segment is replayed into SQLite (a message whose seq is already stored
//!   is skipped) and then deleted. A record cut short by a crash fails its checksum and
//!   ends the replay of its segment; it was never acknowledged.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use foldhash::{HashMap, HashMapExt, HashSet};
use growable_bloom_filter::GrowableBloom;
use rusqlite::{OpenFlags, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::{BusyTime, Checkpointer, MESSAGE_COLUMNS, raw_writes};
use crate::{Appended, NewMessage, StoreError, StoreResult, StoreStats, StoredMessage};

/// Bytes every segment starts with: the format and its version.
const SEGMENT_MAGIC: &[u8; 8] = b"IMJRNL01";

/// A segment is sealed (and a new one started) once it is this long.
const SEGMENT_BYTES: u64 = 32 << 20;

/// Messages journaled but not yet in SQLite past which appends wait for the applier, so a
/// slow disk bounds the memory the journal holds.
const MAX_PENDING_MESSAGES: usize = 50_000;

/// Applied messages forgotten per hold of the pending lock.
const PENDING_REMOVAL_SLICE: usize = 32;

/// Messages the applier writes in one SQLite transaction at most (a batch is never split).
const APPLY_MAX_MESSAGES: usize = 4_096;

/// The applier commits at most this often unless a reader waits for it. A commit's cost is
/// mostly the pages it writes (each conversation's tail, each sender's client-id range),
/// whatever the number of messages on them, so fewer, larger commits write each hot page
/// once for many messages. But a commit is also a burst of one core's time (400 messages:
/// 1.3 ms median, 2.2 ms p90 on the Intel machine) that everything else on a small machine
/// runs short of: at 40 ms the round trip's p99 at 5,000/s was about the length of the
/// burst, at 10 ms half of it, for 0.06 cores more at 10,000 durable messages/s and no loss
/// at 50,000/s or saturated (docs/benchmarks.md, 2026-12-05).
const APPLY_INTERVAL: Duration = Duration::from_millis(10);

/// (sender, client message id) pairs the journal's filter of stored ids holds at most
/// (about 1.2 bytes each); past it the filter is dropped and every new message is looked
/// up in SQLite, as if there were none.
const MAX_FILTERED_IDS: usize = 20_000_000;

/// Messages per transaction when replaying segments at open.
const REPLAY_CHUNK: usize = 2_000;

/// How long a read waits for the applier before it fails instead of answering stale.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Each record: payload length and CRC-32 of the payload (both little-endian), then the
/// payload, a postcard-encoded list of [`Entry`].
const RECORD_HEADER: usize = 8;

fn backend(err: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(err.to_string())
}

/// One message as the journal stores it.
#[derive(Serialize, Deserialize)]
struct Entry<'a> {
    conversation_id: &'a str,
    seq: u64,
    server_msg_id: &'a str,
    sender_id: &'a str,
    sender_device_id: &'a str,
    recipient_id: &'a str,
    client_msg_id: &'a str,
    #[serde(with = "serde_bytes")]
    body: &'a [u8],
    content_type: &'a str,
    server_time_ms: i64,
}

impl<'a> Entry<'a> {
    fn of(m: &'a StoredMessage) -> Self {
        Self {
            conversation_id: &m.conversation_id,
            seq: m.seq,
            server_msg_id: &m.server_msg_id,
            sender_id: &m.sender_id,
            sender_device_id: &m.sender_device_id,
            recipient_id: &m.recipient_id,
            client_msg_id: &m.client_msg_id,
            body: m.body.as_ref(),
            content_type: &m.content_type,
            server_time_ms: m.server_time_ms,
        }
    }

    fn to_stored(&self) -> StoredMessage {
        StoredMessage {
            conversation_id: self.conversation_id.to_owned(),
            seq: self.seq,
            server_msg_id: self.server_msg_id.to_owned(),
            sender_id: self.sender_id.to_owned(),
            sender_device_id: self.sender_device_id.to_owned(),
            recipient_id: self.recipient_id.to_owned(),
            client_msg_id: self.client_msg_id.to_owned(),
            body: Bytes::copy_from_slice(self.body),
            content_type: self.content_type.to_owned(),
            server_time_ms: self.server_time_ms,
        }
    }
}

/// Appends one record holding `messages` to `out`.
fn encode_record(messages: &[Arc<StoredMessage>], out: &mut Vec<u8>) -> StoreResult<()> {
    let entries: Vec<Entry<'_>> = messages.iter().map(|m| Entry::of(m)).collect();
    let start = out.len();
    out.extend_from_slice(&[0; RECORD_HEADER]);
    let mut buf = postcard::to_extend(&entries, std::mem::take(out)).map_err(backend)?;
    let payload = &buf[start + RECORD_HEADER..];
    let len = u32::try_from(payload.len())
        .map_err(|_| StoreError::Backend("a journal record exceeds 4 GiB".into()))?;
    let crc = crc32fast::hash(payload);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    *out = buf;
    Ok(())
}

/// The messages of a segment's intact records, in order, and whether the segment ended
/// with a damaged or cut-short record.
fn decode_segment(bytes: &[u8]) -> (Vec<StoredMessage>, bool) {
    let mut messages = Vec::new();
    let Some(mut rest) = bytes.strip_prefix(SEGMENT_MAGIC.as_slice()) else {
        return (messages, !bytes.is_empty());
    };
    while !rest.is_empty() {
        if rest.len() < RECORD_HEADER {
            return (messages, true);
        }
        let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        let Some(payload) = rest[RECORD_HEADER..].get(..len) else {
            return (messages, true);
        };
        if crc32fast::hash(payload) != crc {
            return (messages, true);
        }
        match postcard::from_bytes::<Vec<Entry<'_>>>(payload) {
            Ok(entries) => messages.extend(entries.iter().map(Entry::to_stored)),
            Err(_) => return (messages, true),
        }
        rest = &rest[RECORD_HEADER + len..];
    }
    (messages, false)
}

fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:016}.seg"))
}

/// The segments in `dir`, oldest first.
fn list_segments(dir: &Path) -> StoreResult<Vec<(u64, PathBuf)>> {
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(backend)? {
        let path = entry.map_err(backend)?.path();
        let number = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(number) = number {
            segments.push((number, path));
        }
    }
    segments.sort();
    Ok(segments)
}

/// What an append makes of one message of its batch.
enum Decision {
    /// New, with this seq.
    New(u64),
    /// Already stored or pending: the original.
    Duplicate(Arc<StoredMessage>),
    /// A repeat of the batch's message at this index, which is new.
    RepeatOf(usize),
}

/// What the journal holds that SQLite does not have yet.
#[derive(Default)]
struct Pending {
    /// Every unapplied message by sender, then client message id: two levels, so a lookup
    /// borrows both ids instead of copying them into a key (every append looks up each of
    /// its messages), and the inner level is keyed by the message itself, which holds its
    /// client id (no copy of it per message).
    by_client_id: HashMap<String, HashSet<ByClientId>>,
    /// How many messages `by_client_id` holds.
    messages: usize,
    /// Per conversation with unapplied messages: its last seq and how many are unapplied.
    conversations: HashMap<String, (u64, usize)>,
    /// Sealed segments and the count of batches journaled when each was sealed: a segment
    /// may go once that many are applied.
    sealed: VecDeque<(PathBuf, u64)>,
}

struct Shared {
    pending: std::sync::Mutex<Pending>,
    /// Batches journaled (and handed to the applier) so far.
    journaled: AtomicU64,
    /// Batches applied to SQLite so far.
    applied: watch::Sender<u64>,
    /// Set by a waiter: the applier commits what it holds without waiting out its interval.
    hurry: AtomicBool,
    /// The applier's thread, unparked to hurry it.
    applier: OnceLock<std::thread::Thread>,
    /// The applier's transactions and the messages they wrote, for [`Journal::stats`].
    applier_commits: BusyTime,
    applier_messages: AtomicU64,
}

/// A pending message, found by its client message id.
struct ByClientId(Arc<StoredMessage>);

impl std::borrow::Borrow<str> for ByClientId {
    fn borrow(&self) -> &str {
        &self.0.client_msg_id
    }
}

impl std::hash::Hash for ByClientId {
    // As the `str` it borrows as hashes, which `Borrow` requires.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.client_msg_id.as_str().hash(state);
    }
}

impl PartialEq for ByClientId {
    fn eq(&self, other: &Self) -> bool {
        self.0.client_msg_id == other.0.client_msg_id
    }
}

impl Eq for ByClientId {}

impl Pending {
    fn original(&self, sender_id: &str, client_msg_id: &str) -> Option<&Arc<StoredMessage>> {
        let pending = self.by_client_id.get(sender_id)?.get(client_msg_id)?;
        Some(&pending.0)
    }

    fn insert(&mut self, m: &Arc<StoredMessage>) {
        // A sender or conversation with messages pending already has its key: look it up
        // by reference, copying the id only for a new one.
        let previous = match self.by_client_id.get_mut(m.sender_id.as_str()) {
            Some(sent) => sent.replace(ByClientId(m.clone())),
            None => {
                let mut sent = HashSet::default();
                sent.insert(ByClientId(m.clone()));
                self.by_client_id.insert(m.sender_id.clone(), sent);
                None
            }
        };
        if previous.is_none() {
            self.messages += 1;
        }
        match self.conversations.get_mut(m.conversation_id.as_str()) {
            Some(entry) => {
                entry.0 = m.seq;
                entry.1 += 1;
            }
            None => {
                self.conversations
                    .insert(m.conversation_id.clone(), (m.seq, 1));
            }
        }
    }

    fn remove(&mut self, m: &StoredMessage) {
        if let Some(sent) = self.by_client_id.get_mut(&m.sender_id) {
            if sent.remove(m.client_msg_id.as_str()) {
                self.messages -= 1;
            }
            if sent.is_empty() {
                self.by_client_id.remove(&m.sender_id);
            }
        }
        if let Some(entry) = self.conversations.get_mut(&m.conversation_id) {
            entry.1 -= 1;
            if entry.1 == 0 {
                self.conversations.remove(&m.conversation_id);
            }
        }
    }
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        // A panic while holding it cannot leave the maps half-updated in a way that matters
        // more than stopping every write would.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After the applier's commit: forgets what SQLite now holds, deletes segments that are
    /// fully applied, and wakes readers waiting for `applied`.
    fn applied(&self, messages: &[Arc<StoredMessage>], applied: u64) {
        // In slices, releasing the lock between them: every append takes it, and a commit
        // of thousands of messages would otherwise hold the committer for its whole removal.
        for slice in messages.chunks(PENDING_REMOVAL_SLICE) {
            let mut pending = self.pending();
            for m in slice {
                pending.remove(m);
            }
        }
        self.applied.send_replace(applied);
        self.delete_applied_segments(applied);
    }

    /// Deletes the sealed segments whose batches are all among the first `applied`.
    fn delete_applied_segments(&self, applied: u64) {
        let mut done = Vec::new();
        {
            let mut pending = self.pending();
            while pending
                .sealed
                .front()
                .is_some_and(|(_, sealed_at)| *sealed_at <= applied)
            {
                done.extend(pending.sealed.pop_front().map(|(path, _)| path));
            }
        }
        for path in done {
            if let Err(err) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %err, "cannot delete an applied journal segment");
            }
        }
    }

    /// Makes the applier commit what it holds now instead of at the end of its interval.
    fn hurry_applier(&self) {
        self.hurry.store(true, Ordering::Release);
        if let Some(applier) = self.applier.get() {
            applier.unpark();
        }
    }

    /// Waits (at most [`SETTLE_TIMEOUT`]) until `done` holds, checked whenever the applier
    /// reports progress; `waiting_for` names what did not happen in the error.
    async fn wait_for_applier(
        &self,
        mut done: impl FnMut(u64) -> bool,
        waiting_for: &str,
    ) -> StoreResult<()> {
        let mut applied = self.applied.subscribe();
        if !done(*applied.borrow_and_update()) {
            self.hurry_applier();
        }
        match tokio::time::timeout(SETTLE_TIMEOUT, applied.wait_for(|&n| done(n))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(StoreError::Backend(
                "the journal applier has stopped".into(),
            )),
            Err(_) => Err(StoreError::Backend(format!(
                "the store is behind: {waiting_for} within {SETTLE_TIMEOUT:?}"
            ))),
        }
    }
}

/// One journaled batch on its way to the applier.
struct Batch {
    number: u64,
    messages: Vec<Arc<StoredMessage>>,
}

/// The writing end, held by one append (or group change) at a time.
pub(super) struct Appender {
    dir: PathBuf,
    file: File,
    segment: u64,
    segment_len: u64,
    /// A read-only connection of its own for the key and seq lookups: synchronous, so an
    /// append never waits for a pool's worker thread.
    lookup: rusqlite::Connection,
    fsync: bool,
    /// `None` once the store is closed; dropping it lets the applier finish and stop.
    to_applier: Option<mpsc::UnboundedSender<Batch>>,
    next_batch: u64,
    record: Vec<u8>,
    /// Set when a failed write could not be undone: the segment's end is unknown, so no
    /// more records may follow it.
    broken: Option<String>,
    /// Every (sender, client message id) stored, as a Bloom filter (false positives about
    /// 1 %, never a false negative): a new message whose pair it does not hold skips the
    /// SQLite lookup, which was a seventh of the server's time per message. Built at open;
    /// `None` past [`MAX_FILTERED_IDS`].
    stored_ids: Option<GrowableBloom>,
}

/// The journal of one SQLite store.
pub(super) struct Journal {
    appender: tokio::sync::Mutex<Appender>,
    shared: Arc<Shared>,
    /// Held until the store closes: one process journals into a directory at a time.
    lock: std::sync::Mutex<Option<File>>,
}

impl Journal {
    /// Opens the journal directory beside `db_path`, replays what it holds into SQLite, and
    /// starts the applier on a connection and thread of its own; `checkpointer` is woken
    /// after each of the applier's commits.
    pub(super) async fn open(
        db_path: &Path,
        fsync: bool,
        checkpointer: Arc<Checkpointer>,
    ) -> StoreResult<Self> {
        let mut dir = db_path.as_os_str().to_owned();
        dir.push(".journal");
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).map_err(backend)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .map_err(backend)?;
        lock.try_lock().map_err(|err| {
            StoreError::Backend(format!(
                "the journal {} is in use by another process: {err}",
                dir.display()
            ))
        })?;
        let applier_db = open_applier_connection(db_path, fsync)?;
        let lookup = rusqlite::Connection::open_with_flags(
            db_path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(backend)?;
        lookup
            .busy_timeout(Duration::from_secs(10))
            .map_err(backend)?;
        let (to_applier, batches) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            pending: std::sync::Mutex::new(Pending::default()),
            journaled: AtomicU64::new(0),
            applied: watch::Sender::new(0),
            hurry: AtomicBool::new(false),
            applier: OnceLock::new(),
            applier_commits: BusyTime::default(),
            applier_messages: AtomicU64::new(0),
        });
        // The applier's SQLite work takes a millisecond or more per transaction: on a
        // thread of its own it never holds up a runtime worker (and so no connection's
        // task), and its own connection keeps its prepared statements between commits.
        let (replayed, replay_done) = tokio::sync::oneshot::channel();
        let applying = shared.clone();
        let replay_dir = dir.clone();
        let applier = std::thread::Builder::new()
            .name("im-journal-applier".into())
            .spawn(move || {
                let next_segment = replay(&replay_dir, &applier_db);
                let ok = next_segment.is_ok();
                if replayed.send(next_segment).is_ok() && ok {
                    apply(&applying, &applier_db, &checkpointer, batches);
                }
            })
            .map_err(backend)?;
        let _ = shared.applier.set(applier.thread().clone());
        let next_segment = replay_done
            .await
            .map_err(|_| StoreError::Backend("the journal replay stopped".into()))??;
        let (file, segment_len) = create_segment(&dir, next_segment, fsync)?;
        let stored_ids = filter_of_stored_ids(&lookup)?;
        Ok(Self {
            appender: tokio::sync::Mutex::new(Appender {
                dir,
                file,
                segment: next_segment,
                segment_len,
                lookup,
                fsync,
                to_applier: Some(to_applier),
                next_batch: 0,
                record: Vec::new(),
                broken: None,
                stored_ids,
            }),
            shared,
            lock: std::sync::Mutex::new(Some(lock)),
        })
    }

    /// Assigns seqs, answers duplicates with their originals and journals the new messages
    /// in one record; returns once that record is durable.
    pub(super) async fn append(&self, batch: Vec<NewMessage>) -> StoreResult<Vec<Appended>> {
        self.wait_for_room().await?;
        let mut appender = self.appender.lock().await;
        if let Some(why) = &appender.broken {
            return Err(StoreError::Backend(why.clone()));
        }
        let (outcomes, fresh) = appender.assign(&self.shared, batch)?;
        if fresh.is_empty() {
            return Ok(outcomes);
        }
        appender.write(&fresh)?;
        for m in &fresh {
            appender.remember_stored(&m.sender_id, &m.client_msg_id);
        }
        {
            let mut pending = self.shared.pending();
            for m in &fresh {
                pending.insert(m);
            }
        }
        let number = appender.next_batch;
        appender.next_batch += 1;
        appender
            .to_applier
            .as_ref()
            .and_then(|applier| {
                applier
                    .send(Batch {
                        number,
                        messages: fresh,
                    })
                    .ok()
            })
            .ok_or_else(|| StoreError::Backend("the store is closed".into()))?;
        self.shared.journaled.store(number + 1, Ordering::Release);
        if appender.segment_len >= SEGMENT_BYTES {
            appender.rotate(&self.shared, number + 1)?;
        }
        Ok(outcomes)
    }

    /// Messages journaled but not yet in SQLite, and the applier's work so far.
    pub(super) fn stats(&self) -> StoreStats {
        let shared = &self.shared;
        StoreStats {
            pending_messages: shared.pending().messages as u64,
            applier_commits: shared.applier_commits.runs(),
            applier_messages: shared.applier_messages.load(Ordering::Relaxed),
            applier_seconds: shared.applier_commits.seconds(),
            ..StoreStats::default()
        }
    }

    /// Waits until SQLite holds every message journaled before this call.
    pub(super) async fn settled(&self) -> StoreResult<()> {
        let target = self.shared.journaled.load(Ordering::Acquire);
        if *self.shared.applied.borrow() >= target {
            return Ok(());
        }
        self.shared
            .wait_for_applier(
                |applied| applied >= target,
                "journaled messages were not written to SQLite",
            )
            .await
    }

    /// The appender, held, with nothing pending: for writes that assign seqs in SQLite
    /// itself (group changes).
    pub(super) async fn exclusive(&self) -> StoreResult<tokio::sync::MutexGuard<'_, Appender>> {
        let appender = self.appender.lock().await;
        self.settled().await?;
        Ok(appender)
    }

    /// Applies everything journaled, stops the applier and deletes the segments.
    pub(super) async fn close(&self) {
        let mut appender = self.appender.lock().await;
        let settled = self.settled().await;
        appender.to_applier = None;
        let release = || drop(self.lock.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Err(err) = settled {
            tracing::warn!(error = %err, "closing with journaled messages not yet in SQLite; they are replayed at the next open");
            release();
            return;
        }
        if appender.broken.is_none() {
            match list_segments(&appender.dir) {
                Ok(segments) => {
                    for (_, path) in segments {
                        let _ = std::fs::remove_file(path);
                    }
                }
                Err(err) => tracing::warn!(error = %err, "cannot list journal segments"),
            }
        }
        release();
    }

    /// Waits while [`MAX_PENDING_MESSAGES`] are journaled but not yet in SQLite.
    async fn wait_for_room(&self) -> StoreResult<()> {
        let has_room = || self.shared.pending().messages < MAX_PENDING_MESSAGES;
        if has_room() {
            return Ok(());
        }
        self.shared
            .wait_for_applier(
                |_| has_room(),
                &format!("{MAX_PENDING_MESSAGES} journaled messages were not written to SQLite"),
            )
            .await
    }
}

impl Appender {
    /// Decides each message of `batch`: a duplicate (of this batch, of a pending message or
    /// of a stored one) or new with its conversation's next seq. A new message's strings
    /// move into the stored message, which its outcome shares.
    fn assign(
        &mut self,
        shared: &Shared,
        batch: Vec<NewMessage>,
    ) -> StoreResult<(Vec<Appended>, Vec<Arc<StoredMessage>>)> {
        let decisions = self.decide_in_snapshot(shared, &batch)?;
        let mut outcomes: Vec<Appended> = Vec::with_capacity(batch.len());
        let mut fresh: Vec<Arc<StoredMessage>> = Vec::with_capacity(batch.len());
        for (msg, decision) in batch.into_iter().zip(decisions) {
            let outcome = match decision {
                Decision::New(seq) => {
                    let stored = Arc::new(msg.into_stored(seq));
                    fresh.push(stored.clone());
                    Appended::New(stored)
                }
                Decision::Duplicate(original) => Appended::Duplicate(original),
                // The first is earlier in the batch and new.
                Decision::RepeatOf(first) => {
                    let (Appended::New(original) | Appended::Duplicate(original)) =
                        &outcomes[first];
                    Appended::Duplicate(original.clone())
                }
            };
            outcomes.push(outcome);
        }
        Ok((outcomes, fresh))
    }

    /// Decides `batch` against the pending messages and, in one read snapshot, SQLite.
    fn decide_in_snapshot(
        &mut self,
        shared: &Shared,
        batch: &[NewMessage],
    ) -> StoreResult<Vec<Decision>> {
        // Pending first, then SQLite in one read snapshot taken after: the applier forgets
        // a message only after its commit, so one in neither place was never stored.
        let (pending_originals, pending_lasts) = {
            let pending = shared.pending();
            let originals: Vec<Option<Arc<StoredMessage>>> = batch
                .iter()
                .map(|m| pending.original(&m.sender_id, &m.client_msg_id).cloned())
                .collect();
            let lasts: HashMap<&str, u64> = batch
                .iter()
                .filter_map(|m| {
                    let entry = pending.conversations.get(&m.conversation_id)?;
                    Some((m.conversation_id.as_str(), entry.0))
                })
                .collect();
            (originals, lasts)
        };
        // Prepared once: parsing "BEGIN" and "COMMIT" anew cost a quarter of this lookup.
        let run = |sql: &str| {
            self.lookup
                .prepare_cached(sql)
                .and_then(|mut statement| statement.execute([]))
        };
        run("BEGIN").map_err(backend)?;
        let decided = self.decide(batch, pending_originals, pending_lasts);
        // Read-only: this only ends the snapshot.
        if let Err(err) = run("COMMIT") {
            tracing::warn!(error = %err, "ending the journal's lookup snapshot failed");
        }
        decided
    }

    /// [`Self::assign`] once pending messages and seqs are known: each message in order, a
    /// repeat inside the batch answered with its first.
    fn decide<'b>(
        &self,
        batch: &'b [NewMessage],
        pending_originals: Vec<Option<Arc<StoredMessage>>>,
        mut last_seqs: HashMap<&'b str, u64>,
    ) -> StoreResult<Vec<Decision>> {
        let mut decisions: Vec<Decision> = Vec::with_capacity(batch.len());
        let mut in_batch: HashMap<(&str, &str), usize> = HashMap::new();
        for (msg, pending_original) in batch.iter().zip(pending_originals) {
            let key = (msg.sender_id.as_str(), msg.client_msg_id.as_str());
            if let Some(&first) = in_batch.get(&key) {
                decisions.push(Decision::RepeatOf(first));
                continue;
            }
            if let Some(original) = pending_original {
                decisions.push(Decision::Duplicate(original));
                continue;
            }
            if self.may_be_stored(msg)
                && let Some(original) = self.stored_original(msg)?
            {
                decisions.push(Decision::Duplicate(Arc::new(original)));
                continue;
            }
            let last = match last_seqs.get_mut(msg.conversation_id.as_str()) {
                Some(last) => last,
                None => {
                    let last = self.stored_last_seq(&msg.conversation_id)?;
                    last_seqs
                        .entry(msg.conversation_id.as_str())
                        .or_insert(last)
                }
            };
            *last += 1;
            in_batch.insert(key, decisions.len());
            decisions.push(Decision::New(*last));
        }
        Ok(decisions)
    }

    /// Whether `msg`'s (sender, client message id) may be in SQLite already.
    fn may_be_stored(&self, msg: &NewMessage) -> bool {
        self.stored_ids
            .as_ref()
            .is_none_or(|ids| ids.contains((msg.sender_id.as_str(), msg.client_msg_id.as_str())))
    }

    /// Records that a message of `sender_id` with `client_msg_id` is stored (journaled, or
    /// written to SQLite by a group change).
    pub(super) fn remember_stored(&mut self, sender_id: &str, client_msg_id: &str) {
        if let Some(ids) = &mut self.stored_ids {
            ids.insert((sender_id, client_msg_id));
            if ids.len() > MAX_FILTERED_IDS {
                tracing::info!(
                    limit = MAX_FILTERED_IDS,
                    "more stored messages than the journal filters; every new message is now looked up in SQLite"
                );
                self.stored_ids = None;
            }
        }
    }

    fn stored_original(&self, msg: &NewMessage) -> StoreResult<Option<StoredMessage>> {
        // Built once: this runs for every new message, and the statement cache is keyed by
        // the text.
        static FIND_ORIGINAL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE sender_id = ?1 AND client_msg_id = ?2"
            )
        });
        let mut find = self
            .lookup
            .prepare_cached(&FIND_ORIGINAL)
            .map_err(backend)?;
        find.query_row(
            params![msg.sender_id, msg.client_msg_id],
            raw_writes::stored_from_row,
        )
        .optional()
        .map_err(backend)
    }

    fn stored_last_seq(&self, conversation_id: &str) -> StoreResult<u64> {
        let mut find = self
            .lookup
            .prepare_cached("SELECT last_seq FROM conversations WHERE conversation_id = ?1")
            .map_err(backend)?;
        let last: Option<i64> = find
            .query_row(params![conversation_id], |row| row.get(0))
            .optional()
            .map_err(backend)?;
        Ok(last.unwrap_or(0) as u64)
    }

    /// Writes one record of `messages`, durable when this returns; a failed write is cut
    /// off again so the next record follows the last good one.
    fn write(&mut self, messages: &[Arc<StoredMessage>]) -> StoreResult<()> {
        self.record.clear();
        encode_record(messages, &mut self.record)?;
        let written = self.file.write_all(&self.record).and_then(|()| {
            if self.fsync {
                sync_blocking(&self.file)
            } else {
                Ok(())
            }
        });
        match written {
            Ok(()) => {
                self.segment_len += self.record.len() as u64;
                Ok(())
            }
            Err(err) => {
                if let Err(undo) = self.file.set_len(self.segment_len) {
                    let why = format!(
                        "journal segment {} is damaged (a failed write could not be cut off: {undo}); restart the server to replay it",
                        self.segment
                    );
                    tracing::error!(error = %err, "{why}");
                    self.broken = Some(why);
                }
                Err(StoreError::Backend(format!("journal write failed: {err}")))
            }
        }
    }

    /// Seals the current segment (deleted once `sealed_at` batches are applied) and starts
    /// the next.
    fn rotate(&mut self, shared: &Shared, sealed_at: u64) -> StoreResult<()> {
        let (file, len) = create_segment(&self.dir, self.segment + 1, self.fsync)?;
        let old = segment_path(&self.dir, self.segment);
        self.file = file;
        self.segment += 1;
        self.segment_len = len;
        shared.pending().sealed.push_back((old, sealed_at));
        // The applier may have finished the sealed batches already.
        let applied = *shared.applied.borrow();
        shared.delete_applied_segments(applied);
        Ok(())
    }
}

/// The filter of every (sender, client message id) in SQLite, read from its index at open
/// (about a second per million messages); `None` when there are more than
/// [`MAX_FILTERED_IDS`].
fn filter_of_stored_ids(db: &rusqlite::Connection) -> StoreResult<Option<GrowableBloom>> {
    let stored: i64 = db
        .query_row("SELECT COUNT(*) FROM messages", [], |row| row.get(0))
        .map_err(backend)?;
    let stored = usize::try_from(stored).unwrap_or(usize::MAX);
    if stored > MAX_FILTERED_IDS {
        return Ok(None);
    }
    let mut ids = GrowableBloom::new(0.01, stored.max(100_000));
    let mut pairs = db
        .prepare("SELECT sender_id, client_msg_id FROM messages INDEXED BY messages_by_client_id")
        .map_err(backend)?;
    let mut rows = pairs.query([]).map_err(backend)?;
    while let Some(row) = rows.next().map_err(backend)? {
        let text = |i: usize| row.get_ref(i).and_then(|v| v.as_str().map_err(Into::into));
        ids.insert((text(0).map_err(backend)?, text(1).map_err(backend)?));
    }
    Ok(Some(ids))
}

/// `fdatasync`, off the async worker when the runtime allows it (it takes milliseconds).
fn sync_blocking(file: &File) -> std::io::Result<()> {
    if super::on_multi_threaded_runtime() {
        tokio::task::block_in_place(|| file.sync_data())
    } else {
        file.sync_data()
    }
}

fn create_segment(dir: &Path, number: u64, fsync: bool) -> StoreResult<(File, u64)> {
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(segment_path(dir, number))
        .map_err(backend)?;
    file.write_all(SEGMENT_MAGIC).map_err(backend)?;
    if fsync {
        file.sync_all().map_err(backend)?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(backend)?;
    }
    Ok((file, SEGMENT_MAGIC.len() as u64))
}

/// The applier's connection to the database: a second writer beside sqlx's, so its
/// transactions begin `IMMEDIATE` and wait (busy timeout) while the other writes.
fn open_applier_connection(db_path: &Path, fsync: bool) -> StoreResult<rusqlite::Connection> {
    let db = rusqlite::Connection::open(db_path).map_err(backend)?;
    db.busy_timeout(APPLIER_BUSY_TIMEOUT).map_err(backend)?;
    db.execute_batch(&format!(
        "PRAGMA synchronous = {}; PRAGMA wal_autocheckpoint = 0; PRAGMA temp_store = memory; \
         PRAGMA cache_size = -16000;",
        if fsync { "FULL" } else { "NORMAL" }
    ))
    .map_err(backend)?;
    Ok(db)
}

/// Replays every segment into SQLite and deletes it; returns the number for the next one.
fn replay(dir: &Path, db: &rusqlite::Connection) -> StoreResult<u64> {
    let segments = list_segments(dir)?;
    let next = segments.last().map_or(1, |(number, _)| number + 1);
    for (_, path) in &segments {
        let bytes = std::fs::read(path).map_err(backend)?;
        let (messages, damaged) = decode_segment(&bytes);
        if damaged {
            tracing::warn!(path = %path.display(), "journal segment ends in a cut-short record (a crash mid-write); replaying the records before it");
        }
        let messages: Vec<Arc<StoredMessage>> = messages.into_iter().map(Arc::new).collect();
        let mut written = 0;
        for chunk in messages.chunks(REPLAY_CHUNK) {
            written += raw_writes::persist_sequenced(db, chunk)?;
        }
        if written > 0 {
            tracing::info!(path = %path.display(), messages = written, "replayed journaled messages into SQLite");
        }
    }
    for (_, path) in &segments {
        std::fs::remove_file(path).map_err(backend)?;
    }
    Ok(next)
}

/// How long the applier's connection waits for a lock held elsewhere (another writer's
/// transaction) before its transaction fails.
const APPLIER_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a WAL restart waits for a checkpoint or a reader in progress before it gives up
/// (the applier applies nothing while it waits).
const WAL_RESTART_WAIT: Duration = Duration::from_millis(20);

/// After a restart gave up, the applier waits this long before trying again, doubling
/// the wait after each further try that gives up, up to [`RESTART_RETRY_MAX`]: a reader
/// that holds its snapshot for long would otherwise cost the applier a 20 ms wait after
/// every commit.
const RESTART_RETRY_FIRST: Duration = Duration::from_millis(100);
const RESTART_RETRY_MAX: Duration = Duration::from_secs(5);

/// How long restarts may keep giving up before the applier warns that the WAL grows.
const RESTART_BLOCKED_WARNING: Duration = Duration::from_secs(60);

/// What one try to restart the WAL came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RestartOutcome {
    Restarted,
    /// A checkpoint or a reader's snapshot was in the way for the whole wait.
    GaveUp,
}

/// When the applier may try to restart the WAL again, and since when tries give up.
struct RestartRetry {
    not_before: Option<Instant>,
    wait: Duration,
    giving_up_since: Option<Instant>,
    warned: bool,
}

impl RestartRetry {
    fn new() -> Self {
        Self {
            not_before: None,
            wait: RESTART_RETRY_FIRST,
            giving_up_since: None,
            warned: false,
        }
    }

    fn due(&self, now: Instant) -> bool {
        self.not_before.is_none_or(|at| now >= at)
    }

    fn record(&mut self, outcome: RestartOutcome, now: Instant) {
        match outcome {
            RestartOutcome::Restarted => {
                if self.warned {
                    tracing::info!("the WAL was restarted again after a long wait");
                }
                *self = Self::new();
            }
            RestartOutcome::GaveUp => {
                self.not_before = Some(now + self.wait);
                self.wait = (self.wait * 2).min(RESTART_RETRY_MAX);
                let since = *self.giving_up_since.get_or_insert(now);
                if !self.warned && now.duration_since(since) >= RESTART_BLOCKED_WARNING {
                    self.warned = true;
                    tracing::warn!(
                        blocked_for_s = now.duration_since(since).as_secs(),
                        "the WAL cannot be restarted: a reader (or a long checkpoint) keeps \
                         its snapshot, so the WAL file grows until it lets go"
                    );
                }
            }
        }
    }
}

/// Restarts the WAL between two of the applier's transactions: copies the frames the
/// checkpointer's passes have not and lets the next commit write the log from its start.
fn restart_wal(db: &rusqlite::Connection, checkpointer: &Checkpointer) -> RestartOutcome {
    let started = Instant::now();
    let outcome = db.busy_timeout(WAL_RESTART_WAIT).and_then(|()| {
        db.query_row("PRAGMA wal_checkpoint(RESTART)", [], |row| {
            row.get::<_, i64>(0)
        })
    });
    if let Err(err) = db.busy_timeout(APPLIER_BUSY_TIMEOUT) {
        tracing::warn!(error = %err, "restoring the applier's busy timeout failed");
    }
    match outcome {
        Ok(0) => {
            checkpointer.restarted(started.elapsed());
            RestartOutcome::Restarted
        }
        Ok(_) => {
            checkpointer.restart_gave_up(started.elapsed());
            RestartOutcome::GaveUp
        }
        Err(err) => {
            tracing::warn!(error = %err, "restarting the WAL failed; trying again later");
            checkpointer.restart_gave_up(started.elapsed());
            RestartOutcome::GaveUp
        }
    }
}

/// The applier: writes journaled batches into SQLite in order, several per transaction,
/// until the appender is dropped or closed. Blocking; runs on its own thread.
fn apply(
    shared: &Shared,
    db: &rusqlite::Connection,
    checkpointer: &Checkpointer,
    mut batches: mpsc::UnboundedReceiver<Batch>,
) {
    let mut taken: Vec<Batch> = Vec::new();
    let mut last_commit = Instant::now();
    let mut restart_retry = RestartRetry::new();
    while let Some(first) = batches.blocking_recv() {
        let mut taken_messages = first.messages.len();
        taken.push(first);
        // Gather until the interval since the last commit is over, the transaction is
        // full, or a reader waits (`hurry_applier`, which also unparks this thread).
        let due = last_commit + APPLY_INTERVAL;
        loop {
            // Read before draining: a waiter queues its batch before it hurries us.
            let hurried = shared.hurry.swap(false, Ordering::AcqRel);
            while taken_messages < APPLY_MAX_MESSAGES {
                match batches.try_recv() {
                    Ok(batch) => {
                        taken_messages += batch.messages.len();
                        taken.push(batch);
                    }
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            if hurried || taken_messages >= APPLY_MAX_MESSAGES || now >= due {
                break;
            }
            std::thread::park_timeout(due - now);
        }
        last_commit = Instant::now();
        let applied = taken.last().map_or(0, |b| b.number + 1);
        let messages: Vec<Arc<StoredMessage>> = taken
            .drain(..)
            .flat_map(|b| b.messages.into_iter())
            .collect();
        let mut backoff = Duration::from_millis(50);
        // The busy time is the transaction that succeeded, not the waits before retries.
        let took = loop {
            let started = Instant::now();
            match raw_writes::persist_sequenced(db, &messages) {
                Ok(_) => break started.elapsed(),
                Err(err) => {
                    tracing::error!(error = %err, messages = messages.len(), "cannot write journaled messages to SQLite; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        };
        shared.applier_commits.record(took);
        shared
            .applier_messages
            .fetch_add(messages.len() as u64, Ordering::Relaxed);
        // Readers waiting for these messages go first; then a restart, if one is due, copies
        // what the checkpointer has not (a passive pass beside it would only be in its way).
        shared.applied(&messages, applied);
        if checkpointer.restart_wanted() && restart_retry.due(Instant::now()) {
            let outcome = restart_wal(db, checkpointer);
            restart_retry.record(outcome, Instant::now());
        } else {
            checkpointer.committed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(conversation: &str, seq: u64, client_id: &str) -> Arc<StoredMessage> {
        Arc::new(StoredMessage {
            conversation_id: conversation.into(),
            seq,
            server_msg_id: format!("srv-{conversation}-{seq}"),
            sender_id: "alice".into(),
            sender_device_id: "phone".into(),
            recipient_id: "bob".into(),
            client_msg_id: client_id.into(),
            body: Bytes::from(format!("body {seq}")),
            content_type: "text/plain".into(),
            server_time_ms: 1_000 + seq as i64,
        })
    }

    #[test]
    fn records_round_trip_and_a_cut_short_tail_is_dropped() {
        let first = vec![message("c1", 1, "a"), message("c1", 2, "b")];
        let second = vec![message("c2", 1, "c")];
        let mut bytes = SEGMENT_MAGIC.to_vec();
        encode_record(&first, &mut bytes).unwrap();
        encode_record(&second, &mut bytes).unwrap();
        let whole = bytes.clone();
        let (messages, damaged) = decode_segment(&whole);
        assert!(!damaged);
        let expected: Vec<StoredMessage> = first
            .iter()
            .chain(&second)
            .map(|m| m.as_ref().clone())
            .collect();
        assert_eq!(messages, expected);

        // Every cut inside the second record keeps exactly the first.
        let first_end = {
            let mut b = SEGMENT_MAGIC.to_vec();
            encode_record(&first, &mut b).unwrap();
            b.len()
        };
        for cut in first_end + 1..whole.len() {
            let (messages, damaged) = decode_segment(&whole[..cut]);
            assert!(damaged, "cut at {cut}");
            assert_eq!(messages.len(), 2, "cut at {cut}");
        }
        // A flipped byte in the payload fails the checksum.
        let mut flipped = whole.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x55;
        let (messages, damaged) = decode_segment(&flipped);
        assert!(damaged);
        assert_eq!(messages.len(), 2);
        // Not a segment at all.
        let (messages, damaged) = decode_segment(b"garbage!");
        assert!(damaged && messages.is_empty());
    }

    fn new_message(conversation: &str, client_id: &str) -> NewMessage {
        NewMessage {
            conversation_id: conversation.into(),
            sender_id: "alice".into(),
            sender_device_id: "phone".into(),
            recipient_id: "bob".into(),
            client_msg_id: client_id.into(),
            body: Bytes::from_static(b"hello"),
            content_type: "text/plain".into(),
            server_msg_id: format!("srv-{client_id}"),
            server_time_ms: 5_000,
        }
    }

    fn seqs(messages: &[StoredMessage]) -> Vec<u64> {
        messages.iter().map(|m| m.seq).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_a_crash_left_in_the_journal_is_replayed_at_open() {
        use crate::Store;
        use crate::sqlite::{SqliteOptions, SqliteStore};
        let (dir, path, store) = crate::sqlite::tests::open_temp().await;
        let first = store
            .append_messages(&[new_message("c1", "m1")])
            .await
            .unwrap();
        assert_eq!(first[0].message().seq, 1);
        store.close().await;
        drop(store);

        // A crash leaves a segment whose first message SQLite already has, two it does
        // not, and a last record cut short mid-write.
        let mut bytes = SEGMENT_MAGIC.to_vec();
        encode_record(
            &[message("c1", 1, "m1"), message("c1", 2, "m2")],
            &mut bytes,
        )
        .unwrap();
        encode_record(
            &[message("c1", 3, "m3"), message("c2", 1, "m4")],
            &mut bytes,
        )
        .unwrap();
        let intact = bytes.len();
        encode_record(&[message("c1", 4, "m5")], &mut bytes).unwrap();
        bytes.truncate(intact + RECORD_HEADER + 3);
        let journal_dir = dir.path().join("im.db.journal");
        std::fs::write(segment_path(&journal_dir, 7), &bytes).unwrap();

        let store = SqliteStore::open(&path, SqliteOptions::default())
            .await
            .unwrap();
        let c1 = store.messages_after("c1", 0, 100).await.unwrap();
        assert_eq!(seqs(&c1), vec![1, 2, 3]);
        assert_eq!(c1[0].server_msg_id, "srv-m1", "the stored message is kept");
        assert_eq!(c1[1].body, Bytes::from("body 2"));
        assert_eq!(store.last_seq("c2").await.unwrap(), 1);
        assert!(store.is_member("bob", "c2").await.unwrap());
        // The replayed segment is gone; the journal goes on in the next one.
        let segments: Vec<u64> = list_segments(&journal_dir)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(segments, vec![8]);
        // Seqs and duplicates continue from the replayed messages.
        let next = store
            .append_messages(&[new_message("c1", "m2"), new_message("c1", "m6")])
            .await
            .unwrap();
        assert!(matches!(&next[0], Appended::Duplicate(m) if m.seq == 2));
        assert!(matches!(&next[1], Appended::New(m) if m.seq == 4));
        store.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_see_every_acknowledged_message_and_seqs_stay_gapless() {
        use crate::Store;
        use crate::sqlite::{SqliteOptions, SqliteStore};
        let (_dir, path, store) = crate::sqlite::tests::open_temp().await;
        for round in 0..200u64 {
            let batch: Vec<NewMessage> = (0..(round % 7 + 1))
                .map(|n| new_message(&format!("c{}", n % 3), &format!("r{round}-{n}")))
                .collect();
            let appended = store.append_messages(&batch).await.unwrap();
            // Straight after the ack, a read sees the message.
            let last = appended.last().unwrap().message();
            let after = store
                .messages_after(&last.conversation_id, last.seq - 1, 10)
                .await
                .unwrap();
            assert_eq!(after[0].client_msg_id, last.client_msg_id);
        }
        for c in ["c0", "c1", "c2"] {
            let all = store.messages_after(c, 0, 10_000).await.unwrap();
            let expected: Vec<u64> = (1..=all.len() as u64).collect();
            assert_eq!(seqs(&all), expected, "{c}");
            assert_eq!(store.last_seq(c).await.unwrap(), all.len() as u64);
        }
        // A second process (or store) cannot journal into the same directory meanwhile.
        let Err(err) = SqliteStore::open(&path, SqliteOptions::default()).await else {
            panic!("a second open of a store in use succeeded");
        };
        assert!(err.to_string().contains("in use"), "{err}");
        store.close().await;
        // Closing releases it.
        SqliteStore::open(&path, SqliteOptions::default())
            .await
            .unwrap()
            .close()
            .await;
    }
}
