//! The HTTP API for business back-ends, end to end: every endpoint, its effect on real
//! clients, the auth failures and bad input, and every response checked against the
//! OpenAPI document the server itself serves.

use std::collections::BTreeSet;
use std::time::Duration;

use im_client::{Event, v1};
use im_e2e::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

/// Calls the API and remembers each answer with the operation it came from, so every
/// answer can be validated against the served document at the end.
struct Recorder<'a> {
    server: &'a TestServer,
    seen: Vec<(String, String, ApiResponse)>,
}

impl<'a> Recorder<'a> {
    fn new(server: &'a TestServer) -> Self {
        Self {
            server,
            seen: Vec::new(),
        }
    }

    /// `template` is the documented path (e.g. `/v1/users/{user_id}`); `path` the real one.
    async fn call(
        &mut self,
        method: &str,
        template: &str,
        path: &str,
        body: Option<Value>,
        key: Option<&str>,
    ) -> ApiResponse {
        let default_key = self.server.node.api_keys[0].1.clone();
        let key = match key {
            Some("") => None,
            Some(key) => Some(key.to_owned()),
            None => Some(default_key),
        };
        let answer = api_call(
            self.server.node.api.unwrap(),
            method,
            path,
            body.as_ref(),
            key.as_deref(),
        )
        .await;
        self.seen
            .push((method.to_lowercase(), template.to_owned(), answer.clone()));
        answer
    }

    async fn ok(&mut self, method: &str, template: &str, path: &str, body: Option<Value>) -> Value {
        let answer = self.call(method, template, path, body, None).await;
        assert_eq!(answer.status, 200, "{method} {path}: {}", answer.text);
        answer.json
    }

