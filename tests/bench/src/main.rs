//! `im-bench`: runs the benchmark scenarios against a release im-server and the peers, and writes `results.json`.
//!
//! Layout: [`stats`] measures (HDR histograms, CPU, RSS, slab); [`server`] runs our server;
//! [`scenarios`] drives it through the client SDK; [`idle`] holds idle connections from child
//! processes; [`peers`] runs mosquitto and nats-server and the same scenarios over their
//! client libraries. `scripts/bench.sh` builds everything, installs the peers, runs
//! `im-bench all` and renders the markdown table and plots (`scripts/bench-report.py`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

mod cpus;
mod idle;
mod peers;
mod scenarios;
mod server;
mod stats;

use idle::Protocol;
use peers::{PeerKind, PeerServer};
use server::{BenchPlugin, ImServer, ServerOptions};

#[derive(Parser)]
#[command(
    name = "im-bench",
    about = "Benchmark kit for the IM server and its peers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the scenarios and write `<out>/results.json`.
    All(AllArgs),
    /// (Internal) hold idle connections; started by the idle scenario.
    IdleClients(idle::ChildArgs),
}

#[derive(clap::Args)]
struct AllArgs {
    /// Output directory.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Smaller loads and shorter runs (finishes in a few minutes).
    #[arg(long)]
    quick: bool,
    /// The server binary.
    #[arg(long, default_value = "target/release/im-server")]
    server_bin: PathBuf,
    /// The repository root (plugin manifests and built components).
    #[arg(long, default_value = ".")]
    repo: PathBuf,
    /// Only these scenarios (idle, rtt, fanout, durable, plugins); default all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Skip mosquitto and nats-server.
    #[arg(long)]
    no_peers: bool,
    /// Round-trip rates (messages/s) instead of the mode's.
    #[arg(long, value_delimiter = ',')]
    rtt_rates: Vec<u64>,
    /// Durable senders instead of the mode's 50 (each writes to its own offline recipient,
    /// so as many conversations; for nats-server as many JetStream publishers).
    #[arg(long)]
    durable_senders: Option<usize>,
    /// Server configurations of the round trip: `on` (keyword filter and risk control),
    /// `keyword` (keyword filter only), `risk` (risk control only), `noop` (the test guests'
    /// no-op filter: what any call costs), `policy` (group policy only: plugins loaded but
    /// none called by a send), `off` (no plugins).
    #[arg(long, value_delimiter = ',', default_values = ["on", "off"])]
    rtt_configs: Vec<String>,
    /// Also write every round trip to `<out>/rtt-samples/<system>-<config>-<rate>-r<round>.csv`:
    /// its scheduled send on CLOCK_MONOTONIC (ns) and its latency (µs), to line slow round
    /// trips up with server events logged on the same clock.
    #[arg(long)]
    rtt_samples: bool,
    /// Round-trip and fan-out runs per system, configuration and rate, interleaved (the
    /// report gives each figure's median: single runs on a shared 2-core machine vary
    /// widely).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Pin the servers under test and the load generator to separate cores:
    /// `SERVER_CPUS:LOADGEN_CPUS` as taskset cpu lists, e.g. `0:1`.
    #[arg(long)]
    pin: Option<cpus::Pinning>,
    /// A second server binary (say, the parent commit's) run in every round-trip round next
    /// to `--server-bin`, its rows labelled `baseline`: an A/B comparison in one run.
    #[arg(long)]
    baseline_bin: Option<PathBuf>,
    /// Our server's `runtime.worker_threads` (0: one per core).
    #[arg(long, default_value_t = 0)]
    server_workers: usize,
}

