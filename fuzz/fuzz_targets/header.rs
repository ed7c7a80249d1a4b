//! Header and header-extension-area decoding, with encode -> decode round
//! trips: `Header::decode` on arbitrary bytes, then the extension area the
//! header delimits, then the bitmaps extension inside it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_bitmap::format::be::Put;
use qcow2_bitmap::format::bitmaps_ext::BitmapsExt;
use qcow2_bitmap::format::ext_type;
use qcow2_bitmap::format::extensions::{self, Extension};
use qcow2_bitmap::format::header::Header;

/// Errors are one line (the crate's error contract).
fn one_line(e: &qcow2_bitmap::Error) {
    let s = e.to_string();
    assert!(!s.contains('\n'), "multi-line error: {s:?}");
}

fuzz_target!(|data: &[u8]| {
    let h = match Header::decode(data) {
        Ok(h) => h,
        Err(e) => return one_line(&e),
    };
    // Round trip: encode -> decode gives the same header, in header_length bytes.
    let mut p = Put::new();
    h.encode(&mut p);
    let bytes = p.into_vec();
    let expected_len = if h.version >= 3 {
        h.header_length as usize
    } else {
        72
    };
    assert_eq!(bytes.len(), expected_len, "encoded header length");
    let again = Header::decode(&bytes).expect("re-decoding an encoded header");
    assert_eq!(again, h, "header round trip");
    let _ = (h.geometry(), h.compression_type(), h.refcount_bits());

    // The extension area, bounded as Image::open bounds it.
    let (start, end) = (
        h.extensions_start(),
        h.extensions_end().min(data.len() as u64),
    );
    let (Ok(s), Ok(e)) = (usize::try_from(start), usize::try_from(end)) else {
        return;
    };
    let area_bytes = if s <= e { &data[s..e] } else { &[][..] };
    let area = match extensions::decode_area(area_bytes, start) {
        Ok(a) => a,
        Err(e) => return one_line(&e),
    };
    // Round trip: the re-encoded area decodes to the same extensions (with
    // zero padding now) and an end marker right after them.
    // Not for a bitmaps extension of the wrong length: how
    // it is read (its 24 bytes, or as declared) depends on the bytes after it,
    // which re-encoding changes; the writer never re-encodes one as found
    // (repair rewrites the length or drops the extension).
    if area.bitmaps_length.is_none() {
        let mut p = Put::new();
        extensions::encode_area(&area.extensions, &mut p);
        let encoded = p.into_vec();
        let total: usize = area.extensions.iter().map(Extension::encoded_len).sum();
        assert_eq!(encoded.len(), total + 8, "encoded area length");
        let back = extensions::decode_area(&encoded, start).expect("re-decoding an encoded area");
        assert_eq!(back.extensions.len(), area.extensions.len());
        assert_eq!(back.end_marker, Some(start + total as u64));
        let mut at = start;
        for (a, b) in area.extensions.iter().zip(&back.extensions) {
            assert_eq!((a.kind, &a.data), (b.kind, &b.data), "extension round trip");
            assert_eq!(b.offset, at);
            assert!(b.padding_is_zero);
            at += a.encoded_len() as u64;
            let _ = a.kind_name();
        }
    }

    // The bitmaps extension body, when there is one.
    for x in area
        .extensions
        .iter()
        .filter(|x| x.kind == ext_type::BITMAPS)
    {
        let b = match BitmapsExt::decode(&x.data, x.offset + 8) {
            Ok(b) => b,
            Err(e) => return one_line(&e),
        };
        if let Err(e) = b.validate(h.geometry(), x.offset + 8) {
            one_line(&e);
        }
        let mut p = Put::new();
        b.encode(&mut p);
        let again =
            BitmapsExt::decode(&p.into_vec(), x.offset + 8).expect("bitmaps ext round trip");
        assert_eq!(again, b);
    }
});
