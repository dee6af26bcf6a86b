//! `imctl`: mint development tokens, send a message, tail conversations, chat interactively, read history.
//!
//! The binary's whole logic lives here, so the end-to-end tests can build the same CLI.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use im_client::{Client, ClientConfig, Event, Resume, Trust, v1};
use tokio::io::AsyncBufReadExt;

#[derive(Parser)]
#[command(
    name = "imctl",
    version,
    about = "Command-line client for the IM server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mint a login token: a JWT for the auth-jwt plugin, or a development token.
    Token {
        #[command(flatten)]
        secret: SecretArgs,
        /// The user the token logs in as.
        #[arg(long)]
        user: String,
        /// Bind the token to this device id.
        #[arg(long)]
        device: Option<String>,
        /// Validity in seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl: u64,
    },
    /// Send one message and print its ack.
    Send {
        #[command(flatten)]
        conn: ConnArgs,
        /// Recipient user id.
        #[arg(long)]
        to: String,
        /// Message text.
        text: String,
    },
    /// Print incoming messages as they arrive (and, with --from-start, everything stored).
    Tail {
        #[command(flatten)]
        conn: ConnArgs,
        /// Only this conversation (e.g. u:alice:bob).
        #[arg(long)]
        conversation: Option<String>,
        /// Replay every stored message first.
        #[arg(long)]
        from_start: bool,
    },
    /// Chat with a user: each line typed is sent; incoming messages are printed.
    Chat {
        #[command(flatten)]
        conn: ConnArgs,
        /// The user to chat with.
        #[arg(long)]
        with: String,
    },
    /// Print the latest messages with a user, oldest first.
    History {
        #[command(flatten)]
        conn: ConnArgs,
        #[arg(long)]
        with: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// List conversations with unread counts.
    Conversations {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Manage plugins through the server's admin API.
    Plugin {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        action: PluginAction,
    },
}

#[derive(Subcommand)]
enum PluginAction {
    /// List installed plugins with their state and statistics.
    List,
    /// Install a plugin, or upgrade the installed one with the same id.
    Install {
        /// The plugin's manifest.toml.
        #[arg(long)]
        manifest: PathBuf,
        /// The component (.wasm).
        #[arg(long)]
        wasm: PathBuf,
    },
    /// Put a plugin back into its hooks' chains.
    Enable { id: String },
    /// Take a plugin out of its hooks' chains (it stays installed).
    Disable { id: String },
    /// Uninstall a plugin.
    Remove {
        id: String,
        /// Also delete the plugin's key-value data.
        #[arg(long)]
        purge: bool,
    },
}

#[derive(Args)]
struct AdminArgs {
    /// The admin API's address.
    #[arg(long, env = "IM_ADMIN", default_value = "http://127.0.0.1:7180")]
    admin: String,
    /// The admin token (default: <data-dir>/admin-token).
    #[arg(long, env = "IM_ADMIN_TOKEN")]
    admin_token: Option<String>,
    /// The server's data directory, to read the admin token from.
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
}

impl AdminArgs {
    fn token(&self) -> anyhow::Result<String> {
        if let Some(token) = &self.admin_token {
            return Ok(token.clone());
        }
        let path = self.data_dir.join("admin-token");
        let token = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (pass --admin-token or --data-dir)",
                path.display()
            )
        })?;
        Ok(token.trim().to_owned())
    }
}

/// Runs one admin API call and prints its JSON answer; fails on an error answer.
async fn plugin_command(admin: AdminArgs, action: PluginAction) -> anyhow::Result<()> {
    use base64::Engine as _;
    let client = reqwest::Client::new();
    let base = admin.admin.trim_end_matches('/').to_owned();
    let request = match &action {
        PluginAction::List => client.get(format!("{base}/v1/plugins")),
        PluginAction::Install { manifest, wasm } => {
            let manifest_text = std::fs::read_to_string(manifest)
                .with_context(|| format!("reading {}", manifest.display()))?;
            let parsed: toml::Table = toml::from_str(&manifest_text)
                .with_context(|| format!("parsing {}", manifest.display()))?;
            let id = parsed
                .get("id")
                .and_then(toml::Value::as_str)
                .context("the manifest has no id")?
                .to_owned();
            let bytes =
                std::fs::read(wasm).with_context(|| format!("reading {}", wasm.display()))?;
            let body = serde_json::json!({
                "manifest": manifest_text,
                "wasm_base64": base64::engine::general_purpose::STANDARD.encode(bytes),
            });
            client.put(format!("{base}/v1/plugins/{id}")).json(&body)
        }
        PluginAction::Enable { id } => client.post(format!("{base}/v1/plugins/{id}/enable")),
        PluginAction::Disable { id } => client.post(format!("{base}/v1/plugins/{id}/disable")),
        PluginAction::Remove { id, purge } => {
            client.delete(format!("{base}/v1/plugins/{id}?purge={purge}"))
        }
    };
    let response = request
        .bearer_auth(admin.token()?)
        .send()
        .await
        .with_context(|| format!("calling the admin API at {base}"))?;
    let status = response.status();
    let text = response.text().await?;
    if !status.is_success() {
        bail!("admin API answered {status}: {text}");
    }
    if text.is_empty() {
        println!("ok");
    } else {
        let json: serde_json::Value = serde_json::from_str(&text)?;
        println!("{}", serde_json::to_string_pretty(&json)?);
    }
    Ok(())
}

