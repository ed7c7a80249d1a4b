//! A seeded random sequence of write operations (add, remove, clear, enable,
//! disable, merge from bitmaps of the same image and from synthetic sources,
//! several operations per transaction, expected refusals) on writable
//! fixtures held in memory, checked against an in-memory model after every
//! operation by our read path, and periodically by QEMU (`qemu-img check`,
//! `qemu-img info`, QMP sha256 and `qemu-img compare` for guest data).
//!
//! `QCOW2_BITMAP_SEED=N` (decimal or 0x-hex) replays a run; the seed in use is
//! printed. `QCOW2_BITMAP_OPS=N` changes the number of steps per fixture,
//! `QCOW2_BITMAP_FIXTURES=a.qcow2,b.qcow2` the fixtures.

use crate::util::*;
use qcow2_bitmap::bits::Bitmap;
use qcow2_bitmap::bits::resample::resample;
use qcow2_bitmap::read::{BitmapState, Image, hex};
use qcow2_bitmap::write::{MergeSource, Transaction};
use std::fmt;
use std::path::Path;
use std::process::Command;

const FIXTURES: [&str; 3] = ["cs512.qcow2", "several.qcow2", "rc1.qcow2"];
const DEFAULT_SEED: u64 = 0x5eed_b17a_0c0f_fee5;
const DEFAULT_STEPS: usize = 500;
/// QEMU judges the image every this many steps (and after the last).
const QEMU_EVERY: usize = 25;
/// Above this many bitmaps, additions give way to removals.
const MAX_BITMAPS: usize = 9;

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        splitmix64(&mut self.0)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `pct` percent.
    fn pct(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// One bitmap of the model.
#[derive(Clone, PartialEq)]
struct ModelBitmap {
    name: String,
    enabled: bool,
    granularity_bits: u32,
    bits: Bitmap,
    /// Whether the bits past the end in the last 64-bit word may be set on
    /// disk (some fixtures have them; QEMU's sha256 covers them): true for a
    /// fixture bitmap whose hash says so, until it is cleared.
    dirty_tail: bool,
}

/// Bitmaps in directory order.
type Model = Vec<ModelBitmap>;

fn find<'a>(model: &'a Model, name: &str) -> Option<&'a ModelBitmap> {
    model.iter().find(|b| b.name == name)
}

/// Where merged bits come from.
enum Source {
    /// A bitmap of the same image (as staged so far in the transaction).
    Named(String),
    /// Bits from elsewhere (like `merge --source-image`).
    Synthetic {
        bits: Bitmap,
        granularity_bits: u32,
        virtual_size: u64,
    },
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Named(n) => write!(f, "{n:?}"),
            Source::Synthetic {
                bits,
                granularity_bits,
                virtual_size,
            } => write!(
                f,
                "synthetic(granularity 2^{granularity_bits}, size {virtual_size}, {} of {} bits set)",
                bits.count_ones(),
                bits.len()
            ),
        }
    }
}

#[derive(Debug)]
enum Op {
    Add {
        name: String,
        granularity: Option<u64>,
        enabled: bool,
    },
    Remove(Vec<String>),
    Clear(String),
    SetEnabled(String, bool),
    /// `target |= source` for each source in turn.
    Merge {
        target: String,
        sources: Vec<Source>,
    },
}

/// Image facts the model needs.
#[derive(Clone, Copy)]
struct Dims {
    virtual_size: u64,
    cluster_size: u64,
}

impl Dims {
    fn nbits(&self, granularity_bits: u32) -> u64 {
        self.virtual_size.div_ceil(1 << granularity_bits)
    }
}

