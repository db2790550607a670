//! The checker on hand-made histories: valid ones pass, each kind of violation is found.

use std::time::Duration;

use super::checker::{check, Recorded, Report};
use super::history::{Event, EventKind, Expect, LeaseLife, Op, Outcome, Request, Seen, WatchLog};

fn ms(t: u64) -> Duration {
    Duration::from_millis(t)
}

fn op(client: usize, call: u64, ret: u64, request: Request, outcome: Outcome) -> Op {
    Op {
        client,
        call: ms(call),
        ret: ms(ret),
        request,
        outcome,
    }
}

fn put(key: &str, value: &str) -> Request {
    Request::Put {
        key: key.into(),
        value: value.into(),
        lease: 0,
    }
}

fn get(key: &str) -> Request {
    Request::Get { key: key.into() }
}

fn put_ok(revision: i64) -> Outcome {
    Outcome::Put { revision }
}

fn read(revision: i64, kvs: &[(&str, &str, i64)]) -> Outcome {
    Outcome::Read {
        revision,
        kvs: kvs
            .iter()
            .map(|(k, v, r)| Seen {
                key: (*k).into(),
                value: (*v).into(),
                mod_revision: *r,
            })
            .collect(),
    }
}

fn unknown() -> Outcome {
    Outcome::Unknown("no answer".into())
}

fn ev(revision: i64, key: &str, value: &str) -> Event {
    Event {
        revision,
        kind: EventKind::Put,
        key: key.into(),
        value: value.into(),
        mod_revision: revision,
        lease: 0,
    }
}

fn ev_del(revision: i64, key: &str) -> Event {
    Event {
        revision,
        kind: EventKind::Delete,
        key: key.into(),
        value: Vec::new(),
        mod_revision: revision,
        lease: 0,
    }
}

fn check_kv(ops: &[Op], truth: &[Event]) -> Report {
    check(&Recorded {
        ops,
        truth,
        leases: &[],
        watches: &[],
    })
}

fn assert_finds(report: &Report, needle: &str) {
    assert!(
        report.anomalies.iter().any(|a| a.contains(needle)),
        "expected an anomaly containing {needle:?}, got {:?}",
        report.anomalies
    );
}

/// Put, read, swap, delete, an unknown put that applied, one that did not, concurrent reads.
fn valid() -> (Vec<Op>, Vec<Event>) {
    let ops = vec![
        op(0, 0, 10, put("a", "1"), put_ok(2)),
        op(1, 5, 15, get("a"), read(1, &[])), // concurrent with the put: may miss it
        op(1, 16, 20, get("a"), read(2, &[("a", "1", 2)])),
        op(
            0,
            21,
            30,
            Request::Cas {
                key: "a".into(),
                expect: Expect::Value("1".into()),
                value: "2".into(),
            },
            Outcome::Cas {
                revision: 3,
                succeeded: true,
                kvs: vec![],
            },
        ),
        op(
            1,
            31,
            35,
            Request::Cas {
                key: "a".into(),
                expect: Expect::ModRevision(2),
                value: "never".into(),
            },
            Outcome::Cas {
                revision: 3,
                succeeded: false,
                kvs: vec![Seen {
                    key: "a".into(),
                    value: "2".into(),
                    mod_revision: 3,
                }],
            },
        ),
        op(
            0,
            36,
            40,
            Request::Delete { key: "a".into() },
            Outcome::Delete {
                revision: 4,
                deleted: 1,
            },
        ),
        op(1, 41, 50, get("a"), read(4, &[])),
        op(0, 51, 60, put("a", "3"), unknown()),
        op(0, 61, 62, put("a", "lost-in-flight"), unknown()),
        op(1, 70, 80, get("a"), read(5, &[("a", "3", 5)])),
        op(
            1,
            81,
            90,
            Request::Range { prefix: "".into() },
            read(5, &[("a", "3", 5)]),
        ),
    ];
    let truth = vec![
        ev(2, "a", "1"),
        ev(3, "a", "2"),
        ev_del(4, "a"),
        ev(5, "a", "3"),
    ];
    (ops, truth)
}

