//! A 1,000-member group spread over TCP, WebSocket and QUIC clients: every online member
//! receives every message exactly once and in seq order while three senders (one per
//! transport) send concurrently and members are kicked and invited in the middle of the
//! traffic; members that went away, or were never online, sync the gap afterwards.

use std::collections::HashMap;
use std::time::Duration;

use im_client::{Client, ClientConfig, Event, Events, Resume, v1};
use im_e2e::*;
use tokio::task::JoinSet;

const MEMBERS: usize = 1000;
/// Never online during the traffic: they sync everything at the end.
const OFFLINE: std::ops::Range<usize> = 900..1000;
/// Online for the first phase only: they sync the gap at the end.
const LEAVERS: std::ops::Range<usize> = 800..850;
/// Kicked in the middle of the traffic.
const KICKED: std::ops::Range<usize> = 700..705;
/// Not members at first, invited in the middle of the traffic.
const LATE: usize = 5;
/// Messages per sender per phase; three senders, two phases.
const PER_PHASE: usize = 15;
const WAIT: Duration = Duration::from_secs(180);
const GROUP: &str = "big";
const CONVERSATION: &str = "g:big";

fn member(i: usize) -> String {
    format!("m{i:04}")
}

fn transport(i: usize) -> Transport {
    ALL_TRANSPORTS[i % 3]
}

/// Collects the group's messages (seq, sender, body) from `events` until seq `until` has
/// arrived, or the client is closed.
async fn collect(
    events: &mut Events,
    until: &tokio::sync::watch::Receiver<u64>,
) -> Vec<(u64, String, Vec<u8>)> {
    let mut got = Vec::new();
    let mut until = until.clone();
    loop {
        let target = *until.borrow();
        if target > 0 && got.last().is_some_and(|(seq, _, _)| *seq >= target) {
            return got;
        }
        tokio::select! {
            event = events.next() => match event {
                Some(Event::Message(m)) if m.conversation_id == CONVERSATION => {
                    got.push((m.seq, m.sender_id, m.body.to_vec()));
                }
                Some(Event::Closed { .. }) | None => return got,
                Some(_) => {}
            },
            changed = until.changed() => {
                if changed.is_err() {
                    return got;
                }
            }
        }
    }
}

