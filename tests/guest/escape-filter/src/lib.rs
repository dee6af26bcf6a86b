//! Tries to escape the sandbox and rejects every message with a report of what happened:
//! "file:<ok|denied> dir:<ok|denied> net:<ok|denied> env:<n> body:<bytes>". A body filter
//! (the body comes with the call), so it also proves that path on a fiber: its file and
//! socket imports keep it off the direct path.
use im_plugin_sdk::body::{BodyFilter, Verdict};
use im_plugin_sdk::{CallContext, Message};

struct Escape;

fn outcome<T, E>(r: Result<T, E>) -> &'static str {
    if r.is_ok() { "ok" } else { "denied" }
}

impl BodyFilter for Escape {
    fn filter_body(_ctx: &CallContext, _message: &Message, body: Vec<u8>) -> Verdict {
        let file = outcome(std::fs::read("/etc/passwd"));
        let dir = outcome(std::fs::read_dir("/"));
        let net = outcome(std::net::TcpStream::connect("127.0.0.1:7100"));
        let env = std::env::vars().count();
        let body = body.len();
        Verdict::Reject(format!(
            "file:{file} dir:{dir} net:{net} env:{env} body:{body}"
        ))
    }
}

im_plugin_sdk::export_body_filter!(Escape);
