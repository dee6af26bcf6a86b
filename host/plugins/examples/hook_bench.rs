//! Measures the cost of plugin hook calls with reused instances: a no-op filter (handles
//! lent) and a no-op body screen (none: the cheapest call), the keyword filter on 100 B,
//! 1 KiB and 16 KiB bodies, a chain of three filters, and risk control assessing sends.
//!
//! Run (after `scripts/build-plugins.sh`):
//!   cargo run --release -p im-plugins --example hook_bench [iterations] [only]
//!
//! `only` keeps the cases whose label contains it (for profiling one case).
//! `HOOK_BENCH_WORDS=<list>` replaces the keyword filters' word list (default
//! `badword,scam,诈骗`).
//! `HOOK_BENCH_EVICT_KIB=<n>` measures the calls cold: before each call the bench writes
//! every cache line of an `n` KiB buffer, as a server's other work between two messages
//! would, and times the call alone (the median call; until 2026-12-07 the mean).
//! `HOOK_BENCH_IDLE_US=<n>` measures the calls after an idle pause instead: the thread
//! sleeps `n` µs before each call (its cpu may halt, and a virtual machine's host may run
//! something else on it), as between two messages of a lightly loaded server.
//! `HOOK_BENCH_THREADS=<n>` measures the filter calls with `n` threads calling the same
//! chain at once, as a server's runtime workers do (the figure is one thread's per call).
//! `HOOK_BENCH_JSON=<file>` also writes the rows to `file` as JSON (`case`, `body_bytes`,
//! `ns`, and `cold` when measured cold), which the benchmark kit's report reads.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use im_plugins::bindings::types;
use im_plugins::{
    CallOrigin, FilterOutcome, PluginHost, PluginHostConfig, PluginMessage, RiskOutcome,
};
use im_store::Store;
use im_store::sqlite::{SqliteOptions, SqliteStore};

fn component(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/guest/wasm32-wasip2/release")
        .join(name);
    std::fs::read(&path)
        .unwrap_or_else(|_| panic!("{} missing: run scripts/build-plugins.sh", path.display()))
}

fn manifest(id: &str, order: i32) -> String {
    format!(
        "id = \"{id}\"\nversion = \"1.0.0\"\nhooks = [\"message-filter\"]\norder = {order}\n\
         [config]\nwords = {}\naction = \"mask\"\n",
        // Quoted as TOML, whatever the list holds.
        toml::Value::from(
            std::env::var("HOOK_BENCH_WORDS").unwrap_or_else(|_| "badword,scam,诈骗".into())
        )
    )
}

/// English text without blocked words, so the keyword filter scans it all and allows it.
const ENGLISH: &str = "the quick brown fox jumps over the lazy dog ";
/// Chinese text without blocked words (three bytes a character in UTF-8).
const CHINESE: &str = "今天天气很好我们下午一起去公园散步吧";

/// A message of `source` repeated to `len` bytes, or as many whole characters as fit.
fn message_of(source: &str, len: usize) -> PluginMessage {
    let mut body = String::with_capacity(len);
    for c in source.chars().cycle() {
        if body.len() + c.len_utf8() > len {
            break;
        }
        body.push(c);
    }
    let body = body.into_bytes();
    PluginMessage {
        conversation_id: "u:alice:bob".into(),
        sender: types::Principal {
            user_id: "alice".into(),
            device_id: "phone".into(),
        },
        target: types::MessageTarget::User("bob".into()),
        client_msg_id: "c1".into(),
        content_type: "text/plain".into(),
        body: body.into(),
    }
}

/// Batches per row.
const BATCHES: u32 = 20;

