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
        self.leaf_with(dir, file, cn, None, "localhost")
    }

    /// As [`Ca::leaf`], with serial number `serial` (for [`Ca::crl`]) when given, and `dns`
    /// as its DNS name instead of localhost.
    pub fn leaf_with(
        &self,
        dir: &Path,
        file: &str,
        cn: &str,
        serial: Option<u64>,
        dns: &str,
    ) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::new(vec![dns.to_string()]).expect("leaf params");
        if let Some(serial) = serial {
            params.serial_number = Some(rcgen::SerialNumber::from(serial));
        }
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

    /// As [`Ca::connector`], presenting `leaf` as the client certificate.
    pub fn client_connector(
        &self,
        alpn: &[u8],
        leaf: &Leaf,
    ) -> (
        tokio_rustls::TlsConnector,
        tokio_rustls::rustls::pki_types::ServerName<'static>,
    ) {
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = tokio_rustls::rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).expect("the CA"))
            .unwrap();
        let chain = vec![CertificateDer::from_pem_file(&leaf.cert).expect("the leaf")];
        let key = PrivateKeyDer::from_pem_file(&leaf.key).expect("the leaf's key");
        let mut config = tokio_rustls::rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .expect("a client certificate");
        config.alpn_protocols = vec![alpn.to_vec()];
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
        (
            tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)),
            name,
        )
    }

    /// A certificate revocation list of this CA revoking the certificates numbered `serials`,
    /// written to `dir/<file>` (PEM).
    pub fn crl(&self, dir: &Path, file: &str, serials: &[u64]) -> PathBuf {
        let issuer = self.params.clone().self_signed(&self.key).expect("issuer");
        let crl = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2024, 1, 1),
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(*s),
                    revocation_time: rcgen::date_time_ymd(2024, 1, 1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&issuer, &self.key)
        .expect("sign CRL");
        let path = dir.join(file);
        std::fs::write(&path, crl.pem().expect("CRL PEM")).unwrap();
        path
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
