//! The `imctl` CLI and the server binary's configuration, run as real processes.

use std::process::Stdio;
use std::time::Duration;

use im_e2e::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

const SERVER: &str = env!("CARGO_BIN_EXE_im-e2e-server");
const IMCTL: &str = env!("CARGO_BIN_EXE_im-e2e-imctl");
const WAIT: Duration = Duration::from_secs(30);

fn imctl(server: &ServerProcess, args: &[&str]) -> Command {
    let mut command = Command::new(IMCTL);
    command
        .args(args)
        .arg("--data-dir")
        .arg(&server.data_dir)
        .env_remove("IM_SERVER")
        .env_remove("IM_TOKEN");
    command
}

/// The chat's next line of output; if none comes within [`WAIT`], fails with the chat's
/// stderr, which tells how far it got (its sends and their acks, reconnections).
async fn next_chat_line(
    chat: &mut tokio::process::Child,
    stdout: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    awaited: &str,
) -> String {
    if let Ok(line) = tokio::time::timeout(WAIT, stdout.next_line()).await {
        return line.unwrap().expect("the chat ended early");
    }
    chat.start_kill().unwrap();
    let mut said = String::new();
    let _ =
        tokio::io::AsyncReadExt::read_to_string(&mut chat.stderr.take().unwrap(), &mut said).await;
    panic!("the chat printed no {awaited} within {WAIT:?}; its stderr: {said}");
}

