//! Wiring of one node: opens the store, starts the pipeline and listeners, and shuts down cleanly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use im_proto::v1::CloseReason;
use im_store::Store;
use im_store::sqlite::{SqliteOptions, SqliteStore};
use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::DevTokenAuthenticator;
use crate::config::Config;
use crate::cursors::CursorWriter;
use crate::pipeline::Pipeline;
use crate::router::LocalRouter;
use crate::session::NodeContext;
use crate::transport::{quic, tcp, tls, ws};

/// A started node.
pub struct RunningNode {
    /// Bound TCP address, if enabled.
    pub tcp: Option<SocketAddr>,
    /// Bound WebSocket address, if enabled.
    pub websocket: Option<SocketAddr>,
    /// Bound QUIC (UDP) address, if enabled.
    pub quic: Option<SocketAddr>,
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
    let path = config.data_dir.join("dev-secret");
    match std::fs::read_to_string(&path) {
        Ok(secret) => Ok(secret.trim().as_bytes().to_vec()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let bytes: [u8; 32] = rand::random();
            let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            tls::write_private(&path, secret.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(secret.into_bytes())
        }
        Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
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
        let (pipeline, pipeline_task) =
            Pipeline::start(dyn_store.clone(), router.clone(), config.storage.max_batch);
        let (cursors, cursor_task) = CursorWriter::start(dyn_store.clone());
        let ctx = Arc::new(NodeContext::new(
            config.clone(),
            dyn_store,
            router,
            pipeline,
            Arc::new(DevTokenAuthenticator::new(secret.clone())),
            cursors,
            shutdown.clone(),
        ));
        let listeners = TaskTracker::new();
        let sessions = TaskTracker::new();
        let mut node = RunningNode {
            tcp: None,
            websocket: None,
            quic: None,
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
        if config.quic.enabled {
            let server_config = tls::quic_server_config(&identity, config.idle_timeout())?;
            let endpoint = quinn::Endpoint::server(server_config, config.quic.listen)
                .with_context(|| format!("binding quic {}", config.quic.listen))?;
            node.quic = Some(endpoint.local_addr()?);
            listeners.spawn(quic::serve(endpoint, ctx.clone(), sessions.clone()));
        }
        listeners.close();
        Ok(node)
    }

    /// A token that, when cancelled, starts the shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, closes every connection with `SERVER_SHUTDOWN`, commits queued
    /// messages and closes the store.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.context
            .router
            .close_all(CloseReason::ServerShutdown, "server shutting down");
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
        drop(context);
        for task in background {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        store.close().await;
    }
}
