//! Which service may call which internal method, checked on every call
//! against the caller named when its connection was accepted.

use std::future::Ready;
use std::task::{Context, Poll};

use futures_util::future::Either;

use super::io::PeerIdentity;

/// Which callers may call each method of a server's one internal API
/// (`service`, its full gRPC name). A method not listed answers
/// `PERMISSION_DENIED` to everyone; other services on the same server (health,
/// reflection) answer any caller the CA vouches for.
#[derive(Debug)]
pub struct Callers {
    pub service: &'static str,
    pub methods: &'static [(&'static str, &'static [&'static str])],
}

impl Callers {
    /// Whether `caller` may call `path` (`/package.Service/Method`).
    pub fn allows(&self, path: &str, caller: Option<&str>) -> bool {
        let Some((service, method)) = path.strip_prefix('/').and_then(|path| path.split_once('/')) else {
            return false;
        };
        if service != self.service {
            return true;
        }
        let Some(caller) = caller else { return false };
        self.methods.iter().any(|(name, callers)| *name == method && callers.contains(&caller))
    }

    /// The methods of `service` in `proto_file` (e.g. `flashsale/wallet/v1/wallet.proto`)
    /// this table does not list: each answers `PERMISSION_DENIED` to everyone,
    /// so a service's test expects none.
    pub fn unlisted(&self, proto_file: &str) -> anyhow::Result<Vec<String>> {
        let set = crate::served_descriptors(&[proto_file])?;
        let mut unlisted = Vec::new();
        let mut found = false;
        for file in &set.file {
            for service in &file.service {
                if format!("{}.{}", file.package(), service.name()) != self.service {
                    continue;
                }
                found = true;
                for method in &service.method {
                    if !self.methods.iter().any(|(name, _)| *name == method.name()) {
                        unlisted.push(method.name().to_owned());
                    }
                }
            }
        }
        anyhow::ensure!(found, "{proto_file} defines no service {}", self.service);
        Ok(unlisted)
    }
}

/// Answers `PERMISSION_DENIED` to a call its [`Callers`] do not allow, before
/// the call reaches a handler. Off (`None`) without mutual TLS.
#[derive(Debug, Clone, Copy)]
pub struct CallerCheckLayer {
    pub callers: Option<&'static Callers>,
}

impl<S> tower::Layer<S> for CallerCheckLayer {
    type Service = CallerCheck<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallerCheck { inner, callers: self.callers }
    }
}

#[derive(Debug, Clone)]
pub struct CallerCheck<S> {
    inner: S,
    callers: Option<&'static Callers>,
}

impl<S, B, R> tower::Service<http::Request<B>> for CallerCheck<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    // The call's own future, unboxed: every call of every server (the
    // gateway's public port, where the check is off, included) passes here.
    type Future = Either<Ready<Result<Self::Response, Self::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(callers) = self.callers {
            // Named once per connection, from the certificate its handshake
            // verified (see `PeerIdentity`).
            let caller = request.extensions().get::<PeerIdentity>().and_then(|peer| peer.caller.as_deref());
            if !callers.allows(request.uri().path(), caller) {
                tracing::warn!(
                    method = request.uri().path(),
                    caller = caller.unwrap_or("(unnamed)"),
                    "internal call refused: caller not allowed"
                );
                let status = tonic::Status::permission_denied("this caller may not call this method");
                return Either::Left(std::future::ready(Ok(status.into_http())));
            }
        }
        Either::Right(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WALLET: Callers = Callers {
        service: "flashsale.wallet.v1.WalletService",
        methods: &[("Debit", &["inventory"]), ("Credit", &["inventory", "gateway"])],
    };

    #[test]
    fn only_the_listed_callers_reach_a_method() {
        let debit = "/flashsale.wallet.v1.WalletService/Debit";
        assert!(WALLET.allows(debit, Some("inventory")));
        assert!(!WALLET.allows(debit, Some("gateway")));
        assert!(!WALLET.allows(debit, None));
        assert!(WALLET.allows("/flashsale.wallet.v1.WalletService/Credit", Some("gateway")));
        // Not listed: nobody.
        assert!(!WALLET.allows("/flashsale.wallet.v1.WalletService/GetBalance", Some("inventory")));
        // Health and reflection: any verified peer.
        assert!(WALLET.allows("/grpc.health.v1.Health/Check", None));
        assert!(!WALLET.allows("no-slash", Some("inventory")));
    }
}
