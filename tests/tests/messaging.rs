//! Reliable 1:1 messaging over each transport: exchange, ordering, idempotency, offline sync,
//! multi-device delivery, device replacement, heartbeat timeouts and shutdown.

use std::time::Duration;

use futures_util::future::join_all;
use im_client::{Event, Resume, v1};
use im_e2e::*;

const WAIT: Duration = Duration::from_secs(30);

on_every_transport!(
    login_and_exchange,
    rapid_sends_arrive_in_order,
    crossed_rapid_sends_keep_both_streams_in_order,
    duplicate_client_id_stores_once,
    offline_recipient_syncs_in_order,
    multi_device_delivery,
    replaced_device_is_closed,
    heartbeat_timeout_closes_idle_connections,
    history_list_and_read_cursor,
    unacknowledged_pushes_are_repeated_until_acked,
    shutdown_closes_logged_in_connections,
);

async fn login_and_exchange(t: Transport) {
    let server = TestServer::start().await;
    let (alice, _alice_events) = server.client(t, "alice", "phone").await;
    let (bob, mut bob_events) = server.client(t, "bob", "phone").await;
    assert_eq!(alice.user_id(), "alice");

    let ack = alice.send_text("bob", "hi bob").await.unwrap();
    assert_eq!(ack.conversation_id, "u:alice:bob");
    assert_eq!(ack.seq, 1);
    assert!(!ack.duplicate);
    assert!(!ack.server_msg_id.is_empty());
    let got = receive(&mut bob_events, 1, WAIT).await;
    assert_eq!(got[0].body, text("hi bob"));
    assert_eq!(got[0].sender_id, "alice");
    assert_eq!(got[0].server_msg_id, ack.server_msg_id);

    let mut alice_events = _alice_events;
    let reply = bob.send_text("alice", "hi alice").await.unwrap();
    assert_eq!(reply.seq, 2);
    let got = receive(&mut alice_events, 1, WAIT).await;
    assert_eq!((got[0].seq, got[0].body.clone()), (2, text("hi alice")));
}

async fn rapid_sends_arrive_in_order(t: Transport) {
    let server = TestServer::start().await;
    let (_bob, mut bob_events) = server.client(t, "bob", "phone").await;
    let (alice, _) = server.client(t, "alice", "phone").await;
    // Queue all 1,000 before awaiting any ack: they are pipelined on the connection.
    let mut pending = Vec::new();
    for i in 0..1000 {
        let id = alice.new_client_msg_id();
        pending.push(
            alice
                .queue_send("bob", &id, text(&format!("m{i}")), "text/plain")
                .await
                .unwrap(),
        );
    }
    let acks: Vec<v1::SendAck> = join_all(pending)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    for (i, ack) in acks.iter().enumerate() {
        assert_eq!(ack.seq, i as u64 + 1, "ack {i} out of order");
    }
    let got = receive(&mut bob_events, 1000, WAIT).await;
    for (i, m) in got.iter().enumerate() {
        assert_eq!(
            (m.seq, m.body.clone()),
            (i as u64 + 1, text(&format!("m{i}")))
        );
    }
    assert_no_message(&mut bob_events, Duration::from_millis(300)).await;
}

