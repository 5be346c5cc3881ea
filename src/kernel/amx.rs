//! bf16 expert weights on Intel AMX (`tdpbf16ps`): [`KernelVariant::Amx`](super::KernelVariant::Amx).
//!
//! # Why
//! One `tdpbf16ps` multiplies a 16 x 32 bf16 tile by a 32 x 16 one into 16 x 16 f32
//! accumulators: 8192 multiply-adds, against 32 for an AVX-512 FMA. On a Xeon with AMX
//! (Sapphire Rapids and later) a bf16 matrix product runs several times faster than f32 FMAs
//! can (torch's bf16 1024^3 matmul: 455 GFLOP/s on one core of the 2026-11-29 machine, against
//! 97 in f32). As with [`KernelVariant::Avx512Bf16`](super::KernelVariant::Avx512Bf16), the activations are rounded to bf16
//! before they meet the weights, so the variant is chosen by name only.
//!
//! # Layouts
//! - Packed panels: a bf16 panel is stored `(k, k + 1)` pairs per column, 32 columns, so a
//!   run of 16 pair rows is exactly AMX's "VNNI" B tile (16 rows of 16 column pairs, 64 bytes,
//!   128 bytes apart); the A tile is 16 rounded token rows, 32 values each.
//! - Rows read in place (`[out, in]`): the product is taken transposed. The A tile is 16 weight
//!   rows (32 values each, `in` apart), the B tiles the block's activations rounded and stored
//!   pair-major (`[in / 2][32 tokens]`, [`round_block`]), and the 16 outputs x 32 tokens that
//!   come out are transposed in registers on their way to the hidden block or the output rows.
//!   An expert's rows are taken in chunks of several blocks, so that each weight row read serves
//!   the whole chunk.
//! - Dense products ([`linear`], for `Linear::on_amx`): as rows read in place, with each
//!   thread's tokens rounded once and every weight row streamed once over all its blocks.
//!
//! The scratch the tiles read is 64-byte aligned: a tile row that straddles two cache lines
//! loads at about half the rate. The weights read in place are wherever the checkpoint put them
//! (safetensors aligns a tensor to 8 bytes); an aligned copy of each 16-row slab was tried and
//! did not pay for itself (`docs/benchmarks.md`).
//!
//! Blocks are 32 rows (two A or B tiles of 16); a block with fewer rows is padded with zero
//! rows, and one of 16 or fewer takes one token tile. Each output is the same sequence of
//! `tdpbf16ps` steps whatever block it falls in, so results are the same bits for every thread
//! count. Where `d` (read in place, also `h`) is not a multiple of 32 the tiles would read past a
//! matrix, and where a pass has fewer than 16 tokens (a decode step) the tiles would be mostly
//! padding: there the variant runs as [`KernelVariant::Avx512Bf16`](super::KernelVariant::Avx512Bf16).
//!
//! # The operating system
//! Linux hands a process the AMX register state only after it asks (`arch_prctl
//! ARCH_REQ_XCOMP_PERM`, kernel 5.16 or later); [`available`] asks once, and the variant is
//! unsupported where the CPU lacks AMX-BF16 or the request is refused.

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::bf16dot::round_rows;
use super::rows::RowWeights;
use super::simd::Avx512;
use super::{Dst, Job, PANEL, ThreadScratch, accumulate, grow, hidden};

/// Rows of a block: two tiles of 16.
const BLOCK: usize = 32;

/// True when this CPU has AMX-TILE and AMX-BF16, AVX-512 BF16 (for rounding), and Linux granted
/// this process the tile data state. Asked once per process.
pub(super) fn available() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(|| {
        if !super::has_avx512_bf16() {
            return false;
        }
        // CPUID.(EAX=7, ECX=0):EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
        let edx = __cpuid_count(7, 0).edx;
        if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
            return false;
        }
        request_tile_state()
    })
}

