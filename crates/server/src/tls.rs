//! TLS from etcd's flags: the client port (`--cert-file`, `--key-file`, `--trusted-ca-file`,
//! `--client-cert-auth`, `--client-crl-file`, `--auto-tls`) and the peer port (`--peer-*`),
//! both served with rustls directly, under the versions and cipher suites of
//! `--tls-min-version`, `--tls-max-version` and `--cipher-suites`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::HandshakeSignatureValid;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime,
};
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::config::Config;
use crate::urls;

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
}

/// The TLS versions etcd names, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Version {
    Tls12,
    Tls13,
}

/// etcd's `tlsutil.GetTLSVersion`: "" is none; TLS1.0 and TLS1.1 are names etcd knows but
/// rustls does not speak.
fn parse_version(flag: &str, text: &str) -> Result<Option<Version>> {
    match text {
        "" => Ok(None),
        "TLS1.2" => Ok(Some(Version::Tls12)),
        "TLS1.3" => Ok(Some(Version::Tls13)),
        "TLS1.0" | "TLS1.1" => {
            bail!("{flag}: {text} is not supported (MetaStore's TLS speaks TLS1.2 and TLS1.3 only)")
        }
        _ => bail!("{flag}: unexpected TLS version {text:?} (must be one of: TLS1.2, TLS1.3)"),
    }
}

/// The versions and cipher suites every TLS side of this member uses.
#[derive(Clone)]
pub struct Options {
    provider: Arc<CryptoProvider>,
    versions: Vec<&'static rustls::SupportedProtocolVersion>,
}

impl Options {
    /// Checks `--tls-min-version`, `--tls-max-version` and `--cipher-suites` as etcd does.
    pub fn from_config(cfg: &Config) -> Result<Options> {
        let min =
            parse_version("--tls-min-version", &cfg.tls_min_version)?.unwrap_or(Version::Tls12);
        let max = parse_version("--tls-max-version", &cfg.tls_max_version)?;
        if let Some(max) = max {
            if min > max {
                bail!(
                    "min version ({}) is greater than max version ({})",
                    cfg.tls_min_version,
                    cfg.tls_max_version
                );
            }
        }
        let names: Vec<&str> = cfg
            .cipher_suites
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .collect();
        if min == Version::Tls13 && !names.is_empty() {
            bail!("cipher suites cannot be configured when only TLS1.3 is enabled");
        }
        let mut provider = rustls::crypto::ring::default_provider();
        if !names.is_empty() {
            let all = provider.cipher_suites.clone();
            let name_of = |s: &rustls::SupportedCipherSuite| format!("{:?}", s.suite());
            // TLS 1.3's suites are always on (not configurable, as in Go).
            let mut chosen: Vec<_> = all
                .iter()
                .filter(|s| s.version() == &rustls::version::TLS13)
                .copied()
                .collect();
            for name in names {
                // Go also names the ChaCha20 suites without their `_SHA256`.
                let suite = all
                    .iter()
                    .find(|s| name_of(s) == name || name_of(s) == format!("{name}_SHA256"))
                    .ok_or_else(|| {
                        let known: Vec<String> = all
                            .iter()
                            .filter(|s| s.version() == &rustls::version::TLS12)
                            .map(name_of)
                            .collect();
                        anyhow!(
                            "--cipher-suites: unexpected TLS cipher suite {name:?} (supported: {})",
                            known.join(", ")
                        )
                    })?;
                if !chosen.iter().any(|c| c.suite() == suite.suite()) {
                    chosen.push(*suite);
                }
            }
            provider.cipher_suites = chosen;
        }
        let mut versions = Vec::new();
        if min <= Version::Tls12 && max.is_none_or(|m| m >= Version::Tls12) {
            versions.push(&rustls::version::TLS12);
        }
        if max.is_none_or(|m| m >= Version::Tls13) {
            versions.push(&rustls::version::TLS13);
        }
        Ok(Options {
            provider: Arc::new(provider),
            versions,
        })
    }
}

/// One TLS server side: the certificate it presents and how it checks client certificates.
struct ServerSide<'a> {
    flags: &'a str,
    cert: &'a Path,
    key: &'a Path,
    ca: Option<&'a Path>,
    require_client_cert: bool,
    crl: Option<&'a Path>,
    allowed: Allowed,
}

/// `--peer-cert-allowed-cn` / `--peer-cert-allowed-hostname`.
#[derive(Debug, Clone, Default)]
struct Allowed {
    cn: Option<String>,
    hostname: Option<String>,
}

impl Allowed {
    fn any(&self) -> bool {
        self.cn.is_some() || self.hostname.is_some()
    }
}

