//! Opening a backing chain: the image, then each backing file it names,
//! resolved like QEMU (a relative name against the directory of the image
//! that names it), each member opened read-only with QEMU's reader locks.
//!
//! The chain is walked in a loop, never by recursion, so a chain of
//! thousands of layers costs one open file (two with a data file) per layer.
//! A member that is already in the chain (same file, same format) is a loop
//! and refused; QEMU itself hangs on one.

use super::layer::{DataFile, Layer, Qcow2Layer, RawLayer};
use crate::error::{Error, ErrorKind, Result};
use crate::format::extensions::{self, Extension};
use crate::format::header::Header;
use crate::format::{QCOW2_MAGIC, autoclear, ext_type, incompat};
use crate::lock::{self, Access};
use crate::storage::{MappedFile, ReadAt};
use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// The format of a chain member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// A qcow2 image.
    Qcow2,
    /// A raw file.
    Raw,
}

impl Format {
    /// The name QEMU uses (`"qcow2"`, `"raw"`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }
}

/// The backing file a qcow2 member names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    /// The name as stored in the header.
    pub name: String,
    /// The backing-format extension, if present (`None`: the format is probed).
    pub format: Option<String>,
    /// The path QEMU opens: the name joined to the naming image's directory.
    pub full: PathBuf,
}

/// The external data file a qcow2 member names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataFileInfo {
    /// The name as stored in the data-file extension (opened as is: relative
    /// names resolve against the current directory, as in QEMU).
    pub name: String,
    /// Autoclear bit 1: the data file is a valid raw image on its own.
    pub raw: bool,
}

/// One member of a chain, top first.
#[derive(Debug)]
pub struct Member {
    /// The path this member was opened by (for the top: as given; below:
    /// as QEMU composes it).
    pub path: PathBuf,
    /// Its format.
    pub format: Format,
    /// Virtual size as QEMU uses it.
    pub virtual_size: u64,
    /// The backing file it names, if any.
    pub backing: Option<Backing>,
    /// Its external data file, if any.
    pub data_file: Option<DataFileInfo>,
    pub(super) layer: Layer,
}

impl Member {
    /// The qcow2 cluster size (`None` for a raw member).
    pub fn cluster_size(&self) -> Option<u64> {
        match &self.layer {
            Layer::Qcow2(q) => Some(q.geometry().cluster_size()),
            Layer::Raw(_) => None,
        }
    }
}

/// What `open` needs to know about the top image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// The locks to take on every member.
    pub access: Access,
    /// The top's format, or `None` to probe it (qcow2 magic, else raw).
    pub format: Option<Format>,
    /// Where relative external data-file names resolve: `None` for the
    /// current directory, as QEMU does.
    pub data_file_dir: Option<PathBuf>,
    /// Locks for the top alone (e.g. force-share when the caller already
    /// holds the top's write lock); `None`: `access`.
    pub top_access: Option<Access>,
    /// Open the top alone, ignoring its backing file (unallocated ranges
    /// read as zeros), like QEMU's `backing: null`.
    pub no_backing: bool,
}

impl OpenOptions {
    /// Reader locks of `access`, format probed, data files as QEMU finds them.
    pub fn new(access: Access) -> Self {
        OpenOptions {
            access,
            format: None,
            data_file_dir: None,
            top_access: None,
            no_backing: false,
        }
    }
}

