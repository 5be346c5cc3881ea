//! Matrix-vector products for decoding one token (`T = 1`) on plain slices.
//!
//! At `T = 1` every dense projection of a transformer is a matrix-vector product. Through candle
//! each one is a tensor allocation, a dispatch and a `gemm` call set up for matrices; for the
//! embedded model (d 128) that fixed cost is many times the arithmetic. These functions take the
//! weights where they already are and write into a caller's buffer, so a decode step allocates
//! nothing.
//!
//! Two layouts, because the model keeps two:
//! - [`matvec_t`]: the weight transposed, `[in, out]` f32 (the project's own models, converted at
//!   load for candle's `x @ w_t`). Computed as `sum over i of x[i] * row i`: 64 output columns at a
//!   time stay in registers while the rows stream past.
//! - [`matvec_rows`]: the weight as stored, `[out, in]`, in f32, f16 or bf16 (Hugging Face
//!   checkpoints). Computed as one dot product per output row, four rows at a time, reading the
//!   weight once, front to back (what a memory-bound step wants).
//!
//! Both accumulate in f32 and widen half-precision weights exactly. The AVX2 + FMA path is chosen
//! at run time; the portable path is the same loops on arrays (and the reference the tests pin
//! both to, with an f64 product).

#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2, Avx512};
use super::simd::{Isa, Portable, Simd};
use super::split;

/// A weight element type [`matvec_rows`] reads: f32, f16 or bf16, widened exactly to f32.
pub(crate) trait MatvecWeight: Copy + Send + Sync + 'static {
    /// The value as f32 (exact).
    fn to_f32(self) -> f32;

    /// `S::W` consecutive values at `p`, widened.
    ///
    /// # Safety
    /// `p` points to `S::W` readable values and the CPU has what `S` needs.
    unsafe fn load<S: Simd>(p: *const Self) -> S::V;
}

impl MatvecWeight for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const Self) -> S::V {
        // SAFETY: forwarded from the caller.
        unsafe { S::load(p) }
    }
}

impl MatvecWeight for half::f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const Self) -> S::V {
        // SAFETY: forwarded from the caller.
        unsafe { S::load_f16(p.cast()) }
    }
}

impl MatvecWeight for half::bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const Self) -> S::V {
        // SAFETY: forwarded from the caller.
        unsafe { S::load_bf16(p.cast()) }
    }
}

/// `y[o] = sum over i of x[i] * w_t[i * out + o]` with `w_t` = `[in, out]` row-major, `in =
/// x.len()`, `out = y.len()`.
///
/// # Panics
/// When `w_t.len() != x.len() * y.len()`.
pub(crate) fn matvec_t(w_t: &[f32], x: &[f32], y: &mut [f32]) {
    matvec_t_with(Isa::best(), w_t, x, y);
}

/// [`matvec_t`] on `path`.
///
/// # Panics
/// As [`matvec_t`], and when this CPU cannot run `path`.
pub(crate) fn matvec_t_with(path: Isa, w_t: &[f32], x: &[f32], y: &mut [f32]) {
    assert_eq!(w_t.len(), x.len() * y.len(), "w_t must be [in, out]");
    assert!(path.is_supported(), "{path:?} is not supported on this CPU");
    match path {
        // SAFETY: `is_supported` checked the features `t_avx2` enables; the lengths were checked.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { t_avx2(w_t, x, y) },
        // SAFETY: as above, for `t_avx512`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { t_avx512(w_t, x, y) },
        // SAFETY: `Portable` needs no CPU feature; the lengths were checked.
        _ => unsafe { t_body::<Portable>(w_t, x, y) },
    }
}

/// `y[o] = sum over i of w[o * in + i] * x[i]` with `w` = `[out, in]` row-major in f32, f16 or
/// bf16, `in = x.len()`, `out = y.len()`.
///
/// # Panics
/// When `w.len() != x.len() * y.len()`.
pub(crate) fn matvec_rows<E: MatvecWeight>(w: &[E], x: &[f32], y: &mut [f32]) {
    matvec_rows_with(Isa::best(), w, x, y);
}