#[test]
fn a_valid_history_passes() {
    let (ops, truth) = valid();
    let report = check_kv(&ops, &truth);
    assert_eq!(report.count(), 0, "{:?}", report.anomalies);
    assert_eq!(report.unknown_ops_applied, 1);
    assert_eq!(report.unknown_ops_not_applied, 1);
}

#[test]
fn a_stale_read_is_found() {
    // The read starts after the put of 2 returned but reads revision 2's state.
    let ops = vec![
        op(0, 0, 10, put("a", "1"), put_ok(2)),
        op(0, 11, 20, put("a", "2"), put_ok(3)),
        op(1, 21, 30, get("a"), read(2, &[("a", "1", 2)])),
    ];
    let truth = vec![ev(2, "a", "1"), ev(3, "a", "2")];
    assert_finds(&check_kv(&ops, &truth), "real-time order broken");
    // Reading the old value but claiming the new revision contradicts the history instead.
    let ops = vec![
        ops[0].clone(),
        ops[1].clone(),
        op(1, 21, 30, get("a"), read(3, &[("a", "1", 2)])),
    ];
    assert_finds(&check_kv(&ops, &truth), "but the history holds");
}

#[test]
fn a_lost_acknowledged_write_is_found() {
    let ops = vec![
        op(0, 0, 10, put("a", "1"), put_ok(2)),
        op(1, 0, 10, put("b", "2"), put_ok(3)),
    ];
    let truth = vec![ev(2, "a", "1")];
    let report = check_kv(&ops, &truth);
    assert_finds(&report, "acknowledged write missing");
    assert_finds(&report, "beyond the history's last");
}

#[test]
fn writes_nobody_made_or_made_twice_are_found() {
    let ops = vec![op(0, 0, 10, put("a", "1"), put_ok(2))];
    let truth = vec![ev(2, "a", "1"), ev(3, "a", "9"), ev_del(4, "a")];
    let report = check_kv(&ops, &truth);
    assert_finds(&report, "put of a=9 at revision 3 that no client requested");
    assert_finds(
        &report,
        "delete of a at revision 4 that no client requested",
    );
    let truth = vec![ev(2, "a", "1"), ev(3, "a", "1")];
    assert_finds(&check_kv(&ops, &truth), "applied twice");
    let truth = vec![ev(2, "a", "1"), ev(4, "b", "x")];
    assert_finds(&check_kv(&ops, &truth), "jumps from revision 2 to 4");
}

#[test]
fn compare_and_swap_violations_are_found() {
    let cas = |expect: Expect, value: &str| Request::Cas {
        key: "a".into(),
        expect,
        value: value.into(),
    };
    let first = op(0, 0, 10, put("a", "1"), put_ok(2));
    // Succeeded though the value was 1, not 0.
    let ops = vec![
        first.clone(),
        op(
            1,
            11,
            20,
            cas(Expect::Value("0".into()), "2"),
            Outcome::Cas {
                revision: 3,
                succeeded: true,
                kvs: vec![],
            },
        ),
    ];
    let truth = vec![ev(2, "a", "1"), ev(3, "a", "2")];
    assert_finds(&check_kv(&ops, &truth), "did not hold");
    // Answered as failed, yet applied.
    let ops = vec![
        first.clone(),
        op(
            1,
            11,
            20,
            cas(Expect::ModRevision(2), "2"),
            Outcome::Cas {
                revision: 3,
                succeeded: false,
                kvs: vec![],
            },
        ),
    ];
    assert_finds(&check_kv(&ops, &truth), "answered as failed was applied");
    // Failed though its compare held.
    let ops = vec![
        first.clone(),
        op(
            1,
            11,
            20,
            cas(Expect::ModRevision(2), "2"),
            Outcome::Cas {
                revision: 2,
                succeeded: false,
                kvs: vec![Seen {
                    key: "a".into(),
                    value: "1".into(),
                    mod_revision: 2,
                }],
            },
        ),
    ];
    assert_finds(
        &check_kv(&ops, &truth[..1]),
        "failed though its compare held",
    );
    // An unknown swap applied although its compare could not hold.
    let ops = vec![
        first,
        op(1, 11, 20, cas(Expect::ModRevision(0), "2"), unknown()),
    ];
    assert_finds(&check_kv(&ops, &truth), "did not hold before it");
}

