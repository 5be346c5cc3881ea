//! The few vector operations the fused kernel needs, behind one trait so that the kernel is written
//! once and instantiated per instruction set.
//!
//! Every method is `#[inline(always)]`: the kernel is only ever called from a
//! `#[target_feature]` entry point, and the intrinsics are inlined there (an intrinsic left as a
//! call in a function without the feature would cost a call per FMA).

use super::Activation;

/// The instruction set of the kernels written once over [`Simd`] (attention, matrix-vector
/// products, dense rows): the exact SIMD levels of [`KernelVariant`](super::KernelVariant).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// Plain Rust, any CPU.
    Portable,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512F.
    Avx512,
}

impl Isa {
    /// The level `variant` computes with: the rounding variants (`Avx512Bf16`, `Amx`) run these
    /// kernels in f32 on AVX-512, `Gemm` and `Auto` on the best this CPU has.
    ///
    /// # Panics
    /// When `variant` cannot run on this CPU.
    pub(crate) fn of(variant: super::KernelVariant) -> Isa {
        use super::KernelVariant as V;
        assert!(
            variant.is_supported(),
            "kernel variant {} is not supported on this CPU",
            variant.name()
        );
        match variant.resolve() {
            V::Avx2 => Isa::Avx2,
            V::Avx512 | V::Avx512Bf16 | V::Amx => Isa::Avx512,
            V::Gemm => Isa::of(V::Auto),
            _ => Isa::Portable,
        }
    }

    /// The best level this CPU runs.
    pub(crate) fn best() -> Isa {
        Isa::of(super::KernelVariant::Auto)
    }

    /// True when this CPU runs the level.
    pub(crate) fn is_supported(self) -> bool {
        match self {
            Isa::Portable => true,
            Isa::Avx2 => super::KernelVariant::Avx2.is_supported(),
            Isa::Avx512 => super::KernelVariant::Avx512.is_supported(),
        }
    }
}

