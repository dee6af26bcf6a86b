//! Counts each user's sends in the state the host keeps for the sender (`send-guard`):
//! throttles every send past `limit` (config), and forgets the count (`clear`) when the body
//! is "reset". It asks the filesystem about "/" on every call, so it imports WASI's
//! filesystem and is called on a fiber rather than directly (the answer is a denial).
use im_plugin_sdk::guard::{
    Assessment, SendCheck, SendGuard, SendVerdict, StateChange, StateWrite, Throttle,
};
use im_plugin_sdk::{CallContext, config};

struct Count;

impl SendGuard for Count {
    fn check_send(_ctx: &CallContext, check: SendCheck<'_>) -> Assessment {
        let _ = std::fs::metadata("/");
        if check.message.body() == b"reset" {
            return Assessment {
                verdict: SendVerdict::Allow,
                state: StateChange::Clear,
            };
        }
        let sent = check
            .state
            .as_deref()
            .and_then(|state| <[u8; 8]>::try_from(state).ok())
            .map_or(0, u64::from_le_bytes);
        let count = sent + 1;
        let limit: u64 = config::get_or("limit", "3").parse().unwrap_or(3);
        let verdict = if count > limit {
            SendVerdict::Throttle(Throttle {
                retry_after_ms: 1000,
                reason: format!("send {count} is over the limit of {limit}"),
            })
        } else {
            SendVerdict::Allow
        };
        Assessment {
            verdict,
            state: StateChange::Set(StateWrite {
                value: count.to_le_bytes().to_vec(),
                ttl_ms: None,
            }),
        }
    }
}

im_plugin_sdk::export_send_guard!(Count);
