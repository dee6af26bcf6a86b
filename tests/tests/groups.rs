//! Group chat over each transport: membership changes decided by the built-in rules or a
//! group-policy plugin, announcements in the group's timeline, fan-out to every member
//! exactly once and in order, offline members syncing the gap, and refusals.

use std::time::Duration;

use im_client::{Client, v1};
use im_e2e::*;
use v1::group_request::Action;

const WAIT: Duration = Duration::from_secs(30);

on_every_transport!(
    group_lifecycle_and_fan_out,
    offline_member_syncs_the_gap,
    refusals_leave_the_group_untouched,
    the_group_policy_plugin_decides,
);

fn code(result: Result<impl std::fmt::Debug, im_client::ClientError>) -> v1::ErrorCode {
    match result {
        Err(err) => err
            .code()
            .unwrap_or_else(|| panic!("not a server error: {err}")),
        Ok(answer) => panic!("expected a refusal, got {answer:?}"),
    }
}

async fn act(
    client: &Client,
    group: &str,
    action: Action,
) -> Result<v1::GroupResponse, im_client::ClientError> {
    client
        .group_request(v1::GroupRequest {
            group_id: group.to_owned(),
            action: Some(action),
        })
        .await
}

fn users(list: &[&str]) -> v1::GroupUsers {
    v1::GroupUsers {
        user_ids: list.iter().map(|u| (*u).to_owned()).collect(),
    }
}

fn event(message: &v1::Message) -> serde_json::Value {
    assert_eq!(message.content_type, "application/vnd.im.group-event+json");
    serde_json::from_slice(&message.body).unwrap()
}

