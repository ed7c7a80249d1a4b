//! `verify`: a backup and its chain hold what their manifests say.
//!
//! For each member: it opens; its manifest (`MEMBER.json`, required for
//! the backup itself) is well formed; the parent link holds (the backing
//! name it records, the SHA-256 of the parent's manifest, so a swapped
//! backing file is caught); the virtual sizes agree; every data extent's
//! CRC-32 matches the guest bytes read through the member's own chain; and
//! for a qcow2 member, every cluster the member itself allocates is listed
//! in its manifest with the same kind (a removed extent is caught). With a
//! source image, the guest views are compared too.

use super::manifest::{self, Manifest};
use crate::error::Result;
use crate::guest::{Chain, Format, Member, OpenOptions};
use crate::lock::Access;
use crate::read::hex;
use sha2::{Digest, Sha256};
use std::path::Path;

/// Most problems reported per member (the rest are counted).
const MAX_PROBLEMS: usize = 20;

/// The report of one chain member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberReport {
    /// The member's path as given or found in the chain.
    pub filename: String,
    /// Whether it has a manifest.
    pub manifest: bool,
    /// What does not hold.
    pub problems: Vec<String>,
}

/// The report of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Everything holds.
    pub ok: bool,
    /// Top first.
    pub members: Vec<MemberReport>,
    /// With a source: whether the guest views are equal.
    pub source_equal: Option<bool>,
}

/// Verifies `backup` (and, with `source`, its guest view against the source's).
///
/// # Errors
/// Only for problems outside the backup (the source cannot be opened);
/// every problem of the backup is in the report.
pub fn verify(backup: &Path, source: Option<&Path>) -> Result<VerifyReport> {
    let chain = match Chain::open(backup, Access::Read) {
        Ok(c) => c,
        Err(e) => {
            return Ok(VerifyReport {
                ok: false,
                members: vec![MemberReport {
                    filename: backup.display().to_string(),
                    manifest: manifest::path_of(backup).exists(),
                    problems: vec![format!("the chain does not open: {e}")],
                }],
                source_equal: source.map(|_| false),
            });
        }
    };
    let members = check_chain(&chain, true);
    let mut ok = members.iter().all(|m| m.problems.is_empty());
    let source_equal = match source {
        None => None,
        Some(src) => {
            let s = Chain::open(src, Access::Read).map_err(|e| e.context(src.display()))?;
            let diff = first_difference(&chain, &s)?;
            let mut members = members;
            if let Some(msg) = &diff {
                members[0]
                    .problems
                    .push(format!("guest view differs from {}: {msg}", src.display()));
            }
            ok &= diff.is_none();
            return Ok(VerifyReport {
                ok,
                members,
                source_equal: Some(diff.is_none()),
            });
        }
    };
    Ok(VerifyReport {
        ok,
        members,
        source_equal,
    })
}

/// Checks every member of `chain`; `require_top`: the top must have a
/// manifest (`verify`; `restore` flattens any chain, checking the manifests
/// it finds).
pub fn check_chain(chain: &Chain, require_top: bool) -> Vec<MemberReport> {
    let top_size = chain.virtual_size();
    chain
        .members()
        .iter()
        .enumerate()
        .map(|(depth, m)| {
            let parent = chain.members().get(depth + 1);
            check_member(m, parent, require_top && depth == 0, top_size, None, true)
        })
        .collect()
}

