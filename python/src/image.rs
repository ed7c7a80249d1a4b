//! `open()` and `Image`: bitmaps, extents, hash, map, guest reads, check.
//!
//! An `Image` holds the read-only image (QEMU's reader locks, taken at
//! `open`) and, from the first `map`/`read`/`backing_chain`, its backing
//! chain (each member locked the same way). `close()` or the end of the
//! `with` block drops both, which releases every lock; an iterator still
//! alive then raises `ClosedError`.

use crate::errors::{IntoPy, closed, invalid};
use crate::to_py;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use qcow2_bitmap::guest::{Chain, MapCursor, MapEntry, ReaderState};
use qcow2_bitmap::lock::Access;
use qcow2_bitmap::read::{self, ExtentCursor, Gaps};
use qcow2_bitmap::report::{BitmapRow, CheckDoc, InfoDoc};
use qcow2_bitmap::storage::MappedFile;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// Extents or map entries fetched per trip into Rust (GIL released).
const BATCH: usize = 4096;

/// Largest `read()` in one call: a bytes object is allocated up front.
pub const MAX_READ: u64 = 1 << 30;

/// Locks a mutex, ignoring poisoning (no panic leaves state half-changed here).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An open image and what is opened lazily beside it.
pub(crate) struct Inner {
    path: PathBuf,
    access: Access,
    image: read::Image<MappedFile>,
    chain: Mutex<Option<Arc<Chain>>>,
    /// The caches of the last guest reader, kept between calls.
    reader: Mutex<Option<ReaderState>>,
}

