//! The WAL through its own API: round trips, rotation, torn tails and corruption.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;

use raft::eraftpb::{ConfState, Entry, HardState, SnapshotMetadata};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::record::{
    encode_message, RECORD_ENTRY, RECORD_HARD_STATE, RECORD_HEADER_LEN, RECORD_SNAPSHOT,
};
use super::replay::{replay_records, Covering, WalContents, SECTOR_BYTES};
use super::segment::parse_segment_name;
use super::writer::PREALLOCATE_BYTES;
use super::{Wal, WalError, DEFAULT_SEGMENT_SIZE_BYTES};

fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
    Entry {
        index,
        term,
        data: data.to_vec().into(),
        ..Default::default()
    }
}

fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
    HardState {
        term,
        vote,
        commit,
        ..Default::default()
    }
}

fn marker(index: u64, term: u64) -> SnapshotMetadata {
    SnapshotMetadata {
        index,
        term,
        conf_state: Some(ConfState::from((vec![1], vec![]))).into(),
        ..Default::default()
    }
}

fn bootstrap() -> SnapshotMetadata {
    let mut m = SnapshotMetadata::default();
    m.set_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
    m
}

/// A WAL with default-sized segments in `dir` holding `entries` (no hard state), synced.
fn synced_wal(dir: &std::path::Path, entries: &[Entry]) -> Wal {
    let mut wal = Wal::create(dir, DEFAULT_SEGMENT_SIZE_BYTES, &bootstrap()).unwrap();
    wal.save(None, entries, None).unwrap();
    wal.sync().unwrap();
    wal
}

/// Writes 20 entries of 40 bytes into a WAL of 200-byte segments in `dir`, syncs and closes it;
/// returns its segment files, oldest first.
fn closed_wal_in_small_segments(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut wal = Wal::create(dir, 200, &bootstrap()).unwrap();
    for i in 1..=20 {
        wal.save(None, &[entry(i, 1, &[7; 40])], None).unwrap();
    }
    wal.sync().unwrap();
    wal.segment_paths()
}

fn indexes_terms(entries: &[Entry]) -> Vec<(u64, u64)> {
    entries.iter().map(|e| (e.index, e.term)).collect()
}

#[test]
fn round_trip_and_conflicting_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let mut wal = Wal::create(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES, &bootstrap()).unwrap();
    let first: Vec<Entry> = (1..=10).map(|i| entry(i, 1, b"a")).collect();
    wal.save(None, &first, Some(&hard_state(1, 1, 5))).unwrap();
    // A new leader overwrites 6..=10 with 6..=7 at term 2.
    let second = vec![entry(6, 2, b"b"), entry(7, 2, b"c")];
    wal.save(None, &second, Some(&hard_state(2, 2, 7))).unwrap();
    wal.sync().unwrap();
    drop(wal);

    let (_wal, contents) = Wal::open(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES).unwrap();
    let mut expected: Vec<(u64, u64)> = (1..=5).map(|i| (i, 1)).collect();
    expected.extend([(6, 2), (7, 2)]);
    assert_eq!(indexes_terms(&contents.entries), expected);
    assert_eq!(&contents.entries[6].data[..], b"c");
    assert_eq!(contents.hard_state, hard_state(2, 2, 7));
    assert_eq!(contents.snapshots.len(), 1);
    assert_eq!(contents.snapshots[0].get_conf_state().voters, vec![1, 2, 3]);
}

#[test]
fn torn_tail_is_truncated_and_next_append_works() {
    let dir = tempfile::tempdir().unwrap();
    let mut wal = Wal::create(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES, &bootstrap()).unwrap();
    let entries: Vec<Entry> = (1..=3).map(|i| entry(i, 1, b"payload")).collect();
    wal.save(None, &entries, Some(&hard_state(1, 1, 3)))
        .unwrap();
    wal.sync().unwrap();
    let path = wal.segment_paths()[0].clone();
    let good_len = wal.records_end();
    drop(wal);
    assert!(
        fs::metadata(&path).unwrap().len() > good_len,
        "preallocated"
    );

    // A crash in the middle of writing entry 4: only part of its record reached the disk.
    let mut torn = Vec::new();
    encode_message(&mut torn, RECORD_ENTRY, "entry", &entry(4, 1, b"lost")).unwrap();
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&torn[..torn.len() - 3], good_len)
        .unwrap();
    drop(file);

    let (mut wal, contents) = Wal::open(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES).unwrap();
    assert_eq!(
        indexes_terms(&contents.entries),
        vec![(1, 1), (2, 1), (3, 1)]
    );
    assert_eq!(fs::metadata(&path).unwrap().len(), good_len);

    wal.save(None, &[entry(4, 1, b"again")], None).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let (_wal, contents) = Wal::open(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES).unwrap();
    assert_eq!(contents.entries.len(), 4);
    assert_eq!(&contents.entries[3].data[..], b"again");
}

