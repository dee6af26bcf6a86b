//! Server configuration: defaults that work with no file, a TOML file, `IM_*` environment overrides, flags.
//!
//! Precedence (lowest to highest): built-in defaults, the TOML file, environment variables
//! (`IM_` prefix, `__` between levels, e.g. `IM_TCP__LISTEN=0.0.0.0:7100`), command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the database, the generated QUIC certificate and the development secret live.
    pub data_dir: PathBuf,
    pub tcp: ListenerConfig,
    pub websocket: ListenerConfig,
    pub quic: ListenerConfig,
    pub tls: TlsConfig,
    pub limits: LimitsConfig,
    pub session: SessionConfig,
    pub auth: AuthConfig,
    pub storage: StorageConfig,
    pub plugins: PluginsConfig,
    pub admin: AdminConfig,
    pub api: ApiConfig,
    pub log: LogConfig,
    pub runtime: RuntimeConfig,
}

/// The HTTP API for business back-ends (push, users, groups, history, presence), plus
/// `/healthz`, `/readyz`, `/metrics` and `/openapi.json`, which need no key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// The keys accepted as `Authorization: Bearer <key>`. Each has a name (logged, and
    /// the sender of announcements it makes: `api@<name>`) and either the key itself or a
    /// file holding it (relative paths are under `data_dir`; a missing file is created with
    /// a fresh random key, readable by the owner only).
    pub keys: Vec<ApiKeyConfig>,
}

/// One API key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    pub name: String,
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:7181".parse().expect("valid default address"),
            keys: vec![ApiKeyConfig {
                name: "default".into(),
                key: None,
                key_file: Some(PathBuf::from("api-key")),
            }],
        }
    }
}

/// The Wasm plugin platform.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginsConfig {
    /// Run plugins at all.
    pub enabled: bool,
    /// Installed plugins; default `<data_dir>/plugins`.
    pub dir: Option<PathBuf>,
    /// Plugins to install at start when the plugins directory does not exist yet (a new
    /// node); later changes go through the admin API.
    pub bootstrap: Vec<BootstrapPlugin>,
    /// This node's name, reported to plugins.
    pub node_id: String,
}

/// A plugin to install on a new node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapPlugin {
    pub manifest: PathBuf,
    pub wasm: PathBuf,
    /// Values set in (or added to) the manifest's `[config]` table.
    #[serde(default)]
    pub config: std::collections::BTreeMap<String, String>,
    /// `[config]` keys whose values are read from files (relative paths are under
    /// `data_dir`), so secrets stay out of manifests. A missing file is created holding a
    /// fresh random secret (64 hex characters, readable by the owner only).
    #[serde(default)]
    pub secrets: std::collections::BTreeMap<String, PathBuf>,
}

/// The local admin HTTP API (plugin lifecycle).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// Bearer token required on every request. When absent, one is generated on first
    /// start in `<data_dir>/admin-token`.
    pub token: Option<String>,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dir: None,
            bootstrap: Vec::new(),
            node_id: "node-1".into(),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:7180".parse().expect("valid default address"),
            token: None,
        }
    }
}

/// One listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// Serve TLS (TCP and WebSocket only; QUIC always uses TLS).
    #[serde(default)]
    pub tls: bool,
}

/// Certificate and key (PEM). When absent, a self-signed pair is generated on first start
/// and kept in the data directory (`tls-cert.pem`, `tls-key.pem`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest frame accepted, in bytes.
    pub max_frame_bytes: usize,
    /// Largest message body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Frames queued for one connection before it counts as a slow consumer and is closed.
    pub outbound_queue: usize,
    /// A write to a client that takes longer than this closes the connection.
    pub write_timeout_ms: u64,
    /// Most members a group may have (group-policy plugins may set lower limits).
    pub max_group_members: usize,
    /// Most users one group request may list (create, invite, kick).
    pub max_group_batch: usize,
    /// Most users one connection may watch the presence of.
    pub max_presence_watch: usize,
    /// Most live rooms one connection may be in.
    pub max_rooms_per_connection: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// Close connections from which nothing arrived for this long.
    pub idle_timeout_ms: u64,
    /// Park plain-TCP connections that have had nothing to do for this long (and once right
    /// after login): they then hold no task and no runtime registration until their socket,
    /// their queue or a close request wakes them. 0 never parks.
    pub park_after_ms: u64,
    /// Close connections that have not logged in after this long.
    pub login_timeout_ms: u64,
    /// First re-push of an unacknowledged delivery.
    pub retry_initial_ms: u64,
    /// Longest delay between re-pushes.
    pub retry_max_ms: u64,
    /// Unacknowledged deliveries tracked per connection; older ones are left to sync.
    pub max_pending_deliveries: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Secret of the development token authenticator. When absent, one is generated on
    /// first start and kept in `<data_dir>/dev-secret`.
    pub dev_secret: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Database file; default `<data_dir>/im.db`.
    pub path: Option<PathBuf>,
    /// fsync each group commit (survives power loss), not only process crashes.
    pub fsync: bool,
    /// Most messages stored in one group commit.
    pub max_batch: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter, e.g. `info` or `im_server=debug`; `RUST_LOG` wins when set.
    pub level: String,
}

