//! Allows every message, as a body screen: no handle lent, the body passed in and dropped.
use im_plugin_sdk::screen::{BodyScreen, Verdict};

struct Noop;

impl BodyScreen for Noop {
    fn screen(_body: Vec<u8>) -> Verdict {
        Verdict::Allow
    }
}

im_plugin_sdk::export_body_screen!(Noop);