#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes which register state the kernel
    // lets this process use; it reads and writes no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    r == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// The tile configuration every block uses: tiles 0-7 all 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1; // palette 1
        for t in 0..8 {
            c[16 + 2 * t] = 64; // bytes per row
            c[48 + t] = 16; // rows
        }
        TileConfig(c)
    }
}

macro_rules! tile_load {
    ($t:literal, $p:expr, $stride:expr) => {
        asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"), p = in(reg) $p, s = in(reg) $stride,
             options(nostack, readonly))
    };
}
macro_rules! tile_store {
    ($t:literal, $p:expr, $stride:expr) => {
        asm!(concat!("tilestored [{p} + {s}*1], tmm", $t), p = in(reg) $p, s = in(reg) $stride,
             options(nostack))
    };
}
macro_rules! tile_zero {
    ($t:literal) => {
        asm!(concat!("tilezero tmm", $t), options(nomem, nostack))
    };
}
macro_rules! tile_dp {
    ($c:literal, $a:literal, $b:literal) => {
        asm!(
            concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b),
            options(nomem, nostack)
        )
    };
}

/// `C[g][v] = sum over k of A_g . B_v` for `groups` (1 or 2) A tiles of 16 rows and `b_tiles`
/// (1 or 2) B tiles, over `k_steps` steps of 32 values, stored as 16 rows of 16 floats at `c[g][v]`
/// (`c_stride` bytes apart). A tile `g` at step `s` is at `a + g * a_group + s * a_step` bytes
/// (`a_stride` apart); B tile `v` at `b + v * b_half + s * b_step` (`b_stride` apart). Unless
/// `prefetch` is null, step `s` also prefetches (into L2) the 64 bytes at `prefetch + r *
/// a_stride + s * 64` for `r < 16`: the same step of the 16 rows an A tile will read next.
///
/// # Safety
/// Every tile read and written lies in memory the caller owns; the tile configuration of
/// [`TileConfig::new`] is loaded. (A prefetch reads nothing and cannot fault.)
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tiles(
    groups: usize,
    b_tiles: usize,
    k_steps: usize,
    a: *const u8,
    a_group: usize,
    a_step: usize,
    a_stride: usize,
    b: *const u8,
    b_half: usize,
    b_step: usize,
    b_stride: usize,
    c: [[*mut u8; 2]; 2],
    c_stride: usize,
    prefetch: *const u8,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        tile_zero!("0");
        tile_zero!("1");
        tile_zero!("2");
        tile_zero!("3");
        for s in 0..k_steps {
            let (ap, bp) = (a.add(s * a_step), b.add(s * b_step));
            if !prefetch.is_null() {
                for r in 0..16 {
                    _mm_prefetch::<_MM_HINT_T1>(
                        prefetch.wrapping_add(r * a_stride + s * 64).cast(),
                    );
                }
            }
            tile_load!("6", bp, b_stride);
            tile_load!("4", ap, a_stride);
            tile_dp!("0", "4", "6");
            if b_tiles == 2 {
                tile_load!("7", bp.add(b_half), b_stride);
                tile_dp!("1", "4", "7");
            }
            if groups == 2 {
                tile_load!("5", ap.add(a_group), a_stride);
                tile_dp!("2", "5", "6");
                if b_tiles == 2 {
                    tile_dp!("3", "5", "7");
                }
            }
        }
        tile_store!("0", c[0][0], c_stride);
        if b_tiles == 2 {
            tile_store!("1", c[0][1], c_stride);
        }
        if groups == 2 {
            tile_store!("2", c[1][0], c_stride);
            if b_tiles == 2 {
                tile_store!("3", c[1][1], c_stride);
            }
        }
    }
}