/// The async runtime the node runs on.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Worker threads; 0 (the default) starts one per CPU core. Fewer workers mean fewer
    /// cross-thread wake-ups per message (lower latency on a machine the node shares),
    /// more mean more cores for sessions under heavy load.
    pub worker_threads: usize,
}

/// Most worker threads `runtime.worker_threads` may ask for.
pub const MAX_WORKER_THREADS: usize = 1024;

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data"),
            tcp: ListenerConfig::on("0.0.0.0:7100"),
            websocket: ListenerConfig::on("0.0.0.0:7101"),
            quic: ListenerConfig::on("0.0.0.0:7102"),
            tls: TlsConfig::default(),
            limits: LimitsConfig::default(),
            session: SessionConfig::default(),
            auth: AuthConfig::default(),
            storage: StorageConfig::default(),
            plugins: PluginsConfig::default(),
            admin: AdminConfig::default(),
            api: ApiConfig::default(),
            log: LogConfig::default(),
            runtime: RuntimeConfig::default(),
        }
    }
}

impl ListenerConfig {
    fn on(addr: &str) -> Self {
        Self {
            enabled: true,
            listen: addr.parse().expect("valid default address"),
            tls: false,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: im_proto::DEFAULT_MAX_FRAME_BYTES,
            max_body_bytes: 32 * 1024,
            outbound_queue: 1024,
            write_timeout_ms: 10_000,
            max_group_members: 10_000,
            // 500 ids of up to 64 bytes keep an announcement within one frame.
            max_group_batch: 500,
            // 500 states of up to 64-byte ids keep a presence answer within one frame.
            max_presence_watch: 500,
            max_rooms_per_connection: 64,
        }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            idle_timeout_ms: 90_000,
            park_after_ms: 2_000,
            login_timeout_ms: 10_000,
            retry_initial_ms: 2_000,
            retry_max_ms: 30_000,
            max_pending_deliveries: 512,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            path: None,
            fsync: false,
            max_batch: 512,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

impl Config {
    /// Loads defaults, then `file` (if given; it must exist), then `IM_*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::Invalid(format!(
                    "config file {} does not exist",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        figment = figment.merge(Env::prefixed("IM_").split("__"));
        let config: Config = figment
            .extract()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: &str| Err(ConfigError::Invalid(msg.to_owned()));
        if self.limits.max_frame_bytes < 1024 || self.limits.max_frame_bytes > 16 * 1024 * 1024 {
            return bad("limits.max_frame_bytes must be between 1024 and 16777216");
        }
        if self.limits.max_body_bytes == 0
            || self.limits.max_body_bytes + 1024 > self.limits.max_frame_bytes
        {
            return bad(
                "limits.max_body_bytes must be at least 1 and leave 1024 bytes of the frame for headers",
            );
        }
        if self.limits.outbound_queue < 16 {
            return bad("limits.outbound_queue must be at least 16");
        }
        if self.session.idle_timeout_ms < 100 || self.session.login_timeout_ms < 100 {
            return bad("session timeouts must be at least 100 ms");
        }
        if self.session.retry_initial_ms == 0
            || self.session.retry_max_ms < self.session.retry_initial_ms
        {
            return bad("session.retry_initial_ms must be > 0 and <= session.retry_max_ms");
        }
        // A presence answer lists one state (at most ~100 bytes) per watched user.
        if self.limits.max_presence_watch * 100 + 1024 > self.limits.max_frame_bytes {
            return bad(
                "limits.max_presence_watch must fit one frame: at most (max_frame_bytes - 1024) / 100",
            );
        }
        if self.runtime.worker_threads > MAX_WORKER_THREADS {
            return bad(&format!(
                "runtime.worker_threads must be at most {MAX_WORKER_THREADS} (0: one per CPU core)"
            ));
        }
        if self.storage.max_batch == 0 {
            return bad("storage.max_batch must be at least 1");
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return bad("tls.cert and tls.key must be given together");
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return bad("log.format must be \"text\" or \"json\"");
        }
        if !(self.tcp.enabled || self.websocket.enabled || self.quic.enabled) {
            return bad("at least one of tcp, websocket and quic must be enabled");
        }
        if let Some(token) = &self.admin.token
            && token.len() < 16
        {
            return bad("admin.token must be at least 16 characters");
        }
        if self.quic.tls {
            return bad("quic.tls is implied (QUIC always uses TLS); remove it");
        }
        let mut names = std::collections::HashSet::new();
        for key in &self.api.keys {
            if !im_proto::ids::is_valid_id(&key.name) || key.name.len() > 60 {
                return bad("api.keys: a name is 1-60 of [A-Za-z0-9_.@-]");
            }
            if !names.insert(key.name.as_str()) {
                return bad("api.keys: names must be unique");
            }
            match (&key.key, &key.key_file) {
                (Some(k), None) if k.len() >= 16 => {}
                (Some(_), None) => return bad("api.keys: a key must be at least 16 characters"),
                (None, Some(_)) => {}
                _ => return bad("api.keys: give each key exactly one of `key` and `key_file`"),
            }
        }
        Ok(())
    }

    /// The installed-plugins directory.
    pub fn plugins_dir(&self) -> PathBuf {
        self.plugins
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("plugins"))
    }

