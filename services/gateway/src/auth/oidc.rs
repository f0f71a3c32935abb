//! OpenID Connect sign-in: tokens an identity provider (Auth0, Okta,
//! Keycloak, …) signs with RS256 or ES256, verified against the keys it
//! publishes (its JWKS).
//!
//! The keys come from the provider's discovery document
//! (`<OIDC_ISSUER>/.well-known/openid-configuration`, whose `jwks_uri` names
//! them), from `OIDC_JWKS_URL`, or from `OIDC_JWKS_FILE`. They are held by
//! `kid`. A token naming a `kid` not held makes the set be fetched again, at
//! most once per `OIDC_JWKS_MIN_REFETCH_MS` however many such tokens arrive
//! (one fetch at a time; the others wait for it or are refused), so a flood
//! of made-up `kid`s costs the provider one request per interval while a key
//! rotation is picked up without a restart. The set is also fetched every
//! [`REFRESH_EVERY`], so a key the provider withdrew stops verifying.
//!
//! Each key pins its algorithm, whatever a token's header says: an RSA key
//! verifies RS256 only, a P-256 key ES256 only (so an HS256 token "signed"
//! with a public key is refused). `iss` must be the configured issuer, `aud`
//! (a string or an array) must hold the configured audience, and `exp`, `nbf`
//! and `sub` are checked with [`LEEWAY`] of clock skew.
//!
//! jsonwebtoken parses the keys and checks signatures and claims; the fetching
//! and its rate bound are ours: the crates that wrap JWKS fetching have no
//! refetch bound, or pin older tonic/axum/jsonwebtoken releases than ours.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Principal;
use crate::config::{OidcConfig, given};

/// Clock skew allowed on `exp` and `nbf`, in seconds.
pub const LEEWAY: u64 = 30;
/// How often the key set is fetched even when every token's `kid` is known.
pub const REFRESH_EVERY: Duration = Duration::from_secs(600);
/// How long one fetch (discovery, or the key set) may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest discovery document or key set read (real ones are a few KiB).
const MAX_DOCUMENT_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("fetching {url}: {reason}")]
    Http { url: String, reason: String },
    #[error("reading {path}: {source}")]
    File { path: PathBuf, source: std::io::Error },
    #[error("{0} is larger than {MAX_DOCUMENT_BYTES} bytes")]
    TooLarge(String),
    #[error("{what} is not valid: {source}")]
    Parse { what: String, source: serde_json::Error },
    #[error("the discovery document names issuer {found:?}, not the configured {expected:?}")]
    WrongIssuer { found: String, expected: String },
}

/// Where the keys come from.
#[derive(Debug)]
enum Source {
    /// The discovery document (its `jwks_uri` is read, then remembered).
    Discovery,
    Url(String),
    File(PathBuf),
}

/// One usable key and the checks a token it signed must pass.
struct Key {
    decoding: DecodingKey,
    validation: Validation,
}

/// Where the storefront sends buyers to sign in, from the discovery document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignInEndpoints {
    pub authorization_endpoint: String,
    pub token_endpoint: String,
}

/// The parts of the discovery document read here.
#[derive(serde::Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
    authorization_endpoint: Option<String>,
    token_endpoint: Option<String>,
}

/// The provider's keys, by `kid`, and how to fetch them again.
pub struct KeySet {
    source: Source,
    /// The discovery document's URL (whatever the keys' source).
    discovery_url: String,
    issuer: String,
    audience: String,
    roles_claim: String,
    min_refetch: Duration,
    http: HttpClient,
    /// The discovery document's `jwks_uri`, once read.
    jwks_uri: parking_lot::Mutex<Option<String>>,
    /// Its sign-in endpoints, once read (they do not change).
    sign_in: parking_lot::Mutex<Option<SignInEndpoints>>,
    /// When the discovery document was last asked for by [`KeySet::sign_in_endpoints`].
    last_discovery: tokio::sync::Mutex<Option<Instant>>,
    keys: parking_lot::RwLock<Arc<HashMap<String, Arc<Key>>>>,
    /// When the last fetch began; held while one runs, so fetches never overlap.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
}

