//! Mutual TLS between the services, and which service may call which internal
//! method (an option; under a service mesh the mesh's mTLS and authorization
//! policies do this instead, and it stays off).
//!
//! With `TLS_CERT_FILE`, `TLS_KEY_FILE` and `TLS_CA_FILE` set, a service
//! presents its certificate to the services it calls and trusts only servers
//! whose certificate the CA signed; inventory and wallet accept only callers
//! with a certificate the CA signed, and answer each internal method only to
//! the callers their [`Callers`] table names (`PERMISSION_DENIED` to any other).
//!
//! A certificate names its service in a URI subject alternative name
//! `spiffe://<trust domain>/<service>` (e.g. `spiffe://flashsale.internal/gateway`),
//! the SPIFFE form meshes use; the last path segment is the caller's name. The
//! CA is the trust boundary: only certificates it signed are accepted at all.

use std::future::Ready;
use std::path::PathBuf;
use std::task::{Context, Poll};

use futures_util::future::Either;

use anyhow::Context as _;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The certificate files of a service (all three, or none for plaintext).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate (chain) this service presents to its callers and to the
    /// services it calls; enables mutual TLS between the services.
    #[arg(long, env = "TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `TLS_CERT_FILE`.
    #[arg(long, env = "TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// PEM certificate of the CA that signs every service's certificate.
    #[arg(long, env = "TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
}

/// A service's certificate, key and CA, read once at start.
#[derive(Clone)]
pub struct MutualTls {
    identity: Identity,
    ca: Certificate,
    /// The first DNS name of our own certificate: the name the `health`
    /// command expects of the server it checks on this host.
    own_dns_name: Option<String>,
}

impl std::fmt::Debug for MutualTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("MutualTls").field("own_dns_name", &self.own_dns_name).finish_non_exhaustive()
    }
}

impl MutualTls {
    /// Reads the files `args` names: `None` when none is set, an error when
    /// only some are, or one cannot be read or parsed.
    pub fn load(args: &TlsArgs) -> anyhow::Result<Option<Self>> {
        let (cert, key, ca) = match (&args.tls_cert_file, &args.tls_key_file, &args.tls_ca_file) {
            (None, None, None) => return Ok(None),
            (Some(cert), Some(key), Some(ca)) => (cert, key, ca),
            _ => anyhow::bail!("TLS_CERT_FILE, TLS_KEY_FILE and TLS_CA_FILE go together: set all three or none"),
        };
        let read = |path: &PathBuf| std::fs::read(path).with_context(|| format!("reading {}", path.display()));
        let (cert, key, ca) = (read(cert)?, read(key)?, read(ca)?);
        let own_dns_name = first_certificate(&cert)
            .with_context(|| format!("TLS_CERT_FILE {} holds no PEM certificate", show(&args.tls_cert_file)))?
            .and_then(|der| dns_names(&der).into_iter().next());
        anyhow::ensure!(
            first_certificate(&ca)?.is_some(),
            "TLS_CA_FILE {} holds no PEM certificate",
            show(&args.tls_ca_file)
        );
        Ok(Some(Self { identity: Identity::from_pem(cert, key), ca: Certificate::from_pem(ca), own_dns_name }))
    }

    /// The client side: present our certificate, trust only servers the CA signed.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new().ca_certificate(self.ca.clone()).identity(self.identity.clone())
    }

    /// The server side: present our certificate, require one the CA signed from every caller.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(self.identity.clone()).client_ca_root(self.ca.clone())
    }

    /// What the `health` command expects the server on this host to be called.
    pub fn own_dns_name(&self) -> Option<&str> {
        self.own_dns_name.as_deref()
    }
}

fn show(path: &Option<PathBuf>) -> String {
    path.as_ref().map(|path| path.display().to_string()).unwrap_or_default()
}

/// The first certificate of a PEM file, DER-encoded.
fn first_certificate(pem: &[u8]) -> anyhow::Result<Option<Vec<u8>>> {
    for block in x509_parser::pem::Pem::iter_from_buffer(pem) {
        let block = block.context("reading PEM")?;
        if block.label == "CERTIFICATE" {
            return Ok(Some(block.contents));
        }
    }
    Ok(None)
}

fn subject_alt_names(der: &[u8]) -> Vec<x509_parser::extensions::GeneralName<'_>> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return Vec::new() };
    match cert.subject_alternative_name() {
        Ok(Some(san)) => san.value.general_names.clone(),
        _ => Vec::new(),
    }
}

fn dns_names(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    subject_alt_names(der)
        .into_iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(dns.to_owned()),
            _ => None,
        })
        .collect()
}

/// The service a certificate names: the last path segment of its
/// `spiffe://` URI subject alternative name.
pub fn caller_name(der: &[u8]) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    subject_alt_names(der).into_iter().find_map(|name| match name {
        GeneralName::URI(uri) => {
            let (_trust_domain, path) = uri.strip_prefix("spiffe://")?.split_once('/')?;
            let service = path.rsplit('/').next()?;
            (!service.is_empty()).then(|| service.to_owned())
        }
        _ => None,
    })
}

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
            // The certificate the TLS handshake verified (the first of the chain).
            let caller = request
                .extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(TlsConnectInfo::peer_certs)
                .and_then(|certs| certs.first().and_then(|cert| caller_name(cert.as_ref())));
            if !callers.allows(request.uri().path(), caller.as_deref()) {
                tracing::warn!(
                    method = request.uri().path(),
                    caller = caller.as_deref().unwrap_or("(unnamed)"),
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
