//! The node's Prometheus metrics: one recorder per node (no global state), handles for the hot paths, and the scrape text.
//!
//! Each node owns its recorder, so several nodes in one process (the tests) never mix
//! counts. Hot paths hold pre-registered handles; plugin statistics are copied from the
//! plugin host's own counters at scrape time.

use std::sync::Arc;
use std::time::Duration;

use im_plugins::PluginHost;
use im_store::StoreStats;
use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

/// Upper bounds (seconds) of the latency histograms: 50 µs to 5 s.
const LATENCY_BUCKETS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];

/// How often histogram samples are folded into their buckets. The recorder keeps every
/// sample until then (or until a scrape), so without upkeep a node nobody scrapes grew by
/// 16 bytes per delivery (161 MB for ten million samples in a scratch test): 5.8 GB an
/// hour at 100,000 deliveries/s.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Transport names as sessions report them.
pub const TRANSPORTS: [&str; 5] = ["tcp", "tcp+tls", "ws", "wss", "quic"];

/// Message kinds counted in and out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    Direct,
    Group,
    Room,
    Broadcast,
}

impl MessageKind {
    /// The kind of a stored message, by its conversation.
    pub fn of(conversation_id: &str) -> Self {
        if im_proto::ids::conversation_group(conversation_id).is_some() {
            MessageKind::Group
        } else {
            MessageKind::Direct
        }
    }

    const ALL: [MessageKind; 4] = [
        MessageKind::Direct,
        MessageKind::Group,
        MessageKind::Room,
        MessageKind::Broadcast,
    ];

    fn as_str(self) -> &'static str {
        match self {
            MessageKind::Direct => "direct",
            MessageKind::Group => "group",
            MessageKind::Room => "room",
            MessageKind::Broadcast => "broadcast",
        }
    }
}

/// The metrics of one node.
pub struct NodeMetrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    connections: [Gauge; TRANSPORTS.len()],
    messages_in: [Counter; MessageKind::ALL.len()],
    messages_out: [Counter; MessageKind::ALL.len()],
    store_commit: Histogram,
    delivery: Histogram,
    commits: Counter,
    slow_consumers: Counter,
}

impl NodeMetrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&LATENCY_BUCKETS)
            .expect("the latency buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        let (connections, messages_in, messages_out, store_commit, delivery, commits, slow) =
            metrics::with_local_recorder(&recorder, || {
                metrics::describe_gauge!("im_connections", "Logged-in connections, by transport");
                metrics::describe_counter!(
                    "im_messages_in_total",
                    "Messages accepted (stored, or published for rooms and broadcasts), by kind"
                );
                metrics::describe_counter!(
                    "im_messages_out_total",
                    "Message pushes handed to connections, by kind"
                );
                metrics::describe_histogram!(
                    "im_store_commit_seconds",
                    metrics::Unit::Seconds,
                    "Duration of one group commit of messages"
                );
                metrics::describe_histogram!(
                    "im_delivery_seconds",
                    metrics::Unit::Seconds,
                    "From a message's commit to its push being written to a device (one sample per device)"
                );
                (
                    TRANSPORTS.map(|t| metrics::gauge!("im_connections", "transport" => t)),
                    MessageKind::ALL
                        .map(|k| metrics::counter!("im_messages_in_total", "kind" => k.as_str())),
                    MessageKind::ALL
                        .map(|k| metrics::counter!("im_messages_out_total", "kind" => k.as_str())),
                    metrics::histogram!("im_store_commit_seconds"),
                    metrics::histogram!("im_delivery_seconds"),
                    metrics::counter!("im_store_commits_total"),
                    metrics::counter!("im_slow_consumer_closes_total"),
                )
            });
        Self {
            recorder,
            handle,
            connections,
            messages_in,
            messages_out,
            store_commit,
            delivery,
            commits,
            slow_consumers: slow,
        }
    }

    fn transport_index(transport: &str) -> usize {
        TRANSPORTS.iter().position(|t| *t == transport).unwrap_or(0)
    }

    /// A connection logged in (`+1`) or ended (`-1`).
    pub fn connection(&self, transport: &str, delta: f64) {
        self.connections[Self::transport_index(transport)].increment(delta);
    }

    pub fn message_in(&self, kind: MessageKind, count: u64) {
        self.messages_in[kind as usize].increment(count);
    }

    pub fn message_out(&self, kind: MessageKind, count: u64) {
        self.messages_out[kind as usize].increment(count);
    }

    pub fn store_commit(&self, took: Duration) {
        self.commits.increment(1);
        self.store_commit.record(took.as_secs_f64());
    }

    pub fn delivery(&self, took: Duration) {
        self.delivery.record(took.as_secs_f64());
    }

    pub fn slow_consumer(&self) {
        self.slow_consumers.increment(1);
    }

    /// Folds the histogram samples recorded since the last upkeep or scrape into their
    /// buckets, freeing them.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// Runs [`Self::upkeep`] every few seconds until `shutdown` is cancelled.
    pub async fn keep_up(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.upkeep(),
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// The scrape text: the node's own metrics, then node state, the store's background
    /// work and plugin statistics read now.
    pub fn render(
        &self,
        online: (usize, usize),
        parked: usize,
        rooms: usize,
        store: Option<StoreStats>,
        plugins: Option<&PluginHost>,
    ) -> String {
        metrics::with_local_recorder(&self.recorder, || {
            metrics::gauge!("im_online_users").set(online.0 as f64);
            metrics::gauge!("im_online_connections").set(online.1 as f64);
            metrics::gauge!("im_parked_connections").set(parked as f64);
            metrics::gauge!("im_rooms").set(rooms as f64);
            if let Some(store) = store {
                metrics::gauge!("im_store_pending_messages").set(store.pending_messages as f64);
                metrics::counter!("im_store_applier_commits_total").absolute(store.applier_commits);
                metrics::counter!("im_store_applier_messages_total")
                    .absolute(store.applier_messages);
                metrics::gauge!("im_store_applier_busy_seconds").set(store.applier_seconds);
                metrics::counter!("im_store_checkpoints_total").absolute(store.checkpoints);
                metrics::gauge!("im_store_checkpoint_busy_seconds").set(store.checkpoint_seconds);
                metrics::counter!("im_store_wal_restarts_total").absolute(store.wal_restarts);
                metrics::gauge!("im_store_wal_restart_busy_seconds").set(store.wal_restart_seconds);
                metrics::counter!("im_store_wal_restarts_given_up_total")
                    .absolute(store.wal_restarts_given_up);
                metrics::gauge!("im_store_wal_restart_wait_seconds")
                    .set(store.wal_restart_wait_seconds);
            }
            for plugin in plugins.map(PluginHost::list).unwrap_or_default() {
                let id = plugin.id.clone();
                metrics::counter!("im_plugin_calls_total", "plugin" => id.clone())
                    .absolute(plugin.calls);
                for (kind, count) in &plugin.failures {
                    metrics::counter!("im_plugin_failures_total", "plugin" => id.clone(), "kind" => *kind)
                        .absolute(*count);
                }
                for (verdict, count) in &plugin.verdicts {
                    metrics::counter!("im_plugin_verdicts_total", "plugin" => id.clone(), "verdict" => *verdict)
                        .absolute(*count);
                }
                metrics::gauge!("im_plugin_mean_call_seconds", "plugin" => id.clone())
                    .set(plugin.mean_call_ns as f64 / 1e9);
                metrics::gauge!("im_plugin_max_call_seconds", "plugin" => id.clone())
                    .set(plugin.max_call_ns as f64 / 1e9);
                metrics::gauge!("im_plugin_enabled", "plugin" => id.clone())
                    .set(if plugin.enabled { 1.0 } else { 0.0 });
                metrics::gauge!("im_plugin_breaker_open", "plugin" => id)
                    .set(if plugin.breaker_open { 1.0 } else { 0.0 });
            }
        });
        self.handle.render()
    }
}

