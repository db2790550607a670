//! Validation of a recorded history: linearizability of the KV operations, no acknowledged
//! write lost, complete and ordered watch streams, no lease expiring before its TTL.
//!
//! # Why revisions rather than a WGL search
//!
//! etcd's API names the linearization point of every operation: a write creates exactly one
//! revision (the response header's `revision`), and a linearizable read answers the state at its
//! header's revision. The store's history, in revision order, is read back at the end through one
//! watch from revision 1 (the "truth"), which also resolves every operation whose outcome the
//! client did not learn (a timeout, a member killed mid-call): its unique value is in the truth or
//! it is not. The history is then linearizable exactly when ordering every operation by its
//! revision (writes at `(revision, 0)`, reads at `(revision, 1)`, reads of one revision among
//! themselves by call time) is a legal sequential history that respects real time:
//!
//! 1. the truth is a gap-free sequence of revisions, each event attributable to a request that was
//!    made (unique values; deletes to an acknowledged or unknown delete of that key; deletes of
//!    lease keys to their lease), and no request's write appears twice;
//! 2. every acknowledged write is in the truth at the revision it answered (nothing lost), every
//!    read answered the truth's state at its revision, every compare-and-swap's compare held (or
//!    failed) against the state just before (or at) its revision;
//! 3. real time: if A returned before B was called, A's position is not after B's; an operation
//!    with an unknown outcome that did take effect is placed at its revision with an infinite end.
//!
//! This is the approach of etcd's own robustness tests (their validation replays the watch
//! history and checks responses against revisions before falling back to porcupine). It is sound
//! (every anomaly reported contradicts etcd's documented guarantees) and, unlike a WGL search over
//! per-key histories with open-ended operations, linear in the history's length, so runs of many
//! minutes check in milliseconds. A model checker would add nothing here that the revision
//! witness does not already decide, and no maintained Rust crate offers one for etcd's model.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use super::history::{
    Bytes, Event, EventKind, Expect, LeaseLife, Op, Outcome, Request, Seen, WatchLog,
};

/// How many anomalies of each check are spelled out (the rest are only counted).
const REPORTED: usize = 20;

/// The keys the workload attaches to leases start with this; nothing else deletes them.
pub const LEASE_PREFIX: &[u8] = b"lease/";

/// Everything a run recorded.
pub struct Recorded<'a> {
    pub ops: &'a [Op],
    /// Every event from revision 1 to the end, from one watch.
    pub truth: &'a [Event],
    pub leases: &'a [LeaseLife],
    pub watches: &'a [WatchLog],
}

/// The findings: anomalies (empty when the history is valid) and counts.
#[derive(Debug, Default)]
pub struct Report {
    pub anomalies: Vec<String>,
    /// Anomalies found beyond those spelled out.
    pub unreported: usize,
    pub unknown_ops_applied: usize,
    pub unknown_ops_not_applied: usize,
    pub lease_expiries: usize,
    pub lease_revocations: usize,
}

impl Report {
    fn anomaly(&mut self, text: String) {
        if self.anomalies.len() < REPORTED {
            self.anomalies.push(text);
        } else {
            self.unreported += 1;
        }
    }

    /// Total anomalies found.
    pub fn count(&self) -> usize {
        self.anomalies.len() + self.unreported
    }
}

/// A key's state after some revision.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyState {
    value: Bytes,
    mod_revision: i64,
    lease: i64,
}

/// Every key's states in revision order, from the truth.
struct Timeline {
    keys: BTreeMap<Bytes, Vec<(i64, Option<KeyState>)>>,
    last_revision: i64,
}

impl Timeline {
    fn new(truth: &[Event]) -> Timeline {
        let mut keys: BTreeMap<Bytes, Vec<(i64, Option<KeyState>)>> = BTreeMap::new();
        for e in truth {
            let state = (e.kind == EventKind::Put).then(|| KeyState {
                value: e.value.clone(),
                mod_revision: e.revision,
                lease: e.lease,
            });
            keys.entry(e.key.clone())
                .or_default()
                .push((e.revision, state));
        }
        Timeline {
            keys,
            last_revision: truth.last().map_or(1, |e| e.revision),
        }
    }

    /// The key's state at `revision` (after applying it).
    fn at(&self, key: &[u8], revision: i64) -> Option<&KeyState> {
        let states = self.keys.get(key)?;
        let after = states.partition_point(|(r, _)| *r <= revision);
        after.checked_sub(1).and_then(|i| states[i].1.as_ref())
    }

