//! The peers we compare with: starting mosquitto and nats-server, and the round-trip, fan-out and (JetStream) durable-send scenarios over their client libraries.

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::context::{Publish, PublishError};
use async_nats::jetstream::publish::PublishAck;
use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::try_join_all;
use futures_util::stream::{self, BoxStream, StreamExt};
use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, QoS};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::scenarios;
use crate::stats::{
    CpuMeter, FanoutResult, Latency, LatencySamples, RttResult, RttSamples, age_at, payload,
    sleep_until,
};

/// How long a peer may take to start listening.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an MQTT ConnAck or SubAck may take.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after its last send the round trip waits for outstanding echoes.
const RTT_DRAIN: Duration = Duration::from_secs(5);
/// How long after the last publish a fan-out subscriber waits for stragglers.
const FANOUT_GRACE: Duration = Duration::from_secs(10);
/// Subscribers connected at once, so the peer sees bursts of connects rather than a flood.
const CONNECT_BATCH: usize = 100;
/// Unacknowledged QoS 1 publishes per MQTT connection: enough that acks don't pace the sender.
const MQTT_INFLIGHT: u16 = 1000;
/// Requests queued between an MQTT client handle and its event loop.
const MQTT_REQUEST_CAPACITY: usize = 10_000;
/// Largest MQTT packet either way (rumqttc's default, 10 KiB, is below our bodies).
const MQTT_MAX_PACKET: usize = 1 << 20;
/// Messages a NATS subscription buffers before the client drops them as a slow consumer.
const NATS_SUBSCRIPTION_CAPACITY: usize = 1 << 18;
/// The JetStream stream that durable sends go to, and the prefix of the subjects it stores.
const DURABLE_STREAM: &str = "BENCH";
const DURABLE_SUBJECT_PREFIX: &str = "bench.durable";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum PeerKind {
    Mosquitto,
    Nats,
}

impl PeerKind {
    fn binary(self) -> &'static str {
        match self {
            PeerKind::Mosquitto => "mosquitto",
            PeerKind::Nats => "nats-server",
        }
    }
}

/// A peer broker running as a child process on 127.0.0.1; killed when dropped.
pub struct PeerServer {
    pub kind: PeerKind,
    pub port: u16,
    pub pid: u32,
    jetstream: bool,
    child: Child,
    /// Config, log and (for JetStream) store; removed after the child has exited.
    dir: tempfile::TempDir,
}

impl PeerServer {
    /// Starts the peer on a free port with its config in a fresh temp dir, and waits until it accepts TCP connections.
    pub fn start(kind: PeerKind, jetstream: bool) -> anyhow::Result<Self> {
        let port = free_port()?;
        let dir = tempfile::tempdir().context("creating the peer's temp dir")?;
        let mut command = match kind {
            PeerKind::Mosquitto => {
                let config = dir.path().join("mosquitto.conf");
                std::fs::write(&config, mosquitto_config(port))
                    .context("writing mosquitto.conf")?;
                let mut command =
                    crate::cpus::server_command(find_binary(kind.binary(), &["/usr/sbin"], &[])?);
                command.arg("-c").arg(&config);
                command
            }
            PeerKind::Nats => {
                let binary = find_binary(kind.binary(), &[], &["/usr/sbin", "/usr/bin"])?;
                let mut command = crate::cpus::server_command(binary);
                command
                    .args(["-a", "127.0.0.1", "-p"])
                    .arg(port.to_string());
                if jetstream {
                    command.arg("-js").arg("-sd").arg(dir.path());
                }
                command
            }
        };
        // The peer's output goes to a file so a failed start can say why.
        let log = File::create(dir.path().join("peer.log")).context("creating the peer's log")?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", kind.binary()))?;
        let mut server = Self {
            kind,
            port,
            pid: child.id(),
            jetstream,
            child,
            dir,
        };
        server.wait_until_listening()?;
        Ok(server)
    }

