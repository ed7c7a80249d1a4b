//! The qcow2 header (cluster 0, bytes 0..header_length).
//!
//! ```text
//!   0  4 magic            4  4 version           8  8 backing_file_offset
//!  16  4 backing_file_size                       20  4 cluster_bits
//!  24  8 size (virtual)  32  4 crypt_method     36  4 l1_size
//!  40  8 l1_table_offset 48  8 refcount_table_offset
//!  56  4 refcount_table_clusters                 60  4 nb_snapshots
//!  64  8 snapshots_offset                        -- v2 ends at 72 --
//!  72  8 incompatible_features  80  8 compatible_features
//!  88  8 autoclear_features     96  4 refcount_order  100  4 header_length
//! 104  1 compression_type (only if header_length > 104), then padding/unknown
//! ```
//! Bytes from 104 to header_length are kept verbatim in [`Header::tail`].

use super::be::{Cursor, Put};
use super::{QCOW2_MAGIC, autoclear, incompat};
use crate::error::{Error, ErrorKind, Result};
use crate::types::Geometry;

/// Length of the version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Length of the fixed version 3 header fields.
pub const V3_HEADER_MIN_LEN: u32 = 104;

/// A decoded qcow2 header. Version 2 images get v3 defaults for the v3 fields
/// (no features, refcount_order 4, header_length 72).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name in cluster 0, or 0.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Active L1 table entries.
    pub l1_size: u32,
    /// Active L1 table offset.
    pub l1_table_offset: u64,
    /// Refcount table offset.
    pub refcount_table_offset: u64,
    /// Refcount table length in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Snapshot table offset.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3).
    pub incompatible_features: u64,
    /// Compatible feature bits (v3).
    pub compatible_features: u64,
    /// Autoclear feature bits (v3).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length in bytes (72 for v2).
    pub header_length: u32,
    /// Bytes 104..header_length verbatim (compression type, padding, unknown fields).
    pub tail: Vec<u8>,
}

impl Header {
    /// Decodes and validates the header from the start of cluster 0.
    ///
    /// `buf` must hold at least the header (its length is checked); it is
    /// normally the whole first cluster, or the file if shorter.
    ///
    /// # Errors
    /// `NotQcow2` for a wrong magic; `Corrupt` or `Unsupported` for a field
    /// QEMU would reject, naming the field, its offset and value.
    pub fn decode(buf: &[u8]) -> Result<Header> {
        let mut c = Cursor::new(buf, 0, "qcow2 header");
        let magic = c.u32("magic")?;
        if magic != QCOW2_MAGIC {
            let msg = format!("0x{magic:08x} is not the qcow2 magic 0x514649fb");
            return Err(Error::new(
                ErrorKind::NotQcow2,
                "qcow2 header magic",
                Some(0),
                msg,
            ));
        }
        let mut h = Self::decode_v2_fields(&mut c)?;
        if h.version == 3 {
            h.decode_v3_fields(&mut c)?;
        }
        h.validate()?;
        Ok(h)
    }

    fn decode_v2_fields(c: &mut Cursor<'_>) -> Result<Header> {
        let version = c.u32("version")?;
        if version != 2 && version != 3 {
            let msg = format!("{version} is not supported (only 2 and 3)");
            return Err(Error::new(
                ErrorKind::Unsupported,
                "qcow2 header version",
                Some(4),
                msg,
            ));
        }
        Ok(Header {
            version,
            backing_file_offset: c.u64("backing_file_offset")?,
            backing_file_size: c.u32("backing_file_size")?,
            cluster_bits: c.u32("cluster_bits")?,
            size: c.u64("size")?,
            crypt_method: c.u32("crypt_method")?,
            l1_size: c.u32("l1_size")?,
            l1_table_offset: c.u64("l1_table_offset")?,
            refcount_table_offset: c.u64("refcount_table_offset")?,
            refcount_table_clusters: c.u32("refcount_table_clusters")?,
            nb_snapshots: c.u32("nb_snapshots")?,
            snapshots_offset: c.u64("snapshots_offset")?,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            tail: Vec::new(),
        })
    }