async fn group_lifecycle_and_fan_out(t: Transport) {
    let server = TestServer::start().await;
    let (alice, _alice_events) = server.client(t, "alice", "phone").await;
    let (bob, mut bob_events) = server.client(t, "bob", "phone").await;
    let (carol, mut carol_events) = server.client(t, "carol", "phone").await;

    // Create: alice owns it, bob is a member and gets the announcement as seq 1.
    let created = alice.create_group("team", "Team", &["bob"]).await.unwrap();
    let group = created.group.unwrap();
    assert_eq!((group.owner_id.as_str(), group.member_count), ("alice", 2));
    let announcement = created.event.unwrap();
    assert_eq!(
        (announcement.conversation_id.as_str(), announcement.seq),
        ("g:team", 1)
    );
    let got = receive(&mut bob_events, 1, WAIT).await;
    assert_eq!(event(&got[0])["event"], "create");
    assert_eq!(event(&got[0])["actor"], "alice");

    // Messages reach every member but the sending connection, in order.
    for i in 0..20 {
        let ack = alice
            .send_to_group("team", text(&format!("m{i}")), "text/plain")
            .await
            .unwrap();
        assert_eq!(ack.seq, 2 + i);
    }
    let got = receive(&mut bob_events, 20, WAIT).await;
    let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (2..22).collect::<Vec<_>>());
    assert!(got.iter().all(|m| m.recipient_id == "team"));

    // A non-member can neither send nor read.
    assert_eq!(
        code(
            carol
                .send_to_group("team", text("let me in"), "text/plain")
                .await
        ),
        v1::ErrorCode::NotAMember
    );
    assert_eq!(
        code(carol.sync("g:team", 0, 10).await),
        v1::ErrorCode::NotAMember
    );

    // Carol joins (groups are open under the built-in rules) and receives from then on.
    let joined = act(&carol, "team", Action::Join(v1::JoinGroup {}))
        .await
        .unwrap();
    assert_eq!(joined.group.unwrap().member_count, 3);
    let got = receive(&mut bob_events, 1, WAIT).await;
    assert_eq!(event(&got[0])["event"], "join");
    bob.send_to_group("team", text("welcome"), "text/plain")
        .await
        .unwrap();
    // Her client fills the gap before the welcome by seq: the group's history (members
    // may read all of it), her join, then the welcome, each once and in order.
    let got = receive(&mut carol_events, 23, WAIT).await;
    let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=23).collect::<Vec<_>>());
    assert_eq!(event(&got[21])["event"], "join");
    assert_eq!(got[22].body, text("welcome"));
    // Joining does not make older messages unread.
    let list = carol.list_conversations(10, None).await.unwrap();
    let entry = list
        .conversations
        .iter()
        .find(|c| c.conversation_id == "g:team")
        .unwrap();
    assert_eq!(entry.unread_count, 1);

    // Roles: only the owner manages them.
    assert_eq!(
        code(act(&bob, "team", Action::Kick(users(&["carol"]))).await),
        v1::ErrorCode::Rejected
    );
    let admin = v1::RoleChange {
        user_id: "bob".into(),
        role: v1::GroupRole::Admin as i32,
    };
    act(&alice, "team", Action::SetRole(admin)).await.unwrap();
    let members = alice.group_members("team", "", 10).await.unwrap();
    let roles: Vec<(String, i32)> = members
        .members
        .iter()
        .map(|m| (m.user_id.clone(), m.role))
        .collect();
    assert_eq!(
        roles,
        vec![
            ("alice".into(), v1::GroupRole::Owner as i32),
            ("bob".into(), v1::GroupRole::Admin as i32),
            ("carol".into(), v1::GroupRole::Member as i32),
        ]
    );

    // An admin kicks carol: she gets the announcement, then nothing more.
    let kicked = act(&bob, "team", Action::Kick(users(&["carol"])))
        .await
        .unwrap();
    assert_eq!(kicked.group.unwrap().member_count, 2);
    // She saw bob become an admin, then her removal.
    let got = receive(&mut carol_events, 2, WAIT).await;
    assert_eq!(event(&got[0])["event"], "set_role");
    assert_eq!(event(&got[1])["event"], "kick");
    alice
        .send_to_group("team", text("after"), "text/plain")
        .await
        .unwrap();
    assert_no_message(&mut carol_events, Duration::from_millis(300)).await;
    assert_eq!(
        code(
            carol
                .send_to_group("team", text("again"), "text/plain")
                .await
        ),
        v1::ErrorCode::NotAMember
    );
    assert!(carol.groups().await.unwrap().is_empty());
    // Removed, she may still read up to her removal (what her devices missed while a
    // member), never past it.
    let kick_seq = kicked.event.unwrap().seq;
    let page = carol.sync("g:team", 0, 100).await.unwrap();
    assert_eq!(page.last_seq, kick_seq);
    assert!(!page.has_more);
    let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=kick_seq).collect::<Vec<_>>());
    let back = carol.history("g:team", 0, 2).await.unwrap();
    let seqs: Vec<u64> = back.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![kick_seq, kick_seq - 1]);
    let back = carol.history("g:team", kick_seq + 5, 1).await.unwrap();
    assert_eq!(back.messages.first().map(|m| m.seq), Some(kick_seq));
    assert!(
        carol
            .sync("g:team", kick_seq, 10)
            .await
            .unwrap()
            .messages
            .is_empty()
    );

    // Ownership moves to bob; alice, now an admin, may leave.
    act(&alice, "team", Action::TransferTo("bob".into()))
        .await
        .unwrap();
    let left = act(&alice, "team", Action::Leave(v1::LeaveGroup {}))
        .await
        .unwrap();
    let group = left.group.unwrap();
    assert_eq!((group.owner_id.as_str(), group.member_count), ("bob", 1));
    let bobs: Vec<String> = bob
        .groups()
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.group_id)
        .collect();
    assert_eq!(bobs, vec!["team".to_owned()]);
}

async fn offline_member_syncs_the_gap(t: Transport) {
    let server = TestServer::start().await;
    let (alice, _alice_events) = server.client(t, "alice", "phone").await;
    let (bob, bob_events) = server.client(t, "bob", "phone").await;
    alice.create_group("crew", "Crew", &["bob"]).await.unwrap();
    alice
        .send_to_group("crew", text("before"), "text/plain")
        .await
        .unwrap();
    let mut bob_events = bob_events;
    let got = receive(&mut bob_events, 2, WAIT).await;
    assert_eq!(got[1].body, text("before"));
    bob.close().await;
    drop(bob_events);

    for i in 0..30 {
        alice
            .send_to_group("crew", text(&format!("offline {i}")), "text/plain")
            .await
            .unwrap();
    }
    // Back online, bob's client pulls the group's timeline by seq: every message once, in
    // order, ending with what was sent while he was away.
    let (_bob, mut bob_events) = server.client(t, "bob", "phone").await;
    let got = receive(&mut bob_events, 32, WAIT).await;
    let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=32).collect::<Vec<_>>());
    let bodies: Vec<_> = got[2..].iter().map(|m| m.body.clone()).collect();
    let expected: Vec<_> = (0..30).map(|i| text(&format!("offline {i}"))).collect();
    assert_eq!(bodies, expected);
    assert_no_message(&mut bob_events, Duration::from_millis(300)).await;
}

