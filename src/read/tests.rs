//! Read-path rules on crafted in-memory images: one bad entry never hides
//! the others, every table rule, extents across clusters, all-ones entries.

use super::testimage::{TestBitmap, build, entry_field, write_cluster0};
use super::{BitmapState, Image};
use crate::format::bitmaps_ext::BitmapsExt;
use crate::format::directory::FLAG_IN_USE;

const CB: u32 = 9; // 512-byte clusters: 4096 bits per table entry
const GB: u8 = 9; // 512-byte granularity

fn states(img: &Image<Vec<u8>>) -> Vec<(String, BitmapState)> {
    img.bitmaps()
        .iter()
        .map(|b| (b.name(), img.status(b).state))
        .collect()
}

fn three() -> Vec<TestBitmap> {
    // 8 MiB at 512 B granularity = 16384 bits = 2048 bytes = 4 table entries.
    vec![
        TestBitmap::new(
            "a",
            GB,
            vec![Some(0), None, Some(0), Some(1)],
            vec![vec![0x0f]],
        ),
        TestBitmap::new("b", GB, vec![Some(0); 4], vec![]),
        TestBitmap::new(
            "c",
            GB,
            vec![None, Some(0), Some(0), Some(0)],
            vec![vec![0xff, 0x01]],
        ),
    ]
}

#[test]
fn extents_cross_entries_and_use_all_ones() {
    let mut bs = three();
    let img = Image::open(build(CB, 8 << 20, &mut bs)).unwrap();
    let a = img.find("a").unwrap();
    let ext: Vec<(u64, u64)> = img
        .extents(a, None, false)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.offset, e.length))
        .collect();
    // Bits 4096..4100 (from 0x0f) and 12288..16384 (all ones) in guest bytes.
    assert_eq!(ext, vec![(4096 * 512, 4 * 512), (12288 * 512, 4096 * 512)]);
    assert_eq!(img.status(a).dirty_bytes, Some((4 + 4096) * 512));
    let c = img.find("c").unwrap();
    let ext: Vec<(u64, u64)> = img
        .extents(c, None, false)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(ext, vec![(0, 9 * 512)]);
    let m = img.load(a, false).unwrap();
    assert_eq!(m.count_ones(), 4100);
}

#[test]
fn extents_merge_across_a_table_cluster_boundary() {
    let mut last = vec![0u8; 512];
    last[511] = 0x80;
    let mut bs = vec![TestBitmap::new(
        "x",
        GB,
        vec![None, None, Some(0), Some(0)],
        vec![last, vec![0x01]],
    )];
    let img = Image::open(build(CB, 8 << 20, &mut bs)).unwrap();
    let x = img.find("x").unwrap();
    let ext: Vec<(u64, u64)> = img
        .extents(x, None, false)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(ext, vec![(4095 * 512, 2 * 512)]);
    let part: Vec<(u64, u64)> = img
        .extents(x, Some((4095 * 512 + 100, 600)), false)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(part, vec![(4095 * 512 + 100, 600)]);
}

#[test]
fn one_bad_entry_does_not_hide_the_others() {
    let mut bs = three();
    let mut file = build(CB, 8 << 20, &mut bs);
    file[entry_field(&bs, 1, 17)] = 40; // b: granularity_bits 40
    let img = Image::open(file).unwrap();
    assert!(img.bitmaps_view().problem.is_none());
    assert_eq!(
        states(&img),
        vec![
            ("a".into(), BitmapState::Ok),
            ("b".into(), BitmapState::Invalid),
            ("c".into(), BitmapState::Ok)
        ]
    );
    let b = img.find("b").unwrap();
    let p = img.status(b).problem.unwrap();
    assert!(p.contains("granularity_bits 40 is outside 9..=31"), "{p}");
    assert!(img.extents(b, None, false).is_err());
}

#[test]
fn table_rules_make_only_that_bitmap_invalid() {
    let cases: Vec<(u64, &str)> = vec![
        (2, "reserved bits 0x2 are set"),
        (0x201, "together with the all-ones bit"),
        (0x1 << 57, "reserved bits"),
        (0x7fff_fe00, "lies beyond the end of the file"),
    ];
    for (raw, want) in cases {
        let mut bs = three();
        let mut file = build(CB, 8 << 20, &mut bs);
        let at = bs[1].entry.table_offset as usize + 8;
        file[at..at + 8].copy_from_slice(&raw.to_be_bytes());
        let img = Image::open(file).unwrap();
        let b = img.find("b").unwrap();
        let s = img.status(b);
        assert_eq!(s.state, BitmapState::Invalid, "{raw:#x}");
        let p = s.problem.unwrap();
        assert!(
            p.contains("bitmap 'b' table entry 1") && p.contains(want),
            "{raw:#x}: {p}"
        );
        assert!(p.contains(&format!("at offset {at}")), "{p}");
        assert_eq!(states(&img)[0].1, BitmapState::Ok);
    }
}

