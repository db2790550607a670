//! The SHA-256 trailer of an etcd snapshot.
//!
//! etcd's Snapshot RPC streams the database and then the SHA-256 of those bytes; `etcdctl
//! snapshot save` stores both. A database is a whole number of pages, so a file whose size modulo
//! 512 is 32 has a trailer (etcd's own test in `snapshot restore`), and any other file is a bare
//! database such as a copied `member/snap/db`.

use std::io::{Read, Seek, SeekFrom, Write};

use sha2::{Digest, Sha256};

use crate::Error;

/// Size of the trailer.
pub const TRAILER_SIZE: u64 = 32;

/// Whether a file of `len` bytes ends with a trailer, by etcd's rule.
pub fn has_trailer(len: u64) -> bool {
    len % 512 == TRAILER_SIZE
}

/// SHA-256 of the first `len` bytes read from `from`.
fn sha256_of(from: &mut impl Read, len: u64) -> Result<[u8; 32], Error> {
    let mut hasher = Sha256::new();
    let copied = std::io::copy(&mut from.take(len), &mut hasher)?;
    if copied != len {
        return Err(Error::Truncated(format!(
            "expected {len} bytes, read {copied}"
        )));
    }
    Ok(hasher.finalize().into())
}

/// Appends the SHA-256 of everything in `file` to its end; returns the digest.
pub fn append<F: Read + Write + Seek>(file: &mut F) -> Result<[u8; 32], Error> {
    let len = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(0))?;
    let digest = sha256_of(file, len)?;
    file.seek(SeekFrom::End(0))?;
    file.write_all(&digest)?;
    file.flush()?;
    Ok(digest)
}

/// Checks the trailer of a snapshot file as `etcdctl snapshot restore` does and returns the size
/// of the database before it. Without a trailer: [`Error::MissingHash`] unless `skip_hash_check`.
/// With `skip_hash_check` a trailer is not read, only left out of the database (etcd 3.4 restores
/// such a file whatever its trailer holds).
pub fn verify<F: Read + Seek>(file: &mut F, skip_hash_check: bool) -> Result<u64, Error> {
    let len = file.seek(SeekFrom::End(0))?;
    if !has_trailer(len) {
        return if skip_hash_check {
            Ok(len)
        } else {
            Err(Error::MissingHash)
        };
    }
    let db_len = len - TRAILER_SIZE;
    if skip_hash_check {
        return Ok(db_len);
    }
    file.seek(SeekFrom::Start(0))?;
    let got = sha256_of(file, db_len)?;
    let mut expected = [0u8; 32];
    file.read_exact(&mut expected)?;
    if got != expected {
        return Err(Error::HashMismatch {
            expected: go_bytes(&expected),
            got: go_bytes(&got),
        });
    }
    Ok(db_len)
}

/// Bytes as Go's `%v` prints a byte slice (`[1 170 207]`), as etcd's message has them.
fn go_bytes(bytes: &[u8]) -> String {
    let list: Vec<String> = bytes.iter().map(u8::to_string).collect();
    format!("[{}]", list.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn appended_trailer_verifies_and_a_changed_byte_does_not() {
        let mut file = Cursor::new(vec![7u8; 4096]);
        append(&mut file).unwrap();
        assert_eq!(file.get_ref().len(), 4096 + 32);
        assert_eq!(verify(&mut file, false).unwrap(), 4096);

        file.get_mut()[100] = 8;
        let err = verify(&mut file, false).unwrap_err();
        let digest: [u8; 32] = Sha256::digest(&file.get_ref()[..4096]).into();
        let trailer = &file.get_ref()[4096..];
        assert_eq!(
            err.to_string(),
            format!(
                "expected sha256 {}, got {}",
                go_bytes(trailer),
                go_bytes(&digest)
            )
        );
        assert!(err.to_string().starts_with("expected sha256 ["), "{err}");
        assert_eq!(
            verify(&mut file, true).unwrap(),
            4096,
            "not checked when skipping"
        );
    }

    #[test]
    fn a_bare_database_needs_skip_hash_check() {
        let mut file = Cursor::new(vec![0u8; 8192]);
        assert!(matches!(verify(&mut file, false), Err(Error::MissingHash)));
        assert_eq!(verify(&mut file, true).unwrap(), 8192);
    }
}