/// Both sides send at once: each connection carries its own acks (written directly by the
/// pipeline on plain TCP when nothing is ahead of them) between the other side's pushes
/// (written by its task), so the two paths race for one socket all the time. Sends go in
/// bursts of two, so most commits stay small enough for the direct path.
async fn crossed_rapid_sends_keep_both_streams_in_order(t: Transport) {
    const EACH: usize = 500;
    const BURST: usize = 2;
    let server = TestServer::start().await;
    let (alice, mut alice_events) = server.client(t, "alice", "phone").await;
    let (bob, mut bob_events) = server.client(t, "bob", "phone").await;
    let send_all = |client: im_client::Client, to: &'static str| async move {
        let mut acks: Vec<v1::SendAck> = Vec::with_capacity(EACH);
        for burst in 0..EACH / BURST {
            let mut pending = Vec::with_capacity(BURST);
            for i in burst * BURST..(burst + 1) * BURST {
                let id = client.new_client_msg_id();
                let body = text(&format!("{to}{i}"));
                pending.push(
                    client
                        .queue_send(to, &id, body, "text/plain")
                        .await
                        .unwrap(),
                );
            }
            acks.extend(join_all(pending).await.into_iter().map(Result::unwrap));
        }
        (client, acks)
    };
    let ((_alice, alice_acks), (_bob, bob_acks)) =
        tokio::join!(send_all(alice, "bob"), send_all(bob, "alice"));
    let to_bob = receive(&mut bob_events, EACH, WAIT).await;
    let to_alice = receive(&mut alice_events, EACH, WAIT).await;
    // One conversation: every seq from 1 to 2 x EACH taken once, each side's own acks
    // rising, and each side's pushes rising with the other side's bodies in send order.
    let mut seqs: Vec<u64> = alice_acks.iter().chain(&bob_acks).map(|a| a.seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=2 * EACH as u64).collect::<Vec<_>>());
    for (acks, pushes, to) in [
        (&alice_acks, &to_bob, "bob"),
        (&bob_acks, &to_alice, "alice"),
    ] {
        assert!(
            acks.windows(2).all(|w| w[0].seq < w[1].seq),
            "acks to {to}'s sender out of order"
        );
        let pushed: Vec<_> = pushes.iter().map(|m| (m.seq, m.body.clone())).collect();
        let expected: Vec<_> = acks
            .iter()
            .enumerate()
            .map(|(i, a)| (a.seq, text(&format!("{to}{i}"))))
            .collect();
        assert_eq!(pushed, expected, "pushes to {to}");
    }
    assert_no_message(&mut alice_events, Duration::from_millis(200)).await;
    assert_no_message(&mut bob_events, Duration::from_millis(200)).await;
}

async fn duplicate_client_id_stores_once(t: Transport) {
    let server = TestServer::start().await;
    let (_bob, mut bob_events) = server.client(t, "bob", "phone").await;
    let (alice, _) = server.client(t, "alice", "phone").await;
    let first = alice
        .send_with_id("bob", "dup-1", text("once"), "text/plain")
        .await
        .unwrap();
    let again = alice
        .send_with_id("bob", "dup-1", text("twice?"), "text/plain")
        .await
        .unwrap();
    assert!(!first.duplicate);
    assert!(again.duplicate);
    assert_eq!(
        (again.seq, &again.server_msg_id, again.server_time_ms),
        (first.seq, &first.server_msg_id, first.server_time_ms)
    );

    // A new connection of the same user (a reconnect) gets the same answer.
    let (alice2, _) = server.client(t, "alice", "laptop").await;
    let third = alice2
        .send_with_id("bob", "dup-1", text("thrice?"), "text/plain")
        .await
        .unwrap();
    assert!(third.duplicate);
    assert_eq!(third.seq, first.seq);

    let stored = alice.sync("u:alice:bob", 0, 100).await.unwrap();
    assert_eq!(stored.messages.len(), 1);
    assert_eq!(stored.messages[0].body, text("once"));
    assert_eq!(
        receive(&mut bob_events, 1, WAIT).await[0].body,
        text("once")
    );
    assert_no_message(&mut bob_events, Duration::from_millis(300)).await;
}

