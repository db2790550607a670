//! Round trips through the writer and the reader, and the reader's answers to damaged files.

use std::io::Cursor;

use crate::page::{LEAF_PAGE, PAGE_HEADER_SIZE};
use crate::{Db, Error, Writer, DEFAULT_PAGE_SIZE};

type Buckets = Vec<(Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>)>;

fn write(buckets: &Buckets, page_size: usize) -> Vec<u8> {
    let mut w = Writer::new(Cursor::new(Vec::new()), page_size).unwrap();
    for (name, items) in buckets {
        w.bucket(name).unwrap();
        for (k, v) in items {
            w.put(k, v).unwrap();
        }
    }
    let (out, written) = w.finish().unwrap();
    let bytes = out.into_inner();
    assert_eq!(bytes.len() as u64, written.size_bytes);
    assert_eq!(written.pages * page_size as u64, written.size_bytes);
    bytes
}

fn read_all(db: &Db<Vec<u8>>) -> Buckets {
    db.buckets()
        .unwrap()
        .into_iter()
        .map(|(name, b)| {
            let items = db
                .iter(&b)
                .map(|e| {
                    let e = e.unwrap();
                    assert!(!e.is_bucket);
                    (e.key, e.value)
                })
                .collect();
            (name, items)
        })
        .collect()
}

/// A keyspace that needs several levels of branch pages, overflow pages and inline buckets.
fn sample() -> Buckets {
    let many = (0..5000u32)
        .map(|i| {
            (
                format!("key/{i:06}").into_bytes(),
                vec![(i % 251) as u8; (i % 97) as usize],
            )
        })
        .collect();
    let big = (0..5u32)
        .map(|i| {
            (
                vec![b'b', i as u8],
                vec![i as u8; 3 * DEFAULT_PAGE_SIZE + 17 * i as usize],
            )
        })
        .collect();
    let long_keys = (0..40u32)
        .map(|i| {
            (
                format!("{i:03}{}", "k".repeat(3000)).into_bytes(),
                b"v".to_vec(),
            )
        })
        .collect();
    vec![
        (b"alarm".to_vec(), vec![]),
        (b"big".to_vec(), big),
        (b"key".to_vec(), many),
        (b"long".to_vec(), long_keys),
        (
            b"meta".to_vec(),
            vec![(b"consistent_index".to_vec(), 7u64.to_be_bytes().to_vec())],
        ),
    ]
}

#[test]
fn written_buckets_read_back_unchanged_and_pass_the_check() {
    let buckets = sample();
    for page_size in [1024, DEFAULT_PAGE_SIZE, 16384] {
        let db = Db::from_bytes(write(&buckets, page_size)).unwrap();
        assert_eq!(db.page_size(), page_size);
        db.check().unwrap();
        assert_eq!(read_all(&db), buckets, "page size {page_size}");
        // small buckets are inline, as bbolt stores them; the others have their own pages
        let inline: Vec<bool> = db
            .buckets()
            .unwrap()
            .iter()
            .map(|(_, b)| b.is_inline())
            .collect();
        assert_eq!(inline, [true, false, false, false, true]);
    }
}

#[test]
fn an_empty_database_and_a_database_of_empty_buckets_are_valid() {
    let db = Db::from_bytes(write(&vec![], DEFAULT_PAGE_SIZE)).unwrap();
    db.check().unwrap();
    assert!(db.buckets().unwrap().is_empty());
    assert_eq!(db.meta().pgid, 4, "metas, freelist, root leaf");

    let names: Buckets = (0..300u32)
        .map(|i| (format!("b{i:03}").into_bytes(), vec![]))
        .collect();
    let db = Db::from_bytes(write(&names, DEFAULT_PAGE_SIZE)).unwrap();
    db.check().unwrap();
    assert_eq!(read_all(&db), names, "a root bucket spanning several pages");
}

#[test]
fn the_writer_refuses_unsorted_or_empty_keys_and_unsorted_buckets() {
    let mut w = Writer::new(Cursor::new(Vec::new()), DEFAULT_PAGE_SIZE).unwrap();
    assert!(
        matches!(w.put(b"a", b""), Err(Error::Invalid(_))),
        "no bucket yet"
    );
    w.bucket(b"m").unwrap();
    w.put(b"b", b"1").unwrap();
    assert!(matches!(w.put(b"b", b"2"), Err(Error::Invalid(_))));
    assert!(matches!(w.put(b"a", b"2"), Err(Error::Invalid(_))));
    assert!(matches!(w.put(b"", b"2"), Err(Error::Invalid(_))));
    assert!(matches!(w.bucket(b"a"), Err(Error::Invalid(_))));
    assert!(matches!(
        Writer::new(Cursor::new(Vec::new()), 3000),
        Err(Error::Invalid(_))
    ));
}

