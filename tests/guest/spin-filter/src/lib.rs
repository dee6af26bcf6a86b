//! Loops forever when a message body starts with "spin"; allows others.
use im_plugin_sdk::filter::{MessageFilter, Verdict};
use im_plugin_sdk::{CallContext, Message};

struct Spin;

impl MessageFilter for Spin {
    fn filter(_ctx: &CallContext, message: &Message) -> Verdict {
        if message.body().starts_with(b"spin") {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        Verdict::Allow
    }
}

im_plugin_sdk::export_message_filter!(Spin);
