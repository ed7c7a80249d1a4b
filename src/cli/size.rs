//! SIZE arguments (`512`, `64K`, `1M`, `2G`, `16T`) and human-readable sizes.

/// Parses a byte count with an optional binary suffix (K, M, G, T, P, E; either case).
pub fn parse(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'B' => 0,
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                'E' => 60,
                _ => {
                    return Err(format!(
                        "'{s}': unknown size suffix '{c}' (use K, M, G, T, P or E)"
                    ));
                }
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 512, 64K, 2G)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// `65536` -> `64 KiB`, `1610612736` -> `1.5 GiB`, `1000` -> `1000 B`.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && n >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    if unit == 0 {
        return format!("{n} B");
    }
    let base = 1u64 << (10 * unit);
    if n % base == 0 {
        format!("{} {}", n / base, UNITS[unit])
    } else {
        format!("{:.1} {}", n as f64 / base as f64, UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse("512"), Ok(512));
        assert_eq!(parse("64K"), Ok(65536));
        assert_eq!(parse("64k"), Ok(65536));
        assert_eq!(parse("1M"), Ok(1 << 20));
        assert_eq!(parse("2G"), Ok(2 << 30));
        assert_eq!(parse("16T"), Ok(16 << 40));
        assert!(parse("3x").is_err());
        assert!(parse("").is_err());
        assert!(parse("-1").is_err());
        assert!(parse("20E").is_err());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(1000), "1000 B");
        assert_eq!(human(65536), "64 KiB");
        assert_eq!(human(1610612736), "1.5 GiB");
        assert_eq!(human(16 << 40), "16 TiB");
    }
}
