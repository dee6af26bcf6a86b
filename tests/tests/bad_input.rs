//! Bad input on each transport: every case gets a clear error or close reason, the server
//! keeps serving, and other sessions are untouched.

use std::time::Duration;

use im_client::{Client, ClientError, v1};
use im_e2e::*;
use v1::frame::Body;

const WAIT: Duration = Duration::from_secs(30);

on_every_transport!(
    malformed_protobuf_gets_bad_frame,
    unknown_frame_kind_gets_bad_frame,
    oversized_frame_closes_only_that_connection,
    frames_before_login_are_refused,
    wrong_token_closes_with_auth_failed,
    invalid_sends_get_clear_errors,
    client_that_never_reads_is_disconnected,
    abrupt_disconnect_mid_frame_frees_the_session,
);

fn ping() -> Body {
    Body::Ping(v1::Ping { nonce: 1 })
}

/// A bystander session that must stay healthy through someone else's bad input.
async fn bystander(server: &TestServer, t: Transport) -> Client {
    let (client, _events) = server.client(t, "bystander", "phone").await;
    client
}

async fn malformed_protobuf_gets_bad_frame(t: Transport) {
    let server = TestServer::start().await;
    let other = bystander(&server, t).await;
    for logged_in in [false, true] {
        let mut raw = if logged_in {
            server.raw_logged_in(t, "mallory", "x").await
        } else {
            server.raw(t).await
        };
        raw.send_payload(&[0xff, 0xff, 0xff, 0xff, 0x0f]).await;
        let answer = raw.recv().await.expect("an answer, not a close");
        assert_eq!(
            error_code(&answer),
            Some(v1::ErrorCode::BadFrame),
            "{answer:?}"
        );
        // The connection keeps working.
        assert!(matches!(
            raw.request(ping()).await.body,
            Some(Body::Pong(_))
        ));
    }
    other.ping().await.unwrap();
}

async fn unknown_frame_kind_gets_bad_frame(t: Transport) {
    let server = TestServer::start().await;
    let mut raw = server.raw_logged_in(t, "mallory", "x").await;
    // request_id = 7, then field 99 (not in the oneof), length-delimited, empty.
    raw.send_payload(&[0x08, 0x07, 0x9a, 0x06, 0x00]).await;
    let answer = raw.answer(7).await;
    assert_eq!(error_code(&answer), Some(v1::ErrorCode::BadFrame));
    // A server-to-client kind from a client is refused too.
    let answer = raw.request(Body::Pong(v1::Pong::default())).await;
    assert_eq!(error_code(&answer), Some(v1::ErrorCode::Unsupported));
    // And a second login on a logged-in connection.
    let answer = raw.request(login(&server.token("mallory"), "x")).await;
    assert_eq!(error_code(&answer), Some(v1::ErrorCode::AlreadyLoggedIn));
    assert!(matches!(
        raw.request(ping()).await.body,
        Some(Body::Pong(_))
    ));
}

async fn oversized_frame_closes_only_that_connection(t: Transport) {
    let server = TestServer::start().await;
    let other = bystander(&server, t).await;
    let mut raw = server.raw_logged_in(t, "mallory", "x").await;
    raw.send_payload(&vec![0u8; 70 * 1024]).await;
    assert_eq!(raw.expect_close().await, v1::CloseReason::FrameTooLarge);
    if t != Transport::WebSocket {
        // A length prefix alone announcing 1 GiB is refused before any body is read.
        let mut raw = server.raw_logged_in(t, "mallory", "y").await;
        raw.conn
            .send_unframed(&(1u32 << 30).to_be_bytes())
            .await
            .unwrap();
        assert_eq!(raw.expect_close().await, v1::CloseReason::FrameTooLarge);
    }
    other.ping().await.unwrap();
    eventually(WAIT, "closed sessions are freed", || {
        server.logged_in() == 1
    })
    .await;
}

async fn frames_before_login_are_refused(t: Transport) {
    let server = TestServer::start().await;
    let mut raw = server.raw(t).await;
    let send = Body::Send(v1::SendRequest {
        client_msg_id: "x".into(),
        target: Some(v1::send_request::Target::ToUser("bob".into())),
        body: text("hello"),
        content_type: String::new(),
    });
    for body in [
        send,
        Body::Sync(v1::SyncRequest::default()),
        Body::ListConversations(Default::default()),
    ] {
        let answer = raw.request(body).await;
        assert_eq!(
            error_code(&answer),
            Some(v1::ErrorCode::NotLoggedIn),
            "{answer:?}"
        );
    }
    // Ping works before login, and a login still succeeds afterwards.
    assert!(matches!(
        raw.request(ping()).await.body,
        Some(Body::Pong(_))
    ));
    let answer = raw.request(login(&server.token("alice"), "phone")).await;
    assert!(matches!(answer.body, Some(Body::LoginOk(_))));
}

