//! Idle connections: child processes that each hold many logged-in idle connections (our protocol over TCP, WebSocket or QUIC; MQTT; NATS), and the server memory they cost.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use im_client::{Connection, ServerUrl, Trust, v1};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::stats::{rss_bytes, slab_bytes};

/// Connections a child opens concurrently.
const CONNECT_CONCURRENCY: usize = 200;
/// Keep-alive interval of every idle client (well within every server's idle timeout).
const KEEPALIVE: Duration = Duration::from_secs(30);

/// What a child process connects with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum Protocol {
    ImTcp,
    ImWs,
    ImQuic,
    Mqtt,
    Nats,
}

/// Where and as whom a child connects.
#[derive(Debug, Clone, clap::Args)]
pub struct ChildArgs {
    #[arg(long, value_enum)]
    pub protocol: Protocol,
    /// `tcp://…`, `ws://…` or `quic://…` for our server; `host:port` for the peers.
    #[arg(long)]
    pub target: String,
    #[arg(long)]
    pub count: usize,
    /// Users are `<prefix><n>`.
    #[arg(long, default_value = "idle-")]
    pub prefix: String,
    /// Our server's certificate (QUIC).
    #[arg(long)]
    pub cert: Option<std::path::PathBuf>,
    /// Our server's development secret.
    #[arg(long, default_value = "")]
    pub secret: String,
}

/// Runs in a child process: opens `count` connections, prints `ready <opened> <failed>`,
/// then keeps them alive until killed.
pub async fn run_child(args: ChildArgs) -> anyhow::Result<()> {
    let trust = match &args.cert {
        Some(cert) => Trust::pem_file(cert)?,
        None => Trust::System,
    };
    let endpoint = match args.protocol {
        Protocol::ImQuic => Some(quinn::Endpoint::client("127.0.0.1:0".parse()?)?),
        _ => None,
    };
    let mut opened = 0usize;
    let mut failed = 0usize;
    let mut holders = JoinSet::new();
    let indices: Vec<usize> = (0..args.count).collect();
    for chunk in indices.chunks(CONNECT_CONCURRENCY) {
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(chunk.len());
        for n in chunk {
            let args = args.clone();
            let trust = trust.clone();
            let endpoint = endpoint.clone();
            let ready = ready_tx.clone();
            let user = format!("{}{n}", args.prefix);
            holders.spawn(async move {
                let result = hold(&args, &trust, endpoint.as_ref(), &user, ready.clone()).await;
                if let Err(err) = result {
                    let _ = ready.send(Err(err.to_string())).await;
                }
            });
        }
        drop(ready_tx);
        // Each connection reports once (its task lives on, holding a sender).
        for _ in 0..chunk.len() {
            let Some(outcome) = ready_rx.recv().await else {
                break;
            };
            match outcome {
                Ok(()) => opened += 1,
                Err(err) => {
                    if failed == 0 {
                        eprintln!("idle client: {err}");
                    }
                    failed += 1;
                }
            }
        }
    }
    println!("ready {opened} {failed}");
    while holders.join_next().await.is_some() {}
    Ok(())
}

type Ready = tokio::sync::mpsc::Sender<Result<(), String>>;

/// Dials our server and logs in as `user`.
async fn open_and_login(
    url: &ServerUrl,
    trust: &Trust,
    endpoint: Option<&quinn::Endpoint>,
    args: &ChildArgs,
    user: &str,
) -> anyhow::Result<Connection> {
    let mut conn = Connection::dial(url, trust, 1 << 16, endpoint).await?;
    let login = v1::frame::Body::Login(v1::LoginRequest {
        token: crate::server::token(&args.secret, user),
        device_id: "idle".into(),
        client_info: "im-bench idle".into(),
    });
    conn.send(&[v1::Frame::new(1, login).to_bytes()]).await?;
    match conn.recv().await?.map(|b| v1::Frame::from_bytes(&b)) {
        Some(Ok(v1::Frame {
            body: Some(v1::frame::Body::LoginOk(_)),
            ..
        })) => Ok(conn),
        other => bail!("login failed: {other:?}"),
    }
}

