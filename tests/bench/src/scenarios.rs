//! The scenarios against our server: 1:1 round trip, group fan-out, durable sends at fixed rates and at saturation.

use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::FutureExt;
use im_client::{Client, Event, v1};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::server::ImServer;
use crate::stats::{
    CpuMeter, CpuUsage, FanoutResult, Latency, LatencySamples, LatencySummary, RttResult,
    RttSamples, age_at, payload, sleep_until, stamp,
};

/// How long to wait for stragglers after the last send.
const DRAIN: Duration = Duration::from_secs(5);

/// A fan-out receiver that heard nothing for this long after its first delivery gives up.
const FANOUT_IDLE_LIMIT: Duration = Duration::from_secs(10);

/// The i-th of `rate`-per-second scheduled sends after `start`.
fn scheduled(start: Instant, i: u64, rate: u64) -> Instant {
    start + Duration::from_nanos(i * 1_000_000_000 / rate.max(1))
}

/// Connects `count` clients named `<prefix><n>`, 50 at a time.
async fn connect_many(
    server: &ImServer,
    prefix: &str,
    count: usize,
) -> anyhow::Result<Vec<(Client, im_client::Events)>> {
    let mut clients = Vec::with_capacity(count);
    for chunk in (0..count).collect::<Vec<_>>().chunks(50) {
        let mut connecting = JoinSet::new();
        for n in chunk {
            let config = server.client_config("tcp", &format!("{prefix}{n}"))?;
            let n = *n;
            connecting.spawn(async move { (n, Client::connect(config).await) });
        }
        let mut batch = Vec::new();
        while let Some(joined) = connecting.join_next().await {
            let (n, client) = joined?;
            batch.push((
                n,
                client.with_context(|| format!("{prefix}{n} could not connect"))?,
            ));
        }
        batch.sort_by_key(|(n, _)| *n);
        clients.extend(batch.into_iter().map(|(_, c)| c));
    }
    Ok(clients)
}

/// A sends to B at `rate` per second; B's client answers every message; A records the
/// round trip from each message's scheduled send time.
pub async fn rtt(
    server: &ImServer,
    rate: u64,
    duration: Duration,
    body: usize,
) -> anyhow::Result<RttResult> {
    let tag = stamp(Instant::now());
    let (a_name, b_name) = (format!("rtt-a-{tag}"), format!("rtt-b-{tag}"));
    let (a, mut a_events) = server.client(&a_name).await?;
    let (b, mut b_events) = server.client(&b_name).await?;
    let total = rate * duration.as_secs();
    let echo_to = a_name.clone();
    let echo = tokio::spawn(async move {
        while let Some(event) = b_events.next().await {
            if let Event::Message(m) = event {
                // The answer is queued, not awaited: B keeps reading.
                let id = b.new_client_msg_id();
                if b.queue_send(&echo_to, &id, m.body, "").await.is_err() {
                    break;
                }
            }
        }
    });
    let receiver = tokio::spawn(async move {
        let mut latency = Latency::new();
        let mut samples = RttSamples::default();
        let deadline = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(deadline);
        while latency.count() < total {
            tokio::select! {
                event = a_events.next() => match event {
                    Some(Event::Message(m)) => {
                        if let Some(took) = age_at(&m.body, Instant::now()) {
                            latency.record(took);
                            samples.record(&m.body, took);
                        }
                    }
                    Some(_) => {}
                    None => break,
                },
                _ = &mut deadline => break,
            }
        }
        (latency, samples)
    });
    let meter = CpuMeter::start(server.pid);
    let start = Instant::now() + Duration::from_millis(50);
    for i in 0..total {
        let at = scheduled(start, i, rate);
        sleep_until(at).await;
        let id = a.new_client_msg_id();
        // The ack is not awaited: the schedule is open loop.
        drop(a.queue_send(&b_name, &id, payload(at, body), "").await?);
    }
    let (latency, samples) = match tokio::time::timeout(DRAIN, receiver).await {
        Ok(done) => done?,
        Err(_) => anyhow::bail!("round trips did not finish within {DRAIN:?} of the last send"),
    };
    let cpu = meter.finish();
    echo.abort();
    a.close().await;
    Ok(RttResult {
        offered_per_s: rate,
        completed: latency.count(),
        lost: total - latency.count(),
        latency: latency.summary(),
        cpu,
        samples,
    })
}

