//! The local admin HTTP API: plugin lifecycle (list, install/upgrade, enable, disable, uninstall), bearer-token protected.
//!
//! JSON in and out; errors are `{"code": "...", "message": "..."}` with stable codes.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use base64::Engine as _;
use im_plugins::{PluginError, PluginHost};
use serde::Deserialize;

/// Largest request body (a base64 component).
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

#[derive(Clone)]
struct AdminState {
    plugins: Arc<PluginHost>,
    token: Arc<str>,
}

/// An error answer.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "code": self.code, "message": self.message })),
        )
            .into_response()
    }
}

impl From<PluginError> for ApiError {
    fn from(err: PluginError) -> Self {
        let (status, code) = match &err {
            PluginError::InvalidManifest(_) => (StatusCode::BAD_REQUEST, "invalid_manifest"),
            PluginError::InvalidComponent(_) => (StatusCode::BAD_REQUEST, "invalid_component"),
            PluginError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            PluginError::Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, "storage"),
        };
        Self::new(status, code, err.to_string())
    }
}

/// The routes, for `axum::serve`.
pub fn router(plugins: Arc<PluginHost>, token: String) -> Router {
    let state = AdminState {
        plugins,
        token: token.into(),
    };
    Router::new()
        .route("/v1/plugins", get(list))
        .route("/v1/plugins/{id}", put(install).delete(uninstall))
        .route("/v1/plugins/{id}/enable", post(enable))
        .route("/v1/plugins/{id}/disable", post(disable))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

fn authorize(state: &AdminState, headers: &HeaderMap) -> Result<(), ApiError> {
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let expected = state.token.as_bytes();
    // Compare in constant time with respect to the content.
    let matches = presented.is_some_and(|p| {
        p.len() == expected.len()
            && p.bytes()
                .zip(expected)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if matches {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token",
        ))
    }
}

async fn list(State(state): State<AdminState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    Ok(Json(state.plugins.list()).into_response())
}

/// Body of an install or upgrade.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InstallRequest {
    /// The manifest, as TOML text.
    manifest: String,
    /// The component, base64.
    wasm_base64: String,
}

async fn install(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<InstallRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let Json(request) =
        body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text()))?;
    let wasm = base64::engine::general_purpose::STANDARD
        .decode(request.wasm_base64.as_bytes())
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("wasm_base64: {e}"),
            )
        })?;
    let manifest = im_plugins::Manifest::from_toml(&request.manifest).map_err(PluginError::from)?;
    if manifest.id != id {
        let message = format!(
            "the manifest's id {:?} differs from the URL's {id:?}",
            manifest.id
        );
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "id_mismatch",
            message,
        ));
    }
    let info = state.plugins.install(&request.manifest, wasm).await?;
    Ok(Json(info).into_response())
}

async fn enable(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    Ok(Json(state.plugins.set_enabled(&id, true).await?).into_response())
}

async fn disable(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    Ok(Json(state.plugins.set_enabled(&id, false).await?).into_response())
}

#[derive(Deserialize)]
struct UninstallQuery {
    #[serde(default)]
    purge: bool,
}

async fn uninstall(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    Query(query): Query<UninstallQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    state.plugins.uninstall(&id, query.purge).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
