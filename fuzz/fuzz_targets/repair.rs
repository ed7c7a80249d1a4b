//! `repair` over an in-memory image (`Vec<u8>` is a `WriteAt` storage), with
//! both in-use policies. Repair must refuse with a one-line error, or leave
//! an image that:
//!
//! - opens, and whose `check` verdict matches the report's `clean` flag;
//! - has nothing wrong with its bitmaps (no unusable bitmap, no bitmap
//!   corruption) and nothing left for a second repair to plan;
//! - is clean, or holds only problems the input already had outside the
//!   bitmaps (repair leaves L1/L2 corruption and refcount errors outside the
//!   bitmaps to `qemu-img check -r all` and says `clean: false`).
//!
//! Anything else panics with a message naming the broken promise.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_bitmap::read::{Image, Severity, Verdict};
use qcow2_bitmap::write::repair::{self, InUsePolicy};

fn one_line(e: &qcow2_bitmap::Error) {
    let s = e.to_string();
    assert!(!s.contains('\n'), "multi-line error: {s:?}");
}

fn run(data: &[u8], policy: InUsePolicy) {
    // The dry run must not fail where the read path works.
    if let Ok(img) = Image::open(data.to_vec()) {
        match repair::repair_dry_run(&img, policy) {
            Ok(_) => {}
            Err(e) => one_line(&e),
        }
    }
    let (out, report) = match repair::repair(data.to_vec(), policy) {
        Ok(r) => r,
        Err(e) => return one_line(&e),
    };
    let img = match Image::open(out) {
        Ok(img) => img,
        Err(e) => panic!(
            "{policy:?}: repaired image does not open: {e}\nactions: {:#?}",
            report.actions
        ),
    };
    let after = match img.check() {
        Ok(r) => r,
        Err(e) => panic!("{policy:?}: check after repair failed: {e}"),
    };
    let verdict = after.verdict();
    let why = || {
        format!(
            "{policy:?}: verdict {verdict:?}\nactions: {:#?}\nfindings: {:#?}",
            report.actions, after.findings
        )
    };
    assert_eq!(
        report.clean,
        verdict == Verdict::Clean,
        "report.clean disagrees with check: {}",
        why()
    );
    assert!(
        !after.bitmap_corruption,
        "bitmap corruption after repair: {}",
        why()
    );
    assert_eq!(
        after.count(Severity::Unusable),
        0,
        "unusable bitmaps after repair: {}",
        why()
    );
    let second = repair::plan(&img, policy);
    assert!(
        second.is_empty(),
        "a second repair would still do {:#?}\n{}",
        second.actions,
        why()
    );
    // What is left must have been there before: repair fixes the bitmaps
    // and frees leaks, and leaves other corruption (L1/L2 tables, refcount
    // errors outside the bitmaps) to `qemu-img check -r all`, reporting
    // `clean: false`. It must never add a problem of its own.
    if verdict != Verdict::Clean {
        let before: Vec<String> = Image::open(data.to_vec())
            .and_then(|img| img.check())
            .map(|r| r.findings.into_iter().map(|f| f.message).collect())
            .unwrap_or_default();
        // OFLAG_COPIED complaints depend on refcounts: freeing a leak can
        // reveal one the input already had (an L2 entry without the copied
        // flag whose cluster's refcount drops to 1), as `qemu-img check -r
        // leaks` would.
        for f in after
            .findings
            .iter()
            .filter(|f| !f.message.starts_with("ERROR OFLAG_COPIED"))
        {
            assert!(
                before.contains(&f.message),
                "repair introduced {:?}\n{}",
                f.message,
                why()
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    run(data, InUsePolicy::Dirty);
    run(data, InUsePolicy::Remove);
});
