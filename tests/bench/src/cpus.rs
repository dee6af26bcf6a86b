//! CPU pinning (`--pin SERVER:LOADGEN`): servers under test start on one set of cores, the load generator runs on another.
//!
//! On a 2-core machine the server and the load generator otherwise compete for the same
//! cores, and the kernel's migrations and run-queue waits show up as latency of whichever
//! system is being measured. Pinning is applied with `taskset` (util-linux): the load
//! generator pins itself before it starts any thread (threads inherit the mask), and every
//! server, ours and the peers, is started through `taskset -c`.

use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, bail};

/// The cores of each side, as `taskset` cpu lists (`0`, `1-3`, `0,2`).
#[derive(Debug, Clone, PartialEq)]
pub struct Pinning {
    pub server: String,
    pub loadgen: String,
}

static PINNING: OnceLock<Pinning> = OnceLock::new();

impl std::str::FromStr for Pinning {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (server, loadgen) = s
            .split_once(':')
            .ok_or("expected SERVER_CPUS:LOADGEN_CPUS, e.g. 0:1")?;
        let valid = |list: &str| {
            !list.is_empty()
                && list
                    .chars()
                    .all(|c| c.is_ascii_digit() || c == ',' || c == '-')
        };
        if !valid(server) || !valid(loadgen) {
            return Err(format!(
                "{s:?}: each side is a cpu list such as 0, 1-3 or 0,2"
            ));
        }
        Ok(Self {
            server: server.to_owned(),
            loadgen: loadgen.to_owned(),
        })
    }
}

/// Pins this process (call before any thread starts) and remembers the servers' cores.
pub fn pin(pinning: Pinning) -> anyhow::Result<()> {
    let status = Command::new("taskset")
        .args(["-pc", &pinning.loadgen, &std::process::id().to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .context("running taskset (util-linux) to pin the load generator")?;
    if !status.success() {
        bail!(
            "taskset could not pin the load generator to cpus {}",
            pinning.loadgen
        );
    }
    PINNING
        .set(pinning)
        .map_err(|_| anyhow::anyhow!("pinning set twice"))
}

/// The pinning in force, if any (for the results' header).
pub fn current() -> Option<&'static Pinning> {
    PINNING.get()
}

/// A command that starts `program` on the servers' cores when pinning is on.
pub fn server_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    match PINNING.get() {
        Some(pinning) => {
            let mut command = Command::new("taskset");
            command.arg("-c").arg(&pinning.server).arg(program);
            command
        }
        None => Command::new(program),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_are_parsed_and_checked() {
        let p: Pinning = "0:1-3".parse().unwrap();
        assert_eq!(p.server, "0");
        assert_eq!(p.loadgen, "1-3");
        assert!("0".parse::<Pinning>().is_err());
        assert!("0:".parse::<Pinning>().is_err());
        assert!("0:a".parse::<Pinning>().is_err());
    }
}
