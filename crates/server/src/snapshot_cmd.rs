//! `metastore snapshot status FILE`: check and describe a file written by `etcdctl snapshot save`,
//! like `etcdutl snapshot status`. `metastore snapshot restore FILE …`: create a new member of a
//! new cluster from such a file, like `etcdutl snapshot restore`. The file is etcd's (a bbolt
//! database: saved from MetaStore or from etcd, or copied from etcd's `member/snap/db`), or
//! MetaStore's own format of the files saved before issue 21 (ARCHITECTURE.md).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;
use metastore_proto::metastorepb::Member;

use crate::config::{self, Config, Engine};

/// Offline snapshot file commands.
#[derive(Parser)]
#[command(name = "metastore snapshot")]
enum SnapshotCommand {
    /// Print a snapshot file's hash, revision, total keys and total size as etcdctl does. Reads
    /// etcd's files (a bbolt database, from etcd or copied from `member/snap/db`) and MetaStore's
    /// own (whose SHA-256 it verifies).
    Status {
        /// The file `etcdctl snapshot save` wrote.
        file: PathBuf,
        /// Output format: simple, json, table or fields.
        #[arg(short = 'w', long = "write-out", default_value = "simple")]
        write_out: String,
    },
    /// Verify a snapshot file and create a new member's data directory from it, for a new
    /// cluster described by the same flags as the server's. Run it once per member (each with
    /// its own --name and --data-dir), then start every member with the same flags.
    Restore {
        /// The file `etcdctl snapshot save` wrote.
        file: PathBuf,
        /// This member's name.
        #[arg(long, default_value = "default")]
        name: String,
        /// The data directory to create (default: `<name>.metastore`); must not hold a member.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The new cluster's members: `name=peer-url,…`.
        #[arg(long)]
        initial_cluster: Option<String>,
        /// The new cluster's token.
        #[arg(long, default_value = "etcd-cluster")]
        initial_cluster_token: String,
        /// This member's peer URLs.
        #[arg(long, default_value = "http://127.0.0.1:2380", value_delimiter = ',')]
        initial_advertise_peer_urls: Vec<String>,
        /// Storage engine of the new member.
        #[arg(long, value_enum, default_value = "memory")]
        storage_engine: Engine,
        /// For an etcd file without the SHA-256 trailer (a copied `member/snap/db`): do not
        /// require it (as etcdutl's flag).
        #[arg(long)]
        skip_hash_check: bool,
    },
}

/// The raft term of a restored cluster's first snapshot.
const RESTORE_TERM: u64 = 1;

