//! A certificate authority of a test's own, for mutual TLS between the
//! services: it issues each service a certificate naming it
//! (`spiffe://flashsale.test/<service>`) and valid for 127.0.0.1 and
//! `localhost`, written as PEM files the services read at start.

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
        Ok(Self { dir, ca: Issuer::new(params, key), ca_file })
    }

    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// A certificate for `service` signed by this CA, as the files a service reads.
    pub fn issue(&self, service: &str) -> anyhow::Result<flashsale_server::TlsArgs> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, service);
        params.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params.subject_alt_names.push(SanType::URI(format!("spiffe://flashsale.test/{service}").try_into()?));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.ca)?;
        let (cert_file, key_file) = (self.dir.join(format!("{service}.pem")), self.dir.join(format!("{service}.key")));
        std::fs::write(&cert_file, cert.pem())?;
        std::fs::write(&key_file, key.serialize_pem())?;
        Ok(flashsale_server::TlsArgs {
            tls_cert_file: Some(cert_file),
            tls_key_file: Some(key_file),
            tls_ca_file: Some(self.ca_file.clone()),
        })
    }
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
