//! Expert weights computed where they lie: the checkpoint's own `[out, in]` rows, read in place
//! from memory the layer does not own (a memory-mapped safetensors shard).
//!
//! # Why a second layout
//! Packing a layer into panels reads and rewrites every weight once at load: for a 14 GB bf16
//! checkpoint that was most of a 52 s load, and the packed copy plus the file's pages do not both
//! fit in 24 GiB, so a "warm" second load was cold again. A model larger than memory (DeepSeek-V2-Lite,
//! 29 GiB) could not load at all. Rows read in place cost nothing at load, count once in memory
//! (the page cache's copy is the only one), and let the kernel page experts in from the file as
//! the router picks them.
//!
//! # How the rows compute
//! Both matrices of an expert are multiplied in the `x . w^T` form: every output is the dot product
//! of an activation row with a weight row, both contiguous. A tile takes `M` activation rows and
//! `R` weight rows, keeps `M x R` accumulators in registers, and loads each weight vector once for
//! the `M` rows (`R + M` loads per `M x R` FMAs). Weight rows are taken in chunks of about
//! [`CHUNK_BYTES`] so that a chunk stays in L2 while every token tile of the block passes over it.
//! Each output is one FMA chain in `k` order and one horizontal sum, whatever tile it falls in, so
//! the results are the same bits for every tile shape, block split and thread count.

use std::sync::Arc;

use super::matvec::MatvecWeight;
#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2, Avx512};
use super::simd::{Isa, Portable, Simd};
use super::{Dst, Job, KernelVariant, SharedOut, ThreadScratch, WeightDtype, hidden};

/// Weight bytes a chunk of rows may take: a quarter of this machine kind's 512 KiB L2, leaving
/// room for the activation rows and the hidden block.
const CHUNK_BYTES: usize = 128 * 1024;

/// Memory that holds expert weights: a mapped file, or any byte buffer. The bytes must not change
/// while a layer reads them.
pub trait RowSource: Send + Sync {
    /// The bytes.
    fn bytes(&self) -> &[u8];
}

impl RowSource for memmap2::Mmap {
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl RowSource for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// Where one matrix starts: a byte offset into one of the layer's sources. The matrix is stored
/// row-major `[out, in]`, little-endian, in the layer's dtype; no alignment is needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowRef {
    /// Index into the sources given to [`super::PackedExperts::from_rows`].
    pub source: usize,
    /// Byte offset of the first weight.
    pub offset: usize,
}

/// One expert's matrices: `gate` and `up` `[h, d]`, `down` `[d, h]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertRows {
    /// Gate projection (gated experts only).
    pub gate: Option<RowRef>,
    /// Up projection.
    pub up: RowRef,
    /// Down projection.
    pub down: RowRef,
}

/// The row-layout weights of a layer: checked references into shared sources.
#[derive(Clone)]
pub(super) struct RowWeights {
    pub(super) dtype: WeightDtype,
    sources: Vec<Arc<dyn RowSource>>,
    pub(super) experts: Vec<ExpertRows>,
}

impl std::fmt::Debug for RowWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowWeights")
            .field("dtype", &self.dtype)
            .field("sources", &self.sources.len())
            .field("experts", &self.experts.len())
            .finish()
    }
}

impl RowWeights {
    /// Checks that every matrix lies inside its source: `[h, d]` for gate and up, `[d, h]` for
    /// down, `gated` deciding whether every expert has a gate.
    pub(super) fn new(
        dtype: WeightDtype,
        d: usize,
        h: usize,
        gated: bool,
        sources: Vec<Arc<dyn RowSource>>,
        experts: Vec<ExpertRows>,
    ) -> Result<Self, String> {
        let len = h
            .checked_mul(d)
            .and_then(|n| n.checked_mul(dtype.bytes()))
            .ok_or_else(|| format!("experts of [{h}, {d}] overflow"))?;
        for (e, x) in experts.iter().enumerate() {
            if x.gate.is_some() != gated {
                return Err(format!(
                    "expert {e}: {}",
                    if gated {
                        "gate missing"
                    } else {
                        "a gate for non-gated experts"
                    }
                ));
            }
            for (what, r) in [("gate", x.gate), ("up", Some(x.up)), ("down", Some(x.down))] {
                let Some(r) = r else { continue };
                let src = sources.get(r.source).ok_or_else(|| {
                    format!(
                        "expert {e}: {what} names source {}, of {}",
                        r.source,
                        sources.len()
                    )
                })?;
                let size = src.bytes().len();
                if r.offset.checked_add(len).is_none_or(|end| end > size) {
                    return Err(format!(
                        "expert {e}: {what} at byte {} needs {len} bytes, the source has {size}",
                        r.offset
                    ));
                }
            }
        }
        Ok(Self {
            dtype,
            sources,
            experts,
        })
    }

