//! Reading a bbolt file: both metas checked, the newest valid one used, pages read on demand.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::page::{
    u32_at, u64_at, Meta, PageHeader, BRANCH_ELEMENT_SIZE, BRANCH_PAGE, BUCKET_HEADER_SIZE,
    BUCKET_LEAF_FLAG, FREELIST_COUNT_OVERFLOW, FREELIST_PAGE, LEAF_ELEMENT_SIZE, LEAF_PAGE,
    MAX_PAGE_SIZE, META_SIZE, MIN_PAGE_SIZE, NO_FREELIST, PAGE_HEADER_SIZE,
};
use crate::Error;

/// A B+tree deeper than this is taken for a cycle in a corrupt file (bbolt's trees over a
/// terabyte of 4 KiB pages stay under 10 levels).
const MAX_DEPTH: usize = 64;

/// Random-access bytes a database is read from: a file, or bytes in memory.
pub trait ReadAt {
    /// Fills `buf` from `offset`; an error if fewer bytes are there.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    /// Number of bytes available.
    fn size_bytes(&self) -> std::io::Result<u64>;
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    fn size_bytes(&self) -> std::io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
        {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
    }
    fn size_bytes(&self) -> std::io::Result<u64> {
        Ok(self.len() as u64)
    }
}

/// An open bbolt database (read only).
pub struct Db<S> {
    source: S,
    meta: Meta,
    page_size: usize,
}

/// One key/value of a bucket, in key order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub key: Vec<u8>,
    /// The value; for a nested bucket its raw bucket value (header and inline page).
    pub value: Vec<u8>,
    /// Whether this entry is a nested bucket (bbolt's `ForEach` gives it a nil value).
    pub is_bucket: bool,
}

/// Where a bucket's tree lives.
#[derive(Debug, Clone, PartialEq, Eq)]
enum BucketRoot {
    Page(u64),
    /// An inline bucket: its leaf page is stored in its parent's value.
    Inline(Vec<u8>),
}

/// A bucket of the database, to iterate with [`Db::iter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    root: BucketRoot,
    /// The bucket's sequence (`NextSequence`).
    pub sequence: u64,
}

impl Bucket {
    /// The root bucket of a database (its keys are the top-level bucket names).
    fn top(meta: &Meta) -> Self {
        Self {
            root: BucketRoot::Page(meta.root),
            sequence: meta.root_sequence,
        }
    }

    /// Parses a bucket value (a bucket header, then an inline page when the root is 0).
    pub fn from_value(value: &[u8]) -> Result<Self, Error> {
        if value.len() < BUCKET_HEADER_SIZE {
            return Err(Error::corrupt("bucket value shorter than a bucket header"));
        }
        let root = u64_at(value, 0);
        let sequence = u64_at(value, 8);
        let root = if root == 0 {
            let page = value[BUCKET_HEADER_SIZE..].to_vec();
            let header = PageHeader::decode(&page)?;
            if header.flags != LEAF_PAGE {
                return Err(Error::corrupt("inline bucket page is not a leaf"));
            }
            BucketRoot::Inline(page)
        } else {
            BucketRoot::Page(root)
        };
        Ok(Self { root, sequence })
    }

    /// Whether the bucket is stored inline in its parent.
    pub fn is_inline(&self) -> bool {
        matches!(self.root, BucketRoot::Inline(_))
    }
}

impl Db<File> {
    /// Opens the bbolt file at `path`. Bytes after the database (etcd's SHA-256 trailer) are
    /// ignored.
    pub fn open(path: &Path) -> Result<Self, Error> {
        Self::new(File::open(path)?)
    }
}

impl Db<Vec<u8>> {
    /// Opens a database held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, Error> {
        Self::new(bytes)
    }
}

