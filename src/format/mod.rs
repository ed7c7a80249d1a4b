//! On-disk layout of qcow2 metadata that bitmaps depend on: bytes to structs
//! and back. No I/O and no policy here: callers hand in byte slices with the
//! file offset they came from, and get values or offset-carrying errors.
//!
//! All integers on disk are big-endian (the bitmap *data* is a little-endian
//! bit string, which is `bits`' business, not this module's).

pub mod be;
pub mod bitmap_table;
pub mod bitmaps_ext;
pub mod directory;
pub mod extensions;
pub mod header;
pub mod l2;
pub mod refcount;

/// `"QFI\xfb"`, the first four bytes of every qcow2 image.
pub const QCOW2_MAGIC: u32 = 0x5146_49fb;

/// Header extension type codes.
pub mod ext_type {
    /// End of the header extension area.
    pub const END: u32 = 0;
    /// Backing file format name.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Feature name table.
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    /// Persistent dirty bitmaps.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption (LUKS) header pointer.
    pub const CRYPTO: u32 = 0x0537_be77;
    /// External data file name.
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// Incompatible feature bits (header offset 72).
pub mod incompat {
    /// Refcounts may be stale (lazy refcounts).
    pub const DIRTY: u64 = 1 << 0;
    /// The image is marked corrupt.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// The compression_type header field is used.
    pub const COMPRESSION: u64 = 1 << 3;
    /// Extended L2 entries (subclusters).
    pub const EXTL2: u64 = 1 << 4;
    /// Every bit QEMU 10 knows.
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTL2;
}

/// Compatible feature bits (header offset 80).
pub mod compat {
    /// Lazy refcounts.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits (header offset 88).
pub mod autoclear {
    /// The bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is raw.
    pub const RAW_DATA: u64 = 1 << 1;
}

/// QEMU's bitmap limits (reference section 3.1).
pub mod limits {
    /// Maximum number of bitmaps in one image.
    pub const MAX_BITMAPS: u32 = 65535;
    /// Maximum bitmap directory size in bytes.
    pub const MAX_DIRECTORY_SIZE: u64 = 1024 * 65535;
    /// Maximum bitmap table entries.
    pub const MAX_TABLE_SIZE: u32 = 0x800_0000;
    /// Maximum `table_size * cluster_size` (and serialized bitmap bytes).
    pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;
    /// Smallest granularity (log2): 512 B.
    pub const MIN_GRANULARITY_BITS: u8 = 9;
    /// Largest granularity (log2): 2 GiB.
    pub const MAX_GRANULARITY_BITS: u8 = 31;
    /// Longest bitmap name in bytes.
    pub const MAX_NAME_SIZE: u16 = 1023;
}
