//! Measures the SQLite backend's group-commit cost: batches of 1:1 messages over many conversations.
//!
//! `cargo run --release -p im-store --example append_bench -- [conversations] [batch] [batches]`

use std::time::Instant;

use bytes::Bytes;
use im_store::sqlite::{SqliteOptions, SqliteStore};
use im_store::{NewMessage, Store};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numeric argument"))
        .collect();
    let conversations = args.first().copied().unwrap_or(50);
    let batch = args.get(1).copied().unwrap_or(64);
    let batches = args.get(2).copied().unwrap_or(2000);
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(&dir.path().join("bench.db"), SqliteOptions::default())
        .await
        .expect("open store");
    let body = Bytes::from(vec![b'x'; 100]);
    let mut next = 0usize;
    let mut commit_us = Vec::with_capacity(batches);
    let started = Instant::now();
    for _ in 0..batches {
        let messages: Vec<NewMessage> = (0..batch)
            .map(|_| {
                next += 1;
                let pair = next % conversations;
                let sender = format!("bench-sender-{pair}");
                let recipient = format!("bench-recipient-{pair}");
                NewMessage {
                    conversation_id: format!("u:{recipient}:{sender}"),
                    sender_id: sender,
                    sender_device_id: "d1".into(),
                    recipient_id: recipient,
                    client_msg_id: format!("c{pair}-{next}"),
                    body: body.clone(),
                    content_type: "text/plain".into(),
                    server_msg_id: uuid::Uuid::now_v7().to_string(),
                    server_time_ms: 1_700_000_000_000 + next as i64,
                }
            })
            .collect();
        let t = Instant::now();
        store.append_messages(&messages).await.expect("append");
        commit_us.push(t.elapsed().as_micros() as u64);
    }
    let total = started.elapsed();
    commit_us.sort_unstable();
    let pct = |p: f64| commit_us[((commit_us.len() - 1) as f64 * p) as usize];
    let messages = batches * batch;
    println!(
        "{messages} messages in {batches} commits of {batch} over {conversations} conversations: \
         {:.0} msg/s, {:.2} us/msg; commit p50 {} us, p99 {} us, max {} us",
        messages as f64 / total.as_secs_f64(),
        total.as_micros() as f64 / messages as f64,
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    store.close().await;
}