/// [`tiles`] with the packed-panel operands: A is `16 * groups` rounded activation rows of
/// `pairs` pairs at `a`, B one 32-column bf16 panel at `panel` (pair rows 128 bytes apart), and
/// C the `[16 * groups][32]` results at `c`, rows `c_stride` floats apart.
///
/// # Safety
/// As for [`tiles`], over `k / 32` steps.
#[inline(always)]
unsafe fn panel_tiles(
    groups: usize,
    k: usize,
    a: *const u32,
    pairs: usize,
    panel: *const u8,
    c: *mut f32,
    c_stride: usize,
) {
    let at = |g: usize, v: usize| c.wrapping_add(g * 16 * c_stride + v * 16).cast::<u8>();
    // SAFETY: forwarded from the caller.
    unsafe {
        tiles(
            groups,
            2,
            k / 32,
            a.cast(),
            16 * pairs * 4,
            64,
            pairs * 4,
            panel,
            64,
            16 * 2 * PANEL * 2,
            2 * PANEL * 2,
            [[at(0, 0), at(0, 1)], [at(1, 0), at(1, 1)]],
            c_stride * 4,
            std::ptr::null(),
        );
    }
}

/// [`tiles`] with the transposed operands of rows read in place and of [`linear`]: A is 16 weight
/// rows of `k` bf16 values from `w`, B the 32 tokens of a pair-major activation block (`[k / 2]
/// [32]`) at `act`, `b_tiles` of them used, and C the `[16][32]` results (outputs x tokens) at
/// `c`. One A tile against two B tiles: on the Xeon of `docs/benchmarks.md` a tile load costs
/// more than a `tdpbf16ps`, and this order (three loads per two products) ran faster than two A
/// tiles against two B tiles (four loads per four products) whose loads wait on more products.
///
/// # Safety
/// As for [`tiles`], over `k / 32` steps.
#[inline(always)]
unsafe fn row_tiles(
    b_tiles: usize,
    k: usize,
    w: *const u8,
    act: *const u32,
    c: *mut f32,
    prefetch: *const u8,
) {
    let at = |v: usize| c.wrapping_add(v * 16).cast::<u8>();
    // SAFETY: forwarded from the caller.
    unsafe {
        tiles(
            1,
            b_tiles,
            k / 32,
            w,
            16 * k * 2,
            64,
            k * 2,
            act.cast(),
            64,
            16 * BLOCK * 4,
            BLOCK * 4,
            [[at(0), at(1)], [at(0), at(1)]],
            BLOCK * 4,
            prefetch,
        );
    }
}

