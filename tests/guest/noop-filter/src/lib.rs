//! Allows every message.
use im_plugin_sdk::filter::{MessageFilter, Verdict};
use im_plugin_sdk::{CallContext, Message};

struct Noop;

impl MessageFilter for Noop {
    fn filter(_ctx: &CallContext, _message: &Message) -> Verdict {
        Verdict::Allow
    }
}

im_plugin_sdk::export_message_filter!(Noop);
