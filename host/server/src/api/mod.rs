//! The HTTP API for business back-ends: routes, API-key authentication, JSON errors, the OpenAPI document, health, readiness and metrics.
//!
//! Layout: this file wires the routes and owns what every route shares; [`handlers`]
//! holds the business endpoints (push, users, groups, history, presence, rooms);
//! [`schema`] their JSON bodies. `/v1/*` needs `Authorization: Bearer <key>` with a key
//! from `[api] keys`; `/healthz`, `/readyz`, `/metrics` and `/openapi.json` need none.
//! Errors are `{"code": "...", "message": "..."}` with stable codes.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use im_proto::v1::ErrorCode;
use utoipa::OpenApi;

use crate::session::NodeContext;

pub mod handlers;
pub mod schema;

use schema::ErrorBody;

/// Largest request body.
const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// One accepted API key.
pub struct ApiKey {
    pub name: String,
    pub key: String,
}

#[derive(Clone)]
pub struct ApiState {
    pub ctx: Arc<NodeContext>,
    keys: Arc<[ApiKey]>,
}

/// The API key a request authenticated with (an extension set by the middleware).
#[derive(Clone)]
pub struct Caller {
    pub key_name: Arc<str>,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }

    pub fn internal(err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "an API request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the request could not be completed; retry",
        )
    }

    /// The answer for a refusal the client protocol would give as `code`.
    pub fn from_protocol(code: ErrorCode, message: impl Into<String>) -> Self {
        let (status, code) = match code {
            ErrorCode::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_argument"),
            ErrorCode::BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            ErrorCode::UnknownUser => (StatusCode::NOT_FOUND, "unknown_user"),
            ErrorCode::UnknownGroup => (StatusCode::NOT_FOUND, "unknown_group"),
            ErrorCode::UnknownConversation => (StatusCode::NOT_FOUND, "unknown_conversation"),
            ErrorCode::NotAMember => (StatusCode::CONFLICT, "not_a_member"),
            ErrorCode::Conflict => (StatusCode::CONFLICT, "conflict"),
            ErrorCode::Rejected => (StatusCode::FORBIDDEN, "rejected"),
            ErrorCode::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            _ => (StatusCode::BAD_REQUEST, "bad_request"),
        };
        Self::new(status, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code.to_owned(),
            message: self.message,
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::JsonRejection) -> Self {
        // Every unusable body is a 400, whatever axum's finer status, but an oversized one.
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                rejection.body_text(),
            );
        }
        Self::bad_request(rejection.body_text())
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::QueryRejection) -> Self {
        Self::bad_request(rejection.body_text())
    }
}

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::PathRejection) -> Self {
        Self::bad_request(rejection.body_text())
    }
}

/// Compares in time independent of where the inputs differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_key(
    State(state): State<ApiState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(presented) = presented else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send an API key as `Authorization: Bearer <key>`",
        ));
    };
    // Check every key, so the time taken does not tell which one nearly matched.
    let mut matched = None;
    for key in state.keys.iter() {
        if same_secret(presented.as_bytes(), key.key.as_bytes()) {
            matched = Some(key.name.as_str());
        }
    }
    let Some(name) = matched else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the API key is not valid",
        ));
    };
    request.extensions_mut().insert(Caller {
        key_name: name.into(),
    });
    Ok(next.run(request).await)
}

/// The API's routes, for `axum::serve`.
pub fn router(ctx: Arc<NodeContext>, keys: Vec<ApiKey>) -> Router {
    let state = ApiState {
        ctx,
        keys: keys.into(),
    };
    let v1 = Router::new()
        .route("/v1/messages/users", post(handlers::push_to_users))
        .route("/v1/messages/group", post(handlers::push_to_group))
        .route("/v1/messages/broadcast", post(handlers::push_to_everyone))
        .route("/v1/rooms", get(handlers::list_rooms))
        .route("/v1/rooms/{room_id}/messages", post(handlers::push_to_room))
        .route("/v1/users", get(handlers::list_users))
        .route(
            "/v1/users/{user_id}",
            put(handlers::put_user).get(handlers::get_user),
        )
        .route(
            "/v1/users/{user_id}/disconnect",
            post(handlers::disconnect_user),
        )
        .route("/v1/groups", post(handlers::create_group))
        .route("/v1/groups/{group_id}", get(handlers::get_group))
        .route(
            "/v1/groups/{group_id}/members",
            get(handlers::list_members).post(handlers::add_members),
        )
        .route(
            "/v1/groups/{group_id}/members/{user_id}",
            delete(handlers::remove_member),
        )
        .route(
            "/v1/groups/{group_id}/members/{user_id}/role",
            put(handlers::set_role),
        )
        .route("/v1/groups/{group_id}/owner", put(handlers::transfer_owner))
        .route(
            "/v1/conversations/{conversation_id}/messages",
            get(handlers::history),
        )
        .route("/v1/presence", get(handlers::presence))
        .route("/v1/online", get(handlers::online))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_key,
        ));
    Router::new()
        .merge(v1)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .with_state(state)
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
    )
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = schema::Health)))]
pub async fn healthz() -> Json<schema::Health> {
    Json(schema::Health {
        status: "ok".into(),
    })
}

/// The node serves: the store answers and the node is not shutting down.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = schema::Health),
        (status = 503, description = "Not ready", body = schema::Health)))]
pub async fn readyz(State(state): State<ApiState>) -> Response {
    let not_ready = |why: &str| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(schema::Health { status: why.into() }),
        )
            .into_response()
    };
    if state.ctx.shutdown.is_cancelled() {
        return not_ready("shutting down");
    }
    let probe = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        state.ctx.store.user_exists("readyz-probe"),
    )
    .await;
    match probe {
        Ok(Ok(_)) => Json(schema::Health {
            status: "ok".into(),
        })
        .into_response(),
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "readiness probe: the store failed");
            not_ready("the store failed")
        }
        Err(_) => not_ready("the store did not answer in time"),
    }
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
pub async fn metrics(State(state): State<ApiState>) -> Response {
    let ctx = &state.ctx;
    let text = ctx.metrics.render(
        ctx.router.counts(),
        ctx.parker.as_ref().map_or(0, |parker| parker.parked()),
        ctx.rooms.count(),
        ctx.store.stats(),
        ctx.plugins.as_deref(),
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json")))]
pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

struct BearerKey;

impl utoipa::Modify for BearerKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI description of this API.
#[derive(OpenApi)]
#[openapi(
    info(title = "im HTTP API", description = "Push, users, groups, history and presence for business back-ends; health, readiness and metrics for operators."),
    paths(
        healthz, readyz, metrics, openapi,
        handlers::push_to_users, handlers::push_to_group, handlers::push_to_everyone,
        handlers::list_rooms, handlers::push_to_room,
        handlers::list_users, handlers::put_user, handlers::get_user, handlers::disconnect_user,
        handlers::create_group, handlers::get_group, handlers::list_members, handlers::add_members,
        handlers::remove_member, handlers::set_role, handlers::transfer_owner,
        handlers::history, handlers::presence, handlers::online,
    ),
    modifiers(&BearerKey),
    tags(
        (name = "push", description = "Messages from the back-end"),
        (name = "users"), (name = "groups"), (name = "history"), (name = "presence"), (name = "rooms"),
        (name = "operations", description = "No key needed"),
    )
)]
pub struct ApiDoc;