async fn refusals_leave_the_group_untouched(t: Transport) {
    let server = TestServer::start_with(|config| config.limits.max_group_batch = 3).await;
    let (alice, _e) = server.client(t, "alice", "phone").await;
    let (_bob, _be) = server.client(t, "bob", "phone").await;
    let (_carol, _ce) = server.client(t, "carol", "phone").await;
    alice.create_group("club", "Club", &["bob"]).await.unwrap();

    // Unknown group, unknown user, oversized list, taken id, owner leaving, bad input.
    assert_eq!(
        code(
            alice
                .send_to_group("nowhere", text("x"), "text/plain")
                .await
        ),
        v1::ErrorCode::UnknownGroup
    );
    assert_eq!(
        code(act(&alice, "nowhere", Action::Join(v1::JoinGroup {})).await),
        v1::ErrorCode::UnknownGroup
    );
    assert_eq!(
        code(act(&alice, "club", Action::Invite(users(&["ghost"]))).await),
        v1::ErrorCode::UnknownUser
    );
    assert_eq!(
        code(act(&alice, "club", Action::Invite(users(&["a", "b", "c", "d"]))).await),
        v1::ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(alice.create_group("club", "Again", &[]).await),
        v1::ErrorCode::Conflict
    );
    assert_eq!(
        code(act(&alice, "club", Action::Leave(v1::LeaveGroup {})).await),
        v1::ErrorCode::Conflict
    );
    assert_eq!(
        code(act(&alice, "bad id!", Action::Join(v1::JoinGroup {})).await),
        v1::ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(act(&alice, "club", Action::Join(v1::JoinGroup {})).await),
        v1::ErrorCode::Conflict
    );
    assert_eq!(
        code(act(&alice, "club", Action::Invite(users(&["bob"]))).await),
        v1::ErrorCode::Conflict
    );
    assert_eq!(
        code(act(&alice, "club", Action::Kick(users(&["carol"]))).await),
        v1::ErrorCode::Conflict
    );
    // Nothing of that reached the group's timeline.
    let sync = alice.sync("g:club", 0, 10).await.unwrap();
    assert_eq!(sync.last_seq, 1);
    let members = alice.group_members("club", "", 10).await.unwrap();
    assert_eq!(members.members.len(), 2);
}

async fn the_group_policy_plugin_decides(t: Transport) {
    let server = TestServer::start().await;
    let manifest = "id = \"group-policy\"\nversion = \"1.0.0\"\nhooks = [\"group-policy\"]\n\
                    [config]\nmax_members = \"3\"\ncreators = \"alice\"\njoin = \"invite\"";
    server.install_plugin(manifest, "group_policy.wasm").await;
    let (alice, _a) = server.client(t, "alice", "phone").await;
    let (bob, _b) = server.client(t, "bob", "phone").await;
    let (_carol, _c) = server.client(t, "carol", "phone").await;
    let (dave, _d) = server.client(t, "dave", "phone").await;

    // Only alice may create; the reason comes from the plugin.
    match bob.create_group("b", "Bob's", &[]).await {
        Err(im_client::ClientError::Server { code, message }) => {
            assert_eq!(code, v1::ErrorCode::Rejected);
            assert!(!message.is_empty());
        }
        other => panic!("bob created a group: {other:?}"),
    }
    alice.create_group("a", "Alice's", &["bob"]).await.unwrap();
    // Joining needs an invitation under `join = "invite"`.
    assert_eq!(
        code(act(&dave, "a", Action::Join(v1::JoinGroup {})).await),
        v1::ErrorCode::Rejected
    );
    // The plugin's size limit (3) holds: carol fits, dave does not.
    act(&alice, "a", Action::Invite(users(&["carol"])))
        .await
        .unwrap();
    assert_eq!(
        code(act(&alice, "a", Action::Invite(users(&["dave"]))).await),
        v1::ErrorCode::Rejected
    );
    let members = alice.group_members("a", "", 10).await.unwrap();
    assert_eq!(members.members.len(), 3);
}
