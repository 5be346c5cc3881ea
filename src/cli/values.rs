//! Range-checked parsers for the numeric options, so that a value at the edge of its type is
//! refused where it is parsed (with the range in the message and in `--help`), never later as an
//! overflow, a division by zero or an absurd allocation.

/// A finite number in `lo..=hi` (`lo` excluded when `open_low`).
fn float_in(s: &str, lo: f64, hi: f64, open_low: bool) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|e| format!("`{s}`: {e}"))?;
    let low_ok = if open_low { v > lo } else { v >= lo };
    if v.is_finite() && low_ok && v <= hi {
        Ok(v)
    } else {
        let open = if open_low { "(" } else { "[" };
        Err(format!("{v} is not in {open}{lo}, {hi}]"))
    }
}

/// A threshold: in (0, 1].
pub fn threshold(s: &str) -> Result<f32, String> {
    let t: f32 = s.parse().map_err(|e| format!("{e}"))?;
    if t > 0.0 && t <= 1.0 {
        Ok(t)
    } else {
        Err(format!("a threshold must be in (0, 1], found {s}"))
    }
}

/// A capacity factor: in (0, 10^6].
pub fn capacity_factor(s: &str) -> Result<f32, String> {
    float_in(s, 0.0, 1e6, true).map(|v| v as f32)
}

/// A sampling temperature: in [0, 100] (0: greedy).
pub fn temperature(s: &str) -> Result<f32, String> {
    float_in(s, 0.0, 100.0, false).map(|v| v as f32)
}

/// A relative tolerance: in (0, 1].
pub fn tolerance(s: &str) -> Result<f64, String> {
    float_in(s, 0.0, 1.0, true)
}

/// A shard size in GB: in [0.001, 1000].
pub fn shard_gb(s: &str) -> Result<f64, String> {
    float_in(s, 0.001, 1000.0, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edges_of_the_types_are_refused() {
        for bad in ["NaN", "inf", "-inf", "0", "-1", "1e7", "x", ""] {
            assert!(capacity_factor(bad).is_err(), "{bad}");
        }
        assert_eq!(capacity_factor("1.25"), Ok(1.25));
        assert_eq!(temperature("0"), Ok(0.0));
        assert!(temperature("1e30").is_err());
        assert!(tolerance("NaN").is_err());
        assert!(tolerance("0").is_err());
        assert_eq!(tolerance("1"), Ok(1.0));
        assert!(shard_gb("0").is_err());
        assert!(
            capacity_factor("-1")
                .unwrap_err()
                .contains("is not in (0, 1000000]")
        );
    }
}
