//! End-to-end test harness: real servers on loopback, clients over TCP, WebSocket and QUIC.
//!
//! [`TestServer`] runs a node in-process on OS-chosen ports with a temporary data
//! directory; [`ServerProcess`] runs the server binary as a child process (for crash tests).
//! Both hand out SDK clients and raw connections for any [`Transport`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use im_client::{Client, ClientConfig, Connection, Events, Resume, ServerUrl, Trust, v1};
use im_server::{Config, RunningNode};

/// The three client transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Tcp,
    WebSocket,
    Quic,
}

pub const ALL_TRANSPORTS: [Transport; 3] = [Transport::Tcp, Transport::WebSocket, Transport::Quic];

/// Generates one test per transport (modules `tcp`, `websocket`, `quic`) for each listed
/// scenario, an `async fn(Transport)` in the calling file.
#[macro_export]
macro_rules! on_every_transport {
    ($($scenario:ident),* $(,)?) => {
        mod tcp { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $scenario() { super::$scenario($crate::Transport::Tcp).await } )* }
        mod websocket { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $scenario() { super::$scenario($crate::Transport::WebSocket).await } )* }
        mod quic { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $scenario() { super::$scenario($crate::Transport::Quic).await } )* }
    };
}

/// Addresses and secrets of a running server, however it was started.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub tcp: SocketAddr,
    pub websocket: SocketAddr,
    pub quic: SocketAddr,
    pub certificate_pem: PathBuf,
    pub dev_secret: Vec<u8>,
    /// Whether TCP and WebSocket serve TLS (then the URLs are `tls://` and `wss://`).
    pub tcp_tls: bool,
    pub websocket_tls: bool,
}

impl Endpoints {
    pub fn url(&self, transport: Transport) -> String {
        match transport {
            Transport::Tcp if self.tcp_tls => format!("tls://localhost:{}", self.tcp.port()),
            Transport::Tcp => format!("tcp://{}", self.tcp),
            Transport::WebSocket if self.websocket_tls => {
                format!("wss://localhost:{}/", self.websocket.port())
            }
            Transport::WebSocket => format!("ws://{}/", self.websocket),
            Transport::Quic => format!("quic://localhost:{}", self.quic.port()),
        }
    }

    /// A development token for `user`, valid for an hour.
    pub fn token(&self, user: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        im_token::mint(
            &self.dev_secret,
            &im_token::Claims {
                user_id: user.into(),
                device_id: None,
                expires_at: now + 3600,
            },
        )
    }

    /// Client configuration for `user` on `device` over `transport`.
    pub fn client_config(&self, transport: Transport, user: &str, device: &str) -> ClientConfig {
        let mut config = ClientConfig::new(&self.url(transport), self.token(user), device).unwrap();
        config.trust = Trust::pem_file(&self.certificate_pem).unwrap();
        config.resume = Resume::Beginning;
        config.reconnect_initial = Duration::from_millis(50);
        config.reconnect_max = Duration::from_millis(500);
        config.ack_timeout = Duration::from_secs(2);
        config
    }

    /// A logged-in SDK client.
    pub async fn client(&self, transport: Transport, user: &str, device: &str) -> (Client, Events) {
        Client::connect(self.client_config(transport, user, device))
            .await
            .unwrap_or_else(|e| panic!("{user}/{device} over {transport:?} could not connect: {e}"))
    }

    /// A raw, not logged-in connection.
    pub async fn raw(&self, transport: Transport) -> Raw {
        let url: ServerUrl = self.url(transport).parse().unwrap();
        let trust = Trust::pem_file(&self.certificate_pem).unwrap();
        let conn = Connection::dial(&url, &trust, 1 << 20, None).await.unwrap();
        Raw { conn, next_id: 1 }
    }

