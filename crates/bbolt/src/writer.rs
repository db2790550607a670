//! Writing a bbolt file in one pass from buckets given in key order.
//!
//! Leaf pages are written as they fill, and so are the branch pages above them (a written page's
//! first key and id go to the branch page being filled one level up), so memory is about one page
//! per tree level, whatever the data size. The file is laid out as bbolt lays out a fresh database: metas on
//! pages 0 and 1, the (empty) freelist on page 2, tree pages after it, every page below the
//! high-water mark reachable — so `tx.Check()` finds nothing unreachable or unfreed.
//!
//! The metas name the root bucket's page and the page count, known only at the end. Into a file,
//! [`Writer::new`] reserves their pages and [`Writer::finish`] seeks back to write them. Into a
//! stream (no seeking), the writer being deterministic, the same buckets are written twice:
//! [`plan`] discards the pages and returns the [`Layout`], then [`emit`] sends the metas and
//! freelist first and the tree pages after them, and checks that the layout came out the same.

use std::io::{Seek, SeekFrom, Write};

use crate::page::{
    Meta, PageHeader, BRANCH_ELEMENT_SIZE, BRANCH_PAGE, BUCKET_HEADER_SIZE, BUCKET_LEAF_FLAG,
    FREELIST_PAGE, LEAF_ELEMENT_SIZE, LEAF_PAGE, MAX_KEY_SIZE, MAX_PAGE_SIZE, MAX_VALUE_SIZE,
    META_PAGE, META_SIZE, MIN_PAGE_SIZE, PAGE_HEADER_SIZE,
};
use crate::Error;

/// The page size etcd's databases have on x86-64 and arm64 Linux (the OS page size).
pub const DEFAULT_PAGE_SIZE: usize = 4096;

/// The freelist page of a written file.
const FREELIST_PGID: u64 = 2;
/// First page free for tree pages.
const FIRST_DATA_PGID: u64 = 3;
/// Pages a leaf of large elements (over a quarter page) may span. One such element per page
/// would waste up to half of each page (a 4 KiB value fills two); packed back to back over
/// several pages only the last one is partly empty. bbolt reads and rewrites such leaves as it
/// does those it writes itself (it keeps at least two elements per node, whatever their size).
const LARGE_LEAF_PAGES: usize = 16;

/// What [`Writer::finish`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Pages in the file (bbolt's high-water mark).
    pub pages: u64,
    /// Size of the file in bytes (`pages × page size`).
    pub size_bytes: u64,
}

/// Where a database's pages fall: what its metas say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Page size of the file.
    pub page_size: usize,
    /// Page of the root bucket.
    pub root_pgid: u64,
    /// Pages in the file (bbolt's high-water mark).
    pub pages: u64,
}

impl Layout {
    /// Size of the file in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.pages * self.page_size as u64
    }

    /// Pages 0 to 2: both metas (as a fresh bbolt database, meta page i holds transaction i)
    /// and the empty freelist.
    fn head(&self) -> Vec<u8> {
        let page_size = self.page_size;
        let mut head = vec![0u8; FIRST_DATA_PGID as usize * page_size];
        for txid in 0..2u64 {
            let page = &mut head[txid as usize * page_size..];
            PageHeader {
                id: txid,
                flags: META_PAGE,
                count: 0,
                overflow: 0,
            }
            .encode(page);
            let meta = Meta {
                page_size: page_size as u32,
                flags: 0,
                root: self.root_pgid,
                root_sequence: 0,
                freelist: FREELIST_PGID,
                pgid: self.pages,
                txid,
            };
            page[PAGE_HEADER_SIZE..PAGE_HEADER_SIZE + META_SIZE].copy_from_slice(&meta.encode());
        }
        PageHeader {
            id: FREELIST_PGID,
            flags: FREELIST_PAGE,
            count: 0,
            overflow: 0,
        }
        .encode(&mut head[FREELIST_PGID as usize * page_size..]);
        head
    }
}

/// The first pass of a streamed database: runs `fill` on a writer that keeps no pages and
/// returns the layout the same buckets will have.
pub fn plan<E: From<Error>>(
    page_size: usize,
    fill: impl FnOnce(&mut Writer<&mut dyn Write>) -> Result<(), E>,
) -> Result<Layout, E> {
    let mut discard = std::io::sink();
    let mut w = Writer::tree_pages(&mut discard as &mut dyn Write, page_size)?;
    w.sink.plan_only = true;
    fill(&mut w)?;
    Ok(w.finish_tree()?.1)
}