/// This thread's items on packed bf16 panels.
///
/// # Safety
/// As for the f32 kernel's `fused_items` (items and `dst` from `moe_forward`'s planning,
/// `job.ex` packed in bf16 panels with `d` a multiple of 32), and [`available`] returned true.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
pub(super) unsafe fn run_panels(job: &Job, dst: Dst, ts: &mut ThreadScratch) {
    let ex = job.ex;
    let (d, d_pad, h_pad, n1, k1) = (ex.d, ex.d_pad, ex.h_pad, ex.n1, ex.k1);
    debug_assert!(d.is_multiple_of(32));
    let (kp, hp) = (d / 2, h_pad / 2);
    grow(&mut ts.z, BLOCK * n1);
    grow(&mut ts.a16, BLOCK * kp);
    grow(&mut ts.h16, BLOCK * hp);
    grow(&mut ts.y, BLOCK * PANEL);
    let (z, a16, h16, ct) = (
        ts.z.as_mut_ptr(),
        ts.a16.as_mut_ptr(),
        ts.h16.as_mut_ptr(),
        ts.y.as_mut_ptr(),
    );
    let xp = job.x.as_ptr();
    let config = TileConfig::new();
    // SAFETY: `available()` (the caller's promise) means the OS granted the tile state; the
    // configuration is a valid palette-1 layout.
    unsafe { asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly)) };
    for &(e, lo, hi) in &ts.items {
        let (e, lo, hi) = (e as usize, lo as usize, hi as usize);
        let w1 = ex.w1::<half::bf16>(e).cast::<u8>();
        let w2 = ex.w2::<half::bf16>(e).cast::<u8>();
        let b2 = ex.b2.as_ref().map(|b| b[e * d_pad..].as_ptr());
        let mut b0 = lo;
        while b0 < hi {
            let m = (hi - b0).min(BLOCK);
            let groups = m.div_ceil(16);
            // SAFETY: token ids are < T (checked in `moe_forward`), so each token row has `d`
            // floats; `a16`, `h16`, `z` and `ct` were sized above for 32 rows. A panel of `w1`
            // has `k1 = d` pair-interleaved rows (d even) of 32 columns, read in steps of 16
            // pairs (128 bytes each) up to `d / 2`; `w2`'s have `h_pad` rows. Tiles of `a16`
            // read rows `< 16 * groups` of `kp` pairs, up to pair `kp`; `z` rows are `n1`
            // floats, written at columns `p..p + 32 <= n1`.
            unsafe {
                round_rows(
                    |r| xp.add(job.groups.tokens[b0 + r] as usize * d),
                    m,
                    d,
                    a16,
                    kp,
                    16 * groups,
                );
                let mut p = 0;
                while p < n1 {
                    panel_tiles(groups, d, a16, kp, w1.add(p * k1 * 2), z.add(p), n1);
                    p += PANEL;
                }
                hidden::<Avx512>(job, e, b0, m, z);
                round_rows(|r| z.add(r * n1), m, h_pad, h16, hp, 16 * groups);
                let out: [*mut f32; BLOCK] =
                    std::array::from_fn(|r| if r < m { job.dst_row(dst, b0 + r) } else { ct });
                let mut q = 0;
                while q < d_pad {
                    panel_tiles(groups, h_pad, h16, hp, w2.add(q * h_pad * 2), ct, PANEL);
                    for (r, &o) in out.iter().enumerate().take(m) {
                        let w = job.groups.weights[b0 + r];
                        for v in 0..2 {
                            let col = q + v * 16;
                            if col < d {
                                let acc = _mm512_loadu_ps(ct.add(r * PANEL + v * 16));
                                let bias = b2.map(|b| b.add(col));
                                accumulate::<Avx512>(o.add(col), acc, w, bias, d - col);
                            }
                        }
                    }
                    q += PANEL;
                }
            }
            b0 += m;
        }
    }
    // SAFETY: releases the tile state this function configured.
    unsafe { asm!("tilerelease", options(nomem, nostack)) };
}

/// `v` grown to `n` values past its first 64-byte boundary, and a pointer to that boundary: a tile
/// row that straddles two cache lines loads at about half the rate (measured on the Xeon of
/// `docs/benchmarks.md`).
fn aligned<T: Default + Clone>(v: &mut Vec<T>, n: usize) -> *mut T {
    grow(v, n + 64 / size_of::<T>());
    let p = v.as_mut_ptr();
    p.wrapping_add(p.align_offset(64))
}

/// Token rows the in-place kernel rounds at once for one expert (a multiple of [`BLOCK`]): each
/// 16 weight rows loaded then serve all of them, and their rounded activations, pre-activations
/// and rounded hidden rows (`rows x (d / 2 + n1 + h / 2)` 32-bit values) stay within about
/// 768 KiB of L2.
fn chunk_rows(d: usize, h: usize, n1: usize) -> usize {
    let per_row = (d / 2 + n1 + h / 2) * 4;
    (768 * 1024 / per_row.max(1) / BLOCK * BLOCK).clamp(BLOCK, 8 * BLOCK)
}