impl Inner {
    /// The backing chain, opened on first use.
    fn chain(&self) -> qcow2_bitmap::Result<Arc<Chain>> {
        let mut slot = lock(&self.chain);
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        let c = Chain::open(&self.path, self.access).map_err(|e| e.context(self.path.display()))?;
        let c = Arc::new(c);
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Runs `f` with a reader of the chain that keeps its caches across calls.
    fn with_reader<T>(
        &self,
        chain: &Chain,
        f: impl FnOnce(&mut qcow2_bitmap::guest::Reader<'_>) -> T,
    ) -> T {
        let state = lock(&self.reader).take();
        let mut reader = match state {
            Some(s) => chain.resume(s),
            None => chain.reader(),
        };
        let out = f(&mut reader);
        *lock(&self.reader) = Some(reader.into_state());
        out
    }

    fn find(&self, name: &str) -> qcow2_bitmap::Result<&read::BitmapEntry> {
        self.image
            .find(name)
            .map_err(|e| e.context(self.path.display()))
    }

    /// `[offset, offset + length)` with the CLI's defaults: from 0, to the end.
    fn range(&self, offset: Option<u64>, length: Option<u64>) -> PyResult<(u64, u64)> {
        range_of(self.image.virtual_size(), offset, length)
    }
}

fn range_of(size: u64, offset: Option<u64>, length: Option<u64>) -> PyResult<(u64, u64)> {
    let offset = offset.unwrap_or(0);
    let length = match length {
        Some(l) => l,
        None => size.checked_sub(offset).ok_or_else(|| {
            invalid(
                "offset",
                format!("{offset} is past the virtual size {size}"),
            )
        })?,
    };
    match offset.checked_add(length) {
        Some(end) if end <= size => Ok((offset, length)),
        _ => Err(invalid(
            "range",
            format!("offset {offset} + length {length} goes past the virtual size {size}"),
        )),
    }
}

/// Opens a qcow2 image read-only with QEMU's reader locks (`force_share`:
/// like `-U`, never refused by a writer, and the answers may be stale).
///
/// Use it as a context manager: the locks are released when the block ends.
#[pyfunction]
#[pyo3(signature = (path, force_share = false))]
pub fn open(py: Python<'_>, path: PathBuf, force_share: bool) -> PyResult<Image> {
    let access = if force_share {
        Access::ReadForceShare
    } else {
        Access::Read
    };
    let image = py
        .detach(|| read::open_path(&path, access).map_err(|e| e.context(path.display())))
        .py()?;
    let shown = path.display().to_string();
    Ok(Image {
        inner: Mutex::new(Some(Arc::new(Inner {
            path,
            access,
            image,
            chain: Mutex::new(None),
            reader: Mutex::new(None),
        }))),
        shown,
    })
}

/// A qcow2 image opened read-only (see `open`).
#[pyclass(module = "qcow2_bitmap", frozen)]
pub struct Image {
    /// `None` once closed. Held only for a moment (never across a wait for
    /// the GIL), so taking it with the GIL held cannot deadlock.
    inner: Mutex<Option<Arc<Inner>>>,
    shown: String,
}

impl Image {
    fn get(&self) -> PyResult<Arc<Inner>> {
        lock(&self.inner)
            .clone()
            .ok_or_else(|| closed(&format!("image {}", self.shown)))
    }
}

#[pymethods]
impl Image {
    /// The path as given to `open`.
    #[getter]
    fn filename(&self) -> String {
        self.shown.clone()
    }

    /// Guest disk size in bytes.
    #[getter]
    fn virtual_size(&self) -> PyResult<u64> {
        Ok(self.get()?.image.virtual_size())
    }

    /// Cluster size in bytes.
    #[getter]
    fn cluster_size(&self) -> PyResult<u64> {
        Ok(self.get()?.image.geometry().cluster_size())
    }

    /// qcow2 version (2 or 3).
    #[getter]
    fn version(&self) -> PyResult<u32> {
        Ok(self.get()?.image.header().version)
    }

    /// Whether `close()` was called (or the `with` block ended).
    #[getter]
    fn closed(&self) -> bool {
        lock(&self.inner).is_none()
    }

    /// The chain, top first: one dict per member with `filename`, `format`,
    /// `virtual-size`, and when present `cluster-size`, `backing-filename`,
    /// `backing-filename-format`, `full-backing-filename`, `data-file`,
    /// `data-file-raw`. Opens (and locks) the backing files on first use.
    #[getter]
    fn backing_chain<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let inner = self.get()?;
        let chain = py.detach(|| inner.chain()).py()?;
        let list = PyList::empty(py);
        for m in chain.members() {
            let d = PyDict::new(py);
            d.set_item("filename", m.path.display().to_string())?;
            d.set_item("format", m.format.name())?;
            d.set_item("virtual-size", m.virtual_size)?;
            if let Some(cs) = m.cluster_size() {
                d.set_item("cluster-size", cs)?;
            }
            if let Some(b) = &m.backing {
                d.set_item("backing-filename", &b.name)?;
                if let Some(f) = &b.format {
                    d.set_item("backing-filename-format", f)?;
                }
                d.set_item("full-backing-filename", b.full.display().to_string())?;
            }
            if let Some(df) = &m.data_file {
                d.set_item("data-file", &df.name)?;
                d.set_item("data-file-raw", df.raw)?;
            }
            list.append(d)?;
        }
        Ok(list)
    }

    /// Every bitmap, in directory order, with its verdict and dirty bytes
    /// (one pass over all bitmaps, as `info` does).
    #[getter]
    fn bitmaps(&self, py: Python<'_>) -> PyResult<Vec<Bitmap>> {
        let inner = self.get()?;
        let doc = py.detach(|| InfoDoc::gather(&inner.path, &inner.image, 0));
        Ok(doc.bitmaps.into_iter().map(Bitmap::from).collect())
    }

    /// The `info --json` document as a dict.
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let inner = self.get()?;
        let doc = py.detach(|| InfoDoc::gather(&inner.path, &inner.image, 0));
        to_py(py, &doc)
    }

    /// Lazily iterates `(offset, length, dirty)` over the bitmap's dirty
    /// extents in guest bytes (with `all`, the clean runs between them too),
    /// within `[offset, offset + length)`. `force` reads an untrusted bitmap.
    #[pyo3(signature = (name, offset = None, length = None, all = false, force = false))]
    fn extents(
        &self,
        py: Python<'_>,
        name: &str,
        offset: Option<u64>,
        length: Option<u64>,
        all: bool,
        force: bool,
    ) -> PyResult<ExtentIter> {
        let inner = self.get()?;
        let (lo, len) = inner.range(offset, length)?;
        let cursor = py
            .detach(|| {
                let b = inner.find(name)?;
                inner.image.extent_cursor(b, Some((lo, len)), force)
            })
            .py()?;
        Ok(ExtentIter {
            image: Arc::downgrade(&inner),
            cursor,
            gaps: all.then(|| Gaps::new(lo, lo + len)),
            buf: VecDeque::new(),
            error: None,
            done: false,
        })
    }

