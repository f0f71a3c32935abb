//! Bearer-token authentication. Tokens are JWTs whose `sub` is the buyer and
//! whose roles may hold "admin", either from an OpenID Connect provider
//! (RS256/ES256 against its published keys, [`oidc`]) or, for development,
//! HS256 with a shared secret (`JWT_SECRET`; `roles` claim; `iss` and `aud`
//! checked when configured). The two never mix: with OIDC configured no
//! HS256 token passes. In both, the algorithm is pinned and `exp` and `sub`
//! are required; verified tokens are cached, so a buyer's retries do not pay
//! for the signature check again.

pub mod oidc;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::error::GatewayError;

/// The role that may call the admin API.
pub const ADMIN_ROLE: &str = "admin";

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user_id: String,
    pub admin: bool,
}

impl Principal {
    pub fn require_admin(&self) -> Result<(), GatewayError> {
        if self.admin { Ok(()) } else { Err(GatewayError::Forbidden) }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aud: Option<String>,
}

/// Verified tokens kept in memory: a buyer sends the same token with every
/// attempt, and checking its signature and parsing its claims again costs more
/// than the rest of a sold-out answer.
const VERIFIED_TOKENS: usize = 100_000;

/// How tokens are checked.
#[derive(Clone)]
enum Verifier {
    /// HS256 with a shared secret (development).
    Shared { key: DecodingKey, validation: Box<Validation> },
    /// An OpenID Connect provider's keys.
    Oidc(std::sync::Arc<oidc::KeySet>),
}

/// Verifies tokens.
#[derive(Clone)]
pub struct Authenticator {
    verifier: Verifier,
    /// Token → who it names and when it expires (unix seconds). Keyed by the
    /// whole token, so a hit is a token this key verified; refused tokens are
    /// never cached.
    verified: std::sync::Arc<quick_cache::sync::Cache<String, (Principal, u64)>>,
}

impl Authenticator {
    /// HS256 tokens signed with `secret` (development).
    pub fn new(secret: &str, issuer: Option<&str>, audience: Option<&str>) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 5;
        if let Some(issuer) = issuer {
            validation.set_issuer(&[issuer]);
        }
        match audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        Self::with(Verifier::Shared {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation: Box::new(validation),
        })
    }

    /// Tokens of the OpenID Connect provider whose keys `keys` holds.
    pub fn oidc(keys: std::sync::Arc<oidc::KeySet>) -> Self {
        Self::with(Verifier::Oidc(keys))
    }

    fn with(verifier: Verifier) -> Self {
        Self { verifier, verified: std::sync::Arc::new(quick_cache::sync::Cache::new(VERIFIED_TOKENS)) }
    }

    /// The provider's key set, when tokens come from one.
    pub fn key_set(&self) -> Option<std::sync::Arc<oidc::KeySet>> {
        match &self.verifier {
            Verifier::Oidc(keys) => Some(keys.clone()),
            Verifier::Shared { .. } => None,
        }
    }

    /// The caller named by an `authorization: Bearer …` value, from gRPC
    /// metadata or an HTTP header alike.
    pub async fn authenticate_header(&self, authorization: Option<&str>) -> Result<Principal, GatewayError> {
        let token = authorization
            .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
            .ok_or(GatewayError::Unauthenticated)?;
        self.verify(token.trim()).await
    }

    pub async fn verify(&self, token: &str) -> Result<Principal, GatewayError> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        // A cached token is good until its `exp` (without the leeway a fresh check allows).
        if let Some((principal, expires)) = self.verified.get(token)
            && now < expires
        {
            return Ok(principal);
        }
        let (principal, expires) = match &self.verifier {
            Verifier::Shared { key, validation } => {
                let claims = jsonwebtoken::decode::<Claims>(token, key, validation)
                    .map_err(|_| GatewayError::Unauthenticated)?
                    .claims;
                let admin = claims.roles.iter().any(|role| role == ADMIN_ROLE);
                (Principal { user_id: claims.sub, admin }, claims.exp)
            }
            Verifier::Oidc(keys) => keys.verify(token).await.ok_or(GatewayError::Unauthenticated)?,
        };
        // The subject becomes a key and a log field: keep it plain.
        if flashsale_domain::UserId::check(&principal.user_id).is_err() {
            return Err(GatewayError::Unauthenticated);
        }
        self.verified.insert(token.to_owned(), (principal.clone(), expires));
        Ok(principal)
    }
}