/// A SIMD register of `W` f32 lanes and the operations the kernel uses on it.
///
/// # Safety
/// Implementations use instructions that the CPU must support; callers reach them only through
/// entry points that checked the feature at run time.
pub(crate) unsafe trait Simd: Copy {
    /// Lanes per register.
    const W: usize;
    /// The register type.
    type V: Copy;
    /// All lanes 0.
    unsafe fn zero() -> Self::V;
    /// All lanes `x`.
    unsafe fn splat(x: f32) -> Self::V;
    /// Unaligned load of `W` floats.
    unsafe fn load(p: *const f32) -> Self::V;
    /// Unaligned store of `W` floats.
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `a * b + c` (fused where the hardware has FMA).
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a + b`.
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    /// `a * b`.
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// The activation, lane-wise.
    unsafe fn act(a: Activation, x: Self::V) -> Self::V;
    /// `e^x`, lane-wise (a Cephes-style polynomial on the SIMD variants, within 2 ulp for `x` in
    /// `[-87, 88]`; below that, a tiny positive value instead of 0).
    unsafe fn exp(x: Self::V) -> Self::V;
    /// Lane-wise maximum.
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    /// `W` IEEE half-precision values (bits) widened to f32 (exact).
    unsafe fn load_f16(p: *const u16) -> Self::V;
    /// `2 * W` bfloat16 values (bits) stored as `W` pairs `(k, k + 1)`, widened to f32 (exact):
    /// the first register holds every pair's first value, the second every pair's second.
    unsafe fn load_bf16_pairs(p: *const u16) -> (Self::V, Self::V);
    /// `W` consecutive bfloat16 values (bits) widened to f32 (exact).
    unsafe fn load_bf16(p: *const u16) -> Self::V;
    /// The sum of the lanes, as a tree: halves added lane by lane until one lane is left (the
    /// same order on every implementation of the same width).
    unsafe fn hsum(v: Self::V) -> f32;
}

/// Plain Rust "vector" of 8 lanes: LLVM turns the lane loops into SSE2 code on any x86-64, and the
/// activation is [`Activation::apply`] itself, so this variant is also the exact engine semantics.
#[derive(Clone, Copy)]
pub(crate) struct Portable;

// SAFETY: plain Rust on arrays, no CPU feature needed; `load` / `store` pass the caller's
// pointer guarantee on.
unsafe impl Simd for Portable {
    const W: usize = 8;
    type V = [f32; 8];
    #[inline(always)]
    unsafe fn zero() -> Self::V {
        [0.0; 8]
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        [x; 8]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        // SAFETY: the caller guarantees `p` points to 8 readable floats (`Simd::load`);
        // `read_unaligned` needs no alignment.
        unsafe { p.cast::<[f32; 8]>().read_unaligned() }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        // SAFETY: the caller guarantees `p` points to 8 writable floats (`Simd::store`);
        // `write_unaligned` needs no alignment.
        unsafe { p.cast::<[f32; 8]>().write_unaligned(v) }
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        // Not `mul_add`: without hardware FMA that is a libm call per lane.
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] * b[i])
    }
    #[inline(always)]
    unsafe fn act(a: Activation, x: Self::V) -> Self::V {
        x.map(|v| a.apply(v))
    }
    #[inline(always)]
    unsafe fn exp(x: Self::V) -> Self::V {
        x.map(f32::exp)
    }
    #[inline(always)]
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i].max(b[i]))
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> Self::V {
        // SAFETY: the caller guarantees `p` points to 8 readable values (`Simd::load_f16`).
        let bits = unsafe { p.cast::<[u16; 8]>().read_unaligned() };
        bits.map(|b| half::f16::from_bits(b).to_f32())
    }
    #[inline(always)]
    unsafe fn load_bf16_pairs(p: *const u16) -> (Self::V, Self::V) {
        // SAFETY: the caller guarantees `p` points to 16 readable values (`Simd::load_bf16_pairs`).
        let bits = unsafe { p.cast::<[u16; 16]>().read_unaligned() };
        // A bfloat16 is the top half of an f32: widening is a shift.
        (
            std::array::from_fn(|i| f32::from_bits((bits[2 * i] as u32) << 16)),
            std::array::from_fn(|i| f32::from_bits((bits[2 * i + 1] as u32) << 16)),
        )
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> Self::V {
        // SAFETY: the caller guarantees `p` points to 8 readable values (`Simd::load_bf16`).
        let bits = unsafe { p.cast::<[u16; 8]>().read_unaligned() };
        bits.map(|b| f32::from_bits((b as u32) << 16))
    }
    #[inline(always)]
    unsafe fn hsum(v: Self::V) -> f32 {
        // As the AVX2 reduction: 8 -> 4 -> 2 -> 1 lanes.
        let q: [f32; 4] = std::array::from_fn(|i| v[i] + v[i + 4]);
        let (a, b) = (q[0] + q[2], q[1] + q[3]);
        a + b
    }
}

/// Both activations as `x * sigmoid(z)`: SiLU has `z = x`, and GELU-tanh
/// `0.5 x (1 + tanh(u)) = x / (1 + exp(-2u))` with `u = sqrt(2/pi) (x + 0.044715 x^3)`. The sigmoid
/// form avoids the cancellation of `1 + tanh(u)` for negative `u` and needs one `exp`.
const GELU_K1: f32 = 2.0 * 0.797_884_6;
const GELU_K3: f32 = 2.0 * 0.797_884_6 * 0.044_715;

// Cephes-style expf: exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln2 / 2, degree-6 polynomial.
const EXP_HI: f32 = 88.0;
const EXP_LO: f32 = -87.0;
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const P0: f32 = 1.987_569_1e-4;
const P1: f32 = 1.398_199_9e-3;
const P2: f32 = 8.333_452e-3;
const P3: f32 = 4.166_579_6e-2;
const P4: f32 = 1.666_666_5e-1;
const P5: f32 = 0.5;

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// AVX2 + FMA, 8 lanes.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2;

    #[inline(always)]
    unsafe fn exp256(x: __m256) -> __m256 {
        // SAFETY: the `Simd` contract: this is reached only from a `#[target_feature]` entry point
        // (`run_avx2` / `run_avx512` / `run_gemm_*`) that `run` enters after checking the CPU feature.
        unsafe {
            let x = _mm256_min_ps(
                _mm256_max_ps(x, _mm256_set1_ps(EXP_LO)),
                _mm256_set1_ps(EXP_HI),
            );
            // cvtps rounds to nearest under the default MXCSR.
            let n = _mm256_cvtps_epi32(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)));
            let nf = _mm256_cvtepi32_ps(n);
            let r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(LN2_HI), x);
            let r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(LN2_LO), r);
            let mut p = _mm256_set1_ps(P0);
            for c in [P1, P2, P3, P4, P5] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
            }
            let r2 = _mm256_mul_ps(r, r);
            let p = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
            let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                n,
                _mm256_set1_epi32(127),
            )));
            _mm256_mul_ps(p, scale)
        }
    }

    // SAFETY: every method uses AVX2 + FMA intrinsics only; `Simd`'s callers check those
    // features at run time (`has_avx2`).
    unsafe impl Simd for Avx2 {
        const W: usize = 8;
        type V = __m256;
        #[inline(always)]
        unsafe fn zero() -> Self::V {
            // SAFETY: the `Simd` contract: this is reached only from a `#[target_feature]` entry point
            // (`run_avx2` / `run_avx512` / `run_gemm_*`) that `run` enters after checking the CPU feature.
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self::V {
            // SAFETY: the `Simd` contract: this is reached only from a `#[target_feature]` entry point
            // (`run_avx2` / `run_avx512` / `run_gemm_*`) that `run` enters after checking the CPU feature.
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self::V {
            // SAFETY: the caller guarantees `p` points to `W` readable floats (`Simd::load`); unaligned access
            // is allowed by this intrinsic. CPU feature: the `Simd` contract, checked before `run` enters.
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: Self::V) {
            // SAFETY: the caller guarantees `p` points to `W` writable floats (`Simd::store`); unaligned access
            // is allowed by this intrinsic. CPU feature: the `Simd` contract, checked before `run` enters.
            unsafe { _mm256_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
            // SAFETY: the `Simd` contract: this is reached only from a `#[target_feature]` entry point
            // (`run_avx2` / `run_avx512` / `run_gemm_*`) that `run` enters after checking the CPU feature.
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
            // SAFETY: the `Simd` contract: this is reached only from a `#[target_feature]` entry point
            // (`run_avx2` / `run_avx512` / `run_gemm_*`) that `run` enters after checking the CPU feature.
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
            // SAFETY: the `Simd` contract: this is reached only from a `#[target_feature]` entry point
            // (`run_avx2` / `run_avx512` / `run_gemm_*`) that `run` enters after checking the CPU feature.
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn exp(x: Self::V) -> Self::V {
            // SAFETY: the `Simd` contract: reached only from a `#[target_feature]` entry point that
            // checked the CPU feature.
            unsafe { exp256(x) }
        }
        #[inline(always)]
        unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
            // SAFETY: as `exp`.
            unsafe { _mm256_max_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn act(a: Activation, x: Self::V) -> Self::V {
            // SAFETY: the `Simd` contract: this is reached only from a `#[target_feature]` entry point
            // (`run_avx2` / `run_avx512` / `run_gemm_*`) that `run` enters after checking the CPU feature.
            unsafe {
                let z = match a {
                    Activation::Silu => x,
                    Activation::Gelu => {
                        let x2 = _mm256_mul_ps(x, x);
                        let k =
                            _mm256_fmadd_ps(x2, _mm256_set1_ps(GELU_K3), _mm256_set1_ps(GELU_K1));
                        _mm256_mul_ps(x, k)
                    }
                };
                let neg = _mm256_sub_ps(_mm256_setzero_ps(), z);
                let den = _mm256_add_ps(_mm256_set1_ps(1.0), exp256(neg));
                _mm256_div_ps(x, den)
            }
        }

        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> Self::V {
            // SAFETY: the caller guarantees `p` points to 8 readable values; F16C is enabled by
            // the entry points with AVX2 (`has_avx2` checks it).
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
        }
        #[inline(always)]
        unsafe fn load_bf16_pairs(p: *const u16) -> (Self::V, Self::V) {
            // SAFETY: the caller guarantees `p` points to 16 readable values. Each 32-bit lane
            // holds a pair, first value in the low half (little-endian): shifting it up gives the
            // first value as f32, masking the low half off gives the second.
            unsafe {
                let v = _mm256_loadu_si256(p.cast());
                let lo = _mm256_slli_epi32::<16>(v);
                let hi = _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF_0000u32 as i32));
                (_mm256_castsi256_ps(lo), _mm256_castsi256_ps(hi))
            }
        }
        #[inline(always)]
        unsafe fn load_bf16(p: *const u16) -> Self::V {
            // SAFETY: the caller guarantees `p` points to 8 readable values: zero-extend each to
            // 32 bits and shift it into the high half, where a bfloat16 sits in an f32.
            unsafe {
                let v = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v))
            }
        }
        #[inline(always)]
        unsafe fn hsum(v: Self::V) -> f32 {
            // SAFETY: AVX (part of the checked AVX2 feature set) and SSE intrinsics on registers.
            unsafe { hsum256(v) }
        }
    }

    /// 8 -> 4 -> 2 -> 1 lanes: lane `i` plus lane `i + 4`, then `i + 2`, then `i + 1`.
    #[inline(always)]
    unsafe fn hsum256(v: __m256) -> f32 {
        // SAFETY: the caller's entry point enabled AVX2.
        unsafe {
            let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let d = _mm_add_ps(q, _mm_movehl_ps(q, q));
            _mm_cvtss_f32(_mm_add_ss(d, _mm_shuffle_ps::<1>(d, d)))
        }
    }

    /// AVX-512F, 16 lanes.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx512;

    #[inline(always)]
    unsafe fn exp512(x: __m512) -> __m512 {
        // SAFETY: the `Simd` contract: this is reached only from a `#[target_feature]` entry point
        // (`run_avx2` / `run_avx512` / `run_gemm_*`) that `run` enters after checking the CPU feature.
        unsafe {
            let x = _mm512_min_ps(
                _mm512_max_ps(x, _mm512_set1_ps(EXP_LO)),
                _mm512_set1_ps(EXP_HI),
            );
            let n = _mm512_cvtps_epi32(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)));
            let nf = _mm512_cvtepi32_ps(n);
            let r = _mm512_fnmadd_ps(nf, _mm512_set1_ps(LN2_HI), x);
            let r = _mm512_fnmadd_ps(nf, _mm512_set1_ps(LN2_LO), r);
            let mut p = _mm512_set1_ps(P0);
            for c in [P1, P2, P3, P4, P5] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
            }
            let r2 = _mm512_mul_ps(r, r);
            let p = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
            let scale = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
                n,
                _mm512_set1_epi32(127),
            )));
            _mm512_mul_ps(p, scale)
        }
    }

    // SAFETY: every method uses AVX-512F intrinsics only; `Simd`'s callers check that
    // feature at run time (`has_avx512`).
    unsafe impl Simd for Avx512 {
        const W: usize = 16;
        type V = __m512;
        #[inline(always)]
        unsafe fn zero() -> Self::V {
            // SAFETY: the `Simd` contract: this is reached only from a `#[target_feature]` entry point
            // (`run_avx2` / `run_avx512` / `run_gemm_*`) that `run` enters after checking the CPU feature.
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self::V {
            // SAFETY: the `Simd` contract: this is reached only from a `#[target_feature]` entry point
            // (`run_avx2` / `run_avx512` / `run_gemm_*`) that `run` enters after checking the CPU feature.
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self::V {
            // SAFETY: the caller guarantees `p` points to `W` readable floats (`Simd::load`); unaligned access
            // is allowed by this intrinsic. CPU feature: the `Simd` contract, checked before `run` enters.
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: Self::V) {
            // SAFETY: the caller guarantees `p` points to `W` writable floats (`Simd::store`); unaligned access
            // is allowed by this intrinsic. CPU feature: the `Simd` contract, checked before `run` enters.
            unsafe { _mm512_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
            // SAFETY: the `Simd` contract: this is reached only from a `#[target_feature]` entry point
            // (`run_avx2` / `run_avx512` / `run_gemm_*`) that `run` enters after checking the CPU feature.
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
            // SAFETY: the `Simd` contract: this is reached only from a `#[target_feature]` entry point
            // (`run_avx2` / `run_avx512` / `run_gemm_*`) that `run` enters after checking the CPU feature.
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
            // SAFETY: the `Simd` contract: this is reached only from a `#[target_feature]` entry point
            // (`run_avx2` / `run_avx512` / `run_gemm_*`) that `run` enters after checking the CPU feature.
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn exp(x: Self::V) -> Self::V {
            // SAFETY: the `Simd` contract: reached only from a `#[target_feature]` entry point that
            // checked the CPU feature.
            unsafe { exp512(x) }
        }
        #[inline(always)]
        unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
            // SAFETY: as `exp`.
            unsafe { _mm512_max_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn act(a: Activation, x: Self::V) -> Self::V {
            // SAFETY: the `Simd` contract: this is reached only from a `#[target_feature]` entry point
            // (`run_avx2` / `run_avx512` / `run_gemm_*`) that `run` enters after checking the CPU feature.
            unsafe {
                let z = match a {
                    Activation::Silu => x,
                    Activation::Gelu => {
                        let x2 = _mm512_mul_ps(x, x);
                        let k =
                            _mm512_fmadd_ps(x2, _mm512_set1_ps(GELU_K3), _mm512_set1_ps(GELU_K1));
                        _mm512_mul_ps(x, k)
                    }
                };
                let neg = _mm512_sub_ps(_mm512_setzero_ps(), z);
                let den = _mm512_add_ps(_mm512_set1_ps(1.0), exp512(neg));
                _mm512_div_ps(x, den)
            }
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> Self::V {
            // SAFETY: the caller guarantees `p` points to 16 readable values; `vcvtph2ps` on zmm
            // is AVX-512F.
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
        }
        #[inline(always)]
        unsafe fn load_bf16_pairs(p: *const u16) -> (Self::V, Self::V) {
            // SAFETY: the caller guarantees `p` points to 32 readable values; as for `Avx2`.
            unsafe {
                let v = _mm512_loadu_si512(p.cast());
                let lo = _mm512_slli_epi32::<16>(v);
                let hi = _mm512_and_si512(v, _mm512_set1_epi32(0xFFFF_0000u32 as i32));
                (_mm512_castsi512_ps(lo), _mm512_castsi512_ps(hi))
            }
        }
        #[inline(always)]
        unsafe fn load_bf16(p: *const u16) -> Self::V {
            // SAFETY: the caller guarantees `p` points to 16 readable values; as for `Avx2`.
            unsafe {
                let v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v))
            }
        }
        #[inline(always)]
        unsafe fn hsum(v: Self::V) -> f32 {
            // SAFETY: AVX-512F and AVX2 intrinsics on registers; the entry point enabled both.
            unsafe {
                let lo = _mm512_castps512_ps256(v);
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
                hsum256(_mm256_add_ps(lo, hi))
            }
        }
    }
}