/// Applies `op` to the model, or returns the refusal it must get (a
/// substring of the error message).
fn apply_model(model: &mut Model, op: &Op, d: Dims) -> Result<(), &'static str> {
    match op {
        Op::Add {
            name,
            granularity,
            enabled,
        } => {
            if name.is_empty() {
                return Err("is empty");
            }
            if find(model, name).is_some() {
                return Err("already exists");
            }
            let g = granularity.unwrap_or(d.cluster_size.clamp(4096, 65536));
            if !g.is_power_of_two() || !(512..=1 << 31).contains(&g) {
                return Err("not a power of two");
            }
            let gb = g.trailing_zeros();
            model.push(ModelBitmap {
                name: name.clone(),
                enabled: *enabled,
                granularity_bits: gb,
                bits: Bitmap::zeros(d.nbits(gb)),
                dirty_tail: false,
            });
        }
        Op::Remove(names) => {
            for (i, n) in names.iter().enumerate() {
                if names[..i].contains(n) {
                    return Err("named twice");
                }
                if find(model, n).is_none() {
                    return Err("not found");
                }
            }
            model.retain(|b| !names.contains(&b.name));
        }
        Op::Clear(name) => {
            let b = model
                .iter_mut()
                .find(|b| &b.name == name)
                .ok_or("not found")?;
            b.bits = Bitmap::zeros(b.bits.len());
            b.dirty_tail = false;
        }
        Op::SetEnabled(name, on) => {
            let b = model
                .iter_mut()
                .find(|b| &b.name == name)
                .ok_or("not found")?;
            b.enabled = *on;
        }
        Op::Merge { target, sources } => {
            for s in sources {
                let t = find(model, target).ok_or("not found")?;
                let (src_bits, src_gb) = match s {
                    Source::Named(n) => {
                        let b = find(model, n).ok_or("not found")?;
                        (b.bits.clone(), b.granularity_bits)
                    }
                    Source::Synthetic {
                        bits,
                        granularity_bits,
                        virtual_size,
                    } => {
                        if *virtual_size != d.virtual_size {
                            return Err("cannot be merged");
                        }
                        (bits.clone(), *granularity_bits)
                    }
                };
                let r = resample(&src_bits, src_gb, t.granularity_bits, t.bits.len());
                let t = model.iter_mut().find(|b| &b.name == target).unwrap();
                t.bits.or_assign(&r).expect("same length");
            }
        }
    }
    Ok(())
}

fn apply_tx(tx: &mut Transaction<Vec<u8>>, op: &Op) -> qcow2_bitmap::Result<()> {
    match op {
        Op::Add {
            name,
            granularity,
            enabled,
        } => tx.add(name, *granularity, *enabled),
        Op::Remove(names) => {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            tx.remove(&names)
        }
        Op::Clear(name) => tx.clear(name),
        Op::SetEnabled(name, on) => tx.set_enabled(name, *on),
        Op::Merge { target, sources } => {
            for s in sources {
                match s {
                    // Both library paths: streamed cluster by cluster, and
                    // loaded + resampled (chosen by the name, so a seed replays).
                    Source::Named(n) if n.len() % 2 == 0 => tx.merge_bitmap(target, n)?,
                    Source::Named(n) => {
                        let (bits, gb) = tx.load(n)?;
                        let size = tx.virtual_size();
                        tx.merge(
                            target,
                            &MergeSource {
                                bits: &bits,
                                granularity_bits: gb,
                                virtual_size: size,
                            },
                        )?;
                    }
                    Source::Synthetic {
                        bits,
                        granularity_bits,
                        virtual_size,
                    } => tx.merge(
                        target,
                        &MergeSource {
                            bits,
                            granularity_bits: *granularity_bits,
                            virtual_size: *virtual_size,
                        },
                    )?,
                }
            }
            Ok(())
        }
    }
}

/// Random granularity bits, 512 B ..= 2 GiB, favouring the small end a little.
fn random_gb(rng: &mut Rng) -> u32 {
    if rng.pct(50) {
        rng.between(9, 20) as u32
    } else {
        rng.between(9, 31) as u32
    }
}