/// The second pass: writes the metas and freelist for `layout`, then the pages `fill` gives,
/// which must be the buckets [`plan`] was given (else [`Error::Invalid`]: the data changed
/// between the passes). `out` needs no seeking.
pub fn emit<E: From<Error>>(
    out: &mut dyn Write,
    layout: Layout,
    fill: impl FnOnce(&mut Writer<&mut dyn Write>) -> Result<(), E>,
) -> Result<Written, E> {
    out.write_all(&layout.head()).map_err(Error::from)?;
    let mut w = Writer::tree_pages(out, layout.page_size)?;
    fill(&mut w)?;
    let (out, written) = w.finish_tree()?;
    if written != layout {
        return Err(Error::Invalid(format!(
            "the buckets changed between the two passes: planned {layout:?}, wrote {written:?}"
        ))
        .into());
    }
    out.flush().map_err(Error::from)?;
    Ok(Written {
        pages: written.pages,
        size_bytes: written.size_bytes(),
    })
}

/// Streams a bbolt database to `out`: call [`Writer::bucket`] for each top-level bucket in name
/// order, [`Writer::put`] for its keys in key order, then [`Writer::finish`].
pub struct Writer<W: Write> {
    sink: Sink<W>,
    /// Finished top-level buckets: name and bucket value (header, inline page if inline).
    root: Vec<(Vec<u8>, Vec<u8>)>,
    current: Option<(Vec<u8>, Tree)>,
}

impl<W: Write + Seek> Writer<W> {
    /// A writer of pages of `page_size` bytes (a power of two, 1 KiB to 64 KiB) into `out`,
    /// which must be empty and positioned at its start.
    pub fn new(mut out: W, page_size: usize) -> Result<Self, Error> {
        check_page_size(page_size)?;
        // Metas and freelist are written last; reserve their pages.
        out.write_all(&vec![0u8; FIRST_DATA_PGID as usize * page_size])?;
        Self::tree_pages(out, page_size)
    }

    /// Ends the last bucket, writes the root bucket, the freelist and both metas, and returns
    /// `out` (positioned at the end of the database) with what was written.
    pub fn finish(self) -> Result<(W, Written), Error> {
        let (mut out, layout) = self.finish_tree()?;
        out.seek(SeekFrom::Start(0))?;
        out.write_all(&layout.head())?;
        let size_bytes = layout.size_bytes();
        out.seek(SeekFrom::Start(size_bytes))?;
        out.flush()?;
        Ok((
            out,
            Written {
                pages: layout.pages,
                size_bytes,
            },
        ))
    }
}

impl<W: Write> Writer<W> {
    /// A writer whose `out` receives the tree pages only, from page 3 on.
    fn tree_pages(out: W, page_size: usize) -> Result<Self, Error> {
        check_page_size(page_size)?;
        Ok(Self {
            sink: Sink {
                out,
                page_size,
                next_pgid: FIRST_DATA_PGID,
                plan_only: false,
            },
            root: Vec::new(),
            current: None,
        })
    }

    /// Starts the top-level bucket `name`, ending the previous one. Names must be ascending.
    pub fn bucket(&mut self, name: &[u8]) -> Result<(), Error> {
        let last = self
            .current
            .as_ref()
            .map(|(n, _)| n.as_slice())
            .or_else(|| self.root.last().map(|(n, _)| n.as_slice()));
        check_key(name, last)?;
        self.end_bucket()?;
        self.current = Some((name.to_vec(), Tree::default()));
        Ok(())
    }

    /// Adds `key` = `value` to the current bucket. Keys must be ascending within a bucket.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), Error> {
        let Some((_, tree)) = self.current.as_mut() else {
            return Err(Error::Invalid("put before the first bucket".into()));
        };
        check_key(key, tree.last_key())?;
        if value.len() > MAX_VALUE_SIZE {
            return Err(Error::Invalid(format!(
                "value of {} bytes is larger than bbolt's maximum",
                value.len()
            )));
        }
        tree.add(&mut self.sink, key.to_vec(), value.to_vec(), 0)
    }

    fn end_bucket(&mut self) -> Result<(), Error> {
        if let Some((name, tree)) = self.current.take() {
            let value = tree.finish_bucket(&mut self.sink)?;
            self.root.push((name, value));
        }
        Ok(())
    }

    /// Ends the last bucket and writes the root bucket's pages; returns `out` and the layout.
    fn finish_tree(mut self) -> Result<(W, Layout), Error> {
        self.end_bucket()?;
        let mut root = Tree::default();
        for (name, value) in std::mem::take(&mut self.root) {
            root.add(&mut self.sink, name, value, BUCKET_LEAF_FLAG)?;
        }
        let root_pgid = root.finish_tree(&mut self.sink)?;
        let Sink {
            out,
            page_size,
            next_pgid: pages,
            ..
        } = self.sink;
        Ok((
            out,
            Layout {
                page_size,
                root_pgid,
                pages,
            },
        ))
    }
}