    /// A short statement of the durability setting.
    pub fn durability(&self) -> &'static str {
        match (self.kind, self.jetstream) {
            (PeerKind::Mosquitto, _) => "QoS 1, persistence off (in memory)",
            (PeerKind::Nats, false) => "core pub/sub, no persistence",
            (PeerKind::Nats, true) => "JetStream file store, default sync (every 2 min)",
        }
    }

    fn wait_until_listening(&mut self) -> anyhow::Result<()> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited at startup ({status}):\n{}",
                    self.kind.binary(),
                    self.log_tail()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} not listening on {addr} after {STARTUP_TIMEOUT:?}:\n{}",
                    self.kind.binary(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("peer.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nobody was listening on a moment ago (bound, read, released).
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

fn mosquitto_config(port: u16) -> String {
    // Unlimited inflight and a deep queue so the broker never drops or paces QoS 1 traffic.
    format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n\
         max_queued_messages 1000000\nmax_inflight_messages 0\nlog_dest none\n"
    )
}

/// The first `name` found in the `before` dirs, then on `PATH`, then in the `after` dirs.
fn find_binary(name: &str, before: &[&str], after: &[&str]) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    before
        .iter()
        .copied()
        .map(PathBuf::from)
        .chain(std::env::split_paths(&path))
        .chain(after.iter().copied().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .with_context(|| {
            format!(
                "{name} not found on PATH or in /usr/sbin, /usr/bin; install it to compare with it"
            )
        })
}

/// The topic (MQTT) or subject (NATS) called `name`.
fn topic(kind: PeerKind, name: &str) -> String {
    match kind {
        PeerKind::Mosquitto => format!("bench/{name}"),
        PeerKind::Nats => format!("bench.{name}"),
    }
}

/// A spawned task that is aborted when dropped, so an early `?` leaves nothing running.
struct Task<T>(JoinHandle<T>);

impl<T: Send + 'static> Task<T> {
    fn spawn(work: impl Future<Output = T> + Send + 'static) -> Self {
        Self(tokio::spawn(work))
    }

    async fn join(&mut self) -> anyhow::Result<T> {
        Ok((&mut self.0).await?)
    }
}

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What an MQTT event loop reports to its connection.
enum MqttEvent {
    Connected,
    Subscribed,
    Message(Bytes),
    Failed(String),
}

/// An MQTT connection whose event loop runs in its own task, so nothing the caller awaits can stall it.
struct MqttConn {
    client: AsyncClient,
    /// Taken by the one subscription a connection makes.
    events: Option<mpsc::UnboundedReceiver<MqttEvent>>,
    _poller: Task<()>,
}

impl MqttConn {
    async fn open(port: u16, role: &str) -> anyhow::Result<Self> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let mut options = MqttOptions::new(
            format!("im-bench-{}-{role}-{n}", std::process::id()),
            "127.0.0.1",
            port,
        );
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_inflight(MQTT_INFLIGHT)
            .set_request_channel_capacity(MQTT_REQUEST_CAPACITY)
            .set_max_packet_size(MQTT_MAX_PACKET, MQTT_MAX_PACKET);
        let (client, mut eventloop) = AsyncClient::new(options, MQTT_REQUEST_CAPACITY);
        // Without it Nagle holds each small publish until the previous segment is TCP-acked,
        // which would count as mosquitto's latency (its listener sets it too, in its config).
        let mut network = NetworkOptions::new();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let poller = Task::spawn(async move {
            loop {
                let event = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => MqttEvent::Connected,
                    Ok(Event::Incoming(Packet::SubAck(_))) => MqttEvent::Subscribed,
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        MqttEvent::Message(publish.payload)
                    }
                    Ok(_) => continue,
                    Err(error) => {
                        // Stop rather than reconnect: a dropped connection is a result, not noise.
                        let _ = events_tx.send(MqttEvent::Failed(error.to_string()));
                        break;
                    }
                };
                // A publish-only connection stops listening after ConnAck; keep polling anyway.
                let _ = events_tx.send(event);
            }
        });
        expect_event(&mut events, "ConnAck", |event| {
            matches!(event, MqttEvent::Connected)
        })
        .await?;
        Ok(Self {
            client,
            events: Some(events),
            _poller: poller,
        })
    }
}

/// Waits for the event `wanted` picks out, failing on a connection error or after `ACK_TIMEOUT`.
async fn expect_event(
    events: &mut mpsc::UnboundedReceiver<MqttEvent>,
    what: &str,
    wanted: impl Fn(&MqttEvent) -> bool,
) -> anyhow::Result<()> {
    let wait = async {
        while let Some(event) = events.recv().await {
            match event {
                MqttEvent::Failed(error) => {
                    bail!("MQTT connection failed awaiting {what}: {error}")
                }
                event if wanted(&event) => return Ok(()),
                _ => {}
            }
        }
        bail!("MQTT event loop ended awaiting {what}")
    };
    tokio::time::timeout(ACK_TIMEOUT, wait)
        .await
        .with_context(|| format!("no MQTT {what} within {ACK_TIMEOUT:?}"))?
}

