//! The guest-data view: what the guest sees, read straight from the image
//! file(s). Read-only, like [`crate::read`].
//!
//! A [`Chain`] is an image with its whole backing chain (qcow2 over qcow2
//! or raw, any depth) and external data files, every member opened with
//! QEMU's reader locks. A [`Reader`] over it answers the two questions
//! backup software asks, both streaming with bounded memory:
//! - [`Reader::map`]: block status over a range (data / zero / unallocated,
//!   depth in the chain, host offset, compressed), merged exactly as
//!   `qemu-img map` merges;
//! - [`Reader::read_at`]: the guest bytes at any offset and length
//!   (contiguous host runs in one `pread`, compressed clusters decompressed
//!   into a reused buffer, on all cores for long reads).
//!
//! ```
//! use qcow2_bitmap::guest::Chain;
//! use qcow2_bitmap::lock::Access;
//!
//! # fn main() -> qcow2_bitmap::Result<()> {
//! let chain = Chain::open("fixtures/guest/cs64k.qcow2".as_ref(), Access::Read)?;
//! let mut reader = chain.reader();
//! let mut data = 0;
//! for entry in reader.map(0, chain.virtual_size())? {
//!     let entry = entry?;
//!     if entry.data {
//!         data += entry.length;
//!     }
//! }
//! let mut first = vec![0u8; 4096];
//! reader.read_at(0, &mut first)?;
//! # assert!(data > 0);
//! # Ok(())
//! # }
//! ```
//!
//! Nothing read from the file is trusted: see [`layer`] for what is
//! validated and refused where QEMU would silently read zeros.

mod cache;
pub mod chain;
mod compressed;
mod data;
pub mod layer;
mod meta;
mod prealloc;
mod seek;
mod status;

pub use chain::{Backing, DataFileInfo, Format, Member, OpenOptions};
pub use status::{MapCursor, MapEntry, MapIter, Status};

use crate::error::{Error, Result};
use crate::lock::Access;
use cache::L2Cache;
use compressed::Decompressor;
use std::path::Path;

/// An image and its backing chain, opened read-only.
#[derive(Debug)]
pub struct Chain {
    members: Vec<Member>,
    /// Unique per opened chain in this process: a [`ReaderState`] is only
    /// resumed on the chain it was made on.
    id: u64,
}

/// Source of [`Chain`] ids.
static NEXT_CHAIN_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Chain {
    /// Opens `path` (format probed: qcow2 magic, else raw) and every member
    /// of its backing chain with the locks of `access`.
    ///
    /// # Errors
    /// See [`chain::open_members`].
    pub fn open(path: &Path, access: Access) -> Result<Chain> {
        Self::open_with(path, OpenOptions::new(access))
    }

    /// Opens with explicit options.
    ///
    /// # Errors
    /// See [`chain::open_members`].
    pub fn open_with(path: &Path, opts: OpenOptions) -> Result<Chain> {
        let members = chain::open_members(path, &opts)?;
        let id = NEXT_CHAIN_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Chain { members, id })
    }

    /// The members, top (depth 0) first.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The guest's disk size: the top's virtual size.
    pub fn virtual_size(&self) -> u64 {
        self.members[0].virtual_size
    }

    /// The file name QEMU prints for host offsets of the member at `depth`:
    /// its external data file's name when it has one, else its path.
    pub fn host_file_name(&self, depth: usize) -> String {
        match self.members.get(depth) {
            Some(m) => match &m.data_file {
                Some(d) => d.name.clone(),
                None => m.path.display().to_string(),
            },
            None => String::new(),
        }
    }

    /// A reader with its own caches (one per thread).
    pub fn reader(&self) -> Reader<'_> {
        Reader {
            chain: self,
            cache: L2Cache::new(),
            decompressor: Decompressor::new(),
            cluster: Vec::new(),
            cached: None,
            prealloc: Vec::new(),
        }
    }

    /// A reader that keeps the caches of an earlier reader of this chain
    /// ([`Reader::into_state`]); a state from another chain is dropped and
    /// the reader starts empty.
    pub fn resume(&self, state: ReaderState) -> Reader<'_> {
        if state.chain_id != self.id {
            return self.reader();
        }
        Reader {
            chain: self,
            cache: state.cache,
            decompressor: state.decompressor,
            cluster: state.cluster,
            cached: state.cached,
            prealloc: state.prealloc,
        }
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<u64> {
        let size = self.virtual_size();
        match offset.checked_add(length) {
            Some(end) if end <= size => Ok(end),
            _ => Err(Error::invalid_input(
                format!("guest range {offset}+{length}"),
                format!("runs past the virtual size ({size} bytes)"),
            )),
        }
    }
}

/// Reads a [`Chain`]: block status and guest bytes, with a bounded L2
/// cache and one reused decompression buffer.
#[derive(Debug)]
pub struct Reader<'c> {
    chain: &'c Chain,
    cache: L2Cache,
    decompressor: Decompressor,
    /// The last decompressed cluster, and which one it is (depth, host offset).
    cluster: Vec<u8>,
    cached: Option<(usize, u64)>,
    /// Per depth: whether QEMU would take the member as metadata-preallocated.
    prealloc: Vec<Option<bool>>,
}

/// The caches of a [`Reader`] without its borrow of the chain, to keep
/// them between calls by a caller that cannot hold the borrow (the Python
/// bindings); see [`Chain::resume`].
#[derive(Debug)]
pub struct ReaderState {
    chain_id: u64,
    cache: L2Cache,
    decompressor: Decompressor,
    cluster: Vec<u8>,
    cached: Option<(usize, u64)>,
    prealloc: Vec<Option<bool>>,
}

impl<'c> Reader<'c> {
    /// The caches, to resume with [`Chain::resume`] on the same chain.
    pub fn into_state(self) -> ReaderState {
        ReaderState {
            chain_id: self.chain.id,
            cache: self.cache,
            decompressor: self.decompressor,
            cluster: self.cluster,
            cached: self.cached,
            prealloc: self.prealloc,
        }
    }

    /// The chain this reader reads.
    pub fn chain(&self) -> &'c Chain {
        self.chain
    }

    /// L2 tables read from the files so far (each at most once while it stays cached).
    pub fn l2_loads(&self) -> u64 {
        self.cache.loads()
    }
}
