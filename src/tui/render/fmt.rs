//! Number formatting shared by the panels (units spelled the same everywhere).

/// `1234` → `1.23k`, `2.5e9` → `2.50G`; below 1000 with up to two decimals.
pub fn si(v: f64) -> String {
    let a = v.abs();
    let (x, suffix) = if a >= 1e12 {
        (v / 1e12, "T")
    } else if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let digits = if suffix.is_empty() && x.fract() == 0.0 || x.abs() >= 100.0 {
        0
    } else if x.abs() >= 10.0 {
        1
    } else {
        2
    };
    format!("{x:.digits$}{suffix}")
}

/// A duration given in microseconds: `812 µs`, `1.25 ms`, `2.00 s`.
pub fn micros(us: f64) -> String {
    if us >= 1e6 {
        format!("{:.2} s", us / 1e6)
    } else if us >= 1e3 {
        format!("{:.2} ms", us / 1e3)
    } else if us >= 10.0 {
        format!("{us:.0} µs")
    } else {
        format!("{us:.1} µs")
    }
}

/// Bytes in binary units: `329 MiB`, `2.24 GiB`.
pub fn bytes(b: u64) -> String {
    let b = b as f64;
    const MI: f64 = 1024.0 * 1024.0;
    if b >= 1024.0 * MI {
        format!("{:.2} GiB", b / (1024.0 * MI))
    } else if b >= MI {
        format!("{:.0} MiB", b / MI)
    } else {
        format!("{:.0} KiB", b / 1024.0)
    }
}

/// A value in a histogram's unit ("us" as a duration, anything else with SI prefixes).
pub fn in_unit(v: f64, unit: &str) -> String {
    match unit {
        "us" => micros(v),
        "" => si(v),
        u => format!("{} {u}", si(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(si(1234.0), "1.23k");
        assert_eq!(si(2.5e9), "2.50G");
        assert_eq!(si(12.0), "12");
        assert_eq!(si(3.25), "3.25");
        assert_eq!(si(456_000.0), "456k");
        assert_eq!(micros(812.4), "812 µs");
        assert_eq!(micros(1250.0), "1.25 ms");
        assert_eq!(bytes(329 << 20), "329 MiB");
        assert_eq!(bytes(2_290 << 20), "2.24 GiB");
    }
}
