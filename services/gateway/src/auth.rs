//! Bearer-token authentication: HS256 JWTs whose `sub` is the buyer and whose
//! `roles` may contain "admin". The algorithm is pinned; `exp` and `sub` are
//! required; `iss` and `aud` are checked when configured.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::error::GatewayError;

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

/// Verifies tokens.
#[derive(Clone)]
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
    /// Token → who it names and when it expires (unix seconds). Keyed by the
    /// whole token, so a hit is a token this key verified; refused tokens are
    /// never cached.
    verified: std::sync::Arc<quick_cache::sync::Cache<String, (Principal, u64)>>,
}

impl Authenticator {
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
        Self {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
            verified: std::sync::Arc::new(quick_cache::sync::Cache::new(VERIFIED_TOKENS)),
        }
    }

    /// The caller named by an `authorization: Bearer …` value, from gRPC
    /// metadata or an HTTP header alike.
    pub fn authenticate_header(&self, authorization: Option<&str>) -> Result<Principal, GatewayError> {
        let token = authorization
            .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
            .ok_or(GatewayError::Unauthenticated)?;
        self.verify(token.trim())
    }

    pub fn verify(&self, token: &str) -> Result<Principal, GatewayError> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        // A cached token is good until its `exp` (without the leeway a fresh check allows).
        if let Some((principal, expires)) = self.verified.get(token)
            && now < expires
        {
            return Ok(principal);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|_| GatewayError::Unauthenticated)?;
        let sub = data.claims.sub;
        // The subject becomes a key and a log field: keep it plain.
        if flashsale_domain::UserId::check(&sub).is_err() {
            return Err(GatewayError::Unauthenticated);
        }
        let principal = Principal { admin: data.claims.roles.iter().any(|role| role == "admin"), user_id: sub };
        self.verified.insert(token.to_owned(), (principal.clone(), data.claims.exp));
        Ok(principal)
    }
}

/// Mints a token (development and tests; production tokens come from an identity provider).
pub fn mint(secret: &str, sub: &str, admin: bool, ttl: Duration) -> Result<String, jsonwebtoken::errors::Error> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let claims = Claims {
        sub: sub.to_owned(),
        exp: (now + ttl).as_secs(),
        roles: if admin { vec!["admin".to_owned()] } else { Vec::new() },
        iss: None,
        aud: None,
    };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "test-secret-test-secret-test-secret!";

    #[test]
    fn a_minted_token_authenticates_its_subject() {
        let auth = Authenticator::new(SECRET, None, None);
        let token = mint(SECRET, "alice", false, Duration::from_secs(60)).unwrap();
        let principal = auth.authenticate_header(Some(&format!("Bearer {token}"))).unwrap();
        assert_eq!(principal, Principal { user_id: "alice".into(), admin: false });
        let admin = mint(SECRET, "ops", true, Duration::from_secs(60)).unwrap();
        assert!(auth.verify(&admin).unwrap().admin);
    }

    #[test]
    fn wrong_expired_or_missing_tokens_are_refused() {
        let auth = Authenticator::new(SECRET, None, None);
        let other = mint("another-secret-another-secret-xx", "alice", false, Duration::from_secs(60)).unwrap();
        assert!(auth.verify(&other).is_err());
        let claims = Claims { sub: "alice".into(), exp: 1, roles: vec![], iss: None, aud: None };
        let expired =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes()))
                .unwrap();
        assert!(auth.verify(&expired).is_err());
        assert!(auth.authenticate_header(None).is_err());
        assert!(auth.authenticate_header(Some("Basic abc")).is_err());
        // The algorithm is pinned: the same secret under HS512 is refused.
        let claims = Claims { sub: "alice".into(), exp: u64::MAX / 2, roles: vec![], iss: None, aud: None };
        let hs512 =
            jsonwebtoken::encode(&Header::new(Algorithm::HS512), &claims, &EncodingKey::from_secret(SECRET.as_bytes()))
                .unwrap();
        assert!(auth.verify(&hs512).is_err());
    }

    #[test]
    fn a_cached_token_still_expires_and_a_tampered_one_is_still_refused() {
        let auth = Authenticator::new(SECRET, None, None);
        let token = mint(SECRET, "alice", false, Duration::from_secs(60)).unwrap();
        assert_eq!(auth.verify(&token).unwrap().user_id, "alice");
        // Served from the cache the second time, with the same answer.
        assert_eq!(auth.verify(&token).unwrap().user_id, "alice");
        // A token that differs by one signature character is not the cached one
        // (a character well inside the signature: the last one has padding bits).
        let at = token.len() - 10;
        let swapped = if &token[at..=at] == "A" { "B" } else { "A" };
        let tampered = format!("{}{swapped}{}", &token[..at], &token[at + 1..]);
        assert!(auth.verify(&tampered).is_err());
        // An entry past its `exp` is not trusted: the token is checked afresh (and refused).
        let claims = Claims { sub: "bob".into(), exp: 1, roles: vec![], iss: None, aud: None };
        let expired =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes()))
                .unwrap();
        auth.verified.insert(expired.clone(), (Principal { user_id: "bob".into(), admin: false }, 1));
        assert!(auth.verify(&expired).is_err());
    }
}