fn read_crls(path: &Path, flag: &str) -> Result<Vec<CertificateRevocationListDer<'static>>> {
    let bytes = read(path, "certificate revocation list")?;
    let pem = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_default();
    if !pem.is_empty() {
        return Ok(pem);
    }
    if bytes.first() == Some(&0x30) {
        // DER, as Go's x509.ParseCRL also takes.
        return Ok(vec![CertificateRevocationListDer::from(bytes)]);
    }
    bail!(
        "{flag}: no certificate revocation list in {}",
        path.display()
    )
}

fn server_config(opts: &Options, side: &ServerSide) -> Result<rustls::ServerConfig> {
    let flags = side.flags;
    let builder = rustls::ServerConfig::builder_with_provider(opts.provider.clone())
        .with_protocol_versions(&opts.versions)
        .with_context(|| format!("{flags}: TLS versions and cipher suites"))?;
    let builder = match side.ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in pem_certificates(ca, "CA bundle")? {
                roots
                    .add(cert)
                    .with_context(|| format!("{flags}: a certificate of {}", ca.display()))?;
            }
            let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.into(),
                opts.provider.clone(),
            );
            if let Some(crl) = side.crl {
                // As Go's etcd: a certificate is refused when its serial is in the list; an
                // issuer the list does not cover is no reason to refuse.
                verifier = verifier
                    .with_crls(read_crls(crl, flags)?)
                    .only_check_end_entity_revocation()
                    .allow_unknown_revocation_status();
            }
            if !side.require_client_cert && !side.allowed.any() {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier
                .build()
                .with_context(|| format!("{flags}: the trusted CA file"))?;
            let verifier: Arc<dyn ClientCertVerifier> = if side.allowed.any() {
                Arc::new(AllowedPeer {
                    inner: verifier,
                    allowed: side.allowed.clone(),
                })
            } else {
                verifier
            };
            builder.with_client_cert_verifier(verifier)
        }
        None if side.require_client_cert => {
            bail!("{flags}: client certificate authentication needs a trusted CA file")
        }
        None if side.crl.is_some() => {
            bail!("{flags}: a certificate revocation list needs a trusted CA file")
        }
        None if side.allowed.any() => {
            bail!("{flags}: allowed peer CN/hostname need --peer-trusted-ca-file")
        }
        None => builder.with_no_client_auth(),
    };
    let key_pem = read(side.key, "key")?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .with_context(|| format!("{flags}: no private key in {}", side.key.display()))?;
    builder
        .with_single_cert(pem_certificates(side.cert, "certificate")?, key)
        .with_context(|| format!("{flags}: the certificate and key"))
}

/// Refuses peer certificates whose CN or host names are not the allowed ones, after the
/// usual chain checks (etcd's `VerifyPeerCertificate` for `AllowedCN`/`AllowedHostname`).
#[derive(Debug)]
struct AllowedPeer {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Allowed,
}

impl AllowedPeer {
    fn matches(&self, der: &[u8]) -> Result<(), String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("unreadable peer certificate: {e}"))?;
        if let Some(cn) = &self.allowed.cn {
            let theirs = cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|c| c.as_str().ok())
                .unwrap_or("");
            if theirs != cn {
                return Err(format!(
                    "peer certificate CN {theirs:?} is not the allowed {cn:?}"
                ));
            }
        }
        if let Some(host) = &self.allowed.hostname {
            if !valid_for_host(&cert, host) {
                return Err(format!("peer certificate is not valid for host {host:?}"));
            }
        }
        Ok(())
    }
}

/// Whether `cert` names `host` among its subject alternative names (IP addresses compared as
/// addresses, DNS names without case, a leading `*.` matching one label), as Go's
/// `VerifyHostname`.
fn valid_for_host(cert: &x509_parser::certificate::X509Certificate, host: &str) -> bool {
    use x509_parser::extensions::GeneralName;
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip: Option<std::net::IpAddr> = host.parse().ok();
    san.value.general_names.iter().any(|name| match (name, ip) {
        (GeneralName::IPAddress(bytes), Some(ip)) => match ip {
            std::net::IpAddr::V4(v4) => *bytes == v4.octets(),
            std::net::IpAddr::V6(v6) => *bytes == v6.octets(),
        },
        (GeneralName::DNSName(dns), None) => {
            let (dns, host) = (dns.to_ascii_lowercase(), host.to_ascii_lowercase());
            let host = host.trim_end_matches('.');
            match dns.strip_prefix("*.") {
                Some(rest) => host
                    .split_once('.')
                    .is_some_and(|(first, tail)| !first.is_empty() && tail == rest),
                None => dns == host,
            }
        }
        _ => false,
    })
}

