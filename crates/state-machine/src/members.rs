//! The membership table: every member's name, peer URLs, client URLs and learner flag, kept in
//! bucket `members` (key: the member id as 8 bytes big-endian, value: `metastorepb.Member`).
//!
//! Raft decides who votes; this table says who the members are. It changes only through
//! committed entries: membership changes (add, promote, remove), `MemberAttributes` (a member
//! publishing its name and client URLs) and `MemberPeerUrls` (MemberUpdate).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use metastore_proto::metastorepb::Member;
use metastore_raft_node::{MemberChange, Membership};
use metastore_storage::{ReadView, ScanRange, StorageError, Visit, WriteBatch};
use parking_lot::RwLock;
use prost::Message;

/// The bucket holding the membership table.
pub const MEMBERS_BUCKET: &str = "members";
/// The bucket holding the ids of removed members (etcd's `members_removed`): peers refuse them.
pub const MEMBERS_REMOVED_BUCKET: &str = "members_removed";

/// The replicated membership table (read side; changes are applied by the state machine).
#[derive(Clone, Default)]
pub struct MemberTable(
    Arc<RwLock<BTreeMap<u64, Member>>>,
    Arc<RwLock<BTreeSet<u64>>>,
);

impl MemberTable {
    /// Whether a committed change removed member `id` (a member that is merely unknown yet,
    /// e.g. to a member still catching up, is not removed).
    pub fn is_removed(&self, id: u64) -> bool {
        self.1.read().contains(&id)
    }

    /// Every member, ordered by id.
    pub fn list(&self) -> Vec<Member> {
        self.0.read().values().cloned().collect()
    }

    /// Whether `id` is a member.
    pub fn contains(&self, id: u64) -> bool {
        self.0.read().contains_key(&id)
    }

    /// Whether the table is empty (a member that has not applied any membership yet).
    pub fn is_empty(&self) -> bool {
        self.0.read().is_empty()
    }

    /// One member.
    pub fn get(&self, id: u64) -> Option<Member> {
        self.0.read().get(&id).cloned()
    }

    /// Replaces the table with the bucket's content.
    pub(crate) fn load(&self, view: &dyn ReadView) -> Result<(), StorageError> {
        let mut loaded = BTreeMap::new();
        view.scan(MEMBERS_BUCKET, ScanRange::all(), &mut |_, v| {
            match Member::decode(v) {
                Ok(m) => {
                    loaded.insert(m.id, m);
                }
                Err(e) => tracing::error!(error = %e, "undecodable member record skipped"),
            }
            Visit::Continue
        })?;
        let mut removed = BTreeSet::new();
        view.scan(MEMBERS_REMOVED_BUCKET, ScanRange::all(), &mut |k, _| {
            if let Ok(id) = <[u8; 8]>::try_from(k) {
                removed.insert(u64::from_be_bytes(id));
            }
            Visit::Continue
        })?;
        *self.0.write() = loaded;
        *self.1.write() = removed;
        Ok(())
    }

    fn put(&self, member: Member, batch: &mut WriteBatch) {
        batch.put(
            MEMBERS_BUCKET,
            member.id.to_be_bytes().to_vec(),
            member.encode_to_vec(),
        );
        self.0.write().insert(member.id, member);
    }

    /// Applies a membership change raft accepted, writing the changed records to `batch`.
    pub(crate) fn apply_change(
        &self,
        changes: &[MemberChange],
        payload: &[u8],
        membership: &Membership,
        batch: &mut WriteBatch,
    ) {
        let proposed = Member::decode(payload).ok();
        for change in changes {
            match *change {
                MemberChange::AddVoter(id) | MemberChange::AddLearner(id) => {
                    let mut member = match (self.get(id), &proposed) {
                        (Some(existing), _) => existing,
                        (None, Some(p)) if p.id == id => p.clone(),
                        (None, _) => Member {
                            id,
                            ..Default::default()
                        },
                    };
                    member.is_learner = matches!(change, MemberChange::AddLearner(_));
                    self.put(member, batch);
                }
                MemberChange::Remove(id) => {
                    batch.delete(MEMBERS_BUCKET, id.to_be_bytes().to_vec());
                    batch.put(
                        MEMBERS_REMOVED_BUCKET,
                        id.to_be_bytes().to_vec(),
                        Vec::new(),
                    );
                    self.0.write().remove(&id);
                    self.1.write().insert(id);
                }
            }
        }
        // Keep the learner flags in step with raft's view.
        for mut member in self.list() {
            let is_learner = membership.learners.contains(&member.id);
            if member.is_learner != is_learner && membership.contains(member.id) {
                member.is_learner = is_learner;
                self.put(member, batch);
            }
        }
    }

    /// A member published its name and client URLs. Unknown members are ignored (a removed
    /// member's late publication must not bring it back). Returns whether anything changed.
    pub(crate) fn publish(
        &self,
        id: u64,
        name: &str,
        client_urls: &[String],
        batch: &mut WriteBatch,
    ) -> bool {
        let Some(mut member) = self.get(id) else {
            return false;
        };
        if member.name == name && member.client_urls == client_urls {
            return false;
        }
        member.name = name.to_string();
        member.client_urls = client_urls.to_vec();
        self.put(member, batch);
        true
    }

    /// MemberUpdate: new peer URLs. False when the member is unknown.
    pub(crate) fn update_peer_urls(
        &self,
        id: u64,
        peer_urls: &[String],
        batch: &mut WriteBatch,
    ) -> bool {
        let Some(mut member) = self.get(id) else {
            return false;
        };
        member.peer_urls = peer_urls.to_vec();
        self.put(member, batch);
        true
    }
}
