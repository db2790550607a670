//! MetaStore's engine-neutral snapshot stream.
//!
//! Layout (all integers big-endian):
//! ```text
//! magic  "MSSNAP01"                                   8 bytes
//! record 0x01 | bucket_len u8 | bucket | key_len u32 | key | value_len u32 | value   (repeated)
//! end    0x00 | record_count u64 | crc32 u32          crc32 (IEEE) of every byte before it
//! ```
//! Buckets appear in the order given to the writer, keys ascending inside a bucket, so the same
//! logical content always gives the same bytes, whichever engine wrote it.

use std::io::{Read, Write};

use crate::{ReadView, Result, ScanRange, StorageError, Visit};

/// The first bytes of every snapshot stream.
pub const MAGIC: &[u8; 8] = b"MSSNAP01";
const TAG_PAIR: u8 = 1;
const TAG_END: u8 = 0;

/// Bytes a [`HashingWriter`] gathers before it hashes and writes them. A snapshot is millions of
/// small pieces (six per pair); hashing each and writing it through the caller's layers of
/// `dyn Write` (the snapshot file adds its own checksum) cost more CPU than the data.
const CHUNK_BYTES: usize = 64 * 1024;

struct HashingWriter<'a> {
    inner: &'a mut dyn Write,
    hasher: crc32fast::Hasher,
    written: u64,
    chunk: Vec<u8>,
}

impl HashingWriter<'_> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.written += bytes.len() as u64;
        if bytes.len() >= CHUNK_BYTES {
            // A piece that fills a chunk by itself goes out as it is, after what was gathered.
            self.drain()?;
            self.hasher.update(bytes);
            return self.inner.write_all(bytes);
        }
        self.chunk.extend_from_slice(bytes);
        if self.chunk.len() >= CHUNK_BYTES {
            self.drain()?;
        }
        Ok(())
    }

    /// Hashes and writes what was gathered.
    fn drain(&mut self) -> std::io::Result<()> {
        self.hasher.update(&self.chunk);
        self.inner.write_all(&self.chunk)?;
        self.chunk.clear();
        Ok(())
    }
}

/// Write every pair of `buckets` in `view` to `writer`. Returns the bytes written.
pub fn write_stream(
    view: &dyn ReadView,
    buckets: &[&'static str],
    writer: &mut dyn Write,
) -> Result<u64> {
    let mut out = HashingWriter {
        inner: writer,
        hasher: crc32fast::Hasher::new(),
        written: 0,
        chunk: Vec::with_capacity(CHUNK_BYTES + 64),
    };
    out.put(MAGIC)?;
    let mut count: u64 = 0;
    for bucket in buckets {
        let name = bucket.as_bytes();
        let name_len = u8::try_from(name.len())
            .map_err(|_| StorageError::BadSnapshot(format!("bucket name too long: {bucket}")))?;
        let mut io_err = None;
        view.scan(bucket, ScanRange::all(), &mut |k, v| {
            let res = (|| -> std::io::Result<()> {
                out.put(&[TAG_PAIR, name_len])?;
                out.put(name)?;
                out.put(&(k.len() as u32).to_be_bytes())?;
                out.put(k)?;
                out.put(&(v.len() as u32).to_be_bytes())?;
                out.put(v)
            })();
            match res {
                Ok(()) => {
                    count += 1;
                    Visit::Continue
                }
                Err(e) => {
                    io_err = Some(e);
                    Visit::Stop
                }
            }
        })?;
        if let Some(e) = io_err {
            return Err(e.into());
        }
    }
    out.put(&[TAG_END])?;
    out.put(&count.to_be_bytes())?;
    out.drain()?;
    let crc = out.hasher.clone().finalize();
    out.inner.write_all(&crc.to_be_bytes())?;
    out.inner.flush()?;
    Ok(out.written + 4)
}

/// Receives each `(bucket, key, value)` of a stream being read.
pub type PairVisitor<'a> = dyn FnMut(&str, Vec<u8>, Vec<u8>) -> Result<()> + 'a;

struct HashingReader<'a> {
    inner: &'a mut dyn Read,
    hasher: crc32fast::Hasher,
}

impl HashingReader<'_> {
    fn take(&mut self, buf: &mut [u8]) -> Result<()> {
        self.inner.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                StorageError::BadSnapshot("stream cut short".into())
            }
            _ => StorageError::Io(e),
        })?;
        self.hasher.update(buf);
        Ok(())
    }
    fn u8(&mut self) -> Result<u8> {
        let mut b = [0u8; 1];
        self.take(&mut b)?;
        Ok(b[0])
    }
    fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        self.take(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }
    /// Reads `len` bytes, growing the buffer as data arrives: a corrupted length cannot make
    /// the reader allocate more than the stream really holds.
    fn bytes(&mut self, len: usize) -> Result<Vec<u8>> {
        // Exactly `len` bytes of capacity: a memory engine keeps these buffers as they are, and
        // `read_to_end` on an empty vector would leave up to twice that. A length announced by a
        // corrupt stream is not trusted for the first allocation.
        let mut v = Vec::with_capacity(len.min(1 << 20));
        (&mut *self.inner).take(len as u64).read_to_end(&mut v)?;
        if v.len() != len {
            return Err(StorageError::BadSnapshot("stream cut short".into()));
        }
        self.hasher.update(&v);
        Ok(v)
    }
}

