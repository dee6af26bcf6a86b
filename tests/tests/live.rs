//! Presence, live rooms and broadcasts over each transport: changes reach watchers in
//! order, room messages reach whoever is in the room now (and nobody else), broadcasts
//! reach every online connection, and bad requests are refused without side effects.

use std::time::Duration;

use im_client::{Event, v1};
use im_e2e::*;

const WAIT: Duration = Duration::from_secs(20);
const QUIET: Duration = Duration::from_millis(300);

on_every_transport!(
    presence_changes_reach_watchers,
    presence_requests_are_checked,
    rooms_deliver_to_whoever_is_in_them,
    room_requests_are_checked,
    broadcasts_reach_every_online_connection,
    message_filters_screen_room_messages,
);

fn presence(event: Event) -> Option<v1::PresenceState> {
    match event {
        Event::Presence(state) => Some(state),
        _ => None,
    }
}

fn room_message(event: Event) -> Option<v1::RoomMessage> {
    match event {
        Event::RoomMessage(m) => Some(m),
        _ => None,
    }
}

fn code<T: std::fmt::Debug>(result: Result<T, im_client::ClientError>) -> v1::ErrorCode {
    match result {
        Err(err) => err.code().unwrap_or_else(|| panic!("not a refusal: {err}")),
        Ok(answer) => panic!("expected a refusal, got {answer:?}"),
    }
}

async fn presence_changes_reach_watchers(t: Transport) {
    let server = TestServer::start().await;
    let (alice, mut alice_events) = server.client(t, "alice", "phone").await;
    let answer = alice.watch_presence(&["bob", "carol"], &[]).await.unwrap();
    assert_eq!(answer.watching, 2);
    assert!(answer.states.iter().all(|s| !s.online));
    assert_eq!(answer.states[0].user_id, "bob");

    // Bob's first device brings him online; his second changes nothing for watchers.
    let (bob_phone, _e1) = server.client(t, "bob", "phone").await;
    let state = next_event(&mut alice_events, WAIT, "bob online", presence).await;
    assert_eq!(
        (state.user_id.as_str(), state.online, state.devices),
        ("bob", true, 1)
    );
    assert!(state.changed_ms > 0);
    let (bob_laptop, _e2) = server.client(t, "bob", "laptop").await;
    assert_no_event(&mut alice_events, QUIET, |e| {
        matches!(e, Event::Presence(_))
    })
    .await;

    // Only the last device leaving takes him offline.
    bob_phone.close().await;
    assert_no_event(&mut alice_events, QUIET, |e| {
        matches!(e, Event::Presence(_))
    })
    .await;
    bob_laptop.close().await;
    let state = next_event(&mut alice_events, WAIT, "bob offline", presence).await;
    assert_eq!((state.user_id.as_str(), state.online), ("bob", false));

    // After unwatching, changes no longer arrive; carol is still watched.
    let answer = alice.watch_presence(&[], &["bob"]).await.unwrap();
    assert_eq!(answer.watching, 1);
    let (_bob, _e3) = server.client(t, "bob", "phone").await;
    let (_carol, _e4) = server.client(t, "carol", "phone").await;
    let state = next_event(&mut alice_events, WAIT, "carol online", presence).await;
    assert_eq!(state.user_id, "carol");
    assert_no_event(&mut alice_events, QUIET, |e| {
        matches!(e, Event::Presence(_))
    })
    .await;

    // A second watcher sees the same changes; a closed watcher is forgotten.
    let (dave, mut dave_events) = server.client(t, "dave", "phone").await;
    let answer = dave.watch_presence(&["carol"], &[]).await.unwrap();
    assert!(answer.states[0].online);
    alice.close().await;
    _carol.close().await;
    let state = next_event(&mut dave_events, WAIT, "carol offline", presence).await;
    assert!(!state.online);
}

