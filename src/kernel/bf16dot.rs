//! bf16 expert weights on AVX-512 BF16 (`vdpbf16ps`): [`KernelVariant::Avx512Bf16`](super::KernelVariant::Avx512Bf16).
//!
//! # Why a variant of its own
//! `vdpbf16ps` multiplies pairs of bf16 values and adds both products to an f32 lane, twice the
//! multiply-adds of an f32 FMA per instruction and no widening step. Its operands are both bf16,
//! so the activations are rounded to bf16 (to nearest, ties to even) before they meet the weights,
//! as transformers and llama.cpp do when a model's weights are bf16. That changes the results
//! (by about 2^-9 of an activation, relative), so the exact [`KernelVariant::Avx512`](super::KernelVariant::Avx512) stays
//! selectable; f32 and f16 weights run the same code under both names.
//!
//! # Layouts
//! - Panels: the bf16 panels are already stored `(k, k + 1)` pairs per column
//!   ([`super::panel_pair_at`]), the layout `vdpbf16ps` reads. A tile broadcasts one token's
//!   activation pair (one 32-bit value) against two vectors of 16 column pairs.
//! - Rows read in place: a weight row's 32 consecutive bf16 values meet 32 activations; each
//!   output is one `vdpbf16ps` chain in `k` order and one horizontal sum, whatever the tile, so
//!   the results are the same bits for every tile shape, block split and thread count (as in
//!   [`super::rows`]).
//!
//! `vdpbf16ps` treats subnormal inputs as zero and flushes subnormal results (its definition);
//! subnormal activations or weights are far below anything a layer's output resolves.

use std::arch::x86_64::*;

use super::rows::{DotTile, RowWeights, expert_block};
use super::simd::{Avx512, Simd};
use super::{Dst, Job, PANEL, ThreadScratch, accumulate, grow, hidden};

/// Rounds `n` floats at `src` to bf16 (to nearest, ties to even) into `pairs` 32-bit pairs at
/// `dst` (the even index in the low half), zero past `n`.
///
/// # Safety
/// `src` has `n` readable floats, `dst` has `pairs >= n.div_ceil(2)` writable values, and the
/// CPU has AVX-512F and AVX-512 BF16.
#[inline(always)]
unsafe fn round_row(src: *const f32, n: usize, dst: *mut u32, pairs: usize) {
    // SAFETY: loads read `i + 32 <= n` floats, or `n - i` of them masked; stores write 16 pairs
    // at `i / 2 + 16 <= pairs` or the `pairs - i / 2` left, masked.
    unsafe {
        let mut i = 0;
        while i < 2 * pairs {
            let lo_n = n.saturating_sub(i).min(16);
            let hi_n = n.saturating_sub(i + 16).min(16);
            let lo = _mm512_maskz_loadu_ps(mask16(lo_n), src.wrapping_add(i));
            let hi = _mm512_maskz_loadu_ps(mask16(hi_n), src.wrapping_add(i + 16));
            let bf = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
            let left = (pairs - i / 2).min(16);
            _mm512_mask_storeu_epi32(dst.add(i / 2).cast(), mask16(left), bf);
            i += 32;
        }
    }
}

/// Rounds `m` rows of `n` floats (row `r` at `src(r)`) to bf16 pairs, `pairs` per row, and
/// zeros the rows from `m` to `rows` (padding for a whole AMX tile).
///
/// # Safety
/// As for [`round_row`], per row; `dst` has `rows * pairs` writable values.
#[inline(always)]
pub(super) unsafe fn round_rows(
    src: impl Fn(usize) -> *const f32,
    m: usize,
    n: usize,
    dst: *mut u32,
    pairs: usize,
    rows: usize,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        for r in 0..m {
            round_row(src(r), n, dst.add(r * pairs), pairs);
        }
        std::ptr::write_bytes(dst.add(m * pairs), 0, (rows - m) * pairs);
    }
}

/// The first `n` of 16 lanes.
#[inline(always)]
fn mask16(n: usize) -> u16 {
    if n >= 16 { u16::MAX } else { (1u16 << n) - 1 }
}