/// A synthetic source of `virtual_size` with a few random dirty ranges.
fn synthetic(rng: &mut Rng, virtual_size: u64) -> Source {
    let gb = random_gb(rng);
    let n = virtual_size.div_ceil(1 << gb);
    let mut bits = Bitmap::zeros(n);
    if rng.pct(4) {
        bits = Bitmap::ones(n);
    } else {
        for _ in 0..rng.between(1, 4) {
            let start = rng.below(n);
            let max_len = (n >> rng.between(0, 12)).max(1);
            let len = rng.between(1, max_len);
            bits.set_range(start..(start + len).min(n));
        }
    }
    Source::Synthetic {
        bits,
        granularity_bits: gb,
        virtual_size,
    }
}

/// A name not in the model.
fn fresh_name(rng: &mut Rng, model: &Model, counter: &mut u32) -> String {
    *counter += 1;
    let name = match rng.below(20) {
        0 => format!("ckpt ü-{counter} ✓"),
        1 => format!("{}{counter}", "L".repeat(rng.between(100, 1000) as usize)),
        _ => format!("n{counter}"),
    };
    assert!(find(model, &name).is_none());
    name
}

fn existing(rng: &mut Rng, model: &Model) -> String {
    rng.pick(model).name.clone()
}

/// An operation the model accepts.
fn valid_op(rng: &mut Rng, model: &Model, d: Dims, counter: &mut u32) -> Op {
    let mut roll = rng.below(100);
    if model.is_empty() {
        roll = 0;
    } else if model.len() >= MAX_BITMAPS && roll < 25 {
        roll = 25;
    }
    match roll {
        0..25 => Op::Add {
            name: fresh_name(rng, model, counter),
            granularity: if rng.pct(20) {
                None
            } else {
                Some(1 << random_gb(rng))
            },
            enabled: rng.pct(60),
        },
        25..27 => {
            // Everything, in random order: the extension goes away.
            let mut names: Vec<String> = model.iter().map(|b| b.name.clone()).collect();
            for i in (1..names.len()).rev() {
                names.swap(i, rng.below(i as u64 + 1) as usize);
            }
            Op::Remove(names)
        }
        27..35 => {
            let a = existing(rng, model);
            let mut names = vec![a.clone()];
            if model.len() > 1 && rng.pct(40) {
                let b = existing(rng, model);
                if b != a {
                    names.push(b);
                }
            }
            Op::Remove(names)
        }
        35..45 => Op::Clear(existing(rng, model)),
        45..60 => Op::SetEnabled(existing(rng, model), rng.pct(50)),
        _ => {
            let target = existing(rng, model);
            let sources = (0..rng.between(1, 3))
                .map(|_| {
                    if rng.pct(70) {
                        Source::Named(existing(rng, model))
                    } else {
                        synthetic(rng, d.virtual_size)
                    }
                })
                .collect();
            Op::Merge { target, sources }
        }
    }
}

/// An operation that must be refused (the model says which way).
fn refused_op(rng: &mut Rng, model: &Model, d: Dims, counter: &mut u32) -> Op {
    *counter += 1;
    let missing = format!("missing-{counter}");
    let roll = if model.is_empty() {
        *rng.pick(&[1u64, 2, 4, 6, 7])
    } else {
        rng.below(11)
    };
    match roll {
        0 => Op::Add {
            name: existing(rng, model),
            granularity: Some(1 << random_gb(rng)),
            enabled: rng.pct(50),
        },
        1 => Op::Add {
            name: missing,
            granularity: Some(*rng.pick(&[0, 256, 3000, 65537, 4 << 30])),
            enabled: true,
        },
        2 => Op::Add {
            name: String::new(),
            granularity: None,
            enabled: true,
        },
        3 => {
            // An existing name listed with a missing one: neither is removed.
            let mut names = vec![existing(rng, model), missing];
            if rng.pct(50) {
                names.reverse();
            }
            Op::Remove(names)
        }
        4 => Op::Remove(vec![missing]),
        5 => {
            let a = existing(rng, model);
            Op::Remove(vec![a.clone(), a])
        }
        6 => Op::Clear(missing),
        7 => Op::SetEnabled(missing, rng.pct(50)),
        8 => Op::Merge {
            target: missing,
            sources: vec![Source::Named(existing(rng, model))],
        },
        9 => Op::Merge {
            target: existing(rng, model),
            sources: vec![Source::Named(missing)],
        },
        _ => {
            let other = d.virtual_size + *rng.pick(&[512, 1 << 20]);
            Op::Merge {
                target: existing(rng, model),
                sources: vec![synthetic(rng, other)],
            }
        }
    }
}

