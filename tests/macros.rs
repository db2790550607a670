//! Macros shared by the test modules.

/// Runs a scenario `async fn NAME(kind: Kind)` as `NAME::etcd`, `NAME::memory` and
/// `NAME::rocks`.
macro_rules! per_kind {
    ($($scenario:ident),* $(,)?) => {$(
        scenario_tests!($scenario: etcd Etcd, memory Memory, rocks Rocks);
    )*};
}

/// Runs a scenario `async fn NAME(kind: Kind)` as `NAME::memory` and `NAME::rocks`: MetaStore's
/// behaviour that etcd does not share (or that a differential scenario compares with etcd itself).
macro_rules! per_engine {
    ($($scenario:ident),* $(,)?) => {$(
        scenario_tests!($scenario: memory Memory, rocks Rocks);
    )*};
}

/// `mod SCENARIO` with one test per (test name, `Kind` variant) calling `SCENARIO(kind)`.
macro_rules! scenario_tests {
    ($scenario:ident: $($test:ident $kind:ident),*) => {
        mod $scenario {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$scenario(crate::support::Kind::$kind).await;
                }
            )*
        }
    };
}

/// A differential test: `async fn SCRIPT(&Server) -> Vec<String>` runs against etcd, then against
/// MetaStore on each engine (`compare_with_etcd::memory`, `compare_with_etcd::rocks`), and every
/// line must be the same (`support::assert_same_lines`).
macro_rules! differential {
    ($script:ident) => {
        async fn compare_with_etcd(kind: crate::support::Kind) {
            use crate::support::{Kind, Server};
            let etcd = Server::start(Kind::Etcd).await;
            let expected = $script(&etcd).await;
            drop(etcd);
            let ours = Server::start(kind).await;
            let got = $script(&ours).await;
            crate::support::assert_same_lines(&expected, &got);
        }

        per_engine!(compare_with_etcd);
    };
}