/// Checks one member: its manifest, parent link, sizes, CRCs and coverage.
/// `reader_opts`: how to open the member for reading its data (default:
/// its own chain); `link`: check the parent link too (`apply` reads one
/// backup alone, whose parent need not be there).
pub fn check_member(
    m: &Member,
    parent: Option<&Member>,
    required: bool,
    top_size: u64,
    reader_opts: Option<OpenOptions>,
    link: bool,
) -> MemberReport {
    let filename = m.path.display().to_string();
    let mpath = manifest::path_of(&m.path);
    let mut problems = Vec::new();
    let exists = mpath.exists();
    if m.virtual_size != top_size {
        problems.push(format!(
            "virtual size {} differs from the chain's ({top_size})",
            m.virtual_size
        ));
    }
    if !exists {
        if required {
            problems.push(format!(
                "no manifest ({}): an interrupted backup, not a backup",
                mpath.display()
            ));
        }
        return MemberReport {
            filename,
            manifest: false,
            problems,
        };
    }
    let doc = match Manifest::load(&mpath) {
        Ok(d) => d,
        Err(e) => {
            problems.push(e.to_string());
            return MemberReport {
                filename,
                manifest: true,
                problems,
            };
        }
    };
    if link {
        link_problems(m, parent, &doc, &mut problems);
    }
    if doc.source.virtual_size != m.virtual_size {
        problems.push(format!(
            "the manifest's virtual size {} differs from the image's {}",
            doc.source.virtual_size, m.virtual_size
        ));
    }
    let fmt = match m.format {
        Format::Qcow2 => "qcow2",
        Format::Raw => "raw",
    };
    if doc.output.format != fmt {
        problems.push(format!(
            "the manifest says format {}, the file is {fmt}",
            doc.output.format
        ));
    }
    if problems.is_empty() {
        let opts = reader_opts.unwrap_or_else(|| OpenOptions::new(Access::Read));
        match Chain::open_with(&m.path, opts.clone()) {
            Err(e) => problems.push(format!("does not open for reading: {e}")),
            Ok(own) => {
                crc_problems(&own, &doc, &mut problems);
                if m.format == Format::Qcow2 {
                    coverage_problems(&m.path, &doc, &mut problems);
                }
            }
        }
    }
    if problems.len() > MAX_PROBLEMS {
        let more = problems.len() - MAX_PROBLEMS;
        problems.truncate(MAX_PROBLEMS);
        problems.push(format!("... and {more} more"));
    }
    MemberReport {
        filename,
        manifest: true,
        problems,
    }
}

fn link_problems(m: &Member, parent: Option<&Member>, doc: &Manifest, problems: &mut Vec<String>) {
    match (&doc.backing, &m.backing) {
        (None, None) => {}
        (None, Some(b)) => problems.push(format!(
            "has backing file '{}' but its manifest records none",
            b.name
        )),
        (Some(r), None) => problems.push(format!(
            "its manifest records backing file '{}' but the image has none",
            r.filename
        )),
        (Some(r), Some(b)) => {
            if r.filename != b.name {
                problems.push(format!(
                    "backing file is '{}' but its manifest records '{}'",
                    b.name, r.filename
                ));
            }
            if let Some(want) = &r.manifest_sha256 {
                let p = parent.map_or_else(|| b.full.clone(), |p| p.path.clone());
                let pm = manifest::path_of(&p);
                match std::fs::read(&pm) {
                    Ok(bytes) => {
                        let got = hex(&Sha256::digest(&bytes));
                        if &got != want {
                            problems.push(format!(
                                "backing file '{}' is not the backup this link was made on: its manifest's SHA-256 is {got}, this link records {want}",
                                p.display()
                            ));
                        }
                    }
                    Err(_) => problems.push(format!(
                        "backing file '{}' has no manifest, but this link records its SHA-256 {want}",
                        p.display()
                    )),
                }
            }
        }
    }
}