impl KeySet {
    /// The key set `config` describes (nothing fetched yet; see [`KeySet::refresh`]).
    pub fn new(config: &OidcConfig) -> anyhow::Result<Arc<Self>> {
        let issuer = given(config.issuer.as_ref()).ok_or_else(|| anyhow::anyhow!("OIDC_ISSUER is not set"))?.to_owned();
        let audience = given(config.audience.as_ref())
            .ok_or_else(|| {
                anyhow::anyhow!("OIDC_AUDIENCE is required with OIDC_ISSUER (tokens for other APIs must not pass)")
            })?
            .to_owned();
        let file = config.jwks_file.as_ref().filter(|path| !path.as_os_str().is_empty());
        let discovery_url = format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'));
        let source = match (file, given(config.jwks_url.as_ref())) {
            (Some(path), _) => Source::File(path.clone()),
            (None, Some(url)) => Source::Url(url.to_owned()),
            (None, None) => Source::Discovery,
        };
        let http = http_client()?;
        Ok(Arc::new(Self {
            source,
            discovery_url,
            issuer,
            audience,
            roles_claim: config.roles_claim.clone(),
            min_refetch: Duration::from_millis(config.jwks_min_refetch_ms),
            http,
            jwks_uri: parking_lot::Mutex::new(None),
            sign_in: parking_lot::Mutex::new(None),
            last_discovery: tokio::sync::Mutex::new(None),
            keys: parking_lot::RwLock::new(Arc::new(HashMap::new())),
            last_fetch: tokio::sync::Mutex::new(None),
        }))
    }

    /// The caller `token` names and its `exp`, if a held key (fetched again
    /// within the bound when its `kid` is new) verifies it and its claims pass.
    pub async fn verify(&self, token: &str) -> Option<(Principal, u64)> {
        let header = jsonwebtoken::decode_header(token).ok()?;
        let key = self.key(header.kid.as_deref()?).await?;
        // The key's own algorithm only: decode refuses a header naming another.
        let data = jsonwebtoken::decode::<HashMap<String, Value>>(token, &key.decoding, &key.validation).ok()?;
        let claims = data.claims;
        let sub = claims.get("sub")?.as_str()?.to_owned();
        let exp = claims.get("exp")?.as_u64()?;
        let admin = match claims.get(&self.roles_claim) {
            Some(Value::Array(roles)) => roles.iter().any(|role| role.as_str() == Some(super::ADMIN_ROLE)),
            Some(Value::String(role)) => role == super::ADMIN_ROLE,
            _ => false,
        };
        Some((Principal { user_id: sub, admin }, exp))
    }

    /// The key `kid`, fetching the set again if it is not held and the last
    /// fetch was at least `OIDC_JWKS_MIN_REFETCH_MS` ago.
    async fn key(&self, kid: &str) -> Option<Arc<Key>> {
        if let Some(key) = self.held(kid) {
            return Some(key);
        }
        let mut last = self.last_fetch.lock().await;
        // The fetch this call waited for may have brought it.
        if let Some(key) = self.held(kid) {
            return Some(key);
        }
        if !self.may_ask_now(&mut last) {
            metrics::counter!("flashsale_jwks_refetches_refused_total").increment(1);
            return None;
        }
        if let Err(error) = self.fetch_and_install().await {
            tracing::warn!(%error, "could not fetch the identity provider's keys");
        }
        drop(last);
        self.held(kid)
    }

    fn held(&self, kid: &str) -> Option<Arc<Key>> {
        self.keys.read().get(kid).cloned()
    }

    /// Fetches the set now (unless a fetch is running) and installs it.
    pub async fn refresh(&self) -> Result<(), FetchError> {
        let mut last = self.last_fetch.lock().await;
        *last = Some(Instant::now());
        self.fetch_and_install().await
    }