/// Which kind of login token to mint.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TokenKind {
    /// `jwt` when a JWT secret is available (--jwt-secret, IM_JWT_SECRET or
    /// <data-dir>/jwt-secret), else `dev`.
    Auto,
    /// An HS256 JWT, verified by the auth-jwt plugin.
    Jwt,
    /// A development token, accepted while no authenticator plugin is enabled.
    Dev,
}

#[derive(Args)]
struct SecretArgs {
    /// The kind of token to mint.
    #[arg(long, value_enum, default_value = "auto")]
    token_kind: TokenKind,
    /// The server's development secret (default: <data-dir>/dev-secret).
    #[arg(long, env = "IM_DEV_SECRET")]
    secret: Option<String>,
    /// The auth-jwt plugin's HS256 secret (default: <data-dir>/jwt-secret).
    #[arg(long, env = "IM_JWT_SECRET")]
    jwt_secret: Option<String>,
    /// The `aud` claim of minted JWTs (the plugin's `audience`).
    #[arg(long, default_value = "im")]
    audience: String,
    /// The server's data directory, to read secrets from.
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
}

/// The claims of a JWT minted for the auth-jwt plugin.
#[derive(serde::Serialize)]
struct JwtClaims<'a> {
    sub: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    dev: Option<&'a str>,
}

impl SecretArgs {
    fn read(&self, given: &Option<String>, file: &str) -> anyhow::Result<Option<String>> {
        if let Some(secret) = given {
            return Ok(Some(secret.clone()));
        }
        let path = self.data_dir.join(file);
        match std::fs::read_to_string(&path) {
            Ok(secret) => Ok(Some(secret.trim().to_owned())),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Mints a token for `user` (bound to `device` if given) valid for `ttl` seconds.
    fn mint(&self, user: &str, device: Option<&str>, ttl: u64) -> anyhow::Result<String> {
        let jwt_secret = match self.token_kind {
            TokenKind::Dev => None,
            TokenKind::Auto => self.read(&self.jwt_secret, "jwt-secret")?,
            TokenKind::Jwt => Some(self.read(&self.jwt_secret, "jwt-secret")?.with_context(
                || {
                    format!(
                        "no JWT secret: pass --jwt-secret or --data-dir (reading {})",
                        self.data_dir.join("jwt-secret").display()
                    )
                },
            )?),
        };
        let now = now();
        if let Some(secret) = jwt_secret {
            let claims = JwtClaims {
                sub: user,
                aud: &self.audience,
                iat: now,
                exp: now + ttl,
                dev: device,
            };
            let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
            return Ok(jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                &claims,
                &key,
            )?);
        }
        let secret = self.read(&self.secret, "dev-secret")?.with_context(|| {
            format!(
                "no development secret: pass --secret or --data-dir (reading {})",
                self.data_dir.join("dev-secret").display()
            )
        })?;
        let claims = im_token::Claims {
            user_id: user.to_owned(),
            device_id: device.map(str::to_owned),
            expires_at: now + ttl,
        };
        Ok(im_token::mint(secret.as_bytes(), &claims))
    }
}

#[derive(Args)]
struct ConnArgs {
    /// Server URL: tcp://, tls://, ws://, wss:// or quic://host:port.
    #[arg(long, env = "IM_SERVER", default_value = "tcp://127.0.0.1:7100")]
    server: String,
    /// Login token; without it one is minted for --user (see `imctl token --help`).
    #[arg(long, env = "IM_TOKEN")]
    token: Option<String>,
    /// User to log in as when minting a token.
    #[arg(long, env = "IM_USER")]
    user: Option<String>,
    /// Device id of this client.
    #[arg(long, default_value = "imctl")]
    device: String,
    #[command(flatten)]
    secret: SecretArgs,
    /// PEM certificate to trust for tls/wss/quic (default: <data-dir>/tls-cert.pem if present,
    /// else the system roots).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Accept any server certificate (development only).
    #[arg(long)]
    insecure: bool,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl ConnArgs {
    fn config(&self, resume: Resume) -> anyhow::Result<ClientConfig> {
        let token = match (&self.token, &self.user) {
            (Some(token), _) => token.clone(),
            (None, Some(user)) => self.secret.mint(user, None, 3600)?,
            (None, None) => bail!("pass --token, or --user to mint a token"),
        };
        let mut config = ClientConfig::new(&self.server, token, &self.device)?;
        config.resume = resume;
        config.trust = if self.insecure {
            Trust::InsecureAnyCertificate
        } else if let Some(ca) = &self.ca {
            Trust::pem_file(ca)?
        } else {
            let generated = self.secret.data_dir.join("tls-cert.pem");
            if generated.exists() {
                Trust::pem_file(&generated)?
            } else {
                Trust::System
            }
        };
        Ok(config)
    }

    async fn connect(&self, resume: Resume) -> anyhow::Result<(Client, im_client::Events)> {
        let config = self.config(resume)?;
        Client::connect(config)
            .await
            .with_context(|| format!("connecting to {}", self.server))
    }
}

fn print_message(m: &v1::Message) {
    let text = String::from_utf8_lossy(&m.body);
    println!(
        "[{} #{}] {}: {}",
        m.conversation_id, m.seq, m.sender_id, text
    );
}

/// Runs the command line given to the process.
pub fn run() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run_async())
}