#[allow(clippy::too_many_arguments)]
fn restore(
    file: PathBuf,
    name: String,
    data_dir: Option<PathBuf>,
    initial_cluster: Option<String>,
    initial_cluster_token: String,
    initial_advertise_peer_urls: Vec<String>,
    storage_engine: Engine,
    skip_hash_check: bool,
) -> Result<()> {
    let mut args = vec![
        "metastore".to_string(),
        "--name".into(),
        name,
        "--initial-cluster-token".into(),
        initial_cluster_token,
        "--initial-advertise-peer-urls".into(),
        initial_advertise_peer_urls.join(","),
        "--storage-engine".into(),
        storage_engine.name().into(),
    ];
    if let Some(dir) = &data_dir {
        args.extend(["--data-dir".into(), dir.display().to_string()]);
    }
    if let Some(cluster) = initial_cluster {
        args.extend(["--initial-cluster".into(), cluster]);
    }
    let cfg = Config::try_parse_from(args)?;
    let members = cfg.initial_members()?;
    let me = members
        .iter()
        .find(|m| m.name == cfg.name)
        .context("this member is not in --initial-cluster")?;
    let ids: Vec<u64> = members.iter().map(|m| m.id).collect();
    let cluster_id = config::cluster_id(&ids);
    let member_dir = cfg.data_dir().join("member");
    if member_dir.exists() {
        bail!(
            "{} already exists; restore into a new --data-dir",
            member_dir.display()
        );
    }
    std::fs::create_dir_all(&member_dir)
        .with_context(|| format!("creating {}", member_dir.display()))?;
    crate::context::check_engine_marker(&member_dir, cfg.storage_engine)?;

    let backend = crate::context::open_backend(&cfg, &member_dir)?;
    let imported = if is_etcd_file(&file)? {
        metastore_maintenance_api::snapshot::import_etcd_file(
            &*backend,
            &file,
            &member_dir,
            skip_hash_check,
        )
    } else {
        metastore_maintenance_api::snapshot::import_file(&*backend, &file)
    };
    if let Err(e) = imported {
        // Nothing is left behind of a refused file.
        drop(backend);
        let _ = std::fs::remove_dir_all(&member_dir);
        return Err(anyhow::Error::from(e).context(format!("restoring {}", file.display())));
    }
    // The new cluster's log starts after one index per member, as a bootstrapped one does.
    let index = ids.len() as u64;
    let records: Vec<Member> = members
        .iter()
        .map(|m| Member {
            id: m.id,
            name: m.name.clone(),
            peer_urls: m.peer_urls.clone(),
            client_urls: Vec::new(),
            is_learner: false,
        })
        .collect();
    metastore_state_machine::reset_for_restore(backend.clone(), &records, index)
        .context("rewriting the membership")?;

    let mut raft_cfg = metastore_raft_node::RaftConfig::new(me.id, member_dir.clone());
    raft_cfg.wal_dir_override = cfg.wal_dir.clone();
    let view = backend.snapshot().context("reading the restored state")?;
    let buckets = metastore_state_machine::buckets();
    metastore_raft_node::bootstrap_from_snapshot(
        &raft_cfg,
        index,
        RESTORE_TERM,
        ids,
        Box::new(move |w: &mut dyn std::io::Write| {
            metastore_storage::export_snapshot(&*view, &buckets, w)
                .map(|_| ())
                .map_err(std::io::Error::other)
        }),
    )
    .context("writing the raft snapshot")?;
    crate::boot::write_identity(&member_dir, me.id, cluster_id)?;
    println!(
        "restored {} into {} as member {:x} of cluster {cluster_id:x} ({} members)",
        file.display(),
        cfg.data_dir().display(),
        me.id,
        members.len()
    );
    Ok(())
}

/// Whether `file` is etcd's (a bbolt database, as MetaStore saves since issue 21) rather than
/// MetaStore's own earlier format.
fn is_etcd_file(file: &Path) -> Result<bool> {
    metastore_maintenance_api::snapshot::is_etcd_file(file)
        .with_context(|| format!("opening {}", file.display()))
}

/// What `etcdctl snapshot status` prints about a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StatusFigures {
    hash: u32,
    revision: i64,
    total_keys: u64,
    total_size_bytes: u64,
}

/// Describes a snapshot file of either format: etcd's (a bbolt database, checked and hashed as
/// etcdctl 3.4 does; its trailer, if any, is not read, as etcdctl does not) or MetaStore's own
/// (its SHA-256 verified).
fn status(file: &Path) -> Result<StatusFigures> {
    if is_etcd_file(file)? {
        let db = metastore_bbolt::Db::open(file)?;
        let st = metastore_bbolt::status::snapshot_status(&db)?;
        return Ok(StatusFigures {
            hash: st.hash,
            revision: st.revision,
            total_keys: st.total_key,
            total_size_bytes: st.total_size,
        });
    }
    let st = metastore_maintenance_api::snapshot::status(file)?;
    Ok(StatusFigures {
        hash: st.hash,
        revision: st.revision,
        total_keys: st.total_keys,
        total_size_bytes: st.total_size_bytes,
    })
}

/// The status in etcdctl's `-w` formats: simple, json, table, fields.
fn render_status(st: &StatusFigures, write_out: &str) -> Result<String> {
    let hash = format!("{:x}", st.hash);
    let size = human_bytes(st.total_size_bytes);
    Ok(match write_out {
        "simple" => format!("{hash}, {}, {}, {size}\n", st.revision, st.total_keys),
        "json" => format!(
            "{{\"hash\":{},\"revision\":{},\"totalKey\":{},\"totalSize\":{}}}\n",
            st.hash, st.revision, st.total_keys, st.total_size_bytes
        ),
        "fields" => format!(
            "\"Hash\" : {}\n\"Revision\" : {}\n\"Keys\" : {}\n\"Size\" : {}\n",
            st.hash, st.revision, st.total_keys, st.total_size_bytes
        ),
        "table" => table(
            &["HASH", "REVISION", "TOTAL KEYS", "TOTAL SIZE"],
            &[
                hash,
                st.revision.to_string(),
                st.total_keys.to_string(),
                size,
            ],
        ),
        other => bail!("unknown --write-out {other:?}: use simple, json, table or fields"),
    })
}