fn check_page_size(page_size: usize) -> Result<(), Error> {
    if !page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
        return Err(Error::Invalid(format!("invalid page size {page_size}")));
    }
    Ok(())
}

fn check_key(key: &[u8], last: Option<&[u8]>) -> Result<(), Error> {
    if key.is_empty() {
        return Err(Error::Invalid("empty key".into()));
    }
    if key.len() > MAX_KEY_SIZE {
        return Err(Error::Invalid(format!(
            "key of {} bytes is larger than bbolt's maximum",
            key.len()
        )));
    }
    if last.is_some_and(|last| last >= key) {
        return Err(Error::Invalid(format!(
            "key {:?} not after the previous one",
            String::from_utf8_lossy(key)
        )));
    }
    Ok(())
}

struct Sink<W> {
    out: W,
    page_size: usize,
    next_pgid: u64,
    /// Only count pages ([`plan`]): their bytes are not made.
    plan_only: bool,
}

impl<W: Write> Sink<W> {
    /// Writes a page (header, then `body()`, `body_len` bytes) at the next page id, spanning as
    /// many pages as it needs, and returns its id.
    fn write_page(
        &mut self,
        flags: u16,
        count: usize,
        body_len: usize,
        body: impl FnOnce() -> Vec<u8>,
    ) -> Result<u64, Error> {
        let id = self.next_pgid;
        let len = PAGE_HEADER_SIZE + body_len;
        let pages = len.div_ceil(self.page_size).max(1);
        self.next_pgid += pages as u64;
        if self.plan_only {
            return Ok(id);
        }
        let body = body();
        debug_assert_eq!(body.len(), body_len);
        let mut page = vec![0u8; pages * self.page_size];
        PageHeader {
            id,
            flags,
            count: u16::try_from(count)
                .map_err(|_| Error::Invalid("too many elements for a page".into()))?,
            overflow: (pages - 1) as u32,
        }
        .encode(&mut page);
        page[PAGE_HEADER_SIZE..len].copy_from_slice(&body);
        self.out.write_all(&page)?;
        Ok(id)
    }
}

/// A leaf page's elements and data, after its header. `pos` counts from each element's start.
fn leaf_body(items: &[(Vec<u8>, Vec<u8>, u32)]) -> Vec<u8> {
    let elements = items.len() * LEAF_ELEMENT_SIZE;
    let data: usize = items.iter().map(|(k, v, _)| k.len() + v.len()).sum();
    let mut body = Vec::with_capacity(elements + data);
    let mut pos = elements;
    for (i, (k, v, flags)) in items.iter().enumerate() {
        body.extend_from_slice(&flags.to_le_bytes());
        body.extend_from_slice(&((pos - i * LEAF_ELEMENT_SIZE) as u32).to_le_bytes());
        body.extend_from_slice(&(k.len() as u32).to_le_bytes());
        body.extend_from_slice(&(v.len() as u32).to_le_bytes());
        pos += k.len() + v.len();
    }
    for (k, v, _) in items {
        body.extend_from_slice(k);
        body.extend_from_slice(v);
    }
    body
}

/// A branch page's elements and keys, after its header.
fn branch_body(children: &[(Vec<u8>, u64)]) -> Vec<u8> {
    let elements = children.len() * BRANCH_ELEMENT_SIZE;
    let mut body =
        Vec::with_capacity(elements + children.iter().map(|(k, _)| k.len()).sum::<usize>());
    let mut pos = elements;
    for (i, (k, pgid)) in children.iter().enumerate() {
        body.extend_from_slice(&((pos - i * BRANCH_ELEMENT_SIZE) as u32).to_le_bytes());
        body.extend_from_slice(&(k.len() as u32).to_le_bytes());
        body.extend_from_slice(&pgid.to_le_bytes());
        pos += k.len();
    }
    for (k, _) in children {
        body.extend_from_slice(k);
    }
    body
}

/// One bucket's B+tree being built bottom-up, as its keys arrive: a leaf is written when full,
/// and its first key and page id go to the branch level above, whose page is written when full
/// in turn. Memory is one page per level, whatever the bucket's size.
#[derive(Default)]
struct Tree {
    /// The leaf being filled: key, value, leaf flags.
    leaf: Vec<(Vec<u8>, Vec<u8>, u32)>,
    /// Bytes of `leaf`'s elements and data.
    leaf_bytes: usize,
    /// The branch page being filled at each level, leaves' parents first.
    levels: Vec<Level>,
    /// The last key added, once its leaf is written.
    last_written: Option<Vec<u8>>,
}

/// A branch page being filled.
#[derive(Default)]
struct Level {
    /// Children: first key and page id.
    children: Vec<(Vec<u8>, u64)>,
    /// Bytes of their elements and keys.
    bytes: usize,
    /// Whether a page of this level was written already.
    written: bool,
}

