//! Allocates without end when a message body starts with "bomb"; allows others.
use im_plugin_sdk::filter::{MessageFilter, Verdict};
use im_plugin_sdk::{CallContext, Message};

struct Bomb;

impl MessageFilter for Bomb {
    fn filter(_ctx: &CallContext, message: &Message) -> Verdict {
        if message.body().starts_with(b"bomb") {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        Verdict::Allow
    }
}

im_plugin_sdk::export_message_filter!(Bomb);
