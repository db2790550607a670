//! The table format every column family is written with.

use metastore_storage_rocks::RocksBackend;

const BUCKETS: &[&str] = &["alpha", "beta"];

/// The OPTIONS file RocksDB writes at each open records the table options of every column
/// family: each bucket's must use a partitioned index of 4 KiB partitions, so that a point read
/// whose index is not cached reads one partition, never a whole file's index (megabytes after
/// a defragment).
#[test]
fn every_bucket_has_a_partitioned_index() {
    let dir = tempfile::tempdir().unwrap();
    drop(RocksBackend::open(dir.path(), BUCKETS).unwrap());
    let options = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("OPTIONS-"))
        })
        .max()
        .expect("an OPTIONS file");
    let text = std::fs::read_to_string(options).unwrap();
    // `default` holds nothing (no bucket uses it) and keeps RocksDB's defaults.
    let tables: Vec<(&str, &str)> = text
        .split("[TableOptions/BlockBasedTable ")
        .skip(1)
        .filter_map(|t| {
            let name = t.lines().next()?.trim_end_matches(']').trim_matches('"');
            BUCKETS.contains(&name).then_some((name, t))
        })
        .collect();
    assert_eq!(tables.len(), BUCKETS.len(), "{text}");
    for (name, table) in tables {
        for setting in [
            "index_type=kTwoLevelIndexSearch",
            "metadata_block_size=4096",
            "pin_top_level_index_and_filter=true",
            "cache_index_and_filter_blocks=true",
        ] {
            assert!(
                table.lines().any(|l| l.trim() == setting),
                "{name}: {setting} missing in\n{table}"
            );
        }
    }
}
