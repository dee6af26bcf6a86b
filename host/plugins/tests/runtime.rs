//! The plugin runtime against real components (built from `plugins/` and `tests/guest/` by
//! `scripts/build-plugins.sh`): verdicts, chains, sandbox, limits, failure policies,
//! circuit breaker, KV quota and persistence, and the hot lifecycle.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use im_plugins::bindings::types;
use im_plugins::{
    CallOrigin, FilterOutcome, PluginError, PluginHost, PluginHostConfig, PluginMessage,
    RiskOutcome,
};
use im_store::Store;
use im_store::sqlite::{SqliteOptions, SqliteStore};

fn component(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/guest/wasm32-wasip2/release")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|_| {
        panic!(
            "{} is missing: build the guest plugins first (scripts/build-plugins.sh)",
            path.display()
        )
    })
}

fn manifest(id: &str, hooks: &str, extra: &str) -> String {
    format!("id = \"{id}\"\nversion = \"1.0.0\"\nhooks = [{hooks}]\n{extra}\n")
}

fn filter_manifest(id: &str, extra: &str) -> String {
    manifest(id, "\"message-filter\"", extra)
}

struct Fixture {
    host: Arc<PluginHost>,
    store: Arc<SqliteStore>,
    config: PluginHostConfig,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqliteStore::open(&dir.path().join("im.db"), SqliteOptions::default())
            .await
            .unwrap(),
    );
    let config = PluginHostConfig {
        dir: dir.path().join("plugins"),
        cache_dir: dir.path().join("cache"),
        node_id: "test-node".into(),
    };
    let host = PluginHost::start(config.clone(), store.clone() as Arc<dyn Store>)
        .await
        .unwrap();
    Fixture {
        host,
        store,
        config,
        _dir: dir,
    }
}

fn origin() -> CallOrigin {
    CallOrigin {
        transport: "tcp",
        remote_ip: Some(std::net::Ipv4Addr::LOCALHOST.into()),
    }
}

fn message(text: &str) -> PluginMessage {
    PluginMessage {
        conversation_id: "u:alice:bob".into(),
        sender: types::Principal {
            user_id: "alice".into(),
            device_id: "phone".into(),
        },
        target: types::MessageTarget::User("bob".into()),
        client_msg_id: "c1".into(),
        content_type: "text/plain".into(),
        body: text.as_bytes().to_vec().into(),
    }
}

/// What the filter chain made of a message.
#[derive(Debug, PartialEq)]
enum Filtered {
    Pass {
        body: Vec<u8>,
        content_type: String,
        modified: bool,
    },
    Reject {
        reason: String,
    },
    Drop,
}

/// Runs the filter chain on a text message from alice to bob.
async fn filter(host: &PluginHost, text: &str) -> Filtered {
    let mut message = message(text);
    match host.filter(&origin(), &mut message).await {
        FilterOutcome::Pass { modified } => Filtered::Pass {
            body: message.body.to_vec(),
            content_type: message.content_type,
            modified,
        },
        FilterOutcome::Reject { reason } => Filtered::Reject { reason },
        FilterOutcome::Drop => Filtered::Drop,
    }
}

fn pass(text: &str) -> Filtered {
    Filtered::Pass {
        body: text.as_bytes().to_vec(),
        content_type: "text/plain".into(),
        modified: false,
    }
}

