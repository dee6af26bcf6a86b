//! Panics when a message body starts with "panic"; allows others.
use im_plugin_sdk::filter::{MessageFilter, Verdict};
use im_plugin_sdk::{CallContext, Message};

struct Panics;

impl MessageFilter for Panics {
    fn filter(_ctx: &CallContext, message: &Message) -> Verdict {
        if message.body().starts_with(b"panic") {
            panic!("deliberate panic in a test plugin");
        }
        Verdict::Allow
    }
}

im_plugin_sdk::export_message_filter!(Panics);
