//! A certificate authority of a test's own, for mutual TLS between the
//! services: it issues each service a certificate naming it
//! (`spiffe://flashsale.test/<service>`) and valid for 127.0.0.1 and
//! `localhost`, written as PEM files the services read (at start, and again
//! every 200 ms here, so a test can renew them under running services).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

pub struct TestPki {
    dir: PathBuf,
    ca: Issuer<'static, KeyPair>,
    ca_file: PathBuf,
    /// The CA's own certificate, as PEM.
    ca_pem: String,
}

impl TestPki {
    /// A new CA, its certificate written to a fresh temporary directory.
    pub fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("fs-pki-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "flash sale test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key)?;
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, cert.pem())?;
        Ok(Self { dir, ca: Issuer::new(params, key), ca_file, ca_pem: cert.pem() })
    }

    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// A certificate for `service` signed by this CA, as the files a service reads.
    pub fn issue(&self, service: &str) -> anyhow::Result<flashsale_server::TlsArgs> {
        self.issue_into(&self.dir, service)
    }

    /// Renews `service`'s certificate in this CA's files, signed by `issuer`
    /// (this CA, or the next one during a change of CA): the key first, then
    /// the certificate, each replaced whole (written aside, then renamed), as
    /// a secret volume is updated. Between the two the files do not match.
    pub fn renew(&self, service: &str, issuer: &TestPki) -> anyhow::Result<()> {
        issuer.issue_into(&self.dir, service).map(|_| ())
    }

    /// Replaces this CA's trust file (every service's `TLS_CA_FILE`) with the
    /// certificates of `cas`: two during a change of CA, then the new one alone.
    pub fn trust(&self, cas: &[&TestPki]) -> anyhow::Result<()> {
        let bundle: String = cas.iter().map(|ca| ca.ca_pem.as_str()).collect();
        replace(&self.ca_file, bundle.as_bytes())
    }

    /// A certificate for `service` signed by this CA, and its key, as PEM,
    /// written nowhere (a test client's identity).
    pub fn mint(&self, service: &str) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, service);
        params.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params.subject_alt_names.push(SanType::URI(format!("spiffe://flashsale.test/{service}").try_into()?));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.ca)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    fn issue_into(&self, dir: &Path, service: &str) -> anyhow::Result<flashsale_server::TlsArgs> {
        let (cert, key) = self.mint(service)?;
        let (cert_file, key_file) = (dir.join(format!("{service}.pem")), dir.join(format!("{service}.key")));
        replace(&key_file, key.as_bytes())?;
        replace(&cert_file, cert.as_bytes())?;
        Ok(flashsale_server::TlsArgs {
            tls_cert_file: Some(cert_file),
            tls_key_file: Some(key_file),
            tls_ca_file: Some(dir.join("ca.pem")),
            tls_reload_interval_ms: 200,
        })
    }
}

/// Writes `path` whole: aside first, then renamed over it, so a reader sees
/// the old file or the new one, never half of one.
fn replace(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let aside = path.with_extension("new");
    std::fs::write(&aside, contents)?;
    std::fs::rename(&aside, path)?;
    Ok(())
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
