//! The hooks that lend no handles (`body-screen`, `send-screen`), on a fiber: it asks the
//! filesystem about "/" on every call, so it imports WASI's filesystem and is not called
//! directly. The body screen appends what `current-call` tells about the call; the send
//! screen blocks senders listed in its `blocked` config, naming the conversation; a login
//! (`risk-control.assess`) is blocked if `current-call` claims a message for it.
use im_plugin_sdk::MessageTarget;
use im_plugin_sdk::risk::{RiskControl, RiskEvent, RiskVerdict};
use im_plugin_sdk::screen::{BodyScreen, Rewrite, Verdict};
use im_plugin_sdk::send_screen::{Assessment, SendFacts, SendScreen, SendVerdict, StateChange};
use im_plugin_sdk::{CallContext, config, current};

struct Report;

fn target_text(target: Option<MessageTarget>) -> String {
    match target {
        Some(MessageTarget::User(user)) => format!("user:{user}"),
        Some(MessageTarget::Group(group)) => format!("group:{group}"),
        None => "none".into(),
    }
}

impl BodyScreen for Report {
    fn screen(body: Vec<u8>) -> Verdict {
        let _ = std::fs::metadata("/");
        let sender = current::sender()
            .map(|p| format!("{}/{}", p.user_id, p.device_id))
            .unwrap_or_default();
        let report = format!(
            " | plugin:{} node:{} transport:{} ip:{} conversation:{} sender:{} target:{} id:{} type:{}",
            current::plugin_id(),
            current::node_id(),
            current::transport(),
            current::remote_ip().unwrap_or_default(),
            current::conversation_id().unwrap_or_default(),
            sender,
            target_text(current::target()),
            current::client_msg_id().unwrap_or_default(),
            current::content_type().unwrap_or_default(),
        );
        let mut body = body;
        body.extend_from_slice(report.as_bytes());
        Verdict::Modify(Rewrite {
            body,
            content_type: "text/report".into(),
        })
    }
}

impl SendScreen for Report {
    fn screen_send(facts: SendFacts) -> Assessment {
        let _ = std::fs::metadata("/");
        let blocked = config::get_or("blocked", "");
        let sender = current::sender().map(|p| p.user_id).unwrap_or_default();
        let verdict = if blocked.split(',').any(|user| user == sender) {
            SendVerdict::Block(format!(
                "{sender} may not send to {} ({} bytes)",
                current::conversation_id().unwrap_or_default(),
                facts.body_len
            ))
        } else {
            SendVerdict::Allow
        };
        Assessment {
            verdict,
            state: StateChange::Keep,
        }
    }
}

impl RiskControl for Report {
    fn assess(_ctx: &CallContext, event: RiskEvent<'_>) -> RiskVerdict {
        match event {
            RiskEvent::Login(_) if current::sender().is_some() => {
                RiskVerdict::Block("current-call claims a message during a login".into())
            }
            _ => RiskVerdict::Allow,
        }
    }
}

im_plugin_sdk::export_body_screen!(Report);
im_plugin_sdk::export_send_screen!(Report);
im_plugin_sdk::export_risk_control!(Report);
