//! The hooks that lend handles, called directly (no WASI import that waits): since the
//! first-party plugins moved to `body-screen` and `send-screen`, this keeps `body-filter`
//! and `send-guard` on the direct path tested. The body filter upper-cases the body and
//! appends the sender read through the message handle; the send guard blocks a body sent
//! twice in a row by one user (its state: the last body's digest) and names the sender.
use im_plugin_sdk::body::{BodyFilter, Rewrite, Verdict};
use im_plugin_sdk::guard::{
    Assessment, SendCheck, SendGuard, SendVerdict, StateChange, StateWrite,
};
use im_plugin_sdk::{CallContext, Message};

struct Hooks;

impl BodyFilter for Hooks {
    fn filter_body(ctx: &CallContext, message: &Message, body: Vec<u8>) -> Verdict {
        let mut body = body.to_ascii_uppercase();
        let from = format!(
            " from {} over {}",
            message.sender().user_id,
            ctx.transport()
        );
        body.extend_from_slice(from.as_bytes());
        Verdict::Modify(Rewrite {
            body,
            content_type: message.content_type(),
        })
    }
}

impl SendGuard for Hooks {
    fn check_send(_ctx: &CallContext, check: SendCheck<'_>) -> Assessment {
        let digest = check.body_digest.to_le_bytes();
        if check.state.as_deref() == Some(&digest[..]) {
            return Assessment {
                verdict: SendVerdict::Block(format!(
                    "{} sent the same {} bytes twice",
                    check.message.sender().user_id,
                    check.body_len
                )),
                state: StateChange::Keep,
            };
        }
        Assessment {
            verdict: SendVerdict::Allow,
            state: StateChange::Set(StateWrite {
                value: digest.to_vec(),
                ttl_ms: None,
            }),
        }
    }
}

im_plugin_sdk::export_body_filter!(Hooks);
im_plugin_sdk::export_send_guard!(Hooks);