    fn decode_v3_fields(&mut self, c: &mut Cursor<'_>) -> Result<()> {
        self.incompatible_features = c.u64("incompatible_features")?;
        self.compatible_features = c.u64("compatible_features")?;
        self.autoclear_features = c.u64("autoclear_features")?;
        self.refcount_order = c.u32("refcount_order")?;
        self.header_length = c.u32("header_length")?;
        if self.header_length < V3_HEADER_MIN_LEN {
            return Err(Error::corrupt(
                "qcow2 header header_length",
                100,
                format!("{} is below the v3 minimum of 104", self.header_length),
            ));
        }
        let tail_len = (self.header_length - V3_HEADER_MIN_LEN) as usize;
        self.tail = c.bytes(tail_len, "header fields after byte 104")?.to_vec();
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        let field = |name: &str, off: u64, msg: String| {
            Err(Error::corrupt(format!("qcow2 header {name}"), off, msg))
        };
        let Some(geometry) = Geometry::new(self.cluster_bits) else {
            return field(
                "cluster_bits",
                20,
                format!("{} is outside 9..=21", self.cluster_bits),
            );
        };
        if u64::from(self.header_length) > geometry.cluster_size() {
            let msg = format!("{} exceeds the cluster size", self.header_length);
            return field("header_length", 100, msg);
        }
        if self.refcount_order > 6 {
            return field(
                "refcount_order",
                96,
                format!("{} exceeds 6", self.refcount_order),
            );
        }
        if self.backing_file_offset > geometry.cluster_size() {
            let msg = format!("{} is beyond the first cluster", self.backing_file_offset);
            return field("backing_file_offset", 8, msg);
        }
        if self.backing_file_offset != 0 && self.backing_file_size > 1023 {
            return field(
                "backing_file_size",
                16,
                format!("{} exceeds 1023", self.backing_file_size),
            );
        }
        self.validate_features()
    }

