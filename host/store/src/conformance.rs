//! The backend-independent conformance suite: every [`Store`] backend must pass [`run_all`].
//!
//! Each check uses its own user and conversation names, so all of them run against one
//! store instance, in any order.

use std::sync::Arc;

use bytes::Bytes;

use crate::{
    Appended, ConversationSummary, DeliveryCursor, GroupChange, GroupInfo, GroupMember, GroupRole,
    KvRecord, ListPosition, NewMessage, ReadState, Store, StoreError, StoredMessage,
};

/// `count` messages from `from` to `to`, client ids `<tag>-<n>`, bodies `<tag> <n>`.
pub fn direct_batch(from: &str, to: &str, tag: &str, count: usize) -> Vec<NewMessage> {
    (0..count)
        .map(|n| NewMessage {
            conversation_id: direct_id(from, to),
            sender_id: from.to_owned(),
            sender_device_id: "dev1".to_owned(),
            recipient_id: to.to_owned(),
            client_msg_id: format!("{tag}-{n}"),
            body: Bytes::from(format!("{tag} {n}")),
            content_type: "text/plain".to_owned(),
            server_msg_id: format!("srv-{tag}-{from}-{n}"),
            server_time_ms: 1_000 + n as i64,
        })
        .collect()
}

fn direct_id(a: &str, b: &str) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    format!("u:{lo}:{hi}")
}

/// Runs every conformance check against `store`.
pub async fn run_all(store: &dyn Store) {
    users_are_recorded(store).await;
    seqs_are_gapless_per_conversation(store).await;
    duplicates_return_the_original(store).await;
    paging_forwards_and_backwards(store).await;
    read_cursor_and_unread_counts(store).await;
    conversation_list_orders_by_activity(store).await;
    conversation_list_pages_through_equal_times(store).await;
    delivery_cursors_only_move_forward(store).await;
    concurrent_appends_stay_gapless(store).await;
    plugin_kv_persists_per_plugin(store).await;
    groups_are_created_and_read_back(store).await;
    group_announcements_take_consecutive_seqs(store).await;
    group_messages_and_announcements_share_one_seq_line(store).await;
    group_members_see_the_conversation_with_unread_counts(store).await;
    group_membership_and_roles_change(store).await;
    refused_group_changes_store_nothing(store).await;
    group_members_page_by_user_id(store).await;
    user_groups_are_ordered_by_group_id(store).await;
    group_messages_create_no_membership(store).await;
    removed_members_keep_reading_up_to_their_removal(store).await;
}

async fn plugin_kv_persists_per_plugin(store: &dyn Store) {
    let record = |key: &str, value: &[u8], expires_at_ms| KvRecord {
        key: key.into(),
        value: value.to_vec(),
        expires_at_ms,
    };
    store
        .write_plugin_kv(
            "kv-a",
            &[
                record("x", b"1", None),
                record("ttl", b"2", Some(500)),
                record("gone", b"3", None),
            ],
            &[],
        )
        .await
        .unwrap();
    store
        .write_plugin_kv("kv-b", &[record("x", b"other", None)], &[])
        .await
        .unwrap();
    store
        .write_plugin_kv(
            "kv-a",
            &[record("x", b"updated", None)],
            &["gone".to_owned()],
        )
        .await
        .unwrap();
    let mut a = store.load_plugin_kv("kv-a", 100).await.unwrap();
    a.sort_by(|l, r| l.key.cmp(&r.key));
    assert_eq!(
        a,
        vec![
            record("ttl", b"2", Some(500)),
            record("x", b"updated", None)
        ]
    );
    // Expired records are not loaded; other plugins' keys are separate.
    assert_eq!(
        store.load_plugin_kv("kv-a", 500).await.unwrap(),
        vec![record("x", b"updated", None)]
    );
    assert_eq!(
        store.load_plugin_kv("kv-b", 0).await.unwrap(),
        vec![record("x", b"other", None)]
    );
    assert!(store.load_plugin_kv("kv-none", 0).await.unwrap().is_empty());
}

async fn users_are_recorded(store: &dyn Store) {
    assert!(!store.user_exists("conf-user").await.unwrap());
    store.upsert_user("conf-user", 1).await.unwrap();
    store.upsert_user("conf-user", 2).await.unwrap();
    assert!(store.user_exists("conf-user").await.unwrap());
    for (i, user) in ["conf-list-c", "conf-list-a", "conf-list-b"]
        .iter()
        .enumerate()
    {
        store.upsert_user(user, 10 + i as i64).await.unwrap();
    }
    let page = store.list_users(Some("conf-list-"), 2).await.unwrap();
    let ids: Vec<&str> = page.iter().map(|u| u.user_id.as_str()).collect();
    assert_eq!(ids, ["conf-list-a", "conf-list-b"]);
    assert_eq!(page[0].created_ms, 11, "the first record's time is kept");
    let rest = store.list_users(Some("conf-list-b"), 100).await.unwrap();
    assert_eq!(rest[0].user_id, "conf-list-c");
    assert!(rest.iter().all(|u| u.user_id.as_str() > "conf-list-b"));
    let all = store.list_users(None, 10_000).await.unwrap();
    assert!(all.windows(2).all(|w| w[0].user_id < w[1].user_id));
    assert!(all.iter().any(|u| u.user_id == "conf-user"));
}