impl Default for NodeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_nodes_keep_separate_counts() {
        let a = NodeMetrics::new();
        let b = NodeMetrics::new();
        a.message_in(MessageKind::Group, 3);
        a.connection("ws", 1.0);
        a.store_commit(Duration::from_millis(2));
        let text = a.render((1, 1), 0, 0, None, None);
        assert!(
            text.contains("im_messages_in_total{kind=\"group\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("im_connections{transport=\"ws\"} 1"),
            "{text}"
        );
        assert!(text.contains("im_store_commit_seconds_bucket"), "{text}");
        let other = b.render((0, 0), 0, 0, None, None);
        assert!(
            other.contains("im_messages_in_total{kind=\"group\"} 0"),
            "{other}"
        );
    }

    #[test]
    fn upkeep_folds_samples_into_the_buckets_without_losing_any() {
        let node = NodeMetrics::new();
        for micros in [30, 70, 70, 2_000] {
            node.delivery(Duration::from_micros(micros));
        }
        node.upkeep();
        node.delivery(Duration::from_micros(70));
        node.upkeep();
        let text = node.render((0, 0), 0, 0, None, None);
        for line in [
            "im_delivery_seconds_bucket{le=\"0.00005\"} 1",
            "im_delivery_seconds_bucket{le=\"0.0001\"} 4",
            "im_delivery_seconds_bucket{le=\"0.0025\"} 5",
            "im_delivery_seconds_count 5",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }

    #[test]
    fn the_stores_background_work_is_exported() {
        let node = NodeMetrics::new();
        let stats = StoreStats {
            pending_messages: 7,
            applier_commits: 3,
            applier_messages: 120,
            applier_seconds: 0.25,
            checkpoints: 2,
            checkpoint_seconds: 0.5,
            wal_restarts: 1,
            wal_restart_seconds: 0.125,
            wal_restarts_given_up: 4,
            wal_restart_wait_seconds: 0.08,
        };
        let text = node.render((0, 0), 0, 0, Some(stats), None);
        for line in [
            "im_store_pending_messages 7",
            "im_store_applier_commits_total 3",
            "im_store_applier_messages_total 120",
            "im_store_applier_busy_seconds 0.25",
            "im_store_checkpoints_total 2",
            "im_store_checkpoint_busy_seconds 0.5",
            "im_store_wal_restarts_total 1",
            "im_store_wal_restart_busy_seconds 0.125",
            "im_store_wal_restarts_given_up_total 4",
            "im_store_wal_restart_wait_seconds 0.08",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in {text}");
        }
    }
}
