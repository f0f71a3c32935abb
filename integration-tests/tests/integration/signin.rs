//! OpenID Connect sign-in, against a test identity provider over real HTTP
//! (discovery, JWKS, RS256 and ES256 keys): the JWT abuse table over gRPC and
//! REST, roles from a namespaced claim, a key rotation picked up without a
//! restart, and the bound on key-set fetches under a flood of unknown `kid`s.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use flashsale_gateway::config::OidcConfig;
use flashsale_integration_tests::TestSuite;
use flashsale_integration_tests::idp::{SigningKey, TestIdentityProvider};
use flashsale_integration_tests::suite::{JWT_SECRET, SuiteOptions, with_token};
use flashsale_proto::gateway::v1::{GetItemStatsRequest, ListOrdersRequest};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::time::Instant;

const AUDIENCE: &str = "https://flashsale.test/api";
/// Where the provider puts roles (Auth0 wants a namespaced claim).
const ROLES_CLAIM: &str = "https://flashsale.test/roles";

fn oidc(idp: &TestIdentityProvider, min_refetch_ms: u64) -> OidcConfig {
    OidcConfig {
        issuer: Some(idp.issuer.clone()),
        audience: Some(AUDIENCE.into()),
        jwks_url: None,
        jwks_file: None,
        roles_claim: ROLES_CLAIM.into(),
        jwks_min_refetch_ms: min_refetch_ms,
        client_id: None,
    }
}

