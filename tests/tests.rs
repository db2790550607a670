//! The black-box tests: real `metastore` processes (either engine) and Debian's etcd, driven
//! through real clients (etcdctl, the etcd-client crate, raw gRPC and raw HTTP/2). One test binary
//! (as ripgrep's `tests/`): each module is one area, `support` starts servers and clusters, and
//! `macros` runs one scenario against etcd and both engines.

#[macro_use]
mod macros;
mod support;

mod auth;
mod client_compat;
mod cluster;
mod disk_faults;
mod durability;
mod endpoints;
mod etcd35;
// crash points need a binary built with them (`cargo xtask test` does)
#[cfg(feature = "failpoints")]
mod failpoints;
mod gateway;
mod http;
mod kv_differential;
mod lock_election;
mod maintenance;
mod migration;
mod operations;
mod robustness;
mod snapshot_export;
mod tls;
mod watch_lease;
mod watch_lease_differential;