/// What one configuration of a scenario is run with.
struct Plan {
    duration: Duration,
    idle_connections: usize,
    idle_quic_connections: usize,
    rtt_rates: Vec<u64>,
    fanout_members: usize,
    fanout_rates: Vec<u64>,
    durable_rates: Vec<u64>,
    durable_senders: usize,
    body: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                duration: Duration::from_secs(4),
                idle_connections: 2_000,
                idle_quic_connections: 5_000,
                rtt_rates: vec![5_000],
                fanout_members: 1_000,
                fanout_rates: vec![100, 150, 200],
                durable_rates: vec![10_000, 50_000],
                durable_senders: 50,
                body: 100,
            }
        } else {
            Self {
                duration: Duration::from_secs(10),
                idle_connections: 19_000,
                idle_quic_connections: 50_000,
                rtt_rates: vec![1_000, 5_000, 10_000],
                fanout_members: 1_000,
                fanout_rates: vec![50, 100, 150, 200, 300],
                durable_rates: vec![10_000, 25_000, 50_000, 75_000],
                durable_senders: 50,
                body: 100,
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    // Fix the payload timestamps' origin before anything is stamped.
    stats::stamp(std::time::Instant::now());
    let cli = Cli::parse();
    if let Command::All(AllArgs { pin: Some(pin), .. }) = &cli.command {
        // Before the runtime starts its threads: they inherit the mask.
        cpus::pin(pin.clone())?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::IdleClients(args) => runtime.block_on(idle::run_child(args)),
        Command::All(args) => runtime.block_on(run_all(args)),
    }
}

struct Results {
    entries: Vec<Value>,
    path: PathBuf,
    header: Value,
}

impl Results {
    /// Records one result and rewrites the file, so a long run keeps what it measured.
    fn push(
        &mut self,
        scenario: &str,
        system: &str,
        params: Value,
        result: impl serde::Serialize,
    ) -> anyhow::Result<()> {
        let entry =
            json!({"scenario": scenario, "system": system, "params": params, "result": result});
        eprintln!("{entry}");
        self.entries.push(entry);
        let mut doc = self.header.clone();
        doc["results"] = Value::Array(self.entries.clone());
        std::fs::write(&self.path, serde_json::to_string_pretty(&doc)?)?;
        Ok(())
    }
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    json!({"cpu": model, "cores": cores, "memory": memory, "idle": idle_policy()})
}

/// How this machine's idle cpus wait: the cpuidle driver and, under `haltpoll` (KVM guests),
/// how long an idle vCPU polls before it halts. Every wake-up of a halted vCPU costs a
/// VM exit, and round-trip latencies on loopback depend on it more than on any server
/// (docs/benchmarks.md, 2026-12-05 afternoon), so results are only comparable with it.
fn idle_policy() -> Value {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim().to_owned())
    };
    json!({
        "cpuidle_driver": read("/sys/devices/system/cpu/cpuidle/current_driver"),
        "guest_halt_poll_ns": read("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
            .and_then(|ns| ns.parse::<u64>().ok()),
    })
}

/// Runs `scenario` to its end on a one-thread runtime of its own.
///
/// The round trip's two clients need no parallelism. On the multi-thread runtime each hop
/// between their tasks (timer, sender, connection drivers, echo, receiver) can wake another
/// worker thread, and those wake-ups would count as latency of whichever system is measured.
fn on_one_thread<T: Send>(
    scenario: impl std::future::Future<Output = anyhow::Result<T>> + Send,
) -> anyhow::Result<T> {
    tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?
                        .block_on(scenario)
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the scenario's thread panicked"))?
        })
    })
}

/// The keyword filter with its default configuration.
fn keyword_filter(repo: &Path) -> BenchPlugin {
    BenchPlugin {
        id: None,
        manifest: repo.join("plugins/keyword-filter/manifest.toml"),
        wasm: repo.join("target/guest/wasm32-wasip2/release/keyword_filter.wasm"),
        config: vec![],
    }
}

/// Risk control with its rates raised (per user, and logins per IP: every client comes
/// from 127.0.0.1) so it measures its cost without throttling the load generator.
fn risk_control(repo: &Path) -> BenchPlugin {
    BenchPlugin {
        id: None,
        manifest: repo.join("plugins/risk-control/manifest.toml"),
        wasm: repo.join("target/guest/wasm32-wasip2/release/risk_control.wasm"),
        config: vec![
            ("send_rate".into(), "10000000".into()),
            ("send_burst".into(), "10000000".into()),
            ("repeat_limit".into(), "1000000000".into()),
            ("login_rate".into(), "10000000".into()),
            ("login_burst".into(), "10000000".into()),
        ],
    }
}

