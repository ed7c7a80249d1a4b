//! The guest-data path never trusts the file. Small images are made now
//! with `qemu-img`/`qemu-io` in a tempdir, one structure is patched in plain
//! Rust (offsets decoded from the header, L1 and L2 tables, never
//! hard-coded), and every refusal is checked three ways:
//!
//! - `map` and `map --json` exit 1 with exactly one stderr line starting
//!   `qcow2-bitmap: ` that names the structure, the L1/L2 index and the file
//!   offset (a refused `--json` never prints a complete JSON document);
//! - the library (`Chain::open` + `Reader::read_at` over the affected range)
//!   returns an error of the documented kind with the same words: `Corrupt`
//!   for metadata, `Unsupported` for encryption, protocol names and unknown
//!   backing formats, `Io` for a missing backing file (the OS error is the
//!   cause), `Corrupt` for a backing loop;
//! - every file involved is byte-identical afterwards.
//!
//! Each shape also has a positive control: the unpatched image reads exactly
//! as `qemu-img convert -O raw` flattens it and `map --json` prints what
//! `qemu-img map --output=json` prints, so a refusal test cannot pass by
//! refusing everything.
//!
//! Compressed streams that do not decompress are a read refusal only: `map`
//! (like `qemu-img map`) reports allocation and does not decompress, so
//! there `map` must still print what qemu-img prints while the read fails.
//!
//! `mutated_images_never_panic` is the deterministic stand-in for the
//! `guest` cargo-fuzz target: seeded mutations of the QEMU-made images
//! through the library, Ok or Err and never a panic.

use crate::util::*;
use qcow2_bitmap::format::ext_type;
use qcow2_bitmap::format::extensions::decode_area;
use qcow2_bitmap::format::header::Header;
use qcow2_bitmap::guest::Chain;
use qcow2_bitmap::lock::Access;
use qcow2_bitmap::{Error, ErrorKind};
use std::path::{Path, PathBuf};
use std::process::Command;

const TOOLS: &[&str] = &["qemu-img", "qemu-io"];
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut args = Vec::new();
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(p(img));
    tool("qemu-io", &args);
}

fn create(img: &Path, opts: &str, size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([p(img), size]);
    tool("qemu-img", &args);
}