/// Puts `buckets` into a writer (the `fill` of the two-pass streaming API).
fn fill(buckets: &Buckets, w: &mut Writer<&mut dyn std::io::Write>) -> Result<(), Error> {
    for (name, items) in buckets {
        w.bucket(name)?;
        for (k, v) in items {
            w.put(k, v)?;
        }
    }
    Ok(())
}

#[test]
fn a_streamed_database_is_byte_for_byte_the_file_one() {
    let buckets = sample();
    for page_size in [1024, DEFAULT_PAGE_SIZE] {
        let layout = crate::plan(page_size, |w| fill(&buckets, w)).unwrap();
        let mut streamed = Vec::new();
        let written = crate::emit(&mut streamed, layout, |w| fill(&buckets, w)).unwrap();
        let file = write(&buckets, page_size);
        assert_eq!(written.size_bytes, layout.size_bytes());
        assert_eq!(streamed.len() as u64, layout.size_bytes());
        assert!(streamed == file, "page size {page_size}");
    }
}

#[test]
fn a_second_pass_over_other_data_is_refused() {
    let buckets = sample();
    let layout = crate::plan(DEFAULT_PAGE_SIZE, |w| fill(&buckets, w)).unwrap();
    let mut more = buckets.clone();
    more[2].1.push((b"key/999999".to_vec(), vec![1; 5000]));
    let err = crate::emit(&mut Vec::new(), layout, |w| fill(&more, w)).unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
}

#[test]
fn a_damaged_meta_falls_back_to_the_other_and_two_are_refused() {
    let mut bytes = write(&sample(), DEFAULT_PAGE_SIZE);
    // meta 1 (txid 1) is in use; damage it: meta 0 (txid 0, same tree) takes over
    bytes[DEFAULT_PAGE_SIZE + PAGE_HEADER_SIZE + 20] ^= 0xff;
    let db = Db::from_bytes(bytes.clone()).unwrap();
    assert_eq!(db.meta().txid, 0);
    assert_eq!(read_all(&db), sample());

    bytes[PAGE_HEADER_SIZE + 20] ^= 0xff;
    let err = Db::from_bytes(bytes).err().unwrap();
    assert!(matches!(err, Error::Corrupt(_)), "{err}");
}

#[test]
fn a_file_that_is_not_bbolt_or_is_truncated_is_refused() {
    let err = Db::from_bytes(vec![0u8; 3 * DEFAULT_PAGE_SIZE])
        .err()
        .unwrap();
    assert!(matches!(err, Error::NotBbolt(_)), "{err}");
    let err = Db::from_bytes(b"{\"not\": \"bbolt\"}".to_vec())
        .err()
        .unwrap();
    assert!(matches!(err, Error::Truncated(_)), "{err}");

    let bytes = write(&sample(), DEFAULT_PAGE_SIZE);
    let err = Db::from_bytes(bytes[..bytes.len() - DEFAULT_PAGE_SIZE].to_vec())
        .err()
        .unwrap();
    assert!(matches!(err, Error::Truncated(_)), "{err}");
}

#[test]
fn a_damaged_page_is_an_error_or_changed_data_never_a_panic() {
    // without the long keys: an overflow page of a branch holds only branch keys, which bbolt
    // does not read back either
    let mut buckets = sample();
    buckets.retain(|(name, _)| name != b"long");
    let good = write(&buckets, DEFAULT_PAGE_SIZE);
    let pages = good.len() / DEFAULT_PAGE_SIZE;
    let all = |db: &Db<Vec<u8>>| -> Result<Vec<crate::Entry>, Error> {
        let mut out = Vec::new();
        for (_, b) in db.buckets()? {
            for e in db.iter(&b) {
                out.push(e?);
            }
        }
        Ok(out)
    };
    let original = all(&Db::from_bytes(good.clone()).unwrap()).unwrap();
    // overwrite each data page's header and first element in turn with garbage
    for page in 3..pages {
        let mut bytes = good.clone();
        let at = page * DEFAULT_PAGE_SIZE;
        for (i, b) in bytes[at..at + 48].iter_mut().enumerate() {
            *b = b.wrapping_mul(31).wrapping_add(i as u8 ^ 0x5a);
        }
        let db = Db::from_bytes(bytes).unwrap();
        match all(&db) {
            // an overflow page holds only data: the damage shows in a value
            Ok(entries) => assert!(entries != original, "page {page}: damage unnoticed"),
            Err(e) => assert!(matches!(e, Error::Corrupt(_)), "page {page}: {e}"),
        }
    }
}

