//! A small OpenID Connect identity provider over real HTTP on 127.0.0.1, for
//! the sign-in tests: a discovery document, a key set (JWKS) it can rotate,
//! and tokens it signs with RS256 or ES256 keys made at start. It counts the
//! key-set fetches, so a test can bound how often the gateway asks.
//!
//! It also signs people in as a browser sees it: the authorization-code flow
//! with PKCE (S256 only) for the client [`CLIENT_ID`]. Its sign-in page asks
//! for a user name (and whether to be an admin), the token endpoint trades a
//! code for an RS256 access token only with the verifier of the challenge the
//! code was issued for, once, to the same client and redirect URI, and
//! answers with CORS headers, as a provider does for browser clients.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json};
use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parking_lot::RwLock;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// A signing key and its public half as published.
#[derive(Clone)]
pub struct SigningKey {
    pub kid: String,
    pub algorithm: Algorithm,
    encoding: EncodingKey,
    jwk: Jwk,
    /// The public key as PEM (what an algorithm-confusion attacker would use
    /// as an HMAC secret).
    pub public_pem: String,
}

impl SigningKey {
    /// A new RSA (2048-bit, RS256) key.
    pub fn rsa(kid: &str) -> anyhow::Result<Self> {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::pkcs8::{EncodePublicKey, LineEnding};
        let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)?;
        let der = private.to_pkcs1_der()?;
        let public_pem = private.to_public_key().to_public_key_pem(LineEnding::LF)?;
        Self::from_der(
            kid,
            Algorithm::RS256,
            KeyAlgorithm::RS256,
            EncodingKey::from_rsa_der(der.as_bytes()),
            public_pem,
        )
    }

    /// A new P-256 (ES256) key.
    pub fn ec(kid: &str) -> anyhow::Result<Self> {
        use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
        let private = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
        let der = private.to_pkcs8_der()?;
        let public_pem = private.public_key().to_public_key_pem(LineEnding::LF)?;
        Self::from_der(kid, Algorithm::ES256, KeyAlgorithm::ES256, EncodingKey::from_ec_der(der.as_bytes()), public_pem)
    }

    fn from_der(
        kid: &str,
        algorithm: Algorithm,
        named: KeyAlgorithm,
        encoding: EncodingKey,
        public_pem: String,
    ) -> anyhow::Result<Self> {
        let mut jwk = Jwk::from_encoding_key(&encoding, algorithm)?;
        jwk.common.key_id = Some(kid.to_owned());
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        jwk.common.key_algorithm = Some(named);
        Ok(Self { kid: kid.to_owned(), algorithm, encoding, jwk, public_pem })
    }

    /// `claims` signed by this key, its `kid` in the header.
    pub fn sign(&self, claims: &Value) -> anyhow::Result<String> {
        self.sign_as(&self.kid, claims)
    }

    /// `claims` signed by this key, with `kid` in the header instead of its own.
    pub fn sign_as(&self, kid: &str, claims: &Value) -> anyhow::Result<String> {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(kid.to_owned());
        Ok(jsonwebtoken::encode(&header, claims, &self.encoding)?)
    }
}

/// The one client the sign-in page serves (the storefront).
pub const CLIENT_ID: &str = "flashsale-storefront";

struct Published {
    issuer: String,
    keys: RwLock<Vec<SigningKey>>,
    jwks_fetches: AtomicUsize,
    /// Codes issued and not yet traded.
    codes: parking_lot::Mutex<HashMap<String, Grant>>,
    /// Codes traded for a token.
    token_exchanges: AtomicUsize,
    /// Token requests refused (wrong verifier, reused code, …).
    token_refusals: AtomicUsize,
}

/// What a code stands for.
struct Grant {
    redirect_uri: String,
    challenge: String,
    audience: String,
    user: String,
    admin: bool,
}

pub struct TestIdentityProvider {
    pub issuer: String,
    published: Arc<Published>,
    rotations: AtomicUsize,
    task: JoinHandle<()>,
}