impl<S: ReadAt> Db<S> {
    /// Opens a database read from `source`: checks the magic, version and checksum of both
    /// metas and uses the valid one with the highest transaction id, as bbolt does.
    pub fn new(source: S) -> Result<Self, Error> {
        let len = source.size_bytes()?;
        let read_meta = |offset: u64| -> Result<Meta, Error> {
            let mut buf = [0u8; PAGE_HEADER_SIZE + META_SIZE];
            if offset + buf.len() as u64 > len {
                return Err(Error::Truncated(format!(
                    "{len} bytes is too small for a bbolt file"
                )));
            }
            source.read_exact_at(&mut buf, offset)?;
            let header = PageHeader::decode(&buf)?;
            if header.flags != crate::page::META_PAGE {
                return Err(Error::NotBbolt("first page is not a meta page".into()));
            }
            let meta = Meta::decode(&buf)?;
            let page_size = meta.page_size as usize;
            if !page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size)
            {
                return Err(Error::corrupt(format!("invalid page size {page_size}")));
            }
            Ok(meta)
        };
        let meta0 = read_meta(0);
        // Page 1 sits one page in: take meta 0's page size, or else try each possible size.
        let meta1 = match &meta0 {
            Ok(m) => read_meta(u64::from(m.page_size)),
            Err(_) => {
                let mut found = Err(Error::corrupt("no valid meta page"));
                let mut size = MIN_PAGE_SIZE;
                while size <= MAX_PAGE_SIZE {
                    if let Ok(m) = read_meta(size as u64) {
                        if m.page_size as usize == size {
                            found = Ok(m);
                            break;
                        }
                    }
                    size *= 2;
                }
                found
            }
        };
        let meta = match (meta0, meta1) {
            (Ok(a), Ok(b)) => {
                if b.txid > a.txid {
                    b
                } else {
                    a
                }
            }
            (Ok(m), Err(_)) | (Err(_), Ok(m)) => m,
            (Err(e), Err(_)) => return Err(e),
        };
        let page_size = meta.page_size as usize;
        let needed = meta.pgid.checked_mul(page_size as u64);
        match needed {
            Some(n) if n <= len => {}
            _ => {
                return Err(Error::Truncated(format!(
                    "the database needs {} pages of {page_size} bytes, the file has {len} bytes",
                    meta.pgid
                )))
            }
        }
        if meta.pgid < 3 || meta.root < 2 || meta.root >= meta.pgid {
            return Err(Error::corrupt(format!(
                "root page {} outside the {} pages",
                meta.root, meta.pgid
            )));
        }
        if meta.freelist != NO_FREELIST && (meta.freelist < 2 || meta.freelist >= meta.pgid) {
            return Err(Error::corrupt(format!(
                "freelist page {} outside the {} pages",
                meta.freelist, meta.pgid
            )));
        }
        Ok(Self {
            source,
            meta,
            page_size,
        })
    }

    /// The meta in use.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// The page size.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// The database's size as bbolt reports it (`tx.Size()`): high-water mark × page size.
    pub fn size_bytes(&self) -> u64 {
        self.meta.pgid * self.page_size as u64
    }

    /// Reads page `id` with its overflow pages.
    pub fn page(&self, id: u64) -> Result<Vec<u8>, Error> {
        if id < 2 || id >= self.meta.pgid {
            return Err(Error::corrupt(format!(
                "page {id} outside the {} pages",
                self.meta.pgid
            )));
        }
        let offset = id * self.page_size as u64;
        let mut buf = vec![0u8; self.page_size];
        self.source.read_exact_at(&mut buf, offset)?;
        let header = PageHeader::decode(&buf)?;
        if header.id != id {
            return Err(Error::corrupt(format!(
                "page {id} has id {} in its header",
                header.id
            )));
        }
        if header.overflow > 0 {
            let span = u64::from(header.overflow) + 1;
            if id + span > self.meta.pgid {
                return Err(Error::corrupt(format!(
                    "page {id} overflows past the {} pages",
                    self.meta.pgid
                )));
            }
            buf.resize(span as usize * self.page_size, 0);
            self.source
                .read_exact_at(&mut buf[self.page_size..], offset + self.page_size as u64)?;
        }
        Ok(buf)
    }

    /// The top-level buckets, in name order.
    pub fn buckets(&self) -> Result<Vec<(Vec<u8>, Bucket)>, Error> {
        self.iter(&Bucket::top(&self.meta))
            .map(|entry| {
                let entry = entry?;
                if !entry.is_bucket {
                    return Err(Error::corrupt(format!(
                        "root bucket holds a plain key {:?}",
                        String::from_utf8_lossy(&entry.key)
                    )));
                }
                Ok((entry.key, Bucket::from_value(&entry.value)?))
            })
            .collect()
    }

    /// The top-level bucket `name`, if there is one.
    pub fn bucket(&self, name: &[u8]) -> Result<Option<Bucket>, Error> {
        Ok(self
            .buckets()?
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b))
    }

    /// The entries of `bucket` in key order, reading one page at a time.
    pub fn iter<'a>(&'a self, bucket: &Bucket) -> Cursor<'a, S> {
        self.cursor(bucket, None)
    }

    fn cursor<'a>(&'a self, bucket: &Bucket, visit: Option<&'a mut Vec<bool>>) -> Cursor<'a, S> {
        let mut cursor = Cursor {
            db: self,
            stack: Vec::new(),
            last_key: None,
            lower_bound: None,
            pending: None,
            visit,
        };
        match &bucket.root {
            BucketRoot::Page(id) => cursor.descend(*id),
            BucketRoot::Inline(page) => match Frame::new(page.clone()) {
                Ok(frame) => cursor.stack.push(frame),
                Err(e) => cursor.fail(e),
            },
        }
        cursor
    }

    /// The pages listed in the freelist, or `None` when the freelist is not synced
    /// (`NoFreelistSync`: bbolt then takes every unreachable page as free).
    pub fn free_pages(&self) -> Result<Option<Vec<u64>>, Error> {
        if self.meta.freelist == NO_FREELIST {
            return Ok(None);
        }
        let page = self.page(self.meta.freelist)?;
        let header = PageHeader::decode(&page)?;
        if header.flags != FREELIST_PAGE {
            return Err(Error::corrupt("freelist page is not a freelist"));
        }
        let (count, start) = if header.count == FREELIST_COUNT_OVERFLOW {
            if page.len() < PAGE_HEADER_SIZE + 8 {
                return Err(Error::corrupt("freelist truncated"));
            }
            (u64_at(&page, PAGE_HEADER_SIZE), PAGE_HEADER_SIZE + 8)
        } else {
            (u64::from(header.count), PAGE_HEADER_SIZE)
        };
        let end = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(8))
            .and_then(|b| b.checked_add(start))
            .filter(|&end| end <= page.len())
            .ok_or_else(|| Error::corrupt("freelist count past its page"))?;
        Ok(Some(
            page[start..end]
                .chunks_exact(8)
                .map(|c| u64_at(c, 0))
                .collect(),
        ))
    }

    /// bbolt's consistency check (`tx.Check`): every page below the high-water mark is
    /// referenced exactly once (metas, freelist, tree pages with their overflow) or is free, every
    /// page is of the type its parent expects, and keys are in order. Reads every page once.
    pub fn check(&self) -> Result<(), Error> {
        let pgid = self.meta.pgid as usize;
        let mut seen = vec![false; pgid];
        seen[0] = true;
        seen[1] = true;
        let free = self.free_pages()?;
        if let Some(free) = &free {
            let page = self.page(self.meta.freelist)?;
            let overflow = PageHeader::decode(&page)?.overflow as usize;
            let first = self.meta.freelist as usize;
            seen[first..=first + overflow].fill(true);
            for &id in free {
                let slot = seen
                    .get_mut(id as usize)
                    .ok_or_else(|| Error::corrupt(format!("free page {id} out of bounds")))?;
                if *slot || id < 2 {
                    return Err(Error::corrupt(format!(
                        "page {id}: already freed or in use"
                    )));
                }
                *slot = true;
            }
        }
        let mut buckets = vec![Bucket::top(&self.meta)];
        while let Some(bucket) = buckets.pop() {
            for entry in self.cursor(&bucket, Some(&mut seen)) {
                let entry = entry?;
                if entry.is_bucket {
                    buckets.push(Bucket::from_value(&entry.value)?);
                }
            }
        }
        if free.is_some() {
            if let Some(id) = seen.iter().position(|s| !s) {
                return Err(Error::corrupt(format!("page {id}: unreachable unfreed")));
            }
        }
        Ok(())
    }
}

