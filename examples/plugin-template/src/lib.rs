//! A message filter that refuses messages written entirely in capital letters.
//!
//! Copy this directory to start a plugin: rename the package and the manifest id, replace
//! `is_shouting` with your logic, `cargo build --release`, then install the `.wasm` with
//! `imctl plugin install`. See docs/plugins.md.
//!
//! It reads every body, so it is a body screen: the body comes with the call and no handle
//! is lent (the cheapest call a filter can be); the little else it wants, the sender and
//! the transport for its log line, it asks `current` for, and only when it refuses. A
//! filter that looks only at some messages' bodies would implement `filter::MessageFilter`
//! and read what it needs through the message. Its configuration is read once per
//! instance: each read is a call into the host, and an instance's configuration never
//! changes.

use std::sync::OnceLock;

use im_plugin_sdk::screen::{BodyScreen, Verdict};
use im_plugin_sdk::{config, current, log};

/// True when `text` has at least `min_letters` letters and none of them is lowercase.
pub fn is_shouting(text: &str, min_letters: usize) -> bool {
    let letters: Vec<char> = text.chars().filter(|c| c.is_alphabetic()).collect();
    letters.len() >= min_letters && letters.iter().all(|c| !c.is_lowercase())
}

/// `min_letters` from the manifest's `[config]` (6 unless set).
fn min_letters() -> usize {
    static MIN_LETTERS: OnceLock<usize> = OnceLock::new();
    *MIN_LETTERS.get_or_init(|| config::get_or("min_letters", "6").parse().unwrap_or(6))
}

struct NoShouting;

impl BodyScreen for NoShouting {
    fn screen(body: Vec<u8>) -> Verdict {
        let Ok(text) = std::str::from_utf8(&body) else {
            return Verdict::Allow;
        };
        if is_shouting(text, min_letters()) {
            log::info(&format!(
                "refused shouting from {} on {}",
                current::sender().map(|p| p.user_id).unwrap_or_default(),
                current::transport()
            ));
            return Verdict::Reject("please do not shout".into());
        }
        Verdict::Allow
    }
}

im_plugin_sdk::export_body_screen!(NoShouting);

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
