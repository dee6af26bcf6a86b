//! Parked connections (idle plain TCP without a task): they park after login and after
//! `park_after_ms` of quiet, and every kind of wake (a frame, a push, a close, the peer
//! leaving, the shutdown) resumes them with nothing lost.

use std::time::Duration;

use im_client::v1;
use im_e2e::*;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn parked_connections_wake_for_frames_pushes_and_closes() {
    let server = TestServer::start_with(|c| c.session.park_after_ms = 200).await;
    let (alice, _alice_events) = server.client(Transport::Tcp, "alice", "phone").await;
    let (bob, mut bob_events) = server.client(Transport::Tcp, "bob", "phone").await;
    // Other transports do not park.
    let (_carol, _) = server.client(Transport::WebSocket, "carol", "phone").await;
    eventually(WAIT, "both TCP sessions park after login", || {
        server.parked() == 2
    })
    .await;
    assert_eq!(server.logged_in(), 3);

    // A frame from a parked client resumes it (its ack comes back); the push resumes the
    // parked recipient, whose ack of the delivery is heard.
    let mut conversation = String::new();
    for round in 0..3 {
        let text = format!("while parked {round}");
        alice.send_text("bob", &text).await.unwrap();
        let got = receive(&mut bob_events, 1, WAIT).await;
        assert_eq!(got[0].sender_id, "alice");
        conversation = got[0].conversation_id.clone();
        eventually(WAIT, "both park again once quiet", || server.parked() == 2).await;
    }
    // The other way round, and a ping.
    bob.send_text("alice", "back").await.unwrap();
    alice.ping().await.unwrap();
    eventually(WAIT, "both park again", || server.parked() == 2).await;

    // A close request resumes a parked connection, which tells its client why.
    let mut dave = server.raw_logged_in(Transport::Tcp, "dave", "phone").await;
    eventually(WAIT, "dave parks", || server.parked() == 3).await;
    let _dave_again = server.raw_logged_in(Transport::Tcp, "dave", "phone").await;
    assert_eq!(dave.expect_close().await, v1::CloseReason::Replaced);

    // A client that leaves while parked is logged out.
    eventually(WAIT, "the new dave parks", || server.parked() == 3).await;
    drop(_dave_again);
    eventually(WAIT, "the one who left is logged out", || {
        server.logged_in() == 3 && server.parked() == 2
    })
    .await;

    // Nothing was lost or stored twice.
    let history = bob.history(&conversation, 0, 10).await.unwrap();
    assert_eq!(history.messages.len(), 4);
}

#[tokio::test]
async fn parked_connections_are_closed_by_the_idle_sweep_and_the_shutdown() {
    let server = TestServer::start_with(|c| {
        c.session.park_after_ms = 100;
        c.session.idle_timeout_ms = 1_500;
    })
    .await;
    let mut silent = server
        .raw_logged_in(Transport::Tcp, "silent", "phone")
        .await;
    eventually(WAIT, "the silent one parks", || server.parked() == 1).await;
    assert_eq!(silent.expect_close().await, v1::CloseReason::IdleTimeout);
    eventually(WAIT, "it is freed", || {
        server.logged_in() == 0 && server.parked() == 0
    })
    .await;

    let server = TestServer::start().await;
    let mut alice = server.raw_logged_in(Transport::Tcp, "alice", "phone").await;
    eventually(WAIT, "alice parks", || server.parked() == 1).await;
    server.node.shutdown_token().cancel();
    assert_eq!(alice.expect_close().await, v1::CloseReason::ServerShutdown);
    eventually(WAIT, "the session is freed", || server.logged_in() == 0).await;
}

#[tokio::test]
async fn with_parking_off_nothing_parks() {
    let server = TestServer::start_with(|c| c.session.park_after_ms = 0).await;
    let (alice, _) = server.client(Transport::Tcp, "alice", "phone").await;
    let (_bob, mut bob_events) = server.client(Transport::Tcp, "bob", "phone").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.parked(), 0);
    alice.send_text("bob", "hello").await.unwrap();
    receive(&mut bob_events, 1, WAIT).await;
    assert_eq!(server.parked(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_parking_and_waking_all_the_time_lose_nothing() {
    // Receivers that never send (but their acks) park after login and again within a sweep
    // (at most a second) of going quiet; their clients ping only every 30 s, so only the
    // pushes themselves can wake them. Sends at uneven pauses land on parked, parking and
    // running receivers alike: a lost wake leaves a push undelivered.
    let server = TestServer::start_with(|c| c.session.park_after_ms = 100).await;
    const PAIRS: usize = 6;
    const ROUNDS: usize = 12;
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for i in 0..PAIRS {
        senders.push(
            server
                .client(Transport::Tcp, &format!("s{i}"), "phone")
                .await,
        );
        receivers.push(
            server
                .client(Transport::Tcp, &format!("r{i}"), "phone")
                .await,
        );
    }
    eventually(WAIT, "every client parks after login", || {
        server.parked() == 2 * PAIRS
    })
    .await;
    let sending = senders
        .iter()
        .enumerate()
        .map(|(i, (client, _))| async move {
            for round in 0..ROUNDS {
                let pause = [30, 400, 120, 1_100, 60, 250][(i + round) % 6];
                tokio::time::sleep(Duration::from_millis(pause)).await;
                client
                    .send_text(&format!("r{i}"), &round.to_string())
                    .await
                    .unwrap();
            }
        });
    futures_util::future::join_all(sending).await;
    for (i, (_, events)) in receivers.iter_mut().enumerate() {
        let got = receive(events, ROUNDS, WAIT).await;
        let bodies: Vec<_> = got.iter().map(|m| m.body.clone()).collect();
        let sent: Vec<_> = (0..ROUNDS).map(|r| text(&r.to_string())).collect();
        assert_eq!(bodies, sent, "r{i} got every message once, in order");
    }
    assert_eq!(server.logged_in(), 2 * PAIRS);
}
