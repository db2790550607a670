//! The TLS flags beyond the certificate files: `--tls-min-version`, `--tls-max-version`,
//! `--cipher-suites`, `--client-crl-file`, `--peer-crl-file`, `--peer-cert-allowed-cn`,
//! `--peer-cert-allowed-hostname`, `--auto-tls` and `--peer-auto-tls`. Each is shown acting on
//! real handshakes (raw rustls clients, etcdctl), certificates made at run time.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use crate::support;
use support::cluster::Cluster;
use support::tls::{Ca, Leaf};
use support::{free_port, Kind, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

const ECDSA_AES128: &str = "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256";
const ECDSA_AES256: &str = "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384";

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A client side: the versions and TLS 1.2 suites it offers, whom it trusts, what it shows.
struct Client<'a> {
    versions: &'a [&'static rustls::SupportedProtocolVersion],
    /// TLS 1.2 suites by name; `None`: all of rustls'.
    suites: Option<&'a [&'a str]>,
    trust: &'a Path,
    cert: Option<&'a Leaf>,
}

impl Client<'_> {
    fn config(&self) -> rustls::ClientConfig {
        let mut provider = rustls::crypto::ring::default_provider();
        if let Some(names) = self.suites {
            provider.cipher_suites.retain(|s| {
                s.version() == &rustls::version::TLS13
                    || names.contains(&format!("{:?}", s.suite()).as_str())
            });
        }
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(self.trust).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(self.versions)
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match self.cert {
            Some(leaf) => builder
                .with_client_auth_cert(
                    CertificateDer::pem_file_iter(&leaf.cert)
                        .unwrap()
                        .map(|c| c.unwrap())
                        .collect(),
                    PrivateKeyDer::from_pem_file(&leaf.key).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        config
    }

    /// Connects to 127.0.0.1:`port` (the name checked) and speaks HTTP/2 until the server's first
    /// frame: `Err` when the server refused the handshake (TLS 1.3 sends the refusal of a client
    /// certificate after the client's last flight, so the first read tells).
    async fn handshake(&self, port: u16) -> Result<(), String> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(self.config()));
        let mut tls = connector
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        // The client preface and an empty SETTINGS frame.
        let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        preface.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        tls.write_all(&preface)
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut frame = [0u8; 9];
        match tls.read(&mut frame).await {
            Ok(0) => Err("closed by the server".into()),
            Ok(_) if frame[3] == 4 => Ok(()),
            Ok(_) => Err(format!("unexpected first frame {frame:?}")),
            Err(e) => Err(format!("read: {e}")),
        }
    }
}

const TLS12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
const TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

fn etcdctl(args: &[&str]) -> Output {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--dial-timeout", "5s", "--command-timeout", "5s"])
        .args(args)
        .output()
        .expect("etcdctl")
}

/// A member whose client URLs include `https://127.0.0.1:<returned port>`, with `extra` flags.
async fn https_client_member(extra: &[&str]) -> (Server, u16) {
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let mut args = vec!["--listen-client-urls", &url];
    args.extend_from_slice(extra);
    (Server::start_with(Kind::Memory, &args).await, port)
}

/// A member whose peer URLs include `https://127.0.0.1:<returned port>`, with `extra` flags.
async fn https_peer_member(extra: &[&str]) -> (Server, u16) {
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let mut args = vec!["--listen-peer-urls", &url];
    args.extend_from_slice(extra);
    (Server::start_with(Kind::Memory, &args).await, port)
}

/// `--tls-min-version TLS1.3` refuses TLS 1.2 clients; `--tls-max-version TLS1.2` with
/// `--cipher-suites` refuses TLS 1.3 clients and TLS 1.2 clients without a listed suite, on
/// the client port (etcdctl included) and on the peer port.
#[tokio::test]
async fn tls_versions_and_cipher_suites_limit_handshakes() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "tls");
    let leaf = ca.leaf(dir.path(), "server", "member");
    let files = [
        "--cert-file",
        path(&leaf.cert),
        "--key-file",
        path(&leaf.key),
    ];
    let client = |versions, suites| Client {
        versions,
        suites,
        trust: &ca.cert_path,
        cert: None,
    };

    let mut flags = files.to_vec();
    flags.extend(["--tls-min-version", "TLS1.3"]);
    let (_tls13, port) = https_client_member(&flags).await;
    client(TLS13, None).handshake(port).await.unwrap();
    let refused = client(TLS12, None).handshake(port).await;
    assert!(
        refused.is_err(),
        "a TLS 1.2 client got through: {refused:?}"
    );

    let mut flags = files.to_vec();
    let peer_flags = [
        "--peer-cert-file",
        path(&leaf.cert),
        "--peer-key-file",
        path(&leaf.key),
        "--peer-trusted-ca-file",
        path(&ca.cert_path),
    ];
    flags.extend(peer_flags);
    let peer_port = free_port();
    let peer_url = format!("https://127.0.0.1:{peer_port}");
    flags.extend([
        "--tls-max-version",
        "TLS1.2",
        "--cipher-suites",
        ECDSA_AES256,
        "--listen-peer-urls",
        &peer_url,
    ]);
    let (_tls12, port) = https_client_member(&flags).await;
    for p in [port, peer_port] {
        client(TLS12, Some(&[ECDSA_AES256]))
            .handshake(p)
            .await
            .unwrap_or_else(|e| panic!("port {p}: {e}"));
        let refused = client(TLS12, Some(&[ECDSA_AES128])).handshake(p).await;
        assert!(refused.is_err(), "port {p}: an unlisted suite got through");
        let refused = client(TLS13, None).handshake(p).await;
        assert!(refused.is_err(), "port {p}: a TLS 1.3 client got through");
    }
    let endpoint = format!("https://127.0.0.1:{port}");
    let out = etcdctl(&[
        "--endpoints",
        &endpoint,
        "--cacert",
        path(&ca.cert_path),
        "put",
        "k",
        "v",
    ]);
    support::assert_success(&out);
}

