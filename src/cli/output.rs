//! What the commands print: serde documents for `--json` (kebab-case keys,
//! as `qemu-img --output=json`) and the human renderings of the same data.

use qcow2_bitmap::format::bitmap_table::TableEntry;
use qcow2_bitmap::format::extensions::Extension;
use qcow2_bitmap::read::{BitmapEntry, Extent, Gaps, Image, Run};
use qcow2_bitmap::report::{BitmapRow, InfoDoc};
use qcow2_bitmap::storage::ReadAt;
use serde::Serialize;
use std::io::{self, Write};
use std::path::Path;

use super::size::human;

/// Writes one pretty JSON document and a newline.
pub fn write_json(out: &mut impl Write, doc: &impl Serialize) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, doc).map_err(io::Error::other)?;
    writeln!(out)
}

/// Columns of the human density picture.
pub const DENSITY_COLUMNS: u64 = 64;

/// Human `info`.
pub fn write_info<S: ReadAt>(
    out: &mut impl Write,
    doc: &InfoDoc,
    image: &Image<S>,
) -> io::Result<()> {
    writeln!(out, "image:          {}", doc.filename)?;
    writeln!(out, "format:         qcow2, version {}", doc.version)?;
    writeln!(
        out,
        "virtual size:   {} ({} bytes)",
        human(doc.virtual_size),
        doc.virtual_size
    )?;
    writeln!(out, "cluster size:   {}", human(doc.cluster_size))?;
    writeln!(out, "refcount bits:  {}", doc.refcount_bits)?;
    let features = if doc.features.is_empty() {
        "none".to_string()
    } else {
        doc.features.join(", ")
    };
    writeln!(out, "features:       {features}")?;
    if let Some(name) = &doc.backing_filename {
        let full = doc.full_backing_filename.as_deref().unwrap_or(name);
        if full == name {
            writeln!(out, "backing file:   {}", shown(name))?;
        } else {
            writeln!(
                out,
                "backing file:   {} (actual path: {})",
                shown(name),
                shown(full)
            )?;
        }
        let format = doc
            .backing_filename_format
            .as_deref()
            .unwrap_or("(none: probed)");
        writeln!(out, "backing format: {}", shown(format))?;
    }
    if let Some(name) = &doc.data_file {
        let raw = if doc.data_file_raw == Some(true) {
            " (data_file_raw: a valid raw image)"
        } else {
            ""
        };
        writeln!(out, "data file:      {}{raw}", shown(name))?;
    }
    let consistent = match (doc.bitmaps_consistent, doc.version) {
        (true, _) => "consistent",
        (false, 2) => "STALE: version 2 images cannot mark bitmaps consistent",
        (false, _) => "STALE: autoclear bit 0 is clear",
    };
    match image.bitmaps_view().extension {
        None => writeln!(out, "bitmaps:        none")?,
        Some(_) => writeln!(out, "bitmaps:        {} ({consistent})", doc.bitmaps.len())?,
    }
    if let Some(p) = &doc.bitmaps_problem {
        writeln!(out, "problem:        {p}")?;
    }
    if doc.bitmaps.is_empty() {
        return Ok(());
    }
    writeln!(out)?;
    write_bitmap_table(out, doc)?;
    write_density(out, doc)
}

/// A bitmap name for the human output: control characters escaped, so a
/// hostile name cannot break lines or forge output (JSON keeps it raw).
pub fn shown(name: &str) -> String {
    qcow2_bitmap::format::directory::display_name(name.as_bytes())
}