/// Opens `path` and its whole backing chain.
///
/// # Errors
/// I/O and lock errors naming the member, a missing backing file (named
/// with the image that names it), a loop, `json:` or protocol backing names,
/// an encrypted member, and every header problem QEMU refuses.
pub fn open_members(path: &Path, opts: &OpenOptions) -> Result<Vec<Member>> {
    let mut members: Vec<Member> = Vec::new();
    let mut seen: HashSet<(PathBuf, Format)> = HashSet::new();
    let mut next: Option<(PathBuf, Option<Format>)> = Some((path.to_path_buf(), opts.format));
    while let Some((path, format)) = next.take() {
        let shown = path.display().to_string();
        let named_by = members.last().map(|m| m.path.display().to_string());
        let in_chain = |e: Error| match &named_by {
            Some(parent) => e.context(format!("backing file of '{parent}'")),
            None => e,
        };
        let file = open_file(&path).map_err(|e| in_chain(Error::io(&shown, None, e)))?;
        let access = match (members.is_empty(), opts.top_access) {
            (true, Some(a)) => a,
            _ => opts.access,
        };
        lock::lock(&file, &shown, access)?;
        let storage = MappedFile::new(file).map_err(|e| Error::io(&shown, None, e))?;
        let format = format.unwrap_or_else(|| probe(&storage));
        let canonical = std::fs::canonicalize(&path).map_err(|e| Error::io(&shown, None, e))?;
        if !seen.insert((canonical, format)) {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("backing file '{shown}'"),
                None,
                format!(
                    "creates a loop: it is already in the chain (named by '{}')",
                    named_by.unwrap_or_default()
                ),
            ));
        }
        let member = match format {
            Format::Raw => {
                let layer = Layer::Raw(RawLayer::new(storage));
                Member {
                    path,
                    format,
                    virtual_size: layer.virtual_size(),
                    backing: None,
                    data_file: None,
                    layer,
                }
            }
            Format::Qcow2 => open_qcow2(path, storage, opts).map_err(|e| e.context(&shown))?,
        };
        if let Some(b) = member.backing.as_ref().filter(|_| !opts.no_backing) {
            let f = match b.format.as_deref() {
                None => None,
                Some("qcow2") => Some(Format::Qcow2),
                Some("raw") => Some(Format::Raw),
                Some(other) => {
                    return Err(Error::new(
                        ErrorKind::Unsupported,
                        format!("{shown}: backing file format"),
                        None,
                        format!("'{other}' is not supported (only qcow2 and raw)"),
                    ));
                }
            };
            next = Some((b.full.clone(), f));
        }
        members.push(member);
    }
    Ok(members)
}

/// Opens a file read-only; on "too many open files" raises the soft
/// descriptor limit to the hard one and tries again (deep chains).
fn open_file(path: &Path) -> std::io::Result<File> {
    match File::open(path) {
        Err(e) if e.raw_os_error() == Some(libc::EMFILE) && raise_fd_limit() => File::open(path),
        r => r.and_then(|f| {
            if f.metadata()?.is_dir() {
                Err(std::io::Error::other("is a directory"))
            } else {
                Ok(f)
            }
        }),
    }
}

#[allow(unsafe_code)]
fn raise_fd_limit() -> bool {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the one struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 || lim.rlim_cur >= lim.rlim_max {
            return false;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0
    }
}

/// QEMU's probe, restricted to the formats we read: qcow2 magic, else raw.
fn probe(storage: &MappedFile) -> Format {
    let mut scratch = Vec::new();
    match storage.read_at(0, 4, &mut scratch) {
        Ok(b) if b == QCOW2_MAGIC.to_be_bytes() => Format::Qcow2,
        _ => Format::Raw,
    }
}

