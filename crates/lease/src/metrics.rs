//! etcd's lease metrics (`server/lease/metrics.go`), recorded through the `metrics` facade (the
//! binary installs the exporter; without one they cost nothing). Grants and revocations are
//! counted as they apply, on every member; renewals where they are answered, on the leader
//! (followers forward them).

use std::sync::LazyLock;

use metrics::{counter, histogram, Counter, Histogram};

struct LeaseMetrics {
    granted: Counter,
    revoked: Counter,
    renewed: Counter,
    ttl_secs: Histogram,
}

static METRICS: LazyLock<LeaseMetrics> = LazyLock::new(|| LeaseMetrics {
    granted: counter!("etcd_debugging_lease_granted_total"),
    revoked: counter!("etcd_debugging_lease_revoked_total"),
    renewed: counter!("etcd_debugging_lease_renewed_total"),
    ttl_secs: histogram!("etcd_debugging_lease_ttl_total"),
});

/// A lease was granted with this TTL (`etcd_debugging_lease_granted_total`,
/// `etcd_debugging_lease_ttl_total`).
pub(crate) fn granted(ttl_secs: i64) {
    METRICS.granted.increment(1);
    METRICS.ttl_secs.record(ttl_secs as f64);
}

/// A lease's revocation is durable (`etcd_debugging_lease_revoked_total`).
pub(crate) fn revoked() {
    METRICS.revoked.increment(1);
}

/// The leader answered a renewal (`etcd_debugging_lease_renewed_total`).
pub(crate) fn renewed() {
    METRICS.renewed.increment(1);
}