async fn wrong_token_closes_with_auth_failed(t: Transport) {
    let server = TestServer::start().await;
    let other = bystander(&server, t).await;
    // A token signed with another secret, garbage, and a bad device id.
    let forged = im_token::mint(
        b"not the server secret",
        &im_token::Claims {
            user_id: "alice".into(),
            device_id: None,
            expires_at: u64::MAX / 2,
        },
    );
    for (token, device) in [
        (forged.as_str(), "phone"),
        ("garbage", "phone"),
        (&server.token("alice"), "bad device!"),
    ] {
        let mut raw = server.raw(t).await;
        raw.send(login(token, device)).await;
        assert_eq!(raw.expect_close().await, v1::CloseReason::AuthFailed);
    }
    let mut config = server.client_config(t, "alice", "phone");
    config.token = forged;
    match Client::connect(config).await {
        Err(ClientError::Closed { reason, .. }) => assert_eq!(reason, v1::CloseReason::AuthFailed),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a forged token logged in"),
    }
    other.ping().await.unwrap();
    assert_eq!(server.node.context.router.device_count("alice"), 0);
}

async fn invalid_sends_get_clear_errors(t: Transport) {
    let server = TestServer::start().await;
    let (_bob, _) = server.client(t, "bob", "phone").await;
    let (alice, _) = server.client(t, "alice", "phone").await;
    let code = |r: Result<v1::SendAck, ClientError>| r.unwrap_err().code();
    assert_eq!(
        code(alice.send_text("nobody", "hi").await),
        Some(v1::ErrorCode::UnknownUser)
    );
    assert_eq!(
        code(alice.send_text("bad id!", "hi").await),
        Some(v1::ErrorCode::InvalidArgument)
    );
    assert_eq!(
        code(alice.send("bob", bytes::Bytes::new(), "").await),
        Some(v1::ErrorCode::InvalidArgument)
    );
    let big = bytes::Bytes::from(vec![b'x'; 40 * 1024]);
    assert_eq!(
        code(alice.send("bob", big, "").await),
        Some(v1::ErrorCode::BodyTooLarge)
    );
    assert_eq!(
        code(alice.send_with_id("bob", "", text("x"), "").await),
        Some(v1::ErrorCode::InvalidArgument)
    );
    assert_eq!(
        code(alice.send("bob", text("x"), &"t".repeat(200)).await),
        Some(v1::ErrorCode::InvalidArgument)
    );
    // Nothing was stored, and a good send still works and gets seq 1.
    assert_eq!(alice.send_text("bob", "fine").await.unwrap().seq, 1);
}

async fn client_that_never_reads_is_disconnected(t: Transport) {
    let server = TestServer::start_with(|c| {
        c.limits.outbound_queue = 64;
        c.limits.write_timeout_ms = 1_000;
    })
    .await;
    // Bob logs in and then never reads.
    let stalled = server.raw_logged_in(t, "bob", "phone").await;
    let (alice, _) = server.client(t, "alice", "phone").await;
    let body = bytes::Bytes::from(vec![b'z'; 16 * 1024]);
    let mut acks = Vec::new();
    for _ in 0..600 {
        acks.push(
            alice
                .queue_send("bob", &alice.new_client_msg_id(), body.clone(), "")
                .await
                .unwrap(),
        );
    }
    // The sender is never held up by the stalled reader: every send is acknowledged.
    for ack in acks {
        tokio::time::timeout(WAIT, ack).await.unwrap().unwrap();
    }
    eventually(WAIT, "the stalled reader is disconnected", || {
        server.node.context.router.device_count("bob") == 0
    })
    .await;
    drop(stalled);
    // Nothing is lost: bob syncs everything when he comes back.
    let (bob, mut events) = server.client(t, "bob", "phone").await;
    let got = receive(&mut events, 600, WAIT).await;
    assert_eq!(got.last().unwrap().seq, 600);
    bob.ping().await.unwrap();
}

async fn abrupt_disconnect_mid_frame_frees_the_session(t: Transport) {
    let server = TestServer::start().await;
    let other = bystander(&server, t).await;
    let mut raw = server.raw_logged_in(t, "mallory", "x").await;
    eventually(WAIT, "both sessions are up", || server.logged_in() == 2).await;
    if t == Transport::WebSocket {
        // A masked binary WebSocket frame announcing 256 bytes, cut off after its header.
        raw.conn
            .send_unframed(&[0x82, 0xfe, 0x01, 0x00, 1, 2, 3, 4, 9, 9])
            .await
            .unwrap();
    } else {
        let mut partial = 100u32.to_be_bytes().to_vec();
        partial.extend_from_slice(&[1, 2, 3]);
        raw.conn.send_unframed(&partial).await.unwrap();
    }
    drop(raw);
    eventually(WAIT, "the broken session is freed", || {
        server.logged_in() == 1
    })
    .await;
    assert_eq!(server.node.context.router.device_count("mallory"), 0);
    other.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_text_messages_are_refused() {
    let server = TestServer::start().await;
    let mut raw = server
        .raw_logged_in(Transport::WebSocket, "mallory", "x")
        .await;
    raw.conn
        .send_websocket_text("{\"hello\": 1}")
        .await
        .unwrap();
    assert_eq!(raw.expect_close().await, v1::CloseReason::ProtocolViolation);
}