impl TestIdentityProvider {
    /// Serves on a free port with an RSA key `rsa-0` and a P-256 key `ec-0`.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let issuer = format!("http://127.0.0.1:{}", listener.local_addr()?.port());
        let keys = vec![SigningKey::rsa("rsa-0")?, SigningKey::ec("ec-0")?];
        let published = Arc::new(Published {
            issuer: issuer.clone(),
            keys: RwLock::new(keys),
            jwks_fetches: AtomicUsize::new(0),
            codes: parking_lot::Mutex::new(HashMap::new()),
            token_exchanges: AtomicUsize::new(0),
            token_refusals: AtomicUsize::new(0),
        });
        let app = axum::Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks.json", get(jwks))
            .route("/authorize", get(sign_in_page).post(sign_in))
            .route("/token", post(token))
            .with_state(published.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { issuer, published, rotations: AtomicUsize::new(0), task })
    }

    /// The published key `kid`.
    pub fn key(&self, kid: &str) -> anyhow::Result<SigningKey> {
        let keys = self.published.keys.read();
        keys.iter().find(|k| k.kid == kid).cloned().ok_or_else(|| anyhow::anyhow!("no key {kid}"))
    }

    /// Publishes a new RSA key and withdraws the RSA keys before it, as a
    /// provider's rotation ends: the new key.
    pub fn rotate(&self) -> anyhow::Result<SigningKey> {
        let n = self.rotations.fetch_add(1, Ordering::Relaxed) + 1;
        let key = SigningKey::rsa(&format!("rsa-{n}"))?;
        let mut keys = self.published.keys.write();
        keys.retain(|k| k.algorithm != Algorithm::RS256);
        keys.push(key.clone());
        Ok(key)
    }

    /// How many codes were traded for tokens, and how many token requests were refused.
    pub fn token_exchanges(&self) -> (usize, usize) {
        (self.published.token_exchanges.load(Ordering::SeqCst), self.published.token_refusals.load(Ordering::SeqCst))
    }

    /// How many times the key set was fetched.
    pub fn jwks_fetches(&self) -> usize {
        self.published.jwks_fetches.load(Ordering::SeqCst)
    }

    /// The claims of a good token for `sub` and `audience`, valid for an hour.
    pub fn claims(&self, sub: &str, audience: &str) -> serde_json::Map<String, Value> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let claims = json!({
            "iss": self.issuer,
            "aud": audience,
            "sub": sub,
            "iat": now,
            "nbf": now,
            "exp": now + Duration::from_secs(3600).as_secs(),
        });
        match claims {
            Value::Object(map) => map,
            _ => serde_json::Map::new(),
        }
    }
}

impl Drop for TestIdentityProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn discovery(State(published): State<Arc<Published>>) -> Json<Value> {
    Json(json!({
        "issuer": published.issuer,
        "jwks_uri": format!("{}/jwks.json", published.issuer),
        "authorization_endpoint": format!("{}/authorize", published.issuer),
        "token_endpoint": format!("{}/token", published.issuer),
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
    }))
}

/// The query of an authorization request (also posted back by the page).
#[derive(serde::Deserialize, serde::Serialize)]
struct Authorization {
    response_type: String,
    client_id: String,
    redirect_uri: String,
    state: String,
    code_challenge: String,
    code_challenge_method: String,
    #[serde(default)]
    audience: String,
}

