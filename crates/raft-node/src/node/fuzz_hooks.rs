//! What the fuzz targets reach of the raft loop (the `fuzzing` feature): a raft node with an
//! in-memory log that handles its Readies as the loop does ([`super::worker`]), minus the
//! WAL, the snapshot files and the transport, so that peer messages go through the same guard
//! and committed entries and membership changes reach a [`StateMachine`] the same way.

use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Message, Snapshot};
use raft::storage::MemStorage;
use raft::RawNode;

use super::conf_change::ConfChanges;
use super::guard;
use super::propose::split_request_id;
use crate::logger::raft_logger;
use crate::storage::LogStore;
use crate::{RaftError, StateMachine};

/// A raft node over an in-memory log driving a state machine, without threads or files.
pub struct RaftHarness<S: StateMachine> {
    raw: RawNode<LogStore>,
    store: LogStore,
    conf_changes: ConfChanges,
    sm: S,
    applied_index: u64,
}

impl<S: StateMachine> RaftHarness<S> {
    /// Member `member_id` of a cluster of `voters`, whose log holds one entry per item of
    /// `terms` (indexes from 1; the terms must not decrease), committed up to `commit`.
    pub fn new(
        sm: S,
        member_id: u64,
        voters: &[u64],
        terms: &[u64],
        commit: u64,
    ) -> Result<Self, RaftError> {
        let mem = MemStorage::new_with_conf_state(ConfState::from((voters.to_vec(), vec![])));
        let entries: Vec<Entry> = terms
            .iter()
            .zip(1u64..)
            .map(|(term, index)| Entry {
                index,
                term: *term,
                ..Default::default()
            })
            .collect();
        mem.wl()
            .append(&entries)
            .map_err(|e| RaftError::Raft(e.to_string()))?;
        mem.wl().set_hardstate(HardState {
            term: terms.last().copied().unwrap_or(0),
            commit: commit.min(terms.len() as u64),
            ..Default::default()
        });
        let store = LogStore::new(mem);
        let cfg = raft::Config {
            id: member_id,
            election_tick: 10,
            heartbeat_tick: 1,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        cfg.validate()
            .map_err(|e| RaftError::InvalidConfig(e.to_string()))?;
        let raw = RawNode::new(&cfg, store.clone(), &raft_logger(member_id))
            .map_err(|e| RaftError::Raft(e.to_string()))?;
        Ok(RaftHarness {
            raw,
            store,
            conf_changes: ConfChanges::new(member_id),
            sm,
            applied_index: 0,
        })
    }

    /// The state machine.
    pub fn state_machine(&self) -> &S {
        &self.sm
    }

    /// The index of the last entry applied.
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// The last index of the log.
    pub fn last_index(&self) -> u64 {
        self.raw.raft.raft_log.last_index()
    }

    /// Whether this member leads.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == raft::StateRole::Leader
    }

    /// A message from a peer, as the loop takes it: the guard, then raft, then the Readies.
    /// Raft's refusals are ignored as the loop ignores them; an error is what would stop the
    /// loop.
    pub fn step(&mut self, mut msg: Message) -> Result<(), RaftError> {
        if guard::sanitize(
            &self.raw.raft.raft_log,
            self.raw.raft.state == raft::StateRole::Leader,
            &mut msg,
        )
        .is_ok()
        {
            let _ = self.raw.step(msg);
        }
        self.handle_readies()
    }

    /// One tick of raft's logical clock.
    pub fn tick(&mut self) -> Result<(), RaftError> {
        self.raw.tick();
        self.handle_readies()
    }

    /// Starts an election.
    pub fn campaign(&mut self) -> Result<(), RaftError> {
        let _ = self.raw.campaign();
        self.handle_readies()
    }

    /// Proposes `payload` (a normal entry) with `request_id`, as a proposal of this member.
    pub fn propose(&mut self, request_id: u64, payload: &[u8]) -> Result<(), RaftError> {
        let data = super::propose::with_request_id(request_id, payload);
        let _ = self.raw.propose(Vec::new(), data);
        self.handle_readies()
    }

    /// Applies a committed membership change entry of `entry_type` carrying `data` at the next
    /// index, as the loop applies one (raft first, then the state machine).
    pub fn apply_conf_change_entry(
        &mut self,
        entry_type: EntryType,
        data: &[u8],
    ) -> Option<S::Output> {
        let mut entry = Entry {
            index: self.applied_index + 1,
            term: self.raw.raft.term,
            data: data.to_vec().into(),
            ..Default::default()
        };
        entry.set_entry_type(entry_type);
        let output = self
            .conf_changes
            .apply(&mut self.raw, &self.store, &mut self.sm, &entry);
        self.applied_index = entry.index;
        output.map(|(_, output)| output)
    }

    /// The loop's Ready handling ([`super::worker`]), without a WAL: the log and hard state go
    /// to the in-memory log, a received snapshot replaces the state machine's state.
    fn handle_readies(&mut self) -> Result<(), RaftError> {
        while self.raw.has_ready() {
            let mut ready = self.raw.ready();
            ready.take_messages();
            if !ready.snapshot().is_empty() {
                self.install_snapshot(ready.snapshot().clone())?;
            }
            if !ready.entries().is_empty() {
                self.store
                    .mem
                    .wl()
                    .append(ready.entries())
                    .map_err(|e| RaftError::Raft(e.to_string()))?;
            }
            if let Some(hard_state) = ready.hs() {
                self.store.mem.wl().set_hardstate(hard_state.clone());
            }
            ready.take_persisted_messages();
            self.apply(ready.take_committed_entries());
            let mut light = self.raw.advance(ready);
            if let Some(commit) = light.commit_index() {
                self.store.mem.wl().mut_hard_state().set_commit(commit);
            }
            light.take_messages();
            self.apply(light.take_committed_entries());
            self.raw.advance_apply();
        }
        Ok(())
    }

    /// A snapshot message that carries its data (the loop saves it as a file, then restores
    /// from the file).
    fn install_snapshot(&mut self, snapshot: Snapshot) -> Result<(), RaftError> {
        let (index, term) = (snapshot.get_metadata().index, snapshot.get_metadata().term);
        let data = snapshot.data.clone();
        self.store
            .mem
            .wl()
            .apply_snapshot(snapshot)
            .map_err(|e| RaftError::Raft(e.to_string()))?;
        self.sm
            .restore(index, term, &mut &data[..])
            .map_err(|source| RaftError::Restore { index, source })?;
        self.applied_index = index;
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) {
        for entry in entries {
            if entry.index <= self.applied_index {
                continue;
            }
            match entry.get_entry_type() {
                EntryType::EntryNormal => match split_request_id(&entry.data) {
                    Some((_, payload)) if !entry.data.is_empty() => {
                        self.sm.apply(entry.index, entry.term, payload);
                    }
                    _ => self.sm.apply_noop(entry.index, entry.term),
                },
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    self.conf_changes
                        .apply(&mut self.raw, &self.store, &mut self.sm, &entry);
                }
            }
            self.applied_index = entry.index;
        }
    }
}