struct Frame {
    page: Vec<u8>,
    header: PageHeader,
    index: usize,
}

impl Frame {
    fn new(page: Vec<u8>) -> Result<Self, Error> {
        let header = PageHeader::decode(&page)?;
        let element = match header.flags {
            BRANCH_PAGE => BRANCH_ELEMENT_SIZE,
            LEAF_PAGE => LEAF_ELEMENT_SIZE,
            flags => {
                return Err(Error::corrupt(format!(
                    "page {}: invalid type {flags:#x} in a bucket's tree",
                    header.id
                )))
            }
        };
        if PAGE_HEADER_SIZE + usize::from(header.count) * element > page.len() {
            return Err(Error::corrupt(format!(
                "page {}: {} elements do not fit",
                header.id, header.count
            )));
        }
        Ok(Self {
            page,
            header,
            index: 0,
        })
    }

    /// The `[start, start + len)` bytes `pos` after element `index`, bounds-checked.
    fn slice(&self, element: usize, pos: u32, len: u32) -> Result<&[u8], Error> {
        let start = PAGE_HEADER_SIZE + element + pos as usize;
        start
            .checked_add(len as usize)
            .and_then(|end| self.page.get(start..end))
            .ok_or_else(|| {
                Error::corrupt(format!("page {}: element past its page", self.header.id))
            })
    }
}