fn modified(text: &str) -> Filtered {
    Filtered::Pass {
        body: text.as_bytes().to_vec(),
        content_type: "text/plain".into(),
        modified: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyword_filter_masks_and_rejects() {
    let f = fixture().await;
    let config = "[config]\nwords = \"badword,诈骗\"\naction = \"mask\"";
    f.host
        .install(
            &filter_manifest("keyword-filter", config),
            component("keyword_filter.wasm"),
        )
        .await
        .unwrap();
    assert_eq!(filter(&f.host, "all fine").await, pass("all fine"));
    assert_eq!(
        filter(&f.host, "a ＢＡＤword!").await,
        modified("a *******!")
    );
    assert_eq!(filter(&f.host, "这是诈骗").await, modified("这是**"));
    // Only text is filtered: the content type, read through current-call when a word
    // occurs, lets a binary body holding the word pass untouched.
    let mut binary = message("a badword inside");
    binary.content_type = "application/octet-stream".into();
    assert_eq!(
        f.host.filter(&origin(), &mut binary).await,
        FilterOutcome::Pass { modified: false }
    );
    assert_eq!(&binary.body[..], b"a badword inside");
    let reject = "[config]\nwords = \"scam\"\naction = \"reject\"";
    f.host
        .install(
            &filter_manifest("keyword-filter", reject),
            component("keyword_filter.wasm"),
        )
        .await
        .unwrap();
    assert!(matches!(
        filter(&f.host, "SCAM!").await,
        Filtered::Reject { .. }
    ));
    let info = &f.host.list()[0];
    assert_eq!(info.verdicts.get("reject"), Some(&1));
    assert!(
        info.direct_calls,
        "a std guest's imports never wait: it is called without a fiber"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_screen_gets_the_body_as_earlier_filters_left_it() {
    // The keyword filter exports body-screen (its body comes with the call); the tag
    // filters export message-filter (they read it through the message). Each sees what the
    // one before it wrote.
    let f = fixture().await;
    let tag = |id: &str, order: i32, tag: &str| {
        filter_manifest(id, &format!("order = {order}\n[config]\ntag = \"{tag}\""))
    };
    f.host
        .install(&tag("before", 1, "badword"), component("tag_filter.wasm"))
        .await
        .unwrap();
    let words = "order = 2\n[config]\nwords = \"badword\"\naction = \"mask\"";
    f.host
        .install(
            &filter_manifest("keyword-filter", words),
            component("keyword_filter.wasm"),
        )
        .await
        .unwrap();
    f.host
        .install(&tag("after", 3, "badword"), component("tag_filter.wasm"))
        .await
        .unwrap();
    assert_eq!(
        filter(&f.host, "hello").await,
        modified("hello ******* badword")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_template_refuses_shouting() {
    let f = fixture().await;
    f.host
        .install(
            &filter_manifest("no-shouting", "[config]\nmin_letters = \"4\""),
            component("plugin_template.wasm"),
        )
        .await
        .unwrap();
    assert!(matches!(
        filter(&f.host, "STOP THAT").await,
        Filtered::Reject { reason } if reason.contains("shout")
    ));
    assert_eq!(filter(&f.host, "Stop that").await, pass("Stop that"));
    assert_eq!(filter(&f.host, "OK!").await, pass("OK!"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_run_in_order_and_stop_at_reject() {
    let f = fixture().await;
    let tag = |id: &str, order: i32, tag: &str| {
        filter_manifest(id, &format!("order = {order}\n[config]\ntag = \"{tag}\""))
    };
    f.host
        .install(&tag("second", 20, "B"), component("tag_filter.wasm"))
        .await
        .unwrap();
    f.host
        .install(&tag("first", 10, "A"), component("tag_filter.wasm"))
        .await
        .unwrap();
    assert_eq!(filter(&f.host, "x").await, modified("x A B"));
    // A rejecting filter between them stops the chain: the third never runs.
    let reject = "order = 15\n[config]\nwords = \"x\"\naction = \"reject\"";
    f.host
        .install(
            &filter_manifest("censor", reject),
            component("keyword_filter.wasm"),
        )
        .await
        .unwrap();
    assert!(matches!(
        filter(&f.host, "x").await,
        Filtered::Reject { .. }
    ));
    let second = f
        .host
        .list()
        .into_iter()
        .find(|p| p.id == "second")
        .unwrap();
    assert_eq!(second.calls, 1, "the filter after a reject is not called");
}

/// Installs the spin filter failing open with a deadline of `deadline_ms`.
async fn install_spin_filter(host: &PluginHost, deadline_ms: u32) {
    let limits = format!("failure = \"open\"\n[limits]\ndeadline_ms = {deadline_ms}");
    host.install(
        &filter_manifest("spin", &limits),
        component("spin_filter.wasm"),
    )
    .await
    .unwrap();
}

/// Sends a message into the spin filter: its deadline stops it and, failing open, the
/// message passes unchanged.
async fn assert_spin_interrupted(host: &PluginHost) {
    let started = Instant::now();
    assert_eq!(filter(host, "spin forever").await, pass("spin forever"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "interrupted after {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_is_interrupted_at_its_deadline() {
    let f = fixture().await;
    install_spin_filter(&f.host, 50).await;
    assert_spin_interrupted(&f.host).await;
    // The plugin still serves other messages, from a fresh instance.
    assert_eq!(filter(&f.host, "hello").await, pass("hello"));
    let info = &f.host.list()[0];
    assert_eq!(info.failures["timeout"], 1);
    // Failing closed rejects instead.
    let closed = "failure = \"closed\"\n[limits]\ndeadline_ms = 50";
    f.host
        .install(
            &filter_manifest("spin", closed),
            component("spin_filter.wasm"),
        )
        .await
        .unwrap();
    assert!(matches!(
        filter(&f.host, "spin").await,
        Filtered::Reject { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_epoch_ticker_sleeps_and_a_call_still_meets_its_deadline() {
    let f = fixture().await;
    install_spin_filter(&f.host, 50).await;
    let waiting = Instant::now();
    while !f.host.epoch_ticker_asleep() {
        assert!(
            waiting.elapsed() < Duration::from_secs(10),
            "the epoch ticker kept ticking with no plugin code running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The first call after the sleep wakes the ticker, so its deadline still stops it.
    assert_spin_interrupted(&f.host).await;
    assert_eq!(f.host.list()[0].failures["timeout"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ticker_ticks_coarsely_for_short_calls_and_finely_for_a_long_one() {
    let f = fixture().await;
    // A 100 ms deadline: the coarse tick is 10 ms (a quarter, at most 10 ms).
    install_spin_filter(&f.host, 100).await;
    // Short calls back to back for 300 ms: a tick every 10 ms, not every millisecond.
    let (ticks, started) = (f.host.epoch_ticks(), Instant::now());
    let mut calls = 0;
    while started.elapsed() < Duration::from_millis(300) {
        assert_eq!(filter(&f.host, "hello").await, pass("hello"));
        calls += 1;
    }
    let short_ticks = f.host.epoch_ticks() - ticks;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    assert!(
        short_ticks <= elapsed_ms / 4,
        "{short_ticks} ticks in {elapsed_ms} ms of {calls} short calls"
    );
    // A call that spins is found lasting within a coarse tick or two, then ticked every
    // millisecond until its deadline stops it.
    let (ticks, started) = (f.host.epoch_ticks(), Instant::now());
    assert_eq!(filter(&f.host, "spin forever").await, pass("spin forever"));
    let spin_ticks = f.host.epoch_ticks() - ticks;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(100),
        "stopped early: {elapsed:?}"
    );
    assert!(
        spin_ticks >= 25,
        "{spin_ticks} ticks in the {elapsed:?} of a spinning call"
    );
    assert_eq!(f.host.list()[0].failures["timeout"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_stops_at_the_cap() {
    let f = fixture().await;
    // A deadline far off: faulting 16 MiB in on a loaded machine may take longer than the
    // default 20 ms, and this test is about the memory cap.
    let limits = "[limits]\nmemory_mib = 16\ndeadline_ms = 2000";
    f.host
        .install(
            &filter_manifest("bomb", limits),
            component("memory_bomb.wasm"),
        )
        .await
        .unwrap();
    assert!(matches!(
        filter(&f.host, "bomb").await,
        Filtered::Reject { .. }
    ));
    assert_eq!(
        f.host.list()[0].failures["memory"],
        1,
        "{:?}",
        f.host.list()[0].failures
    );
    assert_eq!(filter(&f.host, "calm").await, pass("calm"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_is_isolated_and_repeated_failures_open_the_breaker() {
    let f = fixture().await;
    f.host
        .install(
            &filter_manifest("panics", ""),
            component("panic_filter.wasm"),
        )
        .await
        .unwrap();
    for _ in 0..5 {
        assert!(matches!(
            filter(&f.host, "panic").await,
            Filtered::Reject { .. }
        ));
    }
    let info = &f.host.list()[0];
    assert_eq!(info.failures["trap"], 5);
    assert!(info.breaker_open);
    assert_eq!(info.breaker_trips, 1);
    // While open the plugin is not called at all; the closed policy rejects.
    let calls_before = info.calls;
    assert!(matches!(
        filter(&f.host, "fine").await,
        Filtered::Reject { .. }
    ));
    assert_eq!(f.host.list()[0].calls, calls_before);
    // After the back-off a trial call succeeds and closes the breaker.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(filter(&f.host, "fine").await, pass("fine"));
    assert!(!f.host.list()[0].breaker_open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_grants_no_files_sockets_or_environment() {
    let f = fixture().await;
    f.host
        .install(
            &filter_manifest("escape", ""),
            component("escape_filter.wasm"),
        )
        .await
        .unwrap();
    let text = "let me out";
    match filter(&f.host, text).await {
        Filtered::Reject { reason } => {
            let body = text.len();
            assert_eq!(
                reason,
                format!("file:denied dir:denied net:denied env:0 body:{body}")
            )
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        !f.host.list()[0].direct_calls,
        "a component importing files and sockets is called on a fiber"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_call_that_would_wait_fails_and_the_plugin_keeps_serving() {
    let f = fixture().await;
    f.host
        .install(
            &filter_manifest("sleeper", ""),
            component("sleep_filter.wasm"),
        )
        .await
        .unwrap();
    assert!(f.host.list()[0].direct_calls);
    assert_eq!(filter(&f.host, "awake").await, pass("awake"));
    match filter(&f.host, "sleep now").await {
        Filtered::Reject { reason } => {
            assert_eq!(reason, "plugin sleeper unavailable (trap)")
        }
        other => panic!("a sleeping call must fail, got {other:?}"),
    }
    let info = &f.host.list()[0];
    assert_eq!(info.failures["trap"], 1);
    assert_eq!(info.failures["timeout"], 0);
    // The failed instance was discarded; a fresh one serves the next call.
    assert_eq!(filter(&f.host, "awake").await, pass("awake"));
    assert_eq!(f.host.list()[0].verdicts.get("allow"), Some(&2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_quota_holds_and_data_survives_restart_and_upgrade() {
    let f = fixture().await;
    let limits = "[limits]\nkv_max_keys = 100\nkv_max_bytes = 1000000";
    f.host
        .install(&filter_manifest("hog", limits), component("kv_hog.wasm"))
        .await
        .unwrap();
    match filter(&f.host, "fill").await {
        // One key holds the round counter.
        Filtered::Reject { reason } => {
            assert_eq!(reason, "stored 99 then Error::QuotaExceeded")
        }
        other => panic!("unexpected {other:?}"),
    }
    f.host.flush_kv().await;
    assert_eq!(f.store.load_plugin_kv("hog", 0).await.unwrap().len(), 100);
    // A byte quota stops it too, and an upgrade keeps the data.
    let bytes = "[limits]\nkv_max_keys = 1000\nkv_max_bytes = 120000";
    f.host
        .install(&filter_manifest("hog", bytes), component("kv_hog.wasm"))
        .await
        .unwrap();
    let stored: usize = match filter(&f.host, "fill").await {
        Filtered::Reject { reason } => {
            let rest = reason.strip_prefix("stored ").expect("a report");
            let (n, error) = rest.split_once(" then ").expect("stopped by an error");
            assert_eq!(error, "Error::QuotaExceeded");
            n.parse().unwrap()
        }
        other => panic!("unexpected {other:?}"),
    };
    assert!(stored > 0);
    f.host.flush_kv().await;
    let records = f.store.load_plugin_kv("hog", 0).await.unwrap();
    assert_eq!(
        records.len(),
        100 + stored,
        "the first round's keys were kept"
    );
    let used: usize = records.iter().map(|r| r.key.len() + r.value.len()).sum();
    let next_key = format!("k{}", 1_000_000 + stored);
    assert!(
        used <= 120_000 && used + next_key.len() + 1024 > 120_000,
        "{used} bytes used"
    );
    // A restarted host finds the plugin and its data.
    drop(f.host);
    let host = PluginHost::start(f.config.clone(), f.store.clone() as Arc<dyn Store>)
        .await
        .unwrap();
    let info = &host.list()[0];
    assert_eq!((info.id.as_str(), info.kv_keys), ("hog", 100 + stored));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_components_are_refused_and_the_old_version_keeps_running() {
    let f = fixture().await;
    f.host
        .install(
            &filter_manifest("guard", "[config]\ntag = \"v1\""),
            component("tag_filter.wasm"),
        )
        .await
        .unwrap();
    let refused = [
        (component("foreign_import.wasm"), "imports do not match"),
        (
            b"\0asm this is not a component".to_vec(),
            "invalid component",
        ),
        (
            component("risk_control.wasm"),
            "does not export im:plugin/message-filter",
        ),
    ];
    for (wasm, needle) in refused {
        let err = f
            .host
            .install(&filter_manifest("guard", ""), wasm)
            .await
            .unwrap_err();
        assert!(matches!(err, PluginError::InvalidComponent(_)), "{err}");
        assert!(err.to_string().contains(needle), "{err}");
        assert_eq!(filter(&f.host, "m").await, modified("m v1"));
    }
    let err = f
        .host
        .install("id = \"Guard\"", component("tag_filter.wasm"))
        .await
        .unwrap_err();
    assert!(matches!(err, PluginError::InvalidManifest(_)), "{err}");
    assert_eq!(f.host.list().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_install_upgrade_disable_enable_uninstall_and_restart() {
    let f = fixture().await;
    let v = |tag: &str, version: &str| {
        format!(
            "id = \"tagger\"\nversion = \"{version}\"\nhooks = [\"message-filter\"]\n[config]\ntag = \"{tag}\"\n"
        )
    };
    f.host
        .install(&v("v1", "1.0.0"), component("tag_filter.wasm"))
        .await
        .unwrap();
    assert_eq!(filter(&f.host, "m").await, modified("m v1"));
    let info = f
        .host
        .install(&v("v2", "2.0.0"), component("tag_filter.wasm"))
        .await
        .unwrap();
    assert_eq!(info.version, "2.0.0");
    assert_eq!(filter(&f.host, "m").await, modified("m v2"));
    f.host.set_enabled("tagger", false).await.unwrap();
    assert_eq!(filter(&f.host, "m").await, pass("m"));
    // Disabled state and version survive a restart.
    let restarted = PluginHost::start(f.config.clone(), f.store.clone() as Arc<dyn Store>)
        .await
        .unwrap();
    let info = &restarted.list()[0];
    assert_eq!((info.version.as_str(), info.enabled), ("2.0.0", false));
    f.host.set_enabled("tagger", true).await.unwrap();
    assert_eq!(filter(&f.host, "m").await, modified("m v2"));
    f.host.uninstall("tagger", false).await.unwrap();
    assert_eq!(filter(&f.host, "m").await, pass("m"));
    assert!(matches!(
        f.host.uninstall("tagger", false).await,
        Err(PluginError::NotFound(_))
    ));
    assert!(matches!(
        f.host.set_enabled("tagger", true).await,
        Err(PluginError::NotFound(_))
    ));
    let restarted = PluginHost::start(f.config.clone(), f.store.clone() as Arc<dyn Store>)
        .await
        .unwrap();
    assert!(restarted.list().is_empty());
}

/// A fixture with risk control installed under `config` (the manifest's `[config]` lines).
async fn risk_control_with(config: &str) -> Fixture {
    let f = fixture().await;
    let m = manifest(
        "risk-control",
        "\"risk-control\"",
        &format!("[config]\n{config}"),
    );
    f.host
        .install(&m, component("risk_control.wasm"))
        .await
        .unwrap();
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn risk_control_throttles_bursts_and_blocks_repeats() {
    let f = risk_control_with("send_rate = \"1\"\nsend_burst = \"5\"\nrepeat_limit = \"2\"").await;
    let send = async |text: &str| f.host.assess_send(&origin(), &mut message(text)).await;
    assert_eq!(send("one").await, RiskOutcome::Allow);
    assert_eq!(send("one").await, RiskOutcome::Allow);
    assert!(
        matches!(send("one").await, RiskOutcome::Block { reason } if reason.contains("3 times"))
    );
    assert_eq!(send("two").await, RiskOutcome::Allow);
    assert_eq!(send("three").await, RiskOutcome::Allow);
    // The burst of 5 is spent: the next is throttled with a retry-after of about a second.
    match send("four").await {
        RiskOutcome::Throttle {
            retry_after_ms,
            reason,
        } => {
            assert!((1..=1000).contains(&retry_after_ms), "{retry_after_ms}");
            assert!(reason.contains("alice"), "{reason}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn risk_control_remembers_as_many_bodies_as_configured() {
    // One slot: a body is forgotten as soon as another is sent.
    let f = risk_control_with(
        "send_rate = \"1000\"\nsend_burst = \"1000\"\nrepeat_limit = \"1\"\nrepeat_slots = \"1\"",
    )
    .await;
    let send = async |text: &str| f.host.assess_send(&origin(), &mut message(text)).await;
    assert_eq!(send("one").await, RiskOutcome::Allow);
    assert_eq!(send("two").await, RiskOutcome::Allow);
    assert_eq!(send("one").await, RiskOutcome::Allow, "one was forgotten");
    assert!(
        matches!(send("one").await, RiskOutcome::Block { reason } if reason.contains("2 times"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_guard_counts_every_send_of_a_user_assessed_at_once() {
    // A burst of 20 that never refills in the test's time: of 128 sends assessed at once on
    // two threads, exactly 20 may pass. A state change lost between two calls (each writing
    // over the other's) would let more through.
    let f =
        risk_control_with("send_rate = \"0.001\"\nsend_burst = \"20\"\nrepeat_limit = \"1000\"")
            .await;
    let host = f.host.clone();
    let sends = (0..128).map(|n| {
        let host = host.clone();
        tokio::spawn(async move {
            host.assess_send(&origin(), &mut message(&format!("text {n}")))
                .await
        })
    });
    let mut allowed = 0;
    for send in sends.collect::<Vec<_>>() {
        match send.await.unwrap() {
            RiskOutcome::Allow => allowed += 1,
            RiskOutcome::Throttle { reason, .. } => {
                assert!(reason.contains("alice"), "{reason}")
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(allowed, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_guard_on_a_fiber_keeps_and_clears_state_and_fails_closed_out_of_quota() {
    let f = fixture().await;
    // One key of quota; the plugin exports send-guard only (no `risk-control.assess`).
    let m = manifest(
        "counter",
        "\"risk-control\"",
        "[limits]\nkv_max_keys = 1\n[config]\nlimit = \"2\"",
    );
    f.host
        .install(&m, component("count_guard.wasm"))
        .await
        .unwrap();
    assert!(
        !f.host.list()[0].direct_calls,
        "a component importing the filesystem is called on a fiber"
    );
    let send = async |user: &str, text: &str| {
        let mut sent = message(text);
        sent.sender.user_id = user.into();
        f.host.assess_send(&origin(), &mut sent).await
    };
    assert_eq!(send("alice", "a").await, RiskOutcome::Allow);
    assert_eq!(send("alice", "b").await, RiskOutcome::Allow);
    assert!(matches!(
        send("alice", "c").await,
        RiskOutcome::Throttle { reason, .. } if reason.starts_with("send 3 ")
    ));
    // Cleared, the count starts again (and the one key is free meanwhile).
    assert_eq!(send("alice", "reset").await, RiskOutcome::Allow);
    assert_eq!(send("alice", "d").await, RiskOutcome::Allow);
    // Alice's state holds the only key: Bob's cannot be written, so his send is refused.
    assert!(matches!(
        send("bob", "e").await,
        RiskOutcome::Throttle { reason, .. } if reason.contains("cannot record")
    ));
    // Logins pass: nothing in the chain assesses them.
    assert_eq!(
        f.host.assess_login(&origin(), "alice", "phone").await,
        RiskOutcome::Allow
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handle_free_hooks_on_a_fiber_read_the_call_through_current_call() {
    let f = fixture().await;
    let m = manifest(
        "reporter",
        "\"message-filter\", \"risk-control\"",
        "[config]\nblocked = \"mallory\"",
    );
    f.host
        .install(&m, component("call_screen.wasm"))
        .await
        .unwrap();
    assert!(
        !f.host.list()[0].direct_calls,
        "a component importing the filesystem is called on a fiber"
    );
    // The body screen reports the call: every field as the fixture's message and origin
    // give it.
    let sent = message("hi");
    let expected = format!(
        "hi | plugin:reporter node:test-node transport:{} ip:{} conversation:{} sender:{}/{} \
         target:user:bob id:{} type:{}",
        origin().transport,
        origin()
            .remote_ip
            .map(|ip| ip.to_string())
            .unwrap_or_default(),
        sent.conversation_id,
        sent.sender.user_id,
        sent.sender.device_id,
        sent.client_msg_id,
        sent.content_type,
    );
    assert_eq!(
        filter(&f.host, "hi").await,
        Filtered::Pass {
            body: expected.into_bytes(),
            content_type: "text/report".into(),
            modified: true,
        }
    );
    // The send screen reads the sender and the conversation without a handle.
    let mut from_mallory = message("hello");
    from_mallory.sender.user_id = "mallory".into();
    assert_eq!(
        f.host.assess_send(&origin(), &mut from_mallory).await,
        RiskOutcome::Block {
            reason: "mallory may not send to u:alice:bob (5 bytes)".into()
        }
    );
    assert_eq!(
        f.host.assess_send(&origin(), &mut message("hello")).await,
        RiskOutcome::Allow
    );
    // A login is not about a message: current-call says so (the plugin blocks otherwise),
    // even right after a message's call on the same instance.
    assert_eq!(
        f.host.assess_login(&origin(), "alice", "phone").await,
        RiskOutcome::Allow
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_that_lend_handles_still_serve_directly() {
    let f = fixture().await;
    let m = manifest("handles", "\"message-filter\", \"risk-control\"", "");
    f.host
        .install(&m, component("handle_hooks.wasm"))
        .await
        .unwrap();
    assert!(
        f.host.list()[0].direct_calls,
        "it imports nothing that waits"
    );
    assert_eq!(
        filter(&f.host, "quiet please").await,
        modified("QUIET PLEASE from alice over tcp")
    );
    let send = async |text: &str| f.host.assess_send(&origin(), &mut message(text)).await;
    assert_eq!(send("one").await, RiskOutcome::Allow);
    assert_eq!(
        send("one").await,
        RiskOutcome::Block {
            reason: "alice sent the same 3 bytes twice".into()
        }
    );
    assert_eq!(send("two").await, RiskOutcome::Allow);
    assert_eq!(send("one").await, RiskOutcome::Allow);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn risk_control_throttles_logins_per_address() {
    // Sends go to the plugin's send screen; logins still to its `assess`.
    let f = risk_control_with("login_rate = \"0.001\"\nlogin_burst = \"2\"").await;
    let from = |ip: &str| CallOrigin {
        transport: "tcp",
        remote_ip: Some(ip.parse().expect("an address")),
    };
    let login = async |ip: &str| f.host.assess_login(&from(ip), "alice", "phone").await;
    assert_eq!(login("10.0.0.1").await, RiskOutcome::Allow);
    assert_eq!(login("10.0.0.1").await, RiskOutcome::Allow);
    assert!(matches!(
        login("10.0.0.1").await,
        RiskOutcome::Throttle { reason, .. } if reason.contains("10.0.0.1")
    ));
    assert_eq!(login("10.0.0.2").await, RiskOutcome::Allow);
    assert_eq!(
        f.host.assess_send(&origin(), &mut message("hi")).await,
        RiskOutcome::Allow
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_policy_decides_through_the_component() {
    use im_plugins::GroupOutcome;
    use im_plugins::bindings::group_policy::{Group, GroupAction, GroupRequest, Role};
    let f = fixture().await;
    assert_eq!(
        f.host
            .decide_group(
                &origin(),
                GroupRequest {
                    actor: types::Principal {
                        user_id: "olga".into(),
                        device_id: "d".into()
                    },
                    actor_role: None,
                    group: None,
                    action: GroupAction::Create(("team".into(), vec![])),
                }
            )
            .await,
        GroupOutcome::NoPlugins
    );
    let m = manifest(
        "group-policy",
        "\"group-policy\"",
        "[config]\nmax_members = \"3\"",
    );
    f.host
        .install(&m, component("group_policy.wasm"))
        .await
        .unwrap();
    let request =
        |actor: &str, role: Option<Role>, members: u32, action: GroupAction| GroupRequest {
            actor: types::Principal {
                user_id: actor.into(),
                device_id: "d".into(),
            },
            actor_role: role,
            group: Some(Group {
                group_id: "g".into(),
                name: "team".into(),
                owner: "olga".into(),
                member_count: members,
            }),
            action,
        };
    let invite = GroupAction::Invite(vec!["x".into()]);
    assert_eq!(
        f.host
            .decide_group(
                &origin(),
                request("olga", Some(Role::Owner), 2, invite.clone())
            )
            .await,
        GroupOutcome::Allow
    );
    match f
        .host
        .decide_group(&origin(), request("olga", Some(Role::Owner), 3, invite))
        .await
    {
        GroupOutcome::Deny { reason } => assert!(reason.contains("exceed 3"), "{reason}"),
        other => panic!("unexpected {other:?}"),
    }
    match f
        .host
        .decide_group(
            &origin(),
            request(
                "m",
                Some(Role::Member),
                2,
                GroupAction::Kick(vec!["x".into()]),
            ),
        )
        .await
    {
        GroupOutcome::Deny { reason } => assert!(reason.contains("owner and admins"), "{reason}"),
        other => panic!("unexpected {other:?}"),
    }
}
