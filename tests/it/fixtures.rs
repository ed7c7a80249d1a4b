//! Every committed fixture against what QEMU recorded for it: bitmap names,
//! order, granularity, flags and state (`index.json`, `info.json`), dirty
//! extents (`nbdinfo --map`), SHA-256 and dirty counts (QMP). No QEMU needed.

use crate::util::*;
use qcow2_bitmap::read::{BitmapState, Extent, Image};

fn open(image: &str) -> Image<Vec<u8>> {
    let bytes = std::fs::read(fixture(image)).expect("read fixture");
    Image::open(bytes).unwrap_or_else(|e| panic!("{image}: {e}"))
}

fn stem(image: &str) -> &str {
    image.strip_suffix(".qcow2").unwrap_or(image)
}

#[test]
fn index_covers_every_fixture_image() {
    let mut on_disk: Vec<String> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".qcow2"))
        .collect();
    on_disk.sort();
    let mut indexed: Vec<String> = index()
        .iter()
        .map(|e| e["image"].as_str().unwrap().to_string())
        .collect();
    indexed.sort();
    assert_eq!(on_disk, indexed);
    assert!(
        indexed.len() >= 15,
        "expected a broad fixture set, got {}",
        indexed.len()
    );
}

#[test]
fn bitmaps_states_and_geometry_match_the_index() {
    for entry in index() {
        let name = entry["image"].as_str().unwrap();
        let image = open(name);
        assert_eq!(
            image.virtual_size(),
            entry["virtual-size"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            image.geometry().cluster_size(),
            entry["cluster-size"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            u64::from(image.header().version),
            entry["version"].as_u64().unwrap(),
            "{name}"
        );
        let want: Vec<(String, String, u64, bool)> = entry["bitmaps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                let n = b["name"].as_str().unwrap().to_string();
                (
                    n,
                    b["state"].as_str().unwrap().to_string(),
                    b["granularity"].as_u64().unwrap(),
                    b["enabled"].as_bool().unwrap(),
                )
            })
            .collect();
        let got: Vec<(String, String, u64, bool)> = image
            .bitmaps()
            .iter()
            .map(|b| {
                (
                    b.name(),
                    image.status(b).state.as_str().to_string(),
                    b.granularity(),
                    b.entry.auto(),
                )
            })
            .collect();
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn bitmap_list_and_flags_match_qemu_img_info() {
    for entry in index() {
        let name = entry["image"].as_str().unwrap();
        let image = open(name);
        if refused_by_qemu(name) {
            // QEMU refuses the whole image; we must still list it, with the culprit invalid.
            assert!(
                image
                    .bitmaps()
                    .iter()
                    .any(|b| image.status(b).state == BitmapState::Invalid),
                "{name}"
            );
            continue;
        }
        let info = read_json(&expected(stem(name), "info.json"));
        assert_eq!(
            info["virtual-size"].as_u64(),
            Some(image.virtual_size()),
            "{name}"
        );
        assert_eq!(
            info["cluster-size"].as_u64(),
            Some(image.geometry().cluster_size()),
            "{name}"
        );
        let data = &info["format-specific"]["data"];
        if image.header().version >= 3 {
            assert_eq!(
                data["refcount-bits"].as_u64(),
                Some(u64::from(image.header().refcount_bits())),
                "{name}"
            );
        }
        // qemu-img lists bitmaps only when the extension is consistent.
        let qemu: Vec<(String, u64, Vec<String>)> = data["bitmaps"]
            .as_array()
            .map(|bs| {
                bs.iter()
                    .map(|b| {
                        let flags = b["flags"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|f| f.as_str().unwrap().to_string())
                            .collect();
                        (
                            b["name"].as_str().unwrap().to_string(),
                            b["granularity"].as_u64().unwrap(),
                            flags,
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let ours: Vec<(String, u64, Vec<String>)> = if image.bitmaps_consistent() {
            image
                .bitmaps()
                .iter()
                .map(|b| (b.name(), b.granularity(), flags(b)))
                .collect()
        } else {
            Vec::new()
        };
        assert_eq!(ours, qemu, "{name}");
    }
}

/// QEMU could not open the image at all (recorded as `info.err`).
fn refused_by_qemu(image: &str) -> bool {
    let refused = expected(stem(image), "info.err").exists();
    assert_ne!(
        refused,
        expected(stem(image), "info.json").exists(),
        "{image}: need exactly one of info.json / info.err"
    );
    refused
}

fn flags(b: &qcow2_bitmap::read::BitmapEntry) -> Vec<String> {
    let mut f = Vec::new();
    if b.entry.in_use() {
        f.push("in-use".to_string());
    }
    if b.entry.auto() {
        f.push("auto".to_string());
    }
    f
}

fn qmp_bitmap(stem: &str, bitmap: &str) -> Option<serde_json::Value> {
    let qmp = read_json(&expected(stem, "qmp.json"));
    qmp["bitmaps"]
        .as_array()?
        .iter()
        .find(|b| b["name"] == bitmap)
        .cloned()
}

#[test]
fn extents_match_nbdinfo_maps_for_every_ok_bitmap() {
    let mut compared = 0;
    for entry in index() {
        let name = entry["image"].as_str().unwrap();
        let image = open(name);
        for b in image.bitmaps() {
            let map = expected(stem(name), &format!("map-{}.json", b.name()));
            if refused_by_qemu(name) {
                continue; // no QEMU oracle for any bitmap of this image
            }
            if image.status(b).state != BitmapState::Ok {
                assert!(
                    !map.exists(),
                    "{name}/{}: QEMU exported a bitmap we call unusable",
                    b.name()
                );
                continue;
            }
            let ours: Vec<Extent> = image
                .extents(b, None, false)
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let ours: Vec<(u64, u64)> = ours.iter().map(|e| (e.offset, e.length)).collect();
            assert_eq!(
                merge(ours.clone()),
                ours,
                "{name}/{}: extents are not maximal",
                b.name()
            );
            assert_eq!(ours, nbd_dirty(&read_json(&map)), "{name}/{}", b.name());
            let total: u64 = ours.iter().map(|e| e.1).sum();
            assert_eq!(
                image.status(b).dirty_bytes,
                Some(total),
                "{name}/{}",
                b.name()
            );
            compared += 1;
        }
    }
    assert!(compared >= 30, "only {compared} bitmaps compared");
}

#[test]
fn sha256_matches_qmp_for_every_ok_bitmap() {
    let mut compared = 0;
    for entry in index() {
        let name = entry["image"].as_str().unwrap();
        let image = open(name);
        for b in image.bitmaps() {
            if image.status(b).state != BitmapState::Ok {
                continue;
            }
            let Some(q) = qmp_bitmap(stem(name), &b.name()) else {
                continue;
            };
            let ours = qcow2_bitmap::read::hex(&image.sha256(b, false).unwrap());
            assert_eq!(ours, q["sha256"].as_str().unwrap(), "{name}/{}", b.name());
            compared += 1;
        }
    }
    assert!(compared >= 30, "only {compared} hashes compared");
}

#[test]
fn loaded_bitmap_agrees_with_extents_and_qmp_count() {
    for entry in index() {
        let name = entry["image"].as_str().unwrap();
        let image = open(name);
        for b in image.bitmaps() {
            if image.status(b).state != BitmapState::Ok {
                continue;
            }
            let map = image.load(b, false).unwrap();
            let gran = b.granularity();
            // QMP's count is whole granules (not clipped to the virtual size).
            if let Some(q) = qmp_bitmap(stem(name), &b.name()) {
                assert_eq!(
                    map.count_ones() * gran,
                    q["count"].as_u64().unwrap(),
                    "{name}/{}",
                    b.name()
                );
            }
            let runs: Vec<(u64, u64)> = map
                .runs()
                .map(|r| (r.start * gran, (r.end * gran).min(image.virtual_size())))
                .collect();
            let ext: Vec<(u64, u64)> = image
                .extents(b, None, false)
                .unwrap()
                .map(|e| e.unwrap())
                .map(|e| (e.offset, e.end()))
                .collect();
            assert_eq!(runs, ext, "{name}/{}", b.name());
        }
    }
}

#[test]
fn in_use_and_stale_bitmaps_are_refused_unless_forced() {
    let image = open("inuse.qcow2");
    let a = image.find("a").unwrap();
    let e = image.extents(a, None, false).unwrap_err();
    assert_eq!(e.kind(), qcow2_bitmap::ErrorKind::Untrusted);
    assert!(e.to_string().contains("bitmap 'a': is in use"), "{e}");
    assert!(image.sha256(a, false).is_err());
    // Forced, the in-use bitmap's old content is readable.
    assert!(image.extents(a, None, true).is_ok());
    let stale = open("stale.qcow2");
    let b0 = stale.find("b0").unwrap();
    let e = stale.load(b0, false).unwrap_err();
    assert!(
        e.to_string().contains("is stale (autoclear bit 0 is clear"),
        "{e}"
    );
    assert!(stale.load(b0, true).is_ok());
}

#[test]
fn fixture_images_are_the_recorded_bytes() {
    let sums = std::fs::read_to_string(fixtures_dir().join("expected/images.sha256")).unwrap();
    let mut n = 0;
    for line in sums.lines().filter(|l| !l.trim().is_empty()) {
        let (sum, file) = line.split_once(char::is_whitespace).unwrap();
        let file = file.trim().trim_start_matches('*');
        let file = std::path::Path::new(file)
            .file_name()
            .unwrap()
            .to_str()
            .unwrap();
        assert_eq!(
            sha256_file(&fixture(file)),
            sum,
            "{file} differs from the recorded image"
        );
        n += 1;
    }
    assert!(n >= 15);
}