/// One client connection to the peer.
enum Conn {
    Mqtt(MqttConn),
    Nats(async_nats::Client),
}

impl Conn {
    async fn open(peer: &PeerServer, role: &str) -> anyhow::Result<Self> {
        match peer.kind {
            PeerKind::Mosquitto => Ok(Conn::Mqtt(
                MqttConn::open(peer.port, role)
                    .await
                    .with_context(|| format!("connecting {role} to mosquitto"))?,
            )),
            PeerKind::Nats => Ok(Conn::Nats(nats_client(peer, role).await?)),
        }
    }

    /// Subscribes and returns once the peer has confirmed it (SubAck; a NATS flush round trip).
    async fn subscribe(&mut self, topic: &str) -> anyhow::Result<BoxStream<'static, Bytes>> {
        match self {
            Conn::Mqtt(mqtt) => {
                let mut events = mqtt
                    .events
                    .take()
                    .context("one subscription per MQTT connection")?;
                mqtt.client.subscribe(topic, QoS::AtLeastOnce).await?;
                expect_event(&mut events, "SubAck", |event| {
                    matches!(event, MqttEvent::Subscribed)
                })
                .await?;
                let messages = stream::unfold(events, |mut events| async move {
                    while let Some(event) = events.recv().await {
                        match event {
                            MqttEvent::Message(body) => return Some((body, events)),
                            MqttEvent::Failed(_) => return None,
                            MqttEvent::Connected | MqttEvent::Subscribed => {}
                        }
                    }
                    None
                });
                Ok(messages.boxed())
            }
            Conn::Nats(client) => {
                let subscriber = client.subscribe(topic.to_owned()).await?;
                client.flush().await?;
                Ok(subscriber.map(|message| message.payload).boxed())
            }
        }
    }

    async fn publish(&self, topic: &str, body: Bytes) -> anyhow::Result<()> {
        match self {
            Conn::Mqtt(mqtt) => {
                mqtt.client
                    .publish(topic, QoS::AtLeastOnce, false, body.to_vec())
                    .await?
            }
            Conn::Nats(client) => client.publish(topic.to_owned(), body).await?,
        }
        Ok(())
    }

    /// Pushes buffered publishes out (NATS buffers; rumqttc writes each request as it goes).
    async fn flush(&self) -> anyhow::Result<()> {
        if let Conn::Nats(client) = self {
            client.flush().await?;
        }
        Ok(())
    }
}

async fn nats_client(peer: &PeerServer, role: &str) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .subscription_capacity(NATS_SUBSCRIPTION_CAPACITY)
        .connect(format!("127.0.0.1:{}", peer.port))
        .await
        .with_context(|| format!("connecting {role} to nats-server"))
}

/// A JetStream publisher on a connection of its own: each message goes to its own subject
/// of the durable stream with a `Nats-Msg-Id` (JetStream's idempotency key, as our client
/// message id is ours), and is acknowledged once the stream has stored it.
pub struct JetStreamSender {
    client: async_nats::Client,
    jetstream: async_nats::jetstream::Context,
    subject: String,
    next_id: AtomicU64,
}

impl scenarios::DurableSender for JetStreamSender {
    type Ack = futures_util::future::Map<
        <async_nats::jetstream::context::PublishAckFuture as IntoFuture>::IntoFuture,
        fn(Result<PublishAck, PublishError>) -> anyhow::Result<()>,
    >;

    async fn send(&self, at: Instant, body: usize) -> anyhow::Result<Self::Ack> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let publish = Publish::build()
            .payload(payload(at, body))
            .message_id(format!("{}-{id}", self.subject));
        let ack = self
            .jetstream
            .send_publish(self.subject.clone(), publish)
            .await?;
        Ok(ack.into_future().map(stored as fn(_) -> _))
    }

    async fn close(self) {
        let _ = self.client.drain().await;
    }
}