/// QEMU's debug sha256 of a model bitmap: its serialized bytes zero-padded to
/// whole 64-bit words (at least one).
fn model_sha256(b: &Bitmap) -> String {
    use sha2::{Digest, Sha256};
    let mut bytes = b.to_le_bytes();
    bytes.resize((b.len().div_ceil(64).max(1) * 8) as usize, 0);
    hex(&Sha256::digest(&bytes))
}

/// One fixture's run: the image, the model, and what happened so far.
struct Run<'a> {
    fixture: &'a str,
    seed: u64,
    dims: Dims,
    bytes: Vec<u8>,
    model: Model,
    log: Vec<String>,
}

impl Run<'_> {
    /// Panics with the seed, the fixture and the last operations.
    fn fail(&self, msg: impl fmt::Display) -> ! {
        let tail = self.log.len().saturating_sub(40);
        panic!(
            "{msg}\n(seed {:#x}, fixture {}, replay with QCOW2_BITMAP_SEED={:#x}); \
             operations so far (last {}):\n  {}",
            self.seed,
            self.fixture,
            self.seed,
            self.log.len() - tail,
            self.log[tail..].join("\n  ")
        )
    }

    /// Our read path equals the model: names in order, flags, granularity, bits.
    fn assert_read_path(&self, what: &str) {
        let img = Image::open(self.bytes.clone())
            .unwrap_or_else(|e| self.fail(format!("{what}: image does not open: {e}")));
        let got: Vec<String> = img.bitmaps().iter().map(|b| b.name()).collect();
        let want: Vec<String> = self.model.iter().map(|b| b.name.clone()).collect();
        if got != want {
            self.fail(format!("{what}: bitmaps {got:?}, model {want:?}"));
        }
        if self.model.is_empty() {
            if img.bitmaps_view().extension.is_some() || img.header().autoclear_features & 1 != 0 {
                self.fail(format!("{what}: no bitmap left but the extension remains"));
            }
        } else if !img.bitmaps_consistent() {
            self.fail(format!("{what}: autoclear bit 0 is clear"));
        }
        for (b, m) in img.bitmaps().iter().zip(&self.model) {
            let state = img.status(b).state;
            if state != BitmapState::Ok {
                self.fail(format!("{what}: {} is {}", m.name, state.as_str()));
            }
            if b.entry.auto() != m.enabled || b.granularity() != 1 << m.granularity_bits {
                self.fail(format!(
                    "{what}: {} has auto={} granularity {}, model auto={} granularity {}",
                    m.name,
                    b.entry.auto(),
                    b.granularity(),
                    m.enabled,
                    1u64 << m.granularity_bits
                ));
            }
            let bits = img
                .load(b, false)
                .unwrap_or_else(|e| self.fail(format!("{what}: load {}: {e}", m.name)));
            if bits != m.bits {
                let mut diff = bits.clone();
                diff.xor_assign(&m.bits).ok();
                let first = diff.runs().next();
                self.fail(format!(
                    "{what}: bitmap {} content differs: {} bits set, model {} ({} bits differ, first run {first:?})",
                    m.name,
                    bits.count_ones(),
                    m.bits.count_ones(),
                    diff.count_ones()
                ));
            }
        }
    }

    /// QEMU's view of the image equals ours and the model's.
    fn assert_qemu(&self, dir: &Path, what: &str) {
        let path = dir.join(self.fixture);
        std::fs::write(&path, &self.bytes).unwrap();
        let (rc0, check0) = qemu_check(&fixture(self.fixture));
        let (rc, check) = qemu_check(&path);
        if (rc, &check["leaks"]) != (rc0, &check0["leaks"]) || !(rc == 0 || rc == 3) {
            self.fail(format!(
                "{what}: qemu-img check exit {rc} (fixture {rc0}): {check}"
            ));
        }
        let want: Vec<(String, u64, Vec<String>)> = self
            .model
            .iter()
            .map(|m| {
                let flags = if m.enabled {
                    vec!["auto".to_string()]
                } else {
                    vec![]
                };
                (m.name.clone(), 1u64 << m.granularity_bits, flags)
            })
            .collect();
        let info = qemu_info_bitmaps(&path);
        if info != want {
            self.fail(format!(
                "{what}: qemu-img info bitmaps {info:?}, model {want:?}"
            ));
        }
        let img = Image::open(self.bytes.clone()).unwrap();
        let mut qmp = Qmp::start(&path);
        for (b, m) in img.bitmaps().iter().zip(&self.model) {
            let ours = hex(&img.sha256(b, false).unwrap());
            let theirs = qmp.sha256(&m.name);
            let model = model_sha256(&m.bits);
            if ours != theirs || (theirs != model && !m.dirty_tail) {
                self.fail(format!(
                    "{what}: sha256 of {}: QEMU {theirs}, ours {ours}, model {model}",
                    m.name
                ));
            }
        }
        drop(qmp);
        let cmp = Command::new("qemu-img")
            .args(["compare", "-q", "-f", "qcow2", "-F", "qcow2"])
            .arg(fixture(self.fixture))
            .arg(&path)
            .status()
            .unwrap();
        if !cmp.success() {
            self.fail(format!("{what}: guest data changed"));
        }
    }

    /// One transaction of `count` valid operations, applied to the model too.
    fn valid_step(&mut self, rng: &mut Rng, count: usize, counter: &mut u32, step: usize) {
        let mut model = self.model.clone();
        let mut tx = Transaction::begin(self.bytes.clone())
            .unwrap_or_else(|e| self.fail(format!("step {step}: begin: {e}")));
        // Whether every operation is one the API promises writes nothing when
        // it changes nothing (enable/disable to the current state, a merge
        // that brings no new bit). Clear and remove always restage.
        let mut may_be_noop = true;
        for k in 0..count {
            let op = valid_op(rng, &model, self.dims, counter);
            may_be_noop &= matches!(op, Op::SetEnabled(..) | Op::Merge { .. });
            self.log.push(format!("step {step}.{k}/{count}: {op:?}"));
            if let Err(e) = apply_model(&mut model, &op, self.dims) {
                self.fail(format!("step {step}: generated op refused by model: {e}"));
            }
            if let Err(e) = apply_tx(&mut tx, &op) {
                self.fail(format!("step {step}: {op:?} refused: {e}"));
            }
        }
        let out = tx
            .commit()
            .unwrap_or_else(|e| self.fail(format!("step {step}: commit: {e}")));
        if guest_fingerprint(&out) != guest_fingerprint(&self.bytes) {
            self.fail(format!("step {step}: guest data changed"));
        }
        if count == 1 && may_be_noop && model == self.model && out != self.bytes {
            self.fail(format!(
                "step {step}: an operation that changes nothing wrote to the image"
            ));
        }
        self.bytes = out;
        self.model = model;
    }

    /// One operation that must be refused, leaving the image untouched.
    fn refused_step(&mut self, rng: &mut Rng, counter: &mut u32, step: usize) {
        let op = refused_op(rng, &self.model, self.dims, counter);
        self.log.push(format!("step {step} (refusal): {op:?}"));
        let mut model = self.model.clone();
        let want = match apply_model(&mut model, &op, self.dims) {
            Err(w) => w,
            Ok(()) => self.fail(format!("step {step}: model accepts {op:?}")),
        };
        let mut tx = Transaction::begin(self.bytes.clone())
            .unwrap_or_else(|e| self.fail(format!("step {step}: begin: {e}")));
        match apply_tx(&mut tx, &op) {
            Ok(()) => self.fail(format!("step {step}: {op:?} accepted, want '{want}'")),
            Err(e) if !e.to_string().contains(want) => {
                self.fail(format!("step {step}: {op:?}: error '{e}', want '{want}'"))
            }
            Err(_) => {}
        }
        let out = tx
            .commit()
            .unwrap_or_else(|e| self.fail(format!("step {step}: commit after refusal: {e}")));
        if out != self.bytes {
            self.fail(format!("step {step}: refused {op:?} changed the image"));
        }
    }
}