    /// The SHA-256 (hex) QEMU's `x-debug-block-dirty-bitmap-sha256` gives.
    #[pyo3(signature = (name, force = false))]
    fn hash(&self, py: Python<'_>, name: &str, force: bool) -> PyResult<String> {
        let inner = self.get()?;
        let digest = py
            .detach(|| inner.image.sha256(inner.find(name)?, force))
            .py()?;
        Ok(read::hex(&digest))
    }

    /// Lazily iterates the `qemu-img map --output=json` entries of the guest
    /// view as dicts (`start`, `length`, `depth`, `present`, `zero`, `data`,
    /// `compressed`, and `offset` when there is one).
    #[pyo3(signature = (offset = None, length = None))]
    fn map(&self, py: Python<'_>, offset: Option<u64>, length: Option<u64>) -> PyResult<MapIter> {
        let inner = self.get()?;
        let chain = py.detach(|| inner.chain()).py()?;
        let (lo, len) = range_of(chain.virtual_size(), offset, length)?;
        let cursor = chain.reader().map_cursor(lo, len).py()?;
        let mut buf = VecDeque::new();
        if chain.virtual_size() == 0 && offset.is_none() && length.is_none() {
            // As `qemu-img map` (and our CLI): one empty entry for a 0-byte disk.
            buf.push_back(MapEntry {
                start: 0,
                length: 0,
                depth: 0,
                present: false,
                zero: false,
                data: false,
                compressed: false,
                offset: None,
            });
        }
        Ok(MapIter {
            image: Arc::downgrade(&inner),
            cursor,
            buf,
            error: None,
            done: false,
        })
    }

    /// The guest bytes `[offset, offset + length)`, read through the whole
    /// backing chain (at most `MAX_READ` bytes per call).
    fn read<'py>(
        &self,
        py: Python<'py>,
        offset: u64,
        length: u64,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let inner = self.get()?;
        let chain = py.detach(|| inner.chain()).py()?;
        range_of(chain.virtual_size(), Some(offset), Some(length))?;
        if length > MAX_READ {
            return Err(invalid(
                "length",
                format!("{length} is more than one read returns ({MAX_READ}): read in pieces"),
            ));
        }
        // Checked above: at most 1 GiB.
        let n = usize::try_from(length).map_err(|_| invalid("length", "too large"))?;
        PyBytes::new_with(py, n, |buf| {
            py.detach(|| inner.with_reader(&chain, |r| r.read_at(offset, buf)))
                .py()
        })
    }

    /// The `check --json` document as a dict (refcounts as `qemu-img check`
    /// counts them, and every bitmap rule).
    fn check<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let inner = self.get()?;
        let report = py
            .detach(|| {
                inner
                    .image
                    .check()
                    .map_err(|e| e.context(inner.path.display()))
            })
            .py()?;
        to_py(py, &CheckDoc::new(&self.shown, &report))
    }

    /// Releases the image and its locks (idempotent).
    fn close(&self) {
        let taken = lock(&self.inner).take();
        drop(taken);
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.close();
        false
    }

    fn __repr__(&self) -> String {
        let state = if self.closed() { "closed" } else { "open" };
        format!("<qcow2_bitmap.Image {:?} ({state})>", self.shown)
    }
}

/// One bitmap of an image, as `info` reports it.
#[pyclass(module = "qcow2_bitmap", frozen, get_all)]
pub struct Bitmap {
    /// The name.
    name: String,
    /// Granularity in bytes.
    granularity: u64,
    /// `in-use` and `auto` when set.
    flags: Vec<String>,
    /// The `auto` flag: QEMU records writes into it.
    enabled: bool,
    /// `ok`, `in-use`, `stale` or `invalid`.
    state: String,
    /// Why the state is not `ok`.
    problem: Option<String>,
    /// Dirty bytes (None unless `ok`).
    dirty_bytes: Option<u64>,
    /// The bitmap table's file offset.
    table_offset: u64,
    /// The bitmap table's size in entries.
    table_size: u32,
}

impl From<BitmapRow> for Bitmap {
    fn from(r: BitmapRow) -> Self {
        Bitmap {
            enabled: r.flags.contains(&"auto"),
            flags: r.flags.iter().map(|f| f.to_string()).collect(),
            name: r.name,
            granularity: r.granularity,
            state: r.state.to_string(),
            problem: r.problem,
            dirty_bytes: r.dirty_bytes,
            table_offset: r.table_offset,
            table_size: r.table_size,
        }
    }
}