    /// Bytes of the matrices (each expert's gate, up and down), without what else the sources
    /// hold.
    pub(super) fn matrix_bytes(&self, d: usize, h: usize) -> usize {
        let per = if self.experts.first().is_some_and(|x| x.gate.is_some()) {
            3
        } else {
            2
        };
        self.experts.len() * per * d * h * self.dtype.bytes()
    }

    pub(super) fn at<E>(&self, r: RowRef) -> *const E {
        self.sources[r.source]
            .bytes()
            .as_ptr()
            .wrapping_add(r.offset)
            .cast()
    }
}

/// `out[i][j] = sum over kk < k of a[i][kk] * w[j][kk]`: vector FMAs over the whole registers,
/// one horizontal sum, then the tail in order.
///
/// # Safety
/// Each `a[i]` has `k` readable floats, each `w[j]` `k` readable values (any alignment), and the
/// caller enabled what `S` needs.
#[inline(always)]
unsafe fn dot_tile<S: Simd, E: MatvecWeight, const M: usize, const R: usize, const PF: bool>(
    a: &[*const f32; M],
    w: &[*const E; R],
    pf: &[*const E; R],
    k: usize,
) -> [[f32; R]; M] {
    let full = k / S::W * S::W;
    // Weights per cache line.
    let line = 64 / size_of::<E>();
    // SAFETY: every load reads `W` values at `kk + W <= full <= k` of a row, the tail reads
    // `kk < k`; the caller guarantees those are readable.
    unsafe {
        let mut acc = [[S::zero(); R]; M];
        let mut kk = 0;
        while kk < full {
            if PF && kk % line == 0 {
                for p in pf {
                    prefetch(p.wrapping_add(kk));
                }
            }
            let mut wv = [S::zero(); R];
            for j in 0..R {
                wv[j] = E::load::<S>(w[j].add(kk));
            }
            for i in 0..M {
                let av = S::load(a[i].add(kk));
                for j in 0..R {
                    acc[i][j] = S::fma(av, wv[j], acc[i][j]);
                }
            }
            kk += S::W;
        }
        let mut out = [[0.0f32; R]; M];
        for i in 0..M {
            for j in 0..R {
                let mut s = S::hsum(acc[i][j]);
                for t in full..k {
                    s += *a[i].add(t) * w[j].add(t).read_unaligned().to_f32();
                }
                out[i][j] = s;
            }
        }
        out
    }
}

/// A dot-product tile over activation rows of `A` and weight rows of `W`: what
/// [`rows_product`] runs, so that one tiling loop serves the exact kernels and the bf16-rounding
/// one (`bf16dot`).
pub(super) trait DotTile {
    /// Activation element.
    type A;
    /// Weight element.
    type W;
    /// `out[i][j] = dot(a[i], w[j])` over `k` values.
    ///
    /// # Safety
    /// The rows hold what the implementation reads for `k` values, and the caller enabled the
    /// CPU features it needs.
    unsafe fn tile<const M: usize, const R: usize>(
        a: &[*const Self::A; M],
        w: &[*const Self::W; R],
        k: usize,
    ) -> [[f32; R]; M];

    /// [`DotTile::tile`], also prefetching the weight rows `pf` (the same `k` values), which the
    /// next chunk of [`rows_product`] reads; by default it does not prefetch.
    ///
    /// # Safety
    /// As for [`DotTile::tile`]; `pf` may point anywhere (a prefetch never faults).
    #[inline(always)]
    unsafe fn tile_prefetching<const M: usize, const R: usize>(
        a: &[*const Self::A; M],
        w: &[*const Self::W; R],
        pf: &[*const Self::W; R],
        k: usize,
    ) -> [[f32; R]; M] {
        let _ = pf;
        // SAFETY: forwarded from the caller.
        unsafe { Self::tile::<M, R>(a, w, k) }
    }
}

