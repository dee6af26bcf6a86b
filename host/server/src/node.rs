//! Wiring of one node: opens the store, starts the pipeline and listeners, and shuts down cleanly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use im_store::Store;
use im_store::sqlite::{SqliteOptions, SqliteStore};
use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin;
use crate::api;
use crate::auth::{Authenticator, DevTokenAuthenticator, PluginAuthenticator};
use crate::config::{BootstrapPlugin, Config};
use crate::cursors::CursorWriter;
use crate::groups::GroupDirectory;
use crate::metrics::NodeMetrics;
use crate::park::Parker;
use crate::pipeline::Pipeline;
use crate::router::LocalRouter;
use crate::session::NodeContext;
use crate::transport::{quic, tcp, tls, ws};
use im_plugins::{PluginHost, PluginHostConfig};

/// A started node.
pub struct RunningNode {
    /// Bound TCP address, if enabled.
    pub tcp: Option<SocketAddr>,
    /// Bound WebSocket address, if enabled.
    pub websocket: Option<SocketAddr>,
    /// Bound QUIC (UDP) address, if enabled.
    pub quic: Option<SocketAddr>,
    /// Bound admin API address, if enabled.
    pub admin: Option<SocketAddr>,
    /// The admin API's bearer token.
    pub admin_token: String,
    /// Bound address of the HTTP API for business back-ends, if enabled.
    pub api: Option<SocketAddr>,
    /// The API keys accepted, by name.
    pub api_keys: Vec<(String, String)>,
    /// Whether TCP / WebSocket serve TLS.
    pub tcp_tls: bool,
    pub websocket_tls: bool,
    /// The server certificate (clients of a self-signed setup trust this).
    pub certificate: CertificateDer<'static>,
    pub certificate_path: PathBuf,
    /// The development-token secret.
    pub dev_secret: Vec<u8>,
    pub database_path: PathBuf,
    pub context: Arc<NodeContext>,
    shutdown: CancellationToken,
    listeners: TaskTracker,
    sessions: TaskTracker,
    background: Vec<tokio::task::JoinHandle<()>>,
    store: SqliteStore,
}

/// Reads the development secret from config, or from `<data_dir>/dev-secret`, creating it.
pub fn dev_secret(config: &Config) -> anyhow::Result<Vec<u8>> {
    if let Some(secret) = &config.auth.dev_secret {
        anyhow::ensure!(
            secret.len() >= 16,
            "auth.dev_secret must be at least 16 characters"
        );
        return Ok(secret.as_bytes().to_vec());
    }
    Ok(read_or_create_secret(&config.data_dir.join("dev-secret"))?.into_bytes())
}

/// Reads the secret in `path`, or creates the file with a fresh random secret (32 random
/// bytes as hex, readable by the owner only).
pub fn read_or_create_secret(path: &std::path::Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(secret) => Ok(secret.trim().to_owned()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let bytes: [u8; 32] = rand::random();
            let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            tls::write_private(path, secret.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(secret)
        }
        Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
    }
}

/// The admin token from config, or from `<data_dir>/admin-token`, creating it.
fn admin_token(config: &Config) -> anyhow::Result<String> {
    if let Some(token) = &config.admin.token {
        return Ok(token.clone());
    }
    read_or_create_secret(&config.data_dir.join("admin-token"))
}

/// The API keys of the configuration, reading (or creating) the key files.
fn api_keys(config: &Config) -> anyhow::Result<Vec<api::ApiKey>> {
    config
        .api
        .keys
        .iter()
        .map(|k| {
            let key = match (&k.key, &k.key_file) {
                (Some(key), _) => key.clone(),
                (None, Some(file)) => read_or_create_secret(&config.data_dir.join(file))?,
                (None, None) => anyhow::bail!("api key {:?} has neither key nor key_file", k.name),
            };
            anyhow::ensure!(
                key.len() >= 16,
                "api key {:?} must be at least 16 characters",
                k.name
            );
            Ok(api::ApiKey {
                name: k.name.clone(),
                key,
            })
        })
        .collect()
}

