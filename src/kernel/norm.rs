//! RMSNorm of rows on plain slices: the full pass ([`crate::model::blocks::Norm`]) and the lean
//! decoder share it, so that both give the same bits.
//!
//! candle-nn's CPU RMSNorm sums each row's squares in one `f32` chain, one dependent add per
//! element: about 2 us for a row of 1024 on the Xeon of `docs/benchmarks.md`, 0.33 ms for the
//! 256 rows of an eval pass (on 2 threads), and four of them per layer at d 1024. Here each row
//! sums its squares in 16 interleaved lanes (lane `i` takes elements `i`, `i + 16`, ...), added
//! together in a fixed tree, so the result is the same on every CPU and for every thread count,
//! and a compiler vectorises the lanes.

use rayon::prelude::*;

/// Lanes of the sum of squares.
const LANES: usize = 16;

/// Rows per rayon task: below this many a pass stays on the calling thread.
const ROWS_PER_TASK: usize = 32;

/// `sum of x[i]^2` in [`LANES`] interleaved lanes, then lanes `i` and `i + 8`, `i + 4`, `i + 2`,
/// `i + 1` added in that order.
#[inline(always)]
pub(crate) fn sum_squares(x: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v * v;
        }
    }
    for (l, &v) in lanes.iter_mut().zip(chunks.remainder()) {
        *l += v * v;
    }
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
        width /= 2;
    }
    lanes[0]
}

/// `out = x * (1 / sqrt(mean(x^2) + eps)) * w` for one row, as transformers computes it
/// (`weight * (x * rsqrt(variance + eps))`), with the sum of squares of [`sum_squares`]: a
/// multiplication where candle-nn divides every element.
pub(crate) fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx512() {
        // SAFETY: AVX-512F was detected.
        return unsafe { rms_norm_row_avx512(x, w, eps, out) };
    }
    rms_norm_row_any(x, w, eps, out);
}

/// [`rms_norm_row`] compiled for AVX-512: the same operations lane by lane (no fused
/// multiply-adds), so the same bits.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rms_norm_row_avx512(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    rms_norm_row_any(x, w, eps, out);
}

#[inline(always)]
fn rms_norm_row_any(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let inv = 1.0 / (sum_squares(x) / x.len() as f32 + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * w;
    }
}

/// [`rms_norm_row`] on every row of `x` (rows of `w.len()` values), over the rayon pool when
/// there are enough rows.
///
/// # Panics
/// When `x` is not whole rows or `out` is not as long as `x`.
pub(crate) fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    assert!(
        n > 0 && x.len().is_multiple_of(n),
        "{} values in rows of {n}",
        x.len()
    );
    assert_eq!(out.len(), x.len(), "out");
    if x.len() / n < 2 * ROWS_PER_TASK {
        for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            rms_norm_row(xr, w, eps, or);
        }
    } else {
        x.par_chunks_exact(n)
            .zip(out.par_chunks_exact_mut(n))
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(xr, or)| rms_norm_row(xr, w, eps, or));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_match_an_f64_reference_and_every_thread_count_gives_the_same_bits() {
        for n in [1, 7, 16, 33, 64, 1024] {
            let rows = 70;
            let x: Vec<f32> = (0..rows * n)
                .map(|i| ((i * 7919 % 1013) as f32 / 500.0 - 1.0) * 3.0)
                .collect();
            let w: Vec<f32> = (0..n).map(|i| 0.5 + i as f32 / n as f32).collect();
            let eps = 1e-6;
            let mut out = vec![f32::NAN; x.len()];
            rms_norm_rows(&x, &w, eps, &mut out);
            for (r, (xr, or)) in x.chunks(n).zip(out.chunks(n)).enumerate() {
                let ms = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
                let m = (ms + eps as f64).sqrt();
                for (j, (&v, &o)) in xr.iter().zip(or).enumerate() {
                    let want = v as f64 / m * w[j] as f64;
                    assert!(
                        (o as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "n {n} row {r} col {j}: {o} vs {want}"
                    );
                }
            }
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut again = vec![f32::NAN; x.len()];
                pool.install(|| rms_norm_rows(&x, &w, eps, &mut again));
                assert!(
                    out.iter()
                        .zip(&again)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "n {n}, {threads} threads"
                );
            }
            // One row alone gives the bits it gives among others, compiled for this CPU's widest
            // vectors or for any x86-64.
            let mut one = vec![f32::NAN; n];
            rms_norm_row(&x[3 * n..4 * n], &w, eps, &mut one);
            assert!(
                one.iter()
                    .zip(&out[3 * n..4 * n])
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
            let mut any = vec![f32::NAN; n];
            rms_norm_row_any(&x[3 * n..4 * n], &w, eps, &mut any);
            assert!(
                one.iter()
                    .zip(&any)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "n {n}: ISA"
            );
        }
    }

    #[test]
    fn the_lanes_add_in_a_fixed_tree() {
        // 17 values: lane 0 holds x[0]^2 + x[16]^2; the tree then adds 8, 4, 2, 1 apart.
        let x: Vec<f32> = (1..=17).map(|v| v as f32).collect();
        let mut lanes: Vec<f32> = (0..16).map(|i| x[i] * x[i]).collect();
        lanes[0] += x[16] * x[16];
        for width in [8, 4, 2, 1] {
            for i in 0..width {
                lanes[i] += lanes[i + width];
            }
        }
        assert_eq!(sum_squares(&x).to_bits(), lanes[0].to_bits());
        assert_eq!(sum_squares(&[]), 0.0);
    }
}
