//! Endpoints as etcd's users write them: every HTTP/2 `:authority` a grpc-go server (etcd)
//! accepts, `etcdctl --endpoints=http://…` for the per-endpoint Maintenance commands (compared
//! with what etcd prints), unix-socket and IPv6 listeners, and host names in cluster URLs.

use crate::support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use metastore_proto::etcdserverpb::StatusResponse;
use prost::Message;
use support::cluster::Cluster;
use support::{free_port, Kind, Server};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// A raw HTTP/2 client: one gRPC call (Maintenance.Status) with exactly the pseudo-headers given,
// which no HTTP library would send for a value that is not a URI authority.

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const GOAWAY: u8 = 7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK integer with an n-bit prefix (RFC 7541 §5.1); `first` holds the pattern bits.
fn hpack_int(out: &mut Vec<u8>, first: u8, prefix_bits: u32, mut value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128 + 128) as u8);
        value /= 128;
    }
    out.push(value as u8);
}

/// A header block of literal fields without indexing, names and values as raw strings: nothing
/// enters the decoder's dynamic table, so every block stands alone.
fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        block.push(0x00);
        hpack_int(&mut block, 0, 7, name.len());
        block.extend_from_slice(name.as_bytes());
        hpack_int(&mut block, 0, 7, value.len());
        block.extend_from_slice(value.as_bytes());
    }
    block
}

/// Sends Maintenance.Status with `:authority` set to `authority` (or none) and returns the
/// decoded answer, or what the server did instead (a reset stream, a GOAWAY, a closed
/// connection).
async fn raw_status<S>(
    mut io: S,
    scheme: &str,
    authority: Option<&str>,
) -> Result<StatusResponse, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut fields = vec![
        (":method", "POST"),
        (":scheme", scheme),
        (":path", "/etcdserverpb.Maintenance/Status"),
    ];
    if let Some(authority) = authority {
        fields.push((":authority", authority));
    }
    fields.extend([("content-type", "application/grpc"), ("te", "trailers")]);
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out.extend(frame(HEADERS, END_HEADERS, 1, &header_block(&fields)));
    // An empty StatusRequest: the 5-byte gRPC prefix (not compressed, length 0).
    out.extend(frame(DATA, END_STREAM, 1, &[0, 0, 0, 0, 0]));
    io.write_all(&out)
        .await
        .map_err(|e| format!("write: {e}"))?;

    let mut data = Vec::new();
    let mut response_headers = None;
    loop {
        let mut head = [0u8; 9];
        io.read_exact(&mut head)
            .await
            .map_err(|e| format!("connection closed: {e}"))?;
        let len = (head[0] as usize) << 16 | (head[1] as usize) << 8 | head[2] as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        io.read_exact(&mut payload)
            .await
            .map_err(|e| format!("connection closed: {e}"))?;
        match (kind, stream) {
            (SETTINGS, 0) if flags & ACK == 0 => {
                io.write_all(&frame(SETTINGS, ACK, 0, &[]))
                    .await
                    .map_err(|e| format!("write: {e}"))?;
            }
            (RST_STREAM, 1) => {
                return Err(format!(
                    "RST_STREAM, error code {}",
                    u32::from_be_bytes(payload[..4].try_into().unwrap())
                ));
            }
            (GOAWAY, _) => return Err("GOAWAY".into()),
            (HEADERS, 1) if response_headers.is_none() => {
                response_headers = Some(payload);
                if flags & END_STREAM != 0 {
                    return Err("a trailers-only answer (a gRPC error)".into());
                }
            }
            (DATA, 1) => data.extend_from_slice(&payload),
            (HEADERS, 1) => break, // trailers
            _ => {}
        }
    }
    // `:status: 200` is entry 8 of HPACK's static table: an indexed field, 0x88.
    let headers = response_headers.ok_or("no response headers")?;
    if headers.first() != Some(&0x88) {
        return Err(format!(
            "response headers do not start with :status 200: {headers:02x?}"
        ));
    }
    if data.len() < 5 {
        return Err(format!("no gRPC message in the answer: {data:02x?}"));
    }
    StatusResponse::decode(&data[5..]).map_err(|e| format!("undecodable answer: {e}"))
}

