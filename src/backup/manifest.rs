//! The backup manifest (`OUTPUT.json`): the commit record of a backup, and
//! what makes it verifiable and appliable. Keys kebab-case; stable.

use crate::error::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The `format` value of every manifest.
pub const FORMAT: &str = "qcow2-bitmap-backup";
/// The manifest version written and understood.
pub const VERSION: u32 = 1;
/// Longest extent in a manifest (longer ranges are split).
pub const MAX_EXTENT: u64 = 64 << 20;

/// One backup's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`VERSION`].
    pub version: u32,
    /// RFC 3339 UTC time the backup was made.
    pub created: String,
    /// `qcow2-bitmap VERSION`.
    pub tool: String,
    /// `full` or `incremental`.
    pub kind: String,
    /// The image backed up.
    pub source: Source,
    /// The bitmap of an incremental backup.
    pub bitmap: Option<BitmapRef>,
    /// The previous backup this one is laid over.
    pub backing: Option<BackingRef>,
    /// The backup file.
    pub output: Output,
    /// Sorted, non-overlapping, at most [`MAX_EXTENT`] each.
    pub extents: Vec<ManifestExtent>,
    /// Total length of the data extents.
    pub data_bytes: u64,
    /// Total length of the zero extents.
    pub zero_bytes: u64,
}

/// `source` of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Source {
    /// The image path as given.
    pub filename: String,
    /// Its virtual size.
    pub virtual_size: u64,
    /// Its cluster size (64 KiB for a raw image).
    pub cluster_size: u64,
}

/// `bitmap` of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BitmapRef {
    /// The bitmap name.
    pub name: String,
    /// Its granularity.
    pub granularity: u64,
}

/// `backing` of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BackingRef {
    /// The backing name stored in the backup (as given with `--backing`).
    pub filename: String,
    /// SHA-256 of the previous backup's manifest file, when it had one.
    pub manifest_sha256: Option<String>,
}

/// `output` of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Output {
    /// The backup file's name as given.
    pub filename: String,
    /// `qcow2` or `raw`.
    pub format: String,
    /// The qcow2 cluster size; `null` for raw.
    pub cluster_size: Option<u64>,
}

/// One extent: guest bytes stored as data (with their CRC-32) or as zeros.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ManifestExtent {
    /// First guest byte.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// `data` or `zero`.
    pub kind: String,
    /// CRC-32 (IEEE) of the guest bytes, 8 lower-case hex digits (data only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32: Option<String>,
}

impl ManifestExtent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }

    /// Whether this is a data extent.
    pub fn is_data(&self) -> bool {
        self.kind == "data"
    }
}

/// The manifest path of a backup file: `FILE.json`.
pub fn path_of(backup: &Path) -> std::path::PathBuf {
    let mut s = backup.as_os_str().to_os_string();
    s.push(".json");
    s.into()
}

impl Manifest {
    /// Reads and checks `path`: the format, version, and that the extents
    /// are sorted, non-overlapping, inside the virtual size, at most 64 MiB,
    /// with a CRC exactly on data extents, and that the byte totals add up.
    ///
    /// # Errors
    /// I/O errors; `Corrupt` naming the extent that breaks a rule.
    pub fn load(path: &Path) -> Result<Manifest> {
        let shown = path.display().to_string();
        let text = std::fs::read(path).map_err(|e| Error::io(&shown, None, e))?;
        let m: Manifest = serde_json::from_slice(&text).map_err(|e| {
            Error::new(
                ErrorKind::Corrupt,
                shown.clone(),
                None,
                format!("is not a backup manifest: {e}"),
            )
        })?;
        m.validate()
            .map_err(|msg| Error::new(ErrorKind::Corrupt, shown, None, msg))?;
        Ok(m)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.format != FORMAT || self.version != VERSION {
            return Err(format!(
                "format {:?} version {} is not {FORMAT} version {VERSION}",
                self.format, self.version
            ));
        }
        if self.kind != "full" && self.kind != "incremental" {
            return Err(format!(
                "kind {:?} is neither full nor incremental",
                self.kind
            ));
        }
        let size = self.source.virtual_size;
        let (mut data, mut zero, mut end) = (0u64, 0u64, 0u64);
        for (i, e) in self.extents.iter().enumerate() {
            let what = format!("extent {i} ({}+{})", e.offset, e.length);
            if e.length == 0 || e.length > MAX_EXTENT {
                return Err(format!("{what}: length must be 1..=64 MiB"));
            }
            if e.offset < end {
                return Err(format!("{what}: overlaps or precedes the previous extent"));
            }
            if e.offset.checked_add(e.length).is_none_or(|x| x > size) {
                return Err(format!("{what}: runs past the virtual size {size}"));
            }
            end = e.end();
            match (e.kind.as_str(), &e.crc32) {
                ("data", Some(c)) if c.len() == 8 && u32::from_str_radix(c, 16).is_ok() => {
                    data += e.length
                }
                ("zero", None) => zero += e.length,
                _ => {
                    return Err(format!(
                        "{what}: kind {:?} with crc32 {:?}",
                        e.kind, e.crc32
                    ));
                }
            }
        }
        if data != self.data_bytes || zero != self.zero_bytes {
            return Err(format!(
                "data-bytes {} / zero-bytes {} do not add up to the extents ({data} / {zero})",
                self.data_bytes, self.zero_bytes
            ));
        }
        Ok(())
    }

    /// The document, pretty-printed, with a final newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }
}

/// CRC-32 (IEEE) as 8 lower-case hex digits.
pub fn crc_hex(crc: u32) -> String {
    format!("{crc:08x}")
}

/// The current time as RFC 3339 UTC (`2026-12-04T18:42:11Z`).
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_shape() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'));
    }

    #[test]
    fn validation() {
        let mut m = Manifest {
            format: FORMAT.into(),
            version: 1,
            created: now_rfc3339(),
            tool: "t".into(),
            kind: "full".into(),
            source: Source {
                filename: "s".into(),
                virtual_size: 1 << 20,
                cluster_size: 65536,
            },
            bitmap: None,
            backing: None,
            output: Output {
                filename: "o".into(),
                format: "raw".into(),
                cluster_size: None,
            },
            extents: vec![
                ManifestExtent {
                    offset: 0,
                    length: 4096,
                    kind: "data".into(),
                    crc32: Some("0000abcd".into()),
                },
                ManifestExtent {
                    offset: 4096,
                    length: 4096,
                    kind: "zero".into(),
                    crc32: None,
                },
            ],
            data_bytes: 4096,
            zero_bytes: 4096,
        };
        m.validate().unwrap();
        m.extents[1].offset = 100;
        assert!(m.validate().unwrap_err().contains("overlaps"));
        m.extents[1].offset = (1 << 20) - 100;
        assert!(m.validate().unwrap_err().contains("past the virtual size"));
        m.extents[1].offset = 8192;
        m.zero_bytes = 1;
        assert!(m.validate().unwrap_err().contains("add up"));
    }
}