/// `HOOK_BENCH_THREADS`: threads calling the chain at once (1 unless set).
fn threads() -> usize {
    std::env::var("HOOK_BENCH_THREADS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// What makes each call of a cold measurement cold.
enum Cold {
    /// `HOOK_BENCH_EVICT_KIB`: other work writing this buffer's every cache line.
    Evict(Vec<u8>),
    /// `HOOK_BENCH_IDLE_US`: an idle pause.
    Idle(std::time::Duration),
}

impl Cold {
    fn from_env() -> Option<Self> {
        let number = |name: &str| std::env::var(name).ok()?.parse::<u64>().ok();
        if let Some(kib) = number("HOOK_BENCH_EVICT_KIB") {
            return Some(Cold::Evict(vec![0; usize::try_from(kib).ok()? * 1024]));
        }
        number("HOOK_BENCH_IDLE_US").map(|us| Cold::Idle(std::time::Duration::from_micros(us)))
    }

    fn label(&self) -> String {
        match self {
            Cold::Evict(buffer) => format!("cold: {} KiB between calls", buffer.len() / 1024),
            Cold::Idle(pause) => format!("cold: {} µs idle before each call", pause.as_micros()),
        }
    }

    /// The median of `calls` single calls of `call`, each made cold first.
    fn median_ns(&mut self, calls: u32, mut call: impl FnMut()) -> f64 {
        let mut each = Vec::with_capacity(calls as usize);
        for round in 0..calls {
            match self {
                Cold::Evict(other_work) => {
                    for line in other_work.chunks_mut(64) {
                        line[0] = line[0].wrapping_add(round as u8);
                    }
                    std::hint::black_box(&other_work);
                }
                Cold::Idle(pause) => std::thread::sleep(*pause),
            }
            let start = Instant::now();
            call();
            each.push(start.elapsed().as_nanos() as f64);
        }
        each.sort_by(f64::total_cmp);
        each[each.len() / 2]
    }
}

/// Filter calls on a message of `source` repeated to `len` bytes.
async fn measure(
    host: &PluginHost,
    label: &str,
    source: &str,
    len: usize,
    iterations: u32,
    only: &str,
) {
    if !format!("{label} {len} B").contains(only) {
        return;
    }
    let origin = CallOrigin {
        transport: "tcp",
        remote_ip: Some(std::net::Ipv4Addr::LOCALHOST.into()),
    };
    // The message is reused: the chain only lends it to the plugins.
    let mut msg = message_of(source, len);
    for _ in 0..1000 {
        let _ = host.filter(&origin, &mut msg).await;
    }
    if let Some(mut cold) = Cold::from_env() {
        let median = cold.median_ns((iterations / 10).max(1), || {
            let outcome = ready_now(host.filter(&origin, &mut msg));
            assert!(matches!(outcome, FilterOutcome::Pass { .. }), "{outcome:?}");
        });
        row(label, Some(&cold), len, median);
        return;
    }
    let threads = threads();
    // The other threads call the same chain, each on its own copy of the message, until
    // the measuring thread is done.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let median = std::thread::scope(|scope| {
        for _ in 1..threads {
            scope.spawn(|| {
                let mut msg = message_of(source, len);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    ready_now(host.filter(&origin, &mut msg));
                }
            });
        }
        let median = median_batch_ns(iterations, || {
            let outcome = ready_now(host.filter(&origin, &mut msg));
            assert!(matches!(outcome, FilterOutcome::Pass { .. }), "{outcome:?}");
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        median
    });
    let threads = if threads > 1 {
        format!(" ({threads} threads at once)")
    } else {
        String::new()
    };
    row(&format!("{label}{threads}"), None, len, median);
}

/// The rows measured so far, for `HOOK_BENCH_JSON`.
static ROWS: std::sync::Mutex<Vec<serde_json::Value>> = std::sync::Mutex::new(Vec::new());

/// Prints one row of the table and keeps it for `HOOK_BENCH_JSON`.
fn row(case: &str, cold: Option<&Cold>, body_bytes: usize, ns: f64) {
    let label = match cold {
        Some(cold) => format!("{case} ({})", cold.label()),
        None => case.to_owned(),
    };
    println!("| {label} | {body_bytes} B | {ns:.0} ns |");
    let mut row = serde_json::json!({"case": case, "body_bytes": body_bytes, "ns": ns.round()});
    if let Some(cold) = cold {
        row["cold"] = cold.label().into();
    }
    ROWS.lock().expect("rows").push(row);
}

/// The output of a future that finishes on its first poll, as calls of plugins called
/// directly (without a fiber) do: the calling threads are in a scope, not tasks.
fn ready_now<F: std::future::Future>(future: F) -> F::Output {
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(future).poll(&mut context) {
        std::task::Poll::Ready(output) => output,
        std::task::Poll::Pending => {
            panic!("a benchmarked plugin waited: it is not called directly")
        }
    }
}

/// The mean of each of BATCHES batches of `call`; the median batch is returned, so a burst
/// of interference from other processes on this shared machine does not skew the figure.
fn median_batch_ns(iterations: u32, mut call: impl FnMut()) -> f64 {
    let per_batch = (iterations / BATCHES).max(1);
    let mut means = Vec::with_capacity(BATCHES as usize);
    for _ in 0..BATCHES {
        let start = Instant::now();
        for _ in 0..per_batch {
            call();
        }
        means.push(start.elapsed().as_nanos() as f64 / f64::from(per_batch));
    }
    means.sort_by(f64::total_cmp);
    means[means.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let iterations: u32 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(100_000);
    let only = std::env::args().nth(2).unwrap_or_default();
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&dir.path().join("im.db"), SqliteOptions::default()).await?);
    let config = |name: &str| PluginHostConfig {
        dir: dir.path().join(name),
        cache_dir: dir.path().join("cache"),
        node_id: "bench".into(),
    };
    println!("| chain | body | per message |");
    println!("|---|---|---|");

    let empty = PluginHost::start(config("empty"), store.clone()).await?;
    measure(&empty, "no plugins", ENGLISH, 100, iterations, &only).await;

    let noop = PluginHost::start(config("noop"), store.clone()).await?;
    noop.install(&manifest("noop", 1), component("noop_filter.wasm"))
        .await?;
    for len in [100, 16 * 1024] {
        measure(&noop, "no-op filter", ENGLISH, len, iterations, &only).await;
    }

    let screen = PluginHost::start(config("screen"), store.clone()).await?;
    screen
        .install(&manifest("screen", 1), component("noop_screen.wasm"))
        .await?;
    measure(&screen, "no-op screen", ENGLISH, 100, iterations, &only).await;

    let keyword = PluginHost::start(config("keyword"), store.clone()).await?;
    keyword
        .install(&manifest("keyword", 1), component("keyword_filter.wasm"))
        .await?;
    for len in [100, 1024, 16 * 1024] {
        measure(&keyword, "keyword filter", ENGLISH, len, iterations, &only).await;
    }
    for len in [100, 1024] {
        let label = "keyword filter (Chinese text)";
        measure(&keyword, label, CHINESE, len, iterations, &only).await;
    }

    let chain = PluginHost::start(config("chain"), store.clone()).await?;
    for (i, id) in ["k1", "k2", "k3"].iter().enumerate() {
        chain
            .install(&manifest(id, i as i32), component("keyword_filter.wasm"))
            .await?;
    }
    measure(&chain, "3 keyword filters", ENGLISH, 100, iterations, &only).await;

    let risk = PluginHost::start(config("risk"), store.clone()).await?;
    risk.install(RISK_MANIFEST, component("risk_control.wasm"))
        .await?;
    measure_risk(&risk, iterations, &only).await;
    if let Some(path) = std::env::var_os("HOOK_BENCH_JSON") {
        let rows = std::mem::take(&mut *ROWS.lock().expect("rows"));
        std::fs::write(&path, serde_json::to_vec_pretty(&rows)?)?;
    }
    Ok(())
}