#[test]
fn a_leaf_pointing_outside_its_page_is_reported() {
    let mut bytes = write(&sample(), DEFAULT_PAGE_SIZE);
    // page 3 is the first leaf of "big": push its first element's value size past the page
    let at = 3 * DEFAULT_PAGE_SIZE;
    assert_eq!(
        u16::from_le_bytes([bytes[at + 8], bytes[at + 9]]),
        LEAF_PAGE
    );
    bytes[at + PAGE_HEADER_SIZE + 12..at + PAGE_HEADER_SIZE + 16]
        .copy_from_slice(&u32::MAX.to_le_bytes());
    let db = Db::from_bytes(bytes).unwrap();
    let (_, big) = db.buckets().unwrap().into_iter().nth(1).unwrap();
    let err = db.iter(&big).find_map(Result::err).unwrap();
    assert!(err.to_string().contains("past its page"), "{err}");
}

#[test]
fn bbolt_files_are_told_from_other_files_by_their_first_bytes() {
    let bytes = write(&sample(), DEFAULT_PAGE_SIZE);
    assert!(crate::looks_like_bbolt(&bytes[..crate::DETECT_BYTES]));
    assert!(!crate::looks_like_bbolt(&bytes[..crate::DETECT_BYTES - 1]));
    assert!(!crate::looks_like_bbolt(
        b"MSSNAP01 and then MetaStore's own format"
    ));
    let mut other_version = bytes.clone();
    other_version[20] = 1;
    assert!(!crate::looks_like_bbolt(&other_version));
}

/// A `key` bucket of these (main, sub, tombstone) revisions and a compaction mark, read back
/// through [`crate::etcd_schema::check_revisions`].
fn check_history(revisions: &[(i64, i64, bool)], mark: Option<i64>) -> Result<i64, Error> {
    use crate::etcd_schema::{check_revisions, read_meta, KeyBucketKey, Revision};
    let keys = revisions
        .iter()
        .map(|&(main, sub, tombstone)| {
            let key = KeyBucketKey {
                revision: Revision { main, sub },
                tombstone,
            };
            (key.encode(), b"v".to_vec())
        })
        .collect();
    let meta = mark
        .map(|m| {
            vec![(
                b"finishedCompactRev".to_vec(),
                Revision { main: m, sub: 0 }.to_bytes().to_vec(),
            )]
        })
        .unwrap_or_default();
    let db = Db::from_bytes(write(
        &vec![(b"key".to_vec(), keys), (b"meta".to_vec(), meta)],
        DEFAULT_PAGE_SIZE,
    ))
    .unwrap();
    let meta = read_meta(&db)?;
    check_revisions(&db, &meta)
}

#[test]
fn a_history_with_a_revision_missing_above_the_compaction_mark_is_refused() {
    // Whole: revisions 2.. with sub-revisions and a tombstone; kept revisions below a mark.
    assert_eq!(
        check_history(
            &[(2, 0, false), (3, 0, false), (3, 1, false), (4, 0, true)],
            None
        )
        .unwrap(),
        4
    );
    assert_eq!(
        check_history(
            &[
                (5, 0, false),
                (12, 0, false),
                (21, 0, false),
                (22, 0, false)
            ],
            Some(20)
        )
        .unwrap(),
        22
    );
    // Everything compacted away but kept revisions: nothing above the mark to miss.
    assert_eq!(check_history(&[(7, 0, false)], Some(30)).unwrap(), 7);
    // A gap above the mark, at its start or further on.
    let err = check_history(&[(12, 0, false), (22, 0, false)], Some(20)).unwrap_err();
    assert!(err.to_string().contains("revision 21 is missing"), "{err}");
    let err = check_history(&[(2, 0, false), (3, 0, false), (5, 0, false)], None).unwrap_err();
    assert!(err.to_string().contains("revision 4 is missing"), "{err}");
}
