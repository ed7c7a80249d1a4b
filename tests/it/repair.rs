//! The corruption-recovery corpus (`fixtures/corrupt/`, built by its `make.sh`): `check` and
//! `repair` on every damaged image against `fixtures/corrupt/expected.json`.
//!
//! Without QEMU: `check` exit codes and problems, and `repair --dry-run` writes nothing.
//! With QEMU (skipped visibly without it, fails under `QCOW2_BITMAP_REQUIRE_QEMU=1`): every
//! image is repaired in a temp dir, then QEMU must accept it (`qemu-img check` 0, `info` opens
//! it), the intact bitmaps keep their QMP sha256, the guest data equals the unpatched source,
//! our `check` says clean and a second `repair` has nothing to do. `--in-use remove` removes
//! exactly the untrusted bitmaps.
//!
//! Every test collects all failures over the corpus and reports them together.

use crate::util::{
    Qmp, fixtures_dir, guest_fingerprint_of, qemu_available, qemu_check, read_json, run, stderr,
    stdout,
};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn dir() -> PathBuf {
    fixtures_dir().join("corrupt")
}

fn corpus() -> Vec<Value> {
    let v = read_json(&dir().join("expected.json"));
    let images = v["images"].as_array().expect("images").clone();
    assert!(images.len() >= 40, "corpus has {} images", images.len());
    images
}

fn name(img: &Value) -> &str {
    img["image"].as_str().unwrap()
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn copy_to(tmp: &Path, img: &str) -> PathBuf {
    let dst = tmp.join(img);
    std::fs::copy(dir().join(img), &dst).unwrap();
    dst
}

fn report(test: &str, failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{test}: {} failure(s):\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

/// Problems of `check --json`: (severity, bitmap) pairs.
fn problems(doc: &Value) -> Vec<(String, Option<String>)> {
    doc["problems"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    (
                        p["severity"].as_str().unwrap_or("?").to_string(),
                        p["bitmap"].as_str().map(str::to_string),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Compares `check --json` on `path` with the record; returns the differences.
fn check_against(path: &Path, rec: &Value) -> Vec<String> {
    let img = name(rec);
    let mut out = Vec::new();
    let o = run(&["check", "--json", path.to_str().unwrap()]);
    let rc = o.status.code().unwrap_or(-1);
    let want_rc = rec["check"]["rc"].as_i64().unwrap() as i32;
    if rc != want_rc {
        out.push(format!(
            "{img}: `check` exit {rc}, expected {want_rc} {}",
            stderr(&o).lines().next().unwrap_or("")
        ));
    }
    let doc: Value = match serde_json::from_str(&stdout(&o)) {
        Ok(v) => v,
        Err(e) => {
            out.push(format!("{img}: `check --json` output is not JSON: {e}"));
            return out;
        }
    };
    let got = problems(&doc);
    let want: Vec<(String, Option<String>)> = rec["check"]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["severity"].as_str().unwrap().to_string(),
                p["bitmap"].as_str().map(str::to_string),
            )
        })
        .collect();
    for w in &want {
        if !got.contains(w) {
            out.push(format!("{img}: `check` lacks a problem {w:?}; got {got:?}"));
        }
    }
    let mut got_names: Vec<&String> = got.iter().filter_map(|p| p.1.as_ref()).collect();
    let mut want_names: Vec<&String> = want.iter().filter_map(|p| p.1.as_ref()).collect();
    got_names.sort();
    got_names.dedup();
    want_names.sort();
    want_names.dedup();
    if got_names != want_names {
        out.push(format!(
            "{img}: `check` problems name bitmaps {got_names:?}, expected {want_names:?}"
        ));
    }
    out
}

#[test]
fn corrupt_check_matches_expected() {
    let mut failures = Vec::new();
    for rec in corpus() {
        let path = dir().join(name(&rec));
        failures.extend(check_against(&path, &rec));
    }
    report("corrupt_check_matches_expected", failures);
}

#[test]
fn corrupt_dry_run_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for rec in corpus() {
        let img = name(&rec);
        let path = copy_to(tmp.path(), img);
        let before = std::fs::read(&path).unwrap();
        let o = run(&["repair", "--json", "--dry-run", path.to_str().unwrap()]);
        let rc = o.status.code().unwrap_or(-1);
        if std::fs::read(&path).unwrap() != before {
            failures.push(format!("{img}: `repair --dry-run` changed the image"));
        }
        let want_rc = if rec["repair"] == "ok" { 0 } else { 1 };
        if rc != want_rc {
            failures.push(format!(
                "{img}: `repair --dry-run` exit {rc}, expected {want_rc} {}",
                stderr(&o).lines().next().unwrap_or("")
            ));
        }
        if rc == 0 {
            match serde_json::from_str::<Value>(&stdout(&o)) {
                Ok(doc) => {
                    if doc["dry-run"] != Value::Bool(true) {
                        failures.push(format!("{img}: dry-run JSON lacks \"dry-run\": true"));
                    }
                    if doc["actions"].as_array().is_none_or(|a| a.is_empty()) {
                        failures.push(format!("{img}: `repair --dry-run` plans no action"));
                    }
                }
                Err(e) => failures.push(format!("{img}: `repair --dry-run --json`: {e}")),
            }
        }
    }
    report("corrupt_dry_run_writes_nothing", failures);
}

fn qemu_tools() -> &'static [&'static str] {
    &["qemu-img", "qemu-storage-daemon"]
}