/// What etcd's clients put in `:authority` for a server at `host:port`; `None` is none at all.
fn authorities(host_port: &str) -> Vec<Option<String>> {
    vec![
        Some(host_port.to_string()),
        // etcdctl 3.4's per-endpoint commands, given --endpoints=http(s)://…
        Some(format!("http://{host_port}")),
        Some(format!("https://{host_port}")),
        // clientv3 v3.5.0 (etcd issue 13192)
        Some(format!("#initially=[https://{host_port}]")),
        // gRPC over a unix socket
        Some("/run/etcd/etcd.sock".to_string()),
        // Envoy sidecars
        Some("outbound|2379||etcd.kube-system.svc.cluster.local".to_string()),
        Some(String::new()),
        None,
    ]
}

async fn check_every_authority<S, F, Fut>(what: &str, scheme: &str, host_port: &str, connect: F)
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = S>,
{
    for authority in authorities(host_port) {
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            raw_status(connect().await, scheme, authority.as_deref()),
        )
        .await
        .unwrap_or_else(|_| Err("no answer in 10 s".into()));
        match answer {
            Ok(status) => assert!(
                status.header.as_ref().is_some_and(|h| h.member_id != 0)
                    && !status.version.is_empty(),
                "{what}, :authority {authority:?}: an empty Status answer {status:?}"
            ),
            Err(e) => panic!("{what}, :authority {authority:?}: {e}"),
        }
    }
}

async fn tcp(port: u16) -> tokio::net::TcpStream {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect")
}

async fn any_authority_etcd_accepts_is_served(kind: Kind) {
    let server = Server::start(kind).await;
    let port = server.client_port;
    check_every_authority(
        &format!("{kind:?}, plaintext"),
        "http",
        &format!("127.0.0.1:{port}"),
        || tcp(port),
    )
    .await;
}

per_kind!(any_authority_etcd_accepts_is_served);

#[tokio::test]
async fn any_authority_is_served_over_tls_and_unix_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, leaf) = ca_and_server_leaf(dir.path());
    let tls_port = free_port();
    let socket = dir.path().join("metastore.sock");
    let tls_socket = dir.path().join("metastore-tls.sock");
    let https = format!("https://127.0.0.1:{tls_port}");
    let unix = format!("unix://{}", socket.display());
    let unixs = format!("unixs://{}", tls_socket.display());
    let server = start_tls(&format!("{https},{unix},{unixs}"), &leaf).await;

    let (connector, name) = ca.connector(b"h2");

    check_every_authority("TLS", "https", &format!("127.0.0.1:{tls_port}"), || {
        let (connector, name) = (connector.clone(), name.clone());
        async move {
            connector
                .connect(name, tcp(tls_port).await)
                .await
                .expect("TLS handshake")
        }
    })
    .await;
    check_every_authority("unix socket", "http", "localhost", || async {
        tokio::net::UnixStream::connect(&socket)
            .await
            .expect("connect to the socket")
    })
    .await;
    check_every_authority("unix socket with TLS", "https", "localhost", || {
        let (connector, name) = (connector.clone(), name.clone());
        let path = tls_socket.clone();
        async move {
            let io = tokio::net::UnixStream::connect(&path)
                .await
                .expect("connect to the socket");
            connector.connect(name, io).await.expect("TLS handshake")
        }
    })
    .await;
    drop(server);
}

// ---------------------------------------------------------------------------------------------
// etcdctl with the endpoints written as etcd's documentation writes them.

fn etcdctl(endpoints: &str, args: &[&str]) -> Output {
    etcdctl_with(&[], endpoints, args)
}

/// etcdctl with extra environment (`ETCDCTL_CACERT` for https:// endpoints).
fn etcdctl_with(env: &[(&str, String)], endpoints: &str, args: &[&str]) -> Output {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .arg(format!("--endpoints={endpoints}"))
        .args(["--dial-timeout", "5s", "--command-timeout", "20s"])
        .args(args)
        .output()
        .expect("etcdctl (installed by `cargo xtask test`)")
}