/// [`matvec_rows`] with the output rows cut into `parts` contiguous ranges computed on the rayon
/// pool (the calling thread takes the first): each part streams its own share of the weight. The
/// result is the unsplit one, bit for bit.
pub(crate) fn matvec_rows_split<E: MatvecWeight>(w: &[E], x: &[f32], y: &mut [f32], parts: usize) {
    let n = x.len();
    assert_eq!(w.len(), n * y.len(), "w must be [out, in]");
    let parts = parts.clamp(1, y.len().max(1));
    if parts == 1 {
        return matvec_rows(w, x, y);
    }
    let rows = y.len().div_ceil(parts);
    let work: Vec<_> = y.chunks_mut(rows).zip(w.chunks(rows * n)).collect();
    split::each(work, |(yc, wc)| matvec_rows(wc, x, yc));
}

/// [`matvec_rows`] on `path`.
///
/// # Panics
/// As [`matvec_rows`], and when this CPU cannot run `path`.
pub(crate) fn matvec_rows_with<E: MatvecWeight>(path: Isa, w: &[E], x: &[f32], y: &mut [f32]) {
    assert_eq!(w.len(), x.len() * y.len(), "w must be [out, in]");
    assert!(path.is_supported(), "{path:?} is not supported on this CPU");
    match path {
        // SAFETY: `is_supported` checked the features `rows_avx2` enables; the lengths were
        // checked.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { rows_avx2(w, x, y) },
        // SAFETY: as above, for `rows_avx512`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { rows_avx512(w, x, y) },
        // SAFETY: `Portable` needs no CPU feature; the lengths were checked.
        _ => unsafe { rows_body::<Portable, E, 4>(w, x, y) },
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn t_avx2(w_t: &[f32], x: &[f32], y: &mut [f32]) {
    // SAFETY: this function enables what `Avx2` uses; the caller checked the CPU and lengths.
    unsafe { t_body::<Avx2>(w_t, x, y) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_avx2<E: MatvecWeight>(w: &[E], x: &[f32], y: &mut [f32]) {
    // SAFETY: this function enables what `Avx2` uses; the caller checked the CPU and lengths.
    unsafe { rows_body::<Avx2, E, 4>(w, x, y) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn t_avx512(w_t: &[f32], x: &[f32], y: &mut [f32]) {
    // SAFETY: this function enables what `Avx512` uses; the caller checked the CPU and lengths.
    unsafe { t_body::<Avx512>(w_t, x, y) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn rows_avx512<E: MatvecWeight>(w: &[E], x: &[f32], y: &mut [f32]) {
    // SAFETY: this function enables what `Avx512` uses; the caller checked the CPU and lengths.
    unsafe { rows_body::<Avx512, E, 8>(w, x, y) }
}

/// Columns `c0..c0 + NV * W` of `x @ w_t`, accumulated over every row.
///
/// # Safety
/// `c0 + NV * S::W <= out`, `w_t` has `x.len() * out` values, `y` has `out`.
#[inline(always)]
unsafe fn t_block<S: Simd, const NV: usize>(
    w_t: &[f32],
    x: &[f32],
    y: &mut [f32],
    out: usize,
    c0: usize,
) {
    // SAFETY: every load reads row i's columns c0..c0 + NV * W, inside `w_t` by the contract.
    unsafe {
        let mut acc = [S::zero(); NV];
        let mut p = w_t.as_ptr().add(c0);
        for &xi in x {
            let xv = S::splat(xi);
            for (v, a) in acc.iter_mut().enumerate() {
                *a = S::fma(xv, S::load(p.add(v * S::W)), *a);
            }
            p = p.add(out);
        }
        for (v, a) in acc.iter().enumerate() {
            S::store(y.as_mut_ptr().add(c0 + v * S::W), *a);
        }
    }
}

/// # Safety
/// The CPU has what `S` needs; `w_t.len() == x.len() * y.len()`.
#[inline(always)]
unsafe fn t_body<S: Simd>(w_t: &[f32], x: &[f32], y: &mut [f32]) {
    let out = y.len();
    let w = S::W;
    let mut c = 0;
    // 8 registers of columns: enough independent FMA chains to hide the FMA latency.
    while c + 8 * w <= out {
        // SAFETY: the loop condition keeps the block inside `out` columns; the caller checked
        // the CPU and the lengths.
        unsafe { t_block::<S, 8>(w_t, x, y, out, c) };
        c += 8 * w;
    }
    while c + w <= out {
        // SAFETY: as above.
        unsafe { t_block::<S, 1>(w_t, x, y, out, c) };
        c += w;
    }
    for (o, yo) in y.iter_mut().enumerate().skip(c) {
        let mut s = 0.0f32;
        for (i, &xi) in x.iter().enumerate() {
            s = xi.mul_add(w_t[i * out + o], s);
        }
        *yo = s;
    }
}

/// Blocks of `R` rows (`R` independent FMA chains), then the rows left one by one.
///
/// # Safety
/// The CPU has what `S` needs; `w.len() == x.len() * y.len()`.
#[inline(always)]
unsafe fn rows_body<S: Simd, E: MatvecWeight, const R: usize>(w: &[E], x: &[f32], y: &mut [f32]) {
    let rows = y.len();
    let mut r = 0;
    // SAFETY: each block's rows `r..r + M` exist; the rest is the caller's promise.
    unsafe {
        while r + R <= rows {
            rows_block::<S, E, R>(w, x, y, r);
            r += R;
        }
        while r < rows {
            rows_block::<S, E, 1>(w, x, y, r);
            r += 1;
        }
    }
}

/// `y[r + j] = w[r + j] . x` for `j < M`: whole registers, one tree-shaped horizontal sum per row
/// (a sequential sum of the lanes was a 16-add dependency chain per row, most of a decode step's
/// projections at d 128), then the tail in order.
///
/// # Safety
/// The CPU has what `S` needs; `w.len() == x.len() * y.len()`; `r + M <= y.len()`.
#[inline(always)]
unsafe fn rows_block<S: Simd, E: MatvecWeight, const M: usize>(
    w: &[E],
    x: &[f32],
    y: &mut [f32],
    r: usize,
) {
    let n = x.len();
    let sw = S::W;
    let full = n / sw * sw;
    // SAFETY: rows r..r + M exist; each load reads `sw` values of one row at offset
    // k + sw <= full <= n; the tail is indexed through the slices.
    unsafe {
        let mut acc = [S::zero(); M];
        let base = w.as_ptr().add(r * n);
        let mut k = 0;
        while k < full {
            let xv = S::load(x.as_ptr().add(k));
            for (j, a) in acc.iter_mut().enumerate() {
                *a = S::fma(E::load::<S>(base.add(j * n + k)), xv, *a);
            }
            k += sw;
        }
        for (j, a) in acc.iter().enumerate() {
            let mut s = S::hsum(*a);
            let row = &w[(r + j) * n..(r + j + 1) * n];
            for kk in full..n {
                s += row[kk].to_f32() * x[kk];
            }
            y[r + j] = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// The f64 product, and the bound `sum |w x|` that f32 accumulation error scales with.
    fn reference(w_out_in: impl Fn(usize, usize) -> f32, x: &[f32], out: usize) -> Vec<(f64, f64)> {
        (0..out)
            .map(|o| {
                x.iter().enumerate().fold((0.0, 0.0), |(s, a), (i, &xi)| {
                    let p = f64::from(w_out_in(o, i)) * f64::from(xi);
                    (s + p, a + p.abs())
                })
            })
            .collect()
    }

    fn check(got: &[f32], want: &[(f64, f64)], n: usize, what: &str) {
        // f32 accumulation of n products: |error| <= ~n * eps * sum |w x|; 2 n eps leaves room
        // for the blocked order and the horizontal sums.
        let eps = f64::from(f32::EPSILON);
        for (o, (&g, &(v, mag))) in got.iter().zip(want).enumerate() {
            let tol = 2.0 * n as f64 * eps * mag + 1e-30;
            assert!(
                (f64::from(g) - v).abs() <= tol,
                "{what}: y[{o}] = {g}, f64 reference {v} (tolerance {tol:e})"
            );
        }
    }

    // Shapes around every edge: below one register, between blocks, odd tails, d 128.
    const SHAPES: [(usize, usize); 7] = [
        (1, 1),
        (3, 5),
        (8, 8),
        (17, 9),
        (128, 128),
        (128, 256),
        (77, 131),
    ];

    #[test]
    fn transposed_matvec_matches_f64_reference_on_every_path() {
        let mut rng = StdRng::seed_from_u64(11);
        for (n_in, n_out) in SHAPES {
            let w_t: Vec<f32> = (0..n_in * n_out)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let x: Vec<f32> = (0..n_in).map(|_| rng.random_range(-2.0..2.0)).collect();
            let want = reference(|o, i| w_t[i * n_out + o], &x, n_out);
            for path in paths() {
                let mut y = vec![f32::NAN; n_out];
                matvec_t_with(path, &w_t, &x, &mut y);
                check(&y, &want, n_in, &format!("t {n_in}x{n_out} {path:?}"));
            }
        }
    }

    fn rows_case<E: MatvecWeight>(from: fn(f32) -> E, name: &str) {
        let mut rng = StdRng::seed_from_u64(12);
        for (n_in, n_out) in SHAPES {
            let w: Vec<E> = (0..n_in * n_out)
                .map(|_| from(rng.random_range(-1.0..1.0)))
                .collect();
            let x: Vec<f32> = (0..n_in).map(|_| rng.random_range(-2.0..2.0)).collect();
            // The reference multiplies the widened weights: widening is exact, so the only
            // difference allowed is f32 accumulation.
            let want = reference(|o, i| w[o * n_in + i].to_f32(), &x, n_out);
            for path in paths() {
                let mut y = vec![f32::NAN; n_out];
                matvec_rows_with(path, &w, &x, &mut y);
                check(&y, &want, n_in, &format!("{name} {n_in}x{n_out} {path:?}"));
            }
        }
    }

    #[test]
    fn row_matvec_matches_f64_reference_in_every_weight_type() {
        rows_case::<f32>(|v| v, "f32");
        rows_case::<half::f16>(half::f16::from_f32, "f16");
        rows_case::<half::bf16>(half::bf16::from_f32, "bf16");
    }

    /// Every path this CPU runs; a path that `XMOE_REQUIRE_KERNELS` names (`avx2`, `avx512`)
    /// must be among them, so that a detection bug fails instead of skipping it.
    fn paths() -> Vec<Isa> {
        if let Ok(list) = std::env::var(super::super::REQUIRE_KERNELS_ENV) {
            for (name, path) in [("avx2", Isa::Avx2), ("avx512", Isa::Avx512)] {
                if list.split(',').any(|n| n.trim() == name) {
                    assert!(
                        path.is_supported(),
                        "XMOE_REQUIRE_KERNELS names {name} but the matvec check says no"
                    );
                }
            }
        }
        [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|p| p.is_supported())
            .collect()
    }

    #[test]
    fn split_rows_give_the_unsplit_result_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(13);
        let (n_in, n_out) = (96, 203);
        let w: Vec<half::bf16> = (0..n_in * n_out)
            .map(|_| half::bf16::from_f32(rng.random_range(-1.0..1.0)))
            .collect();
        let x: Vec<f32> = (0..n_in).map(|_| rng.random_range(-2.0..2.0)).collect();
        let mut whole = vec![0.0f32; n_out];
        matvec_rows(&w, &x, &mut whole);
        for parts in [1, 2, 3, 7] {
            let mut split = vec![f32::NAN; n_out];
            matvec_rows_split(&w, &x, &mut split, parts);
            assert_eq!(split, whole, "{parts} parts");
            // From a pool thread, as the lean decoder calls it.
            let mut split = vec![f32::NAN; n_out];
            rayon::scope(|_| matvec_rows_split(&w, &x, &mut split, parts));
            assert_eq!(split, whole, "{parts} parts, from the pool");
        }
    }

    #[test]
    #[should_panic(expected = "w_t must be [in, out]")]
    fn wrong_shape_is_refused() {
        let mut y = [0.0f32; 3];
        matvec_t(&[0.0; 5], &[1.0, 2.0], &mut y);
    }
}
