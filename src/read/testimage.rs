//! Test-only builder of small in-memory qcow2 images with bitmaps, so that
//! every read-path rule can be exercised with crafted bytes. It lays out
//! cluster 0 (header + extensions), then the directory, then tables and data
//! clusters; refcounts and L1/L2 are not written (the read path ignores them).

use crate::format::be::Put;
use crate::format::bitmaps_ext::BitmapsExt;
use crate::format::directory::{DirEntry, FLAG_AUTO};
use crate::format::ext_type;
use crate::format::extensions::{self, Extension};
use crate::format::header::Header;

/// One bitmap to lay out: its entry fields and the raw table values
/// (`None` = allocate a data cluster filled from `data`).
#[derive(Debug, Clone)]
pub struct TestBitmap {
    pub entry: DirEntry,
    pub table: Vec<Option<u64>>,
    pub data: Vec<Vec<u8>>,
}

impl TestBitmap {
    /// An enabled bitmap with `table.len()` entries.
    pub fn new(
        name: &str,
        granularity_bits: u8,
        table: Vec<Option<u64>>,
        data: Vec<Vec<u8>>,
    ) -> Self {
        let entry = DirEntry {
            offset: 0,
            table_offset: 0,
            table_size: table.len() as u32,
            flags: FLAG_AUTO,
            kind: 1,
            granularity_bits,
            name: name.as_bytes().to_vec(),
            extra_data: vec![],
            padding_is_zero: true,
        };
        TestBitmap { entry, table, data }
    }
}

/// Builds an image: `cluster_bits`, virtual `size`, the bitmaps.
pub fn build(cluster_bits: u32, size: u64, bitmaps: &mut [TestBitmap]) -> Vec<u8> {
    let cs = 1usize << cluster_bits;
    let mut file = vec![0u8; cs * 2];
    // Tables and data from cluster 2 on; the directory goes in cluster 1.
    for b in bitmaps.iter_mut() {
        b.entry.table_offset = file.len() as u64;
        b.entry.table_size = b.table.len() as u32;
        let table_at = file.len();
        file.resize(table_at + (b.table.len() * 8).next_multiple_of(cs), 0);
        let mut data = b.data.iter();
        for (k, t) in b.table.clone().iter().enumerate() {
            let raw = match t {
                Some(raw) => *raw,
                None => {
                    let at = file.len();
                    let mut cluster = data.next().cloned().unwrap_or_default();
                    cluster.resize(cs, 0);
                    file.extend_from_slice(&cluster);
                    at as u64
                }
            };
            file[table_at + 8 * k..table_at + 8 * k + 8].copy_from_slice(&raw.to_be_bytes());
        }
    }
    let mut dir = Put::new();
    let mut off = cs as u64;
    for b in bitmaps.iter_mut() {
        b.entry.offset = off;
        off += b.entry.encoded_len() as u64;
        b.entry.encode(&mut dir);
    }
    let dir = dir.into_vec();
    file[cs..cs + dir.len()].copy_from_slice(&dir);
    let ext = BitmapsExt {
        nb_bitmaps: bitmaps.len() as u32,
        reserved: 0,
        directory_size: dir.len() as u64,
        directory_offset: cs as u64,
    };
    write_cluster0(&mut file, cluster_bits, size, Some(ext));
    file
}

/// Writes header + extension area into cluster 0.
pub fn write_cluster0(file: &mut [u8], cluster_bits: u32, size: u64, ext: Option<BitmapsExt>) {
    let header = Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size,
        crypt_method: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: 0,
        refcount_table_clusters: 0,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: u64::from(ext.is_some()),
        refcount_order: 4,
        header_length: 112,
        tail: vec![0; 8],
    };
    let mut p = Put::new();
    header.encode(&mut p);
    let mut exts = Vec::new();
    if let Some(e) = ext {
        let mut d = Put::new();
        e.encode(&mut d);
        exts.push(Extension {
            kind: ext_type::BITMAPS,
            offset: 0,
            data: d.into_vec(),
            padding_is_zero: true,
        });
    }
    extensions::encode_area(&exts, &mut p);
    let bytes = p.into_vec();
    file[..bytes.len()].copy_from_slice(&bytes);
}

/// File offset of directory entry `i`'s field at `field_offset`.
pub fn entry_field(bitmaps: &[TestBitmap], i: usize, field_offset: u64) -> usize {
    (bitmaps[i].entry.offset + field_offset) as usize
}