    /// The database file.
    pub fn database_path(&self) -> PathBuf {
        self.storage
            .path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("im.db"))
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.session.idle_timeout_ms)
    }

    /// A configuration for tests and embedding: every listener on 127.0.0.1 with an
    /// OS-chosen port, data in `data_dir`.
    pub fn ephemeral(data_dir: &Path) -> Self {
        let local = |tls| ListenerConfig {
            enabled: true,
            listen: "127.0.0.1:0".parse().expect("addr"),
            tls,
        };
        Self {
            data_dir: data_dir.to_owned(),
            tcp: local(false),
            websocket: local(false),
            quic: local(false),
            admin: AdminConfig {
                listen: "127.0.0.1:0".parse().expect("addr"),
                ..AdminConfig::default()
            },
            api: ApiConfig {
                listen: "127.0.0.1:0".parse().expect("addr"),
                ..ApiConfig::default()
            },
            ..Self::default()
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn api_keys_and_presence_limits_are_checked() {
        let key = |name: &str, key: Option<&str>, file: Option<&str>| ApiKeyConfig {
            name: name.into(),
            key: key.map(str::to_owned),
            key_file: file.map(PathBuf::from),
        };
        let with_keys = |keys: Vec<ApiKeyConfig>| {
            let mut config = Config::default();
            config.api.keys = keys;
            config.validate().map_err(|e| e.to_string())
        };
        assert!(with_keys(vec![key("crm", Some("0123456789abcdef"), None)]).is_ok());
        let short = with_keys(vec![key("crm", Some("short"), None)]).unwrap_err();
        assert!(short.contains("16 characters"), "{short}");
        let both = with_keys(vec![key("crm", Some("0123456789abcdef"), Some("f"))]).unwrap_err();
        assert!(both.contains("exactly one"), "{both}");
        let twice = with_keys(vec![key("a", None, Some("f")), key("a", None, Some("g"))]);
        assert!(twice.unwrap_err().contains("unique"));
        assert!(with_keys(vec![key("bad name", None, Some("f"))]).is_err());
        let mut config = Config::default();
        config.limits.max_presence_watch = 1000;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("max_presence_watch"), "{err}");
    }

    #[test]
    fn file_values_override_defaults_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("im.toml");
        std::fs::write(
            &file,
            "data_dir = \"/tmp/x\"\n[tcp]\nenabled = true\nlisten = \"127.0.0.1:9\"\n",
        )
        .unwrap();
        let config = Config::load(Some(&file)).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(config.tcp.listen, "127.0.0.1:9".parse().unwrap());
        assert!(config.websocket.enabled);

        std::fs::write(&file, "[tcp]\nlisen = \"x\"\n").unwrap();
        let err = Config::load(Some(&file)).unwrap_err().to_string();
        assert!(err.contains("lisen"), "{err}");
        std::fs::write(&file, "[limits]\nmax_frame_bytes = 10\n").unwrap();
        assert!(Config::load(Some(&file)).is_err());
        assert!(Config::load(Some(&dir.path().join("missing.toml"))).is_err());
    }

    #[test]
    fn runtime_worker_threads_are_read_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("im.toml");
        std::fs::write(&file, "[runtime]\nworker_threads = 1\n").unwrap();
        assert_eq!(Config::load(Some(&file)).unwrap().runtime.worker_threads, 1);
        let mut config = Config::default();
        config.runtime.worker_threads = MAX_WORKER_THREADS + 1;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("runtime.worker_threads"), "{err}");
    }
}