/// Mints a token (development and tests; production tokens come from an identity provider).
pub fn mint(secret: &str, sub: &str, admin: bool, ttl: Duration) -> Result<String, jsonwebtoken::errors::Error> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let claims = Claims {
        sub: sub.to_owned(),
        exp: (now + ttl).as_secs(),
        roles: if admin { vec![ADMIN_ROLE.to_owned()] } else { Vec::new() },
        iss: None,
        aud: None,
    };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "test-secret-test-secret-test-secret!";

    #[tokio::test]
    async fn a_minted_token_authenticates_its_subject() {
        let auth = Authenticator::new(SECRET, None, None);
        let token = mint(SECRET, "alice", false, Duration::from_secs(60)).unwrap();
        let principal = auth.authenticate_header(Some(&format!("Bearer {token}"))).await.unwrap();
        assert_eq!(principal, Principal { user_id: "alice".into(), admin: false });
        let admin = mint(SECRET, "ops", true, Duration::from_secs(60)).unwrap();
        assert!(auth.verify(&admin).await.unwrap().admin);
    }

    #[tokio::test]
    async fn wrong_expired_or_missing_tokens_are_refused() {
        let auth = Authenticator::new(SECRET, None, None);
        let other = mint("another-secret-another-secret-xx", "alice", false, Duration::from_secs(60)).unwrap();
        assert!(auth.verify(&other).await.is_err());
        let claims = Claims { sub: "alice".into(), exp: 1, roles: vec![], iss: None, aud: None };
        let expired =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes()))
                .unwrap();
        assert!(auth.verify(&expired).await.is_err());
        assert!(auth.authenticate_header(None).await.is_err());
        assert!(auth.authenticate_header(Some("Basic abc")).await.is_err());
        // The algorithm is pinned: the same secret under HS512 is refused.
        let claims = Claims { sub: "alice".into(), exp: u64::MAX / 2, roles: vec![], iss: None, aud: None };
        let hs512 =
            jsonwebtoken::encode(&Header::new(Algorithm::HS512), &claims, &EncodingKey::from_secret(SECRET.as_bytes()))
                .unwrap();
        assert!(auth.verify(&hs512).await.is_err());
    }

    #[tokio::test]
    async fn a_cached_token_still_expires_and_a_tampered_one_is_still_refused() {
        let auth = Authenticator::new(SECRET, None, None);
        let token = mint(SECRET, "alice", false, Duration::from_secs(60)).unwrap();
        assert_eq!(auth.verify(&token).await.unwrap().user_id, "alice");
        // Served from the cache the second time, with the same answer.
        assert_eq!(auth.verify(&token).await.unwrap().user_id, "alice");
        // A token that differs by one signature character is not the cached one
        // (a character well inside the signature: the last one has padding bits).
        let at = token.len() - 10;
        let swapped = if &token[at..=at] == "A" { "B" } else { "A" };
        let tampered = format!("{}{swapped}{}", &token[..at], &token[at + 1..]);
        assert!(auth.verify(&tampered).await.is_err());
        // An entry past its `exp` is not trusted: the token is checked afresh (and refused).
        let claims = Claims { sub: "bob".into(), exp: 1, roles: vec![], iss: None, aud: None };
        let expired =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes()))
                .unwrap();
        auth.verified.insert(expired.clone(), (Principal { user_id: "bob".into(), admin: false }, 1));
        assert!(auth.verify(&expired).await.is_err());
    }
}
