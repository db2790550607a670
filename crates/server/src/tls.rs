//! TLS from etcd's flags: the client port (`--cert-file`, `--key-file`, `--trusted-ca-file`,
//! `--client-cert-auth`), with rustls directly, and the peer port (`--peer-*`), with rustls
//! through tonic.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::Config;

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
}

fn server_config(
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
    ca: &Option<PathBuf>,
    require_client_cert: bool,
    flags: &str,
) -> Result<Option<ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (cert, key) else {
        if require_client_cert {
            bail!("{flags}: client certificate authentication needs a certificate and key");
        }
        return Ok(None);
    };
    let identity = Identity::from_pem(read(cert, "certificate")?, read(key, "key")?);
    let mut tls = ServerTlsConfig::new().identity(identity);
    match ca {
        Some(ca) => {
            tls = tls
                .client_ca_root(Certificate::from_pem(read(ca, "CA bundle")?))
                .client_auth_optional(!require_client_cert);
        }
        None if require_client_cert => {
            bail!("{flags}: client certificate authentication needs a trusted CA file")
        }
        None => {}
    }
    Ok(Some(tls))
}

/// The client port's TLS, when `--cert-file` and `--key-file` are given (used for `https://`
/// and `unixs://` client and metrics URLs only; plain URLs stay plaintext, as in etcd).
///
/// Built here rather than by tonic because the client port also serves HTTP/1.1 (probes,
/// Prometheus scrapes): ALPN offers `h2` and `http/1.1`, where tonic's acceptor offers `h2`
/// only and so refuses a client that asks for HTTP/1.1.
pub fn client_side(cfg: &Config) -> Result<Option<TlsAcceptor>> {
    let flags = "--cert-file/--key-file/--trusted-ca-file/--client-cert-auth";
    let (Some(cert), Some(key)) = (&cfg.cert_file, &cfg.key_file) else {
        if cfg.client_cert_auth {
            bail!("{flags}: client certificate authentication needs a certificate and key");
        }
        return Ok(None);
    };
    let builder = rustls::ServerConfig::builder();
    let builder = match &cfg.trusted_ca_file {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in pem_certificates(ca, "CA bundle")? {
                roots
                    .add(cert)
                    .with_context(|| format!("{flags}: a certificate of {}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder(roots.into());
            let verifier = if cfg.client_cert_auth {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .with_context(|| format!("{flags}: the trusted CA file"))?,
            )
        }
        None if cfg.client_cert_auth => {
            bail!("{flags}: client certificate authentication needs a trusted CA file")
        }
        None => builder.with_no_client_auth(),
    };
    let key_pem = read(key, "key")?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .with_context(|| format!("{flags}: no private key in {}", key.display()))?;
    let mut config = builder
        .with_single_cert(pem_certificates(cert, "certificate")?, key)
        .with_context(|| format!("{flags}: the certificate and key"))?;
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
    pub server: Option<ServerTlsConfig>,
    /// How this member connects to `https://` peers (trusting `--peer-trusted-ca-file`,
    /// presenting its own certificate), handed to the peer network.
    pub client: Option<ClientTlsConfig>,
}

/// The peer port's TLS when the peer URLs are `https://`, and how this member connects to
/// `https://` peers.
pub fn peer_side(cfg: &Config) -> Result<PeerTls> {
    let https = cfg
        .listen_peer_urls
        .iter()
        .chain(&cfg.initial_advertise_peer_urls)
        .any(|u| u.starts_with("https://"));
    if !https {
        return Ok(PeerTls::default());
    }
    let flags = "--peer-cert-file/--peer-key-file/--peer-trusted-ca-file";
    let server = server_config(
        &cfg.peer_cert_file,
        &cfg.peer_key_file,
        &cfg.peer_trusted_ca_file,
        cfg.peer_client_cert_auth,
        flags,
    )?
    .with_context(|| format!("https:// peer URLs need {flags}"))?;
    let ca = cfg
        .peer_trusted_ca_file
        .as_ref()
        .with_context(|| format!("https:// peer URLs need --peer-trusted-ca-file ({flags})"))?;
    let mut client =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca, "CA bundle")?));
    if let (Some(cert), Some(key)) = (&cfg.peer_cert_file, &cfg.peer_key_file) {
        client = client.identity(Identity::from_pem(
            read(cert, "certificate")?,
            read(key, "key")?,
        ));
    }
    Ok(PeerTls {
        server: Some(server),
        client: Some(client),
    })
}
