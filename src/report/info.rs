//! The `info --json` document: the image's header summary and every
//! bitmap's verdict, from one survey pass.

use crate::guest::chain;
use crate::read::{BitmapEntry, Image, Survey};
use crate::storage::ReadAt;
use serde::Serialize;
use std::path::Path;

/// The `info --json` document (contract: cli.md).
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct InfoDoc {
    /// The image path as given.
    pub filename: String,
    /// Always `"qcow2"`.
    pub format: &'static str,
    /// qcow2 version (2 or 3).
    pub version: u32,
    /// Guest disk size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Whether the bitmaps extension is consistent (autoclear bit 0 set on v3).
    pub bitmaps_consistent: bool,
    /// The backing file name as stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    /// The backing format as stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    /// The backing file name resolved like QEMU resolves it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    /// The external data file name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file: Option<String>,
    /// Whether the external data file is raw (`data_file_raw`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file_raw: Option<bool>,
    /// Why the bitmaps extension cannot be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps_problem: Option<String>,
    /// Every bitmap, in directory order.
    pub bitmaps: Vec<BitmapRow>,
    /// Names of the feature bits set (human output only).
    #[serde(skip)]
    pub features: Vec<String>,
}

/// One bitmap in `info`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BitmapRow {
    /// The name (lossily decoded).
    pub name: String,
    /// Granularity in bytes.
    pub granularity: u64,
    /// `in-use` and `auto` when set.
    pub flags: Vec<&'static str>,
    /// `ok`, `in-use`, `stale` or `invalid`.
    pub state: &'static str,
    /// Why the state is not `ok`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// Dirty bytes (`null` unless `ok`).
    pub dirty_bytes: Option<u64>,
    /// The bitmap table's file offset.
    pub table_offset: u64,
    /// The bitmap table's size in entries.
    pub table_size: u32,
    /// Dirty bytes per column of the density picture (human output only).
    #[serde(skip)]
    pub density: Option<Vec<u64>>,
}

impl BitmapRow {
    /// One row from a directory entry and its [`Survey`].
    pub fn new(b: &BitmapEntry, survey: Survey) -> Self {
        let mut flags = Vec::new();
        if b.entry.in_use() {
            flags.push("in-use");
        }
        if b.entry.auto() {
            flags.push("auto");
        }
        BitmapRow {
            name: b.name(),
            granularity: b.granularity(),
            flags,
            state: survey.status.state.as_str(),
            problem: survey.status.problem,
            dirty_bytes: survey.status.dirty_bytes,
            table_offset: b.entry.table_offset,
            table_size: b.entry.table_size,
            density: survey.profile,
        }
    }
}

impl InfoDoc {
    /// The whole document of `image` (opened from `path`): one survey pass
    /// over every bitmap, with a density picture of `columns` columns per
    /// bitmap (0: none, as in the JSON document).
    pub fn gather<S: ReadAt + Sync>(path: &Path, image: &Image<S>, columns: u64) -> Self {
        let rows = image
            .bitmaps()
            .iter()
            .zip(image.survey(columns))
            .map(|(b, survey)| BitmapRow::new(b, survey))
            .collect();
        Self::new(path, image, rows)
    }

    /// Gathers the summary.
    pub fn new<S: ReadAt>(path: &Path, image: &Image<S>, bitmaps: Vec<BitmapRow>) -> Self {
        let h = image.header();
        let cs = image.geometry().cluster_size();
        let mut scratch = Vec::new();
        let n = usize::try_from(cs.min(image.storage().len())).unwrap_or(0);
        let cluster0 = image.storage().read_at(0, n, &mut scratch).unwrap_or(&[]);
        let (backing, data_file) = chain::describe(path, h, cluster0, image.extensions());
        InfoDoc {
            filename: path.display().to_string(),
            format: "qcow2",
            version: h.version,
            virtual_size: h.size,
            cluster_size: image.geometry().cluster_size(),
            refcount_bits: h.refcount_bits(),
            bitmaps_consistent: image.bitmaps_consistent(),
            backing_filename: backing.as_ref().map(|b| b.name.clone()),
            backing_filename_format: backing.as_ref().and_then(|b| b.format.clone()),
            full_backing_filename: backing.as_ref().map(|b| b.full.display().to_string()),
            data_file_raw: data_file.as_ref().map(|d| d.raw),
            data_file: data_file.map(|d| d.name),
            bitmaps_problem: image.bitmaps_view().problem.as_ref().map(|e| e.to_string()),
            bitmaps,
            features: feature_names(
                h.incompatible_features,
                h.compatible_features,
                h.autoclear_features,
            ),
        }
    }
}

fn feature_names(incompat: u64, compat: u64, autoclear: u64) -> Vec<String> {
    let mut out = Vec::new();
    let names: [(u64, u64, &str); 8] = [
        (incompat, 1, "dirty"),
        (incompat, 2, "corrupt"),
        (incompat, 4, "external-data-file"),
        (incompat, 8, "compression-type"),
        (incompat, 16, "extended-l2"),
        (compat, 1, "lazy-refcounts"),
        (autoclear, 1, "bitmaps"),
        (autoclear, 2, "raw-external-data"),
    ];
    for (bits, mask, name) in names {
        if bits & mask != 0 {
            out.push(name.to_string());
        }
    }
    out
}