#[test]
fn torn_tail_with_bad_checksum_is_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let wal = synced_wal(dir.path(), &[entry(1, 1, b"one"), entry(2, 1, b"two")]);
    let path = wal.segment_paths()[0].clone();
    let end = wal.records_end() as usize;
    drop(wal);
    // The last record's payload was only partly overwritten on disk.
    let mut data = fs::read(&path).unwrap();
    data[end - 1] ^= 0xff;
    fs::write(&path, &data).unwrap();

    let (_wal, contents) = Wal::open(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES).unwrap();
    assert_eq!(indexes_terms(&contents.entries), vec![(1, 1)]);
}

#[test]
fn a_record_with_a_sector_that_never_reached_the_disk_is_torn() {
    let dir = tempfile::tempdir().unwrap();
    let mut wal = synced_wal(dir.path(), &[entry(1, 1, b"one")]);
    let start = wal.records_end() as usize;
    // Entry 2 spans several sectors; entry 3 follows it.
    let records = [entry(2, 1, &[7u8; 2000]), entry(3, 1, b"three")];
    wal.save(None, &records, None).unwrap();
    let path = wal.segment_paths()[0].clone();
    drop(wal);

    // The crash lost one sector in the middle of entry 2 but kept entry 3.
    let mut data = fs::read(&path).unwrap();
    let hole = (start / SECTOR_BYTES + 2) * SECTOR_BYTES;
    data[hole..hole + SECTOR_BYTES].fill(0);
    fs::write(&path, &data).unwrap();
    let (_wal, contents) = Wal::open(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES).unwrap();
    assert_eq!(indexes_terms(&contents.entries), vec![(1, 1)]);
    assert_eq!(fs::metadata(&path).unwrap().len(), start as u64);

    // A flipped byte without a zeroed sector is corruption, not a torn write.
    let mut wal = Wal::open(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES).unwrap().0;
    wal.save(None, &records, None).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let mut data = fs::read(&path).unwrap();
    data[start + 1000] ^= 0xff;
    fs::write(&path, &data).unwrap();
    let err = match Wal::open(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES) {
        Ok(_) => panic!("a corrupt record must stop the open"),
        Err(e) => e,
    };
    assert!(matches!(err, WalError::Corrupt { offset, .. } if offset == start as u64));
}

#[test]
fn preallocated_zeros_end_the_records_and_appends_continue_after_them() {
    let dir = tempfile::tempdir().unwrap();
    let wal = synced_wal(dir.path(), &[entry(1, 1, b"one")]);
    let path = wal.segment_paths()[0].clone();
    let first_end = wal.records_end();
    drop(wal);
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        first_end + PREALLOCATE_BYTES
    );

    // Reopened, it writes after its records, inside the preallocated space.
    let (mut wal, contents) = Wal::open(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES).unwrap();
    assert_eq!(indexes_terms(&contents.entries), vec![(1, 1)]);
    assert_eq!(wal.records_end(), first_end);
    wal.save(None, &[entry(2, 1, b"two")], None).unwrap();
    wal.sync().unwrap();
    let end = wal.records_end();
    drop(wal);
    let len = fs::metadata(&path).unwrap().len();
    assert_eq!(
        len,
        first_end + PREALLOCATE_BYTES,
        "written in place, not extended"
    );

    // A crash left a block written after a hole that never reached the disk: the hole ends
    // the records and what follows it is cut off, so it can never be read back later.
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(b"stale block", end + 4096).unwrap();
    drop(file);
    let (mut wal, contents) = Wal::open(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES).unwrap();
    assert_eq!(indexes_terms(&contents.entries), vec![(1, 1), (2, 1)]);
    assert_eq!(fs::metadata(&path).unwrap().len(), end);
    wal.save(None, &[entry(3, 1, b"three")], None).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let (_wal, contents) = Wal::open(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES).unwrap();
    assert_eq!(
        indexes_terms(&contents.entries),
        vec![(1, 1), (2, 1), (3, 1)]
    );
}