fn write_bitmap_table(out: &mut impl Write, doc: &InfoDoc) -> io::Result<()> {
    let width = doc
        .bitmaps
        .iter()
        .map(|b| shown(&b.name).chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    writeln!(
        out,
        "{:<width$}  {:>11}  {:<12}  {:>22}  STATE",
        "NAME", "GRANULARITY", "FLAGS", "DIRTY"
    )?;
    for b in &doc.bitmaps {
        let flags = if b.flags.is_empty() {
            "-".to_string()
        } else {
            b.flags.join(",")
        };
        let dirty = match b.dirty_bytes {
            Some(n) => format!("{} {:>7}", human(n), percent(n, doc.virtual_size)),
            None => "-".to_string(),
        };
        let gran = human(b.granularity);
        writeln!(
            out,
            "{:<width$}  {gran:>11}  {flags:<12}  {dirty:>22}  {}",
            shown(&b.name),
            b.state
        )?;
        if let Some(p) = &b.problem {
            writeln!(out, "{:<width$}  -> {p}", "")?;
        }
    }
    Ok(())
}

fn percent(n: u64, total: u64) -> String {
    if total == 0 {
        return "0%".into();
    }
    let p = n as f64 * 100.0 / total as f64;
    if n > 0 && p < 0.01 {
        "<0.01%".into()
    } else {
        format!("{p:.2}%")
    }
}

fn write_density(out: &mut impl Write, doc: &InfoDoc) -> io::Result<()> {
    let rows: Vec<&BitmapRow> = doc.bitmaps.iter().filter(|b| b.density.is_some()).collect();
    if rows.is_empty() {
        return Ok(());
    }
    let col = doc.virtual_size.div_ceil(DENSITY_COLUMNS).max(1);
    writeln!(out)?;
    writeln!(
        out,
        "dirty map (one column = {}; ' ' clean, '.' <1%, 1-9 tenths, '#' full):",
        human(col)
    )?;
    let width = rows
        .iter()
        .map(|b| shown(&b.name).chars().count())
        .max()
        .unwrap_or(0);
    for b in rows {
        let cols = b.density.as_deref().unwrap_or(&[]);
        let strip: String = cols
            .iter()
            .enumerate()
            .map(|(i, &d)| density_char(d, column_len(i as u64, col, doc.virtual_size)))
            .collect();
        writeln!(out, "{:<width$}  |{strip}|", shown(&b.name))?;
    }
    Ok(())
}

fn column_len(i: u64, col: u64, size: u64) -> u64 {
    ((i + 1) * col).min(size).saturating_sub(i * col)
}

fn density_char(dirty: u64, len: u64) -> char {
    if dirty == 0 || len == 0 {
        return ' ';
    }
    if dirty >= len {
        return '#';
    }
    let tenths = dirty * 10 / len;
    if tenths == 0 {
        '.'
    } else {
        char::from(b'0' + tenths as u8)
    }
}

/// Prints extents as they stream in; with `all`, fills the clean gaps.
#[derive(Debug)]
pub struct ExtentPrinter {
    json: bool,
    all: bool,
    gaps: Gaps,
    first: bool,
}

impl ExtentPrinter {
    /// A printer for the range `[lo, hi)`.
    pub fn new(json: bool, all: bool, lo: u64, hi: u64) -> Self {
        ExtentPrinter {
            json,
            all,
            gaps: Gaps::new(lo, hi),
            first: true,
        }
    }

    fn line(&mut self, out: &mut impl Write, r: Run) -> io::Result<()> {
        let Run {
            offset,
            length,
            dirty,
        } = r;
        if self.json {
            let sep = if self.first { "[\n" } else { ",\n" };
            write!(
                out,
                "{sep}  {{\"offset\": {offset}, \"length\": {length}, \"dirty\": {dirty}}}"
            )?;
        } else {
            writeln!(
                out,
                "{offset} {length} {}",
                if dirty { "dirty" } else { "clean" }
            )?;
        }
        self.first = false;
        Ok(())
    }

    /// One dirty extent.
    pub fn dirty(&mut self, out: &mut impl Write, e: Extent) -> io::Result<()> {
        let (gap, run) = self.gaps.dirty(e);
        if let Some(gap) = gap.filter(|_| self.all) {
            self.line(out, gap)?;
        }
        self.line(out, run)
    }

    /// Ends the listing.
    pub fn finish(&mut self, out: &mut impl Write) -> io::Result<()> {
        if let Some(tail) = self.gaps.finish().filter(|_| self.all) {
            self.line(out, tail)?;
        }
        if self.json {
            writeln!(out, "{}", if self.first { "[]" } else { "\n]" })?;
        }
        Ok(())
    }
}

/// The `dump` document (layout documented in the README).
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DumpDoc {
    filename: String,
    file_size: u64,
    header: Vec<Field>,
    extensions: Vec<ExtRow>,
    #[serde(skip_serializing_if = "Option::is_none")]
    end_marker_offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bitmaps_extension: Option<Vec<Field>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bitmaps_problem: Option<String>,
    directory: Vec<EntryRow>,
    #[serde(skip_serializing_if = "Option::is_none")]
    table: Option<TableDump>,
}

/// One named field with its file offset and value.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Field {
    name: &'static str,
    offset: u64,
    value: u64,
}

