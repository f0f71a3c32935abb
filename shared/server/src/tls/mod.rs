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
//!
//! The files are read again every `TLS_RELOAD_INTERVAL_MS` (cert-manager and
//! SPIRE renew certificates every few hours). New connections, in and out, use
//! what was read last; connections already open keep the certificates they were
//! made with until they close (servers rotate every connection within
//! [`crate::MAX_CONNECTION_AGE`]), so a renewal drops no call. Files that do not
//! make a whole (a certificate whose key is not written yet, say, halfway
//! through a renewal) are not used, nor files read differently on two reads
//! running (caught mid-update): the previous set stays until two reads in a row
//! find the same whole one.
//!
//! tonic's own TLS reads its certificates once, when the server or channel is
//! built, and hides the handshake; so the TLS here is rustls driven directly
//! ([`io`]): one `ServerConfig` and one `ClientConfig` per set of files, swapped
//! whole when the files change.

mod callers;
mod io;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

pub use callers::{CallerCheck, CallerCheckLayer, Callers};
pub(crate) use io::incoming;
pub use io::{PeerIdentity, TlsConnection, TlsConnector};

/// The certificate files of a service (all three, or none for plaintext).
#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate (chain) this service presents to its callers and to the
    /// services it calls; enables mutual TLS between the services.
    #[arg(long, env = "TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `TLS_CERT_FILE`.
    #[arg(long, env = "TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// PEM certificate(s) of the CA that signs every service's certificate
    /// (several during a change of CA: the old and the new).
    #[arg(long, env = "TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// How often the three files are read again for a renewed certificate or CA.
    #[arg(long, env = "TLS_RELOAD_INTERVAL_MS", default_value_t = 10_000)]
    pub tls_reload_interval_ms: u64,
}

impl Default for TlsArgs {
    fn default() -> Self {
        Self { tls_cert_file: None, tls_key_file: None, tls_ca_file: None, tls_reload_interval_ms: 10_000 }
    }
}

/// A service's certificate, key and CA, kept current with their files.
/// Clones share one current set.
#[derive(Clone)]
pub struct MutualTls {
    shared: Arc<Shared>,
}

struct Shared {
    files: [PathBuf; 3],
    every: Duration,
    current: RwLock<Arc<Loaded>>,
    /// Whole sets taken into use so far (1 after `load`).
    applied: std::sync::atomic::AtomicU64,
    /// Files read at the last tick that differed from the set in use; they
    /// are taken into use when the next tick reads them the same again.
    pending: std::sync::Mutex<Option<[Vec<u8>; 3]>>,
}

/// One whole set of files, and the TLS configurations made of it.
struct Loaded {
    /// The bytes of the certificate, key and CA files, as read.
    read: [Vec<u8>; 3],
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    /// The first DNS name of our own certificate: the name the `health`
    /// command expects of the server it checks on this host.
    own_dns_name: Option<String>,
    /// When our own certificate expires (seconds since the epoch).
    not_after: i64,
}

impl std::fmt::Debug for MutualTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("MutualTls").field("files", &self.shared.files).finish_non_exhaustive()
    }
}

impl MutualTls {
    /// Reads the files `args` names: `None` when none is set, an error when
    /// only some are, or they cannot be read, parsed or do not match.
    pub fn load(args: &TlsArgs) -> anyhow::Result<Option<Self>> {
        let files = match (&args.tls_cert_file, &args.tls_key_file, &args.tls_ca_file) {
            (None, None, None) => return Ok(None),
            (Some(cert), Some(key), Some(ca)) => [cert.clone(), key.clone(), ca.clone()],
            _ => anyhow::bail!("TLS_CERT_FILE, TLS_KEY_FILE and TLS_CA_FILE go together: set all three or none"),
        };
        anyhow::ensure!(args.tls_reload_interval_ms > 0, "TLS_RELOAD_INTERVAL_MS must be above 0");
        let loaded = Loaded::parse(&files, read_all(&files)?)?;
        record(&loaded);
        Ok(Some(Self {
            shared: Arc::new(Shared {
                files,
                every: Duration::from_millis(args.tls_reload_interval_ms),
                current: RwLock::new(Arc::new(loaded)),
                applied: std::sync::atomic::AtomicU64::new(1),
                pending: std::sync::Mutex::new(None),
            }),
        }))
    }