/// Bad values stop the start with etcd's errors.
#[test]
fn bad_tls_flags_stop_the_start() {
    let dir = tempfile::tempdir().unwrap();
    for (flags, expected) in [
        (
            vec!["--cipher-suites", "TLS_BOGUS"],
            "unexpected TLS cipher suite \"TLS_BOGUS\"",
        ),
        (
            vec!["--tls-min-version", "TLS1.3", "--tls-max-version", "TLS1.2"],
            "min version (TLS1.3) is greater than max version (TLS1.2)",
        ),
        (
            vec![
                "--tls-min-version",
                "TLS1.3",
                "--cipher-suites",
                ECDSA_AES128,
            ],
            "cipher suites cannot be configured when only TLS1.3 is enabled",
        ),
        (
            vec!["--tls-max-version", "TLS1.4"],
            "unexpected TLS version \"TLS1.4\" (must be one of: TLS1.2, TLS1.3)",
        ),
        (
            vec!["--tls-min-version", "TLS1.1"],
            "--tls-min-version: TLS1.1 is not supported",
        ),
        (
            vec![
                "--peer-cert-allowed-cn",
                "a",
                "--peer-cert-allowed-hostname",
                "b",
            ],
            "--peer-cert-allowed-cn and --peer-cert-allowed-hostname are mutually exclusive",
        ),
    ] {
        let out = Command::new(support::metastore_bin())
            .args(["--data-dir", path(&dir.path().join("d"))])
            .args(&flags)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} was accepted");
        assert!(stderr.contains(expected), "{flags:?}: {stderr}");
    }
}

/// `--client-crl-file` (`side` "client") or `--peer-crl-file` ("peer"): a certificate the CRL
/// revokes is refused at the handshake, one of the same CA not in the list is accepted.
async fn revoked_certificates_are_refused(side: &str) {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), side);
    let server = ca.leaf(dir.path(), "server", "server");
    let good = ca.leaf_with(dir.path(), "good", "good", Some(1001), "localhost");
    let revoked = ca.leaf_with(dir.path(), "revoked", "revoked", Some(1002), "localhost");
    let crl = ca.crl(dir.path(), "revoked.crl", &[1002]);
    // etcd's flag names: --cert-file … --client-crl-file, --peer-cert-file … --peer-crl-file.
    let prefix = if side == "peer" { "peer-" } else { "" };
    let flags: Vec<String> = [
        ("cert-file", path(&server.cert)),
        ("key-file", path(&server.key)),
        ("trusted-ca-file", path(&ca.cert_path)),
        ("client-cert-auth", "true"),
        ("crl-file", path(&crl)),
    ]
    .iter()
    .map(|(flag, value)| {
        let flag = if *flag == "crl-file" && side == "client" {
            "client-crl-file"
        } else {
            flag
        };
        format!("--{prefix}{flag}={value}")
    })
    .collect();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (_member, port) = if side == "peer" {
        https_peer_member(&flags).await
    } else {
        https_client_member(&flags).await
    };
    let client = |cert| Client {
        versions: TLS13,
        suites: None,
        trust: &ca.cert_path,
        cert,
    };
    client(Some(&good)).handshake(port).await.unwrap();
    let refused = client(Some(&revoked)).handshake(port).await;
    assert!(refused.is_err(), "a revoked {side} certificate got through");
    if side == "client" {
        // And etcdctl with the good certificate is served.
        support::assert_success(&etcdctl(&[
            "--endpoints",
            &format!("https://127.0.0.1:{port}"),
            "--cacert",
            path(&ca.cert_path),
            "--cert",
            path(&good.cert),
            "--key",
            path(&good.key),
            "put",
            "k",
            "v",
        ]));
    }
}

#[tokio::test]
async fn revoked_client_certificates_are_refused() {
    revoked_certificates_are_refused("client").await;
}

#[tokio::test]
async fn revoked_peer_certificates_are_refused() {
    revoked_certificates_are_refused("peer").await;
}

