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

struct HashingWriter<'a> {
    inner: &'a mut dyn Write,
    hasher: crc32fast::Hasher,
    written: u64,
}

impl HashingWriter<'_> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        self.inner.write_all(bytes)
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