    /// Reads the files again every `TLS_RELOAD_INTERVAL_MS` for as long as
    /// any clone of `self` lives (call it once, from a runtime).
    pub fn watch(&self) {
        let shared = Arc::downgrade(&self.shared);
        let every = self.shared.every;
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(shared) = shared.upgrade() else { return };
                let this = MutualTls { shared };
                // Small files, but file reads block: off the async workers.
                match tokio::task::spawn_blocking(move || this.reload()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        metrics::counter!("flashsale_tls_reloads_total", "outcome" => "refused").increment(1);
                        tracing::warn!(
                            error = format!("{e:#}"),
                            "TLS files changed but do not make a whole set; keeping the previous one"
                        );
                    }
                    Err(e) => tracing::warn!(error = %e, "TLS reload task failed"),
                }
            }
        });
    }

    /// Reads the files; when they differ from the set in use, are read the
    /// same on two ticks running (not caught mid-update: three files cannot be
    /// read at one instant) and make a whole set, new connections use it from
    /// now on. `Ok(true)` when it did.
    fn reload(&self) -> anyhow::Result<bool> {
        // One reload at a time: the check and the swap go together.
        let mut pending = self.shared.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let read = read_all(&self.shared.files)?;
        if read == self.current().read {
            *pending = None;
            return Ok(false);
        }
        if pending.as_ref() != Some(&read) {
            *pending = Some(read);
            return Ok(false);
        }
        *pending = None;
        let loaded = Loaded::parse(&self.shared.files, read)?;
        record(&loaded);
        metrics::counter!("flashsale_tls_reloads_total", "outcome" => "applied").increment(1);
        tracing::info!(
            not_after = loaded.not_after,
            "TLS certificate, key and CA read again: new connections use them"
        );
        *self.shared.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(loaded);
        self.shared.applied.fetch_add(1, std::sync::atomic::Ordering::Release);
        Ok(true)
    }

    /// How many whole sets of files have been taken into use: 1 after
    /// [`MutualTls::load`], one more for each renewal read since.
    pub fn sets_applied(&self) -> u64 {
        self.shared.applied.load(std::sync::atomic::Ordering::Acquire)
    }

    fn current(&self) -> Arc<Loaded> {
        self.shared.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The server side of a new connection: present our certificate, require
    /// one the CA signed from the caller.
    pub(crate) fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.current().server.clone()
    }

    /// The client side of a new connection: present our certificate, trust
    /// only servers the CA signed.
    pub(crate) fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.current().client.clone()
    }

    /// The files as tonic's own client configuration (the `health` command's
    /// one-off check; the services' channels use [`TlsConnector`]).
    pub fn client(&self) -> ClientTlsConfig {
        let [cert, key, ca] = self.current().read.clone();
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).identity(Identity::from_pem(cert, key))
    }

    /// A connector for a channel to another service: a TLS handshake with
    /// the current files on every new connection.
    pub fn connector(&self) -> TlsConnector {
        TlsConnector::new(self.clone())
    }

    /// What the `health` command expects the server on this host to be called.
    pub fn own_dns_name(&self) -> Option<String> {
        self.current().own_dns_name.clone()
    }
}

fn read_all(files: &[PathBuf; 3]) -> anyhow::Result<[Vec<u8>; 3]> {
    let read = |path: &PathBuf| std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    Ok([read(&files[0])?, read(&files[1])?, read(&files[2])?])
}

/// The expiry of the certificate in use, for the alert before it lapses.
fn record(loaded: &Loaded) {
    metrics::gauge!("flashsale_tls_certificate_not_after_seconds").set(loaded.not_after as f64);
}

impl Loaded {
    fn parse(files: &[PathBuf; 3], read: [Vec<u8>; 3]) -> anyhow::Result<Self> {
        let [cert_file, key_file, ca_file] = files.each_ref().map(|path| path.display().to_string());
        let chain = CertificateDer::pem_slice_iter(&read[0])
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("TLS_CERT_FILE {cert_file}: reading PEM"))?;
        let first = chain.first().with_context(|| format!("TLS_CERT_FILE {cert_file} holds no PEM certificate"))?;
        let (own_dns_name, not_after) = {
            let (_, cert) = x509_parser::parse_x509_certificate(first.as_ref())
                .map_err(|e| anyhow::anyhow!("TLS_CERT_FILE {cert_file}: {e}"))?;
            (dns_names(first.as_ref()).into_iter().next(), cert.validity().not_after.timestamp())
        };
        let key = PrivateKeyDer::from_pem_slice(&read[1])
            .map_err(|e| anyhow::anyhow!("TLS_KEY_FILE {key_file}: no PEM private key ({e})"))?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&read[2]) {
            let ca = ca.with_context(|| format!("TLS_CA_FILE {ca_file}: reading PEM"))?;
            roots.add(ca).with_context(|| format!("TLS_CA_FILE {ca_file}: a certificate that cannot be parsed"))?;
        }
        anyhow::ensure!(!roots.is_empty(), "TLS_CA_FILE {ca_file} holds no PEM certificate");
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .context("the client certificate verifier")?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .with_context(|| format!("TLS_CERT_FILE {cert_file} and TLS_KEY_FILE {key_file} do not match"))?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .with_context(|| format!("TLS_CERT_FILE {cert_file} and TLS_KEY_FILE {key_file} do not match"))?;
        client.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self { read, server: Arc::new(server), client: Arc::new(client), own_dns_name, not_after })
    }
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