    /// A raw connection that has logged in as `user` on `device`.
    pub async fn raw_logged_in(&self, transport: Transport, user: &str, device: &str) -> Raw {
        let mut raw = self.raw(transport).await;
        let answer = raw.request(login(&self.token(user), device)).await;
        assert!(
            matches!(answer.body, Some(v1::frame::Body::LoginOk(_))),
            "login failed: {answer:?}"
        );
        raw
    }
}

/// A login request body.
pub fn login(token: &str, device: &str) -> v1::frame::Body {
    v1::frame::Body::Login(v1::LoginRequest {
        token: token.into(),
        device_id: device.into(),
        client_info: "e2e".into(),
    })
}

/// A raw connection for protocol-level tests.
pub struct Raw {
    pub conn: Connection,
    next_id: u64,
}

/// How long a raw read waits before the test fails.
pub const RAW_WAIT: Duration = Duration::from_secs(10);

impl Raw {
    /// Sends a frame with a fresh request id and returns that id.
    pub async fn send(&mut self, body: v1::frame::Body) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.conn
            .send(&[v1::Frame::new(id, body).to_bytes()])
            .await
            .unwrap();
        id
    }

    /// The next frame, or `None` if the server closed the connection.
    pub async fn recv(&mut self) -> Option<v1::Frame> {
        let bytes = tokio::time::timeout(RAW_WAIT, self.conn.recv())
            .await
            .expect("server answered in time");
        match bytes {
            Ok(Some(bytes)) => Some(v1::Frame::from_bytes(&bytes).expect("server frames decode")),
            Ok(None) | Err(_) => None,
        }
    }

    /// Sends `payload` as one frame (length prefix or WebSocket message), whatever it holds.
    pub async fn send_payload(&mut self, payload: &[u8]) {
        self.conn
            .send(&[Bytes::copy_from_slice(payload)])
            .await
            .unwrap();
    }

    /// Sends a request and returns the frame answering it (skipping pushes).
    pub async fn request(&mut self, body: v1::frame::Body) -> v1::Frame {
        let id = self.send(body).await;
        self.answer(id).await
    }

    /// The next frame with request id `id`.
    pub async fn answer(&mut self, id: u64) -> v1::Frame {
        loop {
            let frame = self
                .recv()
                .await
                .unwrap_or_else(|| panic!("connection closed before answering {id}"));
            if frame.request_id == id {
                return frame;
            }
        }
    }

    /// Reads until the server's `Close` and then the end of the connection; returns the reason.
    pub async fn expect_close(&mut self) -> v1::CloseReason {
        let mut reason = None;
        while let Some(frame) = self.recv().await {
            if let Some(v1::frame::Body::Close(close)) = frame.body {
                reason = Some(close.reason());
            }
        }
        reason.expect("a Close frame before the connection ended")
    }
}

/// The error code of an `Error` frame.
pub fn error_code(frame: &v1::Frame) -> Option<v1::ErrorCode> {
    match &frame.body {
        Some(v1::frame::Body::Error(e)) => Some(e.code()),
        _ => None,
    }
}

/// A built plugin component from `target/guest` (see `scripts/build-plugins.sh`): a Rust
/// component by file name, or another language's by its path under `target/guest`.
pub fn component(file: &str) -> Vec<u8> {
    let guest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest");
    let path = if file.contains('/') {
        guest.join(file)
    } else {
        guest.join("wasm32-wasip2/release").join(file)
    };
    std::fs::read(&path).unwrap_or_else(|_| {
        panic!(
            "{} is missing: run scripts/build-plugins.sh first",
            path.display()
        )
    })
}

/// A response of the admin API.
#[derive(Debug)]
pub struct AdminResponse {
    pub status: u16,
    pub json: serde_json::Value,
}

/// An in-process node with a temporary data directory.
pub struct TestServer {
    pub node: RunningNode,
    pub endpoints: Endpoints,
    _data: tempfile::TempDir,
}

impl std::ops::Deref for TestServer {
    type Target = Endpoints;
    fn deref(&self) -> &Endpoints {
        &self.endpoints
    }
}