/// The manifest of a bootstrap plugin with its configured `config` values and secrets
/// written into its `[config]` table.
fn bootstrap_manifest(config: &Config, plugin: &BootstrapPlugin) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(&plugin.manifest)
        .with_context(|| format!("reading {}", plugin.manifest.display()))?;
    if plugin.config.is_empty() && plugin.secrets.is_empty() {
        return Ok(text);
    }
    let mut manifest: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", plugin.manifest.display()))?;
    let table = manifest
        .entry("config")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .with_context(|| format!("{}: `config` is not a table", plugin.manifest.display()))?;
    for (key, value) in &plugin.config {
        table.insert(key.clone(), toml::Value::String(value.clone()));
    }
    for (key, file) in &plugin.secrets {
        let secret = read_or_create_secret(&config.data_dir.join(file))?;
        table.insert(key.clone(), toml::Value::String(secret));
    }
    Ok(toml::to_string(&manifest)?)
}

/// Starts the plugin host; on a new node, installs the configured bootstrap plugins.
async fn start_plugins(config: &Config, store: Arc<dyn Store>) -> anyhow::Result<Arc<PluginHost>> {
    let dir = config.plugins_dir();
    let new_node = !dir.exists();
    let host = PluginHost::start(
        PluginHostConfig {
            dir,
            cache_dir: config.data_dir.join("plugin-cache"),
            node_id: config.plugins.node_id.clone(),
        },
        store,
    )
    .await
    .context("starting the plugin host")?;
    if new_node {
        for plugin in &config.plugins.bootstrap {
            let manifest = bootstrap_manifest(config, plugin)?;
            let wasm = std::fs::read(&plugin.wasm)
                .with_context(|| format!("reading {}", plugin.wasm.display()))?;
            let info = host.install(&manifest, wasm).await.with_context(|| {
                format!("installing bootstrap plugin {}", plugin.manifest.display())
            })?;
            tracing::info!(plugin = %info.id, version = %info.version, "installed bootstrap plugin");
        }
    }
    Ok(host)
}

/// Serves `app` on `listener` until `stop` fires, finishing requests in flight.
async fn serve_http(listener: TcpListener, app: axum::Router, stop: CancellationToken, name: &str) {
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await;
    if let Err(err) = served {
        tracing::error!(error = %err, "{name} stopped");
    }
}

