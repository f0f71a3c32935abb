//! The storefront: three static files compiled into the binary (no build step,
//! no CDN), and the development-only token endpoint it signs in with.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use super::RestState;
use super::error::{ApiError, Json};

const INDEX_HTML: &str = include_str!("../../web/index.html");
const APP_JS: &str = include_str!("../../web/app.js");
const STYLE_CSS: &str = include_str!("../../web/style.css");

/// How long a development token lives.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(8 * 3600);

pub(super) fn routes() -> Router<RestState> {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }))
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            // Only our own scripts, styles and API: nothing injected runs.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

pub(super) fn dev_token_routes() -> Router<RestState> {
    Router::new().route("/v1/dev/token", post(dev_token))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DevTokenBody {
    user_id: String,
    #[serde(default)]
    admin: bool,
}

#[derive(Debug, Serialize)]
struct DevToken {
    token: String,
}

/// Signs a token for any user name: development only (DEV_TOKENS=true), so a
/// person can try the storefront without an identity provider.
async fn dev_token(State(state): State<RestState>, Json(body): Json<DevTokenBody>) -> Result<Json<DevToken>, ApiError> {
    let Some(secret) = state.dev_token_secret.as_deref() else { return Err(ApiError::not_found()) };
    let DevTokenBody { user_id, admin } = body;
    let user_id = user_id.trim();
    // Stricter than a real subject (any printable text): a short name to type.
    if !flashsale_domain::is_token(user_id, 64) {
        return Err(ApiError::invalid("invalid user_id: must be 1..=64 characters of [A-Za-z0-9_-]"));
    }
    let token = crate::auth::mint(secret, user_id, admin, DEV_TOKEN_TTL).map_err(|e| {
        tracing::error!(error = %e, "could not sign a development token");
        ApiError::from_status(&flashsale_server::internal())
    })?;
    Ok(Json(DevToken { token }))
}