fn be64(b: &[u8], at: u64) -> u64 {
    let at = at as usize;
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn put64(b: &mut [u8], at: u64, v: u64) {
    let at = at as usize;
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Where one image's structures are, decoded from its bytes.
#[derive(Debug, Clone)]
struct Layout {
    cb: u32,
    cs: u64,

    l1_offset: u64,
    rt_offset: u64,
    extended: bool,
    /// File offset and length of the backing file name.
    backing: Option<(u64, u64)>,
    /// File offset of the backing-format extension's body, and its length.
    backing_format: Option<(u64, u64)>,
}

impl Layout {
    fn of(bytes: &[u8]) -> Layout {
        let h = Header::decode(bytes).expect("header decodes");
        let cs = h.geometry().cluster_size();
        let start = h.extensions_start();
        let end = h.extensions_end().min(cs).min(bytes.len() as u64);
        let area =
            decode_area(&bytes[start as usize..end as usize], start).expect("extensions decode");
        let backing_format = area
            .extensions
            .iter()
            .find(|e| e.kind == ext_type::BACKING_FORMAT)
            .map(|e| (e.offset + 8, e.data.len() as u64));
        Layout {
            cb: h.cluster_bits,
            cs,

            l1_offset: h.l1_table_offset,
            rt_offset: h.refcount_table_offset,
            extended: h.incompatible_features & (1 << 4) != 0,
            backing: (h.backing_file_size > 0)
                .then_some((h.backing_file_offset, u64::from(h.backing_file_size))),
            backing_format,
        }
    }

    fn l1_at(&self, i: u64) -> u64 {
        self.l1_offset + 8 * i
    }

    fn entry_len(&self) -> u64 {
        if self.extended { 16 } else { 8 }
    }

    /// The L2 table L1 entry `l1` points at (it must have one).
    fn l2_table(&self, b: &[u8], l1: u64) -> u64 {
        let off = be64(b, self.l1_at(l1)) & OFFSET_MASK;
        assert_ne!(off, 0, "L1 entry {l1} has no L2 table");
        off
    }

    /// File offset of L2 entry `l2` of the table of L1 entry `l1`.
    fn l2_at(&self, b: &[u8], l1: u64, l2: u64) -> u64 {
        self.l2_table(b, l1) + l2 * self.entry_len()
    }

    /// The first refcount block (from refcount table entry 0).
    fn refblock(&self, b: &[u8]) -> u64 {
        be64(b, self.rt_offset) & !0x1ff
    }

    /// `(host offset, bytes QEMU reads)` of a compressed entry.
    fn decode_compressed(&self, e: u64) -> (u64, u64) {
        let x = 62 - (self.cb - 8);
        let off = e & ((1 << x) - 1);
        let nb = ((e >> x) & ((1 << (self.cb - 8)) - 1)) + 1;
        (off, nb * 512 - (off & 511))
    }

    /// A compressed entry for `len` bytes at `off`, encoded like QEMU.
    fn compressed_entry(&self, off: u64, len: u64) -> u64 {
        let x = 62 - (self.cb - 8);
        let extra = (off + len - 1) / 512 - off / 512;
        assert!(
            extra < 1 << (self.cb - 8),
            "{len} bytes do not fit a descriptor"
        );
        COMPRESSED | off | (extra << x)
    }
}

/// The words a one-line error about L2 entry `l2` of L1 entry `l1` at file offset `at` names.
fn l2_words(l1: u64, l2: u64, at: u64, what: &str) -> Vec<String> {
    vec![
        format!("L1 index {l1}, L2 index {l2})"),
        format!("at offset {at} "),
        what.to_string(),
    ]
}

fn l1_words(l1: u64, at: u64, what: &str) -> Vec<String> {
    vec![
        format!("L1 table entry {l1} "),
        format!("at offset {at} "),
        what.to_string(),
    ]
}

/// A guest range the refused read covers.
type Range = (u64, u64);

/// The library's answer: the error of `Chain::open`, else of `read_at` over `range`.
/// When `map_fails`, the library's `map` over the range fails with the same kind.
fn lib_error(img: &Path, (off, len): Range, map_fails: bool) -> Error {
    let chain = match Chain::open(img, Access::Read) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let mut buf = vec![0u8; len as usize];
    let e = match chain.reader().read_at(off, &mut buf) {
        Ok(()) => panic!(
            "{}: read of {off}+{len} succeeded (first bytes {:?})",
            img.display(),
            &buf[..16.min(buf.len())]
        ),
        Err(e) => e,
    };
    if map_fails {
        let mut r = chain.reader();
        let m: Result<Vec<_>, Error> = r.map(off, len).and_then(|it| it.collect());
        match m {
            Ok(v) => panic!("{}: map of {off}+{len} succeeded: {v:?}", img.display()),
            Err(me) => assert_eq!(me.kind(), e.kind(), "map: {me}; read: {e}"),
        }
    }
    e
}

fn snapshot(files: &[&Path]) -> Vec<Vec<u8>> {
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

fn assert_unchanged(files: &[&Path], before: &[Vec<u8>], what: &str) {
    for (f, b) in files.iter().zip(before) {
        assert!(
            std::fs::read(f).unwrap() == *b,
            "{what}: {} changed",
            f.display()
        );
    }
}

/// The CLI's `map` (both layouts) refuses `img` with one line containing `words`.
fn assert_map_refused(img: &Path, words: &[String]) {
    for json in [false, true] {
        let mut args = vec!["map"];
        if json {
            args.push("--json");
        }
        args.push(p(img));
        let o = run(&args);
        let err = stderr(&o);
        let what = args.join(" ");
        assert_eq!(
            o.status.code(),
            Some(1),
            "{what}: expected a refusal\nstdout: {}\nstderr: {err}",
            stdout(&o)
        );
        assert!(
            err.starts_with("qcow2-bitmap: ") && err.ends_with('\n') && err.lines().count() == 1,
            "{what}: not one prefixed line: {err:?}"
        );
        for w in words {
            assert!(
                err.contains(w.as_str()),
                "{what}: {err:?} does not say {w:?}"
            );
        }
        if json {
            assert!(
                serde_json::from_slice::<serde_json::Value>(&o.stdout).is_err(),
                "{what}: a refused map printed a complete JSON document: {}",
                stdout(&o)
            );
        }
    }
}

/// Everything a refusal must hold (see the module doc). `files`: every
/// file of the chain (the image first); all must stay byte-identical.
fn assert_refused(files: &[&Path], words: &[String], kind: ErrorKind, range: Range) {
    let img = files[0];
    let before = snapshot(files);
    assert_map_refused(img, words);
    let e = lib_error(img, range, true);
    let text = e.to_string();
    assert_eq!(e.kind(), kind, "{}: {text}", img.display());
    assert!(!text.contains('\n'), "multi-line error {text:?}");
    for w in words {
        assert!(
            text.contains(w.as_str()),
            "library error {text:?} does not say {w:?}"
        );
    }
    assert_unchanged(files, &before, &format!("{words:?}"));
}

/// A decompression refusal: `map` agrees with qemu-img (it does not
/// decompress), the library read of `range` fails as `Corrupt` with `words`.
fn assert_read_refused(img: &Path, words: &[String], range: Range, qemu_refuses: bool) {
    let before = snapshot(&[img]);
    let ours = run(&["map", "--json", p(img)]);
    assert_eq!(ours.status.code(), Some(0), "{}", stderr(&ours));
    let theirs = tool("qemu-img", &["map", "--output=json", p(img)]);
    assert_eq!(
        stdout(&ours),
        theirs,
        "map --json differs from qemu-img map"
    );
    let e = lib_error(img, range, false);
    let text = e.to_string();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{text}");
    assert!(!text.contains('\n'), "multi-line error {text:?}");
    for w in words {
        assert!(text.contains(w.as_str()), "{text:?} does not say {w:?}");
    }
    // QEMU refuses these reads too (no silent zeros on either side).
    if qemu_refuses {
        let q = Command::new("qemu-img")
            .args(["convert", "-O", "raw", p(img)])
            .arg(img.with_extension("qemu.raw"))
            .output()
            .unwrap();
        assert!(
            !q.status.success(),
            "qemu-img convert read it: QEMU accepts this stream"
        );
        let _ = std::fs::remove_file(img.with_extension("qemu.raw"));
    }
    assert_unchanged(&[img], &before, &format!("{words:?}"));
}

/// The positive control: the library reads `img` exactly as `qemu-img
/// convert -O raw` flattens it, and `map --json` equals `qemu-img map`.
fn assert_reads_like_qemu(img: &Path) {
    let raw = img.with_extension("control.raw");
    tool("qemu-img", &["convert", "-O", "raw", p(img), p(&raw)]);
    let want = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    let chain = Chain::open(img, Access::Read).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(chain.virtual_size(), want.len() as u64);
    let mut got = vec![0u8; want.len()];
    chain
        .reader()
        .read_at(0, &mut got)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        got == want,
        "{}: guest bytes differ from qemu-img convert",
        img.display()
    );
    let ours = run(&["map", "--json", p(img)]);
    assert_eq!(ours.status.code(), Some(0), "{}", stderr(&ours));
    let theirs = tool("qemu-img", &["map", "--output=json", p(img)]);
    assert_eq!(stdout(&ours), theirs, "{}: map --json", img.display());
}

/// A scratch copy of an image, patched by `f`, written beside it.
fn patched(src: &Path, name: &str, f: impl FnOnce(&mut Vec<u8>, &Layout)) -> PathBuf {
    let mut bytes = std::fs::read(src).unwrap();
    let l = Layout::of(&bytes);
    f(&mut bytes, &l);
    let out = src.with_file_name(name);
    std::fs::write(&out, &bytes).unwrap();
    out
}

/// The standard shape (EX1 of the reference): 4 MiB, 64 KiB clusters;
/// guest cluster 0 data, 1 zero, 2 compressed, 5 data.
fn standard(dir: &Path) -> PathBuf {
    let img = dir.join("std.qcow2");
    create(&img, "", "4M");
    qemu_io(
        &img,
        &[
            "write -P 0xaa 0 64k",
            "write -z 64k 64k",
            "write -c -P 0x11 128k 64k",
            "write -P 1 320k 64k",
        ],
    );
    img
}

/// A cluster beyond the end of `bytes`, cluster aligned.
fn past_eof(bytes: &[u8], l: &Layout) -> u64 {
    (bytes.len() as u64).next_multiple_of(l.cs) + 16 * l.cs
}

#[test]
fn l1_entries_pointing_anywhere_but_an_l2_table_are_refused() {
    if !qemu_available(
        "l1_entries_pointing_anywhere_but_an_l2_table_are_refused",
        TOOLS,
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = standard(dir.path());
    assert_reads_like_qemu(&img);
    let bytes = std::fs::read(&img).unwrap();
    let l = Layout::of(&bytes);
    let at = l.l1_at(0);
    let l2 = l.l2_table(&bytes, 0);
    let cases: Vec<(String, u64, &str)> = vec![
        (
            "past EOF".into(),
            COPIED | past_eof(&bytes, &l),
            "past the end of the file",
        ),
        (
            "unaligned".into(),
            COPIED | (l2 + 0x200),
            "not cluster aligned",
        ),
        (
            "refcount table".into(),
            COPIED | l.rt_offset,
            "refcount table",
        ),
        (
            "refcount block".into(),
            COPIED | l.refblock(&bytes),
            "refcount block",
        ),
        ("L1 table".into(), COPIED | l.l1_offset, "L1 table"),
    ]
    .into_iter()
    .chain((1..=8).chain(56..=62).map(|b| {
        (
            format!("reserved bit {b}"),
            COPIED | l2 | (1 << b),
            "reserved bits",
        )
    }))
    .collect();
    for (name, entry, what) in cases {
        let case = patched(&img, "case.qcow2", |b, _| put64(b, at, entry));
        eprintln!("L1 entry: {name}");
        assert_refused(
            &[&case],
            &l1_words(0, at, what),
            ErrorKind::Corrupt,
            (0, 64 * KIB),
        );
    }
}

#[test]
fn l2_entries_pointing_outside_the_file_or_at_metadata_are_refused() {
    if !qemu_available(
        "l2_entries_pointing_outside_the_file_or_at_metadata_are_refused",
        TOOLS,
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = standard(dir.path());
    let bytes = std::fs::read(&img).unwrap();
    let l = Layout::of(&bytes);
    // Guest cluster 5 (data) and 1 (zero) of L1 entry 0.
    let at5 = l.l2_at(&bytes, 0, 5);
    let at1 = l.l2_at(&bytes, 0, 1);
    let host5 = be64(&bytes, at5) & OFFSET_MASK;
    assert_ne!(host5, 0, "guest cluster 5 is data");
    let far = past_eof(&bytes, &l);
    let data = (5 * l.cs, l.cs);
    let cases: Vec<(&str, u64, u64, Range, &str)> = vec![
        (
            "data past EOF",
            at5,
            COPIED | far,
            data,
            "past the end of the file",
        ),
        (
            "data unaligned",
            at5,
            COPIED | (host5 + 0x200),
            data,
            "not cluster aligned",
        ),
        (
            "data at the refcount table",
            at5,
            COPIED | l.rt_offset,
            data,
            "refcount table",
        ),
        (
            "data at a refcount block",
            at5,
            COPIED | l.refblock(&bytes),
            data,
            "refcount block",
        ),
        (
            "data at the L1 table",
            at5,
            COPIED | l.l1_offset,
            data,
            "L1 table",
        ),
        (
            "preallocated zero past EOF",
            at1,
            COPIED | far | 1,
            (l.cs, l.cs),
            "past the end of the file",
        ),
        (
            "preallocated zero unaligned",
            at1,
            COPIED | (host5 + 0x200) | 1,
            (l.cs, l.cs),
            "not cluster aligned",
        ),
        (
            "preallocated zero at the L1 table",
            at1,
            COPIED | l.l1_offset | 1,
            (l.cs, l.cs),
            "L1 table",
        ),
    ];
    for (name, at, entry, range, what) in cases {
        let case = patched(&img, "case.qcow2", |b, _| put64(b, at, entry));
        eprintln!("L2 entry: {name}");
        let index = (at - l.l2_table(&bytes, 0)) / 8;
        assert_refused(
            &[&case],
            &l2_words(0, index, at, what),
            ErrorKind::Corrupt,
            range,
        );
    }
    // The file ends inside the last data cluster (QEMU reads the rest as zeros).
    let last = bytes.len() as u64;
    assert_eq!(
        host5 + l.cs,
        last,
        "guest cluster 5 is the file's last cluster"
    );
    let case = patched(&img, "short.qcow2", |b, _| {
        b.truncate((last - 4 * KIB) as usize)
    });
    assert_refused(
        &[&case],
        &l2_words(0, 5, at5, "runs past the end of the file"),
        ErrorKind::Corrupt,
        data,
    );
}

#[test]
fn reserved_bits_in_l2_entries_are_refused() {
    if !qemu_available("reserved_bits_in_l2_entries_are_refused", TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = standard(dir.path());
    let bytes = std::fs::read(&img).unwrap();
    let l = Layout::of(&bytes);
    for (index, kind) in [(5u64, "data"), (1, "zero"), (3, "unallocated")] {
        let at = l.l2_at(&bytes, 0, index);
        let entry = be64(&bytes, at);
        for bit in (1..=8).chain(56..=61) {
            let case = patched(&img, "case.qcow2", |b, _| put64(b, at, entry | (1 << bit)));
            eprintln!("L2 entry {index} ({kind}): reserved bit {bit}");
            assert_refused(
                &[&case],
                &l2_words(0, index, at, "reserved bits"),
                ErrorKind::Corrupt,
                (index * l.cs, l.cs),
            );
        }
    }
}

#[test]
fn zero_flag_in_a_version_2_image_is_refused() {
    if !qemu_available("zero_flag_in_a_version_2_image_is_refused", TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("v2.qcow2");
    create(&img, "compat=0.10", "1M");
    qemu_io(&img, &["write -P 5 0 64k", "write -P 6 192k 64k"]);
    assert_reads_like_qemu(&img);
    let bytes = std::fs::read(&img).unwrap();
    let l = Layout::of(&bytes);
    // On a data cluster (ZERO_ALLOC in v3) and on an unallocated one (ZERO_PLAIN in v3).
    for index in [0u64, 1] {
        let at = l.l2_at(&bytes, 0, index);
        let entry = be64(&bytes, at);
        let case = patched(&img, "case.qcow2", |b, _| put64(b, at, entry | 1));
        assert_refused(
            &[&case],
            &l2_words(0, index, at, "zero flag"),
            ErrorKind::Corrupt,
            (index * l.cs, l.cs),
        );
    }
}

#[test]
fn l1_table_too_small_for_the_virtual_size_is_refused() {
    if !qemu_available("l1_table_too_small_for_the_virtual_size_is_refused", TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 4 KiB clusters: one L2 table maps 2 MiB, so 4 MiB needs 2 L1 entries.
    let img = dir.path().join("small-l1.qcow2");
    create(&img, "cluster_size=4096", "4M");
    qemu_io(&img, &["write -P 7 0 4k", "write -P 8 3M 4k"]);
    assert_reads_like_qemu(&img);
    let case = patched(&img, "case.qcow2", |b, _| {
        b[36..40].copy_from_slice(&1u32.to_be_bytes())
    });
    let words = vec![
        "l1_size".to_string(),
        "at offset 36 ".to_string(),
        "too small".to_string(),
    ];
    assert_refused(&[&case], &words, ErrorKind::Corrupt, (3 * MIB, 4 * KIB));
}

/// Writes `stream` past the end of the file (512-aligned) and points the
/// compressed L2 entry at `at` to `len` bytes of it (default: all).
fn place_stream(b: &mut Vec<u8>, l: &Layout, at: u64, stream: &[u8], len: Option<u64>) {
    let off = (b.len() as u64).next_multiple_of(512) + 512;
    b.resize(off as usize, 0);
    b.extend_from_slice(stream);
    put64(
        b,
        at,
        l.compressed_entry(off, len.unwrap_or(stream.len() as u64)),
    );
}

fn deflate(data: &[u8]) -> Vec<u8> {
    use flate2::{Compress, Compression, FlushCompress};
    let mut c = Compress::new(Compression::new(6), false);
    let mut out = vec![0u8; data.len() + 4096];
    c.compress(data, &mut out, FlushCompress::Finish).unwrap();
    out.truncate(c.total_out() as usize);
    out
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(data, 3).unwrap()
}

/// Compressible but not trivial: a stream of several KiB.
fn cluster_data(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed;
    (0..len)
        .map(|i| {
            if i % 64 == 0 {
                splitmix64(&mut s);
            }
            (s >> ((i % 8) * 8)) as u8 & 0x0f
        })
        .collect()
}

/// Compressed-cluster refusals for one compression type; `img` has a
/// compressed guest cluster 2 (standard L2, 64 KiB clusters).
fn compressed_cases(img: &Path, compress: fn(&[u8]) -> Vec<u8>, name: &str) {
    let bytes = std::fs::read(img).unwrap();
    let l = Layout::of(&bytes);
    let at = l.l2_at(&bytes, 0, 2);
    let entry = be64(&bytes, at);
    assert_ne!(entry & COMPRESSED, 0, "guest cluster 2 is compressed");
    let range = (2 * l.cs, l.cs);
    let cs = l.cs as usize;
    let data = cluster_data(cs, 3);
    let good = compress(&data);
    assert!(
        good.len() > 2048 && good.len() < cs,
        "{name}: {} bytes",
        good.len()
    );

    // Control: our own stream, placed as QEMU places one, reads back (here and in QEMU).
    let ok = patched(img, "good.qcow2", |b, l| {
        place_stream(b, l, at, &good, None)
    });
    assert_reads_like_qemu(&ok);
    let chain = Chain::open(&ok, Access::Read).unwrap();
    let mut got = vec![0u8; cs];
    chain.reader().read_at(range.0, &mut got).unwrap();
    assert!(got == data, "{name}: the placed stream reads back wrong");

    let object = "compressed cluster (L1 index 0, L2 index 2)".to_string();
    let mut garbage = good.clone();
    garbage.iter_mut().for_each(|b| *b = 0xff);
    let short = compress(&data[..1000]);
    let mut cases: Vec<(&str, Vec<u8>, Option<u64>, &str)> = vec![
        ("garbage", garbage, None, "does not decompress"),
        ("short output", short, None, "less than the cluster"),
        // The descriptor covers only the first sector of a longer stream.
        ("truncated by the descriptor", good.clone(), Some(200), ""),
    ];
    if name == "zstd" {
        let long = compress(&cluster_data(2 * cs, 4));
        cases.push(("longer than a cluster", long, None, "more than the cluster"));
    }
    for (case, stream, len, what) in cases {
        eprintln!("{name}: {case}");
        let bad = patched(img, "case.qcow2", |b, l| {
            place_stream(b, l, at, &stream, len)
        });
        let host = Layout::of(&std::fs::read(&bad).unwrap())
            .decode_compressed(be64(&std::fs::read(&bad).unwrap(), at))
            .0;
        let mut words = vec![object.clone(), format!("at offset {host} ")];
        if !what.is_empty() {
            words.push(what.to_string());
        }
        assert_read_refused(&bad, &words, range, true);
    }
    // The stream cut by the end of the file (QEMU zero-fills the short read,
    // so whether it refuses depends on what the zeros decode to).
    let cut = patched(img, "cut.qcow2", |b, l| {
        place_stream(b, l, at, &good, None);
        b.truncate(b.len() - good.len() / 2);
    });
    assert_read_refused(&cut, std::slice::from_ref(&object), range, false);

    // Descriptors pointing past EOF or at metadata are refused by map too.
    let far = past_eof(&bytes, &l);
    for (case, off, what) in [
        ("past EOF", far, "past the end of the file"),
        ("into the header cluster", 0x200, "image header"),
        ("at the L1 table", l.l1_offset, "L1 table"),
        ("at the refcount table", l.rt_offset + 8, "refcount table"),
    ] {
        eprintln!("{name}: compressed data {case}");
        let bad = patched(img, "case.qcow2", |b, l| {
            put64(b, at, l.compressed_entry(off, 600))
        });
        assert_refused(
            &[&bad],
            &l2_words(0, 2, at, what),
            ErrorKind::Corrupt,
            range,
        );
    }
}

#[test]
fn deflate_clusters_that_do_not_decompress_to_a_cluster_are_refused() {
    if !qemu_available(
        "deflate_clusters_that_do_not_decompress_to_a_cluster_are_refused",
        TOOLS,
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = standard(dir.path());
    assert_reads_like_qemu(&img);
    compressed_cases(&img, deflate, "deflate");
}

#[test]
fn zstd_clusters_that_do_not_decompress_to_a_cluster_are_refused() {
    if !qemu_available(
        "zstd_clusters_that_do_not_decompress_to_a_cluster_are_refused",
        TOOLS,
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("zstd.qcow2");
    create(&img, "compression_type=zstd", "1M");
    qemu_io(&img, &["write -P 3 0 64k", "write -c -P 0x22 128k 64k"]);
    assert_reads_like_qemu(&img);
    compressed_cases(&img, zstd, "zstd");
}

#[test]
fn invalid_extended_l2_entries_are_refused() {
    if !qemu_available("invalid_extended_l2_entries_are_refused", TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ext.qcow2");
    create(&img, "extended_l2=on", "1M");
    // Cluster 0: subclusters 0-1 data, 4-5 zero; cluster 1 a whole zero
    // cluster (offset 0, zero bits); cluster 2 compressed.
    qemu_io(
        &img,
        &[
            "write -P 0xaa 0 4k",
            "write -z 8k 4k",
            "write -z 64k 64k",
            "write -c -P 0x11 128k 64k",
        ],
    );
    assert_reads_like_qemu(&img);
    let bytes = std::fs::read(&img).unwrap();
    let l = Layout::of(&bytes);
    assert!(l.extended);
    let at = |i| l.l2_at(&bytes, 0, i);
    let (e0, m0) = (be64(&bytes, at(0)), be64(&bytes, at(0) + 8));
    let m1 = be64(&bytes, at(1) + 8);
    let e2 = be64(&bytes, at(2));
    assert!(
        e0 & OFFSET_MASK != 0 && m0 & 1 != 0,
        "cluster 0 is allocated"
    );
    assert!(
        be64(&bytes, at(1)) & OFFSET_MASK == 0 && m1 >> 32 != 0,
        "cluster 1 is zero"
    );
    assert!(e2 & COMPRESSED != 0, "cluster 2 is compressed");
    let far = past_eof(&bytes, &l);
    // (index, word 0, bitmap, words)
    let cases: Vec<(u64, u64, u64, &str)> = vec![
        (0, e0, m0 | (1 << 32), "both allocated and zero"),
        (1, 0, m1 | 0x8, "allocated subclusters"),
        (2, e2, 1, "nonzero subcluster bitmap"),
        (2, e2, 1 << 40, "nonzero subcluster bitmap"),
        (0, e0 | (1 << 1), m0, "reserved bits"),
        (0, e0 | (1 << 57), m0, "reserved bits"),
        (0, COPIED | far, m0, "past the end of the file"),
        (
            0,
            COPIED | ((e0 & OFFSET_MASK) + 0x200),
            m0,
            "not cluster aligned",
        ),
        (0, COPIED | l.l1_offset, m0, "L1 table"),
    ];
    for (index, word, bitmap, what) in cases {
        eprintln!("extended L2 entry {index}: {word:#x} / {bitmap:#x}");
        let a = at(index);
        let case = patched(&img, "case.qcow2", |b, _| {
            put64(b, a, word);
            put64(b, a + 8, bitmap);
        });
        assert_refused(
            &[&case],
            &l2_words(0, index, a, what),
            ErrorKind::Corrupt,
            (index * l.cs, l.cs),
        );
    }
}

#[test]
fn data_file_entries_that_do_not_map_guest_offsets_are_refused() {
    if !qemu_available(
        "data_file_entries_that_do_not_map_guest_offsets_are_refused",
        TOOLS,
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("df.qcow2");
    let data = dir.path().join("d.raw");
    // An absolute data-file name: relative ones resolve against the cwd.
    create(&img, &format!("data_file={}", p(&data)), "1M");
    qemu_io(&img, &["write -P 1 0 64k", "write -P 2 128k 64k"]);
    assert_reads_like_qemu(&img);
    let bytes = std::fs::read(&img).unwrap();
    let l = Layout::of(&bytes);
    let at2 = l.l2_at(&bytes, 0, 2);
    let at1 = l.l2_at(&bytes, 0, 1);
    assert_eq!(
        be64(&bytes, at2),
        COPIED | (2 * l.cs),
        "data-file entry is COPIED|gofs"
    );
    let cases: Vec<(u64, u64, &str)> = vec![
        (2, COPIED | l.cs, "does not match the guest offset"),
        (2, COPIED | (3 * l.cs), "does not match the guest offset"),
        (1, l.compressed_entry(l.cs, 600), "external data file"),
    ];
    for (index, entry, what) in cases {
        let at = if index == 2 { at2 } else { at1 };
        let case = patched(&img, "case.qcow2", |b, _| put64(b, at, entry));
        eprintln!("data file: L2 entry {index} = {entry:#x}");
        assert_refused(
            &[&case, &data],
            &l2_words(0, index, at, what),
            ErrorKind::Corrupt,
            (index * l.cs, l.cs),
        );
    }
    // The data file ends inside guest cluster 2 (QEMU reads zeros there).
    let full = std::fs::read(&data).unwrap();
    std::fs::write(&data, &full[..(2 * l.cs + 4 * KIB) as usize]).unwrap();
    assert_refused(
        &[&img, &data],
        &l2_words(0, 2, at2, "past the end of the external data file"),
        ErrorKind::Corrupt,
        (2 * l.cs, l.cs),
    );
}

/// `base.qcow2` (data at 0) <- `top.qcow2` (data at 64k), both 1 MiB.
fn chain(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    create(&base, "", "1M");
    qemu_io(&base, &["write -P 0x11 0 64k"]);
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            p(&top),
            "1M",
        ],
    );
    qemu_io(&top, &["write -P 0x22 64k 64k"]);
    (base, top)
}

/// Replaces the backing file name of `img` (in place) by `name`, which
/// must have the same length as the stored one.
fn rename_backing(img: &Path, name: &str) {
    let mut b = std::fs::read(img).unwrap();
    let (off, len) = Layout::of(&b).backing.expect("a backing file");
    assert_eq!(len, name.len() as u64, "same-length name");
    b[off as usize..(off + len) as usize].copy_from_slice(name.as_bytes());
    std::fs::write(img, b).unwrap();
}

/// Creates `img` naming a placeholder backing file as long as `name`, then stores `name`.
fn with_backing_name(img: &Path, name: &str, format: &str) {
    let placeholder = "x".repeat(name.len());
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            &placeholder,
            "-F",
            format,
            p(img),
            "1M",
        ],
    );
    rename_backing(img, name);
}

#[test]
fn a_missing_backing_file_is_refused_naming_both_images() {
    if !qemu_available(
        "a_missing_backing_file_is_refused_naming_both_images",
        TOOLS,
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = chain(dir.path());
    assert_reads_like_qemu(&top);
    std::fs::remove_file(&base).unwrap();
    let words = vec![
        format!("backing file of '{}'", top.display()),
        p(&base).to_string(),
        "No such file".to_string(),
    ];
    assert_refused(&[&top], &words, ErrorKind::Io, (0, 64 * KIB));
}

/// Runs `f` on a thread; panics if it does not finish within `secs` (a hang).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .expect("did not finish in time (a backing loop hangs?)")
}

#[test]
fn backing_loops_are_refused_not_followed() {
    if !qemu_available("backing_loops_are_refused_not_followed", TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Self-loop.
    let selfie = dir.path().join("self.qcow2");
    with_backing_name(&selfie, "self.qcow2", "qcow2");
    // Two-image loop: a -> b -> a.
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    with_backing_name(&a, "b.qcow2", "qcow2");
    with_backing_name(&b, "a.qcow2", "qcow2");
    // The control: b naming a real base reads fine.
    let (_base, top) = chain(dir.path());
    assert_reads_like_qemu(&top);
    for files in [vec![selfie.clone()], vec![a.clone(), b.clone()]] {
        within(30, move || {
            let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
            let words = vec!["creates a loop".to_string(), "backing file".to_string()];
            assert_refused(&refs, &words, ErrorKind::Corrupt, (0, 64 * KIB));
        });
    }
}

#[test]
fn json_and_protocol_backing_names_are_refused() {
    if !qemu_available("json_and_protocol_backing_names_are_refused", TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_base, top) = chain(dir.path());
    assert_reads_like_qemu(&top);
    for name in [
        "nbd://x",
        "file:base.qcow2",
        "nbd+unix:///x?socket=/tmp/s",
        r#"json:{"file.filename":"base.qcow2"}"#,
    ] {
        let img = dir.path().join("named.qcow2");
        with_backing_name(&img, name, "qcow2");
        let off = Layout::of(&std::fs::read(&img).unwrap()).backing.unwrap().0;
        let words = vec![
            "backing file name".to_string(),
            format!("at offset {off} "),
            "protocol name".to_string(),
        ];
        eprintln!("backing name {name}");
        assert_refused(&[&img], &words, ErrorKind::Unsupported, (0, 64 * KIB));
    }
}

#[test]
fn a_backing_format_extension_naming_an_unknown_format_is_refused() {
    if !qemu_available(
        "a_backing_format_extension_naming_an_unknown_format_is_refused",
        TOOLS,
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = chain(dir.path());
    assert_reads_like_qemu(&top);
    for fmt in ["qcow3", "vmdk2", "QCOW2"] {
        let case = patched(&top, "case.qcow2", |b, l| {
            let (off, len) = l.backing_format.expect("a backing-format extension");
            assert_eq!(len, 5, "\"qcow2\"");
            b[off as usize..off as usize + 5].copy_from_slice(fmt.as_bytes());
        });
        let words = vec!["backing file format".to_string(), format!("'{fmt}'")];
        assert_refused(
            &[&case, &base],
            &words,
            ErrorKind::Unsupported,
            (0, 64 * KIB),
        );
    }
}

#[test]
fn encrypted_images_are_refused() {
    if !qemu_available("encrypted_images_are_refused", TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (fmt, how) in [("aes", "AES"), ("luks", "LUKS")] {
        let img = dir.path().join(format!("{fmt}.qcow2"));
        tool(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "--object",
                "secret,id=s0,data=pw",
                "-o",
                &format!("encrypt.format={fmt},encrypt.key-secret=s0"),
                p(&img),
                "1M",
            ],
        );
        let words = vec![
            "crypt_method".to_string(),
            "at offset 32 ".to_string(),
            format!("encrypted ({how})"),
        ];
        assert_refused(&[&img], &words, ErrorKind::Unsupported, (0, 64 * KIB));
        // The control: the bitmap commands still read the image (v1 contract).
        let o = run(&["info", "--json", p(&img)]);
        assert_eq!(o.status.code(), Some(0), "info {fmt}: {}", stderr(&o));
    }
}

/// Seeds for the mutation loop: small QEMU-made images with data, zero,
/// compressed (deflate and zstd), extended-L2 and version-2 clusters.
fn seeds(dir: &Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (name, opts, cmds) in [
        (
            "s-std",
            "cluster_size=4096",
            vec![
                "write -P 1 0 4k",
                "write -z 4k 4k",
                "write -c -P 2 8k 4k",
                "write -P 3 1M 8k",
            ],
        ),
        (
            "s-ext",
            "cluster_size=16384,extended_l2=on",
            vec![
                "write -P 1 0 1k",
                "write -z 2k 1k",
                "write -c -P 2 16k 16k",
                "write -z 32k 16k",
            ],
        ),
        (
            "s-zstd",
            "cluster_size=4096,compression_type=zstd",
            vec![
                "write -c -P 4 0 4k",
                "write -P 5 4k 4k",
                "write -c -s SRC 8k 4k",
            ],
        ),
        (
            "s-v2",
            "cluster_size=4096,compat=0.10",
            vec!["write -P 6 0 8k"],
        ),
    ] {
        let img = dir.join(format!("{name}.qcow2"));
        let src = dir.join("src.bin");
        std::fs::write(&src, cluster_data(4096, 9)).unwrap();
        create(&img, opts, "2M");
        let cmds: Vec<String> = cmds.iter().map(|c| c.replace("SRC", p(&src))).collect();
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(&img, &cmds);
        assert_reads_like_qemu(&img);
        out.push(std::fs::read(&img).unwrap());
    }
    out
}

/// Everything the data commands do with an image: open, map all, read a few ranges.
/// Returns whether everything succeeded.
fn exercise(path: &Path) -> bool {
    let chain = match Chain::open(path, Access::Read) {
        Ok(c) => c,
        Err(e) => {
            assert!(!e.to_string().contains('\n'));
            return false;
        }
    };
    let size = chain.virtual_size();
    let mut r = chain.reader();
    let mut ok = true;
    let mut buf = vec![0u8; 96 * KIB as usize];
    let mut zeros = Vec::new();
    if let Ok(it) = r.map(0, size) {
        let mut pos = 0;
        for e in it.take(10_000) {
            match e {
                Ok(e) => {
                    assert!(
                        e.start == pos && e.length > 0 && e.end() <= size,
                        "{e:?} at {pos}"
                    );
                    pos = e.end();
                    if e.zero && zeros.len() < 8 {
                        zeros.push((e.start, e.length.min(buf.len() as u64)));
                    }
                }
                Err(e) => {
                    assert!(!e.to_string().contains('\n'));
                    ok = false;
                    break;
                }
            }
        }
    }
    // What map says reads as zeros reads as zeros.
    for (start, len) in zeros {
        let part = &mut buf[..len as usize];
        match r.read_at(start, part) {
            Ok(()) => assert!(part.iter().all(|&b| b == 0), "map: zeros at {start}+{len}"),
            Err(e) => {
                assert!(!e.to_string().contains('\n'));
                ok = false;
            }
        }
    }
    for start in [
        0,
        4 * KIB,
        16 * KIB,
        MIB,
        size.saturating_sub(buf.len() as u64),
    ] {
        let len = (buf.len() as u64).min(size.saturating_sub(start));
        if len == 0 {
            continue;
        }
        if let Err(e) = r.read_at(start, &mut buf[..len as usize]) {
            assert!(!e.to_string().contains('\n'));
            ok = false;
        }
    }
    ok
}

/// One mutation: a bit flip or a u64/u32 overwrite, at a structure's offset
/// (header, L1, L2, a compressed stream) or anywhere.
fn mutate(b: &mut [u8], rng: &mut u64) {
    let r = splitmix64(rng);
    let len = b.len() as u64;
    let l = Header::decode(b).ok().map(|_| Layout::of_lenient(b));
    let at = match (r % 4, &l) {
        (0, _) => splitmix64(rng) % 112,
        (1, Some(l)) if l.l1_offset < len => l.l1_offset + (splitmix64(rng) % 64),
        (2, Some(l)) => {
            let l2 = be64(b, l.l1_offset.min(len - 8)) & OFFSET_MASK;
            if l2 > 0 && l2 < len {
                l2 + splitmix64(rng) % 256
            } else {
                splitmix64(rng) % len
            }
        }
        _ => splitmix64(rng) % len,
    }
    .min(len - 8);
    let v = splitmix64(rng);
    match (r >> 8) % 5 {
        0 | 1 => b[at as usize] ^= 1 << (v % 8),
        2 => put64(b, at, v),
        3 => put64(
            b,
            at,
            [0, u64::MAX, 1 << 63, 1 << 62, len, len + 512][(v % 6) as usize],
        ),
        _ => {
            b[at as usize..at as usize + 4].copy_from_slice(&((v as u32) >> (v % 32)).to_be_bytes())
        }
    }
}

impl Layout {
    /// [`Layout::of`] for mutated bytes: never panics (fields it cannot decode stay 0).
    fn of_lenient(b: &[u8]) -> Layout {
        let h = Header::decode(b).expect("checked by the caller");
        Layout {
            cb: h.cluster_bits,
            cs: 1 << h.cluster_bits.min(31),

            l1_offset: h.l1_table_offset,
            rt_offset: h.refcount_table_offset,
            extended: false,
            backing: None,
            backing_format: None,
        }
    }
}

#[test]
fn mutated_images_never_panic() {
    if !qemu_available("mutated_images_never_panic", TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let seeds = seeds(dir.path());
    // tmpfs when there is one: thousands of small files.
    let scratch = tempfile::tempdir_in(if Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    })
    .unwrap();
    let path = scratch.path().join("m.qcow2");
    let seed = env_u64("QCOW2_BITMAP_SEED").unwrap_or(0x6775_6573_7421);
    let trials = env_u64("QCOW2_BITMAP_MUTATIONS").unwrap_or(3000);
    let t0 = std::time::Instant::now();
    let (mut ok, mut refused) = (0, 0);
    for i in 0..trials {
        let mut rng = seed ^ i.wrapping_mul(0x9e37_79b9);
        let mut bytes = seeds[(splitmix64(&mut rng) % seeds.len() as u64) as usize].clone();
        let n = 1 + splitmix64(&mut rng) % 4;
        for _ in 0..n {
            mutate(&mut bytes, &mut rng);
        }
        std::fs::write(&path, &bytes).unwrap();
        let result = std::panic::catch_unwind(|| exercise(&path));
        match result {
            Ok(true) => ok += 1,
            Ok(false) => refused += 1,
            Err(_) => {
                let keep = std::env::temp_dir().join(format!("guest-panic-{seed:x}-{i}.qcow2"));
                std::fs::write(&keep, &bytes).unwrap();
                panic!(
                    "mutation {i} (QCOW2_BITMAP_SEED={seed:#x}) panicked; input kept in {}",
                    keep.display()
                );
            }
        }
    }
    eprintln!(
        "guest mutations: {trials} in {:?}: {ok} read fine, {refused} refused",
        t0.elapsed()
    );
    // Both outcomes occur, so the loop exercises the readers, not just the header check.
    assert!(
        ok > trials / 20 && refused > trials / 20,
        "ok {ok}, refused {refused}"
    );
}
