//! Command-line configuration with etcd's flag names, and the member/cluster ids etcd derives
//! from them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use clap::{Parser, ValueEnum};
use sha1::{Digest, Sha1};

use crate::urls;

/// Which storage engine holds the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Engine {
    /// Ordered in-memory maps, made durable by the raft WAL and snapshot files.
    Memory,
    /// RocksDB under `<data-dir>/member/db`.
    Rocksdb,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Memory => "memory",
            Engine::Rocksdb => "rocksdb",
        }
    }
}

/// How much `/metrics` records (etcd's `--metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MetricsLevel {
    /// Counters and the histograms etcd always keeps.
    Basic,
    /// Also `grpc_server_handling_seconds`, a latency histogram per gRPC method.
    Extensive,
}

/// MetaStore: an etcd v3 compatible key-value store.
#[derive(Debug, Parser)]
#[command(name = "metastore", about, disable_version_flag = true)]
pub struct Config {
    /// Print the version (MetaStore's, the etcd API it implements, git commit, Rust) and exit.
    #[arg(long)]
    pub version: bool,
    /// YAML file of settings keyed by flag name (etcd's `etcd.conf.yml`); excludes every other
    /// flag and `ETCD_*` variable.
    #[arg(long)]
    pub config_file: Option<PathBuf>,
    /// Human-readable name for this member.
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Path to the data directory (default: `<name>.metastore`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// URLs to listen on for client traffic (comma-separated).
    #[arg(long, default_value = "http://127.0.0.1:2379", value_delimiter = ',')]
    pub listen_client_urls: Vec<String>,
    /// URLs to listen on for `/metrics` and the health probes only (comma-separated; https
    /// URLs use the client TLS files).
    #[arg(long, value_delimiter = ',')]
    pub listen_metrics_urls: Vec<String>,
    /// Metrics detail: `basic`, or `extensive` to add a latency histogram per gRPC method
    /// (`grpc_server_handling_seconds`).
    #[arg(long, value_enum, default_value = "basic")]
    pub metrics: MetricsLevel,
    /// Client URLs advertised to the rest of the cluster (comma-separated).
    #[arg(long, default_value = "http://127.0.0.1:2379", value_delimiter = ',')]
    pub advertise_client_urls: Vec<String>,
    /// URLs to listen on for peer traffic (comma-separated).
    #[arg(long, default_value = "http://127.0.0.1:2380", value_delimiter = ',')]
    pub listen_peer_urls: Vec<String>,
    /// This member's peer URLs advertised to the rest of the cluster (comma-separated).
    #[arg(long, default_value = "http://127.0.0.1:2380", value_delimiter = ',')]
    pub initial_advertise_peer_urls: Vec<String>,
    /// Initial cluster configuration for bootstrapping: `name=peer-url,…`.
    #[arg(long)]
    pub initial_cluster: Option<String>,
    /// Initial cluster state: `new` or `existing`.
    #[arg(long, default_value = "new")]
    pub initial_cluster_state: String,
    /// Initial cluster token, mixed into member and cluster ids.
    #[arg(long, default_value = "etcd-cluster")]
    pub initial_cluster_token: String,
    /// Number of committed entries between raft snapshots.
    #[arg(long, default_value_t = 100_000)]
    pub snapshot_count: u64,
    /// Directory for the WAL (e.g. on a separate disk); default `<data-dir>/member/wal`.
    #[arg(long)]
    pub wal_dir: Option<PathBuf>,
    /// Most WAL files kept (0: unlimited). Files go once a snapshot covers them.
    #[arg(long, default_value_t = 5)]
    pub max_wals: usize,
    /// Most snapshot files kept (0: unlimited). etcd's default is 5, but etcd's snapshot files
    /// hold only raft metadata while MetaStore's hold the data, so MetaStore keeps 2.
    #[arg(long, default_value_t = 2)]
    pub max_snapshots: usize,
    /// Free bytes kept on the disks of the data and WAL directories (MetaStore only; 0: off).
    /// Below it the member refuses writes with `database space exceeded` and takes no log
    /// entries from the leader, until space returns; reads go on.
    #[arg(long, default_value_t = metastore_raft_node::DEFAULT_DISK_RESERVE_BYTES)]
    pub disk_reserve_bytes: u64,
    /// Time (ms) of a heartbeat interval.
    #[arg(long, default_value_t = 100)]
    pub heartbeat_interval: u64,
    /// Time (ms) for an election to time out.
    #[arg(long, default_value_t = 1000)]
    pub election_timeout: u64,
    /// Maximum client request size in bytes the server will accept.
    #[arg(long, default_value_t = 1536 * 1024)]
    pub max_request_bytes: usize,
    /// Maximum number of operations permitted in a transaction.
    #[arg(long, default_value_t = 128)]
    pub max_txn_ops: usize,
    /// Raise alarms when the backend size exceeds this quota (0 = default 2 GiB).
    #[arg(long, default_value_t = 0)]
    pub quota_backend_bytes: u64,
    /// Interval of watch progress notifications, as a duration (`10m`, `5s`, `500ms`).
    #[arg(long, default_value = "10m", value_parser = metastore_auth::tokens::parse_duration)]
    pub experimental_watch_progress_notify_interval: std::time::Duration,
    /// How often the leader compares every member's HashKV with its own and raises the CORRUPT
    /// alarm for a member that differs (`0s`: never, as etcd's default).
    #[arg(long, default_value = "0s", value_parser = metastore_auth::tokens::parse_duration)]
    pub experimental_corrupt_check_time: std::time::Duration,
    /// Before serving clients, compare this member's HashKV with its peers' and refuse to start
    /// on a difference (kubeadm's manifests turn it on).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub experimental_initial_corrupt_check: bool,
    /// Revisions deleted per batch by the background compaction (etcd's default, 1000).
    #[arg(long, default_value_t = 1000)]
    pub experimental_compaction_batch_limit: usize,
    /// Pause between two batches of the background compaction, as a duration (`10ms`).
    #[arg(long, default_value = "10ms", value_parser = metastore_auth::tokens::parse_duration)]
    pub experimental_compaction_sleep_interval: std::time::Duration,
    /// Auto-compaction mode: `periodic` (keep a time window of history) or `revision` (keep a
    /// number of revisions).
    #[arg(long, default_value = "periodic")]
    pub auto_compaction_mode: String,
    /// Auto-compaction retention: in periodic mode a duration (`5m`, `1h`) or a number of
    /// hours; in revision mode a number of revisions. `0` turns auto-compaction off.
    #[arg(long, default_value = "0")]
    pub auto_compaction_retention: String,
    /// Testing only: the interval between two checks of revision-mode auto-compaction
    /// (etcd's fixed 5 minutes when unset).
    #[arg(long, hide = true, value_parser = metastore_auth::tokens::parse_duration)]
    pub auto_compaction_revision_check_interval: Option<std::time::Duration>,
    /// Storage engine.
    #[arg(long, value_enum, default_value = "memory")]
    pub storage_engine: Engine,
    /// Auth token type: `simple`, or `jwt,pub-key=FILE,priv-key=FILE,sign-method=ALG[,ttl=5m]`.
    #[arg(long, default_value = "simple")]
    pub auth_token: String,
    /// Seconds a simple token stays valid after its last use.
    #[arg(long, default_value_t = 300)]
    pub auth_token_ttl: u64,
    /// bcrypt cost of stored password hashes (4..=31).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(4..=31))]
    pub bcrypt_cost: u32,
    /// Client TLS certificate (PEM), for https:// client URLs.
    #[arg(long)]
    pub cert_file: Option<PathBuf>,
    /// Client TLS key (PEM).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// CA bundle (PEM) that signs client certificates.
    #[arg(long)]
    pub trusted_ca_file: Option<PathBuf>,
    /// Require client certificates signed by --trusted-ca-file; the certificate's CN is the
    /// user when a request carries no token.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub client_cert_auth: bool,
    /// Peer TLS certificate (PEM), for https:// peer URLs; also presented to peers as client.
    #[arg(long)]
    pub peer_cert_file: Option<PathBuf>,
    /// Peer TLS key (PEM).
    #[arg(long)]
    pub peer_key_file: Option<PathBuf>,
    /// CA bundle (PEM) that signs peer certificates.
    #[arg(long)]
    pub peer_trusted_ca_file: Option<PathBuf>,
    /// Require peers to present certificates signed by --peer-trusted-ca-file.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub peer_client_cert_auth: bool,
    /// Client TLS with a self-signed certificate generated under `<data-dir>/fixtures/client`
    /// when https client URLs are given without --cert-file/--key-file.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub auto_tls: bool,
    /// Peer TLS with a self-signed certificate generated under `<data-dir>/fixtures/peer` when
    /// https peer URLs are given without --peer-cert-file/--peer-key-file (peers' certificates
    /// are then not verified, as in etcd).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub peer_auto_tls: bool,
    /// Validity in years of the certificates --auto-tls and --peer-auto-tls generate.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub self_signed_cert_validity: u32,
    /// Certificate revocation list (PEM or DER): revoked client certificates are refused at
    /// the handshake on the client URLs.
    #[arg(long)]
    pub client_crl_file: Option<PathBuf>,
    /// Certificate revocation list (PEM or DER): revoked peer certificates are refused at the
    /// handshake on the peer URLs.
    #[arg(long)]
    pub peer_crl_file: Option<PathBuf>,
    /// Accept only peer certificates with this common name (needs --peer-trusted-ca-file).
    #[arg(long)]
    pub peer_cert_allowed_cn: Option<String>,
    /// Accept only peer certificates valid for this host name or IP (a SAN of theirs).
    #[arg(long)]
    pub peer_cert_allowed_hostname: Option<String>,
    /// TLS 1.2 cipher suites allowed between clients/server and peers (comma-separated IANA
    /// names, e.g. TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256; empty: rustls' defaults). TLS 1.3
    /// suites are not configurable.
    #[arg(long, value_delimiter = ',')]
    pub cipher_suites: Vec<String>,
    /// Minimum TLS version: TLS1.2 or TLS1.3.
    #[arg(long, default_value = "TLS1.2")]
    pub tls_min_version: String,
    /// Maximum TLS version: TLS1.2 or TLS1.3 (empty: the highest supported).
    #[arg(long, default_value = "")]
    pub tls_max_version: String,
    /// Log level: debug, info, warn, error (etcd's dpanic, panic and fatal log as error).
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Log format: `json` (etcd's zap default) or `console`.
    #[arg(long, default_value = "json")]
    pub log_format: String,
    /// Where logs go: `stderr`, `stdout`, `default` (stderr) or file paths, comma-separated.
    #[arg(long, default_value = "default", value_delimiter = ',')]
    pub log_outputs: Vec<String>,
    /// Logger implementation; only `zap` (etcd 3.5's only logger) is accepted.
    #[arg(long, default_value = "zap")]
    pub logger: String,
}

/// What `metastore --version` prints, in the shape of etcd's `etcd --version`.
pub fn version_text() -> String {
    format!(
        "MetaStore Version: {}\netcd API Version: {}\nGit SHA: {}\nRust Version: {}\nOS/Arch: {}/{}\n",
        env!("CARGO_PKG_VERSION"),
        metastore_maintenance_api::ETCD_API_VERSION,
        env!("METASTORE_GIT_SHA"),
        env!("METASTORE_RUST_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH,
    )
}

impl Config {
    /// Checks every URL flag (etcd's rules, see `urls`); errors name the flag.
    pub fn check_urls(&self) -> Result<()> {
        urls::parse_all("--listen-client-urls", &self.listen_client_urls)?;
        urls::parse_all("--advertise-client-urls", &self.advertise_client_urls)?;
        urls::parse_tcp("--listen-peer-urls", &self.listen_peer_urls)?;
        urls::parse_tcp(
            "--initial-advertise-peer-urls",
            &self.initial_advertise_peer_urls,
        )?;
        self.initial_members()?;
        Ok(())
    }
}

/// One member of the initial cluster.
#[derive(Debug, Clone)]
pub struct InitialMember {
    pub name: String,
    pub peer_urls: Vec<String>,
    pub id: u64,
}

impl Config {
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{}.metastore", self.name)))
    }

    /// The members named by `--initial-cluster` (default: this member alone at its advertised
    /// peer URLs), with etcd's member ids.
    pub fn initial_members(&self) -> Result<Vec<InitialMember>> {
        let spec = match &self.initial_cluster {
            Some(s) => s.clone(),
            None => self
                .initial_advertise_peer_urls
                .iter()
                .map(|u| format!("{}={u}", self.name))
                .collect::<Vec<_>>()
                .join(","),
        };
        let mut by_name: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, url) = part
                .split_once('=')
                .ok_or_else(|| anyhow!("--initial-cluster: {part:?} is not name=url"))?;
            crate::urls::parse_tcp("--initial-cluster", &[url.to_string()])?;
            by_name
                .entry(name.to_string())
                .or_default()
                .push(url.to_string());
        }
        if !by_name.contains_key(&self.name) {
            bail!(
                "--initial-cluster has no member named {:?} (this member's --name)",
                self.name
            );
        }
        Ok(by_name
            .into_iter()
            .map(|(name, peer_urls)| {
                let id = member_id(&peer_urls, &self.initial_cluster_token);
                InitialMember {
                    name,
                    peer_urls,
                    id,
                }
            })
            .collect())
    }
}

