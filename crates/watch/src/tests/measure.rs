//! Measurements, not checks (ignored; run with `--ignored --nocapture`): the apply path's cost
//! per put with idle watchers, and many watchers catching up.

use super::*;

/// Measurements, not checks of speed (run with `cargo test --release -p metastore-watch --
/// --ignored --nocapture`): the apply path's cost per put with idle watchers on other keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_put_cost_with_idle_watchers() {
    for watchers in [0usize, 20_000, 100_000] {
        let (store, hub) = setup();
        let (stream, mut rx) = hub.open_stream();
        let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        for i in 0..watchers {
            stream.create(single(&format!("/idle/{i}"))).await.unwrap();
        }
        let puts = 3000u32;
        let start = std::time::Instant::now();
        for i in 0..puts {
            put(&store, &hub, &format!("/busy/{}", i % 100), "v");
        }
        let elapsed = start.elapsed();
        hub.flush();
        assert_eq!(hub.stats().examined, 0);
        eprintln!(
            "{watchers} idle watchers: {puts} puts (apply + notify) in {elapsed:?}, {:?} each",
            elapsed / puts
        );
        drop(stream);
        drain.abort();
    }
}

/// Measurement: 10,000 watchers starting at revision 1 catch up 100,000 revisions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_catch_up_of_many_watchers() {
    let (store, hub) = setup();
    let (revs, keys, streams) = (100_000usize, 10_000usize, 100usize);
    for i in 0..revs {
        put(&store, &hub, &format!("/k/{:05}", i % keys), "v");
    }
    let per_stream = keys / streams;
    let start = std::time::Instant::now();
    let mut tasks = Vec::new();
    for s in 0..streams {
        let (stream, mut rx) = hub.open_stream();
        tasks.push(tokio::spawn(async move {
            // Created while the stream is drained, or a full buffer would hold creation back.
            let creator = tokio::spawn(async move {
                for w in 0..per_stream {
                    let key = format!("/k/{:05}", s * per_stream + w).into_bytes();
                    stream
                        .create(WatchCreateRequest {
                            key,
                            start_revision: 1,
                            ..Default::default()
                        })
                        .await
                        .unwrap();
                }
                stream
            });
            let mut events = 0;
            while events < per_stream * (revs / keys) {
                events += next(&mut rx).await.events.len();
            }
            assert_eq!(events, per_stream * (revs / keys));
            drop(creator.await.unwrap());
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    eprintln!(
        "{keys} watchers caught up {revs} revisions in {:?}",
        start.elapsed()
    );
}