/// Iterator over a bucket's entries; see [`Db::iter`]. After an error it ends.
pub struct Cursor<'a, S> {
    db: &'a Db<S>,
    stack: Vec<Frame>,
    last_key: Option<Vec<u8>>,
    /// The branch key of the subtree just entered: its first key may not be below it.
    lower_bound: Option<Vec<u8>>,
    pending: Option<Error>,
    /// Pages reached so far; only the consistency check sets it.
    visit: Option<&'a mut Vec<bool>>,
}

impl<S: ReadAt> Cursor<'_, S> {
    fn descend(&mut self, id: u64) {
        if self.stack.len() >= MAX_DEPTH {
            return self.fail(Error::corrupt(format!(
                "page {id}: tree deeper than {MAX_DEPTH} levels"
            )));
        }
        let frame = match self.db.page(id).and_then(Frame::new) {
            Ok(frame) => frame,
            Err(e) => return self.fail(e),
        };
        if let Some(seen) = self.visit.as_deref_mut() {
            let span = frame.header.overflow as usize + 1;
            let first = id as usize;
            if let Some(p) = (first..first + span).find(|&p| seen[p]) {
                return self.fail(Error::corrupt(format!(
                    "page {p}: multiple references or freed and in use"
                )));
            }
            seen[first..first + span].fill(true);
        }
        self.stack.push(frame)
    }

    fn fail(&mut self, e: Error) {
        self.stack.clear();
        self.pending = Some(e);
    }

    fn step(&mut self) -> Result<Option<Entry>, Error> {
        loop {
            let Some(top) = self.stack.last_mut() else {
                return Ok(None);
            };
            if top.index >= usize::from(top.header.count) {
                self.stack.pop();
                continue;
            }
            let i = top.index;
            top.index += 1;
            if top.header.flags == BRANCH_PAGE {
                let at = PAGE_HEADER_SIZE + i * BRANCH_ELEMENT_SIZE;
                let child = u64_at(&top.page, at + 8);
                let key = top
                    .slice(
                        i * BRANCH_ELEMENT_SIZE,
                        u32_at(&top.page, at),
                        u32_at(&top.page, at + 4),
                    )?
                    .to_vec();
                // bbolt finds a key in the child whose branch key is the last one not above it
                self.lower_bound = Some(key);
                self.descend(child);
                if let Some(e) = self.pending.take() {
                    return Err(e);
                }
                continue;
            }
            let at = PAGE_HEADER_SIZE + i * LEAF_ELEMENT_SIZE;
            let flags = u32_at(&top.page, at);
            let pos = u32_at(&top.page, at + 4);
            let ksize = u32_at(&top.page, at + 8);
            let vsize = u32_at(&top.page, at + 12);
            let element = i * LEAF_ELEMENT_SIZE;
            let key = top.slice(element, pos, ksize)?.to_vec();
            let value_pos = pos
                .checked_add(ksize)
                .ok_or_else(|| Error::corrupt("element position overflows"))?;
            let value = top.slice(element, value_pos, vsize)?.to_vec();
            if self.last_key.as_ref().is_some_and(|last| *last >= key)
                || self.lower_bound.take().is_some_and(|bound| bound > key)
            {
                return Err(Error::corrupt(format!(
                    "page {}: keys out of order",
                    top.header.id
                )));
            }
            self.last_key = Some(key.clone());
            return Ok(Some(Entry {
                key,
                value,
                is_bucket: flags & BUCKET_LEAF_FLAG != 0,
            }));
        }
    }
}

impl<S: ReadAt> Iterator for Cursor<'_, S> {
    type Item = Result<Entry, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.pending.take() {
            return Some(Err(e));
        }
        match self.step() {
            Ok(entry) => entry.map(Ok),
            Err(e) => {
                self.stack.clear();
                Some(Err(e))
            }
        }
    }
}
