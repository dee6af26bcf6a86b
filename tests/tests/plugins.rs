//! Plugins seen through real client connections: filters mask and reject, risk control
//! throttles, hostile plugins are contained while other traffic continues, the admin API
//! guards and drives the lifecycle, and a hot upgrade loses or drops nothing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use im_client::{Event, v1};
use im_e2e::*;

const WAIT: Duration = Duration::from_secs(30);

fn filter_manifest(id: &str, extra: &str) -> String {
    format!("id = \"{id}\"\nversion = \"1.0.0\"\nhooks = [\"message-filter\"]\n{extra}\n")
}

on_every_transport!(
    filter_masks_and_rejects,
    spammer_is_throttled,
    repeated_bodies_are_blocked,
    hostile_plugins_are_contained
);

async fn filter_masks_and_rejects(t: Transport) {
    let server = TestServer::start().await;
    let (_bob, mut bob_events) = server.client(t, "bob", "phone").await;
    let (alice, _) = server.client(t, "alice", "phone").await;
    let mask = "[config]\nwords = \"darn\"\naction = \"mask\"";
    server
        .install_plugin(&filter_manifest("mask", mask), "keyword_filter.wasm")
        .await;
    let reject = "order = 200\n[config]\nwords = \"scam\"\naction = \"reject\"";
    server
        .install_plugin(&filter_manifest("reject", reject), "keyword_filter.wasm")
        .await;

    alice.send_text("bob", "well ＤＡＲＮ it").await.unwrap();
    let got = receive(&mut bob_events, 1, WAIT).await;
    assert_eq!(got[0].body, text("well **** it"));
    // The sender's own history shows what was stored: the masked text.
    let stored = alice.sync("u:alice:bob", 0, 10).await.unwrap();
    assert_eq!(stored.messages[0].body, text("well **** it"));

    let err = alice.send_text("bob", "a SCAM offer").await.unwrap_err();
    assert_eq!(err.code(), Some(v1::ErrorCode::Rejected));
    assert!(err.to_string().contains("blocked word"), "{err}");
    assert_no_message(&mut bob_events, Duration::from_millis(300)).await;
    // The rejected message took no seq: the next one is 2.
    assert_eq!(alice.send_text("bob", "fine").await.unwrap().seq, 2);
}

/// Installs the risk-control plugin with `config` (lines of its `[config]` table).
async fn install_risk_control(server: &TestServer, config: &str) {
    let manifest = format!(
        "id = \"risk-control\"\nversion = \"0.1.0\"\nhooks = [\"risk-control\"]\n[config]\n{config}"
    );
    server.install_plugin(&manifest, "risk_control.wasm").await;
}

async fn spammer_is_throttled(t: Transport) {
    let server = TestServer::start().await;
    install_risk_control(
        &server,
        "send_rate = \"1\"\nsend_burst = \"5\"\nrepeat_limit = \"100\"",
    )
    .await;
    let (_bob, mut bob_events) = server.client(t, "bob", "phone").await;
    let (spammer, _) = server.client(t, "spammer", "phone").await;
    let (carol, _) = server.client(t, "carol", "phone").await;
    let mut throttled = None;
    for i in 0..10 {
        match spammer.send_text("bob", &format!("buy now {i}")).await {
            Ok(_) => {}
            Err(err) => {
                throttled = Some((i, err));
                break;
            }
        }
    }
    let (sent, err) = throttled.expect("the spammer was throttled");
    assert_eq!(sent, 5, "the burst of 5 went through");
    assert_eq!(err.code(), Some(v1::ErrorCode::Throttled));
    // Other users are not affected.
    for i in 0..5 {
        carol.send_text("bob", &format!("hello {i}")).await.unwrap();
    }
    assert_eq!(receive(&mut bob_events, 10, WAIT).await.len(), 10);
}

async fn repeated_bodies_are_blocked(t: Transport) {
    let server = TestServer::start().await;
    install_risk_control(
        &server,
        "send_rate = \"1000\"\nsend_burst = \"1000\"\nrepeat_limit = \"3\"",
    )
    .await;
    let (_bob, mut bob_events) = server.client(t, "bob", "phone").await;
    let (dave, _) = server.client(t, "dave", "phone").await;
    // Distinct bodies in between do not reset or hide the repeated one.
    for i in 0..3 {
        dave.send_text("bob", "same offer").await.unwrap();
        dave.send_text("bob", &format!("other {i}")).await.unwrap();
    }
    let err = dave.send_text("bob", "same offer").await.unwrap_err();
    assert_eq!(err.code(), Some(v1::ErrorCode::Rejected), "{err}");
    assert!(err.to_string().contains("4 times"), "{err}");
    // Other bodies still pass.
    dave.send_text("bob", "something new").await.unwrap();
    assert_eq!(receive(&mut bob_events, 7, WAIT).await.len(), 7);
}

