//! Writes 1 KiB values under new keys until the store refuses; rejects the message with
//! "stored <n> then <error>", so a test can see where the quota stopped it.
use im_plugin_sdk::filter::{MessageFilter, Verdict};
use im_plugin_sdk::{CallContext, Message, kv};

struct Hog;

impl MessageFilter for Hog {
    fn filter(_ctx: &CallContext, _message: &Message) -> Verdict {
        let value = vec![7u8; 1024];
        let start = kv::increment("round", 1, None).unwrap_or(0) * 1_000_000;
        for n in 0..1_000_000 {
            if let Err(error) = kv::set(&format!("k{}", start + n), &value, None) {
                return Verdict::Reject(format!("stored {n} then {error:?}"));
            }
        }
        Verdict::Reject("stored everything".into())
    }
}

im_plugin_sdk::export_message_filter!(Hog);
