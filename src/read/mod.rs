//! The read path: open an image, walk its bitmaps extension and directory,
//! and read one bitmap at a time. Nothing here writes to the image.
//!
//! [`Image::open`] fails only when the image itself cannot be understood
//! (bad magic, a header field QEMU rejects, an extension area QEMU rejects).
//! Problems in the bitmaps extension or directory are recorded, not raised,
//! so that one bad entry never hides the others: see [`Image::bitmaps`].
//! Tables and data are read lazily, bitmap by bitmap ([`Image::table`],
//! [`Image::extents`], [`Image::load`], [`Image::sha256`]).

mod bitmaps;
mod check;
mod extents;
mod hash;
mod lint;
mod open;
pub mod refcheck;
mod survey;

pub use bitmaps::{BitmapEntry, BitmapState, BitmapStatus, Table, expected_dimensions};
pub use check::{CheckReport, Verdict};
pub use extents::{Extent, ExtentCursor, Extents, Gaps, Run};
pub use hash::hex;
pub use lint::{Finding, Severity};
pub use open::open_path;
pub use refcheck::{RefcountReport, refcount_check};
pub use survey::Survey;

use crate::error::{Error, ErrorKind, Result};
use crate::format::bitmaps_ext::BitmapsExt;
use crate::format::directory::{self, Directory};
use crate::format::ext_type;
use crate::format::extensions::{self, BitmapsLength, Extension, LengthReading};
use crate::format::header::Header;
use crate::storage::ReadAt;
use crate::types::Geometry;

/// An opened qcow2 image, read-only.
#[derive(Debug)]
pub struct Image<S> {
    storage: S,
    header: Header,
    extensions: Vec<Extension>,
    end_marker: Option<u64>,
    bitmaps_length: Option<BitmapsLength>,
    bitmaps: BitmapsView,
}

/// What the bitmaps extension and directory hold.
#[derive(Debug, Default)]
pub struct BitmapsView {
    /// The decoded extension and the file offset of its data, if present.
    pub extension: Option<(BitmapsExt, u64)>,
    /// An extension- or directory-level problem (the directory may be partly or not at all walked).
    pub problem: Option<Error>,
    /// Entries found, in directory order.
    pub entries: Vec<BitmapEntry>,
}

impl<S: ReadAt> Image<S> {
    /// Opens an image from positional storage.
    ///
    /// # Errors
    /// Fails when the header or extension area is unusable; bitmap-level
    /// problems are reported through [`Image::bitmaps`] instead.
    pub fn open(storage: S) -> Result<Self> {
        let header = read_header(&storage)?;
        let (start, end) = (
            header.extensions_start(),
            header.extensions_end().min(storage.len()),
        );
        let area_len = usize::try_from(end.saturating_sub(start)).unwrap_or(0);
        let mut scratch = Vec::new();
        let area_bytes = storage
            .read_at(start, area_len, &mut scratch)
            .map_err(|e| Error::io("header extension area", Some(start), e))?;
        let area = extensions::decode_area(area_bytes, start)?;
        let mut image = Image {
            storage,
            header,
            extensions: area.extensions,
            end_marker: area.end_marker,
            bitmaps_length: area.bitmaps_length,
            bitmaps: BitmapsView::default(),
        };
        image.bitmaps = image.load_bitmaps_view();
        Ok(image)
    }

    /// The decoded header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The image's cluster geometry.
    pub fn geometry(&self) -> Geometry {
        self.header.geometry()
    }