async fn hostile_plugins_are_contained(t: Transport) {
    let server = TestServer::start().await;
    let (bob, mut bob_events) = server.client(t, "bob", "phone").await;
    let (alice, _) = server.client(t, "alice", "phone").await;
    let (carol, mut carol_events) = server.client(t, "carol", "phone").await;
    // Fail open: an infinite loop and a memory bomb cost a deadline, then the message passes.
    let spin = "order = 1\nfailure = \"open\"\n[limits]\ndeadline_ms = 50";
    server
        .install_plugin(&filter_manifest("spin", spin), "spin_filter.wasm")
        .await;
    // A deadline far beyond the time to fill 16 MiB, so the memory cap is what stops it
    // even on a loaded machine.
    let bomb = "order = 2\nfailure = \"open\"\n[limits]\nmemory_mib = 16\ndeadline_ms = 2000";
    server
        .install_plugin(&filter_manifest("bomb", bomb), "memory_bomb.wasm")
        .await;
    // Fail closed: a panicking filter rejects what it cannot judge.
    server
        .install_plugin(&filter_manifest("panics", "order = 3"), "panic_filter.wasm")
        .await;

    let started = Instant::now();
    alice.send_text("bob", "spin the wheel").await.unwrap();
    alice.send_text("bob", "bomb's away").await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let err = alice.send_text("bob", "panic now").await.unwrap_err();
    assert_eq!(err.code(), Some(v1::ErrorCode::Rejected));
    // Everyone else keeps chatting, in both directions.
    for i in 0..20 {
        carol.send_text("bob", &format!("c{i}")).await.unwrap();
        bob.send_text("carol", &format!("b{i}")).await.unwrap();
    }
    assert_eq!(receive(&mut bob_events, 22, WAIT).await.len(), 22);
    assert_eq!(receive(&mut carol_events, 20, WAIT).await.len(), 20);
    let plugins = server.admin("GET", "/v1/plugins", None, None).await.json;
    let failures = |id: &str, kind: &str| {
        plugins
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == id)
            .unwrap()["failures"][kind]
            .as_u64()
            .unwrap()
    };
    assert_eq!(failures("spin", "timeout"), 1);
    assert_eq!(failures("bomb", "memory"), 1);
    assert_eq!(failures("panics", "trap"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_requires_its_token_and_refuses_bad_input() {
    use base64::Engine as _;
    let server = TestServer::start().await;
    assert_eq!(
        server
            .admin("GET", "/v1/plugins", None, Some(""))
            .await
            .status,
        401
    );
    let wrong = server
        .admin("GET", "/v1/plugins", None, Some("not-the-token"))
        .await;
    assert_eq!(
        (wrong.status, wrong.json["code"].as_str()),
        (401, Some("unauthorized"))
    );
    assert_eq!(
        server.admin("GET", "/v1/plugins", None, None).await.json,
        serde_json::json!([])
    );

    server
        .install_plugin(
            &filter_manifest("guard", "[config]\ntag = \"v1\""),
            "tag_filter.wasm",
        )
        .await;
    let encode = |file: &str| base64::engine::general_purpose::STANDARD.encode(component(file));
    let cases = [
        (serde_json::json!({"manifest": 1}), 400, "bad_request"),
        (
            serde_json::json!({"manifest": filter_manifest("other", ""), "wasm_base64": encode("tag_filter.wasm")}),
            400,
            "id_mismatch",
        ),
        (
            serde_json::json!({"manifest": "id = \"guard\"", "wasm_base64": ""}),
            400,
            "invalid_manifest",
        ),
        (
            serde_json::json!({"manifest": filter_manifest("guard", ""), "wasm_base64": "!!!"}),
            400,
            "bad_request",
        ),
        (
            serde_json::json!({"manifest": filter_manifest("guard", ""), "wasm_base64": encode("foreign_import.wasm")}),
            400,
            "invalid_component",
        ),
    ];
    for (body, status, code) in cases {
        let response = server
            .admin("PUT", "/v1/plugins/guard", Some(body), None)
            .await;
        assert_eq!(
            (response.status, response.json["code"].as_str()),
            (status, Some(code)),
            "{}",
            response.json
        );
    }
    // Without the token nothing changes.
    let unauthorized = server
        .admin("DELETE", "/v1/plugins/guard", None, Some("x"))
        .await;
    assert_eq!(unauthorized.status, 401);
    // The running version is untouched.
    let (_bob, mut bob_events) = server.client(Transport::Tcp, "bob", "phone").await;
    let (alice, _) = server.client(Transport::Tcp, "alice", "phone").await;
    alice.send_text("bob", "m").await.unwrap();
    assert_eq!(
        receive(&mut bob_events, 1, WAIT).await[0].body,
        text("m v1")
    );
    assert_eq!(
        server
            .admin("POST", "/v1/plugins/nope/enable", None, None)
            .await
            .status,
        404
    );
    assert_eq!(
        server
            .admin("DELETE", "/v1/plugins/nope", None, None)
            .await
            .status,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_upgrade_drops_no_connection_and_loses_no_message() {
    let server = TestServer::start().await;
    let (_bob, mut bob_events) = server.client(Transport::Tcp, "bob", "phone").await;
    // Bob reads as the messages come (as an application does), until told how many to
    // expect; a disconnect of his is a failure too.
    let (expect_total, mut total) = tokio::sync::oneshot::channel::<usize>();
    let bob_reads = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut expected = None;
        loop {
            if let Ok(n) = total.try_recv() {
                expected = Some(n);
            }
            if expected.is_some_and(|n| got.len() >= n) {
                break;
            }
            match tokio::time::timeout(Duration::from_millis(50), bob_events.next()).await {
                Ok(Some(Event::Message(m))) => got.push(m),
                Ok(Some(event @ (Event::Disconnected { .. } | Event::Closed { .. }))) => {
                    panic!("bob: {event:?}")
                }
                Ok(Some(_)) | Err(_) => {}
                Ok(None) => panic!("bob's events ended"),
            }
        }
        (got, bob_events)
    });
    // Three senders, one per transport, sending continuously while the filter changes.
    let mut senders = Vec::new();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for (user, t) in [
        ("alice", Transport::Tcp),
        ("carol", Transport::WebSocket),
        ("dave", Transport::Quic),
    ] {
        let (client, mut events) = server.client(t, user, "phone").await;
        let stop = stop.clone();
        senders.push(tokio::spawn(async move {
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                client
                    .send_text("bob", &format!("{user} {sent}"))
                    .await
                    .expect("every send is acked");
                sent += 1;
            }
            // No disconnect happened on this client.
            while let Ok(Some(event)) =
                tokio::time::timeout(Duration::from_millis(50), events.next()).await
            {
                assert!(
                    !matches!(event, Event::Disconnected { .. } | Event::Closed { .. }),
                    "{user}: {event:?}"
                );
            }
            (user, sent, client)
        }));
    }
    let pause = || tokio::time::sleep(Duration::from_millis(300));
    pause().await;
    let tag = |v: &str| {
        format!(
            "id = \"tagger\"\nversion = \"{v}.0.0\"\nhooks = [\"message-filter\"]\n[config]\ntag = \"v{v}\"\n"
        )
    };
    server.install_plugin(&tag("1"), "tag_filter.wasm").await;
    pause().await;
    server.install_plugin(&tag("2"), "tag_filter.wasm").await;
    pause().await;
    for (method, path, status) in [
        ("POST", "/v1/plugins/tagger/disable", 200),
        ("POST", "/v1/plugins/tagger/enable", 200),
        ("DELETE", "/v1/plugins/tagger", 204),
    ] {
        let answer = server.admin(method, path, None, None).await;
        assert_eq!(answer.status, status, "{method} {path}");
        pause().await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut expected: HashMap<&str, u64> = HashMap::new();
    let mut clients = Vec::new();
    for sender in senders {
        let (user, sent, client) = sender.await.unwrap();
        expected.insert(user, sent);
        clients.push(client);
    }
    // Every session is still the one it started as.
    assert_eq!(server.logged_in(), 4);
    let total: u64 = expected.values().sum();
    expect_total.send(total as usize).unwrap();
    let (got, mut bob_events) = tokio::time::timeout(WAIT, bob_reads)
        .await
        .expect("bob received every message in time")
        .unwrap();
    assert_no_message(&mut bob_events, Duration::from_millis(300)).await;
    // Per sender: every message exactly once, in order; the tags show the filter changes.
    let mut next: HashMap<String, u64> = HashMap::new();
    let mut tags = std::collections::BTreeSet::new();
    for m in &got {
        let body = String::from_utf8(m.body.to_vec()).unwrap();
        let mut words = body.split(' ');
        let (user, n) = (
            words.next().unwrap().to_owned(),
            words.next().unwrap().parse::<u64>().unwrap(),
        );
        tags.insert(words.next().unwrap_or("untagged").to_owned());
        let expected_n = next.entry(user.clone()).or_default();
        assert_eq!(n, *expected_n, "{user}: in order, exactly once");
        *expected_n += 1;
    }
    for (user, sent) in expected {
        assert_eq!(next[user], sent, "{user}: all {sent} delivered");
    }
    assert!(
        tags.contains("v1") && tags.contains("v2") && tags.contains("untagged"),
        "{tags:?}"
    );
}

/// An HS256 JWT with `claims`, signed with `secret`.
fn jwt(secret: &str, claims: serde_json::Value) -> String {
    use base64::Engine as _;
    use hmac::Mac as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = b64.encode(claims.to_string());
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{header}.{payload}").as_bytes());
    format!(
        "{header}.{payload}.{}",
        b64.encode(mac.finalize().into_bytes())
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_go_through_the_auth_plugin() {
    let server = TestServer::start().await;
    let secret = "e2e-secret-0123456789";
    let manifest = format!(
        "id = \"auth-jwt\"\nversion = \"0.1.0\"\nhooks = [\"authenticator\"]\n\
         [config]\nhs256_secret = \"{secret}\"\naudience = \"im\"\nleeway_s = \"0\""
    );
    server.install_plugin(&manifest, "auth_jwt.wasm").await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let connect = async |t: Transport, device: &str, token: String| {
        let mut config = server.client_config(t, "ignored", device);
        config.token = token;
        im_client::Client::connect(config).await
    };
    for t in ALL_TRANSPORTS {
        let good = jwt(
            secret,
            serde_json::json!({"sub": "alice", "aud": "im", "exp": now + 3600}),
        );
        let (client, _) = connect(t, "phone", good).await.unwrap();
        assert_eq!(client.user_id(), "alice");
        client.close().await;
    }
    let refused = [
        (
            "expired",
            jwt(
                secret,
                serde_json::json!({"sub": "alice", "aud": "im", "exp": now - 60}),
            ),
        ),
        (
            "audience",
            jwt(
                secret,
                serde_json::json!({"sub": "alice", "aud": "other", "exp": now + 3600}),
            ),
        ),
        (
            "secret",
            jwt(
                "another-secret-0123456789",
                serde_json::json!({"sub": "alice", "aud": "im", "exp": now + 3600}),
            ),
        ),
        (
            "device",
            jwt(
                secret,
                serde_json::json!({"sub": "alice", "aud": "im", "exp": now + 3600, "dev": "tablet"}),
            ),
        ),
        ("dev token", server.token("alice")),
        ("garbage", "not.a.jwt".to_owned()),
    ];
    for (case, token) in refused {
        match connect(Transport::Tcp, "phone", token).await {
            Err(im_client::ClientError::Closed { reason, .. }) => {
                assert_eq!(reason, v1::CloseReason::AuthFailed, "{case}")
            }
            Err(other) => panic!("{case}: unexpected {other}"),
            Ok(_) => panic!("{case}: logged in"),
        }
    }
    let bound = jwt(
        secret,
        serde_json::json!({"sub": "bob", "aud": "im", "exp": now + 3600, "dev": "tablet"}),
    );
    assert_eq!(
        connect(Transport::Quic, "tablet", bound)
            .await
            .unwrap()
            .0
            .user_id(),
        "bob"
    );
    // With the plugin disabled, the development tokens work again.
    assert_eq!(
        server
            .admin("POST", "/v1/plugins/auth-jwt/disable", None, None)
            .await
            .status,
        200
    );
    let (dev, _) = server.client(Transport::Tcp, "carol", "phone").await;
    assert_eq!(dev.user_id(), "carol");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_plugin_filters_through_the_same_contract() {
    let server = TestServer::start().await;
    let manifest = filter_manifest(
        "python-filter",
        "[limits]\nmemory_mib = 256\ndeadline_ms = 2000\n[config]\nreplacement = \"🐍\"",
    );
    server
        .install_plugin(&manifest, "python/python_filter.wasm")
        .await;
    let (_bob, mut bob_events) = server.client(Transport::Tcp, "bob", "phone").await;
    let (alice, _) = server.client(Transport::WebSocket, "alice", "phone").await;
    alice.send_text("bob", "I like python").await.unwrap();
    alice.send_text("bob", "me too").await.unwrap();
    let got = receive(&mut bob_events, 2, WAIT).await;
    assert_eq!(got[0].body, text("I like 🐍 (checked by python #1)"));
    assert_eq!(got[1].body, text("me too (checked by python #2)"));
}