    async fn fails(
        &mut self,
        method: &str,
        template: &str,
        path: &str,
        body: Option<Value>,
        status: u16,
        code: &str,
    ) {
        let answer = self.call(method, template, path, body, None).await;
        assert_eq!(
            (answer.status, answer.json["code"].as_str()),
            (status, Some(code)),
            "{method} {path}: {}",
            answer.text
        );
        assert!(
            answer.json["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
}

/// The seqs of a message page, in its order.
fn seqs_of(page: &Value) -> Vec<u64> {
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect()
}

fn message(event: Event) -> Option<v1::Message> {
    match event {
        Event::Message(m) => Some(m),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_works_and_matches_the_served_openapi_document() {
    let server = TestServer::start().await;
    let mut api = Recorder::new(&server);

    // -- operations, without a key
    for (template, expect) in [("/healthz", "ok"), ("/readyz", "ok")] {
        let answer = api.call("GET", template, template, None, Some("")).await;
        assert_eq!(
            (answer.status, answer.json["status"].as_str()),
            (200, Some(expect))
        );
    }
    let doc = api
        .call("GET", "/openapi.json", "/openapi.json", None, Some(""))
        .await
        .json;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));

    // -- authentication
    for key in ["", "not-the-key-not-the-key"] {
        let answer = api
            .call("GET", "/v1/online", "/v1/online", None, Some(key))
            .await;
        assert_eq!(
            (answer.status, answer.json["code"].as_str()),
            (401, Some("unauthorized"))
        );
    }
    let answer = api_call(server.node.api.unwrap(), "GET", "/v1/nowhere", None, None).await;
    assert_eq!(
        (answer.status, answer.json["code"].as_str()),
        (404, Some("not_found"))
    );
    let key = server.node.api_keys[0].1.clone();
    let answer = api_call(
        server.node.api.unwrap(),
        "DELETE",
        "/v1/online",
        None,
        Some(&key),
    )
    .await;
    assert_eq!(
        (answer.status, answer.json["code"].as_str()),
        (405, Some("method_not_allowed"))
    );

    // -- users
    for user in ["system", "alice", "bob", "carol"] {
        let view = api
            .ok(
                "PUT",
                "/v1/users/{user_id}",
                &format!("/v1/users/{user}"),
                None,
            )
            .await;
        assert_eq!(
            (view["user_id"].as_str(), view["online"].as_bool()),
            (Some(user), Some(false))
        );
    }
    api.fails(
        "PUT",
        "/v1/users/{user_id}",
        "/v1/users/bad%20id",
        None,
        400,
        "invalid_argument",
    )
    .await;
    api.fails(
        "GET",
        "/v1/users/{user_id}",
        "/v1/users/nobody",
        None,
        404,
        "unknown_user",
    )
    .await;
    let (alice, mut alice_events) = server.client(Transport::Tcp, "alice", "phone").await;
    let (bob, mut bob_events) = server.client(Transport::WebSocket, "bob", "laptop").await;
    let view = api
        .ok("GET", "/v1/users/{user_id}", "/v1/users/alice", None)
        .await;
    assert_eq!(view["online"], true);
    assert_eq!(
        view["devices"],
        json!([{"device_id": "phone", "transport": "tcp"}])
    );
    let page = api.ok("GET", "/v1/users", "/v1/users?limit=2", None).await;
    assert_eq!(page["users"].as_array().unwrap().len(), 2);
    assert_eq!(page["has_more"], true);
    let page = api
        .ok("GET", "/v1/users", "/v1/users?after=bob&limit=10", None)
        .await;
    let ids: Vec<&str> = page["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["carol", "system"]);
    api.fails(
        "GET",
        "/v1/users",
        "/v1/users?limit=0",
        None,
        400,
        "invalid_argument",
    )
    .await;
    api.fails(
        "GET",
        "/v1/users",
        "/v1/users?limit=abc",
        None,
        400,
        "bad_request",
    )
    .await;

    // -- push to users: stored, delivered, idempotent
    let push = json!({"sender_id": "system", "user_ids": ["alice", "bob"], "text": "welcome", "client_msg_id": "w-1"});
    let stored = api
        .ok(
            "POST",
            "/v1/messages/users",
            "/v1/messages/users",
            Some(push.clone()),
        )
        .await;
    let results = stored["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(
        (
            results[0]["target"].as_str(),
            results[0]["conversation_id"].as_str()
        ),
        (Some("alice"), Some("u:alice:system"))
    );
    assert_eq!(
        (
            results[0]["seq"].as_u64(),
            results[0]["duplicate"].as_bool()
        ),
        (Some(1), Some(false))
    );
    for events in [&mut alice_events, &mut bob_events] {
        let m = next_event(events, WAIT, "the pushed message", message).await;
        assert_eq!(
            (m.sender_id.as_str(), m.body.as_ref()),
            ("system", &b"welcome"[..])
        );
        assert_eq!(m.content_type, "text/plain");
    }
    let again = api
        .ok(
            "POST",
            "/v1/messages/users",
            "/v1/messages/users",
            Some(push),
        )
        .await;
    assert_eq!(again["results"][1]["duplicate"], true);
    assert_eq!(
        again["results"][1]["server_msg_id"],
        stored["results"][1]["server_msg_id"]
    );
    let binary = json!({"sender_id": "system", "user_ids": ["alice"], "body_base64": "AAEC", "content_type": "application/x-test"});
    let stored_binary = api
        .ok(
            "POST",
            "/v1/messages/users",
            "/v1/messages/users",
            Some(binary),
        )
        .await;
    assert_eq!(stored_binary["results"][0]["seq"], 2);
    let m = next_event(&mut alice_events, WAIT, "the binary push", message).await;
    assert_eq!(
        (m.body.as_ref(), m.content_type.as_str()),
        (&[0u8, 1, 2][..], "application/x-test")
    );

    // Bad pushes store nothing.
    let bad_pushes = [
        (
            json!({"sender_id": "system", "user_ids": ["alice", "nobody"], "text": "x"}),
            404,
            "unknown_user",
        ),
        (
            json!({"sender_id": "nobody", "user_ids": ["alice"], "text": "x"}),
            404,
            "unknown_user",
        ),
        (
            json!({"sender_id": "system", "user_ids": [], "text": "x"}),
            400,
            "invalid_argument",
        ),
        (
            json!({"sender_id": "system", "user_ids": ["alice", "alice"], "text": "x"}),
            400,
            "invalid_argument",
        ),
        (
            json!({"sender_id": "system", "user_ids": ["alice"], "text": "x", "body_base64": "AA=="}),
            400,
            "invalid_argument",
        ),
        (
            json!({"sender_id": "system", "user_ids": ["alice"]}),
            400,
            "invalid_argument",
        ),
        (
            json!({"sender_id": "system", "user_ids": ["alice"], "body_base64": "***"}),
            400,
            "invalid_argument",
        ),
        (
            json!({"sender_id": "system", "user_ids": ["alice"], "text": ""}),
            400,
            "invalid_argument",
        ),
        (
            json!({"sender_id": "system", "user_ids": ["alice"], "text": "x".repeat(40_000)}),
            413,
            "body_too_large",
        ),
        (
            json!({"sender_id": "system", "user_ids": (0..1001).map(|i| format!("u{i}")).collect::<Vec<_>>(), "text": "x"}),
            400,
            "invalid_argument",
        ),
        (
            json!({"sender_id": "system", "user_ids": ["alice"], "text": "x", "extra": 1}),
            400,
            "bad_request",
        ),
        (
            json!({"user_ids": ["alice"], "text": "x"}),
            400,
            "bad_request",
        ),
    ];
    for (body, status, code) in bad_pushes {
        api.fails(
            "POST",
            "/v1/messages/users",
            "/v1/messages/users",
            Some(body),
            status,
            code,
        )
        .await;
    }
    let malformed = reqwest::Client::new()
        .post(format!(
            "http://{}/v1/messages/users",
            server.node.api.unwrap()
        ))
        .bearer_auth(&server.node.api_keys[0].1)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status().as_u16(), 400);
    let body: Value = malformed.json().await.unwrap();
    assert_eq!(body["code"], "bad_request");
    let page = api
        .ok(
            "GET",
            "/v1/conversations/{conversation_id}/messages",
            "/v1/conversations/u:alice:system/messages",
            None,
        )
        .await;
    assert_eq!(page["last_seq"], 2, "refused pushes stored nothing");

    // -- groups
    let created = api
        .ok(
            "POST",
            "/v1/groups",
            "/v1/groups",
            Some(
                json!({"group_id": "ops", "name": "Ops", "owner_id": "alice", "members": ["bob"]}),
            ),
        )
        .await;
    assert_eq!(created["group"]["owner_id"], "alice");
    assert_eq!(created["group"]["member_count"], 2);
    assert_eq!(created["event"]["seq"], 1);
    assert_eq!(created["event"]["sender_id"], "api@default");
    let event: Value = serde_json::from_str(created["event"]["text"].as_str().unwrap()).unwrap();
    assert_eq!(
        (event["event"].as_str(), event["actor"].as_str()),
        (Some("create"), Some("api@default"))
    );
    let m = next_event(&mut bob_events, WAIT, "the create announcement", message).await;
    assert_eq!((m.conversation_id.as_str(), m.seq), ("g:ops", 1));
    let group_errors = [
        (
            json!({"group_id": "ops", "name": "Again", "owner_id": "alice"}),
            409,
            "conflict",
        ),
        (
            json!({"name": "X", "owner_id": "nobody"}),
            404,
            "unknown_user",
        ),
        (
            json!({"name": "X", "owner_id": "alice", "members": ["nobody"]}),
            404,
            "unknown_user",
        ),
        (
            json!({"name": "", "owner_id": "alice"}),
            400,
            "invalid_argument",
        ),
        (
            json!({"name": "X", "owner_id": "bad id"}),
            400,
            "invalid_argument",
        ),
    ];
    for (body, status, code) in group_errors {
        api.fails("POST", "/v1/groups", "/v1/groups", Some(body), status, code)
            .await;
    }
    let group = api
        .ok("GET", "/v1/groups/{group_id}", "/v1/groups/ops", None)
        .await;
    assert_eq!(group["name"], "Ops");
    api.fails(
        "GET",
        "/v1/groups/{group_id}",
        "/v1/groups/nope",
        None,
        404,
        "unknown_group",
    )
    .await;
    let added = api
        .ok(
            "POST",
            "/v1/groups/{group_id}/members",
            "/v1/groups/ops/members",
            Some(json!({"user_ids": ["carol"]})),
        )
        .await;
    assert_eq!(added["group"]["member_count"], 3);
    api.fails(
        "POST",
        "/v1/groups/{group_id}/members",
        "/v1/groups/ops/members",
        Some(json!({"user_ids": ["carol"]})),
        409,
        "conflict",
    )
    .await;
    api.fails(
        "POST",
        "/v1/groups/{group_id}/members",
        "/v1/groups/nope/members",
        Some(json!({"user_ids": ["carol"]})),
        404,
        "unknown_group",
    )
    .await;
    let members = api
        .ok(
            "GET",
            "/v1/groups/{group_id}/members",
            "/v1/groups/ops/members?limit=2",
            None,
        )
        .await;
    assert_eq!(
        members["members"],
        json!([
            {"user_id": "alice", "role": "owner", "joined_ms": members["members"][0]["joined_ms"]},
            {"user_id": "bob", "role": "member", "joined_ms": members["members"][1]["joined_ms"]},
        ])
    );
    assert_eq!(members["has_more"], true);
    let changed = api
        .ok(
            "PUT",
            "/v1/groups/{group_id}/members/{user_id}/role",
            "/v1/groups/ops/members/bob/role",
            Some(json!({"role": "admin"})),
        )
        .await;
    assert_eq!(changed["event"]["seq"], 3);
    api.fails(
        "PUT",
        "/v1/groups/{group_id}/members/{user_id}/role",
        "/v1/groups/ops/members/bob/role",
        Some(json!({"role": "king"})),
        400,
        "invalid_argument",
    )
    .await;
    let moved = api
        .ok(
            "PUT",
            "/v1/groups/{group_id}/owner",
            "/v1/groups/ops/owner",
            Some(json!({"user_id": "bob"})),
        )
        .await;
    assert_eq!(moved["group"]["owner_id"], "bob");
    api.fails(
        "PUT",
        "/v1/groups/{group_id}/owner",
        "/v1/groups/ops/owner",
        Some(json!({"user_id": "system"})),
        409,
        "conflict",
    )
    .await;
    let removed = api
        .ok(
            "DELETE",
            "/v1/groups/{group_id}/members/{user_id}",
            "/v1/groups/ops/members/carol",
            None,
        )
        .await;
    assert_eq!(removed["group"]["member_count"], 2);
    api.fails(
        "DELETE",
        "/v1/groups/{group_id}/members/{user_id}",
        "/v1/groups/ops/members/carol",
        None,
        409,
        "conflict",
    )
    .await;
    api.fails(
        "DELETE",
        "/v1/groups/{group_id}/members/{user_id}",
        "/v1/groups/ops/members/bob",
        None,
        409,
        "conflict",
    )
    .await;

    // -- push to a group: stored once, delivered to members in seq order
    let pushed = api
        .ok("POST", "/v1/messages/group", "/v1/messages/group", Some(json!({"sender_id": "system", "group_id": "ops", "text": "deploy done", "client_msg_id": "g-1"})))
        .await;
    assert_eq!(
        (pushed["conversation_id"].as_str(), pushed["seq"].as_u64()),
        (Some("g:ops"), Some(6))
    );
    for events in [&mut alice_events, &mut bob_events] {
        let mut last = None;
        while last.as_ref().is_none_or(|m: &v1::Message| m.seq < 6) {
            let m = next_event(events, WAIT, "group traffic", message).await;
            if m.conversation_id == "g:ops" {
                last = Some(m);
            }
        }
        assert_eq!(last.unwrap().body.as_ref(), b"deploy done");
    }
    let again = api
        .ok("POST", "/v1/messages/group", "/v1/messages/group", Some(json!({"sender_id": "system", "group_id": "ops", "text": "deploy done", "client_msg_id": "g-1"})))
        .await;
    assert_eq!(
        (again["seq"].as_u64(), again["duplicate"].as_bool()),
        (Some(6), Some(true))
    );
    // The same client id for another group (or a user) is another message.
    api.ok(
        "POST",
        "/v1/groups",
        "/v1/groups",
        Some(json!({"group_id": "ops2", "name": "Ops 2", "owner_id": "alice"})),
    )
    .await;
    let other = api
        .ok("POST", "/v1/messages/group", "/v1/messages/group", Some(json!({"sender_id": "system", "group_id": "ops2", "text": "deploy done", "client_msg_id": "g-1"})))
        .await;
    assert_eq!(
        (
            other["conversation_id"].as_str(),
            other["duplicate"].as_bool()
        ),
        (Some("g:ops2"), Some(false))
    );
    api.fails(
        "POST",
        "/v1/messages/group",
        "/v1/messages/group",
        Some(json!({"sender_id": "system", "group_id": "nope", "text": "x"})),
        404,
        "unknown_group",
    )
    .await;

    // -- history
    let newest = api
        .ok(
            "GET",
            "/v1/conversations/{conversation_id}/messages",
            "/v1/conversations/g:ops/messages?limit=2",
            None,
        )
        .await;
    let seqs = seqs_of(&newest);
    assert_eq!(
        (
            seqs,
            newest["has_more"].as_bool(),
            newest["last_seq"].as_u64()
        ),
        (vec![6, 5], Some(true), Some(6))
    );
    let oldest = api
        .ok(
            "GET",
            "/v1/conversations/{conversation_id}/messages",
            "/v1/conversations/g:ops/messages?after_seq=4",
            None,
        )
        .await;
    let seqs = seqs_of(&oldest);
    assert_eq!(seqs, [5, 6]);
    assert_eq!(oldest["messages"][1]["text"], "deploy done");
    api.fails(
        "GET",
        "/v1/conversations/{conversation_id}/messages",
        "/v1/conversations/g:ops/messages?after_seq=1&before_seq=3",
        None,
        400,
        "invalid_argument",
    )
    .await;
    api.fails(
        "GET",
        "/v1/conversations/{conversation_id}/messages",
        "/v1/conversations/u:system:alice/messages",
        None,
        400,
        "invalid_argument",
    )
    .await;
    api.fails(
        "GET",
        "/v1/conversations/{conversation_id}/messages",
        "/v1/conversations/x/messages",
        None,
        400,
        "invalid_argument",
    )
    .await;
    api.fails(
        "GET",
        "/v1/conversations/{conversation_id}/messages",
        "/v1/conversations/g:ops/messages?after_seq=18446744073709551615",
        None,
        400,
        "invalid_argument",
    )
    .await;

    // -- presence and online
    let states = api
        .ok(
            "GET",
            "/v1/presence",
            "/v1/presence?user_ids=alice,carol",
            None,
        )
        .await;
    assert_eq!(states["states"][0]["online"], true);
    assert_eq!(states["states"][1]["online"], false);
    api.fails(
        "GET",
        "/v1/presence",
        "/v1/presence?user_ids=alice,bad%20id",
        None,
        400,
        "invalid_argument",
    )
    .await;
    api.fails(
        "GET",
        "/v1/presence",
        "/v1/presence",
        None,
        400,
        "bad_request",
    )
    .await;
    let online = api.ok("GET", "/v1/online", "/v1/online", None).await;
    assert_eq!(
        (
            online["online_users"].as_u64(),
            online["connections"].as_u64()
        ),
        (Some(2), Some(2))
    );
    assert_eq!(online["users"][1]["devices"][0]["transport"], "ws");
    let rest = api
        .ok("GET", "/v1/online", "/v1/online?after=alice", None)
        .await;
    assert_eq!(rest["users"].as_array().unwrap().len(), 1);

    // -- rooms and broadcast
    bob.join_room("stage").await.unwrap();
    let rooms = api.ok("GET", "/v1/rooms", "/v1/rooms", None).await;
    assert_eq!(rooms["rooms"], json!([{"room_id": "stage", "members": 1}]));
    let published = api
        .ok(
            "POST",
            "/v1/rooms/{room_id}/messages",
            "/v1/rooms/stage/messages",
            Some(json!({"sender_id": "host", "text": "welcome to the show"})),
        )
        .await;
    assert_eq!(published["delivered"], 1);
    let m = next_event(&mut bob_events, WAIT, "the room message", |e| match e {
        Event::RoomMessage(m) => Some(m),
        _ => None,
    })
    .await;
    assert_eq!(
        (m.sender_id.as_str(), m.body.as_ref()),
        ("host", &b"welcome to the show"[..])
    );
    api.fails(
        "POST",
        "/v1/rooms/{room_id}/messages",
        "/v1/rooms/empty/messages",
        Some(json!({"sender_id": "host", "text": "x"})),
        404,
        "not_found",
    )
    .await;
    let sent = api
        .ok(
            "POST",
            "/v1/messages/broadcast",
            "/v1/messages/broadcast",
            Some(json!({"text": "hello all"})),
        )
        .await;
    assert_eq!(sent["delivered"], 2);
    api.fails(
        "POST",
        "/v1/messages/broadcast",
        "/v1/messages/broadcast",
        Some(json!({})),
        400,
        "invalid_argument",
    )
    .await;

    // -- metrics, after traffic
    let metrics = api
        .call("GET", "/metrics", "/metrics", None, Some(""))
        .await;
    assert_eq!(metrics.status, 200);
    let value = |name: &str| -> f64 {
        metrics
            .text
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{}", metrics.text))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(value("im_connections{transport=\"tcp\"}"), 1.0);
    assert_eq!(value("im_connections{transport=\"ws\"}"), 1.0);
    assert_eq!(value("im_messages_in_total{kind=\"direct\"}"), 3.0);
    assert!(value("im_messages_out_total{kind=\"direct\"}") >= 3.0);
    assert_eq!(value("im_messages_in_total{kind=\"broadcast\"}"), 1.0);
    assert!(value("im_store_commit_seconds_count") >= 4.0);
    assert!(value("im_delivery_seconds_count") >= 3.0);
    assert_eq!(value("im_online_users"), 2.0);

    // -- disconnect: the user's connections close with KICKED and do not come back
    let closed = api
        .ok(
            "POST",
            "/v1/users/{user_id}/disconnect",
            "/v1/users/alice/disconnect",
            None,
        )
        .await;
    assert_eq!(closed["closed"], 1);
    let reason = next_event(&mut alice_events, WAIT, "the kick", |e| match e {
        Event::Closed { reason, .. } => Some(reason),
        _ => None,
    })
    .await;
    assert_eq!(reason, v1::CloseReason::Kicked);
    api.fails(
        "POST",
        "/v1/users/{user_id}/disconnect",
        "/v1/users/nobody/disconnect",
        None,
        404,
        "unknown_user",
    )
    .await;
    drop(alice);

    // -- every documented operation was exercised, and every answer matches the document
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.clone(), path.clone()));
        }
    }
    let exercised: BTreeSet<(String, String)> = api
        .seen
        .iter()
        .map(|(m, p, _)| (m.clone(), p.clone()))
        .collect();
    assert_eq!(
        documented, exercised,
        "documented operations vs. exercised ones"
    );
    for (method, template, answer) in &api.seen {
        validate(&doc, method, template, answer);
    }
    // The check has teeth: an answer of the wrong shape is caught.
    let forged = json!({"user_id": 5, "online": "yes"});
    assert!(!schema_errors(&doc, "get", "/v1/users/{user_id}", 200, &forged).is_empty());
}