/// This thread's items on bf16 rows read in place: each item's rows in chunks of
/// [`chunk_rows`], every weight matrix streamed once per chunk, 16 rows at a time over all the
/// chunk's blocks.
///
/// # Safety
/// As for `rows::rows_items` (items and `dst` from `moe_forward`'s planning, `rows` bf16 and
/// checked against `d` and `h`, `d` and `h` multiples of 32), and [`available`] returned true.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
pub(super) unsafe fn run_rows(job: &Job, rows: &RowWeights, dst: Dst, ts: &mut ThreadScratch) {
    let ex = job.ex;
    let (d, h, n1) = (ex.d, ex.h, ex.n1);
    debug_assert!(d.is_multiple_of(32) && h.is_multiple_of(32));
    let up_col = if ex.gated { ex.h_pad } else { 0 };
    let chunk = chunk_rows(d, h, n1);
    // Activations pair-major per block: `[pairs][32 tokens]`.
    let (z, a16, h16, ct) = (
        aligned(&mut ts.z, chunk * n1),
        aligned(&mut ts.a16, chunk * d / 2),
        aligned(&mut ts.h16, chunk * h / 2),
        aligned(&mut ts.y, 16 * BLOCK),
    );
    let xp = job.x.as_ptr();
    let config = TileConfig::new();
    // SAFETY: as in `run_panels`.
    unsafe { asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly)) };
    for &(e, lo, hi) in &ts.items {
        let (e, lo, hi) = (e as usize, lo as usize, hi as usize);
        let x = rows.experts[e];
        let b2 = ex.b2.as_ref().map(|b| &b[e * ex.d_pad..e * ex.d_pad + d]);
        let mut c0 = lo;
        while c0 < hi {
            let m = (hi - c0).min(chunk);
            let blocks = m.div_ceil(BLOCK);
            let block_rows = |b: usize| (m - b * BLOCK).min(BLOCK);
            // SAFETY: token rows have `d` floats (ids checked in `moe_forward`); gate and up hold
            // `h x d` bf16 values and down `d x h` (checked in `RowWeights::new`), read in A tiles
            // of 16 rows x 32 values at rows `< h` (or `< d`) and columns `< d` (or `< h`), all
            // multiples of 32; `a16`/`h16` hold `blocks` blocks of `pairs x 32` tokens, `ct`
            // 16 x 32 floats, `z` the chunk's `m <= chunk` rows of `n1` floats; `dst_row` is the
            // pair's destination row of `d` floats.
            unsafe {
                for b in 0..blocks {
                    let first = c0 + b * BLOCK;
                    round_block(
                        |r| xp.add(job.groups.tokens[first + r] as usize * d),
                        block_rows(b),
                        d,
                        a16.add(b * BLOCK * d / 2),
                    );
                }
                for (mat, col0) in [(x.gate, 0), (Some(x.up), up_col)] {
                    let Some(mat) = mat else { continue };
                    let w = rows.at::<u8>(mat);
                    for j0 in (0..h).step_by(16) {
                        for b in 0..blocks {
                            let mb = block_rows(b);
                            let act = a16.add(b * BLOCK * d / 2);
                            let pf = next_rows(w, j0, h, d, b);
                            row_tiles(mb.div_ceil(16), d, w.add(j0 * d * 2), act, ct, pf);
                            each_result(ct, mb, |t, v| {
                                _mm512_storeu_ps(z.add((b * BLOCK + t) * n1 + col0 + j0), v);
                            });
                        }
                    }
                }
                hidden::<Avx512>(job, e, c0, m, z);
                for b in 0..blocks {
                    let hz = z.add(b * BLOCK * n1);
                    round_block(
                        |r| hz.add(r * n1),
                        block_rows(b),
                        h,
                        h16.add(b * BLOCK * h / 2),
                    );
                }
                let w = rows.at::<u8>(x.down);
                for n0 in (0..d).step_by(16) {
                    for b in 0..blocks {
                        let mb = block_rows(b);
                        let act = h16.add(b * BLOCK * h / 2);
                        let pf = next_rows(w, n0, d, h, b);
                        row_tiles(mb.div_ceil(16), h, w.add(n0 * h * 2), act, ct, pf);
                        each_result(ct, mb, |t, mut v| {
                            let pair = c0 + b * BLOCK + t;
                            let out = job.dst_row(dst, pair).add(n0);
                            if let Some(b2) = b2 {
                                let wr = _mm512_set1_ps(job.groups.weights[pair]);
                                let bias = _mm512_loadu_ps(b2.as_ptr().add(n0));
                                v = _mm512_add_ps(v, _mm512_mul_ps(wr, bias));
                            }
                            _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), v));
                        });
                    }
                }
            }
            c0 += m;
        }
    }
    // SAFETY: releases the tile state this function configured.
    unsafe { asm!("tilerelease", options(nomem, nostack)) };
}

