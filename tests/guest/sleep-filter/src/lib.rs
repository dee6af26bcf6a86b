//! Sleeps for a second when a message body starts with "sleep", then allows it; allows
//! others at once. Its imports (clocks, stdio) all return without waiting, so the host calls
//! it directly, where a wait is refused: the sleeping call must fail, the others pass. (A
//! millisecond's sleep could be over before the host first looked, on a loaded machine.)
use im_plugin_sdk::filter::{MessageFilter, Verdict};
use im_plugin_sdk::{CallContext, Message};

struct Sleeps;

impl MessageFilter for Sleeps {
    fn filter(_ctx: &CallContext, message: &Message) -> Verdict {
        if message.body().starts_with(b"sleep") {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        Verdict::Allow
    }
}

im_plugin_sdk::export_message_filter!(Sleeps);
