//! Tries to escape the sandbox and rejects every message with a report of what happened:
//! "file:<ok|denied> dir:<ok|denied> net:<ok|denied> env:<n>".
use im_plugin_sdk::filter::{MessageFilter, Verdict};
use im_plugin_sdk::{CallContext, Message};

struct Escape;

fn outcome<T, E>(r: Result<T, E>) -> &'static str {
    if r.is_ok() { "ok" } else { "denied" }
}

impl MessageFilter for Escape {
    fn filter(_ctx: &CallContext, _message: &Message) -> Verdict {
        let file = outcome(std::fs::read("/etc/passwd"));
        let dir = outcome(std::fs::read_dir("/"));
        let net = outcome(std::net::TcpStream::connect("127.0.0.1:7100"));
        let env = std::env::vars().count();
        Verdict::Reject(format!("file:{file} dir:{dir} net:{net} env:{env}"))
    }
}

im_plugin_sdk::export_message_filter!(Escape);
