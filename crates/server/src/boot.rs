//! Who this member is: its id, its cluster's id, and how its raft log starts — from the data
//! directory when it holds a member already, otherwise from etcd's bootstrap flags
//! (`--initial-cluster-state new`: the ids derive from `--initial-cluster` and the token;
//! `existing`: asked from the running members, which must have added this member first).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use metastore_peer::PeerTls;
use metastore_proto::metastorepb::Member;
use prost::Message;

use crate::config::{self, Config};

/// This member's identity and bootstrap plan.
pub struct Identity {
    pub member_id: u64,
    pub cluster_id: u64,
    /// Start with an empty log and learn the membership from the leader.
    pub join: bool,
    /// Voters of a new cluster.
    pub peers: Vec<u64>,
    /// Initial members' records (the payloads of the log's first entries).
    pub bootstrap: Vec<(u64, Vec<u8>)>,
    /// Peer URLs known from the flags or from the running cluster, by member id.
    pub known_urls: HashMap<u64, Vec<String>>,
}

const IDENTITY_FILE: &str = "identity";

fn sorted(urls: &[String]) -> Vec<String> {
    let mut urls = urls.to_vec();
    urls.sort();
    urls
}

/// Reads `<member dir>/identity` (`<member id hex> <cluster id hex>`) if present.
fn read_identity(member_dir: &Path) -> Result<Option<(u64, u64)>> {
    let path = member_dir.join(IDENTITY_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut parts = text.split_whitespace();
    let mut next = || -> Result<u64> {
        let part = parts.next().unwrap_or_default();
        u64::from_str_radix(part, 16)
            .with_context(|| format!("{}: {part:?} is not a hex id", path.display()))
    };
    Ok(Some((next()?, next()?)))
}

/// Records the identity once raft has created the member's log.
pub fn write_identity(member_dir: &Path, member_id: u64, cluster_id: u64) -> Result<()> {
    let path = member_dir.join(IDENTITY_FILE);
    if path.exists() {
        return Ok(());
    }
    let tmp = member_dir.join(format!("{IDENTITY_FILE}.tmp"));
    std::fs::write(&tmp, format!("{member_id:x} {cluster_id:x}\n"))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
}

/// Works out who this member is.
pub async fn identify(
    cfg: &Config,
    member_dir: &Path,
    peer_tls: Option<&PeerTls>,
) -> Result<Identity> {
    let members = cfg.initial_members()?;
    let mut known_urls: HashMap<u64, Vec<String>> = members
        .iter()
        .map(|m| (m.id, m.peer_urls.clone()))
        .collect();
    let me = members
        .iter()
        .find(|m| m.name == cfg.name)
        .context("this member is not in --initial-cluster")?;
    if sorted(&me.peer_urls) != sorted(&cfg.initial_advertise_peer_urls) {
        bail!(
            "--initial-cluster gives {} the peer URLs {:?}, but --initial-advertise-peer-urls \
             is {:?}; they must match",
            cfg.name,
            me.peer_urls,
            cfg.initial_advertise_peer_urls
        );
    }
    let flag_cluster_id = config::cluster_id(&members.iter().map(|m| m.id).collect::<Vec<_>>());

    let wal_dir = cfg
        .wal_dir
        .clone()
        .unwrap_or_else(|| member_dir.join("wal"));
    let has_wal = wal_dir.exists();
    if let Some((member_id, cluster_id)) = read_identity(member_dir)? {
        if !has_wal {
            bail!(
                "{} names member {member_id:x} but holds no WAL; restore the WAL or start \
                 with an empty --data-dir",
                member_dir.display()
            );
        }
        // An existing member resumes from its data; the --initial-cluster* flags are ignored.
        return Ok(Identity {
            member_id,
            cluster_id,
            join: false,
            peers: vec![member_id],
            bootstrap: Vec::new(),
            known_urls,
        });
    }
    if has_wal && cfg.initial_cluster_state == "new" {
        // Written before identity files existed: the ids derive from the flags.
        return Ok(Identity {
            member_id: me.id,
            cluster_id: flag_cluster_id,
            join: false,
            peers: members.iter().map(|m| m.id).collect(),
            bootstrap: Vec::new(),
            known_urls,
        });
    }
    match cfg.initial_cluster_state.as_str() {
        "new" => {
            let bootstrap = members
                .iter()
                .map(|m| {
                    let record = Member {
                        id: m.id,
                        name: m.name.clone(),
                        peer_urls: m.peer_urls.clone(),
                        client_urls: Vec::new(),
                        is_learner: false,
                    };
                    (m.id, record.encode_to_vec())
                })
                .collect();
            Ok(Identity {
                member_id: me.id,
                cluster_id: flag_cluster_id,
                join: false,
                peers: members.iter().map(|m| m.id).collect(),
                bootstrap,
                known_urls,
            })
        }
        "existing" => {
            let others: Vec<String> = members
                .iter()
                .filter(|m| m.name != cfg.name)
                .flat_map(|m| m.peer_urls.clone())
                .collect();
            if others.is_empty() {
                bail!(
                    "--initial-cluster-state existing needs the other members in --initial-cluster"
                );
            }
            let (cluster_id, current) = metastore_peer::fetch_members(&others, peer_tls)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("cannot fetch the cluster's members from its peers: {e}")
                })?;
            let mine = sorted(&cfg.initial_advertise_peer_urls);
            let Some(record) = current.iter().find(|m| sorted(&m.peer_urls) == mine) else {
                bail!(
                    "no member of cluster {cluster_id:x} has the peer URLs {:?}; add this member \
                     first (etcdctl member add {} --peer-urls={})",
                    cfg.initial_advertise_peer_urls,
                    cfg.name,
                    cfg.initial_advertise_peer_urls.join(",")
                );
            };
            if !record.name.is_empty() && record.name != cfg.name {
                bail!(
                    "member {:x} with these peer URLs already started as {:?}",
                    record.id,
                    record.name
                );
            }
            for m in &current {
                known_urls.insert(m.id, m.peer_urls.clone());
            }
            Ok(Identity {
                member_id: record.id,
                cluster_id,
                join: true,
                peers: Vec::new(),
                bootstrap: Vec::new(),
                known_urls,
            })
        }
        other => bail!("--initial-cluster-state must be new or existing, not {other:?}"),
    }
}