/// The test guests' no-op message filter: what any call into a plugin costs.
fn noop_filter(repo: &Path) -> BenchPlugin {
    BenchPlugin {
        id: None,
        manifest: repo.join("tests/guest/noop-filter/manifest.toml"),
        wasm: repo.join("target/guest/wasm32-wasip2/release/noop_filter.wasm"),
        config: vec![],
    }
}

/// Group policy alone: plugins enabled and loaded, but none called by a 1:1 send.
fn group_policy(repo: &Path) -> BenchPlugin {
    BenchPlugin {
        id: None,
        manifest: repo.join("plugins/group-policy/manifest.toml"),
        wasm: repo.join("target/guest/wasm32-wasip2/release/group_policy.wasm"),
        config: vec![],
    }
}

/// The default message-path plugins: keyword filter and risk control.
fn default_plugins(repo: &Path) -> Vec<BenchPlugin> {
    vec![keyword_filter(repo), risk_control(repo)]
}

/// A round-trip configuration named on the command line: its report label and plugins.
fn rtt_config(name: &str, repo: &Path) -> anyhow::Result<(&'static str, Vec<BenchPlugin>)> {
    Ok(match name {
        "on" => ("plugins on", default_plugins(repo)),
        "keyword" => ("keyword filter only", vec![keyword_filter(repo)]),
        "risk" => ("risk control only", vec![risk_control(repo)]),
        "noop" => ("no-op filter only", vec![noop_filter(repo)]),
        "policy" => (
            "group policy only (no call per send)",
            vec![group_policy(repo)],
        ),
        "off" => ("plugins off", vec![]),
        other => {
            anyhow::bail!(
                "unknown round-trip configuration {other:?} (on, keyword, risk, noop, policy, off)"
            )
        }
    })
}

fn keyword_filters(repo: &Path, count: usize) -> Vec<BenchPlugin> {
    (0..count)
        .map(|n| BenchPlugin {
            id: Some(format!("keyword-filter-{n}")),
            ..keyword_filter(repo)
        })
        .collect()
}

