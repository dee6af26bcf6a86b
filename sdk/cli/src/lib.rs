//! `imctl`: mint tokens, send, tail, chat, history; groups, presence, live rooms; the HTTP API and the plugin admin API.
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
    /// Groups: create, join, invite, leave, kick, roles, ownership, members, send.
    Group {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        action: GroupAction,
    },
    /// Watch users come online and go offline (until interrupted).
    Presence {
        #[command(flatten)]
        conn: ConnArgs,
        /// The users to watch.
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Join a live room: each line typed is sent to it; its messages are printed.
    Room {
        #[command(flatten)]
        conn: ConnArgs,
        /// The room.
        #[arg(long)]
        room: String,
    },
    /// Call the HTTP API for business back-ends and print its JSON answer, e.g.
    /// `imctl api GET /v1/online` or `imctl api POST /v1/messages/broadcast '{"text":"hi"}'`.
    Api {
        /// The API's address.
        #[arg(long, env = "IM_API", default_value = "http://127.0.0.1:7181")]
        api: String,
        /// The API key (default: <data-dir>/api-key).
        #[arg(long, env = "IM_API_KEY")]
        api_key: Option<String>,
        /// The server's data directory, to read the API key from.
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
        /// GET, POST, PUT or DELETE.
        method: String,
        /// The path, e.g. /v1/users/alice.
        path: String,
        /// A JSON request body.
        body: Option<String>,
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
enum GroupAction {
    /// Create a group owned by you and print its id.
    Create {
        #[arg(long)]
        name: String,
        /// The group id (default: chosen by the server).
        #[arg(long, default_value = "")]
        id: String,
        /// Initial members.
        members: Vec<String>,
    },
    Join {
        group: String,
    },
    Leave {
        group: String,
    },
    Invite {
        group: String,
        #[arg(required = true)]
        users: Vec<String>,
    },
    Kick {
        group: String,
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Make a member an admin or a plain member.
    Role {
        group: String,
        user: String,
        #[arg(value_parser = ["admin", "member"])]
        role: String,
    },
    /// Hand ownership to a member.
    Transfer {
        group: String,
        to: String,
    },
    /// List a group's members.
    Members {
        group: String,
    },
    /// List your groups.
    List,
    /// Send a message to a group.
    Send {
        group: String,
        text: String,
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

/// Runs the command line given to the process and gives its exit code, printing a
/// failure on one line with its causes and no stack trace: a refused request is the
/// server's answer, not a crash of the tool.
pub fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("Error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
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
                    other => print_event(&other),
                }
            }
        }
        Command::Chat { conn, with } => chat(conn, with).await?,
        Command::Group { conn, action } => group_command(conn, action).await?,
        Command::Presence { conn, users } => presence_command(conn, users).await?,
        Command::Room { conn, room } => room_command(conn, room).await?,
        Command::Api {
            api,
            api_key,
            data_dir,
            method,
            path,
            body,
        } => api_command(api, api_key, data_dir, method, path, body).await?,
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
    // Recent history is printed first, then the stream's messages after it. The stream
    // resumes from the device's cursor, not from the latest message: with `Latest`, a
    // message stored while the client reads its conversation list can count as history
    // (the SDK lets a push lower that floor, but a sync page that came first cannot),
    // although this history may have been read before it came.
    let (client, mut events) = conn.connect(Resume::DeviceCursor).await?;
    let conversation = im_client::ids::direct_conversation_id(client.user_id(), &with);
    eprintln!(
        "# chatting with {with} as {}; type a line and press enter, Ctrl-D to quit",
        client.user_id()
    );
    let history = client.history(&conversation, 0, 10).await?;
    for m in history.messages.iter().rev() {
        print_message(m);
    }
    // The stream may still carry what history showed (the device's stored cursor can lag
    // behind its acks): each message is printed once.
    let mut shown = history.messages.iter().map(|m| m.seq).max().unwrap_or(0);
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
                Some(Event::Message(m)) if m.conversation_id == conversation => {
                    if m.seq > shown {
                        shown = m.seq;
                        print_message(&m);
                    }
                }
                Some(Event::Message(m)) => eprintln!("# new message in {} from {}", m.conversation_id, m.sender_id),
                Some(Event::Disconnected { reason }) => eprintln!("# disconnected: {reason}; reconnecting"),
                Some(Event::Connected { resumed: true, .. }) => eprintln!("# reconnected"),
                Some(Event::Connected { .. }) => {}
                Some(Event::Closed { reason, message }) => bail!("closed by server: {}: {message}", reason.as_str_name()),
                Some(other) => print_event(&other),
                None => break,
            },
        }
    }
    client.close().await;
    Ok(())
}

/// Prints a presence change, room message or broadcast.
fn print_event(event: &Event) {
    match event {
        Event::Presence(state) => println!(
            "[presence] {} {} ({} devices)",
            state.user_id,
            if state.online { "online" } else { "offline" },
            state.devices
        ),
        Event::RoomMessage(m) => println!(
            "[room {} #{}] {}: {}",
            m.room_id,
            m.room_seq,
            m.sender_id,
            String::from_utf8_lossy(&m.body)
        ),
        Event::Broadcast(b) => println!("[broadcast] {}", String::from_utf8_lossy(&b.body)),
        Event::Message(m) => print_message(m),
        Event::Connected { .. } | Event::Disconnected { .. } | Event::Closed { .. } => {}
    }
}

