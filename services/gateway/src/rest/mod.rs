//! REST/JSON for buyers and operators, the storefront page, `/openapi.json`
//! (generated from the handlers' annotations) with Swagger UI at `/docs`, and
//! `/healthz` / `/readyz`. Served on the gateway's HTTP port; every route calls
//! the same operations as gRPC (`api/`), so both obey one set of rules.

mod admin;
mod buyers;
mod drain;
pub mod dto;
pub mod error;
#[cfg(test)]
mod mapping;
mod rules;
mod web;

pub use web::SignIn;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts, State};
use axum::http::header;
use axum::http::request::Parts;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

use self::dto::HealthStatus;
use self::error::{ApiError, Json};
use crate::api::Operations;
use crate::auth::Principal;

/// Largest request body; every body this API takes is far smaller.
pub(crate) const MAX_BODY_BYTES: usize = 16 * 1024;

#[derive(Clone)]
pub struct RestState {
    pub api: Arc<Operations>,
    /// Signing secret for `POST /v1/dev/token`, only when development tokens are enabled.
    pub dev_token_secret: Option<Arc<str>>,
    /// How the storefront signs buyers in.
    pub sign_in: web::SignIn,
    /// Cancelled when the gateway begins to shut down (then `/readyz` says 503).
    pub stopping: CancellationToken,
}

/// The authenticated caller (`Authorization: Bearer <JWT>`, as on gRPC).
pub struct Caller(pub Principal);

impl FromRequestParts<RestState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &RestState) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(header::AUTHORIZATION).and_then(|value| value.to_str().ok());
        let forwarded = parts.headers.get_all("x-forwarded-for").iter().filter_map(|value| value.to_str().ok());
        let peer = parts.extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|info| info.0.ip());
        let client = state.api.limits.client_address(peer, forwarded);
        Ok(Self(state.api.authenticate(header, client).await?))
    }
}

/// A caller with the admin role, checked before anything else of the request
/// is read: a non-admin gets FORBIDDEN whatever the path or body holds, never a
/// validation error that describes the admin API. Admin handlers take it
/// first, ahead of their `Path` and `Json` extractors.
pub struct Operator(pub Principal);

impl FromRequestParts<RestState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &RestState) -> Result<Self, Self::Rejection> {
        let Caller(caller) = Caller::from_request_parts(parts, state).await?;
        if let Err(refused) = caller.require_admin() {
            // Refused before the body is read: the audit log names the route.
            state.api.audit.record(&crate::audit::AuditRecord {
                at: crate::audit::now(),
                actor: &caller.user_id,
                admin: false,
                action: &format!("{} {}", parts.method, parts.uri.path()),
                target: "",
                outcome: refused.reason(),
                details: serde_json::Value::Null,
            });
            return Err(refused.into());
        }
        Ok(Self(caller))
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Flash-sale gateway",
        description = "Buy limited stock fairly. Purchases are admitted at once (202) and settled \
            asynchronously: follow the order with GET /v1/orders/{order_id} or its server-sent events. \
            Errors are `{\"error\": {\"code\": REASON, \"message\": …}}` with the reason codes of the gRPC API."
    ),
    modifiers(&BearerAuth),
    tags((name = "buyers"), (name = "admin", description = "Needs a token with the admin role"), (name = "health"))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
        );
    }
}

/// The routes and their OpenAPI description, built together from the handlers.
fn api_routes() -> (Router<RestState>, utoipa::openapi::OpenApi) {
    let routes = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(buyers::list_items))
        .routes(routes!(buyers::get_item))
        .routes(routes!(buyers::purchase))
        .routes(routes!(buyers::list_orders))
        .routes(routes!(buyers::get_order))
        .routes(routes!(buyers::order_events))
        .routes(routes!(buyers::refund_order))
        .routes(routes!(buyers::wallet))
        .routes(routes!(admin::create_item))
        .routes(routes!(admin::top_up))
        .routes(routes!(admin::item_stats))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .split_for_parts();
    let (router, mut spec) = (routes.0, routes.1);
    rules::apply(&mut spec);
    (router, spec)
}

/// The OpenAPI document, as served at `/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_routes().1
}

pub fn router(state: RestState) -> Router {
    let (api, spec) = api_routes();
    let mut router = api.merge(web::routes());
    if state.dev_token_secret.is_some() {
        router = router.merge(web::dev_token_routes());
    }
    router
        // A span per sampled `/v1/` request, named after its route.
        .route_layer(flashsale_server::HttpServerTraceLayer)
        .fallback(|| async { ApiError::not_found() })
        // Bodies are capped before they are buffered; the JSON extractor turns the
        // cap's rejection into a 413 PAYLOAD_TOO_LARGE.
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
        // Outside the state and the body limit: the spec and the UI are static.
        .merge(SwaggerUi::new("/docs").url("/openapi.json", spec))
        // Outermost, so it sees every answer, refusals made before the body is
        // read included, and reads what they left unread: the connection stays
        // usable for a keep-alive client (drain.rs).
        .layer(axum::middleware::from_fn(drain::drain_unread_body))
}

#[utoipa::path(
    get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The process is alive", body = HealthStatus))
)]
async fn healthz() -> Json<HealthStatus> {
    Json(HealthStatus { status: "ok".into() })
}

#[utoipa::path(
    get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "Ready for traffic: Redis answers and the gateway is not stopping", body = HealthStatus),
        (status = 503, description = "Not ready", body = dto::ErrorBody),
    )
)]
async fn readyz(State(state): State<RestState>) -> Result<Json<HealthStatus>, ApiError> {
    if state.stopping.is_cancelled() {
        return Err(ApiError::unavailable());
    }
    state.api.purchases.admission.ping().await?;
    Ok(Json(HealthStatus { status: "ready".into() }))
}