async fn run_all(args: AllArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)?;
    if args.rtt_samples {
        stats::RttSamples::enable();
    }
    let mut plan = Plan::new(args.quick);
    if let Some(senders) = args.durable_senders {
        plan.durable_senders = senders.max(1);
    }
    if !args.rtt_rates.is_empty() {
        plan.rtt_rates = args.rtt_rates.clone();
    }
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let mut results = Results {
        entries: Vec::new(),
        path: args.out.join("results.json"),
        header: json!({
            "started_unix": started,
            "quick": args.quick,
            "machine": machine(),
            "durability": {
                "im": "ack after the batch is appended to the message journal (one write per batch, applied to SQLite WAL, synchronous=NORMAL, behind the ack): survives SIGKILL of the server, not power loss",
                "mosquitto": "QoS 1, persistence off (messages in memory)",
                "nats": "core pub/sub, no persistence; durable sends: JetStream file store, nats-server's defaults (a publish is acknowledged once stored, the store synced to disk every 2 minutes)",
            },
            "pinning": cpus::current().map(|p| json!({"server_cpus": p.server, "loadgen_cpus": p.loadgen})),
            "server_worker_threads": args.server_workers,
        }),
    };
    let d = plan.duration;
    let bin = &args.server_bin;
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: build it with cargo build --release -p im-server",
        bin.display()
    );
    let plain = ServerOptions {
        worker_threads: args.server_workers,
        ..ServerOptions::default()
    };
    let with_plugins = ServerOptions {
        plugins: default_plugins(&args.repo),
        ..plain.clone()
    };

    if wanted("idle") {
        for (protocol, transport, total, per_process) in [
            (Protocol::ImTcp, "tcp", plan.idle_connections, 9_000),
            (Protocol::ImWs, "ws", plan.idle_connections, 9_000),
            (Protocol::ImQuic, "quic", plan.idle_quic_connections, 25_000),
        ] {
            let server = ImServer::start(bin, &plain)?;
            let result = idle::measure(
                protocol,
                &server.url(transport),
                server.pid,
                total,
                per_process,
                Some(&server.certificate),
                server.secret(),
            )
            .await?;
            results.push("idle", "im", json!({"transport": transport}), result)?;
        }
        if !args.no_peers {
            for (kind, protocol) in [
                (PeerKind::Mosquitto, Protocol::Mqtt),
                (PeerKind::Nats, Protocol::Nats),
            ] {
                let peer = PeerServer::start(kind, false)?;
                let target = format!("127.0.0.1:{}", peer.port);
                let result = idle::measure(
                    protocol,
                    &target,
                    peer.pid,
                    plan.idle_connections,
                    9_000,
                    None,
                    "",
                )
                .await?;
                results.push("idle", peer_name(kind), json!({"transport": "tcp"}), result)?;
            }
        }
    }

    if wanted("rtt") {
        // Every system stays up for the whole scenario and the rounds interleave them, so
        // the machine's drifts fall on all of them alike.
        let mut systems = Vec::new();
        let mut binaries = vec![(bin, "")];
        binaries.extend(args.baseline_bin.as_ref().map(|b| (b, " (baseline)")));
        for name in &args.rtt_configs {
            let (label, plugins) = rtt_config(name, &args.repo)?;
            let options = ServerOptions {
                plugins,
                ..plain.clone()
            };
            for &(binary, suffix) in &binaries {
                let server = ImServer::start(binary, &options)?;
                systems.push(RunningSystem::Im(format!("{label}{suffix}"), server));
            }
        }
        systems.extend(peers_kept_up(args.no_peers)?);
        for round in 0..args.repeat.max(1) {
            for system in &systems {
                for &rate in &plan.rtt_rates {
                    let (name, config, result) = match system {
                        RunningSystem::Im(label, server) => (
                            "im",
                            label.as_str(),
                            on_one_thread(scenarios::rtt(server, rate, d, plan.body)),
                        ),
                        RunningSystem::Peer(peer) => (
                            peer_name(peer.kind),
                            peer.durability(),
                            on_one_thread(peers::rtt(peer, rate, d, plan.body)),
                        ),
                    };
                    let result = result.with_context(|| format!("{name} rtt at {rate}/s"))?;
                    if args.rtt_samples {
                        let dir = args.out.join("rtt-samples");
                        std::fs::create_dir_all(&dir)?;
                        let label: String = config
                            .chars()
                            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                            .collect();
                        let file = dir.join(format!("{name}-{label}-{rate}-r{round}.csv"));
                        result
                            .samples
                            .write_csv(&file)
                            .with_context(|| format!("writing {}", file.display()))?;
                    }
                    results.push(
                        "rtt",
                        name,
                        json!({"rate": rate, "config": config, "round": round}),
                        result,
                    )?;
                }
            }
        }
    }

    if wanted("fanout") {
        // Interleaved rounds, as for the round trip: the p99 at 100 msgs/s moved from 8.9 to
        // 11.3 ms between two runs of one build here, more than the gap to nats-server it
        // was read against.
        let mut systems = vec![RunningSystem::Im(
            "plugins on".into(),
            ImServer::start(bin, &with_plugins)?,
        )];
        systems.extend(peers_kept_up(args.no_peers)?);
        for round in 0..args.repeat.max(1) {
            for system in &systems {
                for &rate in &plan.fanout_rates {
                    let members = plan.fanout_members;
                    let (name, config, result) = match system {
                        RunningSystem::Im(label, server) => (
                            "im",
                            label.as_str(),
                            scenarios::fanout(server, members, rate, d, plan.body).await,
                        ),
                        RunningSystem::Peer(peer) => (
                            peer_name(peer.kind),
                            peer.durability(),
                            peers::fanout(peer, members - 1, rate, d, plan.body).await,
                        ),
                    };
                    let result = result.with_context(|| format!("{name} fan-out at {rate}/s"))?;
                    results.push(
                        "fanout",
                        name,
                        json!({"rate": rate, "members": members, "config": config, "round": round}),
                        result,
                    )?;
                }
            }
        }
    }

    if wanted("durable") {
        let server = ImServer::start(bin, &plain)?;
        let senders = || scenarios::durable_senders(&server, plan.durable_senders);
        durable_runs(
            &mut results,
            &plan,
            "im",
            "plugins off",
            server.pid,
            senders,
        )
        .await?;
        drop(server);
        if !args.no_peers {
            // JetStream is the peer that stores and acknowledges each message, as we do.
            let peer = PeerServer::start(PeerKind::Nats, true)?;
            let senders = || peers::jetstream_senders(&peer, plan.durable_senders);
            durable_runs(
                &mut results,
                &plan,
                "nats",
                peer.durability(),
                peer.pid,
                senders,
            )
            .await?;
        }
    }

    if wanted("plugins") {
        // One server per filter count, measured in interleaved rounds so the machine's
        // drifts fall on every configuration alike; the report takes each one's median.
        let filter_counts = [0usize, 1, 3];
        let servers = filter_counts
            .iter()
            .map(|&filters| {
                let options = ServerOptions {
                    plugins: keyword_filters(&args.repo, filters),
                    ..plain.clone()
                };
                ImServer::start(bin, &options)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        for round in 0..PLUGIN_ROUNDS {
            for (server, filters) in servers.iter().zip(filter_counts) {
                let senders = scenarios::durable_senders(server, plan.durable_senders).await?;
                let saturated =
                    scenarios::saturate(senders, server.pid, DURABLE_WINDOW, d, plan.body).await?;
                results.push(
                    "plugins-saturation",
                    "im",
                    json!({"filters": filters, "round": round}),
                    saturated,
                )?;
            }
        }
        for (server, filters) in servers.iter().zip(filter_counts) {
            let senders = scenarios::durable_senders(server, plan.durable_senders).await?;
            let fixed = scenarios::durable(senders, server.pid, 10_000, d, plan.body).await?;
            results.push(
                "plugins-fixed-rate",
                "im",
                json!({"filters": filters, "rate": 10_000}),
                fixed,
            )?;
        }
    }
    eprintln!("wrote {}", results.path.display());
    Ok(())
}

/// mosquitto and nats-server (core), started for a whole scenario unless `no_peers`.
fn peers_kept_up(no_peers: bool) -> anyhow::Result<Vec<RunningSystem>> {
    if no_peers {
        return Ok(Vec::new());
    }
    [PeerKind::Mosquitto, PeerKind::Nats]
        .into_iter()
        .map(|kind| Ok(RunningSystem::Peer(PeerServer::start(kind, false)?)))
        .collect()
}

/// A system the round trip or the fan-out runs against, up for the whole scenario.
enum RunningSystem {
    /// Our server in a labelled configuration.
    Im(String, ImServer),
    Peer(PeerServer),
}

/// Saturation rounds per filter count in the plugin-cost scenario.
const PLUGIN_ROUNDS: usize = 3;

/// Sends each durable sender keeps in flight at saturation.
const DURABLE_WINDOW: usize = 64;

/// The durable scenario for one system: sends at each of the plan's rates, then saturated,
/// each run by senders `connect` makes afresh (each run's senders close at its end).
async fn durable_runs<S, Connect, Connecting>(
    results: &mut Results,
    plan: &Plan,
    system: &str,
    config: &str,
    pid: u32,
    connect: Connect,
) -> anyhow::Result<()>
where
    S: scenarios::DurableSender,
    Connect: Fn() -> Connecting,
    Connecting: Future<Output = anyhow::Result<Vec<S>>>,
{
    let (d, body, senders) = (plan.duration, plan.body, plan.durable_senders);
    for &rate in &plan.durable_rates {
        let result = scenarios::durable(connect().await?, pid, rate, d, body)
            .await
            .with_context(|| format!("{system} durable sends at {rate}/s"))?;
        results.push(
            "durable",
            system,
            json!({"rate": rate, "senders": senders, "config": config}),
            result,
        )?;
    }
    let result = scenarios::saturate(connect().await?, pid, DURABLE_WINDOW, d, body)
        .await
        .with_context(|| format!("{system} durable saturation"))?;
    results.push(
        "durable-saturation",
        system,
        json!({"config": config}),
        result,
    )
}

fn peer_name(kind: PeerKind) -> &'static str {
    match kind {
        PeerKind::Mosquitto => "mosquitto",
        PeerKind::Nats => "nats",
    }
}
