//! Certificates made at run time for the TLS tests: a CA, and certificates it signs for
//! 127.0.0.1 with a chosen CN. Nothing is committed.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};

/// A certificate authority that can sign leaf certificates.
pub struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pub cert_pem: String,
    pub cert_path: PathBuf,
}

/// A leaf certificate and its key, written to files.
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Ca {
    /// A new CA, its certificate written to `dir/<name>-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let cert = params.clone().self_signed(&key).expect("self-signed CA");
        let cert_pem = cert.pem();
        let cert_path = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&cert_path, &cert_pem).unwrap();
        Ca {
            params,
            key,
            cert_pem,
            cert_path,
        }
    }

    /// A certificate for 127.0.0.1/localhost with common name `cn`, usable by servers and
    /// clients, written to `dir/<file>.pem` and `dir/<file>-key.pem`.
    pub fn leaf(&self, dir: &Path, file: &str, cn: &str) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string()]).expect("leaf params");
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = self.params.clone().self_signed(&self.key).expect("issuer");
        let cert = params
            .signed_by(&key, &issuer, &self.key)
            .expect("sign leaf");
        let leaf = Leaf {
            cert: dir.join(format!("{file}.pem")),
            key: dir.join(format!("{file}-key.pem")),
        };
        std::fs::write(&leaf.cert, cert.pem()).unwrap();
        std::fs::write(&leaf.key, key.serialize_pem()).unwrap();
        leaf
    }
}

impl Ca {
    /// A TLS client trusting this CA that offers `alpn` (e.g. `h2`, `http/1.1`), and the server
    /// name its leaf certificates carry.
    pub fn connector(
        &self,
        alpn: &[u8],
    ) -> (
        tokio_rustls::TlsConnector,
        tokio_rustls::rustls::pki_types::ServerName<'static>,
    ) {
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        let mut roots = tokio_rustls::rustls::RootCertStore::empty();
        let ca = tokio_rustls::rustls::pki_types::CertificateDer::from_pem_slice(
            self.cert_pem.as_bytes(),
        )
        .expect("a PEM certificate");
        roots.add(ca).unwrap();
        let mut config = tokio_rustls::rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
        (
            tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)),
            name,
        )
    }
}

/// An ECDSA P-256 key pair for `--auth-token jwt` (ES256), written as PEM files.
pub fn jwt_keys(dir: &Path) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().expect("jwt key");
    let (private, public) = (dir.join("jwt.key"), dir.join("jwt.pub"));
    std::fs::write(&private, key.serialize_pem()).unwrap();
    std::fs::write(&public, key.public_key_pem()).unwrap();
    (private, public)
}