async fn run_async() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Token {
            secret,
            user,
            device,
            ttl,
        } => {
            println!("{}", secret.mint(&user, device.as_deref(), ttl)?);
        }
        Command::Send { conn, to, text } => {
            let (client, _events) = conn.connect(Resume::Latest).await?;
            let ack = client.send_text(&to, &text).await?;
            println!(
                "sent {} seq={} id={}{}",
                ack.conversation_id,
                ack.seq,
                ack.server_msg_id,
                if ack.duplicate { " (duplicate)" } else { "" }
            );
            client.close().await;
        }
        Command::Tail {
            conn,
            conversation,
            from_start,
        } => {
            let resume = if from_start {
                Resume::Beginning
            } else {
                Resume::DeviceCursor
            };
            let (_client, mut events) = conn.connect(resume).await?;
            while let Some(event) = events.next().await {
                match event {
                    Event::Message(m)
                        if conversation
                            .as_ref()
                            .is_none_or(|c| *c == m.conversation_id) =>
                    {
                        print_message(&m)
                    }
                    Event::Message(_) => {}
                    Event::Connected { user_id, resumed } => {
                        eprintln!(
                            "# {} as {user_id}",
                            if resumed { "reconnected" } else { "connected" }
                        );
                    }
                    Event::Disconnected { reason } => eprintln!("# disconnected: {reason}"),
                    Event::Closed { reason, message } => {
                        bail!("closed by server: {}: {message}", reason.as_str_name())
                    }
                }
            }
        }
        Command::Chat { conn, with } => chat(conn, with).await?,
        Command::Plugin { admin, action } => plugin_command(admin, action).await?,
        Command::History { conn, with, limit } => {
            let (client, _events) = conn.connect(Resume::Latest).await?;
            let conversation = im_client::ids::direct_conversation_id(client.user_id(), &with);
            let page = client.history(&conversation, 0, limit).await?;
            for m in page.messages.iter().rev() {
                print_message(m);
            }
            client.close().await;
        }
        Command::Conversations { conn } => {
            let (client, _events) = conn.connect(Resume::Latest).await?;
            let list = client.list_conversations(100, None).await?;
            for c in list.conversations {
                println!(
                    "{}\twith {}\tlast_seq={}\tunread={}",
                    c.conversation_id, c.peer_id, c.last_seq, c.unread_count
                );
            }
            client.close().await;
        }
    }
    Ok(())
}

async fn chat(conn: ConnArgs, with: String) -> anyhow::Result<()> {
    // Recent history is printed first; the live stream carries only what comes after.
    let (client, mut events) = conn.connect(Resume::Latest).await?;
    let conversation = im_client::ids::direct_conversation_id(client.user_id(), &with);
    eprintln!(
        "# chatting with {with} as {}; type a line and press enter, Ctrl-D to quit",
        client.user_id()
    );
    let history = client.history(&conversation, 0, 10).await?;
    for m in history.messages.iter().rev() {
        print_message(m);
    }
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                if line.trim().is_empty() {
                    continue;
                }
                match tokio::time::timeout(Duration::from_secs(30), client.send_text(&with, &line)).await {
                    Ok(Ok(ack)) => eprintln!("# sent #{}", ack.seq),
                    Ok(Err(e)) => eprintln!("# not sent: {e}"),
                    Err(_) => eprintln!("# not acknowledged in 30 s (it will be retried)"),
                }
            }
            event = events.next() => match event {
                Some(Event::Message(m)) if m.conversation_id == conversation => print_message(&m),
                Some(Event::Message(m)) => eprintln!("# new message in {} from {}", m.conversation_id, m.sender_id),
                Some(Event::Disconnected { reason }) => eprintln!("# disconnected: {reason}; reconnecting"),
                Some(Event::Connected { resumed: true, .. }) => eprintln!("# reconnected"),
                Some(Event::Connected { .. }) => {}
                Some(Event::Closed { reason, message }) => bail!("closed by server: {}: {message}", reason.as_str_name()),
                None => break,
            },
        }
    }
    client.close().await;
    Ok(())
}