/// JetStream's answer to a publish, as a [`scenarios::DurableSender::Ack`] resolves. Every
/// message id is new, so an ack that calls one a duplicate is a failure, not a store.
fn stored(answer: Result<PublishAck, PublishError>) -> anyhow::Result<()> {
    let ack = answer?;
    anyhow::ensure!(
        !ack.duplicate,
        "JetStream took a new message for a duplicate"
    );
    Ok(())
}

/// Creates the durable stream (file storage, the server's defaults otherwise) if it is not
/// there yet, and connects `count` publishers to it, each with subjects of its own.
pub async fn jetstream_senders(
    peer: &PeerServer,
    count: usize,
) -> anyhow::Result<Vec<JetStreamSender>> {
    anyhow::ensure!(
        peer.kind == PeerKind::Nats && peer.jetstream,
        "durable sends are compared with nats-server's JetStream only"
    );
    let setup = async_nats::jetstream::new(nats_client(peer, "jetstream-setup").await?);
    setup
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: DURABLE_STREAM.into(),
            subjects: vec![format!("{DURABLE_SUBJECT_PREFIX}.>")],
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("creating the JetStream stream")?;
    // Subjects differ from run to run, so no message id repeats one still in the stream's
    // duplicate window.
    let run = crate::stats::stamp(Instant::now());
    let mut senders = Vec::with_capacity(count);
    for n in 0..count {
        let client = nats_client(peer, &format!("jetstream-{n}")).await?;
        senders.push(JetStreamSender {
            jetstream: async_nats::jetstream::new(client.clone()),
            client,
            subject: format!("{DURABLE_SUBJECT_PREFIX}.{run}.{n}"),
            next_id: AtomicU64::new(0),
        });
    }
    Ok(senders)
}

/// Messages a run of `duration` at `rate` msgs/s sends.
fn message_count(rate: u64, duration: Duration) -> u64 {
    (rate as f64 * duration.as_secs_f64()).round() as u64
}

/// Publishes `count` timestamped messages at `rate` msgs/s, open loop: message i is due at
/// start + i/rate and carries its due time, so a sender held up by the peer shows as latency
/// rather than as a lower rate. Returns the start.
async fn send_open_loop(
    conn: &Conn,
    topic: &str,
    rate: u64,
    count: u64,
    body: usize,
) -> anyhow::Result<Instant> {
    let start = Instant::now();
    for i in 0..count {
        let due =
            start + Duration::from_nanos((u128::from(i) * 1_000_000_000 / u128::from(rate)) as u64);
        if due > Instant::now() {
            sleep_until(due).await;
        }
        conn.publish(topic, payload(due, body)).await?;
    }
    conn.flush().await?;
    Ok(start)
}

/// What one receiving connection saw.
struct Received {
    count: u64,
    latency: LatencySamples,
    last_at: Option<Instant>,
    /// Each message one by one, when `keep_samples` (the round trip's receiver).
    samples: RttSamples,
}

/// Records the age of each message until `want` have arrived, the stream ends, or `grace` has
/// passed since the sender's last publish (announced on `sent_all`).
async fn receive(
    mut messages: BoxStream<'static, Bytes>,
    want: u64,
    mut sent_all: watch::Receiver<Option<Instant>>,
    grace: Duration,
    keep_samples: bool,
) -> Received {
    let mut got = Received {
        count: 0,
        latency: LatencySamples::default(),
        last_at: None,
        samples: RttSamples::default(),
    };
    let mut deadline: Option<tokio::time::Instant> = None;
    while got.count < want {
        let next = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, messages.next()).await {
                Ok(next) => next,
                Err(_) => break,
            },
            None => tokio::select! {
                next = messages.next() => next,
                changed = sent_all.changed() => {
                    // A vanished sender (error path) counts as having just finished.
                    let last_send = if changed.is_ok() { *sent_all.borrow() } else { None };
                    let last_send = last_send.unwrap_or_else(Instant::now);
                    deadline = Some(tokio::time::Instant::from_std(last_send + grace));
                    continue;
                }
            },
        };
        let Some(body) = next else { break };
        got.count += 1;
        let now = Instant::now();
        got.last_at = Some(now);
        if let Some(age) = age_at(&body, now) {
            got.latency.record(age);
            if keep_samples {
                got.samples.record(&body, age);
            }
        }
    }
    got
}