async fn suite_signing_in_with(idp: &TestIdentityProvider, min_refetch_ms: u64) -> anyhow::Result<TestSuite> {
    TestSuite::spawn_with(SuiteOptions { gateway_oidc: Some(oidc(idp, min_refetch_ms)), ..Default::default() }).await
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// Good claims for `sub`, with `changes` laid over them (`null` removes one).
fn claims(idp: &TestIdentityProvider, sub: &str, changes: Value) -> Value {
    let mut claims = idp.claims(sub, AUDIENCE);
    if let Value::Object(changes) = changes {
        for (name, value) in changes {
            if value.is_null() {
                claims.remove(&name);
            } else {
                claims.insert(name, value);
            }
        }
    }
    Value::Object(claims)
}

/// A buyer's read over gRPC: Ok, or the status code.
async fn grpc_read(suite: &TestSuite, token: &str) -> Result<(), tonic::Code> {
    let request = with_token(ListOrdersRequest { page_size: 1, page_token: String::new() }, token);
    suite.buyers().list_orders(request).await.map(|_| ()).map_err(|status| status.code())
}

/// The same read over REST: the HTTP status.
async fn rest_read(suite: &TestSuite, token: &str) -> anyhow::Result<u16> {
    let response =
        reqwest::Client::new().get(format!("{}/v1/orders", suite.http_url())).bearer_auth(token).send().await?;
    Ok(response.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_and_misdirected_tokens_are_unauthenticated_over_grpc_and_rest() -> anyhow::Result<()> {
    let idp = TestIdentityProvider::start().await?;
    let another_issuer = TestIdentityProvider::start().await?;
    let suite = suite_signing_in_with(&idp, 60_000).await?;
    let (rsa, ec) = (idp.key("rsa-0")?, idp.key("ec-0")?);
    let good = claims(&idp, "alice", json!({}));

    // Good tokens pass, of either algorithm, with `aud` a string or an array.
    let with_audiences = claims(&idp, "alice", json!({ "aud": ["another-api", AUDIENCE] }));
    for (what, token) in [
        ("RS256", rsa.sign(&good)?),
        ("ES256", ec.sign(&good)?),
        ("aud as an array", rsa.sign(&with_audiences)?),
        ("nbf and exp within the clock skew", rsa.sign(&claims(&idp, "alice", json!({ "nbf": now() + 10 })))?),
    ] {
        assert_eq!(grpc_read(&suite, &token).await, Ok(()), "{what} over gRPC");
        assert_eq!(rest_read(&suite, &token).await?, 200, "{what} over REST");
    }

    // The admin role comes from the configured claim only.
    let stats = |token: String| {
        let mut admin = suite.admin();
        async move {
            let request = with_token(GetItemStatsRequest { item_id: "no-such-item".into() }, &token);
            admin.get_item_stats(request).await.map(|_| ()).map_err(|status| status.code())
        }
    };
    let operator = rsa.sign(&claims(&idp, "operator", json!({ ROLES_CLAIM: ["admin"] })))?;
    assert_eq!(stats(operator).await, Err(tonic::Code::NotFound), "an admin is let past the role check");
    let plain_roles = rsa.sign(&claims(&idp, "operator", json!({ "roles": ["admin"] })))?;
    assert_eq!(stats(plain_roles).await, Err(tonic::Code::PermissionDenied), "roles outside the configured claim");

    // The abuse table: each refused as UNAUTHENTICATED on both doors.
    let signed = rsa.sign(&good)?;
    let segments: Vec<&str> = signed.split('.').collect();
    let encode = |value: &Value| URL_SAFE_NO_PAD.encode(value.to_string());
    let alg_none = format!("{}.{}.", encode(&json!({ "alg": "none", "typ": "JWT", "kid": "rsa-0" })), segments[1]);
    let confusion = {
        // HS256 "signed" with the RSA key's public PEM, which anyone can read.
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some("rsa-0".into());
        let secret = jsonwebtoken::EncodingKey::from_secret(rsa.public_pem.as_bytes());
        jsonwebtoken::encode(&header, &good, &secret)?
    };
    let tampered = format!(
        "{}.{}.{}",
        segments[0],
        encode(&claims(&idp, "mallory", json!({ ROLES_CLAIM: ["admin"] }))),
        segments[2]
    );
    let stray = SigningKey::rsa("rsa-stray")?;
    let development = flashsale_gateway::auth::mint(JWT_SECRET, "alice", true, Duration::from_secs(600))?;
    let cases = [
        ("alg none", alg_none),
        ("HS256 against the RSA key (algorithm confusion)", confusion),
        ("an HS256 development token while OIDC is on", development),
        ("wrong iss", rsa.sign(&claims(&idp, "alice", json!({ "iss": "https://evil.example/" })))?),
        ("wrong aud", rsa.sign(&claims(&idp, "alice", json!({ "aud": "another-api" })))?),
        ("aud array without ours", rsa.sign(&claims(&idp, "alice", json!({ "aud": ["a", "b"] })))?),
        ("expired", rsa.sign(&claims(&idp, "alice", json!({ "exp": now() - 120 })))?),
        ("nbf in the future", rsa.sign(&claims(&idp, "alice", json!({ "nbf": now() + 300 })))?),
        ("no sub", rsa.sign(&claims(&idp, "alice", json!({ "sub": null })))?),
        ("no exp", rsa.sign(&claims(&idp, "alice", json!({ "exp": null })))?),
        ("unknown kid", stray.sign(&good)?),
        ("tampered payload", tampered),
        ("a key of another issuer under a kid we hold", another_issuer.key("rsa-0")?.sign(&good)?),
        ("an ES256 token naming the RSA key", ec.sign_as("rsa-0", &good)?),
        ("an RS256 token naming the P-256 key", rsa.sign_as("ec-0", &good)?),
        ("not a JWT", "not-a-token".to_owned()),
    ];
    for (what, token) in &cases {
        assert_eq!(grpc_read(&suite, token).await, Err(tonic::Code::Unauthenticated), "{what} over gRPC");
        assert_eq!(rest_read(&suite, token).await?, 401, "{what} over REST");
    }
    eprintln!("sign-in: {} forged or misdirected tokens refused on gRPC and REST", cases.len());
    suite.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_is_used_without_a_restart_and_unknown_kids_fetch_keys_at_a_bounded_rate() -> anyhow::Result<()> {
    const MIN_REFETCH: Duration = Duration::from_millis(1000);
    let idp = TestIdentityProvider::start().await?;
    let min_refetch_ms = u64::try_from(MIN_REFETCH.as_millis())?;
    let suite = suite_signing_in_with(&idp, min_refetch_ms).await?;
    let first = idp.key("rsa-0")?.sign(&claims(&idp, "alice", json!({})))?;
    assert_eq!(grpc_read(&suite, &first).await, Ok(()));

    // Rotation: a token of the new key passes once the set is fetched again
    // (at most one interval after the last fetch), with no restart.
    let rotated = idp.rotate()?;
    let token = rotated.sign(&claims(&idp, "alice", json!({})))?;
    let from = Instant::now();
    while grpc_read(&suite, &token).await.is_err() {
        anyhow::ensure!(from.elapsed() < MIN_REFETCH * 10, "the rotated key was never picked up");
        // A client retrying after UNAUTHENTICATED, not a wait for a condition.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let picked_up_in = from.elapsed();
    // The withdrawn key signs nothing new that passes (a token not seen before).
    let withdrawn = idp.key("rsa-0").is_err();
    assert!(withdrawn, "the provider still publishes the old key");
    let stale = SigningKey::rsa("rsa-0")?.sign(&claims(&idp, "bob", json!({})))?;
    assert_eq!(grpc_read(&suite, &stale).await, Err(tonic::Code::Unauthenticated));

    // A flood of made-up kids: every one refused, the provider asked at most
    // once per interval (plus the one running when the flood began).
    let stray = SigningKey::rsa("stray")?;
    let before = idp.jwks_fetches();
    let started = Instant::now();
    let refused = futures::stream::iter(0..1000)
        .map(|n| {
            let token = stray.sign_as(&format!("kid-{n}-{}", uuid::Uuid::new_v4()), &claims(&idp, "alice", json!({})));
            let suite = &suite;
            async move {
                match token {
                    Ok(token) => grpc_read(suite, &token).await == Err(tonic::Code::Unauthenticated),
                    Err(_) => false,
                }
            }
        })
        .buffer_unordered(64)
        .filter(|refused| futures::future::ready(*refused))
        .count()
        .await;
    let flood = started.elapsed();
    let fetches = idp.jwks_fetches() - before;
    let bound = 2 + usize::try_from(flood.as_millis() / MIN_REFETCH.as_millis())?;
    assert_eq!(refused, 1000, "a token with a made-up kid passed");
    assert!(fetches <= bound, "{fetches} key-set fetches in {flood:?} of unknown kids (bound {bound})");
    // Good tokens still pass after the flood.
    assert_eq!(grpc_read(&suite, &token).await, Ok(()));
    eprintln!(
        "sign-in: rotation picked up in {picked_up_in:?}; 1000 unknown kids in {flood:?} made {fetches} key-set \
         fetches (bound {bound}, one per {MIN_REFETCH:?})"
    );
    suite.shutdown().await
}