fn open_qcow2(path: PathBuf, storage: MappedFile, opts: &OpenOptions) -> Result<Member> {
    // Copied, not borrowed from the mapping: a chain of a thousand members
    // would otherwise keep a thousand mapped header clusters resident.
    let read = |buf: &mut Vec<u8>, from: usize| {
        storage
            .copy_at(from as u64, &mut buf[from..])
            .map_err(|e| Error::io("qcow2 header", Some(from as u64), e))
    };
    let mut cluster0 = vec![0u8; storage.len().min(4096) as usize];
    read(&mut cluster0, 0)?;
    let header = Header::decode(&cluster0)?;
    // The rest of cluster 0 (extensions, backing name), when it is larger.
    let cs = header.geometry().cluster_size();
    let have = cluster0.len();
    cluster0.resize(storage.len().min(cs) as usize, 0);
    if cluster0.len() > have {
        read(&mut cluster0, have)?;
    }
    let cluster0 = &cluster0[..];
    let start = header.extensions_start() as usize;
    let end = (header.extensions_end() as usize).min(cluster0.len());
    let area = extensions::decode_area(cluster0.get(start..end).unwrap_or(&[]), start as u64)?;
    if header.crypt_method != 0 {
        let how = match header.crypt_method {
            1 => "AES".to_string(),
            2 => "LUKS".to_string(),
            m => format!("method {m}"),
        };
        return Err(Error::new(
            ErrorKind::Unsupported,
            "qcow2 header crypt_method",
            Some(32),
            format!("the image is encrypted ({how}): its guest data cannot be read"),
        ));
    }
    let backing = backing_of(&path, &header, cluster0, &area.extensions)?;
    let data_info = data_file_of(&header, &area.extensions)?;
    let data_file = match &data_info {
        None => None,
        Some(info) => {
            let shown = info.name.clone();
            let at = match &opts.data_file_dir {
                Some(dir) if !info.name.starts_with('/') => dir.join(&info.name),
                _ => PathBuf::from(&info.name),
            };
            let file = open_file(&at)
                .map_err(|e| Error::io(format!("external data file '{shown}'"), None, e))?;
            lock::lock(&file, &shown, opts.access)?;
            let storage = MappedFile::new(file).map_err(|e| Error::io(&shown, None, e))?;
            Some(DataFile {
                name: info.name.clone(),
                storage,
                raw: info.raw,
            })
        }
    };
    let layer = Qcow2Layer::new(storage, header, data_file)?;
    let layer = Layer::Qcow2(Box::new(layer));
    Ok(Member {
        path,
        format: Format::Qcow2,
        virtual_size: layer.virtual_size(),
        backing,
        data_file: data_info,
        layer,
    })
}

fn ext(exts: &[Extension], kind: u32) -> Option<&Extension> {
    exts.iter().find(|e| e.kind == kind)
}

fn string_of(e: &Extension, what: &str) -> Result<String> {
    String::from_utf8(e.data.clone()).map_err(|_| {
        Error::corrupt(
            format!("{what} header extension"),
            e.offset + 8,
            "is not valid UTF-8",
        )
    })
}

fn backing_of(
    path: &Path,
    h: &Header,
    cluster0: &[u8],
    exts: &[Extension],
) -> Result<Option<Backing>> {
    if h.backing_file_offset == 0 || h.backing_file_size == 0 {
        return Ok(None);
    }
    let off = h.backing_file_offset as usize;
    let bytes = off
        .checked_add(h.backing_file_size as usize)
        .and_then(|end| cluster0.get(off..end))
        .ok_or_else(|| {
            Error::corrupt(
                "qcow2 header backing_file_size",
                16,
                format!(
                    "the backing file name ({} bytes at {off}) runs past the first cluster or the file",
                    h.backing_file_size
                ),
            )
        })?;
    let name = String::from_utf8(bytes.to_vec())
        .map_err(|_| Error::corrupt("backing file name", off as u64, "is not valid UTF-8"))?;
    if name.contains('\0') {
        return Err(Error::corrupt(
            "backing file name",
            off as u64,
            format!("{name:?} contains a NUL byte"),
        ));
    }
    if name.starts_with("json:") || has_protocol(&name) {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "backing file name",
            Some(off as u64),
            format!("{name:?} is a json: or protocol name; only plain file names are supported"),
        ));
    }
    let format = match ext(exts, ext_type::BACKING_FORMAT) {
        Some(e) => Some(string_of(e, "backing format")?),
        None => None,
    };
    let full = combine(path, &name);
    Ok(Some(Backing { name, format, full }))
}