    /// Refreshes the set at start and every [`REFRESH_EVERY`] until `shutdown`.
    pub async fn run_refresher(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            if let Err(error) = self.refresh().await {
                tracing::warn!(%error, "could not fetch the identity provider's keys");
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(REFRESH_EVERY) => {}
            }
        }
    }

    async fn fetch_and_install(&self) -> Result<(), FetchError> {
        let fetched = self.fetch().await;
        metrics::counter!("flashsale_jwks_fetches_total", "result" => if fetched.is_ok() { "ok" } else { "error" })
            .increment(1);
        let set = fetched?;
        let keys: HashMap<String, Arc<Key>> =
            set.keys.iter().filter_map(|jwk| Some((jwk.common.key_id.clone()?, Arc::new(self.usable(jwk)?)))).collect();
        if keys.is_empty() {
            tracing::warn!("the identity provider's key set holds no RS256 or ES256 signing key with a kid");
        }
        *self.keys.write() = Arc::new(keys);
        Ok(())
    }

    /// `jwk` as a key with its algorithm pinned, if it is an RSA or P-256
    /// signing key (others are skipped: nothing here verifies with them).
    fn usable(&self, jwk: &Jwk) -> Option<Key> {
        if jwk.common.public_key_use.as_ref().is_some_and(|used| *used != PublicKeyUse::Signature) {
            return None;
        }
        let (algorithm, named) = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => (Algorithm::RS256, KeyAlgorithm::RS256),
            AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                (Algorithm::ES256, KeyAlgorithm::ES256)
            }
            _ => return None,
        };
        // A key published for another algorithm (RS384, say) is not used for this one.
        if jwk.common.key_algorithm.is_some_and(|published| published != named) {
            return None;
        }
        let decoding = DecodingKey::from_jwk(jwk).ok()?;
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY;
        Some(Key { decoding, validation })
    }

    async fn fetch(&self) -> Result<JwkSet, FetchError> {
        let url = match &self.source {
            Source::File(path) => {
                let text =
                    tokio::fs::read(path).await.map_err(|source| FetchError::File { path: path.clone(), source })?;
                return parse(&text, &path.display().to_string());
            }
            Source::Url(url) => url.clone(),
            Source::Discovery => {
                let known = self.jwks_uri.lock().clone();
                match known {
                    Some(url) => url,
                    None => self.discover().await?,
                }
            }
        };
        parse(&self.get(&url).await?, &url)
    }

    /// Reads the discovery document, remembers what it names, and returns its `jwks_uri`.
    async fn discover(&self) -> Result<String, FetchError> {
        let url = &self.discovery_url;
        let document: Discovery = parse(&self.get(url).await?, url)?;
        if document.issuer != self.issuer {
            return Err(FetchError::WrongIssuer { found: document.issuer, expected: self.issuer.clone() });
        }
        if let (Some(authorization_endpoint), Some(token_endpoint)) =
            (document.authorization_endpoint, document.token_endpoint)
        {
            *self.sign_in.lock() = Some(SignInEndpoints { authorization_endpoint, token_endpoint });
        }
        *self.jwks_uri.lock() = Some(document.jwks_uri.clone());
        Ok(document.jwks_uri)
    }

    /// The provider's authorization and token endpoints, for the storefront's
    /// sign-in; the discovery document is read for them at most once per
    /// `OIDC_JWKS_MIN_REFETCH_MS` until it has named them.
    pub async fn sign_in_endpoints(&self) -> Option<SignInEndpoints> {
        if let Some(known) = self.known_sign_in_endpoints() {
            return Some(known);
        }
        let mut last = self.last_discovery.lock().await;
        if let Some(known) = self.known_sign_in_endpoints() {
            return Some(known);
        }
        if !self.may_ask_now(&mut last) {
            return None;
        }
        if let Err(error) = self.discover().await {
            tracing::warn!(%error, "could not read the identity provider's discovery document");
        }
        self.known_sign_in_endpoints()
    }

    /// The sign-in endpoints, if the discovery document has named them.
    fn known_sign_in_endpoints(&self) -> Option<SignInEndpoints> {
        self.sign_in.lock().clone()
    }

    /// Whether the provider may be asked again now, given when it `last` was
    /// (at most once per `OIDC_JWKS_MIN_REFETCH_MS`); if so, now is the last time.
    fn may_ask_now(&self, last: &mut Option<Instant>) -> bool {
        if last.is_some_and(|at| at.elapsed() < self.min_refetch) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    /// The configured audience (the storefront asks the provider for tokens for it).
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// The claim that lists roles.
    pub fn roles_claim(&self) -> &str {
        &self.roles_claim
    }

    /// The issuer, as configured.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    async fn get(&self, url: &str) -> Result<Vec<u8>, FetchError> {
        use http_body_util::BodyExt;
        let failed = |reason: String| FetchError::Http { url: url.to_owned(), reason };
        let uri: hyper::Uri = url.parse().map_err(|e: hyper::http::uri::InvalidUri| failed(e.to_string()))?;
        let fetch = async {
            let response = self.http.get(uri).await.map_err(|e| failed(e.to_string()))?;
            if !response.status().is_success() {
                return Err(failed(format!("status {}", response.status())));
            }
            let body = http_body_util::Limited::new(response.into_body(), MAX_DOCUMENT_BYTES);
            match body.collect().await {
                Ok(collected) => Ok(collected.to_bytes().to_vec()),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(FetchError::TooLarge(url.to_owned())),
                Err(e) => Err(failed(e.to_string())),
            }
        };
        tokio::time::timeout(FETCH_TIMEOUT, fetch).await.unwrap_or_else(|_| Err(failed("timed out".into())))
    }
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Empty<hyper::body::Bytes>,
>;

/// An HTTP(S) client trusting the system's CA certificates. Without any
/// (a machine with no CA bundle), `https://` fetches fail and `http://` ones
/// still work.
fn http_client() -> anyhow::Result<HttpClient> {
    let provider = || Arc::new(rustls::crypto::ring::default_provider());
    let builder = match hyper_rustls::HttpsConnectorBuilder::new().with_provider_and_native_roots(provider()) {
        Ok(builder) => builder,
        Err(error) => {
            tracing::warn!(%error, "no CA certificates found: the identity provider is reachable over plain HTTP only");
            let config = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
        }
    };
    let connector = builder.https_or_http().enable_http1().build();
    Ok(hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector))
}

fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, FetchError> {
    serde_json::from_slice(bytes).map_err(|source| FetchError::Parse { what: what.to_owned(), source })
}