async fn presence_requests_are_checked(t: Transport) {
    let server = TestServer::start_with(|c| c.limits.max_presence_watch = 3).await;
    let (alice, _events) = server.client(t, "alice", "phone").await;
    assert_eq!(
        code(alice.watch_presence(&["a", "b", "c", "d"], &[]).await),
        v1::ErrorCode::InvalidArgument
    );
    // Nothing was watched by the refused request.
    let answer = alice.watch_presence(&["a", "b", "c"], &[]).await.unwrap();
    assert_eq!(answer.watching, 3);
    // Swapping within the cap is fine; going over it is not.
    let answer = alice.watch_presence(&["d"], &["a"]).await.unwrap();
    assert_eq!(answer.watching, 3);
    assert_eq!(
        code(alice.watch_presence(&["e"], &[]).await),
        v1::ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(alice.watch_presence(&["not valid!"], &[]).await),
        v1::ErrorCode::InvalidArgument
    );
    // The connection still works.
    alice.ping().await.unwrap();
}

async fn rooms_deliver_to_whoever_is_in_them(t: Transport) {
    let server = TestServer::start().await;
    let (alice, mut alice_events) = server.client(t, "alice", "phone").await;
    let (bob, mut bob_events) = server.client(t, "bob", "phone").await;
    let (carol, mut carol_events) = server.client(t, "carol", "phone").await;
    assert_eq!(alice.join_room("live").await.unwrap().members, 1);
    assert_eq!(bob.join_room("live").await.unwrap().members, 2);
    let joined = carol.join_room("live").await.unwrap();
    assert!(joined.joined);
    assert_eq!(joined.members, 3);

    let mut seqs = Vec::new();
    let mut acked = Vec::new();
    for i in 0..5 {
        let ack = alice
            .send_to_room("live", text(&format!("hello {i}")), "text/plain")
            .await
            .unwrap();
        assert_eq!((ack.delivered, ack.dropped), (2, false));
        acked.push(ack.room_seq);
    }
    for events in [&mut bob_events, &mut carol_events] {
        let mut got = Vec::new();
        for _ in 0..5 {
            got.push(next_event(events, WAIT, "a room message", room_message).await);
        }
        let bodies: Vec<String> = got
            .iter()
            .map(|m| String::from_utf8_lossy(&m.body).into_owned())
            .collect();
        assert_eq!(
            bodies,
            (0..5).map(|i| format!("hello {i}")).collect::<Vec<_>>()
        );
        assert!(
            got.iter()
                .all(|m| m.sender_id == "alice" && m.room_id == "live")
        );
        assert!(got.windows(2).all(|w| w[0].room_seq < w[1].room_seq));
        seqs.push(got.iter().map(|m| m.room_seq).collect::<Vec<_>>());
    }
    assert_eq!(seqs[0], seqs[1], "both members saw the same room sequence");
    assert_eq!(
        seqs[0], acked,
        "the sender's acks name the seqs the others saw"
    );
    // The sender does not get its own room messages.
    assert_no_event(&mut alice_events, QUIET, |e| {
        matches!(e, Event::RoomMessage(_))
    })
    .await;

    // A late joiner gets only what is sent after it joined; a leaver gets nothing more.
    let (dave, mut dave_events) = server.client(t, "dave", "phone").await;
    dave.join_room("live").await.unwrap();
    let left = carol.leave_room("live").await.unwrap();
    assert_eq!((left.members, left.joined), (3, false));
    let ack = bob
        .send_to_room("live", text("after"), "text/plain")
        .await
        .unwrap();
    assert_eq!(ack.delivered, 2);
    let m = next_event(&mut dave_events, WAIT, "dave's first", room_message).await;
    assert_eq!(m.body, text("after"));
    let m = next_event(&mut alice_events, WAIT, "alice's", room_message).await;
    assert_eq!(m.sender_id, "bob");
    assert_no_event(&mut carol_events, QUIET, |e| {
        matches!(e, Event::RoomMessage(_))
    })
    .await;

    // A closing connection leaves its rooms; nothing about rooms is stored.
    dave.close().await;
    eventually(WAIT, "dave left the room", || {
        server.node.context.rooms.size("live") == 2
    })
    .await;
    let list = alice.list_conversations(100, None).await.unwrap();
    assert!(
        list.conversations.is_empty(),
        "room messages are not stored"
    );
}