/// Round trip: A publishes to B at `rate` msgs/s for `duration`, open loop; B echoes each
/// message back; A records how long each took from its scheduled send time.
pub async fn rtt(
    peer: &PeerServer,
    rate: u64,
    duration: Duration,
    body: usize,
) -> anyhow::Result<RttResult> {
    anyhow::ensure!(rate > 0, "rate must be positive");
    let request_topic = topic(peer.kind, "a");
    let reply_topic = topic(peer.kind, "b");

    let mut a = Conn::open(peer, "rtt-a").await?;
    let replies = a.subscribe(&reply_topic).await?;
    let mut b = Conn::open(peer, "rtt-b").await?;
    let mut requests = b.subscribe(&request_topic).await?;
    // The echo publishes from its own task, never from B's event loop.
    let _echo = Task::spawn(async move {
        while let Some(body) = requests.next().await {
            if b.publish(&reply_topic, body).await.is_err() {
                break;
            }
        }
    });

    let count = message_count(rate, duration);
    let (sent_all_tx, sent_all) = watch::channel(None);
    let mut collector = Task::spawn(receive(replies, count, sent_all, RTT_DRAIN, true));
    let cpu = CpuMeter::start(peer.pid);
    send_open_loop(&a, &request_topic, rate, count, body).await?;
    sent_all_tx.send_replace(Some(Instant::now()));
    let received = collector.join().await?;
    let cpu = cpu.finish();

    Ok(RttResult {
        offered_per_s: rate,
        completed: received.count,
        lost: count.saturating_sub(received.count),
        latency: received.latency.summary(),
        cpu,
        samples: received.samples,
    })
}

/// Fan-out: `subscribers` connections subscribe to one topic, then one publisher sends to it at
/// `rate` msgs/s for `duration`, open loop. Each subscriber should get every message.
pub async fn fanout(
    peer: &PeerServer,
    subscribers: usize,
    rate: u64,
    duration: Duration,
    body: usize,
) -> anyhow::Result<FanoutResult> {
    anyhow::ensure!(rate > 0, "rate must be positive");
    let fan_topic = topic(peer.kind, "fan");
    let fan_topic = fan_topic.as_str();
    let expected = message_count(rate, duration);
    let (sent_all_tx, sent_all) = watch::channel(None);

    // Every subscription is confirmed before the first publish, so none misses the start.
    let mut conns = Vec::with_capacity(subscribers);
    let mut collectors = Vec::with_capacity(subscribers);
    let ids: Vec<usize> = (0..subscribers).collect();
    for batch in ids.chunks(CONNECT_BATCH) {
        let opened = try_join_all(batch.iter().map(|&i| async move {
            let mut conn = Conn::open(peer, &format!("fan-sub-{i}")).await?;
            let messages = conn.subscribe(fan_topic).await?;
            anyhow::Ok((conn, messages))
        }))
        .await?;
        for (conn, messages) in opened {
            collectors.push(Task::spawn(receive(
                messages,
                expected,
                sent_all.clone(),
                FANOUT_GRACE,
                false,
            )));
            conns.push(conn);
        }
    }
    let publisher = Conn::open(peer, "fan-pub").await?;

    let cpu = CpuMeter::start(peer.pid);
    let first_publish = send_open_loop(&publisher, fan_topic, rate, expected, body).await?;
    sent_all_tx.send_replace(Some(Instant::now()));
    let mut latency = Latency::new();
    let mut deliveries = 0;
    let mut last_delivery = None;
    for collector in &mut collectors {
        let received = collector.join().await?;
        deliveries += received.count;
        latency.record_samples(&received.latency);
        last_delivery = last_delivery.max(received.last_at);
    }
    let cpu = cpu.finish();
    drop(conns);

    let span = last_delivery.map_or(0.0, |at: Instant| {
        at.saturating_duration_since(first_publish).as_secs_f64()
    });
    let deliveries_per_s = if span > 0.0 {
        deliveries as f64 / span
    } else {
        0.0
    };
    Ok(FanoutResult {
        subscribers,
        offered_msgs_per_s: rate,
        // Over all subscribers, as our server's runs report it.
        expected: expected * subscribers as u64,
        deliveries,
        deliveries_per_s,
        latency: latency.summary(),
        cpu,
    })
}