/// The 16 weight rows after `j0` of an `[n, k]` bf16 matrix at `w`, to prefetch while the first
/// block multiplies rows `j0..j0 + 16`; null for the other blocks (the rows are cached by then)
/// and after the last rows.
fn next_rows(w: *const u8, j0: usize, n: usize, k: usize, block: usize) -> *const u8 {
    if block == 0 && j0 + 32 <= n {
        w.wrapping_add((j0 + 16) * k * 2)
    } else {
        std::ptr::null()
    }
}

/// Hands `f(t, v)` each result of a block: `ct` is `[16 outputs][32 tokens]`, and `v` holds the
/// 16 outputs of token `t < m`, transposed in registers.
///
/// # Safety
/// `ct` holds 16 x 32 floats; AVX-512F is enabled.
#[inline(always)]
unsafe fn each_result(ct: *const f32, m: usize, mut f: impl FnMut(usize, __m512)) {
    // SAFETY: rows `j < 16` of `ct`, columns `16 half + 16 <= 32`.
    unsafe {
        for half in 0..m.div_ceil(16) {
            let cols = transpose16(std::array::from_fn(|j| {
                _mm512_loadu_ps(ct.add(j * BLOCK + half * 16))
            }));
            for (t, &v) in cols.iter().enumerate().take(m - half * 16) {
                f(half * 16 + t, v);
            }
        }
    }
}

/// Rounds `m <= 32` rows of `k` floats (row `r` at `src(r)`, `k` a multiple of 32) to bf16 pairs
/// and stores them pair-major, `[k / 2][32]` (the B tiles of a block), with rows `m..32` zero:
/// 16 rows of 16 pairs at a time, transposed in registers.
///
/// # Safety
/// Each row `r < m` has `k` readable floats, `dst` has `16 * k` writable values; AVX-512F and
/// AVX-512 BF16 are enabled.
#[inline(always)]
unsafe fn round_block(src: impl Fn(usize) -> *const f32, m: usize, k: usize, dst: *mut u32) {
    // SAFETY: loads read floats `2 q0 .. 2 q0 + 32 <= k` of rows `< m`; stores write pair rows
    // `q0 + c < k / 2` at tokens `16 half .. 16 half + 16 <= 32`.
    unsafe {
        for half in 0..2 {
            let rows = m.saturating_sub(16 * half).min(16);
            let ptrs: [*const f32; 16] = std::array::from_fn(|r| {
                if r < rows {
                    src(16 * half + r)
                } else {
                    std::ptr::null()
                }
            });
            for q0 in (0..k / 2).step_by(16) {
                let pairs = std::array::from_fn(|r| {
                    if r < rows {
                        let p = ptrs[r].add(2 * q0);
                        let bf =
                            _mm512_cvtne2ps_pbh(_mm512_loadu_ps(p.add(16)), _mm512_loadu_ps(p));
                        _mm512_castsi512_ps(std::mem::transmute::<__m512bh, __m512i>(bf))
                    } else {
                        _mm512_setzero_ps()
                    }
                });
                let cols = transpose16(pairs);
                for (c, &v) in cols.iter().enumerate() {
                    _mm512_storeu_ps(dst.add((q0 + c) * BLOCK + 16 * half).cast(), v);
                }
            }
        }
    }
}

