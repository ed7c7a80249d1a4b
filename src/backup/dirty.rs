//! The dirty data of a bitmap, for backup programs that keep their own
//! storage (a chunk store, object storage): each dirty range split into
//! data (with its bytes, in one reused buffer) and zeros (a TRIM or zero
//! write since the checkpoint: store zeros, never skip them).

use super::units::{self, Mode, Unit, What};
use crate::error::Result;
use crate::guest::{Chain, Reader};
use crate::read::Image;
use crate::storage::ReadAt;
use std::collections::VecDeque;

/// One piece of dirty guest data.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Guest bytes at `offset`.
    Data {
        /// First guest byte.
        offset: u64,
        /// The bytes (borrowed from the iterator's buffer).
        bytes: &'a [u8],
    },
    /// `len` bytes at `offset` read as zeros.
    Zero {
        /// First guest byte.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// A lending iterator over the dirty data of one bitmap; see
/// [`DirtyData::next_piece`].
#[derive(Debug)]
pub struct DirtyData<'c> {
    reader: Reader<'c>,
    ranges: std::vec::IntoIter<(u64, u64)>,
    queue: VecDeque<Unit>,
    buf: Vec<u8>,
}

impl<'c> DirtyData<'c> {
    /// The dirty data of bitmap `name` of `image`, read through `chain`
    /// (the same image opened as a guest view), in pieces of at most
    /// `chunk` bytes (at least 4 KiB).
    ///
    /// # Errors
    /// A missing bitmap; `Untrusted` for a bitmap whose state is not `ok`
    /// (a full backup is needed); a bitmap image of another size.
    pub fn new<S: ReadAt>(
        chain: &'c Chain,
        image: &Image<S>,
        name: &str,
        chunk: usize,
    ) -> Result<Self> {
        let (_, ranges) = super::dirty_ranges(image, name, &None, chain.virtual_size())?;
        Ok(DirtyData {
            reader: chain.reader(),
            ranges: ranges.into_iter(),
            queue: VecDeque::new(),
            buf: vec![0; chunk.max(4096)],
        })
    }

    /// The next piece, `None` at the end. Data pieces borrow the buffer
    /// until the next call.
    ///
    /// # Errors
    /// Metadata and I/O errors of the guest view.
    pub fn next_piece(&mut self) -> Result<Option<Piece<'_>>> {
        while self.queue.is_empty() {
            let Some(range) = self.ranges.next() else {
                return Ok(None);
            };
            let queue = &mut self.queue;
            units::walk(
                &mut self.reader,
                std::iter::once(Ok(range)),
                None,
                Mode::Everything,
                |_, u| {
                    queue.push_back(u);
                    Ok(())
                },
            )?;
        }
        let Some(u) = self.queue.pop_front() else {
            return Ok(None);
        };
        match u.what {
            What::Zero | What::Hole => Ok(Some(Piece::Zero {
                offset: u.offset,
                len: u.len,
            })),
            What::Data => {
                let n = u.len.min(self.buf.len() as u64);
                if n < u.len {
                    self.queue.push_front(Unit {
                        offset: u.offset + n,
                        len: u.len - n,
                        what: What::Data,
                    });
                }
                let bytes = &mut self.buf[..n as usize];
                self.reader.read_at(u.offset, bytes)?;
                Ok(Some(Piece::Data {
                    offset: u.offset,
                    bytes,
                }))
            }
        }
    }
}
