//! SIGKILL the server while clients send, restart it on the same data, and check that every
//! acknowledged message is there after resync, once, in order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use im_client::{Client, Event, v1};
use im_e2e::*;

const SERVER: &str = env!("CARGO_BIN_EXE_im-e2e-server");
const WAIT: Duration = Duration::from_secs(60);

/// Acknowledged sends: client message id -> (conversation, seq), and per sender the order.
#[derive(Default)]
struct Acked {
    by_id: HashMap<String, (String, u64)>,
    order: HashMap<String, Vec<String>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_survive_sigkill() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(SERVER, data.path(), None);
    let endpoints = server.endpoints.clone();
    let ports = server.ports();

    // The recipient stays connected across the crash; its SDK reconnects and resyncs.
    let (carol, mut carol_events) = endpoints.client(Transport::Tcp, "carol", "phone").await;
    let received = Arc::new(Mutex::new(Vec::<v1::Message>::new()));
    let sink = received.clone();
    let receiver = tokio::spawn(async move {
        while let Some(event) = carol_events.next().await {
            if let Event::Message(m) = event {
                sink.lock().unwrap().push(m);
            }
        }
    });

    // Three senders, one per transport, each sending one message at a time, as fast as acks come.
    let acked = Arc::new(Mutex::new(Acked::default()));
    let stop = tokio_util_like::Flag::default();
    let mut senders = Vec::new();
    for (user, transport) in [
        ("alice", Transport::Tcp),
        ("bob", Transport::WebSocket),
        ("dave", Transport::Quic),
    ] {
        let (client, _events) = endpoints.client(transport, user, "phone").await;
        let acked = acked.clone();
        let stop = stop.clone();
        senders.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.is_set() {
                let id = format!("{user}-{n}");
                let ack = client
                    .send_with_id("carol", &id, text(&id), "text/plain")
                    .await
                    .expect("send eventually acked");
                let mut acked = acked.lock().unwrap();
                acked
                    .by_id
                    .insert(id.clone(), (ack.conversation_id, ack.seq));
                acked.order.entry(user.to_owned()).or_default().push(id);
                n += 1;
            }
            client
        }));
    }

    // Let traffic flow, then kill -9 mid-stream.
    eventually(WAIT, "traffic before the crash", || {
        acked.lock().unwrap().by_id.len() >= 300
    })
    .await;
    server.kill();
    let acked_before_crash = acked.lock().unwrap().by_id.len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let server = ServerProcess::start(SERVER, data.path(), Some(ports));
    eventually(WAIT, "traffic after the restart", || {
        acked.lock().unwrap().by_id.len() >= acked_before_crash + 300
    })
    .await;
    stop.set();
    let mut clients: Vec<Client> = Vec::new();
    for sender in senders {
        clients.push(tokio::time::timeout(WAIT, sender).await.unwrap().unwrap());
    }

    // Every acknowledged message is stored once, at the seq its ack named, in send order.
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let (auditor, _) = server
        .endpoints
        .client(Transport::Tcp, "carol", "auditor")
        .await;
    for (user, ids) in &acked.order {
        let conversation = im_client::ids::direct_conversation_id(user, "carol");
        let mut stored = Vec::new();
        let mut after = 0;
        loop {
            let page = auditor.sync(&conversation, after, 500).await.unwrap();
            stored.extend(page.messages);
            after = stored.last().map_or(0, |m| m.seq);
            if !page.has_more {
                break;
            }
        }
        let seqs: Vec<u64> = stored.iter().map(|m| m.seq).collect();
        assert_eq!(
            seqs,
            (1..=stored.len() as u64).collect::<Vec<_>>(),
            "{user}: seqs are gapless"
        );
        let stored_ids: Vec<&str> = stored.iter().map(|m| m.client_msg_id.as_str()).collect();
        let mut unique = stored_ids.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(
            unique.len(),
            stored_ids.len(),
            "{user}: no message stored twice"
        );
        // Stored order is send order, and everything acked is there with its acked seq.
        assert_eq!(
            stored_ids,
            ids.iter().map(String::as_str).collect::<Vec<_>>(),
            "{user}: stored in send order"
        );
        for m in &stored {
            assert_eq!(acked.by_id[&m.client_msg_id], (conversation.clone(), m.seq));
            assert_eq!(m.body, text(&m.client_msg_id));
        }
    }

    // The recipient that lived through the crash got every message once, in order.
    let total: usize = acked.order.values().map(Vec::len).sum();
    eventually(WAIT, "the recipient caught up", || {
        received.lock().unwrap().len() >= total
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received = std::mem::take(&mut *received.lock().unwrap());
    assert_eq!(received.len(), total, "nothing delivered twice");
    let mut last: HashMap<&str, u64> = HashMap::new();
    for m in &received {
        let previous = last.insert(&m.conversation_id, m.seq).unwrap_or(0);
        assert_eq!(
            m.seq,
            previous + 1,
            "in order, no gaps, in {}",
            m.conversation_id
        );
    }
    drop(carol);
    receiver.abort();
}

mod tokio_util_like {
    //! A tiny shared stop flag.
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[derive(Clone, Default)]
    pub struct Flag(Arc<AtomicBool>);

    impl Flag {
        pub fn set(&self) {
            self.0.store(true, Ordering::SeqCst);
        }
        pub fn is_set(&self) -> bool {
            self.0.load(Ordering::SeqCst)
        }
    }
}