async fn output(mut command: Command) -> String {
    let out = tokio::time::timeout(WAIT, command.output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "imctl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imctl_sends_chats_tails_and_reads_history() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(SERVER, data.path(), None);
    let tcp = server.endpoints.url(Transport::Tcp);
    let ws = server.endpoints.url(Transport::WebSocket);
    let quic = server.endpoints.url(Transport::Quic);

    // A minted token logs in.
    let token = output(imctl(&server, &["token", "--user", "alice"])).await;
    let mut config = server
        .endpoints
        .client_config(Transport::Tcp, "alice", "phone");
    config.token = token.trim().to_owned();
    let (_alice, mut alice_events) = im_client::Client::connect(config).await.unwrap();

    // One message.
    let sent = output(imctl(
        &server,
        &[
            "send", "--server", &tcp, "--user", "bob", "--to", "alice", "hi alice",
        ],
    ))
    .await;
    assert!(sent.starts_with("sent u:alice:bob seq=1 "), "{sent}");
    assert_eq!(
        receive(&mut alice_events, 1, WAIT).await[0].body,
        text("hi alice")
    );

    // Interactive chat over WebSocket: a typed line is sent; an incoming message is printed.
    let mut chat = imctl(
        &server,
        &["chat", "--server", &ws, "--user", "bob", "--with", "alice"],
    );
    let mut chat = chat
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = chat.stdin.take().unwrap();
    let mut stdout = BufReader::new(chat.stdout.take().unwrap()).lines();
    // The chat first shows recent history.
    let first = next_chat_line(&mut chat, &mut stdout, "history").await;
    assert_eq!(first, "[u:alice:bob #1] bob: hi alice");
    stdin.write_all(b"typed in chat\n").await.unwrap();
    assert_eq!(
        receive(&mut alice_events, 1, WAIT).await[0].body,
        text("typed in chat")
    );
    _alice.send_text("bob", "reply to chat").await.unwrap();
    let printed = next_chat_line(&mut chat, &mut stdout, "alice's reply").await;
    assert_eq!(printed, "[u:alice:bob #3] alice: reply to chat");
    drop(stdin);
    let status = tokio::time::timeout(WAIT, chat.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());

    // History over QUIC (trusting the server's generated certificate from the data dir).
    let history = output(imctl(
        &server,
        &[
            "history", "--server", &quic, "--user", "alice", "--with", "bob",
        ],
    ))
    .await;
    assert_eq!(
        history.lines().collect::<Vec<_>>(),
        vec![
            "[u:alice:bob #1] bob: hi alice",
            "[u:alice:bob #2] bob: typed in chat",
            "[u:alice:bob #3] alice: reply to chat"
        ]
    );
    let list = output(imctl(
        &server,
        &["conversations", "--server", &tcp, "--user", "alice"],
    ))
    .await;
    assert!(
        list.starts_with("u:alice:bob\twith bob\tlast_seq=3\tunread=0"),
        "{list}"
    );

    // Tail from the start prints everything stored, then what arrives.
    let mut tail = imctl(
        &server,
        &[
            "tail",
            "--server",
            &tcp,
            "--user",
            "alice",
            "--device",
            "tail",
            "--from-start",
        ],
    );
    let mut tail = tail
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(tail.stdout.take().unwrap()).lines();
    for seq in 1..=3 {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(line.starts_with(&format!("[u:alice:bob #{seq}]")), "{line}");
    }
    output(imctl(
        &server,
        &[
            "send", "--server", &tcp, "--user", "bob", "--to", "alice", "live",
        ],
    ))
    .await;
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(line, "[u:alice:bob #4] bob: live");
    tail.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imctl_manages_plugins_through_the_admin_api() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("manifest.toml");
    let wasm = dir.path().join("plugin.wasm");
    std::fs::write(&wasm, component("tag_filter.wasm")).unwrap();
    let admin = format!("http://{}", server.node.admin.unwrap());
    let run = |args: Vec<String>| {
        let mut command = Command::new(IMCTL);
        command
            .arg("plugin")
            .args(["--admin", &admin, "--admin-token", &server.node.admin_token])
            .args(args);
        command
    };
    std::fs::write(
        &manifest,
        "id = \"tagger\"\nversion = \"1.0.0\"\nhooks = [\"message-filter\"]\n",
    )
    .unwrap();
    let install = vec![
        "install".into(),
        "--manifest".into(),
        manifest.display().to_string(),
        "--wasm".into(),
        wasm.display().to_string(),
    ];
    let installed = output(run(install.clone())).await;
    assert!(installed.contains("\"version\": \"1.0.0\""), "{installed}");
    std::fs::write(
        &manifest,
        "id = \"tagger\"\nversion = \"1.1.0\"\nhooks = [\"message-filter\"]\n",
    )
    .unwrap();
    assert!(
        output(run(install))
            .await
            .contains("\"version\": \"1.1.0\"")
    );
    assert!(
        output(run(vec!["disable".into(), "tagger".into()]))
            .await
            .contains("\"enabled\": false")
    );
    assert!(
        output(run(vec!["enable".into(), "tagger".into()]))
            .await
            .contains("\"enabled\": true")
    );
    let listed = output(run(vec!["list".into()])).await;
    assert!(listed.contains("\"id\": \"tagger\""), "{listed}");
    assert_eq!(
        output(run(vec!["remove".into(), "tagger".into()]))
            .await
            .trim(),
        "ok"
    );
    // Errors come back as a failing exit with the API's answer, and no stack trace even
    // where backtraces are asked for.
    let failed = run(vec!["remove".into(), "tagger".into()])
        .env("RUST_BACKTRACE", "1")
        .output()
        .await
        .unwrap();
    assert!(!failed.status.success());
    let said = String::from_utf8_lossy(&failed.stderr);
    assert!(said.contains("not_found"), "{said}");
    assert!(!said.to_lowercase().contains("backtrace"), "{said}");
    let mut wrong = Command::new(IMCTL);
    wrong.arg("plugin").args([
        "--admin",
        &admin,
        "--admin-token",
        "wrong-token-wrong-token",
        "list",
    ]);
    let wrong = wrong.output().await.unwrap();
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("401"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_configuration_from_file_environment_and_flags() {
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("im.toml");
    std::fs::write(
        &file,
        "[websocket]\nenabled = false\n[tcp]\nlisten = \"127.0.0.1:1\"\n",
    )
    .unwrap();
    // The file disables WebSocket and names a TCP port; the environment overrides that port;
    // a flag sets the QUIC address.
    let mut child = Command::new(SERVER)
        .arg("--config")
        .arg(&file)
        .arg("--data-dir")
        .arg(data.path())
        .args([
            "--quic",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
        ])
        .env("IM_TCP__LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        ready.starts_with("im-server ready tcp=127.0.0.1:"),
        "{ready}"
    );
    assert!(!ready.contains("tcp=127.0.0.1:1 "), "{ready}");
    assert!(ready.contains(" ws=off "), "{ready}");
    assert!(ready.contains(" quic=127.0.0.1:"), "{ready}");
    child.kill().await.unwrap();

    // Bad configuration stops the server at start with a clear message and exit code 2.
    for (contents, expected) in [
        ("[limits]\nmax_frame_bytes = 10\n", "max_frame_bytes"),
        ("[tcp]\nlisen = \"x\"\n", "lisen"),
        ("data_dir = [\n", "TOML"),
    ] {
        std::fs::write(&file, contents).unwrap();
        let out = Command::new(SERVER)
            .arg("--config")
            .arg(&file)
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{contents}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{contents}: {stderr}");
    }
}

/// The configuration `scripts/serve.sh` starts with authenticates through the auth-jwt
/// plugin, whose secret the first start generates into the data directory (not the
/// manifest), and `imctl` mints tokens the plugin accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_configuration_authenticates_with_jwts() {
    let data = tempfile::tempdir().unwrap();
    let config = repository_root().join("examples/server.toml");
    let server = ServerProcess::start_configured(SERVER, data.path(), None, Some(&config));
    let secret = std::fs::read_to_string(data.path().join("jwt-secret")).unwrap();
    assert_eq!(secret.trim().len(), 64, "a fresh random secret: {secret:?}");
    let installed =
        std::fs::read_to_string(data.path().join("plugins/auth-jwt/manifest.toml")).unwrap();
    assert!(installed.contains(secret.trim()), "{installed}");
    let shipped =
        std::fs::read_to_string(repository_root().join("plugins/auth-jwt/manifest.toml")).unwrap();
    assert!(!shipped.contains(secret.trim()));

    let connect = async |token: &str| {
        let mut config = server
            .endpoints
            .client_config(Transport::Tcp, "alice", "phone");
        config.token = token.to_owned();
        im_client::Client::connect(config).await
    };
    // `imctl token` mints a JWT (three parts) that the plugin accepts.
    let jwt = output(imctl(&server, &["token", "--user", "alice"])).await;
    assert_eq!(jwt.trim().split('.').count(), 3, "{jwt}");
    let (alice, _events) = connect(jwt.trim()).await.unwrap();
    assert_eq!(alice.user_id(), "alice");
    // A development token is no longer accepted.
    let dev = output(imctl(
        &server,
        &["token", "--token-kind", "dev", "--user", "alice"],
    ))
    .await;
    match connect(dev.trim()).await {
        Err(im_client::ClientError::Closed { reason, message }) => {
            assert_eq!(reason, im_proto::v1::CloseReason::AuthFailed);
            assert!(message.contains("invalid token"), "{message}");
        }
        other => panic!("a development token logged in: {:?}", other.map(|_| ())),
    }
    // Other commands mint JWTs on their own.
    let sent = output(imctl(
        &server,
        &[
            "send",
            "--server",
            &server.endpoints.url(Transport::Tcp),
            "--user",
            "bob",
            "--to",
            "alice",
            "hi",
        ],
    ))
    .await;
    assert!(sent.starts_with("sent u:alice:bob seq=1 "), "{sent}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imctl_manages_groups_watches_presence_and_calls_the_http_api() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(SERVER, data.path(), None);
    let tcp = server.endpoints.url(Transport::Tcp);
    let api = format!("http://{}", server.api);
    let dir = server.data_dir.to_str().unwrap().to_owned();
    let api_call = |args: &[&str]| {
        let mut command = Command::new(IMCTL);
        command
            .args(["api", "--api", &api, "--data-dir", &dir])
            .args(args);
        command
    };
    let group_cmd = |user: &str, args: &[&str]| {
        let mut command = Command::new(IMCTL);
        command
            .args([
                "group",
                "--data-dir",
                &dir,
                "--server",
                &tcp,
                "--user",
                user,
            ])
            .args(args)
            .env_remove("IM_SERVER")
            .env_remove("IM_TOKEN");
        command
    };

    // Users made through the HTTP API (the key is read from the data directory).
    for user in ["alice", "bob"] {
        let made = output(api_call(&["PUT", &format!("/v1/users/{user}")])).await;
        let made: serde_json::Value = serde_json::from_str(&made).unwrap();
        assert_eq!(made["user_id"], user);
    }
    let missing = api_call(&["GET", "/v1/users/nobody"])
        .output()
        .await
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("unknown_user"));

    // A group made, written to and listed from the command line.
    let created = output(group_cmd(
        "alice",
        &["create", "--name", "Team", "--id", "team", "bob"],
    ))
    .await;
    assert_eq!(created.trim(), "team\tTeam\towner=alice\tmembers=2");
    let sent = output(group_cmd("alice", &["send", "team", "hello team"])).await;
    assert_eq!(sent.trim(), "sent g:team seq=2");
    let members = output(group_cmd("bob", &["members", "team"])).await;
    assert_eq!(
        members.lines().collect::<Vec<_>>(),
        ["alice\tGROUP_ROLE_OWNER", "bob\tGROUP_ROLE_MEMBER"]
    );
    let mine = output(group_cmd("bob", &["list"])).await;
    assert!(
        mine.starts_with("team\tTeam\towner=alice\tmembers=2"),
        "{mine}"
    );
    let history = output(api_call(&["GET", "/v1/conversations/g:team/messages"])).await;
    let history: serde_json::Value = serde_json::from_str(&history).unwrap();
    assert_eq!(history["messages"][0]["text"], "hello team");
    let refused = group_cmd("bob", &["kick", "team", "alice"])
        .output()
        .await
        .unwrap();
    assert!(!refused.status.success(), "a member cannot kick the owner");

    // Presence: the watcher prints bob's state, then his coming online.
    let mut watcher = Command::new(IMCTL)
        .args([
            "presence",
            "--data-dir",
            &dir,
            "--server",
            &tcp,
            "--user",
            "alice",
            "bob",
        ])
        .env_remove("IM_SERVER")
        .env_remove("IM_TOKEN")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watcher.stdout.take().unwrap()).lines();
    let mut next_line = async || {
        tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("imctl printed in time")
            .unwrap()
            .expect("imctl still runs")
    };
    assert_eq!(next_line().await, "[presence] bob offline (0 devices)");
    let (_bob, _events) = server
        .endpoints
        .client(Transport::Tcp, "bob", "phone")
        .await;
    assert_eq!(next_line().await, "[presence] bob online (1 devices)");
    watcher.kill().await.unwrap();
}
