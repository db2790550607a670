//! Start-up: opening (or creating) the WAL, replaying it, choosing the snapshot to start from
//! (a recorded snapshot file or an in-place marker the state machine covers), restoring the
//! state machine from it, and building the `RawNode` whose log and membership match the disk;
//! also creating a member's raft state from a restored snapshot ([`bootstrap_from_snapshot`]).
//!
//! Runs once, before the loop starts, and owns nothing afterwards. It must not apply
//! committed entries (the Ready loop applies those after the state machine's applied index) nor
//! take snapshots.

use std::collections::HashSet;

use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Snapshot, SnapshotMetadata};
use raft::storage::MemStorage;
use raft::{RawNode, StateRole};

use super::conf_change::{apply_conf_change, bootstrap_entries};
use crate::logger::raft_logger;
use crate::snap::{SnapshotFile, Snapshotter};
use crate::storage::LogStore;
use crate::wal::{Covering, Wal};
use crate::{RaftConfig, RaftError, StateMachine};

/// A member brought up from disk, ready for the loop.
pub(super) struct Started {
    pub(super) raw: RawNode<LogStore>,
    pub(super) store: LogStore,
    pub(super) wal: Wal,
    /// Index of the last entry whose effects the state machine holds.
    pub(super) applied: u64,
    /// Index of the snapshot file recovery started from (0 if none).
    pub(super) snapshot_index: u64,
    /// The only voter: campaign as soon as every committed entry is applied.
    pub(super) campaign_alone: bool,
}

/// Recovers the log and `sm` from disk ([`recover`]) and builds the raft node on top of them.
/// A member that is the only voter campaigns at once.
pub(super) fn start_raft<S: StateMachine>(
    cfg: &RaftConfig,
    sm: &mut S,
    snapshotter: &Snapshotter,
) -> Result<Started, RaftError> {
    let member_id = cfg.member_id;
    let recovered = recover(cfg, sm, snapshotter)?;

    let store = LogStore::new(recovered.mem);
    let snapshot_index = recovered.snapshot.as_ref().map_or(0, |f| f.metadata.index);
    if let Some(file) = recovered.snapshot {
        store.set_latest_snapshot(file);
    }
    let raft_cfg = raft::Config {
        id: member_id,
        election_tick: cfg.election_ticks,
        heartbeat_tick: cfg.heartbeat_ticks,
        applied: recovered.applied,
        max_size_per_msg: cfg.max_size_per_msg,
        max_inflight_msgs: cfg.max_inflight_msgs,
        check_quorum: true,
        pre_vote: true,
        ..Default::default()
    };
    raft_cfg
        .validate()
        .map_err(|e| RaftError::InvalidConfig(e.to_string()))?;
    let mut raw = RawNode::new(&raft_cfg, store.clone(), &raft_logger(member_id))
        .map_err(|e| RaftError::Raft(e.to_string()))?;
    // Membership changes the state machine already holds are not delivered again, but raft's
    // view of the membership must include them.
    for entry in &recovered.applied_conf_changes {
        apply_conf_change(&mut raw, &store, entry);
    }
    // The only voter elects itself at once rather than after an election timeout; raft
    // refuses to campaign while committed membership changes (a new cluster's bootstrap
    // entries) are unapplied, so the loop campaigns once they are.
    let mut campaign_alone =
        raw.raft.prs().is_singleton() && raw.raft.prs().conf().voters().contains(member_id);
    if campaign_alone {
        raw.campaign().map_err(|e| RaftError::Raft(e.to_string()))?;
        campaign_alone = raw.raft.state != StateRole::Leader;
    }
    Ok(Started {
        raw,
        store,
        wal: recovered.wal,
        applied: recovered.applied,
        snapshot_index,
        campaign_alone,
    })
}