/// Asks for the cache line at `p` (a hint: never faults, whatever `p`).
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetcht0` reads nothing architecturally and cannot fault on any address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// [`dot_tile`] on `S` and weights of `E`.
struct SimdDot<S, E>(std::marker::PhantomData<(S, E)>);

impl<S: Simd, E: MatvecWeight> DotTile for SimdDot<S, E> {
    type A = f32;
    type W = E;
    #[inline(always)]
    unsafe fn tile<const M: usize, const R: usize>(
        a: &[*const f32; M],
        w: &[*const E; R],
        k: usize,
    ) -> [[f32; R]; M] {
        // SAFETY: forwarded from the caller.
        unsafe { dot_tile::<S, E, M, R, false>(a, w, w, k) }
    }

    #[inline(always)]
    unsafe fn tile_prefetching<const M: usize, const R: usize>(
        a: &[*const f32; M],
        w: &[*const E; R],
        pf: &[*const E; R],
        k: usize,
    ) -> [[f32; R]; M] {
        // SAFETY: forwarded from the caller.
        unsafe { dot_tile::<S, E, M, R, true>(a, w, pf, k) }
    }
}

/// `sink(r, j, dot(a(r), w_j))` for the `m` activation rows `a(r)` and the `n` weight rows `w_j`
/// of `k` values each (`w` row-major), chunk by chunk of weight rows: `MR` rows by `R` weight rows
/// per tile, and a lone row against `R1` weight rows (more independent FMA chains).
///
/// # Safety
/// `a(r)` holds what `T` reads for `k` values for `r < m`, `w` holds `n x k` values, and the
/// caller enabled what `T` needs.
#[inline(always)]
pub(super) unsafe fn rows_product<T: DotTile, const MR: usize, const R: usize, const R1: usize>(
    m: usize,
    a: impl Fn(usize) -> *const T::A,
    w: *const T::W,
    n: usize,
    k: usize,
    mut sink: impl FnMut(usize, usize, f32),
) {
    let chunk = (CHUNK_BYTES / (k * size_of::<T::W>()).max(1)).max(R1);
    let row = |j: usize| w.wrapping_add(j * k);
    let mut j0 = 0;
    while j0 < n {
        let j1 = (j0 + chunk).min(n);
        let mut r0 = 0;
        // SAFETY: every tile's activation rows are `< m` and its weight rows `< j1 <= n`: rows
        // the caller vouched for.
        unsafe {
            while r0 + MR <= m {
                let a_rows: [*const T::A; MR] = std::array::from_fn(|i| a(r0 + i));
                let mut j = j0;
                while j + R <= j1 {
                    let w_rows: [*const T::W; R] = std::array::from_fn(|q| row(j + q));
                    // The first row block of a chunk reads it from memory; it also brings in
                    // the same rows of the next chunk, so that chunk's first block finds them in
                    // the caches (the hardware prefetcher starts afresh at each 4 KiB row of a
                    // wide layer, and a few rows per expert give it little to learn from):
                    // OLMoE-1B-7B's layer, exact kernel, 1.0-1.16x (docs/benchmarks.md, "Wide
                    // layers and the decode team settled").
                    let t = if r0 == 0 && j1 < n {
                        let next: [*const T::W; R] =
                            std::array::from_fn(|q| row((j + q + (j1 - j0)).min(n - 1)));
                        T::tile_prefetching::<MR, R>(&a_rows, &w_rows, &next, k)
                    } else {
                        T::tile::<MR, R>(&a_rows, &w_rows, k)
                    };
                    for (i, ti) in t.iter().enumerate() {
                        for (q, &v) in ti.iter().enumerate() {
                            sink(r0 + i, j + q, v);
                        }
                    }
                    j += R;
                }
                while j < j1 {
                    let t = T::tile::<MR, 1>(&a_rows, &[row(j)], k);
                    for (i, ti) in t.iter().enumerate() {
                        sink(r0 + i, j, ti[0]);
                    }
                    j += 1;
                }
                r0 += MR;
            }
            while r0 < m {
                let a_row = [a(r0)];
                let mut j = j0;
                while j + R1 <= j1 {
                    let w_rows: [*const T::W; R1] = std::array::from_fn(|q| row(j + q));
                    let t = T::tile::<1, R1>(&a_row, &w_rows, k);
                    for (q, &v) in t[0].iter().enumerate() {
                        sink(r0, j + q, v);
                    }
                    j += R1;
                }
                while j < j1 {
                    let t = T::tile::<1, 1>(&a_row, &[row(j)], k);
                    sink(r0, j, t[0][0]);
                    j += 1;
                }
                r0 += 1;
            }
        }
        j0 = j1;
    }
}

/// One block of expert `e` on row-layout weights through the dot tile `T`: gate and up products
/// of the activation rows `a(r)` into `z`, the hidden epilogue, `after_hidden` (the bf16 variant
/// rounds the hidden rows there), and the down product of the hidden rows `h(r)` added into the
/// destination rows with the down bias scaled by the routing weight (as the panel kernel's
/// `accumulate`). `block` is `(e, b0, m)`: rows `b0..b0 + m` of the expert-sorted pairs.
///
/// # Safety
/// `a(r)` and `h(r)` hold what `T` reads for `d` and `h` values for `r < m`; `z` holds `m` rows
/// of `n1` floats; the pairs are in this thread's `dst`; the caller enabled what `T` and `S`
/// need.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) unsafe fn expert_block<
    T: DotTile,
    S: Simd,
    const MR: usize,
    const R: usize,
    const R1: usize,
>(
    job: &Job,
    rows: &RowWeights,
    (e, b0, m): (usize, usize, usize),
    z: *mut f32,
    dst: Dst,
    a: impl Fn(usize) -> *const T::A + Copy,
    h_row: impl Fn(usize) -> *const T::A,
    after_hidden: impl FnOnce(),
) {
    let ex = job.ex;
    let (d, h, n1) = (ex.d, ex.h, ex.n1);
    // Gate in columns 0..h, up from h_pad (gated) or 0 (not): the layout `hidden` reads.
    let up_col = if ex.gated { ex.h_pad } else { 0 };
    let x = rows.experts[e];
    let b2 = ex.b2.as_ref().map(|b| &b[e * ex.d_pad..e * ex.d_pad + d]);
    // SAFETY: gate and up hold `h x d` values and down `d x h` (checked in `RowWeights::new`);
    // `z` rows are `n1` floats and `col + j < n1` for `j < h`; `dst_row` is the pair's
    // destination row of `d` floats, written at `n < d`; the rest is the caller's promise.
    unsafe {
        if let Some(g) = x.gate {
            rows_product::<T, MR, R, R1>(m, a, rows.at::<T::W>(g), h, d, |r, j, v| {
                *z.add(r * n1 + j) = v;
            });
        }
        rows_product::<T, MR, R, R1>(m, a, rows.at::<T::W>(x.up), h, d, |r, j, v| {
            *z.add(r * n1 + up_col + j) = v;
        });
        hidden::<S>(job, e, b0, m, z);
        after_hidden();
        rows_product::<T, MR, R, R1>(m, h_row, rows.at::<T::W>(x.down), d, h, |r, n, v| {
            let out = job.dst_row(dst, b0 + r).add(n);
            let v = match b2 {
                Some(b) => v + job.groups.weights[b0 + r] * b[n],
                None => v,
            };
            *out += v;
        });
    }
}

/// The fused expert computation over this thread's work items, on row-layout weights.
///
/// # Safety
/// As for the panel kernel (`fused_items`): the items and `dst` come from `moe_forward`'s
/// planning, `ts.z` holds `block_rows() * n1` floats, and the caller enabled what `S` needs.
#[inline(always)]
unsafe fn rows_items<S: Simd, E: MatvecWeight, const MR: usize, const R: usize, const R1: usize>(
    job: &Job,
    rows: &RowWeights,
    dst: Dst,
    ts: &mut ThreadScratch,
) {
    let ex = job.ex;
    let (d, n1) = (ex.d, ex.n1);
    let block = ex.block_rows();
    let z = ts.z.as_mut_ptr();
    let xp = job.x.as_ptr();
    for &(e, lo, hi) in &ts.items {
        let (e, lo, hi) = (e as usize, lo as usize, hi as usize);
        let mut b0 = lo;
        while b0 < hi {
            let m = (hi - b0).min(block);
            let token_row = |r: usize| {
                let t = job.groups.tokens[b0 + r] as usize;
                xp.wrapping_add(t * d)
            };
            let hidden_row = |r: usize| z.cast_const().wrapping_add(r * n1);
            // SAFETY: token rows have `d` floats (ids checked in `moe_forward`), and `z` holds
            // the block's `m <= block_rows()` rows of `n1` floats, as `expert_block` requires.
            unsafe {
                expert_block::<SimdDot<S, E>, S, MR, R, R1>(
                    job,
                    rows,
                    (e, b0, m),
                    z,
                    dst,
                    token_row,
                    hidden_row,
                    || {},
                );
            }
            b0 += m;
        }
    }
}

/// Runs this thread's items on row-layout weights of element type `E` with `variant` (the gemm
/// variant, which has no row form, runs the best SIMD one).
pub(super) fn run_rows<E: MatvecWeight>(
    variant: KernelVariant,
    job: &Job,
    rows: &RowWeights,
    dst: Dst,
    ts: &mut ThreadScratch,
) {
    let variant = match variant {
        KernelVariant::Gemm => KernelVariant::Auto.resolve(),
        v => v,
    };
    // AMX tiles take 32 values of a row and 16 rows at a time.
    let amx_tiles =
        rows.dtype == WeightDtype::Bf16 && job.amx_tiles() && job.ex.h.is_multiple_of(32);
    match variant {
        // SAFETY: `moe_forward` asserted `is_supported()` for this variant, which includes
        // AVX-512 BF16; `E` is the rows' type, bf16 here. Bounds: see `rows_items`.
        #[cfg(target_arch = "x86_64")]
        KernelVariant::Avx512Bf16 if rows.dtype == WeightDtype::Bf16 => unsafe {
            super::bf16dot::run_rows(job, rows, dst, ts)
        },
        // SAFETY: as above; `is_supported` covered AMX, and `d` and `h` are multiples of 32.
        #[cfg(target_arch = "x86_64")]
        KernelVariant::Amx if amx_tiles => unsafe { super::amx::run_rows(job, rows, dst, ts) },
        // SAFETY: as above (AMX implies AVX-512 BF16 here).
        #[cfg(target_arch = "x86_64")]
        KernelVariant::Amx if rows.dtype == WeightDtype::Bf16 => unsafe {
            super::bf16dot::run_rows(job, rows, dst, ts)
        },
        // SAFETY: as above; on f32 and f16 rows the BF16 variants are the AVX-512 one.
        #[cfg(target_arch = "x86_64")]
        KernelVariant::Avx512Bf16 | KernelVariant::Amx => unsafe {
            rows_avx512::<E>(job, rows, dst, ts)
        },
        // SAFETY: `moe_forward` asserted `is_supported()` for the variant it was given; the gemm
        // variant maps to `Auto`, which resolves to a supported one. Bounds: see `rows_items`.
        #[cfg(target_arch = "x86_64")]
        KernelVariant::Avx512 => unsafe { rows_avx512::<E>(job, rows, dst, ts) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        KernelVariant::Avx2 => unsafe { rows_avx2::<E>(job, rows, dst, ts) },
        // SAFETY: `Portable` needs no CPU feature; bounds as above.
        _ => unsafe { rows_items::<Portable, E, 2, 4, 8>(job, rows, dst, ts) },
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn rows_avx512<E: MatvecWeight>(
    job: &Job,
    rows: &RowWeights,
    dst: Dst,
    ts: &mut ThreadScratch,
) {
    // 4 x 4 = 16 accumulators + 4 weight registers + 1 activation of the 32 zmm registers; a
    // lone row takes 8 weight rows (8 FMA chains hide the FMA latency).
    // SAFETY: this function enables what `Avx512` uses; the caller checked the CPU.
    unsafe { rows_items::<Avx512, E, 4, 4, 8>(job, rows, dst, ts) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_avx2<E: MatvecWeight>(
    job: &Job,
    rows: &RowWeights,
    dst: Dst,
    ts: &mut ThreadScratch,
) {
    // 4 x 3 = 12 accumulators + 3 weight registers + 1 activation: the 16 ymm registers; a lone
    // row takes 8 weight rows (8 FMA chains hide the FMA latency).
    // SAFETY: this function enables what `Avx2` uses; the caller checked the CPU.
    unsafe { rows_items::<Avx2, E, 4, 3, 8>(job, rows, dst, ts) }
}

/// `y = x w^T` in f32 for `x` `[m, k]` and a weight `w` `[n, k]` of `E` read where it lies (a
/// dense projection of a half-precision checkpoint: no widened copy of the weight), `y` `[m, n]`.
/// The weight rows are split into one contiguous range per thread; each thread takes its range
/// chunk by chunk with every activation row passing over a chunk while it is in L2. Each output
/// is one FMA chain in `k` order, as in the expert layer, so the bits do not depend on `threads`.
/// The rounding variants and `gemm` run the best exact SIMD variant ([`Isa::of`]).
///
/// # Panics
/// When a slice does not match its shape or `variant` cannot run on this CPU.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dense_rows<E: MatvecWeight>(
    variant: KernelVariant,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[E],
    n: usize,
    y: &mut [f32],
    threads: usize,
) {
    assert_eq!(x.len(), m * k, "x must be [m, k]");
    assert_eq!(w.len(), n * k, "w must be [n, k]");
    assert_eq!(y.len(), m * n, "y must be [m, n]");
    let isa = Isa::of(variant);
    let parts = threads.clamp(1, n.max(1));
    let span = n.div_ceil(parts);
    let out = SharedOut(y.as_mut_ptr());
    let part = |j0: usize| {
        let j1 = (j0 + span).min(n);
        let wp = w[j0 * k..].as_ptr();
        let xp = x.as_ptr();
        // SAFETY: activation rows `< m` have `k` floats, weight rows `j0..j1` exist; the sink
        // writes `y[r * n + j0 + j]` for `r < m`, `j < j1 - j0`: inside `y`, and this part's own
        // columns. `variant` is supported (asserted).
        unsafe {
            let sink = move |r: usize, j: usize, v: f32| *out.at(r * n + j0 + j) = v;
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => dense_avx512::<E>(xp, m, k, wp, j1 - j0, sink),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => dense_avx2::<E>(xp, m, k, wp, j1 - j0, sink),
                _ => rows_product::<SimdDot<Portable, E>, 2, 4, 8>(
                    m,
                    |r| xp.wrapping_add(r * k),
                    wp,
                    j1 - j0,
                    k,
                    sink,
                ),
            }
        }
    };
    if parts == 1 || m == 0 {
        return part(0);
    }
    rayon::in_place_scope(|s| {
        let part = &part;
        for p in 1..parts {
            if p * span < n {
                s.spawn(move |_| part(p * span));
            }
        }
        part(0);
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn dense_avx512<E: MatvecWeight>(
    x: *const f32,
    m: usize,
    k: usize,
    w: *const E,
    n: usize,
    sink: impl FnMut(usize, usize, f32),
) {
    // The expert layer's tiles (see `rows_avx512`).
    // SAFETY: forwarded from `dense_rows`; this function enables what `Avx512` uses.
    unsafe {
        rows_product::<SimdDot<Avx512, E>, 4, 4, 8>(m, |r| x.wrapping_add(r * k), w, n, k, sink)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dense_avx2<E: MatvecWeight>(
    x: *const f32,
    m: usize,
    k: usize,
    w: *const E,
    n: usize,
    sink: impl FnMut(usize, usize, f32),
) {
    // The expert layer's tiles (see `rows_avx2`).
    // SAFETY: forwarded from `dense_rows`; this function enables what `Avx2` uses.
    unsafe {
        rows_product::<SimdDot<Avx2, E>, 4, 3, 8>(m, |r| x.wrapping_add(r * k), w, n, k, sink)
    }
}