/// One sender to a group of `members` online members, at `rate` messages per second.
pub async fn fanout(
    server: &ImServer,
    members: usize,
    rate: u64,
    duration: Duration,
    body: usize,
) -> anyhow::Result<FanoutResult> {
    let tag = stamp(Instant::now());
    let prefix = format!("fan-{tag}-");
    let mut clients = connect_many(server, &prefix, members).await?;
    let (owner, _owner_events) = clients.remove(0);
    let names: Vec<String> = (1..members).map(|n| format!("{prefix}{n}")).collect();
    let group = format!("fan{tag}");
    let first: Vec<&str> = names.iter().take(499).map(String::as_str).collect();
    owner.create_group(&group, "bench", &first).await?;
    for chunk in names[first.len()..].chunks(500) {
        owner
            .group_request(v1::GroupRequest {
                group_id: group.clone(),
                action: Some(v1::group_request::Action::Invite(v1::GroupUsers {
                    user_ids: chunk.to_vec(),
                })),
            })
            .await?;
    }
    let expected_each = rate * duration.as_secs();
    let mut receivers = JoinSet::new();
    let conversation = im_client::ids::group_conversation_id(&group);
    for (_client, mut events) in clients {
        let conversation = conversation.clone();
        // Per delivery a receiver only reads the clock once and appends a sample: no timer
        // (the idle limit is one sleep, moved only when it fires) and no shared counter.
        receivers.spawn(async move {
            let _client = _client;
            let mut samples = LatencySamples::default();
            let mut last_heard: Option<Instant> = None;
            let idle = tokio::time::sleep(FANOUT_IDLE_LIMIT);
            tokio::pin!(idle);
            while samples.count() < expected_each {
                tokio::select! {
                    biased;
                    event = events.next() => match event {
                        Some(Event::Message(m)) if m.conversation_id == conversation => {
                            let now = Instant::now();
                            if let Some(took) = age_at(&m.body, now) {
                                samples.record(took);
                                last_heard = Some(now);
                            }
                        }
                        Some(_) => {}
                        None => break,
                    },
                    () = &mut idle, if last_heard.is_some() => {
                        let quiet_since = last_heard.unwrap_or_else(Instant::now);
                        if quiet_since.elapsed() >= FANOUT_IDLE_LIMIT {
                            break;
                        }
                        idle.as_mut().reset((quiet_since + FANOUT_IDLE_LIMIT).into());
                    }
                }
            }
            (samples, last_heard)
        });
    }
    let meter = CpuMeter::start(server.pid);
    let start = Instant::now() + Duration::from_millis(100);
    let target = v1::send_request::Target::ToGroup(group.clone());
    for i in 0..expected_each {
        let at = scheduled(start, i, rate);
        sleep_until(at).await;
        let id = owner.new_client_msg_id();
        drop(
            owner
                .queue_send_to(target.clone(), &id, payload(at, body), "")
                .await?,
        );
    }
    let mut latency = Latency::new();
    let mut last_delivery = start;
    while let Some(done) = receivers.join_next().await {
        let (samples, last_heard) = done?;
        latency.record_samples(&samples);
        last_delivery = last_delivery.max(last_heard.unwrap_or(start));
    }
    let cpu = meter.finish();
    let deliveries = latency.count();
    let span = last_delivery.saturating_duration_since(start);
    owner.close().await;
    Ok(FanoutResult {
        subscribers: members - 1,
        offered_msgs_per_s: rate,
        expected: expected_each * (members as u64 - 1),
        deliveries,
        deliveries_per_s: deliveries as f64 / span.as_secs_f64().max(1e-9),
        latency: latency.summary(),
        cpu,
    })
}