fn field(name: &'static str, offset: u64, value: impl Into<u64>) -> Field {
    Field {
        name,
        offset,
        value: value.into(),
    }
}

/// One header extension.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ExtRow {
    offset: u64,
    #[serde(rename = "type")]
    kind: String,
    name: &'static str,
    length: usize,
    padding_ok: bool,
}

/// One directory entry, raw.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct EntryRow {
    index: usize,
    offset: u64,
    name: String,
    table_offset: u64,
    table_size: u32,
    flags: u32,
    #[serde(rename = "type")]
    kind: u8,
    granularity_bits: u8,
    name_size: usize,
    extra_data_size: usize,
    padding_ok: bool,
    state: &'static str,
    problems: Vec<String>,
}

/// A bitmap's table, raw.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TableDump {
    bitmap: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    entries: Vec<TableRow>,
}

/// One table entry: raw value and what it means.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TableRow {
    index: usize,
    raw: String,
    kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_offset: Option<u64>,
}

/// Reads `b`'s raw table for `dump --bitmap`.
pub fn dump_table<S: ReadAt>(image: &Image<S>, b: &BitmapEntry) -> TableDump {
    let (raw, error) = match image.raw_table(b) {
        Ok(raw) => (raw, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    let entries = raw
        .iter()
        .enumerate()
        .map(|(index, &r)| {
            let e = TableEntry::decode(r, image.geometry());
            let (kind, data_offset) = match e {
                TableEntry::Zeros => ("zeros".to_string(), None),
                TableEntry::Ones => ("ones".to_string(), None),
                TableEntry::Data(off) => ("data".to_string(), Some(off)),
                TableEntry::Invalid(why) => (format!("invalid: {why}"), None),
            };
            TableRow {
                index,
                raw: format!("0x{r:016x}"),
                kind,
                data_offset,
            }
        })
        .collect();
    TableDump {
        bitmap: b.name(),
        error,
        entries,
    }
}

impl DumpDoc {
    /// Gathers every structure.
    pub fn new<S: ReadAt>(path: &Path, image: &Image<S>, table: Option<TableDump>) -> Self {
        let view = image.bitmaps_view();
        DumpDoc {
            filename: path.display().to_string(),
            file_size: image.storage().len(),
            header: header_fields(image),
            extensions: image
                .extensions()
                .iter()
                .map(|e| ext_row(e, image.bitmaps_length()))
                .collect(),
            end_marker_offset: image.end_marker(),
            bitmaps_extension: view.extension.map(|(e, at)| {
                vec![
                    field("nb_bitmaps", at, e.nb_bitmaps),
                    field("reserved", at + 4, e.reserved),
                    field("bitmap_directory_size", at + 8, e.directory_size),
                    field("bitmap_directory_offset", at + 16, e.directory_offset),
                ]
            }),
            bitmaps_problem: view.problem.as_ref().map(|e| e.to_string()),
            directory: image.bitmaps().iter().map(entry_row).collect(),
            table,
        }
    }
}

fn header_fields<S: ReadAt>(image: &Image<S>) -> Vec<Field> {
    let h = image.header();
    let mut f = vec![
        field("magic", 0, 0x5146_49fb_u32),
        field("version", 4, h.version),
        field("backing_file_offset", 8, h.backing_file_offset),
        field("backing_file_size", 16, h.backing_file_size),
        field("cluster_bits", 20, h.cluster_bits),
        field("size", 24, h.size),
        field("crypt_method", 32, h.crypt_method),
        field("l1_size", 36, h.l1_size),
        field("l1_table_offset", 40, h.l1_table_offset),
        field("refcount_table_offset", 48, h.refcount_table_offset),
        field("refcount_table_clusters", 56, h.refcount_table_clusters),
        field("nb_snapshots", 60, h.nb_snapshots),
        field("snapshots_offset", 64, h.snapshots_offset),
    ];
    if h.version >= 3 {
        f.extend([
            field("incompatible_features", 72, h.incompatible_features),
            field("compatible_features", 80, h.compatible_features),
            field("autoclear_features", 88, h.autoclear_features),
            field("refcount_order", 96, h.refcount_order),
            field("header_length", 100, h.header_length),
        ]);
        if h.header_length > 104 {
            f.push(field("compression_type", 104, h.compression_type()));
        }
    }
    f
}

/// One extension as found; a bitmaps extension read as its fixed 24 bytes
/// shows the length field as it is on disk.
fn ext_row(e: &Extension, bad: Option<qcow2_bitmap::format::extensions::BitmapsLength>) -> ExtRow {
    let declared = bad
        .filter(|l| l.offset == e.offset)
        .map(|l| l.declared as usize);
    ExtRow {
        offset: e.offset,
        kind: format!("0x{:08x}", e.kind),
        name: e.kind_name(),
        length: declared.unwrap_or(e.data.len()),
        padding_ok: e.padding_is_zero,
    }
}

fn entry_row(b: &BitmapEntry) -> EntryRow {
    let e = &b.entry;
    EntryRow {
        index: b.index,
        offset: e.offset,
        name: b.name(),
        table_offset: e.table_offset,
        table_size: e.table_size,
        flags: e.flags,
        kind: e.kind,
        granularity_bits: e.granularity_bits,
        name_size: e.name.len(),
        extra_data_size: e.extra_data.len(),
        padding_ok: e.padding_is_zero,
        state: b.state.as_str(),
        problems: b
            .problems
            .iter()
            .map(|p| format!("{} (at offset {})", p.message, p.offset))
            .collect(),
    }
}

/// Human `dump`.
pub fn write_dump(out: &mut impl Write, d: &DumpDoc) -> io::Result<()> {
    writeln!(out, "file: {} ({} bytes)", d.filename, d.file_size)?;
    writeln!(out, "\nheader:")?;
    for f in &d.header {
        writeln!(
            out,
            "  {:>6}  {:<24} {:>20}  0x{:x}",
            f.offset, f.name, f.value, f.value
        )?;
    }
    writeln!(out, "\nheader extensions:")?;
    for e in &d.extensions {
        let pad = if e.padding_ok {
            ""
        } else {
            "  (nonzero padding)"
        };
        writeln!(
            out,
            "  {:>6}  {}  {:<36} length {}{pad}",
            e.offset, e.kind, e.name, e.length
        )?;
    }
    match d.end_marker_offset {
        Some(off) => writeln!(out, "  {off:>6}  end marker")?,
        None => writeln!(out, "  (no end marker before the end of the area)")?,
    }
    if let Some(fields) = &d.bitmaps_extension {
        writeln!(out, "\nbitmaps extension:")?;
        for f in fields {
            writeln!(
                out,
                "  {:>6}  {:<24} {:>20}  0x{:x}",
                f.offset, f.name, f.value, f.value
            )?;
        }
    }
    if let Some(p) = &d.bitmaps_problem {
        writeln!(out, "  problem: {p}")?;
    }
    write_dump_directory(out, d)?;
    if let Some(t) = &d.table {
        write_dump_table(out, t)?;
    }
    Ok(())
}

fn write_dump_directory(out: &mut impl Write, d: &DumpDoc) -> io::Result<()> {
    if d.directory.is_empty() {
        return Ok(());
    }
    writeln!(out, "\nbitmap directory:")?;
    for e in &d.directory {
        writeln!(
            out,
            "  [{}] at {} (0x{:x}): '{}'",
            e.index,
            e.offset,
            e.offset,
            shown(&e.name)
        )?;
        writeln!(
            out,
            "      table_offset 0x{:x}  table_size {}  flags 0x{:x}  type {}  granularity_bits {}",
            e.table_offset, e.table_size, e.flags, e.kind, e.granularity_bits
        )?;
        writeln!(
            out,
            "      name_size {}  extra_data_size {}  state {}",
            e.name_size, e.extra_data_size, e.state
        )?;
        for p in &e.problems {
            writeln!(out, "      problem: {p}")?;
        }
    }
    Ok(())
}

fn write_dump_table(out: &mut impl Write, t: &TableDump) -> io::Result<()> {
    writeln!(out, "\nbitmap table of '{}':", shown(&t.bitmap))?;
    if let Some(e) = &t.error {
        writeln!(out, "  error: {e}")?;
    }
    for r in &t.entries {
        match r.data_offset {
            Some(off) => writeln!(
                out,
                "  {:>8}  {}  data at {off} (0x{off:x})",
                r.index, r.raw
            )?,
            None => writeln!(out, "  {:>8}  {}  {}", r.index, r.raw, r.kind)?,
        }
    }
    Ok(())
}
