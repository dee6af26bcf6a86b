//! The `im-server` command line: flags, logging set-up, start-up report, signal handling.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::config::Config;
use crate::node::RunningNode;

/// The IM server node.
#[derive(Debug, Parser)]
#[command(name = "im-server", version, about)]
pub struct Args {
    /// TOML configuration file (optional: defaults work without one).
    #[arg(long, short, env = "IM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (database, certificates, development secret).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// TCP listen address, e.g. 0.0.0.0:7100.
    #[arg(long)]
    pub tcp: Option<std::net::SocketAddr>,
    /// WebSocket listen address.
    #[arg(long)]
    pub ws: Option<std::net::SocketAddr>,
    /// QUIC (UDP) listen address.
    #[arg(long)]
    pub quic: Option<std::net::SocketAddr>,
    /// Admin API listen address (plugin lifecycle), e.g. 127.0.0.1:7180.
    #[arg(long)]
    pub admin: Option<std::net::SocketAddr>,
    /// HTTP API listen address (business back-ends, health, metrics), e.g. 127.0.0.1:7181.
    #[arg(long)]
    pub api: Option<std::net::SocketAddr>,
    /// Log format: text or json.
    #[arg(long)]
    pub log_format: Option<String>,
}

impl Args {
    /// The configuration: file and environment, then these flags on top.
    pub fn config(&self) -> anyhow::Result<Config> {
        let mut config = Config::load(self.config.as_deref())?;
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(addr) = self.tcp {
            config.tcp.listen = addr;
        }
        if let Some(addr) = self.ws {
            config.websocket.listen = addr;
        }
        if let Some(addr) = self.quic {
            config.quic.listen = addr;
        }
        if let Some(addr) = self.admin {
            config.admin.listen = addr;
        }
        if let Some(addr) = self.api {
            config.api.listen = addr;
        }
        if let Some(format) = &self.log_format {
            config.log.format = format.clone();
        }
        config.validate()?;
        Ok(config)
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if config.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Entry point of the server binary.
pub fn main() -> ExitCode {
    let args = Args::parse();
    let config = match args.config() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("im-server: {err:#}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.runtime.worker_threads > 0 {
        builder.worker_threads(config.runtime.worker_threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("im-server: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("im-server: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let node = RunningNode::start(config.clone()).await?;
    let show =
        |addr: Option<std::net::SocketAddr>| addr.map_or("off".to_owned(), |a| a.to_string());
    tracing::info!(
        tcp = %show(node.tcp),
        websocket = %show(node.websocket),
        quic = %show(node.quic),
        admin = %show(node.admin),
        api = %show(node.api),
        data_dir = %config.data_dir.display(),
        database = %node.database_path.display(),
        "im-server listening"
    );
    // One machine-readable line on stdout, for scripts and tests that start the server.
    println!(
        "im-server ready tcp={} ws={} quic={} admin={} api={} data_dir={} cert={}",
        show(node.tcp),
        show(node.websocket),
        show(node.quic),
        show(node.admin),
        show(node.api),
        config.data_dir.display(),
        node.certificate_path.display(),
    );
    wait_for_signal().await;
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