/// Durable sends at a fixed total rate: `senders` clients each send to an offline user;
/// latency is from the scheduled send to the ack (which comes only after the commit).
#[derive(Debug, Clone, Serialize)]
pub struct DurableResult {
    pub offered_per_s: u64,
    pub acked: u64,
    /// Sends answered with an error or not answered in time (not in the latencies).
    pub failed: u64,
    pub acked_per_s: f64,
    pub ack_latency: LatencySummary,
    pub cpu: CpuUsage,
}

/// A connection that sends durable messages and learns when each one is stored: one of our
/// clients, or a JetStream publisher (peers.rs).
pub trait DurableSender: Send + 'static {
    /// Resolves once the system has acknowledged the message as stored.
    type Ack: Future<Output = anyhow::Result<()>> + Send + 'static;

    /// Sends one message of `body` bytes stamped with `at`.
    fn send(
        &self,
        at: Instant,
        body: usize,
    ) -> impl Future<Output = anyhow::Result<Self::Ack>> + Send;

    fn close(self) -> impl Future<Output = ()> + Send;
}

/// One of our clients sending to an offline user.
pub struct ImDurableSender {
    client: Client,
    to: String,
}

impl DurableSender for ImDurableSender {
    type Ack = futures_util::future::Map<
        im_client::PendingAck,
        fn(Result<v1::SendAck, im_client::ClientError>) -> anyhow::Result<()>,
    >;

    async fn send(&self, at: Instant, body: usize) -> anyhow::Result<Self::Ack> {
        let id = self.client.new_client_msg_id();
        let ack = self
            .client
            .queue_send(&self.to, &id, payload(at, body), "")
            .await?;
        Ok(ack.map(stored as fn(_) -> _))
    }

    async fn close(self) {
        self.client.close().await;
    }
}

/// What a durable run's acks came to: their latencies, the sends that failed, and when the
/// last ack came.
struct AckTally {
    start: Instant,
    latency: Latency,
    failed: u64,
    last: Instant,
}

impl AckTally {
    fn new(start: Instant) -> Self {
        Self {
            start,
            latency: Latency::new(),
            failed: 0,
            last: start,
        }
    }

    /// Waits for the ack of a send made (or scheduled) at `at`.
    async fn settle<S: DurableSender>(&mut self, at: Instant, ack: S::Ack) {
        if ack.await.is_ok() {
            self.last = Instant::now();
            self.latency.record(self.last.saturating_duration_since(at));
        } else {
            self.failed += 1;
        }
    }

    /// The senders' tallies in one.
    async fn gather(
        start: Instant,
        mut tasks: JoinSet<anyhow::Result<AckTally>>,
    ) -> anyhow::Result<AckTally> {
        let mut all = AckTally::new(start);
        while let Some(done) = tasks.join_next().await {
            let one = done??;
            all.latency.merge(&one.latency);
            all.failed += one.failed;
            all.last = all.last.max(one.last);
        }
        Ok(all)
    }

    /// Acks per second from the start to the last ack.
    fn per_second(&self) -> f64 {
        let took = self.last.saturating_duration_since(self.start);
        self.latency.count() as f64 / took.as_secs_f64().max(1e-9)
    }
}

/// Our client's answer to a send, as a [`DurableSender::Ack`] resolves.
fn stored(answer: Result<v1::SendAck, im_client::ClientError>) -> anyhow::Result<()> {
    answer.map(drop).map_err(Into::into)
}

/// Prepares `senders` connected senders, each to its own recipient that exists but is
/// offline.
pub async fn durable_senders(
    server: &ImServer,
    senders: usize,
) -> anyhow::Result<Vec<ImDurableSender>> {
    let tag = stamp(Instant::now());
    let recipients = connect_many(server, &format!("dur-r-{tag}-"), senders).await?;
    for (client, _) in &recipients {
        client.close().await;
    }
    let clients = connect_many(server, &format!("dur-s-{tag}-"), senders).await?;
    Ok(clients
        .into_iter()
        .enumerate()
        .map(|(n, (client, _events))| ImDurableSender {
            client,
            to: format!("dur-r-{tag}-{n}"),
        })
        .collect())
}