async fn offline_recipient_syncs_in_order(t: Transport) {
    let server = TestServer::start().await;
    // Bob exists (logged in once) but is offline.
    let (bob, _) = server.client(t, "bob", "phone").await;
    bob.close().await;
    let (alice, _) = server.client(t, "alice", "phone").await;
    for i in 0..250 {
        alice
            .send_text("bob", &format!("offline {i}"))
            .await
            .unwrap();
    }
    let mut config = server.client_config(t, "bob", "phone");
    config.resume = Resume::DeviceCursor;
    let (bob, mut bob_events) = im_client::Client::connect(config.clone()).await.unwrap();
    let list = bob.list_conversations(10, None).await.unwrap();
    assert_eq!(list.conversations[0].unread_count, 250);
    let got = receive(&mut bob_events, 250, WAIT).await;
    for (i, m) in got.iter().enumerate() {
        assert_eq!(
            (m.seq, m.body.clone()),
            (i as u64 + 1, text(&format!("offline {i}")))
        );
    }
    assert_no_message(&mut bob_events, Duration::from_millis(300)).await;

    // The device's acks reach the server's cursor; a later reconnect resumes after it.
    let store = server.node.context.store.clone();
    let mut delivered = 0;
    for _ in 0..250 {
        delivered = store
            .list_conversations("bob", "phone", None, 10)
            .await
            .unwrap()[0]
            .delivered_seq;
        if delivered == 250 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(delivered, 250);
    bob.close().await;
    for i in 250..255 {
        alice
            .send_text("bob", &format!("offline {i}"))
            .await
            .unwrap();
    }
    let (_bob, mut bob_events) = im_client::Client::connect(config).await.unwrap();
    let got = receive(&mut bob_events, 5, WAIT).await;
    assert_eq!(
        got.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![251, 252, 253, 254, 255]
    );
    assert_no_message(&mut bob_events, Duration::from_millis(300)).await;
}

async fn multi_device_delivery(t: Transport) {
    let server = TestServer::start().await;
    let (alice_phone, mut alice_phone_events) = server.client(t, "alice", "phone").await;
    let (_alice_laptop, mut alice_laptop_events) =
        server.client(Transport::Tcp, "alice", "laptop").await;
    let (_bob_phone, mut bob_phone_events) = server.client(t, "bob", "phone").await;
    let (_bob_tablet, mut bob_tablet_events) =
        server.client(Transport::WebSocket, "bob", "tablet").await;
    for i in 0..10 {
        alice_phone
            .send_text("bob", &format!("md {i}"))
            .await
            .unwrap();
    }
    for events in [
        &mut bob_phone_events,
        &mut bob_tablet_events,
        &mut alice_laptop_events,
    ] {
        let got = receive(events, 10, WAIT).await;
        assert_eq!(
            got.iter().map(|m| m.seq).collect::<Vec<_>>(),
            (1..=10).collect::<Vec<u64>>()
        );
        assert_eq!(got[3].body, text("md 3"));
        assert_eq!(got[3].sender_device_id, "phone");
    }
    // The sending device has its acks, not echoes.
    assert_no_message(&mut alice_phone_events, Duration::from_millis(300)).await;
}

async fn replaced_device_is_closed(t: Transport) {
    let server = TestServer::start().await;
    let (_old, mut old_events) = server.client(t, "alice", "phone").await;
    let (new, _) = server.client(t, "alice", "phone").await;
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match old_events.next().await {
                Some(Event::Closed { reason, .. }) => return reason,
                Some(_) => continue,
                None => panic!("events ended without Closed"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(closed, v1::CloseReason::Replaced);
    assert_eq!(server.node.context.router.device_count("alice"), 1);
    // The replacement works, and the old client does not come back to replace it.
    new.ping().await.unwrap();
    let (_bob, _) = server.client(t, "bob", "phone").await;
    new.send_text("bob", "still here").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.node.context.router.device_count("alice"), 1);
}

async fn heartbeat_timeout_closes_idle_connections(t: Transport) {
    let server = TestServer::start_with(|c| c.session.idle_timeout_ms = 1_000).await;
    // A client that pings stays; a silent one is closed and forgotten.
    let (pinging, _) = server.client(t, "alice", "phone").await;
    let mut silent = server.raw_logged_in(t, "bob", "phone").await;
    eventually(WAIT, "both sessions are up", || server.logged_in() == 2).await;
    assert_eq!(silent.expect_close().await, v1::CloseReason::IdleTimeout);
    eventually(WAIT, "the idle session is freed", || {
        server.logged_in() == 1
    })
    .await;
    assert_eq!(server.node.context.router.device_count("bob"), 0);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    pinging.ping().await.unwrap();
    assert_eq!(server.node.context.router.device_count("alice"), 1);
    // A connection that never logs in is closed too, even if it pings.
    let server = TestServer::start_with(|c| c.session.login_timeout_ms = 500).await;
    let mut lurker = server.raw(t).await;
    let pong = lurker
        .request(v1::frame::Body::Ping(v1::Ping { nonce: 7 }))
        .await;
    assert!(
        matches!(
            pong.body,
            Some(v1::frame::Body::Pong(v1::Pong { nonce: 7, .. }))
        ),
        "{pong:?}"
    );
    assert_eq!(lurker.expect_close().await, v1::CloseReason::IdleTimeout);
    eventually(WAIT, "the lurker is freed", || {
        server.open_connections() == 0
    })
    .await;
}

async fn history_list_and_read_cursor(t: Transport) {
    let server = TestServer::start().await;
    let (bob, _) = server.client(t, "bob", "phone").await;
    let (alice, _) = server.client(t, "alice", "phone").await;
    for i in 1..=30 {
        alice.send_text("bob", &format!("h{i}")).await.unwrap();
    }
    let conv = "u:alice:bob";
    let newest = bob.history(conv, 0, 10).await.unwrap();
    assert_eq!(
        newest.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (21..=30).rev().collect::<Vec<u64>>()
    );
    assert!(newest.has_more);
    let oldest = bob.history(conv, 11, 10).await.unwrap();
    assert_eq!(oldest.messages.last().unwrap().body, text("h1"));
    assert!(!oldest.has_more);
    let page = bob.sync(conv, 25, 3).await.unwrap();
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![26, 27, 28]
    );
    assert!(page.has_more);
    assert_eq!(page.last_seq, 30);

    let list = bob.list_conversations(10, None).await.unwrap();
    assert_eq!(list.conversations.len(), 1);
    let c = &list.conversations[0];
    assert_eq!(
        (c.peer_id.as_str(), c.last_seq, c.unread_count, c.read_seq),
        ("alice", 30, 30, 0)
    );
    assert_eq!(c.last_message.as_ref().unwrap().body, text("h30"));
    let read = bob.mark_read(conv, 15).await.unwrap();
    assert_eq!((read.read_seq, read.unread_count), (15, 15));
    let read = bob.mark_read(conv, 10).await.unwrap();
    assert_eq!(read.read_seq, 15, "the read cursor never moves back");
    // Replying reads everything before the reply.
    bob.send_text("alice", "read it all").await.unwrap();
    let list = bob.list_conversations(10, None).await.unwrap();
    assert_eq!(
        (
            list.conversations[0].read_seq,
            list.conversations[0].unread_count
        ),
        (31, 0)
    );
    let alice_view = alice.list_conversations(10, None).await.unwrap();
    assert_eq!(alice_view.conversations[0].unread_count, 1);
    // Someone else's conversation is not readable.
    let (carol, _) = server.client(t, "carol", "phone").await;
    let err = carol.sync(conv, 0, 10).await.unwrap_err();
    assert_eq!(err.code(), Some(v1::ErrorCode::UnknownConversation));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_over_tcp_and_websocket() {
    let server = TestServer::start_with(|c| {
        c.tcp.tls = true;
        c.websocket.tls = true;
    })
    .await;
    assert!(server.url(Transport::Tcp).starts_with("tls://"));
    let (alice, _) = server.client(Transport::Tcp, "alice", "phone").await;
    let (_bob, mut bob_events) = server.client(Transport::WebSocket, "bob", "phone").await;
    alice.send_text("bob", "over tls").await.unwrap();
    assert_eq!(
        receive(&mut bob_events, 1, WAIT).await[0].body,
        text("over tls")
    );
    // A client that does not trust the certificate cannot connect.
    let mut config = server.client_config(Transport::Tcp, "alice", "laptop");
    config.trust = im_client::Trust::System;
    assert!(matches!(
        im_client::Client::connect(config).await,
        Err(im_client::ClientError::Connect(_))
    ));
    // Plain TCP is not accepted on a TLS listener.
    let mut plain = server.client_config(Transport::Tcp, "alice", "laptop");
    plain.server = format!("tcp://{}", server.tcp).parse().unwrap();
    plain.request_timeout = Duration::from_secs(3);
    assert!(im_client::Client::connect(plain).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_certificate_is_used_for_quic_and_tls() {
    // The first server generates a pair; a second one is configured with those files.
    let first = TestServer::start().await;
    let cert = first.certificate_pem.clone();
    let key = cert.with_file_name("tls-key.pem");
    let second = TestServer::start_with(|c| {
        c.tls.cert = Some(cert.clone());
        c.tls.key = Some(key.clone());
        c.tcp.tls = true;
    })
    .await;
    assert_eq!(second.node.certificate, first.node.certificate);
    assert_eq!(second.node.certificate_path, cert);
    for t in [Transport::Quic, Transport::Tcp] {
        let (client, _) = second.client(t, "alice", "phone").await;
        client.ping().await.unwrap();
    }
    // A key that does not belong to the certificate is refused at start with a clear error.
    let dir = tempfile::tempdir().unwrap();
    let other = TestServer::start().await;
    let mut config = im_server::Config::ephemeral(dir.path());
    config.tls.cert = Some(cert);
    config.tls.key = Some(other.certificate_pem.with_file_name("tls-key.pem"));
    let err = im_server::RunningNode::start(config)
        .await
        .err()
        .expect("mismatched key refused");
    assert!(format!("{err:#}").contains("do not match"), "{err:#}");
}

async fn unacknowledged_pushes_are_repeated_until_acked(t: Transport) {
    let server = TestServer::start_with(|c| {
        c.session.retry_initial_ms = 200;
        c.session.retry_max_ms = 400;
    })
    .await;
    let mut bob = server.raw_logged_in(t, "bob", "phone").await;
    let (alice, _) = server.client(t, "alice", "phone").await;
    alice.send_text("bob", "are you there?").await.unwrap();
    let deliveries = |frame: Option<v1::Frame>| match frame.and_then(|f| f.body) {
        Some(v1::frame::Body::Deliver(d)) => d.message.unwrap().seq,
        other => panic!("expected a push, got {other:?}"),
    };
    // Not acknowledged: the same push comes again, and again.
    assert_eq!(deliveries(bob.recv().await), 1);
    let first_repeat = std::time::Instant::now();
    assert_eq!(deliveries(bob.recv().await), 1);
    assert_eq!(deliveries(bob.recv().await), 1);
    assert!(
        first_repeat.elapsed() >= Duration::from_millis(150),
        "backed off"
    );
    // Acknowledged: no more repeats.
    bob.send(v1::frame::Body::DeliverAck(v1::DeliverAck {
        conversation_id: "u:alice:bob".into(),
        seq: 1,
    }))
    .await;
    let quiet = tokio::time::timeout(Duration::from_millis(1_000), bob.recv()).await;
    assert!(quiet.is_err(), "a push came after the ack: {quiet:?}");
}

async fn shutdown_closes_logged_in_connections(t: Transport) {
    // The default idle timeout (90 s) is far off: only the shutdown can close these.
    let server = TestServer::start().await;
    let mut alice = server.raw_logged_in(t, "alice", "phone").await;
    let mut bob = server.raw_logged_in(t, "bob", "laptop").await;
    eventually(WAIT, "both sessions are up", || server.logged_in() == 2).await;
    server.node.shutdown_token().cancel();
    assert_eq!(alice.expect_close().await, v1::CloseReason::ServerShutdown);
    assert_eq!(bob.expect_close().await, v1::CloseReason::ServerShutdown);
    eventually(WAIT, "the sessions are freed", || server.logged_in() == 0).await;
}