impl TestServer {
    /// Starts a node with the default configuration on ephemeral loopback ports.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a node after `adjust` changed its configuration.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let data = tempfile::tempdir().unwrap();
        let mut config = Config::ephemeral(data.path());
        adjust(&mut config);
        let node = RunningNode::start(config).await.expect("node starts");
        let endpoints = Endpoints {
            tcp: node.tcp.unwrap(),
            websocket: node.websocket.unwrap(),
            quic: node.quic.unwrap(),
            certificate_pem: node.certificate_path.clone(),
            dev_secret: node.dev_secret.clone(),
            tcp_tls: node.tcp_tls,
            websocket_tls: node.websocket_tls,
        };
        Self {
            node,
            endpoints,
            _data: data,
        }
    }

    /// Calls the admin API with the node's token (or `token` when given).
    pub async fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
        token: Option<&str>,
    ) -> AdminResponse {
        let url = format!(
            "http://{}{path}",
            self.node.admin.expect("admin API enabled")
        );
        let client = reqwest::Client::new();
        let mut request = client.request(method.parse().unwrap(), url);
        let token = token.unwrap_or(&self.node.admin_token);
        if !token.is_empty() {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("admin API answers");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let json = if text.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text).unwrap()
        };
        AdminResponse { status, json }
    }

    /// Installs (or upgrades) a plugin through the admin API; panics unless it succeeds.
    pub async fn install_plugin(&self, manifest: &str, wasm_file: &str) -> serde_json::Value {
        use base64::Engine as _;
        let id = im_plugins::Manifest::from_toml(manifest)
            .expect("a valid manifest")
            .id;
        let body = serde_json::json!({
            "manifest": manifest,
            "wasm_base64": base64::engine::general_purpose::STANDARD.encode(component(wasm_file)),
        });
        let response = self
            .admin("PUT", &format!("/v1/plugins/{id}"), Some(body), None)
            .await;
        assert_eq!(response.status, 200, "install failed: {}", response.json);
        response.json
    }

    /// Calls the HTTP API with the node's first key.
    pub async fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> ApiResponse {
        let key = &self.node.api_keys[0].1;
        api_call(
            self.node.api.expect("HTTP API enabled"),
            method,
            path,
            body.as_ref(),
            Some(key),
        )
        .await
    }

    /// Logged-in connections right now.
    pub fn logged_in(&self) -> usize {
        self.node
            .context
            .stats
            .logged_in
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Connections parked right now (idle plain TCP, no task).
    pub fn parked(&self) -> usize {
        self.node
            .context
            .parker
            .as_ref()
            .map_or(0, |parker| parker.parked())
    }

    /// Open connections right now.
    pub fn open_connections(&self) -> usize {
        self.node
            .context
            .stats
            .open
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Waits until `condition` holds, failing the test after `within`.
pub async fn eventually(within: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Receives `count` messages, failing after `within`.
pub async fn receive(events: &mut Events, count: usize, within: Duration) -> Vec<v1::Message> {
    let mut got = Vec::with_capacity(count);
    let deadline = tokio::time::Instant::now() + within;
    while got.len() < count {
        match tokio::time::timeout_at(deadline, events.next_message()).await {
            Ok(Some(m)) => got.push(m),
            Ok(None) => panic!("client closed after {} of {count} messages", got.len()),
            Err(_) => panic!("only {} of {count} messages arrived in time", got.len()),
        }
    }
    got
}

/// The first event `pick` maps to a value, skipping the others; fails after `within`.
pub async fn next_event<T>(
    events: &mut Events,
    within: Duration,
    what: &str,
    mut pick: impl FnMut(im_client::Event) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(event)) => {
                if let Some(value) = pick(event) {
                    return value;
                }
            }
            Ok(None) => panic!("client closed while waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

/// Asserts no event `pick` selects arrives within `quiet`.
pub async fn assert_no_event(
    events: &mut Events,
    quiet: Duration,
    mut pick: impl FnMut(&im_client::Event) -> bool,
) {
    let deadline = tokio::time::Instant::now() + quiet;
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.next()).await {
        assert!(!pick(&event), "unexpected event {event:?}");
    }
}

/// A response of the HTTP API.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    pub status: u16,
    pub json: serde_json::Value,
    pub text: String,
}

/// Calls a node's HTTP API at `base` with `key` (none: no Authorization header).
pub async fn api_call(
    base: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    key: Option<&str>,
) -> ApiResponse {
    let mut request =
        reqwest::Client::new().request(method.parse().unwrap(), format!("http://{base}{path}"));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.expect("the HTTP API answers");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    ApiResponse { status, json, text }
}

/// Asserts no further message arrives within `quiet`.
pub async fn assert_no_message(events: &mut Events, quiet: Duration) {
    if let Ok(Some(m)) = tokio::time::timeout(quiet, events.next_message()).await {
        panic!("unexpected message {m:?}");
    }
}

/// The repository's root directory.
pub fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the repository")
        .to_owned()
}

/// The server binary run as a child process, for tests that kill it.
pub struct ServerProcess {
    child: std::process::Child,
    pub endpoints: Endpoints,
    pub data_dir: PathBuf,
    /// The HTTP API's address.
    pub api: SocketAddr,
}

impl ServerProcess {
    /// Starts the server binary `binary` on `data_dir`; `ports` reuses earlier ports (tcp,
    /// ws, quic). Integration tests pass `env!("CARGO_BIN_EXE_im-e2e-server")`.
    pub fn start(binary: &str, data_dir: &Path, ports: Option<(u16, u16, u16)>) -> Self {
        Self::start_configured(binary, data_dir, ports, None)
    }

    /// Like [`Self::start`], with the configuration file `config` (the addresses and data
    /// directory still come from the flags). The server runs in the repository root, where
    /// configuration files name their paths from.
    pub fn start_configured(
        binary: &str,
        data_dir: &Path,
        ports: Option<(u16, u16, u16)>,
        config: Option<&Path>,
    ) -> Self {
        use std::io::BufRead;
        let (tcp, ws, quic) = ports.unwrap_or((0, 0, 0));
        let mut command = std::process::Command::new(binary);
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        let mut child = command
            .current_dir(repository_root())
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--tcp", &format!("127.0.0.1:{tcp}")])
            .args(["--ws", &format!("127.0.0.1:{ws}")])
            .args(["--quic", &format!("127.0.0.1:{quic}")])
            .args(["--admin", "127.0.0.1:0"])
            .args(["--api", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("server binary starts");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        let fields: HashMap<&str, &str> = line
            .split_whitespace()
            .filter_map(|f| f.split_once('='))
            .collect();
        assert!(
            line.starts_with("im-server ready"),
            "unexpected first line: {line:?}"
        );
        let addr = |key: &str| -> SocketAddr { fields[key].parse().unwrap() };
        let secret = std::fs::read_to_string(data_dir.join("dev-secret")).unwrap();
        let endpoints = Endpoints {
            tcp: addr("tcp"),
            websocket: addr("ws"),
            quic: addr("quic"),
            certificate_pem: PathBuf::from(fields["cert"]),
            dev_secret: secret.trim().as_bytes().to_vec(),
            tcp_tls: false,
            websocket_tls: false,
        };
        Self {
            child,
            endpoints,
            data_dir: data_dir.to_owned(),
            api: addr("api"),
        }
    }

    pub fn ports(&self) -> (u16, u16, u16) {
        (
            self.endpoints.tcp.port(),
            self.endpoints.websocket.port(),
            self.endpoints.quic.port(),
        )
    }

    /// SIGKILL: no graceful shutdown, no flush.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A text body.
pub fn text(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}