/// QEMU's notion of a protocol prefix: a colon before any slash.
fn has_protocol(name: &str) -> bool {
    match name.find(':') {
        Some(c) => !name[..c].contains('/'),
        None => false,
    }
}

/// QEMU's `path_combine`: an absolute name as is, else the name appended
/// to everything up to the last `/` of the naming image's path.
pub fn combine(base: &Path, name: &str) -> PathBuf {
    if name.starts_with('/') {
        return PathBuf::from(name);
    }
    let base = base.as_os_str().as_bytes();
    match base.iter().rposition(|&b| b == b'/') {
        None => PathBuf::from(name),
        Some(p) => {
            let mut v = base[..=p].to_vec();
            v.extend_from_slice(name.as_bytes());
            PathBuf::from(OsString::from_vec(v))
        }
    }
}

/// What a qcow2 header names, for display (`info`), without opening or
/// judging anything: the backing file (name as stored, lossily decoded,
/// its format extension and the path QEMU would open) and the data file.
pub fn describe(
    path: &Path,
    h: &Header,
    cluster0: &[u8],
    exts: &[Extension],
) -> (Option<Backing>, Option<DataFileInfo>) {
    let backing = (h.backing_file_offset != 0 && h.backing_file_size != 0)
        .then(|| {
            let off = usize::try_from(h.backing_file_offset).ok()?;
            let bytes = cluster0.get(off..off.checked_add(h.backing_file_size as usize)?)?;
            let name = String::from_utf8_lossy(bytes).into_owned();
            let format = ext(exts, ext_type::BACKING_FORMAT)
                .map(|e| String::from_utf8_lossy(&e.data).into_owned());
            let full = combine(path, &name);
            Some(Backing { name, format, full })
        })
        .flatten();
    let data_file = (h.incompatible_features & incompat::DATA_FILE != 0)
        .then(|| ext(exts, ext_type::DATA_FILE))
        .flatten()
        .map(|e| DataFileInfo {
            name: String::from_utf8_lossy(&e.data).into_owned(),
            raw: h.autoclear_features & autoclear::RAW_DATA != 0,
        });
    (backing, data_file)
}

fn data_file_of(h: &Header, exts: &[Extension]) -> Result<Option<DataFileInfo>> {
    let raw = h.autoclear_features & autoclear::RAW_DATA != 0;
    let has_bit = h.incompatible_features & incompat::DATA_FILE != 0;
    let named = ext(exts, ext_type::DATA_FILE);
    match (has_bit, named) {
        (false, _) => Ok(None),
        (true, None) => Err(Error::new(
            ErrorKind::Unsupported,
            "qcow2 header incompatible_features",
            Some(72),
            "the image has an external data file but does not name it (QEMU needs a 'data-file' option)",
        )),
        (true, Some(e)) => {
            let name = string_of(e, "external data file")?;
            if name.is_empty() || has_protocol(&name) || name.starts_with("json:") {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    "external data file header extension",
                    Some(e.offset + 8),
                    format!("{name:?} is not a plain file name"),
                ));
            }
            Ok(Some(DataFileInfo { name, raw }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine_like_qemu() {
        assert_eq!(
            combine(Path::new("top.qcow2"), "b.qcow2"),
            Path::new("b.qcow2")
        );
        assert_eq!(
            combine(Path::new("sub/top.qcow2"), "mid.qcow2"),
            Path::new("sub/mid.qcow2")
        );
        assert_eq!(
            combine(Path::new("a/sub/top.qcow2"), "../mid.qcow2"),
            Path::new("a/sub/../mid.qcow2")
        );
        assert_eq!(combine(Path::new("sub/top"), "/abs/b"), Path::new("/abs/b"));
    }

    #[test]
    fn protocols() {
        assert!(has_protocol("nbd://host/x"));
        assert!(has_protocol("file:base.qcow2"));
        assert!(!has_protocol("dir/with:colon"));
        assert!(!has_protocol("plain.qcow2"));
    }
}
