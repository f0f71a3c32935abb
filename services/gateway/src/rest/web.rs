//! The storefront: three static files compiled into the binary (no build step,
//! no CDN), how it signs buyers in (`GET /v1/signin`), and the
//! development-only token endpoint.
//!
//! With an identity provider (`OIDC_ISSUER` and `OIDC_CLIENT_ID`), the page
//! runs the authorization-code flow with PKCE itself (RFC 7636, S256; the
//! OAuth 2.0 for browser-based apps practice): it sends the buyer to the
//! provider's authorization endpoint with a fresh code challenge and `state`,
//! and on the way back trades the code and its verifier at the token endpoint
//! for an access token it keeps in sessionStorage. The gateway holds no client
//! secret and sees only the resulting bearer tokens, verified as any other.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use super::RestState;
use super::error::{ApiError, Json};
use crate::auth::oidc::KeySet;

/// How the storefront signs buyers in.
#[derive(Clone)]
pub enum SignIn {
    /// `POST /v1/dev/token` with a user name (development, `DEV_TOKENS`).
    Development,
    /// The identity provider's own sign-in page (authorization code with PKCE).
    Provider { client_id: Arc<str>, keys: Arc<KeySet> },
    /// A bearer token the user pastes (no way to sign in configured).
    PastedToken,
}

/// What `GET /v1/signin` tells the page.
#[derive(Debug, Serialize)]
#[serde(tag = "method", rename_all = "snake_case")]
enum SignInDescription {
    Development,
    Provider {
        issuer: String,
        authorization_endpoint: String,
        token_endpoint: String,
        client_id: String,
        /// Sent as `audience` (Auth0 issues a JWT access token for this API then).
        audience: String,
        scope: &'static str,
        roles_claim: String,
    },
    PastedToken,
}

const INDEX_HTML: &str = include_str!("../../web/index.html");
const APP_JS: &str = include_str!("../../web/app.js");
const STYLE_CSS: &str = include_str!("../../web/style.css");

/// How long a development token lives.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(8 * 3600);

pub(super) fn routes() -> Router<RestState> {
    Router::new()
        .route("/", get(index))
        .route("/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS, CSP.into()) }))
        .route("/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE_CSS, CSP.into()) }))
        .route("/v1/signin", get(sign_in))
}

/// Only our own scripts, styles and API: nothing injected runs.
const CSP: &str = "default-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

/// The page; with an identity provider, its CSP also lets the page reach the
/// provider's token endpoint (the one other origin it talks to).
async fn index(State(state): State<RestState>) -> impl IntoResponse {
    let mut csp = CSP.to_owned();
    if let SignIn::Provider { keys, .. } = &state.sign_in
        && let Some(endpoints) = keys.sign_in_endpoints().await
        && let Some(origin) = origin_of(&endpoints.token_endpoint)
    {
        csp.push_str(&format!("; connect-src 'self' {origin}"));
    }
    asset("text/html; charset=utf-8", INDEX_HTML, csp)
}

/// `scheme://host[:port]` of `url`.
fn origin_of(url: &str) -> Option<String> {
    let uri: axum::http::Uri = url.parse().ok()?;
    Some(format!("{}://{}", uri.scheme_str()?, uri.authority()?))
}

fn asset(content_type: &'static str, body: &'static str, csp: String) -> impl IntoResponse {
    let csp = axum::http::HeaderValue::try_from(csp).unwrap_or(axum::http::HeaderValue::from_static(CSP));
    (
        [
            (header::CONTENT_TYPE, axum::http::HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, axum::http::HeaderValue::from_static("no-cache")),
            (header::CONTENT_SECURITY_POLICY, csp),
            (header::X_CONTENT_TYPE_OPTIONS, axum::http::HeaderValue::from_static("nosniff")),
        ],
        body,
    )
}

/// How the page should sign buyers in. Public, like the page itself.
async fn sign_in(State(state): State<RestState>) -> Result<Json<SignInDescription>, ApiError> {
    Ok(Json(match &state.sign_in {
        SignIn::Development => SignInDescription::Development,
        SignIn::PastedToken => SignInDescription::PastedToken,
        SignIn::Provider { client_id, keys } => {
            // Until the provider's discovery document has been read, the page
            // cannot send anyone there: retry-safe.
            let endpoints = keys
                .sign_in_endpoints()
                .await
                .ok_or_else(|| ApiError::from_status(&flashsale_server::unavailable()))?;
            SignInDescription::Provider {
                issuer: keys.issuer().to_owned(),
                authorization_endpoint: endpoints.authorization_endpoint,
                token_endpoint: endpoints.token_endpoint,
                client_id: client_id.to_string(),
                audience: keys.audience().to_owned(),
                scope: "openid",
                roles_claim: keys.roles_claim().to_owned(),
            }
        }
    }))
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
