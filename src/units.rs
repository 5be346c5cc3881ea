//! Number and unit formatting for every output (TUI panels, headless summary, reports, `inspect`).
//!
//! Each output keeps the style it has always printed (the TUI's narrow panels round harder than
//! the summary), so styles differ by name here rather than by copy. Imports nothing of the crate.

/// `1234` → `1.23k`, `2.5e9` → `2.50G`; below 1000 with up to two decimals (TUI panels).
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

/// A duration given in microseconds, TUI style: `812 µs`, `1.25 ms`, `2.00 s`.
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

/// A duration given in microseconds, plain-text style: "850 ns", "12.3 us", "4.56 ms", "2.50 s".
pub fn duration_us(us: f64) -> String {
    if us < 1.0 {
        format!("{:.0} ns", us * 1e3)
    } else if us < 1e3 {
        format!("{us:.1} us")
    } else if us < 1e6 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

/// Bytes in binary units, whole MiB and KiB (TUI panels): `329 MiB`, `2.24 GiB`.
pub fn bytes_rounded(b: u64) -> String {
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

/// Bytes in binary units with a decimal (headless summary): "512 B", "329.0 MiB", "2.24 GiB".
pub fn bytes(b: u64) -> String {
    let b = b as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

/// Bytes in the largest binary unit up to TiB with one decimal (`inspect`): "512 B", "1.5 KiB".
pub fn bytes_one_decimal(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
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

/// A number of FLOPs with an SI prefix and two decimals ("1.23 MFLOP").
pub fn flops(f: f64) -> String {
    let (v, unit) = if f >= 1e12 {
        (f / 1e12, "TFLOP")
    } else if f >= 1e9 {
        (f / 1e9, "GFLOP")
    } else if f >= 1e6 {
        (f / 1e6, "MFLOP")
    } else if f >= 1e3 {
        (f / 1e3, "kFLOP")
    } else {
        (f, "FLOP")
    };
    format!("{v:.2} {unit}")
}

/// A parameter count ("1.23 M parameters").
pub fn params(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} B parameters", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2} M parameters", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} k parameters", n / 1e3)
    } else {
        format!("{n:.0} parameters")
    }
}

/// A compact number for figure labels: 3 significant figures, k (from 10k)/M/G suffixes.
pub fn compact(x: f64) -> String {
    let a = x.abs();
    let (v, suffix) = if a >= 1e9 {
        (x / 1e9, "G")
    } else if a >= 1e6 {
        (x / 1e6, "M")
    } else if a >= 1e4 {
        (x / 1e3, "k")
    } else {
        (x, "")
    };
    let av = v.abs();
    let s = if av == 0.0 {
        "0".to_string()
    } else if av >= 100.0 {
        format!("{v:.0}")
    } else if av >= 10.0 {
        format!("{v:.1}")
    } else if av >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    };
    format!("{s}{suffix}")
}

/// `1234567` -> `1,234,567`.
pub fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// `v` with `prec` decimals, or "-" when absent.
pub fn fixed_or_dash(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".to_string(), |x| format!("{x:.prec$}"))
}

/// `x` with at most `decimals` decimals and no trailing zeros ("0.9", "0.85", "1").
pub fn trim_float(x: f64, decimals: usize) -> String {
    let s = format!("{x:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// `text` safe to print on a terminal: newlines as `\n`, other control characters (escape
/// sequences included) as `\xNN`. For strings that come from files (model and tensor names).
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\n' => "\\n".to_string(),
            c if c.is_control() => format!("\\x{:02x}", c as u32),
            c => c.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn printable_escapes_terminal_control() {
        assert_eq!(
            super::printable("model\x1b[2Jname\nx\u{7}"),
            "model\\x1b[2Jname\\nx\\x07"
        );
        assert_eq!(super::printable("naïve 東京"), "naïve 東京");
    }

    use super::*;

    #[test]
    fn panel_style() {
        assert_eq!(si(1234.0), "1.23k");
        assert_eq!(si(2.5e9), "2.50G");
        assert_eq!(si(12.0), "12");
        assert_eq!(si(3.25), "3.25");
        assert_eq!(si(456_000.0), "456k");
        assert_eq!(micros(812.4), "812 µs");
        assert_eq!(micros(1250.0), "1.25 ms");
        assert_eq!(bytes_rounded(329 << 20), "329 MiB");
        assert_eq!(bytes_rounded(2_290 << 20), "2.24 GiB");
        assert_eq!(in_unit(1250.0, "us"), "1.25 ms");
        assert_eq!(in_unit(2.5e6, "FLOPs"), "2.50M FLOPs");
    }

    #[test]
    fn text_style() {
        assert_eq!(flops(1_234_000.0), "1.23 MFLOP");
        assert_eq!(flops(12.0), "12.00 FLOP");
        assert_eq!(duration_us(0.85), "850 ns");
        assert_eq!(duration_us(12.34), "12.3 us");
        assert_eq!(duration_us(4560.0), "4.56 ms");
        assert_eq!(duration_us(2.5e6), "2.50 s");
        assert_eq!(bytes(329 << 20), "329.0 MiB");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(params(1_234_567), "1.23 M parameters");
        assert_eq!(fixed_or_dash(None, 2), "-");
        assert_eq!(fixed_or_dash(Some(1.234), 2), "1.23");
        assert_eq!(trim_float(1.0, 2), "1");
        assert_eq!(trim_float(0.85, 3), "0.85");
    }

    #[test]
    fn inspect_and_figure_style() {
        assert_eq!(group_digits(0), "0");
        assert_eq!(group_digits(999), "999");
        assert_eq!(group_digits(1000), "1,000");
        assert_eq!(group_digits(1234567), "1,234,567");
        assert_eq!(bytes_one_decimal(512), "512 B");
        assert_eq!(bytes_one_decimal(1536), "1.5 KiB");
        assert_eq!(bytes_one_decimal(8 * 1024 * 1024), "8.0 MiB");
        assert_eq!(compact(0.0), "0");
        assert_eq!(compact(12_345.0), "12.3k");
        assert_eq!(compact(0.5), "0.500");
    }
}