/// Creates the raft state of a member from a full state-machine snapshot instead of an empty
/// log (what `snapshot restore` does): a snapshot file at (`term`, `index`) whose membership is
/// `voters`, and a WAL that starts with it. The state machine must already hold that state with
/// applied index `index` (or be volatile: it is then restored from the file on start).
/// Refuses a directory that already holds a WAL.
pub fn bootstrap_from_snapshot(
    cfg: &RaftConfig,
    index: u64,
    term: u64,
    voters: Vec<u64>,
    write: crate::SnapshotWriter,
) -> Result<(), RaftError> {
    if index == 0 || term == 0 || voters.is_empty() {
        return Err(RaftError::InvalidConfig(
            "a restored snapshot needs an index, a term and voters".into(),
        ));
    }
    if Wal::exists(&cfg.wal_dir())? {
        return Err(RaftError::Inconsistent(format!(
            "{} already holds a WAL",
            cfg.wal_dir().display()
        )));
    }
    let metadata = SnapshotMetadata {
        index,
        term,
        conf_state: Some(ConfState::from((voters, vec![]))).into(),
        ..Default::default()
    };
    let snapshotter = Snapshotter::new(&cfg.snap_dir())?;
    snapshotter.save(&metadata, write)?;
    let mut wal = Wal::create(&cfg.wal_dir(), cfg.wal_segment_size_bytes, &metadata)?;
    let hard_state = HardState {
        term,
        commit: index,
        ..Default::default()
    };
    wal.save(None, &[], Some(&hard_state))?;
    wal.sync()?;
    Ok(())
}

/// What recovery from disk produced.
struct Recovered {
    wal: Wal,
    mem: MemStorage,
    snapshot: Option<SnapshotFile>,
    applied: u64,
    /// Membership changes at or below `applied` and after the snapshot.
    applied_conf_changes: Vec<Entry>,
}