    fn seen(&self, key: &[u8], revision: i64) -> Vec<Seen> {
        self.at(key, revision)
            .map(|s| Seen {
                key: key.to_vec(),
                value: s.value.clone(),
                mod_revision: s.mod_revision,
            })
            .into_iter()
            .collect()
    }

    fn seen_prefix(&self, prefix: &[u8], revision: i64) -> Vec<Seen> {
        self.keys
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .flat_map(|(k, _)| self.seen(k, revision))
            .collect()
    }
}

fn holds(expect: &Expect, state: Option<&KeyState>) -> bool {
    match expect {
        Expect::Value(v) => state.is_some_and(|s| &s.value == v),
        Expect::ModRevision(r) => state.map_or(0, |s| s.mod_revision) == *r,
    }
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn describe(op: &Op) -> String {
    format!(
        "client {} [{:.3}s, {:.3}s] {:?} -> {:?}",
        op.client,
        op.call.as_secs_f64(),
        op.ret.as_secs_f64(),
        op.request,
        op.outcome
    )
}

/// Checks everything; the report lists what is wrong.
pub fn check(rec: &Recorded<'_>) -> Report {
    let mut report = Report::default();
    let timeline = Timeline::new(rec.truth);
    check_truth(rec.truth, &mut report);
    // The position of every operation that took effect: (revision, 0 write | 1 read).
    let mut positions: Vec<(usize, (i64, u8))> = Vec::new();
    attribute_events(rec, &timeline, &mut positions, &mut report);
    check_answers(rec.ops, &timeline, &mut positions, &mut report);
    check_real_time(rec.ops, &positions, &mut report);
    check_leases(rec, &timeline, &mut report);
    for log in rec.watches {
        check_watch(log, rec.truth, &mut report);
    }
    report
}

/// The truth itself: revisions from 2 on without gaps, non-decreasing, one event per key and
/// revision, puts carrying their own revision.
fn check_truth(truth: &[Event], report: &mut Report) {
    let mut expected = 2;
    let mut seen = HashSet::new();
    for e in truth {
        if e.revision != expected && e.revision != expected - 1 {
            report.anomaly(format!(
                "the history jumps from revision {} to {}",
                expected - 1,
                e.revision
            ));
        }
        expected = e.revision + 1;
        if !seen.insert((e.revision, e.key.clone())) {
            report.anomaly(format!(
                "two events for {} at revision {}",
                show(&e.key),
                e.revision
            ));
        }
        if e.kind == EventKind::Put && e.mod_revision != e.revision {
            report.anomaly(format!(
                "put of {} at revision {} says mod_revision {}",
                show(&e.key),
                e.revision,
                e.mod_revision
            ));
        }
    }
}

/// Ties every event of the truth to the request that made it; positions unknown operations
/// that took effect.
fn attribute_events(
    rec: &Recorded<'_>,
    timeline: &Timeline,
    positions: &mut Vec<(usize, (i64, u8))>,
    report: &mut Report,
) {
    let mut by_value: HashMap<&Bytes, usize> = HashMap::new();
    for (i, op) in rec.ops.iter().enumerate() {
        if let Some(v) = op.request.written_value() {
            if by_value.insert(v, i).is_some() {
                report.anomaly(format!("the workload wrote {} twice", show(v)));
            }
        }
    }
    // Acknowledged deletes by (key, revision); unknown deletes per key, earliest call first.
    let mut acked_deletes: HashMap<(&Bytes, i64), usize> = HashMap::new();
    let mut unknown_deletes: HashMap<&Bytes, Vec<usize>> = HashMap::new();
    for (i, op) in rec.ops.iter().enumerate() {
        if let Request::Delete { key } = &op.request {
            match &op.outcome {
                Outcome::Delete { revision, deleted } if *deleted > 0 => {
                    acked_deletes.insert((key, *revision), i);
                }
                Outcome::Unknown(_) => unknown_deletes.entry(key).or_default().push(i),
                _ => {}
            }
        }
    }
    for list in unknown_deletes.values_mut() {
        list.sort_by_key(|&i| std::cmp::Reverse(rec.ops[i].call));
    }
    let mut applied_values = HashSet::new();
    let mut matched_deletes = HashSet::new();
    for e in rec.truth {
        match e.kind {
            EventKind::Put => {
                let Some(&i) = by_value.get(&e.value) else {
                    report.anomaly(format!(
                        "put of {}={} at revision {} that no client requested",
                        show(&e.key),
                        show(&e.value),
                        e.revision
                    ));
                    continue;
                };
                let op = &rec.ops[i];
                if !applied_values.insert(&e.value) {
                    report.anomaly(format!(
                        "the write of {} applied twice (again at revision {}): {}",
                        show(&e.value),
                        e.revision,
                        describe(op)
                    ));
                    continue;
                }
                let (key, lease) = match &op.request {
                    Request::Put { key, lease, .. } => (key, *lease),
                    Request::Cas { key, .. } => (key, 0),
                    _ => unreachable!("only puts and swaps write values"),
                };
                if key != &e.key || lease != e.lease {
                    report.anomaly(format!(
                        "event at revision {} puts {} (lease {:x}) for {}",
                        e.revision,
                        show(&e.key),
                        e.lease,
                        describe(op)
                    ));
                }
                match &op.outcome {
                    Outcome::Put { revision } | Outcome::Cas { revision, .. }
                        if *revision != e.revision =>
                    {
                        report.anomaly(format!(
                            "write applied at revision {} but answered revision {revision}: {}",
                            e.revision,
                            describe(op)
                        ));
                    }
                    Outcome::Cas {
                        succeeded: false, ..
                    } => report.anomaly(format!(
                        "a compare-and-swap answered as failed was applied at revision {}: {}",
                        e.revision,
                        describe(op)
                    )),
                    Outcome::Unknown(_) => {
                        report.unknown_ops_applied += 1;
                        positions.push((i, (e.revision, 0)));
                        if let Request::Cas { key, expect, .. } = &op.request {
                            if !holds(expect, timeline.at(key, e.revision - 1)) {
                                report.anomaly(format!(
                                    "a compare-and-swap applied at revision {} though its compare \
                                     did not hold before it ({:?}): {}",
                                    e.revision,
                                    timeline.at(key, e.revision - 1),
                                    describe(op)
                                ));
                            }
                        }
                    }
                    _ => {}
                }
            }
            EventKind::Delete if e.key.starts_with(LEASE_PREFIX) => {}
            EventKind::Delete => {
                if let Some(&i) = acked_deletes.get(&(&e.key, e.revision)) {
                    matched_deletes.insert(i);
                    continue;
                }
                match unknown_deletes.get_mut(&e.key).and_then(Vec::pop) {
                    Some(i) => {
                        report.unknown_ops_applied += 1;
                        positions.push((i, (e.revision, 0)));
                    }
                    None => report.anomaly(format!(
                        "delete of {} at revision {} that no client requested",
                        show(&e.key),
                        e.revision
                    )),
                }
            }
        }
    }
    for (i, op) in rec.ops.iter().enumerate() {
        let lost = match (&op.request, &op.outcome) {
            (Request::Put { value, .. }, Outcome::Put { .. })
            | (
                Request::Cas { value, .. },
                Outcome::Cas {
                    succeeded: true, ..
                },
            ) => !applied_values.contains(value),
            (Request::Delete { .. }, Outcome::Delete { deleted, .. }) if *deleted > 0 => {
                !matched_deletes.contains(&i)
            }
            (Request::Put { value, .. } | Request::Cas { value, .. }, Outcome::Unknown(_)) => {
                if !applied_values.contains(value) {
                    report.unknown_ops_not_applied += 1;
                }
                false
            }
            _ => false,
        };
        if lost {
            report.anomaly(format!(
                "acknowledged write missing from the history: {}",
                describe(op)
            ));
        }
    }
    report.unknown_ops_not_applied += unknown_deletes.values().map(Vec::len).sum::<usize>();
}

/// Every answer against the truth at its revision; positions the acknowledged operations.
fn check_answers(
    ops: &[Op],
    timeline: &Timeline,
    positions: &mut Vec<(usize, (i64, u8))>,
    report: &mut Report,
) {
    for (i, op) in ops.iter().enumerate() {
        let revision = match &op.outcome {
            Outcome::Unknown(_) => continue,
            Outcome::Put { revision }
            | Outcome::Delete { revision, .. }
            | Outcome::Read { revision, .. }
            | Outcome::Cas { revision, .. } => *revision,
        };
        if revision > timeline.last_revision {
            report.anomaly(format!(
                "answered revision {revision}, beyond the history's last ({}): {}",
                timeline.last_revision,
                describe(op)
            ));
            continue;
        }
        let position = match (&op.request, &op.outcome) {
            (Request::Put { .. }, Outcome::Put { .. }) => (revision, 0),
            (Request::Delete { key }, Outcome::Delete { deleted, .. }) => {
                if *deleted > 1 {
                    report.anomaly(format!("one key, {deleted} deleted: {}", describe(op)));
                }
                if *deleted > 0 {
                    if timeline.at(key, revision - 1).is_none() {
                        report.anomaly(format!(
                            "deleted a key that did not exist at revision {}: {}",
                            revision - 1,
                            describe(op)
                        ));
                    }
                    (revision, 0)
                } else {
                    if let Some(s) = timeline.at(key, revision) {
                        report.anomaly(format!(
                            "deleted nothing though the key held {} at revision {revision}: {}",
                            show(&s.value),
                            describe(op)
                        ));
                    }
                    (revision, 1)
                }
            }
            (Request::Get { key }, Outcome::Read { kvs, .. }) => {
                let expected = timeline.seen(key, revision);
                if kvs != &expected {
                    report.anomaly(format!(
                        "read {kvs:?} but the history holds {expected:?} at revision \
                         {revision}: {}",
                        describe(op)
                    ));
                }
                (revision, 1)
            }
            (Request::Range { prefix }, Outcome::Read { kvs, .. }) => {
                let expected = timeline.seen_prefix(prefix, revision);
                if kvs != &expected {
                    report.anomaly(format!(
                        "range of {} read {} keys, the history holds {} at revision \
                         {revision} (first difference: {:?})",
                        show(prefix),
                        kvs.len(),
                        expected.len(),
                        kvs.iter()
                            .zip(expected.iter())
                            .find(|(a, b)| a != b)
                            .map_or("a missing or extra key at the end".to_string(), |d| {
                                format!("{d:?}")
                            })
                    ));
                }
                (revision, 1)
            }
            (Request::Cas { key, expect, .. }, Outcome::Cas { succeeded, kvs, .. }) => {
                if *succeeded {
                    if !holds(expect, timeline.at(key, revision - 1)) {
                        report.anomaly(format!(
                            "compare-and-swap succeeded though its compare did not hold at \
                             revision {} ({:?}): {}",
                            revision - 1,
                            timeline.at(key, revision - 1),
                            describe(op)
                        ));
                    }
                    (revision, 0)
                } else {
                    let state = timeline.at(key, revision);
                    if holds(expect, state) {
                        report.anomaly(format!(
                            "compare-and-swap failed though its compare held at revision \
                             {revision}: {}",
                            describe(op)
                        ));
                    }
                    let expected = timeline.seen(key, revision);
                    if kvs != &expected {
                        report.anomaly(format!(
                            "compare-and-swap's else-branch read {kvs:?}, the history holds \
                             {expected:?} at revision {revision}: {}",
                            describe(op)
                        ));
                    }
                    (revision, 1)
                }
            }
            _ => {
                report.anomaly(format!("answer of the wrong kind: {}", describe(op)));
                continue;
            }
        };
        positions.push((i, position));
    }
}

/// If A returned before B was called, A's position must not be after B's.
fn check_real_time(ops: &[Op], positions: &[(usize, (i64, u8))], report: &mut Report) {
    // Operations with a known end, by end; unknown ones never end.
    let mut by_ret: Vec<&(usize, (i64, u8))> = positions
        .iter()
        .filter(|(i, _)| !ops[*i].is_unknown())
        .collect();
    by_ret.sort_by_key(|(i, _)| ops[*i].ret);
    let mut by_call: Vec<&(usize, (i64, u8))> = positions.iter().collect();
    by_call.sort_by_key(|(i, _)| ops[*i].call);
    let mut done = 0;
    let mut latest: Option<(usize, (i64, u8))> = None;
    for &&(i, position) in &by_call {
        while done < by_ret.len() && ops[by_ret[done].0].ret < ops[i].call {
            let (j, p) = *by_ret[done];
            if latest.is_none_or(|(_, q)| p > q) {
                latest = Some((j, p));
            }
            done += 1;
        }
        if let Some((j, p)) = latest {
            if p > position {
                report.anomaly(format!(
                    "real-time order broken: {} returned before {} was called, yet sits at \
                     revision {} after revision {}",
                    describe(&ops[j]),
                    describe(&ops[i]),
                    p.0,
                    position.0
                ));
            }
        }
    }
}

/// A lease key deleted without a revoke expired: not before the TTL counted from the last
/// acknowledged keep-alive (or the grant) was sent.
fn check_leases(rec: &Recorded<'_>, timeline: &Timeline, report: &mut Report) {
    let leases: HashMap<i64, &LeaseLife> = rec.leases.iter().map(|l| (l.id, l)).collect();
    let mut received: HashMap<(i64, &Bytes), Duration> = HashMap::new();
    for log in rec.watches {
        for (at, e) in &log.events {
            let t = received.entry((e.revision, &e.key)).or_insert(*at);
            *t = (*t).min(*at);
        }
    }
    for e in rec.truth {
        if e.kind != EventKind::Delete || !e.key.starts_with(LEASE_PREFIX) {
            continue;
        }
        let Some(before) = timeline.at(&e.key, e.revision - 1) else {
            report.anomaly(format!(
                "delete of the absent {} at revision {}",
                show(&e.key),
                e.revision
            ));
            continue;
        };
        let Some(lease) = leases.get(&before.lease) else {
            report.anomaly(format!(
                "{} (lease {:x}) deleted at revision {} by no client and no known lease",
                show(&e.key),
                before.lease,
                e.revision
            ));
            continue;
        };
        if lease.revoke_call.is_some() {
            report.lease_revocations += 1;
            continue;
        }
        report.lease_expiries += 1;
        let Some(seen_at) = received.get(&(e.revision, &e.key)) else {
            continue; // no watcher saw it: the watch check reports that
        };
        let mut due = lease.granted.map_or(Duration::ZERO, |(sent, ttl)| {
            sent + Duration::from_secs(ttl as u64)
        });
        for (sent, ttl) in &lease.keepalives {
            due = due.max(*sent + Duration::from_secs(*ttl as u64));
        }
        if *seen_at < due {
            report.anomaly(format!(
                "lease {:x} expired (revision {}, seen at {:.3}s) before its TTL ran out at \
                 {:.3}s: {lease:?}",
                lease.id,
                e.revision,
                seen_at.as_secs_f64(),
                due.as_secs_f64()
            ));
        }
    }
}

/// A watcher received, across its reconnects, exactly the truth's events of its prefix from its
/// first revision on, in order, each once.
fn check_watch(log: &WatchLog, truth: &[Event], report: &mut Report) {
    if log.ended_at.is_none() {
        report.anomaly(format!(
            "watch of {} never received its end marker ({} events, {} reconnects)",
            show(&log.prefix),
            log.events.len(),
            log.reconnects
        ));
    }
    let last = log.ended_at.unwrap_or(i64::MAX);
    let expected: Vec<&Event> = truth
        .iter()
        .filter(|e| {
            e.key.starts_with(&log.prefix) && e.revision >= log.first_revision && e.revision <= last
        })
        .collect();
    let got: Vec<&Event> = log.events.iter().map(|(_, e)| e).collect();
    let mut seen = HashSet::new();
    for pair in got.windows(2) {
        if pair[1].revision < pair[0].revision {
            report.anomaly(format!(
                "watch of {}: revision {} after {}",
                show(&log.prefix),
                pair[1].revision,
                pair[0].revision
            ));
            return;
        }
    }
    for e in &got {
        if !seen.insert((e.revision, &e.key)) {
            report.anomaly(format!(
                "watch of {}: event of {} at revision {} twice",
                show(&log.prefix),
                show(&e.key),
                e.revision
            ));
            return;
        }
    }
    if let Some(k) = (0..got.len().min(expected.len())).find(|&k| got[k] != expected[k]) {
        report.anomaly(format!(
            "watch of {} from revision {}: event {k} is {:?}, the history has {:?}",
            show(&log.prefix),
            log.first_revision,
            got[k],
            expected[k]
        ));
    } else if got.len() != expected.len() {
        report.anomaly(format!(
            "watch of {} from revision {}: {} events received, the history has {} (last \
             received: {:?})",
            show(&log.prefix),
            log.first_revision,
            got.len(),
            expected.len(),
            got.last().map(|e| e.revision)
        ));
    }
}