/// The 16 x 16 transpose: `out[c][r] = rows[r][c]`, in registers (two rounds of unpacks within
/// 128-bit lanes, then two of lane shuffles).
#[inline(always)]
unsafe fn transpose16(rows: [__m512; 16]) -> [__m512; 16] {
    // SAFETY: register shuffles only; the caller enabled AVX-512F.
    unsafe {
        // Lane l of `t[2i]` = rows 2i and 2i + 1 at columns 4l, 4l + 1 (interleaved); `t[2i + 1]`
        // the same at 4l + 2, 4l + 3.
        let t: [__m512; 16] = std::array::from_fn(|q| {
            let (a, b) = (rows[q / 2 * 2], rows[q / 2 * 2 + 1]);
            if q % 2 == 0 {
                _mm512_unpacklo_ps(a, b)
            } else {
                _mm512_unpackhi_ps(a, b)
            }
        });
        // Lane l of `u[4g + c]` = rows 4g..4g + 4 at column 4l + c.
        let u: [__m512; 16] = std::array::from_fn(|q| {
            let (g, c) = (q / 4, q % 4);
            let (a, b) = (
                _mm512_castps_pd(t[4 * g + c / 2]),
                _mm512_castps_pd(t[4 * g + 2 + c / 2]),
            );
            _mm512_castpd_ps(if c % 2 == 0 {
                _mm512_unpacklo_pd(a, b)
            } else {
                _mm512_unpackhi_pd(a, b)
            })
        });
        // Column 4l + c gathers lane l of u[c], u[4 + c], u[8 + c], u[12 + c].
        let mut out = [_mm512_setzero_ps(); 16];
        for c in 0..4 {
            let v88 = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
            let vdd = _mm512_shuffle_f32x4::<0xdd>(u[c], u[4 + c]);
            let w88 = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
            let wdd = _mm512_shuffle_f32x4::<0xdd>(u[8 + c], u[12 + c]);
            out[c] = _mm512_shuffle_f32x4::<0x88>(v88, w88);
            out[8 + c] = _mm512_shuffle_f32x4::<0xdd>(v88, w88);
            out[4 + c] = _mm512_shuffle_f32x4::<0x88>(vdd, wdd);
            out[12 + c] = _mm512_shuffle_f32x4::<0xdd>(vdd, wdd);
        }
        out
    }
}

/// `y[t][j] = sum over kk of x[t][kk] * w[j][kk]` for `rows` rows of `x` (`[rows, k]` f32,
/// rounded to bf16) and `w` (`[n, k]` bf16, the stored `[out, in]` layout), on AMX tiles; `k`
/// a multiple of 32 and `n` of 16. The rows are split over `threads` in whole blocks of 32; each
/// thread rounds its rows once and then streams every weight row once, 16 rows at a time, over
/// all its blocks.
pub(super) fn linear(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[half::bf16],
    n: usize,
    y: &mut [f32],
    threads: usize,
) {
    assert!(available() && k.is_multiple_of(32) && n.is_multiple_of(16));
    assert!(x.len() >= rows * k && w.len() >= n * k && y.len() >= rows * n);
    let blocks = rows.div_ceil(BLOCK);
    let parts = threads.clamp(1, blocks.max(1));
    let mut rest_x = &x[..rows * k];
    let mut rest_y = &mut y[..rows * n];
    let mut work = Vec::with_capacity(parts);
    for i in 0..parts {
        let (b0, b1) = (blocks * i / parts, blocks * (i + 1) / parts);
        let m = ((b1 * BLOCK).min(rows)).saturating_sub(b0 * BLOCK);
        let (xa, xb) = rest_x.split_at(m * k);
        let (ya, yb) = std::mem::take(&mut rest_y).split_at_mut(m * n);
        work.push((xa, ya, m));
        rest_x = xb;
        rest_y = yb;
    }
    super::split::each(work, |(xa, ya, m)| {
        LINEAR_SCRATCH.with_borrow_mut(|(act, ct)| {
            // SAFETY: `available()` was asserted, which includes the CPU features the entry
            // enables; the slices were cut to `m` rows of `k` and `n` values.
            unsafe { linear_rows(xa, m, k, w, n, ya, act, ct) }
        })
    });
}