/// Loads the WAL and the newest usable snapshot into a raft log and brings `sm` up to the
/// snapshot; creates a new WAL for a new member.
fn recover<S: StateMachine>(
    cfg: &RaftConfig,
    sm: &mut S,
    snapshotter: &Snapshotter,
) -> Result<Recovered, RaftError> {
    let wal_dir = cfg.wal_dir();
    let sm_applied = sm.applied_index();
    let raft_err = |e: raft::Error| RaftError::Raft(e.to_string());

    if !Wal::exists(&wal_dir)? {
        if sm_applied != 0 {
            return Err(RaftError::Inconsistent(format!(
                "the state machine has applied index {sm_applied} but {} holds no WAL",
                wal_dir.display()
            )));
        }
        let conf_state = if cfg.join {
            ConfState::default()
        } else {
            ConfState::from((cfg.peers.clone(), vec![]))
        };
        let mut bootstrap = SnapshotMetadata::default();
        bootstrap.set_conf_state(conf_state.clone());
        let mut wal = Wal::create(&wal_dir, cfg.wal_segment_size_bytes, &bootstrap)?;
        let mem = MemStorage::new();
        mem.wl().set_conf_state(conf_state);
        if !cfg.join && !cfg.bootstrap.is_empty() {
            let entries = bootstrap_entries(&cfg.bootstrap);
            let hard_state = HardState {
                term: 1,
                commit: entries.len() as u64,
                ..Default::default()
            };
            wal.save(None, &entries, Some(&hard_state))?;
            wal.sync()?;
            let mut core = mem.wl();
            core.append(&entries).map_err(raft_err)?;
            core.set_hardstate(hard_state);
        }
        tracing::info!(
            member_id = format_args!("{:x}", cfg.member_id),
            peers = ?cfg.peers,
            join = cfg.join,
            "starting a new member"
        );
        return Ok(Recovered {
            wal,
            mem,
            snapshot: None,
            applied: 0,
            applied_conf_changes: Vec::new(),
        });
    }

    // The newest snapshot file that verifies, if the WAL records it, and any marker the state
    // machine's applied index covers, are snapshots recovery can start from: the replay drops
    // the entries under them as it reads, so a long log never sits in memory whole.
    let files = snapshotter.list()?;
    let mut unusable = HashSet::new();
    let mut verified = None;
    for (_, _, path) in &files {
        match snapshotter.load(path) {
            Ok(file) => {
                verified = Some(file);
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "skipping unusable snapshot");
                unusable.insert(path.clone());
            }
        }
    }
    let covering = Covering {
        applied: sm_applied,
        file: verified
            .as_ref()
            .map(|f| (f.metadata.term, f.metadata.index)),
    };
    let (wal, contents) = Wal::open_covering(&wal_dir, cfg.wal_segment_size_bytes, covering)?;
    // Only snapshots the WAL recorded count: a file written just before a crash, whose marker
    // never became durable, describes state the log does not know about.
    let markers: HashSet<(u64, u64)> = contents
        .snapshots
        .iter()
        .map(|m| (m.term, m.index))
        .collect();
    let mut snapshot = None;
    for (term, index, path) in files {
        if !markers.contains(&(term, index)) {
            // Normal after a crash between writing a snapshot and recording it.
            tracing::info!(path = %path.display(), "ignoring snapshot the WAL does not record");
            continue;
        }
        if unusable.contains(&path) {
            continue;
        }
        if let Some(file) = verified.take().filter(|f| f.path == path) {
            snapshot = Some(file);
            break;
        }
        match snapshotter.load(&path) {
            Ok(file) => {
                snapshot = Some(file);
                break;
            }
            Err(e) => tracing::warn!(error = %e, "skipping unusable snapshot"),
        }
    }
    // A marker without a file is a snapshot taken in place (`persist`): the state machine holds
    // the state up to it if its applied index covers it. The newest such marker beats an older
    // file, whose later entries the WAL may no longer hold.
    let in_place = contents
        .snapshots
        .iter()
        .filter(|m| m.index > 0 && m.index <= sm_applied)
        .max_by_key(|m| m.index)
        .filter(|m| snapshot.as_ref().is_none_or(|f| m.index > f.metadata.index))
        .cloned();
    if in_place.is_some() {
        snapshot = None;
    }
    let base = match (&in_place, &snapshot) {
        (Some(marker), _) => marker.clone(),
        (None, Some(file)) => file.metadata.clone(),
        (None, None) => contents
            .snapshots
            .iter()
            .find(|m| m.index == 0)
            .cloned()
            .ok_or_else(|| {
                RaftError::Inconsistent(
                    "no usable snapshot and the WAL no longer holds the initial membership".into(),
                )
            })?,
    };

    let entries: Vec<Entry> = contents
        .entries
        .into_iter()
        .filter(|e| e.index > base.index)
        .collect();
    if let Some(first) = entries.first() {
        if first.index != base.index + 1 {
            return Err(RaftError::Inconsistent(format!(
                "the WAL's entries after snapshot index {} start at index {}; the ones in \
                 between are missing",
                base.index, first.index
            )));
        }
    }
    let last_index = entries.last().map_or(base.index, |e| e.index);
    sm.recovered(last_index);
    if sm_applied > last_index {
        return Err(RaftError::Inconsistent(format!(
            "the state machine has applied index {sm_applied}, beyond the log's last index \
             {last_index}"
        )));
    }
    let mut hard_state = contents.hard_state;
    hard_state.term = hard_state.term.max(base.term);
    // Whatever was applied or snapshotted was committed, even if the commit index written
    // alongside it did not reach the disk.
    hard_state.commit = hard_state.commit.max(base.index).max(sm_applied);
    if hard_state.commit > last_index {
        return Err(RaftError::Inconsistent(format!(
            "committed index {} is beyond the log's last index {last_index}",
            hard_state.commit
        )));
    }

    let mem = MemStorage::new();
    {
        let mut core = mem.wl();
        if base.index > 0 {
            let mut metadata_only = Snapshot::default();
            metadata_only.set_metadata(base.clone());
            core.apply_snapshot(metadata_only).map_err(raft_err)?;
        } else {
            core.set_conf_state(base.get_conf_state().clone());
        }
        core.append(&entries).map_err(raft_err)?;
        core.set_hardstate(hard_state.clone());
    }

    if let Some(file) = &snapshot {
        let metadata = &file.metadata;
        if sm_applied < metadata.index {
            let mut reader = snapshotter.open_data(file)?;
            sm.restore(metadata.index, metadata.term, &mut reader)
                .map_err(|source| RaftError::Restore {
                    index: metadata.index,
                    source,
                })?;
            tracing::info!(
                index = metadata.index,
                term = metadata.term,
                "restored state machine from snapshot"
            );
        }
    }
    let applied = sm_applied.max(base.index);
    let applied_conf_changes = entries
        .iter()
        .filter(|e| e.index <= applied && e.get_entry_type() != EntryType::EntryNormal)
        .cloned()
        .collect();
    tracing::info!(
        member_id = format_args!("{:x}", cfg.member_id),
        snapshot_index = base.index,
        applied_index = applied,
        committed_index = hard_state.commit,
        last_index,
        term = hard_state.term,
        "recovered raft log"
    );
    Ok(Recovered {
        wal,
        mem,
        snapshot,
        applied,
        applied_conf_changes,
    })
}