    fn validate_features(&self) -> Result<()> {
        let unknown = self.incompatible_features & !incompat::KNOWN;
        if unknown != 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "qcow2 header incompatible_features",
                Some(72),
                format!("unknown incompatible feature bits 0x{unknown:x}"),
            ));
        }
        let ct = self.compression_type();
        if ct > 1 {
            return Err(Error::corrupt(
                "qcow2 header compression_type",
                104,
                format!("{ct} is unknown"),
            ));
        }
        if ct != 0 && self.incompatible_features & incompat::COMPRESSION == 0 {
            let msg = format!("{ct} is set but the compression-type incompatible bit is clear");
            return Err(Error::corrupt("qcow2 header compression_type", 104, msg));
        }
        Ok(())
    }

    /// The validated cluster geometry.
    pub fn geometry(&self) -> Geometry {
        // decode() validated cluster_bits; clamping keeps this total.
        Geometry::clamped(self.cluster_bits)
    }

    /// Compression type: 0 zlib, 1 zstd (0 when the field is absent).
    pub fn compression_type(&self) -> u8 {
        self.tail.first().copied().unwrap_or(0)
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order.min(6)
    }

    /// Whether autoclear bit 0 ("bitmaps extension is consistent") is set.
    pub fn bitmaps_consistent(&self) -> bool {
        self.version >= 3 && self.autoclear_features & autoclear::BITMAPS != 0
    }

    /// Where the header extension area starts.
    pub fn extensions_start(&self) -> u64 {
        u64::from(self.header_length)
    }

    /// Where the header extension area must end: the backing file name, or the end of cluster 0.
    pub fn extensions_end(&self) -> u64 {
        if self.backing_file_offset != 0 {
            self.backing_file_offset
        } else {
            self.geometry().cluster_size()
        }
    }

    /// Encodes the header (`header_length` bytes).
    pub fn encode(&self, p: &mut Put) {
        p.u32(QCOW2_MAGIC)
            .u32(self.version)
            .u64(self.backing_file_offset);
        p.u32(self.backing_file_size)
            .u32(self.cluster_bits)
            .u64(self.size);
        p.u32(self.crypt_method)
            .u32(self.l1_size)
            .u64(self.l1_table_offset);
        p.u64(self.refcount_table_offset)
            .u32(self.refcount_table_clusters);
        p.u32(self.nb_snapshots).u64(self.snapshots_offset);
        if self.version >= 3 {
            p.u64(self.incompatible_features)
                .u64(self.compatible_features);
            p.u64(self.autoclear_features)
                .u32(self.refcount_order)
                .u32(self.header_length);
            p.bytes(&self.tail);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A QEMU-like v3 header: 64 KiB clusters, 1 GiB, header_length 112.
    pub(crate) fn sample_v3() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 1,
            refcount_order: 4,
            header_length: 112,
            tail: vec![0; 8],
        }
    }

    fn encoded(h: &Header) -> Vec<u8> {
        let mut p = Put::new();
        h.encode(&mut p);
        p.into_vec()
    }

    #[test]
    fn v3_round_trip_and_length() {
        let h = sample_v3();
        let b = encoded(&h);
        assert_eq!(b.len(), 112);
        assert_eq!(Header::decode(&b).unwrap(), h);
        assert!(h.bitmaps_consistent());
        assert_eq!(h.refcount_bits(), 16);
        assert_eq!(h.extensions_start(), 112);
        assert_eq!(h.extensions_end(), 65536);
    }

    #[test]
    fn v2_round_trip_and_length() {
        let mut h = sample_v3();
        h.version = 2;
        h.autoclear_features = 0;
        h.header_length = 72;
        h.tail.clear();
        let b = encoded(&h);
        assert_eq!(b.len(), 72);
        assert_eq!(Header::decode(&b).unwrap(), h);
        assert!(!h.bitmaps_consistent());
    }

    fn patched(off: usize, bytes: &[u8]) -> Result<Header> {
        let mut b = encoded(&sample_v3());
        b[off..off + bytes.len()].copy_from_slice(bytes);
        Header::decode(&b)
    }

    #[test]
    fn each_validation_rule_names_field_and_offset() {
        let cases: &[(usize, &[u8], &str)] = &[
            (
                0,
                b"QFI\xfa",
                "qcow2 header magic at offset 0 (0x0): 0x514649fa is not the qcow2 magic 0x514649fb",
            ),
            (
                4,
                &[0, 0, 0, 4],
                "qcow2 header version at offset 4 (0x4): 4 is not supported (only 2 and 3)",
            ),
            (
                20,
                &[0, 0, 0, 8],
                "qcow2 header cluster_bits at offset 20 (0x14): 8 is outside 9..=21",
            ),
            (
                20,
                &[0, 0, 0, 22],
                "qcow2 header cluster_bits at offset 20 (0x14): 22 is outside 9..=21",
            ),
            (
                96,
                &[0, 0, 0, 7],
                "qcow2 header refcount_order at offset 96 (0x60): 7 exceeds 6",
            ),
            (
                100,
                &[0, 0, 0, 96],
                "qcow2 header header_length at offset 100 (0x64): 96 is below the v3 minimum of 104",
            ),
            (
                8,
                &[0, 0, 0, 0, 0, 1, 0, 8],
                "qcow2 header backing_file_offset at offset 8 (0x8): 65544 is beyond the first cluster",
            ),
            (
                72,
                &[0, 0, 0, 0, 0, 0, 0, 0x20],
                "qcow2 header incompatible_features at offset 72 (0x48): unknown incompatible feature bits 0x20",
            ),
            (
                104,
                &[2],
                "qcow2 header compression_type at offset 104 (0x68): 2 is unknown",
            ),
            (
                104,
                &[1],
                "qcow2 header compression_type at offset 104 (0x68): 1 is set but the compression-type incompatible bit is clear",
            ),
        ];
        for (off, bytes, want) in cases {
            let got = patched(*off, bytes).unwrap_err().to_string();
            assert_eq!(&got, want);
        }
    }

    #[test]
    fn header_length_beyond_cluster_and_truncation() {
        let mut h = sample_v3();
        h.cluster_bits = 9;
        h.header_length = 520;
        h.tail = vec![0; 416];
        let e = Header::decode(&encoded(&h)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "qcow2 header header_length at offset 100 (0x64): 520 exceeds the cluster size"
        );
        let b = encoded(&sample_v3());
        let e = Header::decode(&b[..50]).unwrap_err();
        assert_eq!(e.offset(), Some(48));
        let e = Header::decode(&b[..108]).unwrap_err();
        assert!(
            e.to_string().contains("header fields after byte 104"),
            "{e}"
        );
    }

    #[test]
    fn zstd_with_bit_is_accepted() {
        let mut h = sample_v3();
        h.tail[0] = 1;
        h.incompatible_features = incompat::COMPRESSION;
        assert_eq!(Header::decode(&encoded(&h)).unwrap().compression_type(), 1);
    }
}