/// `acc + a . b` over bf16 pairs (`vdpbf16ps`).
#[inline(always)]
unsafe fn dp(acc: __m512, a: __m512i, b: __m512i) -> __m512 {
    // SAFETY: bit casts between 512-bit vector types; the caller enabled AVX-512 BF16.
    unsafe {
        _mm512_dpbf16_ps(
            acc,
            std::mem::transmute::<__m512i, __m512bh>(a),
            std::mem::transmute::<__m512i, __m512bh>(b),
        )
    }
}

/// `acc[i][v]` over `pairs` activation pairs of each row `a[i]` and `N` vectors of a pair-
/// interleaved panel: vector `v` is columns `(v % 2) * 16 ..` of the panel at `b + (v / 2) *
/// stride` (so `N = 4` takes two panels, twice the independent chains for a lone token).
///
/// # Safety
/// Each `a[i]` has `pairs` readable values; each panel has `pairs` pairs of 32 columns; the CPU
/// has AVX-512F and AVX-512 BF16.
#[inline(always)]
unsafe fn panel_tile<const M: usize, const N: usize>(
    a: &[*const u32; M],
    b: *const u16,
    stride: usize,
    pairs: usize,
) -> [[__m512; N]; M] {
    // SAFETY: pair `q < pairs` of a panel is 64 values at `q * 2 * PANEL`; the caller vouched
    // for the rows and panels.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); N]; M];
        let base: [*const u16; N] = std::array::from_fn(|v| b.add((v / 2) * stride + (v % 2) * 32));
        for q in 0..pairs {
            let mut w = [_mm512_setzero_si512(); N];
            for v in 0..N {
                w[v] = _mm512_loadu_si512(base[v].add(q * 2 * PANEL).cast());
            }
            for i in 0..M {
                let x = _mm512_set1_epi32(*a[i].add(q) as i32);
                for v in 0..N {
                    acc[i][v] = dp(acc[i][v], x, w[v]);
                }
            }
        }
        acc
    }
}

/// First product for rows `r0..r0 + M` of the block: their rounded token rows (`a16`, `kp`
/// pairs each) times every panel of `w1`, into `z`.
#[inline(always)]
unsafe fn mm1<const M: usize>(job: &Job, e: usize, r0: usize, a16: *const u32, z: *mut f32) {
    let ex = job.ex;
    let (n1, k1, kp) = (ex.n1, ex.k1, ex.d.div_ceil(2));
    let a: [*const u32; M] = std::array::from_fn(|i| a16.wrapping_add((r0 + i) * kp));
    let w1 = ex.w1::<half::bf16>(e).cast::<u16>();
    let mut p = 0;
    while p < n1 {
        // SAFETY: as `mm1_rows` in the f32 kernel: panel `p` of `w1(e)` has `k1 >= 2 * kp - 1`
        // stored rows (even), `z` holds the block's rows of `n1` floats; the two-panel path reads
        // panel `p + PANEL < n1`.
        unsafe {
            if M == 1 && p + PANEL < n1 {
                let acc = panel_tile::<1, 4>(&[a[0]], w1.add(p * k1), PANEL * k1, kp);
                for (v, &r) in acc[0].iter().enumerate() {
                    _mm512_storeu_ps(z.add(r0 * n1 + p + v * 16), r);
                }
                p += 2 * PANEL;
                continue;
            }
            let acc = panel_tile::<M, 2>(&a, w1.add(p * k1), 0, kp);
            for (i, row) in acc.iter().enumerate() {
                for (v, &r) in row.iter().enumerate() {
                    _mm512_storeu_ps(z.add((r0 + i) * n1 + p + v * 16), r);
                }
            }
        }
        p += PANEL;
    }
}

