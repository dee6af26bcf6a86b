//! A message filter that refuses messages written entirely in capital letters.
//!
//! Copy this directory to start a plugin: rename the package and the manifest id, replace
//! `is_shouting` with your logic, `cargo build --release`, then install the `.wasm` with
//! `imctl plugin install`. See docs/plugins.md.

use im_plugin_sdk::filter::{MessageFilter, Verdict};
use im_plugin_sdk::{CallContext, Message, config, log};

/// True when `text` has at least `min_letters` letters and none of them is lowercase.
pub fn is_shouting(text: &str, min_letters: usize) -> bool {
    let letters: Vec<char> = text.chars().filter(|c| c.is_alphabetic()).collect();
    letters.len() >= min_letters && letters.iter().all(|c| !c.is_lowercase())
}

struct NoShouting;

impl MessageFilter for NoShouting {
    fn filter(ctx: &CallContext, message: &Message) -> Verdict {
        let min_letters = config::get_or("min_letters", "6").parse().unwrap_or(6);
        let body = message.body();
        let Ok(text) = std::str::from_utf8(&body) else {
            return Verdict::Allow;
        };
        if is_shouting(text, min_letters) {
            log::info(&format!(
                "refused shouting from {} on {}",
                message.sender().user_id,
                ctx.transport()
            ));
            return Verdict::Reject("please do not shout".into());
        }
        Verdict::Allow
    }
}

im_plugin_sdk::export_message_filter!(NoShouting);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capitals_are_shouting_mixed_case_is_not() {
        assert!(is_shouting("STOP THAT NOW", 6));
        assert!(!is_shouting("Stop that now", 6));
        assert!(!is_shouting("OK", 6), "short words are not shouting");
    }
}