#[test]
fn corrupt_middle_record_names_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let mut wal = Wal::create(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES, &bootstrap()).unwrap();
    let path = wal.segment_paths()[0].clone();
    let offset_of_first_entry = fs::metadata(&path).unwrap().len();
    let entries: Vec<Entry> = (1..=5).map(|i| entry(i, 1, b"value")).collect();
    wal.save(None, &entries, None).unwrap();
    wal.sync().unwrap();
    drop(wal);

    let mut data = fs::read(&path).unwrap();
    // Flip a payload byte of the first entry record; valid records follow it.
    data[offset_of_first_entry as usize + RECORD_HEADER_LEN + 2] ^= 0x55;
    fs::write(&path, &data).unwrap();

    let err = match Wal::open(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES) {
        Err(err) => err,
        Ok(_) => panic!("a corrupt middle record must not open"),
    };
    match &err {
        WalError::Corrupt { file, offset, .. } => {
            assert_eq!(file, &path);
            assert_eq!(*offset, offset_of_first_entry);
        }
        other => panic!("unexpected error {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(
        message.contains(&format!("byte offset {offset_of_first_entry}")),
        "{message}"
    );
    // The file was not "repaired" behind the operator's back.
    assert_eq!(fs::read(&path).unwrap(), data);
}

#[test]
fn corrupt_record_in_older_segment_is_an_error_even_at_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let segments = closed_wal_in_small_segments(dir.path());
    assert!(segments.len() > 2, "{segments:?}");
    let first = &segments[0];
    let mut data = fs::read(first).unwrap();
    let last = data.len() - 1;
    data[last] ^= 0xff;
    fs::write(first, &data).unwrap();
    let err = Wal::open(dir.path(), 200).err().expect("must fail");
    assert!(
        matches!(&err, WalError::Corrupt { file, .. } if file == first),
        "{err}"
    );
}

#[test]
fn rotation_release_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut wal = Wal::create(dir.path(), 512, &bootstrap()).unwrap();
    for i in 1..=100 {
        wal.save(None, &[entry(i, 1, &[1; 32])], Some(&hard_state(1, 1, i)))
            .unwrap();
    }
    wal.sync().unwrap();
    let before = wal.segment_paths();
    assert!(before.len() > 5, "{} segments", before.len());

    wal.save_snapshot_marker(&marker(60, 1)).unwrap();
    wal.sync().unwrap();
    // --max-wals: nothing goes while the count is within the limit, then one at a time.
    assert_eq!(wal.release_to(60, before.len()).unwrap(), 0);
    assert_eq!(wal.release_to(60, before.len() - 1).unwrap(), 1);
    assert_eq!(wal.segment_paths().len(), before.len() - 1);
    let released = 1 + wal.release_to(60, 1).unwrap();
    assert!(released > 1);
    let after = wal.segment_paths();
    assert_eq!(after.len(), before.len() - released);
    for removed in &before[..released] {
        assert!(!removed.exists());
    }
    // The oldest kept segment still holds entry 60.
    let (_, first_kept) =
        parse_segment_name(after[0].file_name().unwrap().to_str().unwrap()).unwrap();
    assert!(first_kept <= 60);
    drop(wal);

    let (_wal, contents) = Wal::open(dir.path(), 512).unwrap();
    assert!(contents.entries.first().unwrap().index <= 60);
    assert_eq!(contents.entries.last().unwrap().index, 100);
    assert_eq!(contents.hard_state, hard_state(1, 1, 100));
    assert_eq!(
        contents.snapshots.last().map(|m| (m.index, m.term)),
        Some((60, 1))
    );
}

#[test]
fn received_snapshot_marker_resets_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut wal = Wal::create(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES, &bootstrap()).unwrap();
    let entries: Vec<Entry> = (1..=5).map(|i| entry(i, 1, b"x")).collect();
    wal.save(None, &entries, None).unwrap();
    // A local snapshot of the log's own entry 3 keeps the log.
    wal.save_snapshot_marker(&marker(3, 1)).unwrap();
    // A snapshot received from a leader at index 50 replaces it.
    wal.save(
        Some(&marker(50, 4)),
        &[entry(51, 4, b"y")],
        Some(&hard_state(4, 0, 50)),
    )
    .unwrap();
    wal.sync().unwrap();
    drop(wal);

    let (_wal, contents) = Wal::open(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES).unwrap();
    assert_eq!(indexes_terms(&contents.entries), vec![(51, 4)]);
    let markers: Vec<(u64, u64)> = contents
        .snapshots
        .iter()
        .map(|m| (m.index, m.term))
        .collect();
    assert_eq!(markers, vec![(0, 0), (3, 1), (50, 4)]);
}

#[test]
fn gap_in_entries_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    drop(synced_wal(
        dir.path(),
        &[entry(1, 1, b"a"), entry(3, 1, b"c")],
    ));
    let err = Wal::open(dir.path(), DEFAULT_SEGMENT_SIZE_BYTES)
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("does not follow"), "{err}");
}

#[test]
fn missing_segment_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let segments = closed_wal_in_small_segments(dir.path());
    fs::remove_file(&segments[1]).unwrap();
    let err = Wal::open(dir.path(), 200).err().expect("must fail");
    assert!(err.to_string().contains("sequence gap"), "{err}");
}