/// Risk control with its limits raised so that every send is assessed in full and allowed.
const RISK_MANIFEST: &str = "id = \"risk\"\nversion = \"1.0.0\"\nhooks = [\"risk-control\"]\n\
    [config]\nsend_rate = \"1000000000\"\nsend_burst = \"1000000000\"\n\
    repeat_limit = \"1000000000\"\n";

/// Risk control assessing one user's sends, each body different (as the round trip's
/// time-stamped payloads are), so its repeat ring stays full.
async fn measure_risk(host: &PluginHost, iterations: u32, only: &str) {
    let label = "risk control (send)";
    if !format!("{label} 100 B").contains(only) {
        return;
    }
    let origin = CallOrigin {
        transport: "tcp",
        remote_ip: Some(std::net::Ipv4Addr::LOCALHOST.into()),
    };
    let mut msg = message_of(ENGLISH, 100);
    let mut sequence = 0u64;
    let mut assess = async |msg: &mut PluginMessage| {
        sequence += 1;
        let mut body = msg.body.to_vec();
        body[..8].copy_from_slice(&sequence.to_le_bytes());
        msg.body = body.into();
        host.assess_send(&origin, msg).await
    };
    for _ in 0..1000 {
        let _ = assess(&mut msg).await;
    }
    let check = || {
        let outcome = ready_now(assess(&mut msg));
        assert!(matches!(outcome, RiskOutcome::Allow), "{outcome:?}");
    };
    if let Some(mut cold) = Cold::from_env() {
        let median = cold.median_ns((iterations / 10).max(1), check);
        row(label, Some(&cold), 100, median);
        return;
    }
    let median = median_batch_ns(iterations, check);
    row(label, None, 100, median);
}