/// Second product for rows `r0..r0 + M`: their rounded hidden rows (`h16`, `h_pad / 2` pairs
/// each) times `w2`, plus `w * down_bias`, added into the destination rows.
#[inline(always)]
unsafe fn mm2<const M: usize>(
    job: &Job,
    e: usize,
    pair0: usize,
    r0: usize,
    h16: *const u32,
    dst: Dst,
) {
    let ex = job.ex;
    let (d, d_pad, hp) = (ex.d, ex.d_pad, ex.h_pad / 2);
    let a: [*const u32; M] = std::array::from_fn(|i| h16.wrapping_add((r0 + i) * hp));
    let out: [*mut f32; M] = std::array::from_fn(|i| job.dst_row(dst, pair0 + r0 + i));
    let w: [f32; M] = std::array::from_fn(|i| job.groups.weights[pair0 + r0 + i]);
    let w2 = ex.w2::<half::bf16>(e).cast::<u16>();
    let b2 = ex.b2.as_ref().map(|b| b[e * d_pad..].as_ptr());
    let mut q = 0;
    while q < d_pad {
        // SAFETY: as `mm2_rows` in the f32 kernel: panel `q` of `w2(e)` has `h_pad` rows;
        // `accumulate` writes `min(d - col, 16)` floats of a destination row of `d`.
        unsafe {
            if M == 1 && q + PANEL < d_pad {
                let acc = panel_tile::<1, 4>(&[a[0]], w2.add(q * ex.h_pad), PANEL * ex.h_pad, hp);
                for (v, &r) in acc[0].iter().enumerate() {
                    let col = q + v * 16;
                    if col < d {
                        accumulate::<Avx512>(
                            out[0].add(col),
                            r,
                            w[0],
                            b2.map(|b| b.add(col)),
                            d - col,
                        );
                    }
                }
                q += 2 * PANEL;
                continue;
            }
            let acc = panel_tile::<M, 2>(&a, w2.add(q * ex.h_pad), 0, hp);
            for (i, row) in acc.iter().enumerate() {
                for (v, &r) in row.iter().enumerate() {
                    let col = q + v * 16;
                    if col < d {
                        accumulate::<Avx512>(
                            out[i].add(col),
                            r,
                            w[i],
                            b2.map(|b| b.add(col)),
                            d - col,
                        );
                    }
                }
            }
        }
        q += PANEL;
    }
}

/// Runs `f::<M>(.., r0, ..)` over rows `0..m` in tiles of 12 rows, then 4, 2 and 1.
macro_rules! tiles {
    ($m:expr, $r0:ident => $f:ident($($arg:expr),*)) => {{
        let m = $m;
        let mut $r0 = 0usize;
        while $r0 + 12 <= m {
            $f::<12>($($arg),*);
            $r0 += 12;
        }
        while $r0 + 4 <= m {
            $f::<4>($($arg),*);
            $r0 += 4;
        }
        while $r0 + 2 <= m {
            $f::<2>($($arg),*);
            $r0 += 2;
        }
        while $r0 < m {
            $f::<1>($($arg),*);
            $r0 += 1;
        }
    }};
}

/// This thread's items on packed bf16 panels.
///
/// # Safety
/// As for the f32 kernel's `fused_items` (items and `dst` from `moe_forward`'s planning, `ts.z`
/// sized for a block, `job.ex` packed in bf16 panels), and the CPU has AVX-512F, AVX-512BW and
/// AVX-512 BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
pub(super) unsafe fn run_panels(job: &Job, dst: Dst, ts: &mut ThreadScratch) {
    let ex = job.ex;
    let (d, n1, block) = (ex.d, ex.n1, ex.block_rows());
    let (kp, hp) = (d.div_ceil(2), ex.h_pad / 2);
    grow(&mut ts.a16, block * kp);
    grow(&mut ts.h16, block * hp);
    let (z, a16, h16) = (ts.z.as_mut_ptr(), ts.a16.as_mut_ptr(), ts.h16.as_mut_ptr());
    let xp = job.x.as_ptr();
    for &(e, lo, hi) in &ts.items {
        let (e, lo, hi) = (e as usize, lo as usize, hi as usize);
        let mut b0 = lo;
        while b0 < hi {
            let m = (hi - b0).min(block);
            // SAFETY: token ids are < T (checked in `moe_forward`), so each token row has `d`
            // floats; `a16` and `h16` were sized above for `block >= m` rows, `z` in `run`; the
            // tiles' bounds are stated where they read.
            unsafe {
                let token_row = |r: usize| xp.add(job.groups.tokens[b0 + r] as usize * d);
                round_rows(token_row, m, d, a16, kp, m);
                tiles!(m, r0 => mm1(job, e, r0, a16, z));
                hidden::<Avx512>(job, e, b0, m, z);
                round_rows(|r| z.add(r * n1), m, ex.h_pad, h16, hp, m);
                tiles!(m, r0 => mm2(job, e, b0, r0, h16, dst));
            }
            b0 += m;
        }
    }
}