impl Tree {
    fn last_key(&self) -> Option<&[u8]> {
        self.leaf
            .last()
            .map(|(k, _, _)| k.as_slice())
            .or(self.last_written.as_deref())
    }

    fn add<W: Write>(
        &mut self,
        sink: &mut Sink<W>,
        key: Vec<u8>,
        value: Vec<u8>,
        flags: u32,
    ) -> Result<(), Error> {
        let size = LEAF_ELEMENT_SIZE + key.len() + value.len();
        let limit = if size > sink.page_size / 4 {
            LARGE_LEAF_PAGES * sink.page_size
        } else {
            sink.page_size
        };
        if !self.leaf.is_empty() && PAGE_HEADER_SIZE + self.leaf_bytes + size > limit {
            self.write_leaf(sink)?;
        }
        self.leaf_bytes += size;
        self.leaf.push((key, value, flags));
        Ok(())
    }

    fn write_leaf<W: Write>(&mut self, sink: &mut Sink<W>) -> Result<(), Error> {
        let items = std::mem::take(&mut self.leaf);
        let id = sink.write_page(LEAF_PAGE, items.len(), self.leaf_bytes, || {
            leaf_body(&items)
        })?;
        let first = items.first().map(|(k, _, _)| k.clone()).unwrap_or_default();
        self.last_written = items.into_iter().last().map(|(k, _, _)| k);
        self.leaf_bytes = 0;
        self.add_child(sink, 0, first, id)
    }

    /// Adds a written page to the branch page being filled at `level`, writing that one first
    /// when the child would not fit.
    fn add_child<W: Write>(
        &mut self,
        sink: &mut Sink<W>,
        level: usize,
        key: Vec<u8>,
        pgid: u64,
    ) -> Result<(), Error> {
        if self.levels.len() == level {
            self.levels.push(Level::default());
        }
        let size = BRANCH_ELEMENT_SIZE + key.len();
        let node = &self.levels[level];
        // at least two children per branch, or long keys would never shrink the level
        if node.children.len() >= 2 && PAGE_HEADER_SIZE + node.bytes + size > sink.page_size {
            self.write_branch(sink, level)?;
        }
        let node = &mut self.levels[level];
        node.bytes += size;
        node.children.push((key, pgid));
        Ok(())
    }

    /// Writes the branch page being filled at `level` and adds it to the level above.
    fn write_branch<W: Write>(&mut self, sink: &mut Sink<W>, level: usize) -> Result<(), Error> {
        let node = &mut self.levels[level];
        let children = std::mem::take(&mut node.children);
        let bytes = std::mem::take(&mut node.bytes);
        node.written = true;
        let id = sink.write_page(BRANCH_PAGE, children.len(), bytes, || {
            branch_body(&children)
        })?;
        let first = children
            .into_iter()
            .next()
            .map(|(k, _)| k)
            .unwrap_or_default();
        self.add_child(sink, level + 1, first, id)
    }

    /// The bucket's value in its parent: inline (as bbolt stores a bucket whose single leaf
    /// fits in a quarter page), or a header pointing at the tree's root page.
    fn finish_bucket<W: Write>(self, sink: &mut Sink<W>) -> Result<Vec<u8>, Error> {
        let inline = self.levels.is_empty()
            && PAGE_HEADER_SIZE + self.leaf_bytes <= sink.page_size / 4
            && self.leaf.iter().all(|(_, _, f)| f & BUCKET_LEAF_FLAG == 0);
        let mut value = vec![0u8; BUCKET_HEADER_SIZE];
        if inline {
            let mut page = vec![0u8; PAGE_HEADER_SIZE];
            PageHeader {
                id: 0,
                flags: LEAF_PAGE,
                count: self.leaf.len() as u16,
                overflow: 0,
            }
            .encode(&mut page);
            value.extend_from_slice(&page);
            value.extend_from_slice(&leaf_body(&self.leaf));
        } else {
            let root = self.finish_tree(sink)?;
            value[0..8].copy_from_slice(&root.to_le_bytes());
        }
        Ok(value)
    }

    /// Writes the last leaf and what is left of each branch level; returns the root page: the
    /// only child of the top level when that level never filled a page.
    fn finish_tree<W: Write>(mut self, sink: &mut Sink<W>) -> Result<u64, Error> {
        if !self.leaf.is_empty() || self.levels.is_empty() {
            self.write_leaf(sink)?;
        }
        let mut level = 0;
        loop {
            let node = &self.levels[level];
            if level + 1 == self.levels.len() && !node.written && node.children.len() == 1 {
                return Ok(node.children[0].1);
            }
            self.write_branch(sink, level)?;
            level += 1;
        }
    }
}
