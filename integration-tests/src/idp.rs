//! A small OpenID Connect identity provider over real HTTP on 127.0.0.1, for
//! the sign-in tests: a discovery document, a key set (JWKS) it can rotate,
//! and tokens it signs with RS256 or ES256 keys made at start. It counts the
//! key-set fetches, so a test can bound how often the gateway asks.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::routing::get;
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

struct Published {
    issuer: String,
    keys: RwLock<Vec<SigningKey>>,
    jwks_fetches: AtomicUsize,
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
        let published =
            Arc::new(Published { issuer: issuer.clone(), keys: RwLock::new(keys), jwks_fetches: AtomicUsize::new(0) });
        let app = axum::Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks.json", get(jwks))
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
        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
    }))
}

async fn jwks(State(published): State<Arc<Published>>) -> Json<JwkSet> {
    published.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    Json(JwkSet { keys: published.keys.read().iter().map(|k| k.jwk.clone()).collect() })
}