async fn room_requests_are_checked(t: Transport) {
    let server = TestServer::start_with(|c| c.limits.max_rooms_per_connection = 2).await;
    let (alice, _events) = server.client(t, "alice", "phone").await;
    assert_eq!(
        code(alice.send_to_room("r1", text("x"), "").await),
        v1::ErrorCode::NotInRoom
    );
    assert_eq!(code(alice.leave_room("r1").await), v1::ErrorCode::NotInRoom);
    assert_eq!(
        code(alice.join_room("bad room").await),
        v1::ErrorCode::InvalidArgument
    );
    alice.join_room("r1").await.unwrap();
    alice.join_room("r2").await.unwrap();
    // Joining again is not a new room; a third is over the cap.
    assert_eq!(alice.join_room("r2").await.unwrap().members, 1);
    assert_eq!(
        code(alice.join_room("r3").await),
        v1::ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(alice.send_to_room("r1", bytes::Bytes::new(), "").await),
        v1::ErrorCode::InvalidArgument
    );
    let too_big = bytes::Bytes::from(vec![b'x'; 40 * 1024]);
    assert_eq!(
        code(alice.send_to_room("r1", too_big, "").await),
        v1::ErrorCode::BodyTooLarge
    );
    // Alone in the room, a message reaches nobody but is accepted.
    let ack = alice.send_to_room("r1", text("echo?"), "").await.unwrap();
    assert_eq!(ack.delivered, 0);
}

async fn broadcasts_reach_every_online_connection(t: Transport) {
    let server = TestServer::start().await;
    let mut clients = Vec::new();
    for (user, device) in [("alice", "phone"), ("alice", "laptop"), ("bob", "phone")] {
        clients.push(server.client(t, user, device).await);
    }
    let answer = server
        .api(
            "POST",
            "/v1/messages/broadcast",
            Some(serde_json::json!({"text": "maintenance at noon"})),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.json["delivered"], 3);
    let id = answer.json["id"].as_str().unwrap().to_owned();
    for (_, events) in &mut clients {
        let b = next_event(events, WAIT, "the broadcast", |e| match e {
            Event::Broadcast(b) => Some(b),
            _ => None,
        })
        .await;
        assert_eq!(
            (b.broadcast_id.as_str(), b.body.as_ref()),
            (id.as_str(), &b"maintenance at noon"[..])
        );
        assert_eq!(b.content_type, "text/plain");
    }
    // Broadcasts are not stored.
    let list = clients[0].0.list_conversations(100, None).await.unwrap();
    assert!(list.conversations.is_empty());
}

async fn message_filters_screen_room_messages(t: Transport) {
    let server = TestServer::start().await;
    let filter = |id: &str, extra: &str| {
        format!("id = \"{id}\"\nversion = \"1.0.0\"\nhooks = [\"message-filter\"]\n{extra}\n")
    };
    server
        .install_plugin(
            &filter("mask", "[config]\nwords = \"darn\"\naction = \"mask\""),
            "keyword_filter.wasm",
        )
        .await;
    server
        .install_plugin(
            &filter(
                "reject",
                "order = 200\n[config]\nwords = \"scam\"\naction = \"reject\"",
            ),
            "keyword_filter.wasm",
        )
        .await;
    let (alice, _alice_events) = server.client(t, "alice", "phone").await;
    let (bob, mut bob_events) = server.client(t, "bob", "phone").await;
    alice.join_room("stage").await.unwrap();
    bob.join_room("stage").await.unwrap();
    alice
        .send_to_room("stage", text("oh darn"), "text/plain")
        .await
        .unwrap();
    let m = next_event(&mut bob_events, WAIT, "the masked message", room_message).await;
    assert_eq!(m.body, text("oh ****"));
    assert_eq!(
        code(
            alice
                .send_to_room("stage", text("a scam"), "text/plain")
                .await
        ),
        v1::ErrorCode::Rejected
    );
    assert_no_event(&mut bob_events, QUIET, |e| {
        matches!(e, Event::RoomMessage(_))
    })
    .await;
}