/// `qemu-img info --output=json`: bitmaps as (name, flags), or the first stderr line.
/// `qemu-img info` document and its bitmaps as (name, flags).
type Info = (Value, Vec<(String, Vec<String>)>);

fn info(path: &Path) -> Result<Info, String> {
    let o = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .unwrap();
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr)
            .lines()
            .next()
            .unwrap_or("")
            .to_string());
    }
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let bms = crate::util::info_bitmaps(&v)
        .into_iter()
        .map(|(n, _, f)| (n, f))
        .collect();
    Ok((v, bms))
}

/// QMP: (name, count, granularity, inconsistent) of each bitmap QEMU loaded.
fn qmp_bitmaps(q: &mut Qmp) -> Vec<(String, u64, u64, bool)> {
    let r = q.execute(
        serde_json::json!({"execute": "query-named-block-nodes", "arguments": {"flat": true}}),
    );
    let node = r["return"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "q0")
        .unwrap()
        .clone();
    node["dirty-bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["count"].as_u64().unwrap(),
                b["granularity"].as_u64().unwrap(),
                b["inconsistent"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

/// Bitmaps `repair --in-use dirty` must have made fully dirty: the ones `check` calls
/// unusable (a null bitmap = the whole extension is stale: all of them).
fn untrusted(rec: &Value) -> Option<Vec<String>> {
    let mut out = Vec::new();
    for p in rec["check"]["problems"].as_array().unwrap() {
        if p["severity"] == "unusable-bitmap" {
            match p["bitmap"].as_str() {
                Some(n) => out.push(n.to_string()),
                None => return None,
            }
        }
    }
    Some(out)
}

/// Repairs one corpus image in `tmp` and checks every promise; returns the failures.
fn repair_one(tmp: &Path, rec: &Value) -> Vec<String> {
    let img = name(rec);
    let mut f = Vec::new();
    let path = copy_to(tmp, img);
    let p = path.to_str().unwrap();
    let before = std::fs::read(&path).unwrap();
    let o = run(&["repair", "--json", p]);
    let rc = o.status.code().unwrap_or(-1);
    if rec["repair"] == "refuse" {
        if rc == 0 {
            f.push(format!("{img}: `repair` exit 0, expected a refusal"));
        }
        if std::fs::read(&path).unwrap() != before {
            f.push(format!("{img}: the refused `repair` changed the image"));
        }
        return f;
    }
    if rc != 0 {
        f.push(format!(
            "{img}: `repair` exit {rc}, expected 0 ({} {})",
            stdout(&o).replace('\n', " "),
            stderr(&o).lines().next().unwrap_or("")
        ));
    }
    let (qrc, qdoc) = qemu_check(&path);
    if qrc != 0 {
        f.push(format!(
            "{img}: after `repair`, `qemu-img check` exit {qrc} (corruptions {}, leaks {})",
            qdoc["corruptions"], qdoc["leaks"]
        ));
    }
    let want: Vec<String> = strs(&rec["after-repair"]);
    match info(&path) {
        Err(e) => f.push(format!("{img}: after `repair`, qemu-img info fails: {e}")),
        Ok((_, bms)) => {
            let names: Vec<String> = bms.iter().map(|b| b.0.clone()).collect();
            if names != want {
                f.push(format!(
                    "{img}: after `repair` QEMU sees bitmaps {names:?}, expected {want:?}"
                ));
            }
            for (n, flags) in &bms {
                if flags.iter().any(|x| x == "in-use") {
                    f.push(format!("{img}: after `repair` bitmap {n} is still in-use"));
                }
            }
        }
    }
    // Intact bitmaps keep their content, untrusted ones became fully dirty.
    if f.is_empty() {
        let mut q = Qmp::start(&path);
        for b in rec["intact"].as_array().unwrap() {
            let n = b["name"].as_str().unwrap();
            let got = q.sha256(n);
            if got != b["sha256"].as_str().unwrap() {
                f.push(format!(
                    "{img}: bitmap {n} sha256 {got} != source {}",
                    b["sha256"]
                ));
            }
        }
        let size = info(&path)
            .ok()
            .and_then(|(v, _)| v["virtual-size"].as_u64());
        let loaded = qmp_bitmaps(&mut q);
        let dirty: Vec<String> = match untrusted(rec) {
            Some(v) => v,
            None => want.clone(),
        };
        for n in dirty.iter().filter(|n| want.contains(n)) {
            match (loaded.iter().find(|b| &b.0 == n), size) {
                (Some((_, count, gran, inconsistent)), Some(size)) => {
                    // QMP counts dirty bytes as whole granules
                    let full = size.div_ceil(*gran) * gran;
                    if *inconsistent || *count != full {
                        f.push(format!(
                            "{img}: bitmap {n} after `repair --in-use dirty`: count {count}, expected fully dirty ({full}), inconsistent {inconsistent}"
                        ));
                    }
                }
                _ => f.push(format!(
                    "{img}: bitmap {n} not loaded by QEMU after `repair`"
                )),
            }
        }
        drop(q);
    }
    let src = dir().join(rec["source"].as_str().unwrap());
    let cmp = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "qcow2", "-F", "qcow2"])
        .arg(&src)
        .arg(&path)
        .output()
        .unwrap();
    if cmp.status.code() != Some(0) {
        f.push(format!(
            "{img}: after `repair`, qemu-img compare with {} exit {:?}: {}",
            src.display(),
            cmp.status.code(),
            String::from_utf8_lossy(&cmp.stderr).trim()
        ));
    }
    let c = run(&["check", p]);
    if c.status.code() != Some(0) {
        f.push(format!(
            "{img}: after `repair`, our `check` exit {:?}: {}",
            c.status.code(),
            stdout(&c).lines().next().unwrap_or("")
        ));
    }
    let again = std::fs::read(&path).unwrap();
    let r2 = run(&["repair", "--json", p]);
    let actions = serde_json::from_str::<Value>(&stdout(&r2))
        .ok()
        .and_then(|d| d["actions"].as_array().map(|a| a.len()));
    if r2.status.code() != Some(0) || actions != Some(0) {
        f.push(format!(
            "{img}: second `repair` exit {:?}, {actions:?} actions (expected 0, nothing to repair)",
            r2.status.code()
        ));
    }
    if std::fs::read(&path).unwrap() != again {
        f.push(format!("{img}: second `repair` changed the image"));
    }
    f
}

/// Runs `job` on every corpus image, 8 at a time.
fn par(tmp: &Path, job: fn(&Path, &Value) -> Vec<String>, recs: Vec<Value>) -> Vec<String> {
    let mut failures = Vec::new();
    for chunk in recs.chunks(8) {
        std::thread::scope(|s| {
            let hs: Vec<_> = chunk.iter().map(|r| s.spawn(move || job(tmp, r))).collect();
            for h in hs {
                failures.extend(h.join().unwrap_or_else(|_| vec!["a job panicked".into()]));
            }
        });
    }
    failures
}

#[test]
fn corrupt_repair_satisfies_qemu() {
    if !qemu_available("corrupt_repair_satisfies_qemu", qemu_tools()) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let failures = par(tmp.path(), repair_one, corpus());
    report("corrupt_repair_satisfies_qemu", failures);
}

fn remove_one(tmp: &Path, rec: &Value) -> Vec<String> {
    let img = name(rec);
    let mut f = Vec::new();
    let sub = tmp.join("remove");
    std::fs::create_dir_all(&sub).unwrap();
    let path = copy_to(&sub, img);
    let guest = guest_fingerprint_of(&path);
    let o = run(&[
        "repair",
        "--json",
        "--in-use",
        "remove",
        path.to_str().unwrap(),
    ]);
    if o.status.code() != Some(0) {
        f.push(format!(
            "{img}: `repair --in-use remove` exit {:?}: {}",
            o.status.code(),
            stderr(&o).lines().next().unwrap_or("")
        ));
    }
    if guest_fingerprint_of(&path) != guest {
        f.push(format!(
            "{img}: `repair --in-use remove` changed guest data"
        ));
    }
    let (qrc, _) = qemu_check(&path);
    if qrc != 0 {
        f.push(format!(
            "{img}: after `repair --in-use remove`, qemu-img check exit {qrc}"
        ));
    }
    let want = strs(&rec["after-in-use-remove"]);
    match info(&path) {
        Err(e) => f.push(format!(
            "{img}: after `repair --in-use remove`, info fails: {e}"
        )),
        Ok((_, bms)) => {
            let names: Vec<String> = bms.into_iter().map(|b| b.0).collect();
            if names != want {
                f.push(format!(
                    "{img}: after `repair --in-use remove` QEMU sees {names:?}, expected {want:?}"
                ));
            }
        }
    }
    if f.is_empty() {
        let mut q = Qmp::start(&path);
        for b in rec["intact"].as_array().unwrap() {
            let n = b["name"].as_str().unwrap();
            if want.iter().any(|w| w == n) && q.sha256(n) != b["sha256"].as_str().unwrap() {
                f.push(format!("{img}: `--in-use remove` changed bitmap {n}"));
            }
        }
    }
    f
}

#[test]
fn corrupt_in_use_remove() {
    if !qemu_available("corrupt_in_use_remove", qemu_tools()) {
        return;
    }
    let recs: Vec<Value> = corpus()
        .into_iter()
        .filter(|r| !r["after-in-use-remove"].is_null())
        .collect();
    assert!(recs.len() >= 3, "in-use/stale cases: {}", recs.len());
    let tmp = tempfile::tempdir().unwrap();
    let failures = par(tmp.path(), remove_one, recs);
    report("corrupt_in_use_remove", failures);
}

/// Corpus images whose untrusted `victim` must be removable with nothing leaked: every
/// cluster it held is provably its own (issue #11: an invalid granularity, a reserved bit or a
/// misaligned offset in a table entry, an impossible table size, an in-use bad table).
const REMOVE_LEAVES_NO_LEAK: &[&str] = &[
    "dir-gran-8.qcow2",
    "dir-gran-32.qcow2",
    "dir-type-2.qcow2",
    "dir-flag-reserved.qcow2",
    "dir-extra-noflag.qcow2",
    "dir-table-size-large.qcow2",
    "dir-table-size-absurd.qcow2",
    "dir-table-size-512m.qcow2",
    "tbl-reserved.qcow2",
    "tbl-reserved-high.qcow2",
    "tbl-misaligned.qcow2",
    "tbl-offset-allones.qcow2",
    "inuse-bad-table.qcow2",
];

/// `remove victim` on every corpus image where victim is invalid or in use and the directory is
/// sound: QEMU opens the result with the other bitmaps intact, and `qemu-img check` exits 0,
/// or (where some clusters cannot be proved the victim's) `remove` says how many leaked
/// clusters remain and that is what QEMU counts.
fn remove_victim_one(tmp: &Path, rec: &Value) -> Vec<String> {
    let img = name(rec);
    let mut f = Vec::new();
    let sub = tmp.join("remove-victim");
    std::fs::create_dir_all(&sub).unwrap();
    let path = copy_to(&sub, img);
    let p = path.to_str().unwrap();
    let info = stdout(&run(&["info", "--json", p]));
    let Ok(doc) = serde_json::from_str::<Value>(&info) else {
        return f;
    };
    let victims: Vec<&Value> = doc["bitmaps"]
        .as_array()
        .map(|a| a.iter().filter(|b| b["name"] == "victim").collect())
        .unwrap_or_default();
    let untrusted = matches!(victims[..], [b] if b["state"] == "invalid" || b["state"] == "in-use");
    if !untrusted || doc.get("bitmaps-problem").is_some() {
        return f;
    }
    let o = run(&["remove", p, "victim"]);
    // Write commands refuse the dirty bit (lazy refcounts) by contract.
    if o.status.code() == Some(1) && stderr(&o).contains("the dirty bit is set") {
        return f;
    }
    if o.status.code() != Some(0) {
        f.push(format!(
            "{img}: `remove victim` exit {:?}: {}",
            o.status.code(),
            stderr(&o)
        ));
        return f;
    }
    let (qrc, qdoc) = qemu_check(&path);
    let warning = stderr(&o);
    let must_be_clean = REMOVE_LEAVES_NO_LEAK.contains(&img);
    if qrc != 0 {
        let said = format!("warning: {} leaked clusters remain", qdoc["leaks"]);
        if must_be_clean || qrc != 3 || !warning.contains(&said) {
            f.push(format!(
                "{img}: after `remove victim`, qemu-img check exit {qrc} (leaks {}, corruptions {}); remove said: {warning:?}",
                qdoc["leaks"], qdoc["corruptions"]
            ));
        }
    } else if !warning.is_empty() {
        f.push(format!(
            "{img}: `remove victim` warned on a clean result: {warning:?}"
        ));
    }
    match info_of(&path) {
        Err(e) => f.push(format!(
            "{img}: after `remove victim`, qemu-img info fails: {e}"
        )),
        Ok(names) if names.iter().any(|n| n == "victim") => f.push(format!(
            "{img}: after `remove victim` QEMU still lists {names:?}"
        )),
        Ok(_) => {}
    }
    if f.is_empty() {
        let mut q = Qmp::start(&path);
        for b in rec["intact"].as_array().unwrap() {
            let n = b["name"].as_str().unwrap();
            if n != "victim" && q.sha256(n) != b["sha256"].as_str().unwrap() {
                f.push(format!("{img}: `remove victim` changed bitmap {n}"));
            }
        }
    }
    f
}

fn info_of(path: &Path) -> Result<Vec<String>, String> {
    info(path).map(|(_, bms)| bms.into_iter().map(|b| b.0).collect())
}

#[test]
fn corrupt_remove_of_an_untrusted_victim_frees_what_it_provably_held() {
    if !qemu_available(
        "corrupt_remove_of_an_untrusted_victim_frees_what_it_provably_held",
        qemu_tools(),
    ) {
        return;
    }
    let recs = corpus();
    for must in REMOVE_LEAVES_NO_LEAK {
        assert!(
            recs.iter().any(|r| name(r) == *must),
            "{must} is not in the corpus"
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let failures = par(tmp.path(), remove_victim_one, recs);
    report(
        "corrupt_remove_of_an_untrusted_victim_frees_what_it_provably_held",
        failures,
    );
}