async fn seqs_are_gapless_per_conversation(store: &dyn Store) {
    let mut batch = direct_batch("seq-a", "seq-b", "x", 3);
    batch.extend(direct_batch("seq-a", "seq-c", "y", 2));
    batch.extend(direct_batch("seq-b", "seq-a", "z", 2));
    let out = store.append_messages(&batch).await.unwrap();
    let seqs: Vec<(String, u64)> = out
        .iter()
        .map(|a| match a {
            Appended::New(m) => (m.conversation_id.clone(), m.seq),
            Appended::Duplicate(m) => panic!("unexpected duplicate {m:?}"),
        })
        .collect();
    let ab = direct_id("seq-a", "seq-b");
    let ac = direct_id("seq-a", "seq-c");
    let expected: Vec<(String, u64)> = [
        (&ab, 1),
        (&ab, 2),
        (&ab, 3),
        (&ac, 1),
        (&ac, 2),
        (&ab, 4),
        (&ab, 5),
    ]
    .into_iter()
    .map(|(c, s)| (c.clone(), s))
    .collect();
    assert_eq!(seqs, expected);
    assert_eq!(store.last_seq(&ab).await.unwrap(), 5);
    assert_eq!(store.last_seq("u:nobody:none").await.unwrap(), 0);
    assert!(store.is_member("seq-a", &ab).await.unwrap());
    assert!(store.is_member("seq-b", &ab).await.unwrap());
    assert!(!store.is_member("seq-c", &ab).await.unwrap());
}

async fn duplicates_return_the_original(store: &dyn Store) {
    let first = direct_batch("dup-a", "dup-b", "d", 2);
    let stored = store.append_messages(&first).await.unwrap();
    // The same client ids again, with different bodies and server ids, plus a repeat in-batch.
    let mut again = direct_batch("dup-a", "dup-b", "d", 3);
    for m in &mut again {
        m.body = Bytes::from_static(b"changed");
        m.server_msg_id.push_str("-retry");
    }
    again.push(again[2].clone());
    // By value this time: both entry points decide duplicates alike.
    let out = store.append_owned(again).await.unwrap();
    assert_eq!(
        out[0],
        Appended::Duplicate(Arc::new(stored[0].message().clone()))
    );
    assert_eq!(
        out[1],
        Appended::Duplicate(Arc::new(stored[1].message().clone()))
    );
    let Appended::New(third) = &out[2] else {
        panic!("third is new: {:?}", out[2])
    };
    assert_eq!(third.seq, 3);
    assert_eq!(out[3], Appended::Duplicate(third.clone()));
    let conv = direct_id("dup-a", "dup-b");
    assert_eq!(store.last_seq(&conv).await.unwrap(), 3);
    let all = store.messages_after(&conv, 0, 100).await.unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all[0].body, Bytes::from_static(b"d 0"));
    // The same client id from another sender is a different message.
    let other = direct_batch("dup-b", "dup-a", "d", 1);
    assert!(matches!(
        store.append_messages(&other).await.unwrap()[0],
        Appended::New(_)
    ));
}

async fn paging_forwards_and_backwards(store: &dyn Store) {
    // Seqs past i64::MAX are past every message, not before them.
    store
        .append_messages(&direct_batch("huge-a", "huge-b", "h", 1))
        .await
        .unwrap();
    let huge = direct_id("huge-a", "huge-b");
    assert!(
        store
            .messages_after(&huge, u64::MAX, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .messages_before(&huge, u64::MAX, 10)
            .await
            .unwrap()
            .len(),
        1
    );

    let batch = direct_batch("page-a", "page-b", "p", 25);
    store.append_messages(&batch).await.unwrap();
    let conv = direct_id("page-a", "page-b");
    let mut after = 0;
    let mut seen = Vec::new();
    loop {
        let page = store.messages_after(&conv, after, 10).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 10);
        after = page.last().unwrap().seq;
        seen.extend(page.into_iter().map(|m| m.seq));
    }
    assert_eq!(seen, (1..=25).collect::<Vec<u64>>());
    let newest = store.messages_before(&conv, 0, 4).await.unwrap();
    assert_eq!(
        newest.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![25, 24, 23, 22]
    );
    let older = store.messages_before(&conv, 22, 100).await.unwrap();
    assert_eq!(older.len(), 21);
    assert_eq!(older.first().unwrap().seq, 21);
    assert_eq!(older.last().unwrap().seq, 1);
    assert_eq!(older.last().unwrap().body, Bytes::from_static(b"p 0"));
}