impl Authorization {
    /// Why this request is refused, if it is.
    fn refusal(&self) -> Option<&'static str> {
        if self.response_type != "code" {
            Some("response_type must be code")
        } else if self.client_id != CLIENT_ID {
            Some("unknown client_id")
        } else if self.code_challenge_method != "S256" || self.code_challenge.len() < 43 {
            Some("a PKCE S256 code_challenge is required")
        } else if !self.redirect_uri.starts_with("http://127.0.0.1:") {
            Some("redirect_uri not allowed")
        } else {
            None
        }
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The sign-in page: a user name, an admin box, and the request carried along.
async fn sign_in_page(Query(request): Query<Authorization>) -> Response {
    if let Some(refusal) = request.refusal() {
        return (StatusCode::BAD_REQUEST, refusal).into_response();
    }
    let carried: String = serde_json::to_value(&request)
        .ok()
        .and_then(|value| value.as_object().cloned())
        .unwrap_or_default()
        .iter()
        .map(|(name, value)| {
            let value = value.as_str().unwrap_or_default();
            format!(r#"<input type="hidden" name="{}" value="{}">"#, escape(name), escape(value))
        })
        .collect();
    Html(format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Test identity provider</title></head>
<body><h1>Sign in to the test identity provider</h1>
<form method="post" action="/authorize">{carried}
<label for="username">User name</label> <input id="username" name="username" required>
<label><input type="checkbox" id="admin" name="admin" value="yes"> Administrator</label>
<button type="submit" id="login">Continue</button></form></body></html>"#
    ))
    .into_response()
}

#[derive(serde::Deserialize)]
struct SignInForm {
    #[serde(flatten)]
    request: Authorization,
    username: String,
    #[serde(default)]
    admin: Option<String>,
}

/// The page's form: a code for this request, back to the client.
async fn sign_in(State(published): State<Arc<Published>>, Form(form): Form<SignInForm>) -> Response {
    let request = form.request;
    if let Some(refusal) = request.refusal() {
        return (StatusCode::BAD_REQUEST, refusal).into_response();
    }
    let Ok(mut back) = reqwest::Url::parse(&request.redirect_uri) else {
        return (StatusCode::BAD_REQUEST, "redirect_uri is not a URL").into_response();
    };
    let code = uuid::Uuid::new_v4().simple().to_string();
    back.query_pairs_mut().append_pair("code", &code).append_pair("state", &request.state);
    published.codes.lock().insert(
        code,
        Grant {
            redirect_uri: request.redirect_uri,
            challenge: request.code_challenge,
            audience: request.audience,
            user: form.username.trim().to_owned(),
            admin: form.admin.is_some(),
        },
    );
    Redirect::to(back.as_str()).into_response()
}

#[derive(serde::Deserialize)]
struct TokenRequest {
    grant_type: String,
    code: String,
    redirect_uri: String,
    client_id: String,
    code_verifier: String,
}

/// Trades a code for an access token, once, given the verifier of its challenge.
async fn token(State(published): State<Arc<Published>>, Form(request): Form<TokenRequest>) -> Response {
    use base64::Engine;
    use sha2::Digest;
    let cors = [(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"), (header::CACHE_CONTROL, "no-store")];
    // Single use: taken out whether or not the rest checks out.
    let grant = published.codes.lock().remove(&request.code);
    let challenge =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(request.code_verifier.as_bytes()));
    let grant = match grant {
        Some(grant)
            if request.grant_type == "authorization_code"
                && request.client_id == CLIENT_ID
                && request.redirect_uri == grant.redirect_uri
                && challenge == grant.challenge =>
        {
            grant
        }
        _ => {
            published.token_refusals.fetch_add(1, Ordering::SeqCst);
            return (StatusCode::BAD_REQUEST, cors, Json(json!({"error": "invalid_grant"}))).into_response();
        }
    };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let roles: Vec<&str> = if grant.admin { vec!["admin"] } else { Vec::new() };
    let claims = json!({
        "iss": published.issuer, "aud": grant.audience, "sub": grant.user, "roles": roles,
        "iat": now, "nbf": now, "exp": now + 3600,
    });
    let key = published.keys.read().iter().find(|key| key.algorithm == Algorithm::RS256).cloned();
    match key.map(|key| key.sign(&claims)) {
        Some(Ok(access_token)) => {
            published.token_exchanges.fetch_add(1, Ordering::SeqCst);
            (cors, Json(json!({"access_token": access_token, "token_type": "Bearer", "expires_in": 3600})))
                .into_response()
        }
        _ => (StatusCode::INTERNAL_SERVER_ERROR, cors, Json(json!({"error": "server_error"}))).into_response(),
    }
}

async fn jwks(State(published): State<Arc<Published>>) -> Json<JwkSet> {
    published.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    Json(JwkSet { keys: published.keys.read().iter().map(|k| k.jwk.clone()).collect() })
}