/// etcdctl's table (its tablewriter): headers centred, cells right-aligned, one space of margin.
fn table(headers: &[&str], row: &[String]) -> String {
    let widths: Vec<usize> = headers
        .iter()
        .zip(row)
        .map(|(h, c)| h.len().max(c.len()))
        .collect();
    let border: String = widths
        .iter()
        .map(|w| format!("+{}", "-".repeat(w + 2)))
        .collect::<String>()
        + "+\n";
    let header: String = headers
        .iter()
        .zip(&widths)
        .map(|(h, w)| {
            let gap = w - h.len();
            format!("| {}{h}{} ", " ".repeat(gap / 2), " ".repeat(gap - gap / 2))
        })
        .collect::<String>()
        + "|\n";
    let cells: String = row
        .iter()
        .zip(&widths)
        .map(|(c, w)| format!("| {c:>w$} "))
        .collect::<String>()
        + "|\n";
    format!("{border}{header}{border}{cells}{border}")
}

/// A size as etcdctl prints it (go-humanize's `Bytes`: SI units, one decimal below 10).
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    if bytes < 10 {
        return format!("{bytes} B");
    }
    let exp = ((bytes as f64).ln() / 1000f64.ln()).floor() as usize;
    let exp = exp.min(UNITS.len() - 1);
    let value = (bytes as f64 / 1000f64.powi(exp as i32) * 10.0 + 0.5).floor() / 10.0;
    if value < 10.0 {
        format!("{value:.1} {}", UNITS[exp])
    } else {
        format!("{value:.0} {}", UNITS[exp])
    }
}

/// Run `metastore snapshot <args>`.
pub fn run(args: &[String]) -> Result<()> {
    let command = SnapshotCommand::parse_from(
        std::iter::once("metastore snapshot".to_string()).chain(args.iter().cloned()),
    );
    match command {
        SnapshotCommand::Status { file, write_out } => {
            let figures = status(&file).with_context(|| format!("reading {}", file.display()))?;
            print!("{}", render_status(&figures, &write_out)?);
            Ok(())
        }
        SnapshotCommand::Restore {
            file,
            name,
            data_dir,
            initial_cluster,
            initial_cluster_token,
            initial_advertise_peer_urls,
            storage_engine,
            skip_hash_check,
        } => restore(
            file,
            name,
            data_dir,
            initial_cluster,
            initial_cluster_token,
            initial_advertise_peer_urls,
            storage_engine,
            skip_hash_check,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_go_humanize_writes_them() {
        let cases = [
            (0, "0 B"),
            (9, "9 B"),
            (10, "10 B"),
            (999, "999 B"),
            (1000, "1.0 kB"),
            (4096, "4.1 kB"),
            (20480, "20 kB"),
            (315_392, "315 kB"),
            (2_147_483_648, "2.1 GB"),
        ];
        for (bytes, text) in cases {
            assert_eq!(human_bytes(bytes), text, "{bytes}");
        }
    }

    #[test]
    fn the_table_is_etcdctls() {
        let st = StatusFigures {
            hash: 0x63d2_91b5,
            revision: 2,
            total_keys: 5,
            total_size_bytes: 20480,
        };
        assert_eq!(
            render_status(&st, "table").unwrap(),
            "+----------+----------+------------+------------+\n\
             |   HASH   | REVISION | TOTAL KEYS | TOTAL SIZE |\n\
             +----------+----------+------------+------------+\n\
             | 63d291b5 |        2 |          5 |      20 kB |\n\
             +----------+----------+------------+------------+\n"
        );
        assert_eq!(
            render_status(&st, "simple").unwrap(),
            "63d291b5, 2, 5, 20 kB\n"
        );
        assert!(render_status(&st, "yaml").is_err());
    }
}