/// `out[i][j] = dot(a[i], w[j])` over `k` values: `a[i]` rounded pairs (zero past `k`, padded to
/// a multiple of 16 pairs), `w[j]` bf16 rows read 32 at a time, the last part masked.
///
/// # Safety
/// Each `a[i]` has `k.div_ceil(32) * 16` readable pairs, each `w[j]` `k` readable values (any
/// alignment); the CPU has AVX-512F, AVX-512BW and AVX-512 BF16.
#[inline(always)]
unsafe fn dot_tile<const M: usize, const R: usize>(
    a: &[*const u32; M],
    w: &[*const u16; R],
    k: usize,
) -> [[f32; R]; M] {
    // SAFETY: full loads read `kk + 32 <= k` weights; the last, masked one only `k - kk`; the
    // activation loads stay within the caller's padded rows.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); R]; M];
        let mut kk = 0;
        while kk < k {
            let left = k - kk;
            let mask = if left >= 32 {
                u32::MAX
            } else {
                (1u32 << left) - 1
            };
            let mut wv = [_mm512_setzero_si512(); R];
            for j in 0..R {
                wv[j] = _mm512_maskz_loadu_epi16(mask, w[j].add(kk).cast());
            }
            for i in 0..M {
                let av = _mm512_loadu_si512(a[i].add(kk / 2).cast());
                for j in 0..R {
                    acc[i][j] = dp(acc[i][j], av, wv[j]);
                }
            }
            kk += 32;
        }
        let mut out = [[0.0f32; R]; M];
        for i in 0..M {
            for j in 0..R {
                out[i][j] = Avx512::hsum(acc[i][j]);
            }
        }
        out
    }
}

/// [`dot_tile`] as a [`DotTile`] for `rows::rows_product`.
struct Bf16Dot;

impl DotTile for Bf16Dot {
    type A = u32;
    type W = u16;
    #[inline(always)]
    unsafe fn tile<const M: usize, const R: usize>(
        a: &[*const u32; M],
        w: &[*const u16; R],
        k: usize,
    ) -> [[f32; R]; M] {
        // SAFETY: forwarded from the caller.
        unsafe { dot_tile::<M, R>(a, w, k) }
    }
}

/// This thread's items on bf16 rows read in place.
///
/// # Safety
/// As for `rows::rows_items` (items and `dst` from `moe_forward`'s planning, `ts.z` sized for a
/// block, `rows` bf16 and checked against `d` and `h`), and the CPU has AVX-512F, AVX-512BW and
/// AVX-512 BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
pub(super) unsafe fn run_rows(job: &Job, rows: &RowWeights, dst: Dst, ts: &mut ThreadScratch) {
    let ex = job.ex;
    let (d, h, n1, block) = (ex.d, ex.h, ex.n1, ex.block_rows());
    // Rounded rows padded to whole vectors of 32 values, so `dot_tile` loads them unmasked.
    let (kp, hp) = (d.div_ceil(32) * 16, h.div_ceil(32) * 16);
    grow(&mut ts.a16, block * kp);
    grow(&mut ts.h16, block * hp);
    let (z, a16, h16) = (ts.z.as_mut_ptr(), ts.a16.as_mut_ptr(), ts.h16.as_mut_ptr());
    let xp = job.x.as_ptr();
    for &(e, lo, hi) in &ts.items {
        let (e, lo, hi) = (e as usize, lo as usize, hi as usize);
        let mut b0 = lo;
        while b0 < hi {
            let m = (hi - b0).min(block);
            let a_row = |r: usize| a16.cast_const().wrapping_add(r * kp);
            let h_row = |r: usize| h16.cast_const().wrapping_add(r * hp);
            // SAFETY: as `rows::rows_items`: token rows have `d` floats, gate and up hold `h x d`
            // values and down `d x h`, `z` holds the block's rows of `n1` floats (`up_col + j <
            // n1` for `j < h`), `dst_row` a destination row of `d` floats; `a16` and `h16` were
            // sized above for `block >= m` padded rows.
            unsafe {
                let token_row = |r: usize| xp.add(job.groups.tokens[b0 + r] as usize * d);
                round_rows(token_row, m, d, a16, kp, m);
                expert_block::<Bf16Dot, Avx512, 4, 4, 8>(
                    job,
                    rows,
                    (e, b0, m),
                    z,
                    dst,
                    a_row,
                    h_row,
                    || round_rows(|r| z.add(r * n1), m, h, h16, hp, m),
                );
            }
            b0 += m;
        }
    }
}