fn crc_problems(own: &Chain, doc: &Manifest, problems: &mut Vec<String>) {
    let mut reader = own.reader();
    let mut buf = vec![0u8; 8 << 20];
    for (i, e) in doc.extents.iter().enumerate() {
        if !e.is_data() {
            continue;
        }
        let mut h = crc32fast::Hasher::new();
        let mut at = e.offset;
        while at < e.end() {
            let n = (e.end() - at).min(buf.len() as u64) as usize;
            if let Err(err) = reader.read_at(at, &mut buf[..n]) {
                problems.push(format!("extent {i} ({}+{}): {err}", e.offset, e.length));
                return;
            }
            h.update(&buf[..n]);
            at += n as u64;
        }
        let got = manifest::crc_hex(h.finalize());
        if Some(&got) != e.crc32.as_ref() {
            problems.push(format!(
                "extent {i} (offset {}, length {}): CRC-32 {got} does not match the manifest's {}",
                e.offset,
                e.length,
                e.crc32.as_deref().unwrap_or("-")
            ));
            if problems.len() > MAX_PROBLEMS {
                return;
            }
        }
    }
}

/// Every range the qcow2 member itself allocates must be listed with its kind.
fn coverage_problems(path: &Path, doc: &Manifest, problems: &mut Vec<String>) {
    let mut opts = OpenOptions::new(Access::Read);
    opts.no_backing = true;
    let own = match Chain::open_with(path, opts) {
        Ok(c) => c,
        Err(e) => {
            problems.push(format!("does not open alone: {e}"));
            return;
        }
    };
    let mut reader = own.reader();
    let size = own.virtual_size();
    let map = match reader.map(0, size) {
        Ok(m) => m,
        Err(e) => {
            problems.push(e.to_string());
            return;
        }
    };
    let ext = &doc.extents;
    let mut i = 0;
    for entry in map {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                problems.push(e.to_string());
                return;
            }
        };
        if !entry.present {
            continue;
        }
        let data = !entry.zero;
        // Walk the manifest extents over [entry.start, entry.end()).
        let mut at = entry.start;
        while at < entry.end() {
            while i < ext.len() && ext[i].end() <= at {
                i += 1;
            }
            let covered = ext
                .get(i)
                .filter(|e| e.offset <= at && e.is_data() == data)
                .map(|e| e.end());
            match covered {
                Some(end) => at = end.min(entry.end()),
                None => {
                    let next = ext.get(i).map_or(entry.end(), |e| e.offset.max(at + 1));
                    let stop = next.min(entry.end()).max(at + 1);
                    problems.push(format!(
                        "guest range {at}+{} is stored as {} in the image but not listed so in the manifest",
                        stop - at,
                        if data { "data" } else { "zeros" }
                    ));
                    if problems.len() > MAX_PROBLEMS {
                        return;
                    }
                    at = stop;
                }
            }
        }
    }
}

/// The first guest offset (and what) where `a` and `b` differ, if any.
///
/// # Errors
/// Read errors of either side.
pub fn first_difference(a: &Chain, b: &Chain) -> Result<Option<String>> {
    if a.virtual_size() != b.virtual_size() {
        return Ok(Some(format!(
            "virtual sizes differ ({} and {})",
            a.virtual_size(),
            b.virtual_size()
        )));
    }
    let size = a.virtual_size();
    let (mut ra, mut rb) = (a.reader(), b.reader());
    let window = 8u64 << 20;
    let (mut ba, mut bb) = (vec![0u8; window as usize], vec![0u8; window as usize]);
    let mut at = 0;
    while at < size {
        let n = (size - at).min(window);
        // Skip windows that read as zeros on both sides without reading them.
        let zero_a = ra.map(at, n)?.all(|e| e.map(|e| e.zero).unwrap_or(false));
        let zero_b = rb.map(at, n)?.all(|e| e.map(|e| e.zero).unwrap_or(false));
        if !(zero_a && zero_b) {
            ra.read_at(at, &mut ba[..n as usize])?;
            rb.read_at(at, &mut bb[..n as usize])?;
            if let Some(i) = ba[..n as usize]
                .iter()
                .zip(&bb[..n as usize])
                .position(|(x, y)| x != y)
            {
                return Ok(Some(format!(
                    "first difference at offset {}",
                    at + i as u64
                )));
            }
        }
        at += n;
    }
    Ok(None)
}
