//! TLS from etcd's flags: the client port (`--cert-file`, `--key-file`, `--trusted-ca-file`,
//! `--client-cert-auth`) and the peer port (`--peer-*`), with rustls through tonic.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
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
/// client URLs only; plain `http://` URLs stay plaintext, as in etcd).
pub fn client_side(cfg: &Config) -> Result<Option<ServerTlsConfig>> {
    server_config(
        &cfg.cert_file,
        &cfg.key_file,
        &cfg.trusted_ca_file,
        cfg.client_cert_auth,
        "--cert-file/--key-file/--trusted-ca-file/--client-cert-auth",
    )
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