/// Read a stream, handing each pair to `visit(bucket, key, value)` in stream order. The checksum
/// is verified only at the end: a caller that must not apply a bad stream stages the pairs and
/// commits them once this returns `Ok`. Returns the number of pairs.
pub fn read_stream(reader: &mut dyn Read, visit: &mut PairVisitor<'_>) -> Result<u64> {
    let mut input = HashingReader {
        inner: reader,
        hasher: crc32fast::Hasher::new(),
    };
    let mut magic = [0u8; 8];
    input.take(&mut magic)?;
    if &magic != MAGIC {
        return Err(StorageError::BadSnapshot(
            "not a MetaStore snapshot (bad magic)".into(),
        ));
    }
    let mut count: u64 = 0;
    loop {
        match input.u8()? {
            TAG_PAIR => {
                let name_len = input.u8()? as usize;
                let name = input.bytes(name_len)?;
                let name = String::from_utf8(name)
                    .map_err(|_| StorageError::BadSnapshot("bucket name is not UTF-8".into()))?;
                let key_len = input.u32()? as usize;
                let key = input.bytes(key_len)?;
                let value_len = input.u32()? as usize;
                let value = input.bytes(value_len)?;
                visit(&name, key, value)?;
                count += 1;
            }
            TAG_END => {
                let mut n = [0u8; 8];
                input.take(&mut n)?;
                let expected_crc = input.hasher.clone().finalize();
                let mut c = [0u8; 4];
                input
                    .inner
                    .read_exact(&mut c)
                    .map_err(|_| StorageError::BadSnapshot("stream cut short".into()))?;
                if u32::from_be_bytes(c) != expected_crc {
                    return Err(StorageError::BadSnapshot("checksum mismatch".into()));
                }
                if u64::from_be_bytes(n) != count {
                    return Err(StorageError::BadSnapshot("record count mismatch".into()));
                }
                return Ok(count);
            }
            other => {
                return Err(StorageError::BadSnapshot(format!(
                    "unknown record tag {other}"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Pair = (Vec<u8>, Vec<u8>);

    /// Buckets of pairs, in order.
    struct Pairs(Vec<(&'static str, Vec<Pair>)>);

    impl ReadView for Pairs {
        fn get(&self, _bucket: &str, _key: &[u8]) -> Result<Option<Vec<u8>>> {
            unreachable!("export only scans")
        }

        fn scan(
            &self,
            bucket: &str,
            _range: ScanRange<'_>,
            visitor: &mut dyn FnMut(&[u8], &[u8]) -> Visit,
        ) -> Result<usize> {
            let pairs = &self.0.iter().find(|(b, _)| *b == bucket).unwrap().1;
            for (k, v) in pairs {
                visitor(k, v);
            }
            Ok(pairs.len())
        }
    }

    /// The bytes of the layout in the module's documentation, whatever chunks the writer
    /// gathers them in: pairs on both sides of a chunk boundary and one value larger than a
    /// chunk.
    #[test]
    fn the_stream_is_the_documented_layout() {
        let big = vec![7u8; CHUNK_BYTES * 2 + 3];
        let mut key_pairs: Vec<Pair> = (0..3000u32)
            .map(|i| (i.to_be_bytes().to_vec(), vec![i as u8; 40]))
            .collect();
        key_pairs.insert(1500, (b"big".to_vec(), big));
        let view = Pairs(vec![
            ("key", key_pairs.clone()),
            ("meta", vec![(b"m".to_vec(), b"v".to_vec())]),
        ]);
        let mut expected = MAGIC.to_vec();
        for (bucket, pairs) in &view.0 {
            for (k, v) in pairs {
                expected.extend([TAG_PAIR, bucket.len() as u8]);
                expected.extend(bucket.as_bytes());
                expected.extend((k.len() as u32).to_be_bytes());
                expected.extend(k);
                expected.extend((v.len() as u32).to_be_bytes());
                expected.extend(v);
            }
        }
        expected.push(TAG_END);
        expected.extend(3002u64.to_be_bytes());
        let crc = crc32fast::hash(&expected);
        expected.extend(crc.to_be_bytes());

        let mut written = Vec::new();
        let len = write_stream(&view, &["key", "meta"], &mut written).unwrap();
        assert_eq!(len, expected.len() as u64);
        assert!(
            written == expected,
            "the bytes differ from the documented layout"
        );
    }
}
