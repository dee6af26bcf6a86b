//! The server under test: a release `im-server` child process with a generated configuration, and SDK clients for it.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use im_client::{Client, ClientConfig, Events, Resume, Trust};

/// A plugin installed when the server starts: its manifest, component and `[config]` values.
#[derive(Debug, Clone)]
pub struct BenchPlugin {
    /// Installed under this id instead of the manifest's (to run several copies).
    pub id: Option<String>,
    pub manifest: PathBuf,
    pub wasm: PathBuf,
    pub config: Vec<(String, String)>,
}

/// How to run the server.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    pub plugins: Vec<BenchPlugin>,
    /// fsync each group commit (power-loss durability) instead of surviving SIGKILL only.
    pub fsync: bool,
    /// The server's `runtime.worker_threads` (0: one per core).
    pub worker_threads: usize,
}

pub struct ImServer {
    child: Child,
    pub pid: u32,
    pub tcp: SocketAddr,
    pub websocket: SocketAddr,
    pub quic: SocketAddr,
    pub certificate: PathBuf,
    secret: String,
    _data: tempfile::TempDir,
}

/// The development secret every benchmark server uses (clients mint their own tokens).
const SECRET: &str = "bench-secret-bench-secret-0123456789";

impl ImServer {
    pub fn start(binary: &Path, options: &ServerOptions) -> anyhow::Result<Self> {
        let data = tempfile::tempdir()?;
        let mut config = format!(
            "data_dir = {dir:?}\n\
             [tcp]\nenabled = true\nlisten = \"127.0.0.1:0\"\n\
             [websocket]\nenabled = true\nlisten = \"127.0.0.1:0\"\n\
             [quic]\nenabled = true\nlisten = \"127.0.0.1:0\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\
             [api]\nlisten = \"127.0.0.1:0\"\n\
             [auth]\ndev_secret = {SECRET:?}\n\
             [storage]\nfsync = {fsync}\n\
             [log]\nlevel = \"warn\"\n\
             [plugins]\nenabled = {plugins}\n",
            dir = data.path().display().to_string(),
            fsync = options.fsync,
            plugins = !options.plugins.is_empty(),
        );
        if !options.plugins.is_empty() {
            config.push_str("bootstrap = [\n");
            for (n, plugin) in options.plugins.iter().enumerate() {
                let manifest = match &plugin.id {
                    Some(id) => {
                        let text = std::fs::read_to_string(&plugin.manifest)
                            .with_context(|| format!("reading {}", plugin.manifest.display()))?;
                        let renamed: String = text
                            .lines()
                            .map(|l| {
                                if l.starts_with("id =") {
                                    format!("id = {id:?}\norder = {}", 100 + n)
                                } else if l.starts_with("order =") {
                                    String::new()
                                } else {
                                    l.to_owned()
                                }
                            })
                            .collect::<Vec<_>>()
                            .join("\n");
                        let path = data.path().join(format!("{id}.toml"));
                        std::fs::write(&path, renamed)?;
                        path
                    }
                    None => plugin.manifest.clone(),
                };
                let values: Vec<String> = plugin
                    .config
                    .iter()
                    .map(|(k, v)| format!("{k} = {v:?}"))
                    .collect();
                config.push_str(&format!(
                    "  {{ manifest = {:?}, wasm = {:?}, config = {{ {} }} }},\n",
                    manifest.display().to_string(),
                    plugin.wasm.display().to_string(),
                    values.join(", ")
                ));
            }
            config.push_str("]\n");
        }
        // A table of its own after [plugins]' keys; written only when asked for, so a
        // server built before the setting existed still starts.
        if options.worker_threads > 0 {
            config.push_str(&format!(
                "[runtime]\nworker_threads = {}\n",
                options.worker_threads
            ));
        }
        let file = data.path().join("bench.toml");
        std::fs::write(&file, config)?;
        let mut child = crate::cpus::server_command(binary)
            .arg("--config")
            .arg(&file)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        if !line.starts_with("im-server ready") {
            let _ = child.kill();
            bail!("the server did not start: {line:?}");
        }
        let field = |key: &str| -> anyhow::Result<&str> {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
                .with_context(|| format!("no {key} in {line:?}"))
        };
        Ok(Self {
            pid: child.id(),
            tcp: field("tcp")?.parse()?,
            websocket: field("ws")?.parse()?,
            quic: field("quic")?.parse()?,
            certificate: PathBuf::from(field("cert")?),
            child,
            secret: SECRET.into(),
            _data: data,
        })
    }

    /// A login token for `user`, valid for a day.
    pub fn token(&self, user: &str) -> String {
        token(&self.secret, user)
    }

    pub fn url(&self, transport: &str) -> String {
        match transport {
            "ws" => format!("ws://{}/", self.websocket),
            "quic" => format!("quic://localhost:{}", self.quic.port()),
            _ => format!("tcp://{}", self.tcp),
        }
    }

    /// Client configuration for `user` over `transport` (`tcp`, `ws` or `quic`).
    pub fn client_config(&self, transport: &str, user: &str) -> anyhow::Result<ClientConfig> {
        let mut config = ClientConfig::new(&self.url(transport), self.token(user), "bench")?;
        config.trust = Trust::pem_file(&self.certificate)?;
        config.resume = Resume::Latest;
        config.event_buffer = 1 << 16;
        config.send_deadline = Duration::from_secs(600);
        config.request_timeout = Duration::from_secs(60);
        config.ack_timeout = Duration::from_secs(30);
        Ok(config)
    }

    pub async fn client(&self, user: &str) -> anyhow::Result<(Client, Events)> {
        let config = self.client_config("tcp", user)?;
        Client::connect(config)
            .await
            .with_context(|| format!("{user} could not connect"))
    }

    pub fn secret(&self) -> &str {
        &self.secret
    }
}

/// A development token for `user` under `secret`.
pub fn token(secret: &str, user: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    im_token::mint(
        secret.as_bytes(),
        &im_token::Claims {
            user_id: user.into(),
            device_id: None,
            expires_at: now + 86_400,
        },
    )
}

impl Drop for ImServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