#[test]
fn table_size_must_be_exact_unless_in_use() {
    let mut bs = three();
    bs[1].table.push(Some(0)); // 5 entries where 4 are needed
    let file = build(CB, 8 << 20, &mut bs);
    let img = Image::open(file.clone()).unwrap();
    let s = img.status(img.find("b").unwrap());
    assert_eq!(s.state, BitmapState::Invalid);
    assert!(
        s.problem
            .unwrap()
            .contains("table_size 5 but the virtual size 8388608 needs exactly 4")
    );
    let mut file = file;
    let flags_at = entry_field(&bs, 1, 12);
    file[flags_at + 3] |= FLAG_IN_USE as u8;
    let img = Image::open(file).unwrap();
    let b = img.find("b").unwrap();
    assert_eq!(img.status(b).state, BitmapState::InUse);
    // Forced reads still need a table that matches the virtual size.
    let e = img.extents(b, None, true).unwrap_err();
    assert!(e.to_string().contains("needs exactly 4"), "{e}");
}

#[test]
fn extension_problems_are_reported_not_raised() {
    let mut bs = three();
    let mut file = build(CB, 8 << 20, &mut bs);
    let good = BitmapsExt {
        nb_bitmaps: 3,
        reserved: 0,
        directory_size: 96,
        directory_offset: 512,
    };
    let cases = [
        (
            BitmapsExt {
                nb_bitmaps: 0,
                ..good
            },
            "nb_bitmaps",
        ),
        (
            BitmapsExt {
                reserved: 7,
                ..good
            },
            "reserved",
        ),
        (
            BitmapsExt {
                directory_offset: 700,
                ..good
            },
            "bitmap_directory_offset",
        ),
        (
            BitmapsExt {
                directory_size: 1 << 40,
                ..good
            },
            "bitmap_directory_size",
        ),
        (
            BitmapsExt {
                directory_offset: 1 << 40,
                ..good
            },
            "bitmap directory at offset",
        ),
    ];
    for (ext, want) in cases {
        write_cluster0(&mut file, CB, 8 << 20, Some(ext));
        let img = Image::open(file.clone()).unwrap();
        let p = img
            .bitmaps_view()
            .problem
            .as_ref()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(p.contains(want), "{want}: {p}");
        // A wrong count or reserved field still lets the directory be walked.
        let walkable = want == "nb_bitmaps" || want == "reserved";
        assert_eq!(img.bitmaps().len(), if walkable { 3 } else { 0 }, "{want}");
    }
}

#[test]
fn count_mismatch_keeps_entries_and_duplicates_are_invalid() {
    let mut bs = three();
    bs[2].entry.name = b"a".to_vec();
    let mut file = build(CB, 8 << 20, &mut bs);
    let good = BitmapsExt {
        nb_bitmaps: 4,
        reserved: 0,
        directory_size: 96,
        directory_offset: 512,
    };
    write_cluster0(&mut file, CB, 8 << 20, Some(good));
    let img = Image::open(file).unwrap();
    let p = img.bitmaps_view().problem.as_ref().unwrap().to_string();
    assert!(
        p.contains("holds 3 entries but the bitmaps extension says 4"),
        "{p}"
    );
    let st = states(&img);
    assert_eq!(st[0].1, BitmapState::Ok);
    assert_eq!(st[2].1, BitmapState::Invalid);
    assert!(
        img.status(&img.bitmaps()[2])
            .problem
            .unwrap()
            .contains("duplicate name 'a'")
    );
    assert_eq!(img.find("a").unwrap().index, 0);
}

#[test]
fn stale_extension_marks_every_bitmap_stale() {
    let mut bs = three();
    let mut file = build(CB, 8 << 20, &mut bs);
    file[95] &= !1;
    let img = Image::open(file).unwrap();
    assert!(!img.bitmaps_consistent());
    assert!(states(&img).iter().all(|s| s.1 == BitmapState::Stale));
    let a = img.find("a").unwrap();
    assert!(img.sha256(a, false).is_err());
    assert!(img.sha256(a, true).is_ok());
}

