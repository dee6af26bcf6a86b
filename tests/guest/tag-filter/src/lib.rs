//! Appends " <tag>" (from config) to every message body.
use im_plugin_sdk::filter::{MessageFilter, Rewrite, Verdict};
use im_plugin_sdk::{CallContext, Message, config};

struct Tag;

impl MessageFilter for Tag {
    fn filter(_ctx: &CallContext, message: &Message) -> Verdict {
        let mut body = message.body();
        body.extend_from_slice(format!(" {}", config::get_or("tag", "[tagged]")).as_bytes());
        Verdict::Modify(Rewrite {
            body,
            content_type: message.content_type(),
        })
    }
}

im_plugin_sdk::export_message_filter!(Tag);