async fn read_cursor_and_unread_counts(store: &dyn Store) {
    let conv = direct_id("read-a", "read-b");
    store
        .append_messages(&direct_batch("read-a", "read-b", "r", 4))
        .await
        .unwrap();
    // The sender has read its own messages; the recipient has 4 unread.
    let a = store.mark_read("read-a", &conv, 0).await.unwrap();
    assert_eq!(
        a,
        ReadState {
            read_seq: 4,
            unread_count: 0
        }
    );
    let b = store.mark_read("read-b", &conv, 2).await.unwrap();
    assert_eq!(
        b,
        ReadState {
            read_seq: 2,
            unread_count: 2
        }
    );
    // Never backwards, never past the end.
    let b = store.mark_read("read-b", &conv, 1).await.unwrap();
    assert_eq!(
        b,
        ReadState {
            read_seq: 2,
            unread_count: 2
        }
    );
    let b = store.mark_read("read-b", &conv, 1_000).await.unwrap();
    assert_eq!(
        b,
        ReadState {
            read_seq: 4,
            unread_count: 0
        }
    );
    // A reply from b advances b's cursor and makes one unread for a.
    store
        .append_messages(&direct_batch("read-b", "read-a", "reply", 1))
        .await
        .unwrap();
    let a = store.mark_read("read-a", &conv, 0).await.unwrap();
    assert_eq!(
        a,
        ReadState {
            read_seq: 4,
            unread_count: 1
        }
    );
    assert!(matches!(
        store.mark_read("read-c", &conv, 1).await,
        Err(StoreError::UnknownConversation)
    ));
}

async fn conversation_list_orders_by_activity(store: &dyn Store) {
    let mut first = direct_batch("list-a", "list-b", "l1", 2);
    let mut second = direct_batch("list-c", "list-a", "l2", 3);
    for m in first.iter_mut() {
        m.server_time_ms += 10_000;
    }
    for m in second.iter_mut() {
        m.server_time_ms += 20_000;
    }
    store.append_messages(&first).await.unwrap();
    store.append_messages(&second).await.unwrap();
    let list = store
        .list_conversations("list-a", "phone", None, 10)
        .await
        .unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].conversation_id, direct_id("list-a", "list-c"));
    assert_eq!(list[0].peer_id, "list-c");
    assert_eq!(list[0].last_seq, 3);
    assert_eq!(list[0].unread_count, 3);
    assert_eq!(
        list[0].last_message.as_ref().unwrap().body,
        Bytes::from_static(b"l2 2")
    );
    assert_eq!(list[1].peer_id, "list-b");
    assert_eq!(list[1].unread_count, 0);
    assert_eq!(list[1].read_seq, 2);
    let page2 = store
        .list_conversations(
            "list-a",
            "phone",
            Some(ListPosition {
                last_time_ms: list[0].last_time_ms,
                conversation_id: &list[0].conversation_id,
            }),
            10,
        )
        .await
        .unwrap();
    assert_eq!(page2.len(), 1);
    assert_eq!(page2[0].peer_id, "list-b");
    assert!(
        store
            .list_conversations("list-nobody", "phone", None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn conversation_list_pages_through_equal_times(store: &dyn Store) {
    // Five conversations whose last messages share one millisecond, paged two at a time.
    for peer in ["tie-b", "tie-c", "tie-d", "tie-e", "tie-f"] {
        store
            .append_messages(&direct_batch(peer, "tie-a", "t", 1))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut after: Option<(i64, String)> = None;
    loop {
        let position = after.as_ref().map(|(t, c)| ListPosition {
            last_time_ms: *t,
            conversation_id: c,
        });
        let page = store
            .list_conversations("tie-a", "phone", position, 2)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        let last = page.last().unwrap();
        after = Some((last.last_time_ms, last.conversation_id.clone()));
        seen.extend(page.into_iter().map(|c| c.peer_id));
    }
    assert_eq!(seen, vec!["tie-b", "tie-c", "tie-d", "tie-e", "tie-f"]);
}

async fn delivery_cursors_only_move_forward(store: &dyn Store) {
    store
        .append_messages(&direct_batch("cur-a", "cur-b", "c", 5))
        .await
        .unwrap();
    let conv = direct_id("cur-a", "cur-b");
    store
        .ack_delivered(&[cursor("cur-b", "phone", &conv, 3)])
        .await
        .unwrap();
    store
        .ack_delivered(&[cursor("cur-b", "phone", &conv, 2)])
        .await
        .unwrap();
    store
        .ack_delivered(&[cursor("cur-b", "laptop", &conv, 5)])
        .await
        .unwrap();
    let phone = store
        .list_conversations("cur-b", "phone", None, 10)
        .await
        .unwrap();
    assert_eq!(phone[0].delivered_seq, 3);
    let laptop = store
        .list_conversations("cur-b", "laptop", None, 10)
        .await
        .unwrap();
    assert_eq!(laptop[0].delivered_seq, 5);
    let tablet = store
        .list_conversations("cur-b", "tablet", None, 10)
        .await
        .unwrap();
    assert_eq!(tablet[0].delivered_seq, 0);
    // One call, several devices; an entry behind the stored cursor does not move it back.
    store
        .ack_delivered(&[
            cursor("cur-b", "tablet", &conv, 4),
            cursor("cur-b", "laptop", &conv, 1),
            cursor("cur-b", "phone", &conv, 6),
        ])
        .await
        .unwrap();
    for (device, expected) in [("tablet", 4), ("laptop", 5), ("phone", 6)] {
        let listed = store
            .list_conversations("cur-b", device, None, 10)
            .await
            .unwrap();
        assert_eq!(listed[0].delivered_seq, expected, "{device}");
    }
}

fn cursor(user_id: &str, device_id: &str, conversation_id: &str, seq: u64) -> DeliveryCursor {
    DeliveryCursor {
        user_id: user_id.into(),
        device_id: device_id.into(),
        conversation_id: conversation_id.into(),
        seq,
    }
}

async fn concurrent_appends_stay_gapless(store: &dyn Store) {
    let conv = direct_id("conc-a", "conc-b");
    let batches: Vec<Vec<NewMessage>> = (0..8)
        .map(|i| direct_batch("conc-a", "conc-b", &format!("t{i}"), 10))
        .collect();
    let results = futures_join_all(store, &batches).await;
    let mut seqs: Vec<u64> = results.iter().flatten().map(|a| a.message().seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=80).collect::<Vec<u64>>());
    assert_eq!(store.last_seq(&conv).await.unwrap(), 80);
}

async fn futures_join_all(store: &dyn Store, batches: &[Vec<NewMessage>]) -> Vec<Vec<Appended>> {
    // Drive all appends concurrently on the current task, without extra dependencies.
    let mut pending: Vec<_> = batches
        .iter()
        .map(|b| Box::pin(store.append_messages(b)))
        .collect();
    let mut results: Vec<Option<Vec<Appended>>> = vec![None; batches.len()];
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (i, fut) in pending.iter_mut().enumerate() {
            if results[i].is_none() {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(r) => results[i] = Some(r.unwrap()),
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    results.into_iter().map(Option::unwrap).collect()
}

fn group_conversation(group_id: &str) -> String {
    format!("g:{group_id}")
}

/// A group announcement by `actor` in group `group_id`; `tag` makes its client id unique.
fn announcement(group_id: &str, actor: &str, tag: &str, time_ms: i64) -> NewMessage {
    NewMessage {
        conversation_id: group_conversation(group_id),
        sender_id: actor.to_owned(),
        sender_device_id: "dev1".to_owned(),
        recipient_id: group_id.to_owned(),
        client_msg_id: format!("{group_id}-{tag}"),
        body: Bytes::from(format!("{group_id} {tag}")),
        content_type: "application/vnd.im.group-event+json".to_owned(),
        server_msg_id: format!("srv-{group_id}-{tag}"),
        server_time_ms: time_ms,
    }
}

/// A chat message from `sender` to group `group_id`.
fn group_message(group_id: &str, sender: &str, tag: &str, time_ms: i64) -> NewMessage {
    NewMessage {
        content_type: "text/plain".to_owned(),
        ..announcement(group_id, sender, tag, time_ms)
    }
}

fn create(owner_id: &str, members: &[&str]) -> GroupChange {
    GroupChange::Create {
        name: "a group".to_owned(),
        owner_id: owner_id.to_owned(),
        members: users(members),
    }
}

fn users(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|&id| id.to_owned()).collect()
}

/// Applies a change that must succeed.
async fn change(
    store: &dyn Store,
    group_id: &str,
    change: GroupChange,
    msg: NewMessage,
) -> (GroupInfo, StoredMessage) {
    store
        .apply_group_change(group_id, &change, &msg)
        .await
        .unwrap_or_else(|e| panic!("{change:?} on {group_id}: {e}"))
}

/// All members as (user id, role), ordered by user id.
async fn roles(store: &dyn Store, group_id: &str) -> Vec<(String, GroupRole)> {
    store
        .group_members(group_id, None, 1_000)
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.user_id, m.role))
        .collect()
}

async fn group_entry(store: &dyn Store, user_id: &str, group_id: &str) -> ConversationSummary {
    let conversation_id = group_conversation(group_id);
    store
        .list_conversations(user_id, "phone", None, 100)
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.conversation_id == conversation_id)
        .unwrap_or_else(|| panic!("{user_id} does not list {conversation_id}"))
}