/// etcdctl's stdout with what legitimately differs between two servers made uniform: numbers
/// (ids, sizes, revisions, terms, versions, durations, ports), file paths and table widths.
fn normalize(text: &str, dir: &Path) -> String {
    use regex::Regex;
    let text = text.replace(dir.to_str().unwrap(), "DIR");
    let size = Regex::new(r"\b\d+(\.\d+)? ?(B|kB|MB|GB)\b").unwrap();
    let duration = Regex::new(r"\b\d+(\.\d+)?(ns|µs|ms|s|m)\b").unwrap();
    let number = Regex::new(r"\b[0-9a-f]*[0-9][0-9a-f]*\b").unwrap();
    let text = size.replace_all(&text, "SIZE");
    let text = duration.replace_all(&text, "DURATION");
    let text = number.replace_all(&text, "#");
    text.lines()
        .map(|l| {
            if l.chars().all(|c| c == '+' || c == '-') {
                "BORDER".to_string()
            } else {
                l.split_whitespace().collect::<Vec<_>>().join(" ")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

struct Outputs {
    lines: Vec<(String, String)>,
}

/// Runs the per-endpoint commands through `http://` endpoints and returns each command's
/// normalized output (stdout, or the error for a command that failed).
fn per_endpoint_commands(endpoints: &str, move_to: Option<u64>, dir: &Path) -> Outputs {
    per_endpoint_commands_with(&[], endpoints, move_to, dir)
}

fn per_endpoint_commands_with(
    env: &[(&str, String)],
    endpoints: &str,
    move_to: Option<u64>,
    dir: &Path,
) -> Outputs {
    let snapshot = dir.join("snap.db");
    let snapshot = snapshot.to_str().unwrap();
    let first = endpoints.split(',').next().unwrap();
    let mut commands: Vec<(String, String, Vec<String>)> = vec![
        (
            "endpoint status".into(),
            endpoints.into(),
            vec!["endpoint".into(), "status".into()],
        ),
        (
            "endpoint status -w json".into(),
            endpoints.into(),
            vec![
                "endpoint".into(),
                "status".into(),
                "-w".into(),
                "json".into(),
            ],
        ),
        (
            "endpoint hashkv".into(),
            endpoints.into(),
            vec!["endpoint".into(), "hashkv".into()],
        ),
        (
            "endpoint health".into(),
            endpoints.into(),
            vec!["endpoint".into(), "health".into()],
        ),
        ("defrag".into(), endpoints.into(), vec!["defrag".into()]),
        (
            "snapshot save".into(),
            first.into(),
            vec!["snapshot".into(), "save".into(), snapshot.into()],
        ),
    ];
    if let Some(target) = move_to {
        commands.push((
            "move-leader".into(),
            endpoints.into(),
            vec!["move-leader".into(), format!("{target:x}")],
        ));
    }
    let mut lines = Vec::new();
    for (name, endpoints, args) in commands {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = etcdctl_with(env, &endpoints, &args);
        let text = if out.status.success() {
            let mut lines: Vec<String> = normalize(&String::from_utf8_lossy(&out.stdout), dir)
                .lines()
                .map(str::to_string)
                .collect();
            // `endpoint health` prints members in the order they answered
            lines.sort();
            lines.join("\n")
        } else {
            format!("FAILED: {}", String::from_utf8_lossy(&out.stderr))
        };
        lines.push((name, text));
    }
    Outputs { lines }
}

fn assert_same(etcd: &Outputs, ours: &Outputs, what: &str) {
    for ((name, theirs), (_, mine)) in etcd.lines.iter().zip(&ours.lines) {
        assert!(
            !mine.starts_with("FAILED"),
            "{what}: etcdctl {name}: {mine}"
        );
        assert_eq!(
            mine, theirs,
            "{what}: etcdctl {name} prints differently from etcd's"
        );
    }
}

/// The id of member `i`, in etcdctl's hex, read from `endpoint status -w json`.
fn member_id_of(endpoint: &str) -> u64 {
    let out = etcdctl(endpoint, &["endpoint", "status", "-w", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = String::from_utf8(out.stdout).unwrap();
    let tag = "\"member_id\":";
    let start = json.find(tag).expect("member_id") + tag.len();
    json[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn etcdctl_per_endpoint_commands_with_http_urls_one_member() {
    let mut outputs = Vec::new();
    for kind in [Kind::Etcd, Kind::Memory, Kind::Rocks] {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(kind).await;
        let endpoint = server.endpoint();
        assert!(endpoint.starts_with("http://"));
        assert!(etcdctl(&endpoint, &["put", "k", "v"]).status.success());
        let me = member_id_of(&endpoint);
        let out = per_endpoint_commands(&endpoint, Some(me), dir.path());
        outputs.push((kind, out));
    }
    let (_, etcd) = &outputs[0];
    for (kind, ours) in &outputs[1..] {
        assert_same(etcd, ours, &format!("{kind:?}, 1 member"));
    }
}

#[tokio::test]
async fn etcdctl_per_endpoint_commands_with_http_urls_three_members() {
    let mut outputs = Vec::new();
    for kind in [Kind::Etcd, Kind::Memory, Kind::Rocks] {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Cluster::start(kind, 3, &[]).await;
        let leader = cluster.wait_leader().await;
        let follower = (leader + 1) % 3;
        let endpoints = cluster.endpoints().join(",");
        assert!(endpoints.starts_with("http://"));
        let target = member_id_of(&cluster.endpoint(follower));
        let out = per_endpoint_commands(&endpoints, Some(target), dir.path());
        // move-leader returns once the target leads (the third member may learn it a moment
        // later: wait until all agree)
        assert_eq!(
            cluster.wait_leader().await,
            follower,
            "{kind:?}: the target leads"
        );
        outputs.push((kind, out));
    }
    let (_, etcd) = &outputs[0];
    for (kind, ours) in &outputs[1..] {
        assert_same(etcd, ours, &format!("{kind:?}, 3 members"));
    }
}

/// A CA (`client`) and a `server` certificate it signed, written to `dir`.
fn ca_and_server_leaf(dir: &std::path::Path) -> (support::tls::Ca, support::tls::Leaf) {
    let ca = support::tls::Ca::new(dir, "client");
    let leaf = ca.leaf(dir, "server", "server");
    (ca, leaf)
}

/// A memory-engine server listening on `client_urls` with `leaf` as its certificate.
async fn start_tls(client_urls: &str, leaf: &support::tls::Leaf) -> Server {
    let (cert, key) = (leaf.cert.to_str().unwrap(), leaf.key.to_str().unwrap());
    let flags = [
        "--listen-client-urls",
        client_urls,
        "--cert-file",
        cert,
        "--key-file",
        key,
    ];
    Server::start_with(Kind::Memory, &flags).await
}

/// The same commands through an `https://` endpoint print what they print through `http://`
/// (etcdctl 3.4 sends `https://host:port` as the `:authority` there).
#[tokio::test]
async fn etcdctl_per_endpoint_commands_with_https_urls() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, leaf) = ca_and_server_leaf(dir.path());
    let tls_port = free_port();
    let server = start_tls(&format!("https://127.0.0.1:{tls_port}"), &leaf).await;
    let me = member_id_of(&server.endpoint());
    let plain = per_endpoint_commands(&server.endpoint(), Some(me), dir.path());
    let https = format!("https://127.0.0.1:{tls_port}");
    let env = [("ETCDCTL_CACERT", ca.cert_path.display().to_string())];
    let tls = per_endpoint_commands_with(&env, &https, Some(me), dir.path());
    for ((name, plain), (_, tls)) in plain.lines.iter().zip(&tls.lines) {
        assert!(
            !tls.starts_with("FAILED"),
            "etcdctl {name} over https: {tls}"
        );
        assert_eq!(
            tls.replace("https://", "http://"),
            *plain,
            "etcdctl {name}: https against http"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Listeners and cluster URLs in the other forms etcd takes.

#[tokio::test]
async fn ipv6_literal_and_host_name_listeners_serve() {
    let (v6, name) = (free_port(), free_port());
    let server = Server::start_with(
        Kind::Memory,
        &[
            "--listen-client-urls",
            &format!("http://[::1]:{v6},http://localhost:{name}"),
        ],
    )
    .await;
    for endpoint in [
        format!("http://[::1]:{v6}"),
        format!("http://localhost:{name}"),
    ] {
        let out = etcdctl(&endpoint, &["endpoint", "status"]);
        assert!(
            out.status.success(),
            "{endpoint}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(etcdctl(&endpoint, &["put", "k", &endpoint])
            .status
            .success());
    }
    drop(server);
}

#[tokio::test]
async fn a_malformed_url_is_refused_naming_its_flag() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, bad, expected) in [
        (
            "--listen-client-urls",
            "127.0.0.1:2379",
            "--listen-client-urls: \"127.0.0.1:2379\" is not a URL",
        ),
        (
            "--listen-peer-urls",
            "http://127.0.0.1",
            "--listen-peer-urls: URL address does not have the form \"host:port\"",
        ),
        (
            "--advertise-client-urls",
            "tcp://127.0.0.1:1",
            "--advertise-client-urls: URL scheme must be http, https, unix, or unixs",
        ),
        (
            "--initial-cluster",
            "default=http://127.0.0.1:2380/path",
            "--initial-cluster: URL must not contain a path",
        ),
    ] {
        let out = Command::new(support::metastore_bin())
            .args([
                "--data-dir",
                dir.path().join("d").to_str().unwrap(),
                flag,
                bad,
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {bad} was accepted");
        assert!(stderr.contains(expected), "{flag} {bad}: {stderr}");
    }
}

/// A cluster whose every URL names its members by host name (`localhost`), as StatefulSets and
/// docker-compose files name theirs.
#[tokio::test]
async fn a_cluster_bootstraps_from_host_name_urls() {
    let dir = tempfile::tempdir().unwrap();
    let ports = support::free_port_pairs(3);
    let initial = support::comma_list(&ports, |i, (_, peer)| {
        format!("m{}=http://localhost:{peer}", i + 1)
    });
    let mut children: Vec<std::process::Child> = Vec::new();
    for (i, (client, peer)) in ports.iter().enumerate() {
        let child = Command::new(support::metastore_bin())
            .args(["--name", &format!("m{}", i + 1)])
            .arg("--data-dir")
            .arg(dir.path().join(format!("m{i}")))
            .args([
                "--listen-client-urls",
                &format!("http://localhost:{client}"),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://localhost:{client}"),
            ])
            .args(["--listen-peer-urls", &format!("http://localhost:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://localhost:{peer}"),
            ])
            .args(["--initial-cluster", &initial])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        children.push(child);
    }
    let _kill = support::KillOnDrop(children);
    let endpoints = support::comma_list(&ports, |_, (client, _)| {
        format!("http://localhost:{client}")
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = etcdctl(&endpoints, &["put", "greeting", "hello"]);
        if out.status.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no write in 30 s: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Members publish their names and client URLs through raft shortly after they start.
    let published = |list: &str| {
        list.lines()
            .filter(|l| l.contains(", http://localhost:"))
            .count()
            == 3
            && !list.contains(", , ")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut list = String::new();
    while !published(&list) && std::time::Instant::now() < deadline {
        list = String::from_utf8(etcdctl(&endpoints, &["member", "list"]).stdout).unwrap();
        if !published(&list) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for (i, (client, peer)) in ports.iter().enumerate() {
        let line = list
            .lines()
            .find(|l| l.contains(&format!(", m{}, ", i + 1)))
            .unwrap_or_else(|| panic!("m{} missing from {list}", i + 1));
        assert!(
            line.contains(&format!("http://localhost:{peer}"))
                && line.contains(&format!("http://localhost:{client}")),
            "{line}"
        );
    }
    // Each member serves the write (the log reached all three through host-name peer URLs).
    for (client, _) in &ports {
        let endpoint = format!("http://localhost:{client}");
        let out = etcdctl(
            &endpoint,
            &["get", "greeting", "--print-value-only", "--consistency=s"],
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut value = String::from_utf8_lossy(&out.stdout).trim().to_string();
        while value != "hello" && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let out = etcdctl(
                &endpoint,
                &["get", "greeting", "--print-value-only", "--consistency=s"],
            );
            value = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        assert_eq!(value, "hello", "{endpoint}");
    }
}