/// The records of a random history: appends, leaders overwriting a suffix (or the whole log),
/// local snapshots of an entry the log holds, received snapshots past its end, hard states and,
/// rarely, an entry that leaves a gap (corruption). Returns the bytes and every marker written.
fn random_history(rng: &mut StdRng) -> (Vec<u8>, Vec<SnapshotMetadata>) {
    let mut data = Vec::new();
    let mut markers = Vec::new();
    // The log as written so far: index of its first entry and the term of each entry.
    let (mut first, mut terms, mut term) = (1u64, Vec::<u64>::new(), 1u64);
    for _ in 0..rng.random_range(1..120) {
        let last = first + terms.len() as u64 - 1;
        match rng.random_range(0..100) {
            0..=49 => {
                for _ in 0..rng.random_range(1..8) {
                    let index = first + terms.len() as u64;
                    encode_message(&mut data, RECORD_ENTRY, "entry", &entry(index, term, b"e"))
                        .unwrap();
                    terms.push(term);
                }
            }
            50..=64 => {
                // A new leader overwrites from `from` on (before the first entry: the whole log).
                term += 1;
                let from = rng.random_range(first.saturating_sub(2).max(1)..=last + 1);
                if from < first {
                    (first, terms) = (from, Vec::new());
                } else {
                    terms.truncate((from - first) as usize);
                }
                let index = first + terms.len() as u64;
                encode_message(&mut data, RECORD_ENTRY, "entry", &entry(index, term, b"o"))
                    .unwrap();
                terms.push(term);
            }
            65..=79 if !terms.is_empty() => {
                let at = rng.random_range(0..terms.len());
                let m = marker(first + at as u64, terms[at]);
                encode_message(&mut data, RECORD_SNAPSHOT, "snapshot marker", &m).unwrap();
                markers.push(m);
            }
            80..=86 => {
                term += 1;
                let m = marker(last + rng.random_range(1..5), term);
                encode_message(&mut data, RECORD_SNAPSHOT, "snapshot marker", &m).unwrap();
                (first, terms) = (m.index + 1, Vec::new());
                markers.push(m);
            }
            87..=98 => {
                let hs = hard_state(term, 1, last);
                encode_message(&mut data, RECORD_HARD_STATE, "hard state", &hs).unwrap();
            }
            _ => {
                let gap = entry(last + 2, term, b"g");
                encode_message(&mut data, RECORD_ENTRY, "entry", &gap).unwrap();
            }
        }
    }
    (data, markers)
}

/// A replay that drops the entries under covered snapshot markers finds what a whole replay
/// finds above the newest of them: the same entries, markers, hard state, last index and
/// errors, over random histories and coverings (in place up to an applied index, a file).
#[test]
fn a_covered_replay_keeps_what_a_whole_replay_keeps_above_its_snapshot() {
    let (mut dropped, mut corrupt) = (0, 0);
    for seed in 0..500 {
        let mut rng = StdRng::seed_from_u64(seed);
        let (data, markers) = random_history(&mut rng);
        let mut whole = WalContents::default();
        let whole_end = replay_records(&data, false, &mut whole);
        let covering = Covering {
            applied: rng.random_range(0..200),
            file: (!markers.is_empty() && rng.random_bool(0.5)).then(|| {
                let m = &markers[rng.random_range(0..markers.len())];
                (m.term, m.index)
            }),
        };
        let mut covered = WalContents::covering(covering.clone());
        let covered_end = replay_records(&data, false, &mut covered);
        assert_eq!(covered_end, whole_end, "seed {seed}");
        if whole_end.is_err() {
            corrupt += 1;
            continue;
        }
        let floor = whole
            .snapshots
            .iter()
            .filter(|m| {
                m.index > 0
                    && (m.index <= covering.applied || covering.file == Some((m.term, m.index)))
            })
            .map(|m| m.index)
            .max()
            .unwrap_or(0);
        let above: Vec<(u64, u64)> = indexes_terms(&whole.entries)
            .into_iter()
            .filter(|(index, _)| *index > floor)
            .collect();
        assert_eq!(indexes_terms(&covered.entries), above, "seed {seed}");
        assert_eq!(covered.snapshots, whole.snapshots, "seed {seed}");
        assert_eq!(covered.hard_state, whole.hard_state, "seed {seed}");
        assert_eq!(covered.last_index(), whole.last_index(), "seed {seed}");
        dropped += whole.entries.len() - covered.entries.len();
    }
    assert!(
        dropped > 1000 && corrupt > 10,
        "the histories drop entries ({dropped}) and end in corruption ({corrupt})"
    );
}