/// etcd's member id: SHA-1 of the sorted peer URLs joined, then the cluster token; first 8 bytes.
pub fn member_id(peer_urls: &[String], token: &str) -> u64 {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    let mut h = Sha1::new();
    h.update(urls.concat().as_bytes());
    h.update(token.as_bytes());
    let digest = h.finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("sha1 is 20 bytes"))
}

/// etcd's cluster id: SHA-1 of the sorted member ids as 8-byte big-endian values; first 8 bytes.
pub fn cluster_id(member_ids: &[u64]) -> u64 {
    let mut ids = member_ids.to_vec();
    ids.sort();
    let mut h = Sha1::new();
    for id in ids {
        h.update(id.to_be_bytes());
    }
    let digest = h.finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("sha1 is 20 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_match_etcd_derivation() {
        // etcd's default member (`--name default`, peer URL http://localhost:2380, token
        // etcd-cluster) has id 8e9e05c52164694d and cluster id cdf818194e3a8c32.
        let id = member_id(&["http://localhost:2380".to_string()], "etcd-cluster");
        assert_eq!(format!("{id:x}"), "8e9e05c52164694d");
        assert_eq!(format!("{:x}", cluster_id(&[id])), "cdf818194e3a8c32");
    }

    fn config(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("metastore").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn every_url_flag_is_checked_and_errors_name_the_flag() {
        let check = |args: &[&str]| config(args).check_urls().map_err(|e| format!("{e:#}"));
        assert!(check(&[]).is_ok());
        assert!(check(&[
            "--listen-client-urls",
            "http://127.0.0.1:2379,unix:///tmp/x.sock,https://[::1]:2379",
            "--advertise-client-urls",
            "http://etcd-0.etcd:2379",
            "--initial-advertise-peer-urls",
            "http://etcd-0.etcd:2380",
            "--initial-cluster",
            "default=http://etcd-0.etcd:2380,b=http://etcd-1.etcd:2380",
        ])
        .is_ok());
        for (flag, bad) in [
            ("--listen-client-urls", "http://127.0.0.1"),
            ("--advertise-client-urls", "127.0.0.1:2379"),
            ("--listen-peer-urls", "unix:///tmp/peer.sock"),
            ("--initial-advertise-peer-urls", "ftp://a:1"),
        ] {
            let e = check(&[flag, bad]).unwrap_err();
            assert!(e.starts_with(&format!("{flag}: ")), "{flag} {bad}: {e}");
        }
        let e = config(&["--initial-cluster", "default=http://a:1,b=http://b"])
            .initial_members()
            .unwrap_err();
        assert!(
            format!("{e:#}").starts_with("--initial-cluster: URL address does not have the form"),
            "{e:#}"
        );
    }

    #[test]
    fn compaction_pacing_flags_default_to_etcds() {
        let cfg = config(&[]);
        assert_eq!(cfg.experimental_compaction_batch_limit, 1000);
        assert_eq!(
            cfg.experimental_compaction_sleep_interval,
            std::time::Duration::from_millis(10)
        );
        let cfg = config(&[
            "--experimental-compaction-batch-limit",
            "50",
            "--experimental-compaction-sleep-interval",
            "1s",
        ]);
        assert_eq!(cfg.experimental_compaction_batch_limit, 50);
        assert_eq!(
            cfg.experimental_compaction_sleep_interval,
            std::time::Duration::from_secs(1)
        );
    }

    #[test]
    fn durations_parse_like_go() {
        use metastore_auth::tokens::parse_duration;
        use std::time::Duration;
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("5d").is_err());
    }
}