async fn group_command(conn: ConnArgs, action: GroupAction) -> anyhow::Result<()> {
    use v1::group_request::Action;
    let (client, _events) = conn.connect(Resume::Latest).await?;
    let users = |list: Vec<String>| v1::GroupUsers { user_ids: list };
    let change = |group_id: String, action: Action| v1::GroupRequest {
        group_id,
        action: Some(action),
    };
    let request = match action {
        GroupAction::Create { name, id, members } => {
            change(id, Action::Create(v1::CreateGroup { name, members }))
        }
        GroupAction::Join { group } => change(group, Action::Join(v1::JoinGroup {})),
        GroupAction::Leave { group } => change(group, Action::Leave(v1::LeaveGroup {})),
        GroupAction::Invite { group, users: list } => change(group, Action::Invite(users(list))),
        GroupAction::Kick { group, users: list } => change(group, Action::Kick(users(list))),
        GroupAction::Role { group, user, role } => {
            let role = if role == "admin" {
                v1::GroupRole::Admin
            } else {
                v1::GroupRole::Member
            };
            change(
                group,
                Action::SetRole(v1::RoleChange {
                    user_id: user,
                    role: role as i32,
                }),
            )
        }
        GroupAction::Transfer { group, to } => change(group, Action::TransferTo(to)),
        GroupAction::Members { group } => {
            let mut after = String::new();
            loop {
                let page = client.group_members(&group, &after, 500).await?;
                for m in &page.members {
                    println!("{}	{}", m.user_id, m.role().as_str_name());
                }
                match page.members.last() {
                    Some(last) if page.has_more => after = last.user_id.clone(),
                    _ => break,
                }
            }
            client.close().await;
            return Ok(());
        }
        GroupAction::List => {
            for g in client.groups().await? {
                println!(
                    "{}	{}	owner={}	members={}",
                    g.group_id, g.name, g.owner_id, g.member_count
                );
            }
            client.close().await;
            return Ok(());
        }
        GroupAction::Send { group, text } => {
            let ack = client
                .send_to_group(&group, text.into_bytes().into(), "text/plain")
                .await?;
            println!("sent {} seq={}", ack.conversation_id, ack.seq);
            client.close().await;
            return Ok(());
        }
    };
    let answer = client.group_request(request).await?;
    if let Some(g) = answer.group {
        println!(
            "{}	{}	owner={}	members={}",
            g.group_id, g.name, g.owner_id, g.member_count
        );
    }
    client.close().await;
    Ok(())
}

async fn presence_command(conn: ConnArgs, users: Vec<String>) -> anyhow::Result<()> {
    let (client, mut events) = conn.connect(Resume::Latest).await?;
    let watched: Vec<&str> = users.iter().map(String::as_str).collect();
    let answer = client.watch_presence(&watched, &[]).await?;
    for state in answer.states {
        print_event(&Event::Presence(state));
    }
    while let Some(event) = events.next().await {
        match event {
            Event::Presence(_) => print_event(&event),
            Event::Closed { reason, message } => {
                bail!("closed by server: {}: {message}", reason.as_str_name())
            }
            _ => {}
        }
    }
    Ok(())
}

async fn room_command(conn: ConnArgs, room: String) -> anyhow::Result<()> {
    let (client, mut events) = conn.connect(Resume::Latest).await?;
    let joined = client.join_room(&room).await?;
    eprintln!(
        "# in room {room} with {} connections; type a line to send",
        joined.members
    );
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                if line.trim().is_empty() {
                    continue;
                }
                match client.send_to_room(&room, line.into_bytes().into(), "text/plain").await {
                    Ok(ack) => eprintln!("# handed to {}", ack.delivered),
                    Err(e) => eprintln!("# not sent: {e}"),
                }
            }
            event = events.next() => match event {
                Some(Event::Closed { reason, message }) => bail!("closed by server: {}: {message}", reason.as_str_name()),
                Some(event @ (Event::RoomMessage(_) | Event::Broadcast(_))) => print_event(&event),
                Some(_) => {}
                None => break,
            },
        }
    }
    client.close().await;
    Ok(())
}

async fn api_command(
    api: String,
    key: Option<String>,
    data_dir: PathBuf,
    method: String,
    path: String,
    body: Option<String>,
) -> anyhow::Result<()> {
    let key = match key {
        Some(key) => key,
        None => {
            let file = data_dir.join("api-key");
            std::fs::read_to_string(&file)
                .with_context(|| {
                    format!("reading {} (pass --api-key or --data-dir)", file.display())
                })?
                .trim()
                .to_owned()
        }
    };
    let method: reqwest::Method = method
        .to_uppercase()
        .parse()
        .with_context(|| format!("{method:?} is not an HTTP method"))?;
    let url = format!("{}{path}", api.trim_end_matches('/'));
    let mut request = reqwest::Client::new()
        .request(method, &url)
        .bearer_auth(key);
    if let Some(body) = body {
        let json: serde_json::Value =
            serde_json::from_str(&body).context("the body is not JSON")?;
        request = request.json(&json);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("calling {url}"))?;
    let status = response.status();
    let text = response.text().await?;
    let shown = match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(json) => serde_json::to_string_pretty(&json)?,
        Err(_) => text,
    };
    if !status.is_success() {
        bail!("API answered {status}: {shown}");
    }
    println!("{shown}");
    Ok(())
}