/// `--peer-cert-allowed-cn` and `--peer-cert-allowed-hostname`: a peer certificate of the
/// trusted CA with another CN / without the host name is refused; the right one is accepted.
#[tokio::test]
async fn peer_certificates_must_carry_the_allowed_cn_or_hostname() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "peer");
    let member = ca.leaf(dir.path(), "member", "member");
    let intruder = ca.leaf(dir.path(), "intruder", "intruder");
    let named = ca.leaf_with(dir.path(), "named", "x", None, "member.example");
    let files = [
        "--peer-cert-file",
        path(&member.cert),
        "--peer-key-file",
        path(&member.key),
        "--peer-trusted-ca-file",
        path(&ca.cert_path),
    ];
    let client = |cert| Client {
        versions: TLS13,
        suites: None,
        trust: &ca.cert_path,
        cert,
    };

    let mut flags = files.to_vec();
    flags.extend(["--peer-cert-allowed-cn", "member"]);
    let (_cn, port) = https_peer_member(&flags).await;
    client(Some(&member)).handshake(port).await.unwrap();
    let refused = client(Some(&intruder)).handshake(port).await;
    assert!(refused.is_err(), "CN intruder got through");
    let refused = client(None).handshake(port).await;
    assert!(refused.is_err(), "a peer without certificate got through");

    let mut flags = files.to_vec();
    flags.extend(["--peer-cert-allowed-hostname", "member.example"]);
    let (_host, port) = https_peer_member(&flags).await;
    client(Some(&named)).handshake(port).await.unwrap();
    let refused = client(Some(&member)).handshake(port).await;
    assert!(
        refused.is_err(),
        "a certificate for localhost only got through"
    );
}

/// Three members whose certificates carry the allowed CN form a cluster and replicate.
#[tokio::test]
async fn a_cluster_forms_under_peer_cert_allowed_cn() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "peer");
    let member = ca.leaf(dir.path(), "member", "member");
    support::cluster::use_https_peers();
    let mut cluster = Cluster::start(
        Kind::Memory,
        3,
        &[
            "--peer-cert-file",
            path(&member.cert),
            "--peer-key-file",
            path(&member.key),
            "--peer-trusted-ca-file",
            path(&ca.cert_path),
            "--peer-client-cert-auth",
            "--peer-cert-allowed-cn",
            "member",
        ],
    )
    .await;
    cluster.wait_leader().await;
    cluster.etcdctl_ok(0, &["put", "k", "replicated"]);
    for i in 0..3 {
        let got = cluster.etcdctl_ok(i, &["get", "k", "--consistency=l", "--print-value-only"]);
        assert_eq!(got.trim(), "replicated", "member {i}");
    }
}

/// `--auto-tls`: https client URLs without certificate files serve a self-signed certificate
/// kept in `<data-dir>/fixtures/client`; etcdctl gets through only without verifying it.
#[tokio::test]
async fn auto_tls_serves_a_self_signed_certificate() {
    let (member, port) = https_client_member(&["--auto-tls"]).await;
    let fixtures = member.data_dir.join("fixtures").join("client");
    assert!(
        fixtures.join("cert.pem").exists(),
        "no {fixtures:?}/cert.pem"
    );
    assert!(fixtures.join("key.pem").exists(), "no {fixtures:?}/key.pem");
    let endpoint = format!("https://127.0.0.1:{port}");
    support::assert_success(&etcdctl(&[
        "--endpoints",
        &endpoint,
        "--insecure-transport=false",
        "--insecure-skip-tls-verify",
        "put",
        "k",
        "v",
    ]));
    let out = etcdctl(&[
        "--endpoints",
        &endpoint,
        "--insecure-transport=false",
        "put",
        "k",
        "v",
    ]);
    assert!(
        !out.status.success(),
        "an unverifiable certificate was trusted"
    );
    // The certificate is the one generated: trusting it as a root gets through.
    let client = Client {
        versions: TLS13,
        suites: None,
        trust: &fixtures.join("cert.pem"),
        cert: None,
    };
    client.handshake(port).await.unwrap();
}

/// `--peer-auto-tls`: https peer URLs without certificate files serve a self-signed certificate
/// kept in `<data-dir>/fixtures/peer`.
#[tokio::test]
async fn peer_auto_tls_serves_a_self_signed_certificate() {
    let (member, port) = https_peer_member(&["--peer-auto-tls"]).await;
    let cert = member
        .data_dir
        .join("fixtures")
        .join("peer")
        .join("cert.pem");
    assert!(cert.exists(), "no {cert:?}");
    let client = Client {
        versions: TLS13,
        suites: None,
        trust: &cert,
        cert: None,
    };
    client.handshake(port).await.unwrap();
}

/// Three members with `--peer-auto-tls` (each its own self-signed certificate) form a cluster:
/// they dial each other over TLS without verifying, as etcd does.
#[tokio::test]
async fn a_cluster_forms_under_peer_auto_tls() {
    support::cluster::use_https_peers();
    let mut cluster = Cluster::start(Kind::Memory, 3, &["--peer-auto-tls"]).await;
    cluster.wait_leader().await;
    cluster.etcdctl_ok(0, &["put", "k", "replicated"]);
    for i in 0..3 {
        let got = cluster.etcdctl_ok(i, &["get", "k", "--consistency=l", "--print-value-only"]);
        assert_eq!(got.trim(), "replicated", "member {i}");
    }
}