thread_local! {
    /// Each thread's rounded activations and result tile for [`linear`], kept between products:
    /// a fresh buffer per call was zeroed and faulted in again (a 256-row pass at d 1024 rounds
    /// 512 KiB of them).
    static LINEAR_SCRATCH: std::cell::RefCell<(Vec<u32>, Vec<f32>)> = const {
        std::cell::RefCell::new((Vec::new(), Vec::new()))
    };
}

/// One thread's share of [`linear`]: `m` rows, with the thread's scratch `act` and `ct`.
///
/// # Safety
/// [`available`] returned true; `x` has `m * k` values, `w` `n * k`, `y` `m * n`; `k` is a
/// multiple of 32 and `n` of 16.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
unsafe fn linear_rows(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[half::bf16],
    n: usize,
    y: &mut [f32],
    act: &mut Vec<u32>,
    ct: &mut Vec<f32>,
) {
    if m == 0 {
        return;
    }
    let blocks = m.div_ceil(BLOCK);
    let pairs = k / 2;
    let (act, ctp) = (
        aligned::<u32>(act, blocks * pairs * BLOCK),
        aligned::<f32>(ct, 16 * BLOCK),
    );
    let (xp, wp, yp) = (x.as_ptr(), w.as_ptr().cast::<u8>(), y.as_mut_ptr());
    let config = TileConfig::new();
    // SAFETY: `x` has `m` rows of `k` floats, so block `b`'s rows `< m` are in bounds; `act`
    // holds `blocks` pair-major blocks. Tiles read weight rows `j0..j0 + 16 <= n` of `k` values
    // and one block's `pairs x 32` activations; `ct` holds the 16 x 32 results, copied to rows
    // `< m` of `y` (`n` floats each) at columns `< n`.
    unsafe {
        for b in 0..blocks {
            let mb = (m - b * BLOCK).min(BLOCK);
            let rows = |r| xp.add((b * BLOCK + r) * k);
            round_block(rows, mb, k, act.add(b * pairs * BLOCK));
        }
        asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
        for j0 in (0..n).step_by(16) {
            for b in 0..blocks {
                let mb = (m - b * BLOCK).min(BLOCK);
                row_tiles(
                    mb.div_ceil(16),
                    k,
                    wp.add(j0 * k * 2),
                    act.add(b * pairs * BLOCK),
                    ctp,
                    next_rows(wp, j0, n, k, b),
                );
                each_result(ctp, mb, |t, v| {
                    _mm512_storeu_ps(yp.add((b * BLOCK + t) * n + j0), v);
                });
            }
        }
        asm!("tilerelease", options(nomem, nostack));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[target_feature(enable = "avx512f")]
    unsafe fn transpose_of(m: &[f32; 256]) -> [f32; 256] {
        let mut out = [0f32; 256];
        // SAFETY: the caller checked AVX-512F; each row is 16 floats of `m` and of `out`.
        unsafe {
            let cols = transpose16(std::array::from_fn(|r| {
                _mm512_loadu_ps(m.as_ptr().add(16 * r))
            }));
            for (c, v) in cols.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add(16 * c), *v);
            }
        }
        out
    }

    #[test]
    fn transpose16_moves_every_element_to_its_mirror() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            println!("skipped: no AVX-512F here");
            return;
        }
        let m: [f32; 256] = std::array::from_fn(|i| i as f32);
        // SAFETY: AVX-512F was detected above.
        let t = unsafe { transpose_of(&m) };
        for r in 0..16 {
            for c in 0..16 {
                assert_eq!(t[16 * c + r], m[16 * r + c], "row {r}, column {c}");
            }
        }
    }
}