#[test]
fn truncated_files_never_panic() {
    let mut bs = three();
    let file = build(CB, 8 << 20, &mut bs);
    for len in 0..file.len() {
        let Ok(img) = Image::open(file[..len].to_vec()) else {
            continue;
        };
        for b in img.bitmaps() {
            let _ = img.status(b);
            let _ = img.sha256(b, true);
            if let Ok(it) = img.extents(b, None, true) {
                let _ = it.count();
            }
        }
    }
}

/// What `survey` must equal: `status`, and extents summed into columns.
fn survey_oracle(img: &Image<Vec<u8>>, columns: u64) -> Vec<super::Survey> {
    let size = img.virtual_size();
    img.bitmaps()
        .iter()
        .map(|b| {
            let status = img.status(b);
            let profile = (columns > 0 && status.state == BitmapState::Ok).then(|| {
                let col = size.div_ceil(columns).max(1);
                let mut cols = vec![0u64; columns as usize];
                for e in img.extents(b, None, false).unwrap() {
                    let e = e.unwrap();
                    let mut at = e.offset;
                    while at < e.end() {
                        let c = at / col;
                        let stop = ((c + 1) * col).min(e.end());
                        cols[c as usize] += stop - at;
                        at = stop;
                    }
                }
                cols
            });
            super::Survey { status, profile }
        })
        .collect()
}

proptest::proptest! {
    /// Random bitmaps (zero, all-ones and data entries of any density),
    /// sizes that are not multiples of the granularity, any column count.
    #[test]
    fn survey_matches_status_and_extents(
        size in 1u64..(40 << 20),
        gran in 9u8..14,
        seed in proptest::prelude::any::<u64>(),
        columns in 0u64..130,
        nbitmaps in 1usize..4,
    ) {
        let nbits = size.div_ceil(1 << gran);
        let per_cluster = 8u64 << CB;
        let entries = nbits.div_ceil(per_cluster) as usize;
        let mut x = seed;
        let mut next = move || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let mut bs: Vec<TestBitmap> = (0..nbitmaps)
            .map(|i| {
                let mut data = Vec::new();
                let table = (0..entries)
                    .map(|_| match next() % 4 {
                        0 => Some(0),
                        1 => Some(1),
                        _ => {
                            let sparse = next() % 2 == 0;
                            data.push(
                                (0..1usize << CB)
                                    .map(|_| if sparse { (next() % 64 == 0) as u8 } else { next() as u8 })
                                    .collect(),
                            );
                            None
                        }
                    })
                    .collect();
                TestBitmap::new(&format!("b{i}"), gran, table, data)
            })
            .collect();
        let img = Image::open(build(CB, size, &mut bs)).unwrap();
        proptest::prop_assert_eq!(img.survey(columns), survey_oracle(&img, columns));
    }
}

#[test]
fn survey_shares_one_table_and_names_each_bitmap_in_errors() {
    let mut bs = three();
    bs.push(TestBitmap::new("d", GB, vec![Some(0); 4], vec![]));
    // "d" names the table of "a"; "b"'s table gets an invalid entry and "c"
    // names it too: both report the error under their own name.
    let mut file = build(CB, 8 << 20, &mut bs);
    let (a_table, b_table) = (bs[0].entry.table_offset, bs[1].entry.table_offset);
    let patch = |file: &mut Vec<u8>, at: usize, v: u64| {
        file[at..at + 8].copy_from_slice(&v.to_be_bytes());
    };
    patch(&mut file, entry_field(&bs, 3, 0), a_table);
    patch(&mut file, entry_field(&bs, 2, 0), b_table);
    patch(&mut file, b_table as usize + 8, 0x200 | 0x40); // reserved bits
    let img = Image::open(file).unwrap();
    let survey = img.survey(16);
    assert_eq!(survey, survey_oracle(&img, 16));
    assert_eq!(survey[3].status.dirty_bytes, survey[0].status.dirty_bytes);
    let (pb, pc) = (&survey[1].status.problem, &survey[2].status.problem);
    assert!(
        pb.as_deref()
            .unwrap()
            .starts_with("bitmap 'b' table entry 1"),
        "{pb:?}"
    );
    assert!(
        pc.as_deref()
            .unwrap()
            .starts_with("bitmap 'c' table entry 1"),
        "{pc:?}"
    );
}