fn assert_contiguous(who: &str, got: &[(u64, String, Vec<u8>)], from: u64, to: u64) {
    let seqs: Vec<u64> = got.iter().map(|(seq, _, _)| *seq).collect();
    let expected: Vec<u64> = (from..=to).collect();
    assert!(
        seqs == expected,
        "{who}: expected seqs {from}..={to} once each in order, got {} entries: {:?}",
        seqs.len(),
        &seqs[..seqs.len().min(40)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_members_over_every_transport_get_every_message_once_in_order() {
    let server = TestServer::start().await;
    let users: Vec<String> = (0..MEMBERS).map(member).collect();
    let late: Vec<String> = (0..LATE).map(|i| format!("late{i}")).collect();
    for user in users.iter().chain(&late) {
        server
            .node
            .context
            .known_users
            .register(&user.as_str().into())
            .await
            .unwrap();
    }
    let quic = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let config = |i: usize, user: &str| -> ClientConfig {
        let mut config = server.client_config(transport(i), user, "d");
        config.quic_endpoint = Some(quic.clone());
        config.send_deadline = WAIT;
        config.request_timeout = Duration::from_secs(60);
        config.ack_timeout = Duration::from_secs(10);
        config
    };

    // The owner creates the group with 499 members and invites the other 500.
    let (owner, _owner_events) = Client::connect(config(0, &users[0])).await.unwrap();
    let first: Vec<&str> = users[1..500].iter().map(String::as_str).collect();
    owner.create_group(GROUP, "Big", &first).await.unwrap();
    let rest = users[500..].to_vec();
    let invited = owner
        .group_request(v1::GroupRequest {
            group_id: GROUP.into(),
            action: Some(v1::group_request::Action::Invite(v1::GroupUsers {
                user_ids: rest,
            })),
        })
        .await
        .unwrap();
    assert_eq!(invited.group.unwrap().member_count as usize, MEMBERS);

    // Everyone but the offline members connects, 50 at a time.
    let (done_tx, done) = tokio::sync::watch::channel(0u64);
    let mut clients: HashMap<String, Client> = HashMap::new();
    let mut collectors = JoinSet::new();
    let online: Vec<(usize, String)> = (1..MEMBERS)
        .filter(|i| !OFFLINE.contains(i))
        .map(|i| (i, users[i].clone()))
        .chain(late.iter().enumerate().map(|(i, u)| (i, u.clone())))
        .collect();
    for chunk in online.chunks(50) {
        let mut connecting = JoinSet::new();
        for (i, user) in chunk {
            let config = config(*i, user);
            let user = user.clone();
            connecting.spawn(async move {
                let (client, events) = Client::connect(config)
                    .await
                    .unwrap_or_else(|e| panic!("{user} could not connect: {e}"));
                (user, client, events)
            });
        }
        while let Some(joined) = connecting.join_next().await {
            let (user, client, mut events) = joined.unwrap();
            clients.insert(user.clone(), client);
            let done = done.clone();
            collectors.spawn(async move {
                let got = collect(&mut events, &done).await;
                (user, got)
            });
        }
    }
    assert_eq!(server.logged_in(), online.len() + 1);

    // Three senders, one per transport, send concurrently; phase one.
    let senders: Vec<Client> = [1, 2, 3]
        .iter()
        .map(|i| clients[&users[*i]].clone())
        .collect();
    let send_phase = |phase: usize| {
        let senders = senders.clone();
        async move {
            let mut acks = Vec::new();
            for n in 0..PER_PHASE {
                for (s, sender) in senders.iter().enumerate() {
                    let body = format!("{s}:{phase}:{n}");
                    let target = v1::send_request::Target::ToGroup(GROUP.into());
                    let pending = sender
                        .queue_send_to(
                            target,
                            &sender.new_client_msg_id(),
                            body.into_bytes().into(),
                            "text/plain",
                        )
                        .await
                        .unwrap();
                    acks.push(pending);
                }
            }
            let mut seqs = Vec::new();
            for (i, ack) in acks.into_iter().enumerate() {
                let ack = ack.await.expect("a group send is acknowledged");
                seqs.push((i % senders.len(), ack.seq));
            }
            seqs
        }
    };
    // Seqs of each sender's own messages (its client does not echo them as events).
    let mut own: HashMap<String, Vec<u64>> = HashMap::new();
    let mut record_own = |seqs: Vec<(usize, u64)>| {
        for (s, seq) in seqs {
            own.entry(member(s + 1)).or_default().push(seq);
        }
    };
    record_own(send_phase(0).await);

    // The leavers go away (what they hold is what their collectors got).
    for i in LEAVERS {
        clients.remove(&users[i]).unwrap().close().await;
    }

    // Phase two runs while members are kicked and invited.
    let kicked: Vec<String> = KICKED.map(member).collect();
    let owner_kicks = owner.clone();
    let kick_list = kicked.clone();
    let late_list = late.clone();
    let changes = tokio::spawn(async move {
        let kick = owner_kicks
            .group_request(v1::GroupRequest {
                group_id: GROUP.into(),
                action: Some(v1::group_request::Action::Kick(v1::GroupUsers {
                    user_ids: kick_list,
                })),
            })
            .await
            .unwrap();
        let invite = owner_kicks
            .group_request(v1::GroupRequest {
                group_id: GROUP.into(),
                action: Some(v1::group_request::Action::Invite(v1::GroupUsers {
                    user_ids: late_list,
                })),
            })
            .await
            .unwrap();
        (kick.event.unwrap().seq, invite.event.unwrap().seq)
    });
    record_own(send_phase(1).await);
    let (kick_seq, _invite_seq) = changes.await.unwrap();
    let last = server
        .node
        .context
        .store
        .last_seq(CONVERSATION)
        .await
        .unwrap();
    let sent = 2 * 3 * PER_PHASE as u64;
    assert_eq!(
        last,
        2 + sent + 2,
        "create, invite, the messages, kick and invite"
    );
    done_tx.send(last).unwrap();

    // Every online member: 1..=last, once each, in order; kicked ones up to their kick.
    let mut checked = 0;
    let collected = tokio::time::timeout(WAIT, async {
        let mut all = Vec::new();
        while let Some(joined) = collectors.join_next().await {
            all.push(joined.unwrap());
        }
        all
    });
    // Kicked members never reach `last`: close them once the others are done.
    let kicked_clients: Vec<Client> = kicked.iter().map(|u| clients[u].clone()).collect();
    let closer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        for client in kicked_clients {
            client.close().await;
        }
    });
    let collected = collected.await.expect("every member finished in time");
    closer.await.unwrap();
    let mut bodies_by_sender: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    let mut leaver_cursors: HashMap<String, u64> = HashMap::new();
    for (user, got) in &collected {
        if kicked.contains(user) {
            assert_contiguous(user, got, 1, kick_seq);
        } else if LEAVERS.map(member).any(|u| u == *user) {
            let held = got.last().map_or(0, |(seq, _, _)| *seq);
            assert_contiguous(user, got, 1, held);
            leaver_cursors.insert(user.clone(), held);
        } else if let Some(own_seqs) = own.get(user) {
            // A sender gets everything but its own messages.
            let mut all: Vec<u64> = got
                .iter()
                .map(|(seq, _, _)| *seq)
                .chain(own_seqs.iter().copied())
                .collect();
            all.sort_unstable();
            assert_eq!(
                all,
                (1..=last).collect::<Vec<_>>(),
                "{user}: others' messages plus its own"
            );
            assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "{user}: in order");
        } else {
            assert_contiguous(user, got, 1, last);
            if bodies_by_sender.is_empty() {
                for (_, sender, body) in got {
                    bodies_by_sender
                        .entry(sender.clone())
                        .or_default()
                        .push(body.clone());
                }
            }
        }
        checked += 1;
    }
    assert_eq!(checked, online.len());
    // Each sender's messages arrived in the order it sent them.
    for (s, sender) in [1, 2, 3].iter().enumerate() {
        let expected: Vec<Vec<u8>> = (0..2)
            .flat_map(|phase| (0..PER_PHASE).map(move |n| format!("{s}:{phase}:{n}").into_bytes()))
            .collect();
        assert_eq!(bodies_by_sender[&users[*sender]], expected);
    }

    // The leavers come back with what they held and receive exactly the gap; the offline
    // members receive everything.
    let (end_tx, end) = tokio::sync::watch::channel(last);
    let mut resumed = JoinSet::new();
    for i in LEAVERS.chain(OFFLINE) {
        let mut config = config(i, &users[i]);
        let held = match leaver_cursors.remove(&users[i]) {
            Some(held) => {
                config.cursors = HashMap::from([(CONVERSATION.to_owned(), held)]);
                held
            }
            None => {
                config.resume = Resume::Beginning;
                0
            }
        };
        let user = users[i].clone();
        let end = end.clone();
        resumed.spawn(async move {
            let (client, mut events) = Client::connect(config).await.unwrap();
            let got = collect(&mut events, &end).await;
            client.close().await;
            (user, held, got)
        });
    }
    let mut back = 0;
    while let Some(joined) = tokio::time::timeout(WAIT, resumed.join_next())
        .await
        .expect("resumed members finished")
    {
        let (user, held, got) = joined.unwrap();
        assert_contiguous(&user, &got, held + 1, last);
        back += 1;
    }
    assert_eq!(back, LEAVERS.len() + OFFLINE.len());
    drop(end_tx);
}