impl RunningNode {
    /// Starts a node: binds every enabled listener before returning.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        config.validate()?;
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
        let database_path = config.database_path();
        let store = SqliteStore::open(
            &database_path,
            SqliteOptions {
                fsync_each_commit: config.storage.fsync,
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("opening database {}", database_path.display()))?;
        let dyn_store: Arc<dyn Store> = Arc::new(store.clone());
        let identity = tls::load_or_generate(&config)?;
        let secret = dev_secret(&config)?;
        let shutdown = CancellationToken::new();
        let router = Arc::new(LocalRouter::default());
        let groups = Arc::new(GroupDirectory::new(dyn_store.clone()));
        let metrics = Arc::new(NodeMetrics::new());
        let (pipeline, pipeline_task) = Pipeline::start(
            dyn_store.clone(),
            router.clone(),
            groups.clone(),
            metrics.clone(),
            config.storage.max_batch,
        );
        let (cursors, cursor_task) = CursorWriter::start(dyn_store.clone());
        let plugins = if config.plugins.enabled {
            Some(start_plugins(&config, dyn_store.clone()).await?)
        } else {
            None
        };
        let auth: Arc<dyn Authenticator> = match &plugins {
            Some(plugins) => Arc::new(PluginAuthenticator {
                plugins: plugins.clone(),
                fallback: Some(DevTokenAuthenticator::new(secret.clone())),
            }),
            None => Arc::new(DevTokenAuthenticator::new(secret.clone())),
        };
        let sessions = TaskTracker::new();
        // Idle plain-TCP connections park here (`crate::park`) unless parking is off.
        let (parker, parker_pump) = if config.session.park_after_ms > 0 {
            let (parker, pump) = Parker::new(sessions.clone()).context("setting up parking")?;
            (Some(parker), Some(pump))
        } else {
            (None, None)
        };
        let ctx = Arc::new(NodeContext::new(
            config.clone(),
            dyn_store,
            router,
            pipeline,
            groups,
            auth,
            cursors,
            shutdown.clone(),
            plugins.clone(),
            metrics,
            parker,
        ));
        let listeners = TaskTracker::new();
        let mut node = RunningNode {
            tcp: None,
            websocket: None,
            quic: None,
            admin: None,
            admin_token: String::new(),
            api: None,
            api_keys: Vec::new(),
            tcp_tls: config.tcp.tls,
            websocket_tls: config.websocket.tls,
            certificate: identity.chain[0].clone(),
            certificate_path: identity.cert_path.clone(),
            dev_secret: secret,
            database_path,
            context: ctx.clone(),
            shutdown,
            listeners: listeners.clone(),
            sessions: sessions.clone(),
            background: vec![pipeline_task, cursor_task],
            store,
        };
        if config.tcp.enabled {
            let listener = TcpListener::bind(config.tcp.listen)
                .await
                .with_context(|| format!("binding tcp {}", config.tcp.listen))?;
            node.tcp = Some(listener.local_addr()?);
            let acceptor = config
                .tcp
                .tls
                .then(|| tls::tcp_server_config(&identity, &[]).map(TlsAcceptor::from))
                .transpose()?;
            listeners.spawn(tcp::serve(
                listener,
                acceptor,
                ctx.clone(),
                sessions.clone(),
            ));
        }
        if config.websocket.enabled {
            let listener = TcpListener::bind(config.websocket.listen)
                .await
                .with_context(|| format!("binding websocket {}", config.websocket.listen))?;
            node.websocket = Some(listener.local_addr()?);
            let acceptor = config
                .websocket
                .tls
                .then(|| tls::tcp_server_config(&identity, &[b"http/1.1"]).map(TlsAcceptor::from))
                .transpose()?;
            listeners.spawn(ws::serve(listener, acceptor, ctx.clone(), sessions.clone()));
        }
        if let (Some(plugins), true) = (&plugins, config.admin.enabled) {
            let token = admin_token(&config)?;
            let listener = TcpListener::bind(config.admin.listen)
                .await
                .with_context(|| format!("binding admin {}", config.admin.listen))?;
            node.admin = Some(listener.local_addr()?);
            node.admin_token = token.clone();
            let app = admin::router(plugins.clone(), token);
            listeners.spawn(serve_http(
                listener,
                app,
                node.shutdown.clone(),
                "admin API",
            ));
        }
        if config.api.enabled {
            let keys = api_keys(&config)?;
            let listener = TcpListener::bind(config.api.listen)
                .await
                .with_context(|| format!("binding api {}", config.api.listen))?;
            node.api = Some(listener.local_addr()?);
            node.api_keys = keys
                .iter()
                .map(|k| (k.name.clone(), k.key.clone()))
                .collect();
            let app = api::router(ctx.clone(), keys);
            listeners.spawn(serve_http(listener, app, node.shutdown.clone(), "HTTP API"));
        }
        if config.quic.enabled {
            let server_config = tls::quic_server_config(&identity, config.idle_timeout())?;
            let endpoint = quinn::Endpoint::server(server_config, config.quic.listen)
                .with_context(|| format!("binding quic {}", config.quic.listen))?;
            node.quic = Some(endpoint.local_addr()?);
            listeners.spawn(quic::serve(endpoint, ctx.clone(), sessions.clone()));
        }
        listeners.close();
        // Spawned last, the idle sweep and the metrics upkeep: they end only with the
        // shutdown token, so a start that fails before here must not leave them running.
        node.background
            .push(tokio::spawn(crate::session::sweep_idle_connections(
                ctx.router.clone(),
                config.idle_timeout(),
                parker_pump
                    .is_some()
                    .then(|| Duration::from_millis(config.session.park_after_ms)),
                node.shutdown.clone(),
            )));
        if let Some(pump) = parker_pump {
            node.background
                .push(tokio::spawn(pump.run(node.shutdown.clone())));
        }
        node.background.push(tokio::spawn(
            ctx.metrics.clone().keep_up(node.shutdown.clone()),
        ));
        Ok(node)
    }

    /// A token that, when cancelled, starts the shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, closes every connection with `SERVER_SHUTDOWN`, commits queued
    /// messages and closes the store.
    pub async fn shutdown(self) {
        // The idle sweep task turns the cancelled token into close requests for every
        // connection (`sweep_idle_connections`).
        self.shutdown.cancel();
        self.listeners.wait().await;
        self.sessions.close();
        if tokio::time::timeout(Duration::from_secs(10), self.sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!("some connections did not close within 10 s");
        }
        // Dropping the last context ends the pipeline and cursor tasks after they drain.
        let RunningNode {
            context,
            background,
            store,
            ..
        } = self;
        let plugins = context.plugins.clone();
        drop(context);
        if let Some(plugins) = plugins {
            plugins.flush_kv().await;
        }
        for task in background {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        store.close().await;
    }
}