/// Durable sends at `rate` in all, shared evenly by `senders`, open loop, for `duration`;
/// `pid` is the system's server process, whose CPU is measured.
pub async fn durable<S: DurableSender>(
    senders: Vec<S>,
    pid: u32,
    rate: u64,
    duration: Duration,
    body: usize,
) -> anyhow::Result<DurableResult> {
    let count = senders.len();
    anyhow::ensure!(count > 0, "durable sends need a sender");
    let per_sender = (rate / count as u64).max(1);
    let total_each = per_sender * duration.as_secs();
    let meter = CpuMeter::start(pid);
    let start = Instant::now() + Duration::from_millis(100);
    let mut tasks = JoinSet::new();
    for (n, sender) in senders.into_iter().enumerate() {
        // Offset each sender within the first interval so sends interleave evenly.
        let offset = Duration::from_nanos(n as u64 * 1_000_000_000 / rate.max(1));
        tasks.spawn(async move {
            let (acks_tx, mut acks) = mpsc::channel(1 << 16);
            let waiter = tokio::spawn(async move {
                let mut tally = AckTally::new(start);
                while let Some((at, ack)) = acks.recv().await {
                    tally.settle::<S>(at, ack).await;
                }
                tally
            });
            for i in 0..total_each {
                let at = scheduled(start + offset, i, per_sender);
                sleep_until(at).await;
                let ack = sender.send(at, body).await?;
                acks_tx.send((at, ack)).await.ok();
            }
            drop(acks_tx);
            let outcome = waiter.await?;
            sender.close().await;
            anyhow::Ok(outcome)
        });
    }
    let tally = AckTally::gather(start, tasks).await?;
    let cpu = meter.finish();
    Ok(DurableResult {
        offered_per_s: per_sender * count as u64,
        acked: tally.latency.count(),
        failed: tally.failed,
        acked_per_s: tally.per_second(),
        ack_latency: tally.latency.summary(),
        cpu,
    })
}

/// Saturation: every sender keeps `window` sends in flight for `duration`; how many
/// durable messages per second the server acknowledges.
#[derive(Debug, Clone, Serialize)]
pub struct SaturationResult {
    pub senders: usize,
    pub window: usize,
    pub acked: u64,
    /// Sends answered with an error or not answered in time (not in the latencies).
    pub failed: u64,
    pub acked_per_s: f64,
    pub ack_latency: LatencySummary,
    pub cpu: CpuUsage,
}

/// Saturation with these `senders`, each keeping `window` sends in flight; `pid` is the
/// system's server process.
pub async fn saturate<S: DurableSender>(
    senders: Vec<S>,
    pid: u32,
    window: usize,
    duration: Duration,
    body: usize,
) -> anyhow::Result<SaturationResult> {
    let count = senders.len();
    let meter = CpuMeter::start(pid);
    let start = Instant::now();
    let stop = start + duration;
    let mut tasks = JoinSet::new();
    for sender in senders {
        tasks.spawn(async move {
            let mut tally = AckTally::new(start);
            let mut in_flight = std::collections::VecDeque::with_capacity(window);
            while Instant::now() < stop || !in_flight.is_empty() {
                while in_flight.len() < window && Instant::now() < stop {
                    let at = Instant::now();
                    in_flight.push_back((at, sender.send(at, body).await?));
                }
                if let Some((at, ack)) = in_flight.pop_front() {
                    tally.settle::<S>(at, ack).await;
                }
            }
            // Closing is not part of the rate: the last ack ends this sender's run.
            sender.close().await;
            anyhow::Ok(tally)
        });
    }
    let tally = AckTally::gather(start, tasks).await?;
    let cpu = meter.finish();
    Ok(SaturationResult {
        senders: count,
        window,
        acked: tally.latency.count(),
        failed: tally.failed,
        acked_per_s: tally.per_second(),
        ack_latency: tally.latency.summary(),
        cpu,
    })
}
