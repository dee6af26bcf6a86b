//! The backend-independent conformance suite: every [`Store`] backend must pass [`run_all`].
//!
//! Each check uses its own user and conversation names, so all of them run against one
//! store instance, in any order.

use bytes::Bytes;

use crate::{Appended, KvRecord, ListPosition, NewMessage, ReadState, Store, StoreError};

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
    let out = store.append_messages(&again).await.unwrap();
    assert_eq!(out[0], Appended::Duplicate(stored[0].message().clone()));
    assert_eq!(out[1], Appended::Duplicate(stored[1].message().clone()));
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
        .ack_delivered("cur-b", "phone", &[(conv.clone(), 3)])
        .await
        .unwrap();
    store
        .ack_delivered("cur-b", "phone", &[(conv.clone(), 2)])
        .await
        .unwrap();
    store
        .ack_delivered("cur-b", "laptop", &[(conv.clone(), 5)])
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