#[test]
fn seeded_random_operations_match_a_model() {
    let seed = env_u64("QCOW2_BITMAP_SEED").unwrap_or(DEFAULT_SEED);
    let steps = env_u64("QCOW2_BITMAP_OPS").map_or(DEFAULT_STEPS, |n| n as usize);
    eprintln!(
        "seeded_random_operations_match_a_model: seed {seed:#x} (QCOW2_BITMAP_SEED), {steps} steps per fixture"
    );
    let with_qemu = qemu_available(
        "seeded_random_operations_match_a_model (QEMU checks; the model part still runs)",
        &["qemu-img", "qemu-storage-daemon"],
    );
    let dir = tempfile::tempdir().unwrap();
    // backing.qcow2 (when chosen) finds its backing file next to it.
    std::fs::copy(fixture("base.qcow2"), dir.path().join("base.qcow2")).unwrap();
    let fixtures: Vec<String> = match std::env::var("QCOW2_BITMAP_FIXTURES") {
        Ok(list) => list.split(',').map(str::to_string).collect(),
        Err(_) => FIXTURES.iter().map(|f| f.to_string()).collect(),
    };
    for (i, fx) in fixtures.iter().enumerate() {
        let start = std::time::Instant::now();
        let fseed = seed.wrapping_add((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut rng = Rng(fseed);
        let bytes = std::fs::read(fixture(fx)).unwrap();
        let (dims, model) = {
            let img = Image::open(bytes.clone()).unwrap();
            let dims = Dims {
                virtual_size: img.virtual_size(),
                cluster_size: img.geometry().cluster_size(),
            };
            let model = img
                .bitmaps()
                .iter()
                .map(|b| {
                    let bits = img.load(b, false).unwrap();
                    let dirty_tail = hex(&img.sha256(b, false).unwrap()) != model_sha256(&bits);
                    ModelBitmap {
                        name: b.name(),
                        enabled: b.entry.auto(),
                        granularity_bits: u32::from(b.entry.granularity_bits),
                        bits,
                        dirty_tail,
                    }
                })
                .collect();
            (dims, model)
        };
        let mut run = Run {
            fixture: fx,
            seed,
            dims,
            bytes,
            model,
            log: Vec::new(),
        };
        let mut counter = 0u32;
        let (mut ops, mut refusals, mut qemu_checks, mut emptied) = (0usize, 0, 0, 0);
        for step in 0..steps {
            if rng.pct(12) {
                run.refused_step(&mut rng, &mut counter, step);
                refusals += 1;
            } else {
                let count = if rng.pct(20) {
                    rng.between(2, 4) as usize
                } else {
                    1
                };
                run.valid_step(&mut rng, count, &mut counter, step);
                ops += count;
            }
            run.assert_read_path(&format!("after step {step}"));
            emptied += usize::from(run.model.is_empty());
            if with_qemu && (step % QEMU_EVERY == QEMU_EVERY - 1 || step + 1 == steps) {
                run.assert_qemu(dir.path(), &format!("after step {step}"));
                qemu_checks += 1;
            }
        }
        eprintln!(
            "  {fx} (seed {fseed:#x}): {ops} operations, {refusals} refusals, {emptied} times no bitmap, {qemu_checks} QEMU checks, \
             {} bitmaps at the end, image {} -> {} bytes, {:.1?}",
            run.model.len(),
            std::fs::metadata(fixture(fx)).unwrap().len(),
            run.bytes.len(),
            start.elapsed()
        );
    }
}