impl ClientCertVerifier for AllowedPeer {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if let Err(why) = self.matches(end_entity) {
            warn!("refused a peer connection: {why}");
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// etcd's `transport.SelfCert`: a self-signed ECDSA P-256 certificate for `hosts` in `dir`
/// (`cert.pem`, `key.pem`), kept across restarts once made.
fn self_cert(dir: &Path, hosts: &[String], years: u32) -> Result<(PathBuf, PathBuf)> {
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut names: Vec<String> = Vec::new();
    for host in hosts {
        if !names.contains(host) {
            names.push(host.clone());
        }
    }
    let key = rcgen::KeyPair::generate().context("generating a self-signed certificate's key")?;
    let mut params = rcgen::CertificateParams::new(names)
        .context("the host names of a self-signed certificate")?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "etcd");
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(365 * i64::from(years));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params
        .self_signed(&key)
        .context("signing a self-signed certificate")?;
    std::fs::write(&cert_path, cert.pem())
        .with_context(|| format!("writing {}", cert_path.display()))?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    info!(cert = %cert_path.display(), "generated a self-signed certificate");
    Ok((cert_path, key_path))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// The host names of `urls` (http(s) ones; unix sockets have none).
fn hosts_of(flag: &str, list: &[String]) -> Result<Vec<String>> {
    let mut hosts = Vec::new();
    for text in list {
        let url = urls::Url::parse(flag, text)?;
        if url.socket.is_none() {
            hosts.push(url.host);
        }
    }
    Ok(hosts)
}

/// The client port's TLS, when `--cert-file` and `--key-file` are given or `--auto-tls`
/// generates them (used for `https://` and `unixs://` client and metrics URLs only; plain URLs
/// stay plaintext, as in etcd).
///
/// The client port also serves HTTP/1.1 (probes, Prometheus scrapes): ALPN offers `h2` and
/// `http/1.1`.
pub fn client_side(cfg: &Config, opts: &Options) -> Result<Option<TlsAcceptor>> {
    let flags = "--cert-file/--key-file/--trusted-ca-file/--client-cert-auth";
    let (cert, key) = match (&cfg.cert_file, &cfg.key_file) {
        (Some(cert), Some(key)) => {
            if cfg.auto_tls {
                warn!("ignoring --auto-tls since --cert-file and --key-file are given");
            }
            (cert.clone(), key.clone())
        }
        (None, None) if cfg.auto_tls => {
            let mut hosts = hosts_of("--listen-client-urls", &cfg.listen_client_urls)?;
            hosts.extend(hosts_of("--listen-metrics-urls", &cfg.listen_metrics_urls)?);
            self_cert(
                &cfg.data_dir().join("fixtures").join("client"),
                &hosts,
                cfg.self_signed_cert_validity,
            )
            .context("--auto-tls")?
        }
        _ => {
            if cfg.client_cert_auth {
                bail!("{flags}: client certificate authentication needs a certificate and key");
            }
            if cfg.client_crl_file.is_some() {
                bail!("--client-crl-file needs client TLS (--cert-file and --key-file)");
            }
            return Ok(None);
        }
    };
    let mut config = server_config(
        opts,
        &ServerSide {
            flags,
            cert: &cert,
            key: &key,
            ca: cfg.trusted_ca_file.as_deref(),
            require_client_cert: cfg.client_cert_auth,
            crl: cfg.client_crl_file.as_deref(),
            allowed: Allowed::default(),
        },
    )?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

fn pem_certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading {what} {}", path.display()))?;
    if certs.is_empty() {
        bail!("no certificate in {what} {}", path.display());
    }
    Ok(certs)
}

/// The peer side's TLS, both ways; all `None` unless the peer URLs are `https://`.
#[derive(Default)]
pub struct PeerTls {
    /// The peer port's.
    pub server: Option<TlsAcceptor>,
    /// How this member connects to `https://` peers (trusting `--peer-trusted-ca-file`,
    /// presenting its own certificate), handed to the peer network.
    pub client: Option<metastore_peer::PeerTls>,
}

/// The peer port's TLS when the peer URLs are `https://`, and how this member connects to
/// `https://` peers.
pub fn peer_side(cfg: &Config, opts: &Options) -> Result<PeerTls> {
    if cfg.peer_cert_allowed_cn.is_some() && cfg.peer_cert_allowed_hostname.is_some() {
        bail!(
            "--peer-cert-allowed-cn and --peer-cert-allowed-hostname are mutually exclusive \
             (cn={:?}, hostname={:?})",
            cfg.peer_cert_allowed_cn.as_deref().unwrap_or_default(),
            cfg.peer_cert_allowed_hostname
                .as_deref()
                .unwrap_or_default()
        );
    }
    let https = cfg
        .listen_peer_urls
        .iter()
        .chain(&cfg.initial_advertise_peer_urls)
        .any(|u| u.starts_with("https://"));
    if !https {
        return Ok(PeerTls::default());
    }
    let flags = "--peer-cert-file/--peer-key-file/--peer-trusted-ca-file";
    let client_builder = rustls::ClientConfig::builder_with_provider(opts.provider.clone())
        .with_protocol_versions(&opts.versions)
        .with_context(|| format!("{flags}: TLS versions and cipher suites"))?;
    let (server, client) = match (&cfg.peer_cert_file, &cfg.peer_key_file) {
        (Some(cert), Some(key)) => {
            if cfg.peer_auto_tls {
                warn!(
                    "ignoring --peer-auto-tls since --peer-cert-file and --peer-key-file are given"
                );
            }
            let server = server_config(
                opts,
                &ServerSide {
                    flags,
                    cert,
                    key,
                    ca: cfg.peer_trusted_ca_file.as_deref(),
                    require_client_cert: cfg.peer_client_cert_auth,
                    crl: cfg.peer_crl_file.as_deref(),
                    allowed: Allowed {
                        cn: cfg.peer_cert_allowed_cn.clone(),
                        hostname: cfg.peer_cert_allowed_hostname.clone(),
                    },
                },
            )?;
            let ca = cfg.peer_trusted_ca_file.as_ref().with_context(|| {
                format!("https:// peer URLs need --peer-trusted-ca-file ({flags})")
            })?;
            let mut roots = rustls::RootCertStore::empty();
            for c in pem_certificates(ca, "CA bundle")? {
                roots
                    .add(c)
                    .with_context(|| format!("{flags}: a certificate of {}", ca.display()))?;
            }
            let client = client_builder
                .with_root_certificates(roots)
                .with_client_auth_cert(
                    pem_certificates(cert, "certificate")?,
                    private_key(key, flags)?,
                )
                .with_context(|| format!("{flags}: the certificate and key"))?;
            (server, client)
        }
        (None, None) if cfg.peer_auto_tls => {
            // etcd's self-signed peer TLS: no CA, so peers' certificates are not verified either
            // way (the CA-based checks cannot apply).
            if cfg.peer_client_cert_auth
                || cfg.peer_crl_file.is_some()
                || cfg.peer_cert_allowed_cn.is_some()
                || cfg.peer_cert_allowed_hostname.is_some()
            {
                bail!(
                    "--peer-auto-tls: --peer-client-cert-auth, --peer-crl-file and \
                     --peer-cert-allowed-* need a CA (--peer-trusted-ca-file and certificate files)"
                );
            }
            let mut hosts = hosts_of("--listen-peer-urls", &cfg.listen_peer_urls)?;
            hosts.extend(hosts_of(
                "--initial-advertise-peer-urls",
                &cfg.initial_advertise_peer_urls,
            )?);
            let (cert, key) = self_cert(
                &cfg.data_dir().join("fixtures").join("peer"),
                &hosts,
                cfg.self_signed_cert_validity,
            )
            .context("--peer-auto-tls")?;
            let server = server_config(
                opts,
                &ServerSide {
                    flags,
                    cert: &cert,
                    key: &key,
                    ca: None,
                    require_client_cert: false,
                    crl: None,
                    allowed: Allowed::default(),
                },
            )?;
            let client = client_builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(opts.provider.clone())))
                .with_client_auth_cert(
                    pem_certificates(&cert, "certificate")?,
                    private_key(&key, flags)?,
                )
                .context("--peer-auto-tls: the generated certificate and key")?;
            (server, client)
        }
        _ => bail!("https:// peer URLs need {flags} (or --peer-auto-tls)"),
    };
    let mut server = server;
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut client = client;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(PeerTls {
        server: Some(TlsAcceptor::from(Arc::new(server))),
        client: Some(Arc::new(client)),
    })
}

fn private_key(path: &Path, flags: &str) -> Result<PrivateKeyDer<'static>> {
    let pem = read(path, "key")?;
    PrivateKeyDer::from_pem_slice(&pem)
        .with_context(|| format!("{flags}: no private key in {}", path.display()))
}

/// `--peer-auto-tls`'s dialing side: Go's `InsecureSkipVerify`, as etcd sets for self-signed
/// peer certificates (the handshake's signatures are still checked).
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