/// What is wrong with `body` as the `status` answer of an operation (the schema's
/// `#/components/...` references resolve against the document itself).
fn schema_errors(
    doc: &Value,
    method: &str,
    template: &str,
    status: u16,
    body: &Value,
) -> Vec<String> {
    let response = &doc["paths"][template][method]["responses"][status.to_string()];
    let Some(schema) = response["content"]["application/json"]["schema"].as_object() else {
        return Vec::new();
    };
    let mut schema = Value::Object(schema.clone());
    schema["components"] = doc["components"].clone();
    let validator = jsonschema::validator_for(&schema)
        .unwrap_or_else(|e| panic!("{method} {template}: the schema does not compile: {e}"));
    validator
        .iter_errors(body)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect()
}

/// Checks one answer against the document: its status is documented for the operation,
/// and a JSON body validates against that response's schema.
fn validate(doc: &Value, method: &str, template: &str, answer: &ApiResponse) {
    let operation = &doc["paths"][template][method];
    assert!(
        operation.is_object(),
        "{method} {template} is not documented"
    );
    let response = &operation["responses"][answer.status.to_string()];
    assert!(
        response.is_object(),
        "{method} {template} answered {} which is not documented: {}",
        answer.status,
        answer.text
    );
    let errors = schema_errors(doc, method, template, answer.status, &answer.json);
    assert!(
        errors.is_empty(),
        "{method} {template} {}: the answer does not match the document: {errors:?}\n{}",
        answer.status,
        answer.text
    );
}