    /// Virtual disk size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.header.size
    }

    /// Header extensions in file order (unknown ones included).
    pub fn extensions(&self) -> &[Extension] {
        &self.extensions
    }

    /// File offset of the extension area's end marker, if there is one.
    pub fn end_marker(&self) -> Option<u64> {
        self.end_marker
    }

    /// The bitmaps extension's length field when it is not 24, and how the
    /// extension area was read past it (see [`extensions::decode_area`]).
    pub fn bitmaps_length(&self) -> Option<BitmapsLength> {
        self.bitmaps_length
    }

    /// The underlying storage.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// Gives the storage back (with the locks its file holds).
    pub fn into_storage(self) -> S {
        self.storage
    }

    /// Whether the bitmaps may be trusted at all: autoclear bit 0 set on a v3 image.
    pub fn bitmaps_consistent(&self) -> bool {
        self.header.bitmaps_consistent()
    }

    /// The bitmaps extension, its problems and the directory entries.
    pub fn bitmaps_view(&self) -> &BitmapsView {
        &self.bitmaps
    }

    /// Directory entries in order, each with its directory-level state.
    pub fn bitmaps(&self) -> &[BitmapEntry] {
        &self.bitmaps.entries
    }

    /// The first bitmap called `name`.
    ///
    /// # Errors
    /// `NotFound` when no entry has that name.
    pub fn find(&self, name: &str) -> Result<&BitmapEntry> {
        self.bitmaps()
            .iter()
            .find(|b| b.entry.name == name.as_bytes())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("bitmap '{name}'"),
                    None,
                    "not found in the image",
                )
            })
    }

    fn load_bitmaps_view(&self) -> BitmapsView {
        let found: Vec<&Extension> = self
            .extensions
            .iter()
            .filter(|e| e.kind == ext_type::BITMAPS)
            .collect();
        let Some(ext) = found.first() else {
            return BitmapsView::default();
        };
        let data_offset = ext.offset + 8;
        // (A wrong length on a later duplicate is covered by "appears N times".)
        let length = self.bitmaps_length.filter(|l| l.offset == ext.offset);
        let length_problem = length.map(length_problem);
        if length.is_some_and(|l| l.reading != LengthReading::Fixed) {
            return BitmapsView {
                problem: length_problem,
                ..Default::default()
            };
        }
        let decoded = match BitmapsExt::decode(&ext.data, data_offset) {
            Ok(d) => d,
            Err(e) => {
                return BitmapsView {
                    problem: Some(e),
                    ..Default::default()
                };
            }
        };
        let mut view = BitmapsView {
            extension: Some((decoded, data_offset)),
            problem: length_problem,
            ..Default::default()
        };
        if let Err(e) = decoded.validate(self.geometry(), data_offset) {
            view.problem = view.problem.take().or(Some(e));
            // A wrong count or reserved field does not stop the walk: the
            // entries are still listed so that nothing readable is lost.
            if !self.directory_walkable(&decoded) {
                return view;
            }
        }
        match self.read_directory(&decoded) {
            Ok(dir) => {
                view.problem = view.problem.take().or(dir.problem);
                view.entries = bitmaps::classify(dir.entries, self);
            }
            Err(e) => view.problem = view.problem.take().or(Some(e)),
        }
        if view.problem.is_none() && found.len() > 1 {
            let msg = format!("appears {} times; only the first is used", found.len());
            view.problem = Some(Error::corrupt("bitmaps extension", found[1].offset, msg));
        }
        view
    }

    /// Whether the directory location itself is sound (offset and size).
    fn directory_walkable(&self, ext: &BitmapsExt) -> bool {
        let off = ext.directory_offset;
        off != 0
            && self.geometry().is_aligned(off)
            && ext.directory_size > 0
            && ext.directory_size <= crate::format::limits::MAX_DIRECTORY_SIZE
    }

    fn read_directory(&self, ext: &BitmapsExt) -> Result<Directory> {
        // validate() bounded the size by 64 MiB, so it fits in usize.
        let len = usize::try_from(ext.directory_size).unwrap_or(usize::MAX);
        let mut scratch = Vec::new();
        let bytes = self
            .storage
            .read_at(ext.directory_offset, len, &mut scratch)
            .map_err(|e| Error::io("bitmap directory", Some(ext.directory_offset), e))?;
        Ok(directory::walk(bytes, ext.directory_offset, ext.nb_bitmaps))
    }
}

/// The problem of a bitmaps extension whose length field is not 24.
fn length_problem(l: BitmapsLength) -> Error {
    let how = match l.reading {
        LengthReading::Fixed => {
            "the extension has a fixed size and the extensions after its 24 bytes parse, so only the length field is wrong"
        }
        LengthReading::Declared => {
            "the extensions after its 24 bytes do not parse, only those after the declared length do: the extension cannot be read"
        }
        LengthReading::Unparsed => {
            "neither the 24 bytes the extension must hold nor the declared length leaves an extension chain that parses: the rest of the extension area cannot be read"
        }
    };
    let msg = format!("{} is not 24 ({how})", l.declared);
    Error::corrupt("bitmaps extension length", l.offset + 4, msg)
}

fn read_header<S: ReadAt>(storage: &S) -> Result<Header> {
    // The header is at most one cluster (validated below); 2 MiB bounds the read.
    let len = usize::try_from(storage.len().min(2 << 20)).unwrap_or(0);
    let mut scratch = Vec::new();
    let bytes = storage
        .read_at(0, len, &mut scratch)
        .map_err(|e| Error::io("qcow2 header", Some(0), e))?;
    Header::decode(bytes)
}

#[cfg(test)]
mod testimage;

#[cfg(test)]
mod tests;