#[test]
fn an_unknown_write_applied_before_its_call_is_found() {
    // b=1 returned at 10 with revision 3; the unknown put of a, called at 20, sits at 2.
    let ops = vec![
        op(0, 0, 10, put("b", "1"), put_ok(3)),
        op(1, 20, 30, put("a", "1"), unknown()),
    ];
    let truth = vec![ev(2, "a", "1"), ev(3, "b", "1")];
    assert_finds(&check_kv(&ops, &truth), "real-time order broken");
}

fn lease_truth() -> Vec<Event> {
    let mut attached = ev(2, "lease/x", "v");
    attached.lease = 7;
    vec![attached, ev_del(3, "lease/x")]
}

fn lease_ops() -> Vec<Op> {
    vec![op(
        0,
        100,
        110,
        Request::Put {
            key: "lease/x".into(),
            value: "v".into(),
            lease: 7,
        },
        put_ok(2),
    )]
}

fn watch_of(prefix: &str, truth: &[Event], seen_at: Duration) -> WatchLog {
    WatchLog {
        prefix: prefix.into(),
        first_revision: 1,
        events: truth.iter().map(|e| (seen_at, e.clone())).collect(),
        reconnects: 0,
        ended_at: truth.last().map(|e| e.revision),
    }
}

#[test]
fn a_lease_expiring_before_its_ttl_is_found() {
    let truth = lease_truth();
    let ops = lease_ops();
    let lease = LeaseLife {
        id: 7,
        granted: Some((ms(0), 5)),
        grant_call: ms(0),
        keepalives: vec![(ms(2_000), 5)],
        revoke_call: None,
    };
    let check_seen_at = |at: Duration, lease: &LeaseLife| {
        check(&Recorded {
            ops: &ops,
            truth: &truth,
            leases: std::slice::from_ref(lease),
            watches: &[watch_of("lease/", &truth, at)],
        })
    };
    // Kept alive at 2 s for 5 s: gone at 6 s is early, at 7.5 s is not.
    assert_finds(&check_seen_at(ms(6_000), &lease), "before its TTL ran out");
    let report = check_seen_at(ms(7_500), &lease);
    assert_eq!(report.count(), 0, "{:?}", report.anomalies);
    assert_eq!(report.lease_expiries, 1);
    // A revoked lease may go at any time.
    let revoked = LeaseLife {
        revoke_call: Some(ms(3_000)),
        ..lease
    };
    let report = check_seen_at(ms(3_100), &revoked);
    assert_eq!(report.count(), 0, "{:?}", report.anomalies);
    assert_eq!(report.lease_revocations, 1);
}

#[test]
fn watch_streams_must_be_complete_ordered_and_without_duplicates() {
    let (ops, truth) = valid();
    let check_watch = |log: WatchLog| {
        check(&Recorded {
            ops: &ops,
            truth: &truth,
            leases: &[],
            watches: &[log],
        })
    };
    let full = watch_of("a", &truth, ms(1));
    assert_eq!(check_watch(full.clone()).count(), 0);
    let mut missing = full.clone();
    missing.events.remove(1);
    assert_finds(&check_watch(missing), "the history has");
    let mut duplicated = full.clone();
    duplicated.events.insert(2, duplicated.events[1].clone());
    assert_finds(&check_watch(duplicated), "twice");
    let mut reordered = full.clone();
    reordered.events.swap(1, 2);
    assert_finds(&check_watch(reordered), "after");
    let mut unfinished = full.clone();
    unfinished.events.pop();
    unfinished.ended_at = None;
    let report = check_watch(unfinished);
    assert_finds(&report, "never received its end marker");
    assert_finds(&report, "events received");
}
