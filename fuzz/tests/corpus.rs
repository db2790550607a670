//! Runs on stable, in CI: every file of `corpus/<target>/` (the committed seeds, plus whatever a
//! local fuzzing run added) through its target's body, and the seeds against their generator.

use std::fs;
use std::path::{Path, PathBuf};

use metastore_fuzz::{seeds, TARGETS};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

fn seed_name(i: usize) -> String {
    format!("seed-{i:02}")
}

/// The committed seeds are what `seeds::all` makes; `METASTORE_WRITE_SEEDS=1` rewrites them.
#[test]
fn seed_files_match_the_generator() {
    let write = std::env::var_os("METASTORE_WRITE_SEEDS").is_some();
    let all = seeds::all();
    assert_eq!(
        all.iter().map(|(name, _)| *name).collect::<Vec<_>>(),
        TARGETS.iter().map(|(name, _)| *name).collect::<Vec<_>>(),
        "one seed list per target, in the same order"
    );
    for (target, seeds) in all {
        let dir = corpus_dir(target);
        if write {
            fs::create_dir_all(&dir).unwrap();
            for old in fs::read_dir(&dir).unwrap() {
                let path = old.unwrap().path();
                if path
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("seed-")
                {
                    fs::remove_file(path).unwrap();
                }
            }
            for (i, seed) in seeds.iter().enumerate() {
                fs::write(dir.join(seed_name(i)), seed).unwrap();
            }
        }
        for (i, seed) in seeds.iter().enumerate() {
            let path = dir.join(seed_name(i));
            let committed = fs::read(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (METASTORE_WRITE_SEEDS=1 writes it)",
                    path.display()
                )
            });
            assert!(
                committed == *seed,
                "{} is stale (METASTORE_WRITE_SEEDS=1 rewrites it)",
                path.display()
            );
        }
    }
}

/// Every corpus file through its target: none may panic.
#[test]
fn every_corpus_file_runs_through_its_target() {
    let mut total = 0;
    for (target, body) in TARGETS {
        let dir = corpus_dir(target);
        let mut files: Vec<PathBuf> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no corpus for {target}");
        for file in files {
            let data = fs::read(&file).unwrap();
            let result = std::panic::catch_unwind(|| body(&data));
            assert!(result.is_ok(), "{target} panicked on {}", file.display());
            total += 1;
        }
    }
    assert!(total >= TARGETS.len());
}