#[pymethods]
impl Bitmap {
    fn __repr__(&self) -> String {
        format!(
            "<qcow2_bitmap.Bitmap {:?} granularity={} state={} dirty_bytes={:?}>",
            self.name, self.granularity, self.state, self.dirty_bytes
        )
    }
}

/// The lazy iterator of `Image.extents`.
#[pyclass(module = "qcow2_bitmap")]
pub struct ExtentIter {
    image: Weak<Inner>,
    cursor: ExtentCursor,
    gaps: Option<Gaps>,
    buf: VecDeque<(u64, u64, bool)>,
    /// An error met while filling `buf`: raised once `buf` is drained.
    error: Option<qcow2_bitmap::Error>,
    done: bool,
}

impl ExtentIter {
    /// Fills `buf` with up to `BATCH` runs; `true` when the scan ended.
    fn fill(&mut self, inner: &Inner) -> qcow2_bitmap::Result<bool> {
        while self.buf.len() < BATCH {
            match self.cursor.next_extent(&inner.image)? {
                Some(e) => match &mut self.gaps {
                    Some(g) => {
                        let (gap, run) = g.dirty(e);
                        if let Some(gap) = gap {
                            self.buf.push_back((gap.offset, gap.length, false));
                        }
                        self.buf.push_back((run.offset, run.length, true));
                    }
                    None => self.buf.push_back((e.offset, e.length, true)),
                },
                None => {
                    if let Some(t) = self.gaps.as_mut().and_then(Gaps::finish) {
                        self.buf.push_back((t.offset, t.length, false));
                    }
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}

#[pymethods]
impl ExtentIter {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<(u64, u64, bool)>> {
        if let Some(x) = self.buf.pop_front() {
            return Ok(Some(x));
        }
        if let Some(e) = self.error.take() {
            return Err(crate::errors::to_py_err(e));
        }
        if self.done {
            return Ok(None);
        }
        let inner = self.image.upgrade().ok_or_else(|| closed("image"))?;
        match py.detach(|| self.fill(&inner)) {
            Ok(finished) => self.done = finished,
            Err(e) => {
                self.done = true;
                self.error = Some(e.context(inner.path.display()));
            }
        }
        match self.buf.pop_front() {
            Some(x) => Ok(Some(x)),
            None => match self.error.take() {
                Some(e) => Err(crate::errors::to_py_err(e)),
                None => Ok(None),
            },
        }
    }
}

/// The lazy iterator of `Image.map`.
#[pyclass(module = "qcow2_bitmap")]
pub struct MapIter {
    image: Weak<Inner>,
    cursor: MapCursor,
    buf: VecDeque<MapEntry>,
    error: Option<qcow2_bitmap::Error>,
    done: bool,
}

impl MapIter {
    fn fill(&mut self, inner: &Inner) -> qcow2_bitmap::Result<bool> {
        let chain = inner.chain()?;
        let (cursor, buf) = (&mut self.cursor, &mut self.buf);
        inner.with_reader(&chain, |reader| {
            while buf.len() < BATCH {
                match cursor.next_entry(reader)? {
                    Some(e) => buf.push_back(e),
                    None => return Ok(true),
                }
            }
            Ok(false)
        })
    }
}

fn entry_dict<'py>(py: Python<'py>, e: &MapEntry) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item(intern!(py, "start"), e.start)?;
    d.set_item(intern!(py, "length"), e.length)?;
    d.set_item(intern!(py, "depth"), e.depth)?;
    d.set_item(intern!(py, "present"), e.present)?;
    d.set_item(intern!(py, "zero"), e.zero)?;
    d.set_item(intern!(py, "data"), e.data)?;
    d.set_item(intern!(py, "compressed"), e.compressed)?;
    if let Some(o) = e.offset {
        d.set_item(intern!(py, "offset"), o)?;
    }
    Ok(d)
}

#[pymethods]
impl MapIter {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        if self.buf.is_empty() && self.error.is_none() && !self.done {
            let inner = self.image.upgrade().ok_or_else(|| closed("image"))?;
            match py.detach(|| self.fill(&inner)) {
                Ok(finished) => self.done = finished,
                Err(e) => {
                    self.done = true;
                    self.error = Some(e);
                }
            }
        }
        match self.buf.pop_front() {
            Some(e) => Ok(Some(entry_dict(py, &e)?)),
            None => match self.error.take() {
                Some(e) => Err(crate::errors::to_py_err(e)),
                None => Ok(None),
            },
        }
    }
}