/// Opens one connection, reports it ready, and keeps it alive.
async fn hold(
    args: &ChildArgs,
    trust: &Trust,
    endpoint: Option<&quinn::Endpoint>,
    user: &str,
    ready: Ready,
) -> anyhow::Result<()> {
    match args.protocol {
        Protocol::ImTcp | Protocol::ImWs | Protocol::ImQuic => {
            let url: ServerUrl = args.target.parse()?;
            // A client whose handshake fails in the opening storm tries again, as real
            // clients do; only a second failure counts as failed.
            let mut conn = match open_and_login(&url, trust, endpoint, args, user).await {
                Ok(conn) => conn,
                Err(_) => open_and_login(&url, trust, endpoint, args, user).await?,
            };
            let _ = ready.send(Ok(())).await;
            drop(ready);
            let mut id = 2;
            loop {
                tokio::time::sleep(KEEPALIVE).await;
                let ping = v1::frame::Body::Ping(v1::Ping { nonce: 0 });
                conn.send(&[v1::Frame::new(id, ping).to_bytes()]).await?;
                id += 1;
                if conn.recv().await?.is_none() {
                    bail!("the server closed an idle connection");
                }
            }
        }
        Protocol::Mqtt => {
            let mut stream = TcpStream::connect(&args.target).await?;
            stream.write_all(&mqtt_connect(user)).await?;
            let mut connack = [0u8; 4];
            stream.read_exact(&mut connack).await?;
            if connack != [0x20, 0x02, 0x00, 0x00] {
                bail!("MQTT CONNACK refused: {connack:?}");
            }
            let _ = ready.send(Ok(())).await;
            drop(ready);
            loop {
                tokio::time::sleep(KEEPALIVE).await;
                stream.write_all(&[0xC0, 0x00]).await?;
                let mut pong = [0u8; 2];
                stream.read_exact(&mut pong).await?;
            }
        }
        Protocol::Nats => {
            let stream = TcpStream::connect(&args.target).await?;
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            let info = lines
                .next_line()
                .await?
                .context("no INFO from nats-server")?;
            if !info.starts_with("INFO") {
                bail!("unexpected greeting {info:?}");
            }
            write
                .write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\nPING\r\n")
                .await?;
            loop {
                let line = lines.next_line().await?.context("nats-server closed")?;
                if line == "PONG" {
                    break;
                }
            }
            let _ = ready.send(Ok(())).await;
            drop(ready);
            // The server pings idle clients; answering keeps the connection.
            while let Some(line) = lines.next_line().await? {
                if line == "PING" {
                    write.write_all(b"PONG\r\n").await?;
                }
            }
            bail!("nats-server closed an idle connection")
        }
    }
}

/// An MQTT 3.1.1 CONNECT packet: clean session, 60 s keep-alive.
fn mqtt_connect(client_id: &str) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3C];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if len == 0 {
            break;
        }
    }
    packet.extend(body);
    packet
}

/// The server memory idle connections cost.
#[derive(Debug, Clone, Serialize)]
pub struct IdleResult {
    pub protocol: Protocol,
    pub connections: usize,
    pub failed: usize,
    pub processes: usize,
    pub server_rss_before: u64,
    pub server_rss_after: u64,
    pub rss_per_connection: f64,
    /// Kernel slab growth of the whole machine per connection (both ends of loopback).
    pub slab_per_connection: f64,
}

/// Opens `total` idle connections to the server `server_pid` from child processes of at
/// most `per_process` connections, and measures what they cost it.
pub async fn measure(
    protocol: Protocol,
    target: &str,
    server_pid: u32,
    total: usize,
    per_process: usize,
    cert: Option<&std::path::Path>,
    secret: &str,
) -> anyhow::Result<IdleResult> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = rss_bytes(server_pid);
    let slab_before = slab_bytes();
    let exe = std::env::current_exe()?;
    let processes = total.div_ceil(per_process.max(1));
    let mut children = Vec::new();
    let mut readers = Vec::new();
    for p in 0..processes {
        let count = per_process.min(total - p * per_process);
        let mut command = tokio::process::Command::new(&exe);
        command
            .arg("idle-clients")
            .args(["--protocol", protocol_name(protocol)])
            .args(["--target", target])
            .args(["--count", &count.to_string()])
            .args(["--prefix", &format!("idle-{p}-")])
            .args(["--secret", secret])
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        if let Some(cert) = cert {
            command.arg("--cert").arg(cert);
        }
        let mut child = command.spawn()?;
        readers.push(BufReader::new(child.stdout.take().expect("piped")).lines());
        children.push(child);
    }
    let mut opened = 0;
    let mut failed = 0;
    for lines in &mut readers {
        let line = tokio::time::timeout(Duration::from_secs(900), lines.next_line())
            .await
            .context("idle clients took too long to connect")??
            .context("an idle-client process ended early")?;
        let mut fields = line.split_whitespace().skip(1);
        opened += fields
            .next()
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
        failed += fields
            .next()
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
    }
    // Let the server settle (buffers freed after login) before reading its memory.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_after = rss_bytes(server_pid);
    let slab_after = slab_bytes();
    for mut child in children {
        let _ = child.kill().await;
    }
    let per = |before: u64, after: u64| after.saturating_sub(before) as f64 / opened.max(1) as f64;
    Ok(IdleResult {
        protocol,
        connections: opened,
        failed,
        processes,
        server_rss_before: rss_before,
        server_rss_after: rss_after,
        rss_per_connection: per(rss_before, rss_after),
        slab_per_connection: per(slab_before, slab_after),
    })
}

fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::ImTcp => "im-tcp",
        Protocol::ImWs => "im-ws",
        Protocol::ImQuic => "im-quic",
        Protocol::Mqtt => "mqtt",
        Protocol::Nats => "nats",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_connect_packets_encode_their_length() {
        let packet = mqtt_connect("idle-1");
        assert_eq!(packet[0], 0x10);
        assert_eq!(packet[1] as usize, packet.len() - 2);
        let long = mqtt_connect(&"x".repeat(200));
        assert_eq!(long[1] & 0x80, 0x80, "two-byte remaining length");
        assert_eq!(
            ((long[1] & 0x7F) as usize) + (long[2] as usize) * 128,
            long.len() - 3
        );
    }
}