async fn groups_are_created_and_read_back(store: &dyn Store) {
    // The owner and a repeated member in the list count once.
    let (group, event) = change(
        store,
        "grp-new",
        create("gn-owner", &["gn-b", "gn-a", "gn-b", "gn-owner"]),
        announcement("grp-new", "gn-owner", "create", 5_000),
    )
    .await;
    let expected = GroupInfo {
        group_id: "grp-new".to_owned(),
        name: "a group".to_owned(),
        owner_id: "gn-owner".to_owned(),
        member_count: 3,
        created_ms: 5_000,
    };
    assert_eq!(group, expected);
    assert_eq!(store.group("grp-new").await.unwrap(), Some(expected));
    assert_eq!(event.conversation_id, "g:grp-new");
    assert_eq!(event.seq, 1);
    assert_eq!(event.recipient_id, "grp-new");
    assert_eq!(
        store.group_member("grp-new", "gn-owner").await.unwrap(),
        Some(GroupMember {
            user_id: "gn-owner".to_owned(),
            role: GroupRole::Owner,
            joined_ms: 5_000,
        })
    );
    assert_eq!(
        roles(store, "grp-new").await,
        vec![
            ("gn-a".to_owned(), GroupRole::Member),
            ("gn-b".to_owned(), GroupRole::Member),
            ("gn-owner".to_owned(), GroupRole::Owner),
        ]
    );
    for user in ["gn-a", "gn-b", "gn-owner"] {
        assert!(store.is_member(user, "g:grp-new").await.unwrap());
    }
    assert_eq!(store.group_member("grp-new", "gn-x").await.unwrap(), None);
    assert_eq!(store.group("grp-none").await.unwrap(), None);
    assert!(
        store
            .group_members("grp-none", None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn group_announcements_take_consecutive_seqs(store: &dyn Store) {
    let g = "grp-seq";
    let changes = [
        create("gs-owner", &["gs-a"]),
        GroupChange::Add {
            user_ids: users(&["gs-b"]),
        },
        GroupChange::SetRole {
            user_id: "gs-a".to_owned(),
            role: GroupRole::Admin,
        },
        GroupChange::Remove {
            user_ids: users(&["gs-b"]),
        },
        GroupChange::TransferOwnership {
            to: "gs-a".to_owned(),
        },
    ];
    for (n, c) in changes.into_iter().enumerate() {
        let (_, event) = change(
            store,
            g,
            c,
            announcement(g, "gs-owner", &n.to_string(), 6_000 + n as i64),
        )
        .await;
        assert_eq!(event.seq, n as u64 + 1);
    }
    let conv = group_conversation(g);
    assert_eq!(store.last_seq(&conv).await.unwrap(), 5);
    let timeline = store.messages_after(&conv, 0, 100).await.unwrap();
    assert_eq!(
        timeline.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert_eq!(timeline[0].body, Bytes::from_static(b"grp-seq 0"));
    assert_eq!(timeline[4].body, Bytes::from_static(b"grp-seq 4"));
    assert_eq!(store.messages_after(&conv, 3, 100).await.unwrap().len(), 2);
    // An announcement's (sender, client message id) is taken like a message's: a send that
    // repeats it is answered with the announcement and stores nothing.
    let repeat = store
        .append_messages(&[group_message(g, "gs-owner", "0", 6_100)])
        .await
        .unwrap();
    assert!(
        matches!(&repeat[0], Appended::Duplicate(m) if m.seq == 1 && m.body == timeline[0].body),
        "{repeat:?}"
    );
    assert_eq!(store.last_seq(&conv).await.unwrap(), 5);
}

/// A removed member is no member, but may read up to the announcement that removed it;
/// added again, it is a member like any other.
async fn removed_members_keep_reading_up_to_their_removal(store: &dyn Store) {
    let g = "grp-removed";
    let conv = group_conversation(g);
    change(
        store,
        g,
        create("gr-owner", &["gr-a", "gr-b"]),
        announcement(g, "gr-owner", "create", 9_000),
    )
    .await;
    assert_eq!(store.removed_at("gr-a", &conv).await.unwrap(), None);
    let (_, removal) = change(
        store,
        g,
        GroupChange::Remove {
            user_ids: users(&["gr-a"]),
        },
        announcement(g, "gr-owner", "remove", 9_001),
    )
    .await;
    assert!(!store.is_member("gr-a", &conv).await.unwrap());
    assert_eq!(
        store.removed_at("gr-a", &conv).await.unwrap(),
        Some(removal.seq)
    );
    assert_eq!(store.removed_at("gr-b", &conv).await.unwrap(), None);
    assert_eq!(store.removed_at("gr-x", &conv).await.unwrap(), None);
    let (_, readded) = change(
        store,
        g,
        GroupChange::Add {
            user_ids: users(&["gr-a"]),
        },
        announcement(g, "gr-owner", "add", 9_002),
    )
    .await;
    assert!(readded.seq > removal.seq);
    assert!(store.is_member("gr-a", &conv).await.unwrap());
    assert_eq!(store.removed_at("gr-a", &conv).await.unwrap(), None);
    // Removed again: the later removal counts.
    let (_, again) = change(
        store,
        g,
        GroupChange::Remove {
            user_ids: users(&["gr-a"]),
        },
        announcement(g, "gr-owner", "remove-again", 9_003),
    )
    .await;
    assert_eq!(
        store.removed_at("gr-a", &conv).await.unwrap(),
        Some(again.seq)
    );
}

/// Messages and announcements alternate in one group: every one takes the next seq, whoever
/// assigned the one before (a backend that caches last seqs must not reuse one).
async fn group_messages_and_announcements_share_one_seq_line(store: &dyn Store) {
    let g = "grp-mixed";
    let conv = group_conversation(g);
    change(
        store,
        g,
        create("gm-owner", &["gm-a"]),
        announcement(g, "gm-owner", "create", 7_000),
    )
    .await;
    for n in 0..3u64 {
        let sent = group_message(g, "gm-a", &format!("m{n}"), 7_001 + n as i64);
        let appended = store.append_messages(&[sent]).await.unwrap();
        assert_eq!(appended[0].message().seq, 2 * n + 2, "message {n}");
        let role = if n % 2 == 0 {
            GroupRole::Admin
        } else {
            GroupRole::Member
        };
        let (_, event) = change(
            store,
            g,
            GroupChange::SetRole {
                user_id: "gm-a".to_owned(),
                role,
            },
            announcement(g, "gm-owner", &format!("role{n}"), 7_100 + n as i64),
        )
        .await;
        assert_eq!(event.seq, 2 * n + 3, "announcement {n}");
    }
    let timeline = store.messages_after(&conv, 0, 100).await.unwrap();
    assert_eq!(
        timeline.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=7).collect::<Vec<_>>()
    );
}

async fn group_members_see_the_conversation_with_unread_counts(store: &dyn Store) {
    let g = "grp-unread";
    change(
        store,
        g,
        create("gu-owner", &["gu-a"]),
        announcement(g, "gu-owner", "create", 7_000),
    )
    .await;
    // Everyone starts at the announcement that added them: nothing unread.
    let a = group_entry(store, "gu-a", g).await;
    assert_eq!(a.peer_id, g);
    assert_eq!((a.last_seq, a.read_seq, a.unread_count), (1, 1, 0));
    assert_eq!(a.last_time_ms, 7_000);
    // Two messages from the owner (seqs 2, 3) are unread for a, read for the owner.
    store
        .append_messages(&[
            group_message(g, "gu-owner", "m1", 7_001),
            group_message(g, "gu-owner", "m2", 7_002),
        ])
        .await
        .unwrap();
    let a = group_entry(store, "gu-a", g).await;
    assert_eq!((a.last_seq, a.read_seq, a.unread_count), (3, 1, 2));
    let owner = group_entry(store, "gu-owner", g).await;
    assert_eq!((owner.read_seq, owner.unread_count), (3, 0));
    // A member added later (seq 4) has nothing unread from before.
    change(
        store,
        g,
        GroupChange::Add {
            user_ids: users(&["gu-late"]),
        },
        announcement(g, "gu-a", "add-late", 7_003),
    )
    .await;
    let late = group_entry(store, "gu-late", g).await;
    assert_eq!((late.last_seq, late.read_seq, late.unread_count), (4, 4, 0));
    // The inviting member has read its own announcement.
    let a = group_entry(store, "gu-a", g).await;
    assert_eq!((a.read_seq, a.unread_count), (4, 0));
    // A message from another member after joining counts; the sender's own does not.
    store
        .append_messages(&[group_message(g, "gu-a", "m3", 7_004)])
        .await
        .unwrap();
    let late = group_entry(store, "gu-late", g).await;
    assert_eq!((late.last_seq, late.read_seq, late.unread_count), (5, 4, 1));
    assert_eq!(
        late.last_message.as_ref().unwrap().body,
        Bytes::from_static(b"grp-unread m3")
    );
    let owner = group_entry(store, "gu-owner", g).await;
    assert_eq!((owner.read_seq, owner.unread_count), (3, 2));
    let a = group_entry(store, "gu-a", g).await;
    assert_eq!((a.read_seq, a.unread_count), (5, 0));
    let read = store
        .mark_read("gu-late", &group_conversation(g), 5)
        .await
        .unwrap();
    assert_eq!(
        read,
        ReadState {
            read_seq: 5,
            unread_count: 0
        }
    );
}

async fn group_membership_and_roles_change(store: &dyn Store) {
    let g = "grp-roles";
    let conv = group_conversation(g);
    change(
        store,
        g,
        create("gr-owner", &["gr-a"]),
        announcement(g, "gr-owner", "create", 8_000),
    )
    .await;
    // Adding skips members and repeats.
    let (group, _) = change(
        store,
        g,
        GroupChange::Add {
            user_ids: users(&["gr-b", "gr-a", "gr-c", "gr-b", "gr-owner"]),
        },
        announcement(g, "gr-owner", "add", 8_001),
    )
    .await;
    assert_eq!(group.member_count, 4);
    let b = store.group_member(g, "gr-b").await.unwrap().unwrap();
    assert_eq!((b.role, b.joined_ms), (GroupRole::Member, 8_001));
    // The earlier member keeps its join time.
    let a = store.group_member(g, "gr-a").await.unwrap().unwrap();
    assert_eq!(a.joined_ms, 8_000);
    // Removing skips non-members and repeats; the removed leave the conversation.
    let (group, _) = change(
        store,
        g,
        GroupChange::Remove {
            user_ids: users(&["gr-c", "gr-x", "gr-c"]),
        },
        announcement(g, "gr-owner", "remove", 8_002),
    )
    .await;
    assert_eq!(group.member_count, 3);
    assert_eq!(store.group_member(g, "gr-c").await.unwrap(), None);
    assert!(!store.is_member("gr-c", &conv).await.unwrap());
    assert!(
        store
            .list_conversations("gr-c", "phone", None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.user_groups("gr-c").await.unwrap().is_empty());
    assert!(matches!(
        store.mark_read("gr-c", &conv, 1).await,
        Err(StoreError::UnknownConversation)
    ));
    // Roles: admin and back.
    change(
        store,
        g,
        GroupChange::SetRole {
            user_id: "gr-a".to_owned(),
            role: GroupRole::Admin,
        },
        announcement(g, "gr-owner", "admin-a", 8_003),
    )
    .await;
    change(
        store,
        g,
        GroupChange::SetRole {
            user_id: "gr-b".to_owned(),
            role: GroupRole::Admin,
        },
        announcement(g, "gr-owner", "admin-b", 8_004),
    )
    .await;
    change(
        store,
        g,
        GroupChange::SetRole {
            user_id: "gr-b".to_owned(),
            role: GroupRole::Member,
        },
        announcement(g, "gr-owner", "member-b", 8_005),
    )
    .await;
    assert_eq!(
        roles(store, g).await,
        vec![
            ("gr-a".to_owned(), GroupRole::Admin),
            ("gr-b".to_owned(), GroupRole::Member),
            ("gr-owner".to_owned(), GroupRole::Owner),
        ]
    );
    // Transfer: the old owner becomes an admin, and can then be removed.
    let (group, _) = change(
        store,
        g,
        GroupChange::TransferOwnership {
            to: "gr-b".to_owned(),
        },
        announcement(g, "gr-owner", "transfer", 8_006),
    )
    .await;
    assert_eq!((group.owner_id.as_str(), group.member_count), ("gr-b", 3));
    assert_eq!(
        roles(store, g).await,
        vec![
            ("gr-a".to_owned(), GroupRole::Admin),
            ("gr-b".to_owned(), GroupRole::Owner),
            ("gr-owner".to_owned(), GroupRole::Admin),
        ]
    );
    let (group, _) = change(
        store,
        g,
        GroupChange::Remove {
            user_ids: users(&["gr-owner"]),
        },
        announcement(g, "gr-b", "remove-old-owner", 8_007),
    )
    .await;
    assert_eq!(group.member_count, 2);
    // A removed user who comes back starts at the announcement that re-added them.
    let (group, event) = change(
        store,
        g,
        GroupChange::Add {
            user_ids: users(&["gr-c"]),
        },
        announcement(g, "gr-b", "readd-c", 8_008),
    )
    .await;
    assert_eq!(group.member_count, 3);
    let c = group_entry(store, "gr-c", g).await;
    assert_eq!((c.read_seq, c.unread_count), (event.seq, 0));
    assert_eq!(
        store
            .group_member(g, "gr-c")
            .await
            .unwrap()
            .unwrap()
            .joined_ms,
        8_008
    );
    assert_eq!(store.group(g).await.unwrap(), Some(group));
}

/// What a refused change must leave untouched.
#[derive(Debug, PartialEq, Eq)]
struct GroupSnapshot {
    group: Option<GroupInfo>,
    members: Vec<GroupMember>,
    last_seq: u64,
    conversation_members: Vec<String>,
}

async fn snapshot(store: &dyn Store, group_id: &str, users: &[&str]) -> GroupSnapshot {
    let conv = group_conversation(group_id);
    let mut conversation_members = Vec::new();
    for &user in users {
        if store.is_member(user, &conv).await.unwrap() {
            conversation_members.push(user.to_owned());
        }
    }
    GroupSnapshot {
        group: store.group(group_id).await.unwrap(),
        members: store.group_members(group_id, None, 1_000).await.unwrap(),
        last_seq: store.last_seq(&conv).await.unwrap(),
        conversation_members,
    }
}

async fn refused_group_changes_store_nothing(store: &dyn Store) {
    let g = "grp-refuse";
    let everyone = ["gf-owner", "gf-a", "gf-admin", "gf-x"];
    change(
        store,
        g,
        create("gf-owner", &["gf-a", "gf-admin"]),
        announcement(g, "gf-owner", "create", 9_000),
    )
    .await;
    change(
        store,
        g,
        GroupChange::SetRole {
            user_id: "gf-admin".to_owned(),
            role: GroupRole::Admin,
        },
        announcement(g, "gf-owner", "admin", 9_001),
    )
    .await;
    let before = snapshot(store, g, &everyone).await;
    assert_eq!(before.last_seq, 2);
    let conflicts = [
        ("create-again", create("gf-x", &["gf-a"])),
        (
            // The owner with a removable member: the member stays too.
            "remove-owner",
            GroupChange::Remove {
                user_ids: users(&["gf-a", "gf-owner"]),
            },
        ),
        (
            "role-owner",
            GroupChange::SetRole {
                user_id: "gf-a".to_owned(),
                role: GroupRole::Owner,
            },
        ),
        (
            "role-of-owner",
            GroupChange::SetRole {
                user_id: "gf-owner".to_owned(),
                role: GroupRole::Member,
            },
        ),
        (
            "role-non-member",
            GroupChange::SetRole {
                user_id: "gf-x".to_owned(),
                role: GroupRole::Admin,
            },
        ),
        (
            "transfer-non-member",
            GroupChange::TransferOwnership {
                to: "gf-x".to_owned(),
            },
        ),
        (
            "transfer-to-owner",
            GroupChange::TransferOwnership {
                to: "gf-owner".to_owned(),
            },
        ),
    ];
    for (tag, c) in &conflicts {
        let result = store
            .apply_group_change(g, c, &announcement(g, "gf-owner", tag, 9_100))
            .await;
        assert!(
            matches!(result, Err(StoreError::Conflict(_))),
            "{tag}: {result:?}"
        );
        assert_eq!(snapshot(store, g, &everyone).await, before, "{tag}");
    }
    // An announcement already stored, or one outside the group's conversation.
    let add_x = GroupChange::Add {
        user_ids: users(&["gf-x"]),
    };
    let mut misplaced = announcement(g, "gf-owner", "misplaced", 9_100);
    misplaced.conversation_id = group_conversation("grp-elsewhere");
    for (tag, msg) in [
        ("repeat", announcement(g, "gf-owner", "admin", 9_100)),
        ("misplaced", misplaced),
    ] {
        let result = store.apply_group_change(g, &add_x, &msg).await;
        assert!(
            matches!(result, Err(StoreError::Conflict(_))),
            "{tag}: {result:?}"
        );
        assert_eq!(snapshot(store, g, &everyone).await, before, "{tag}");
    }
    assert_eq!(store.last_seq("g:grp-elsewhere").await.unwrap(), 0);
    // Anything but Create on a missing group.
    let missing = "grp-missing";
    let on_missing = [
        GroupChange::Add {
            user_ids: users(&["gf-a"]),
        },
        GroupChange::Remove {
            user_ids: users(&["gf-a"]),
        },
        GroupChange::SetRole {
            user_id: "gf-a".to_owned(),
            role: GroupRole::Admin,
        },
        GroupChange::TransferOwnership {
            to: "gf-a".to_owned(),
        },
    ];
    for (n, c) in on_missing.iter().enumerate() {
        let result = store
            .apply_group_change(
                missing,
                c,
                &announcement(missing, "gf-a", &n.to_string(), 9_200),
            )
            .await;
        assert!(
            matches!(result, Err(StoreError::UnknownConversation)),
            "{c:?}: {result:?}"
        );
        assert_eq!(
            snapshot(store, missing, &everyone).await,
            GroupSnapshot {
                group: None,
                members: Vec::new(),
                last_seq: 0,
                conversation_members: Vec::new(),
            }
        );
    }
    assert!(store.user_groups("gf-x").await.unwrap().is_empty());
}

async fn group_members_page_by_user_id(store: &dyn Store) {
    let g = "grp-page";
    let others = ["gp-f", "gp-b", "gp-e", "gp-a", "gp-d", "gp-c"];
    change(
        store,
        g,
        create("gp-owner", &others),
        announcement(g, "gp-owner", "create", 10_000),
    )
    .await;
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.group_members(g, after.as_deref(), 2).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2);
        after = Some(page.last().unwrap().user_id.clone());
        seen.extend(page.into_iter().map(|m| m.user_id));
    }
    assert_eq!(
        seen,
        vec!["gp-a", "gp-b", "gp-c", "gp-d", "gp-e", "gp-f", "gp-owner"]
    );
    let tail = store.group_members(g, Some("gp-d"), 100).await.unwrap();
    assert_eq!(
        tail.iter().map(|m| m.user_id.as_str()).collect::<Vec<_>>(),
        vec!["gp-e", "gp-f", "gp-owner"]
    );
    assert_eq!(store.group_members(g, None, 3).await.unwrap().len(), 3);
}

async fn user_groups_are_ordered_by_group_id(store: &dyn Store) {
    for (g, owner, members) in [
        ("grp-ug-c", "ug-user", vec![]),
        ("grp-ug-a", "ug-other", vec!["ug-user"]),
        ("grp-ug-d", "ug-other", vec![]),
        ("grp-ug-b", "ug-other", vec!["ug-user"]),
    ] {
        change(
            store,
            g,
            create(owner, &members),
            announcement(g, owner, "create", 11_000),
        )
        .await;
    }
    let ids = |groups: Vec<GroupInfo>| {
        groups
            .into_iter()
            .map(|g| g.group_id)
            .collect::<Vec<String>>()
    };
    assert_eq!(
        ids(store.user_groups("ug-user").await.unwrap()),
        vec!["grp-ug-a", "grp-ug-b", "grp-ug-c"]
    );
    let listed = store.user_groups("ug-user").await.unwrap();
    assert_eq!(
        Some(&listed[0]),
        store.group("grp-ug-a").await.unwrap().as_ref()
    );
    assert_eq!(listed[0].member_count, 2);
    change(
        store,
        "grp-ug-b",
        GroupChange::Remove {
            user_ids: users(&["ug-user"]),
        },
        announcement("grp-ug-b", "ug-user", "leave", 11_001),
    )
    .await;
    assert_eq!(
        ids(store.user_groups("ug-user").await.unwrap()),
        vec!["grp-ug-a", "grp-ug-c"]
    );
    assert!(store.user_groups("ug-nobody").await.unwrap().is_empty());
}

async fn group_messages_create_no_membership(store: &dyn Store) {
    let g = "grp-msg";
    let conv = group_conversation(g);
    change(
        store,
        g,
        create("gm-owner", &["gm-a"]),
        announcement(g, "gm-owner", "create", 12_000),
    )
    .await;
    change(
        store,
        g,
        GroupChange::Add {
            user_ids: users(&["gm-b"]),
        },
        announcement(g, "gm-owner", "add", 12_001),
    )
    .await;
    let out = store
        .append_messages(&[group_message(g, "gm-a", "hello", 12_002)])
        .await
        .unwrap();
    let Appended::New(sent) = &out[0] else {
        panic!("new: {out:?}")
    };
    assert_eq!(sent.seq, 3);
    assert_eq!(store.last_seq(&conv).await.unwrap(), 3);
    // No 1:1-style row for the group id as a peer user; members are unchanged.
    assert!(!store.is_member(g, &conv).await.unwrap());
    assert!(
        store
            .list_conversations(g, "phone", None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.group(g).await.unwrap().unwrap().member_count, 3);
    // Even a first message in a group conversation creates no membership.
    let fresh = "grp-msg-fresh";
    let out = store
        .append_messages(&[group_message(fresh, "gm-a", "first", 12_003)])
        .await
        .unwrap();
    assert_eq!(out[0].message().seq, 1);
    let fresh_conv = group_conversation(fresh);
    assert!(!store.is_member("gm-a", &fresh_conv).await.unwrap());
    assert!(!store.is_member(fresh, &fresh_conv).await.unwrap());
}
