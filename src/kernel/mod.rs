//! The CPU Mixture-of-Experts layer on raw f32 slices.
//!
//! `out[t] = sum over kept (t, e, w) of w * expert_e(x[t])`, with
//! `expert_e(f) = down_e(act(up_e f + up_bias_e)) + down_bias_e` (gated:
//! `down_e(act(gate_e f) * (up_e f + up_bias_e)) + down_bias_e`), computing only the selected
//! (token, expert) pairs so that wall time follows the FLOPs the router saves.
//!
//! # Why the hot path leaves candle
//! The obvious candle dispatch (per expert `index_select` -> `matmul` -> `index_add`, as
//! candle-transformers' Mixtral and Qwen-MoE do) was measured at 2.6x the dense FFN with all experts
//! active and still 0.77x at 12.5% active (issue 7): every op allocates a fresh tensor, `index_add`
//! copies the whole output per expert, small matmuls go through candle's generic dispatch (and
//! re-read `/proc/cpuinfo` when `RAYON_NUM_THREADS` is unset), and splitting each small GEMM over
//! threads costs more than it gains. Here the weights are packed once, tokens are gathered straight
//! from `x`, the hidden activations stay in a per-thread scratch block that lives in L2, and each
//! thread writes its own output rows, so once the scratch has grown a pass allocates nothing the
//! size of the data (only two vectors of `threads` entries when it splits work). On one core of
//! this machine kind the result is 72-100% of the 1024^3 matmul peak at >= 256 tokens, with time
//! following the active share (see docs/benchmarks.md, "MoE layer").
//!
//! # Variants
//! - [`KernelVariant::Avx512`] / [`KernelVariant::Avx2`]: the fused kernel. For a block of up to
//!   ~96 rows of one expert, a register-tiled micro-kernel multiplies the gathered token rows by the
//!   packed `[up | gate]` weights into a scratch block, the epilogue adds the bias, applies the
//!   activation (a vectorised `exp`, within a few ulp of [`Activation::apply`]) and the routing
//!   weight, and a second micro-kernel multiplies by `down` and accumulates into the output rows.
//! - [`KernelVariant::Avx512Bf16`]: the AVX-512 kernel, except that bf16 weights meet activations
//!   rounded to bf16 in `vdpbf16ps` (module `bf16dot`). Chosen by name only (`--moe-dispatch
//!   avx512bf16`), since it changes results; f32 and f16 weights run exactly as under `Avx512`.
//! - [`KernelVariant::Portable`]: the same fused kernel on plain arrays (SSE2 after
//!   auto-vectorisation) with the exact scalar activation; the fallback for any CPU.
//! - [`KernelVariant::Gemm`]: per row block, gather into scratch and call the `gemm` crate twice
//!   (`Parallelism::None`); kept as the measured stepping stone of issue 7.
//!
//! # Threads and determinism
//! Small passes (under ~4 MFLOP, e.g. decode) run on the calling thread: waking the pool costs
//! more than it saves. Larger ones split either the *tokens* (each thread owns a contiguous range of
//! output rows, balanced by pair count, and runs every expert's rows in that range) or, when there
//! are too few tokens for that or too few rows per expert (a wide layer, whose every expert each
//! thread would stream for a partial block), the *pairs* (each thread computes a balanced slice of
//! the expert-sorted pairs into a per-pair buffer, summed per token afterwards). Either way every output
//! row receives its experts' contributions in ascending expert order, each computed by the same
//! arithmetic, so the fused variants give bit-identical results for every thread count.
//!
//! A split from a rayon pool thread costs about a microsecond, from outside the pool several
//! (`split`); a pass called from the pool (a decode step of the lean decoder) therefore splits
//! from a smaller size.

pub mod activation;
#[cfg(target_arch = "x86_64")]
mod amx;
pub(crate) mod attention;
#[cfg(target_arch = "x86_64")]
mod bf16dot;
pub(crate) mod heads;
pub(crate) mod matvec;
pub(crate) mod norm;
mod rows;
mod simd;
pub(crate) mod split;
#[cfg(test)]
mod tests;

use crate::routing::ExpertGroups;
pub use activation::{Activation, ClampedSwiglu};
pub(crate) use rows::dense_rows;
pub use rows::{ExpertRows, RowRef, RowSource};
#[cfg(target_arch = "x86_64")]
use simd::{Avx2, Avx512};
use simd::{Portable, Simd};

/// Width of a weight panel: the micro-kernels compute 32 output columns at a time (2 AVX-512 or 4
/// AVX2 registers), so `h` and `d` are padded to multiples of it in the packed weights.
const PANEL: usize = 32;
/// Below this many FLOPs a pass runs on the calling thread (about 20-40 us of one core).
const PAR_MIN_FLOPS: usize = 4_000_000;
/// The same when the caller is a pool thread, where a split costs about 1 us: eight of the
/// embedded model's experts (33 kFLOP, about 1 us each in a decode step). Fewer lost: the other
/// thread computes experts whose weights sit in the other core's L2, and two split one each way
/// took 10.8-14.0 us a step against 8.3-9.8 us unsplit (top-2); from eight (top-8, dense) the
/// split won 1.2-1.7x.
const POOL_PAR_MIN_FLOPS: usize = 256_000;
/// Token splitting needs enough rows per thread for the weights each thread streams to be reused.
const MIN_TOKENS_PER_THREAD: usize = 32;
/// A token split streams every chosen expert's weights once per thread. Where that leaves a
/// thread fewer than this many rows of an expert on average (a partial block of the expert
/// tiles), the pairs are split instead, so that most experts are streamed by one thread only:
/// OLMoE-1B-7B's layer (64 experts of 12.6 MB, 256 tokens, top-8: 16 rows per expert and thread)
/// took 1.2-1.3x less time on AMX, and 3% less on the exact kernel; at 32 rows and more the two
/// splits measured the same (docs/benchmarks.md, "Splitting the pairs of a wide layer").
const MIN_EXPERT_ROWS_PER_THREAD: usize = 32;
/// The pair split writes one output row per pair before summing them per token; past this many
/// bytes of such rows the token split is kept whatever the rows per expert.
const PAIR_SPLIT_MAX_BYTES: usize = 64 << 20;

fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// Index of element (`k`, `col`) of a `[k_len][n]` matrix stored as `[n / 32][k_len][32]` panels.
fn panel_at(k_len: usize, k: usize, col: usize) -> usize {
    (col / PANEL) * k_len * PANEL + k * PANEL + col % PANEL
}

/// Precision in which [`PackedExperts`] keeps its weights. Every variant computes with f32
/// activations and f32 accumulation; half-precision weights are widened (exactly) in registers as
/// they are read, so a layer stored in f16 or bf16 takes half the memory and half the bandwidth of
/// f32, and gives the results of the f32 kernel on the widened weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    /// IEEE single precision.
    F32,
    /// IEEE half precision (widened with F16C / AVX-512F `vcvtph2ps`).
    F16,
    /// bfloat16 (widened by a 16-bit shift; stored in `(k, k + 1)` pairs, see [`PackedExperts`]).
    Bf16,
}

impl WeightDtype {
    /// Bytes per stored weight.
    pub fn bytes(self) -> usize {
        match self {
            WeightDtype::F32 => 4,
            WeightDtype::F16 | WeightDtype::Bf16 => 2,
        }
    }

    /// Appends `values` rounded to this precision (to nearest, ties to even) as little-endian
    /// bytes: the form a checkpoint stores them in, which [`PackedExperts::from_rows`] reads.
    pub fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        out.reserve(values.len() * self.bytes());
        for &x in values {
            match self {
                WeightDtype::F32 => out.extend_from_slice(&x.to_le_bytes()),
                WeightDtype::F16 => {
                    out.extend_from_slice(&half::f16::from_f32(x).to_bits().to_le_bytes())
                }
                WeightDtype::Bf16 => {
                    out.extend_from_slice(&half::bf16::from_f32(x).to_bits().to_le_bytes())
                }
            }
        }
    }
}

/// An element type [`PackedExperts`] can keep: `f32`, [`half::f16`] or [`half::bf16`].
pub trait ExpertWeight: Copy + Default + Send + Sync + 'static {
    /// The precision this type stands for.
    const DTYPE: WeightDtype;
}

impl ExpertWeight for f32 {
    const DTYPE: WeightDtype = WeightDtype::F32;
}

impl ExpertWeight for half::f16 {
    const DTYPE: WeightDtype = WeightDtype::F16;
}

impl ExpertWeight for half::bf16 {
    const DTYPE: WeightDtype = WeightDtype::Bf16;
}

/// The packed matrices in their stored precision.
#[derive(Clone, Debug)]
enum PackedWeights {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
    Bf16(Vec<half::bf16>),
}

impl PackedWeights {
    fn from_vec<T: ExpertWeight>(v: Vec<T>) -> Self {
        // One downcast per matrix at load: the generic constructor needs no trait method that
        // would expose this private type.
        let any: Box<dyn std::any::Any> = Box::new(v);
        match T::DTYPE {
            WeightDtype::F32 => PackedWeights::F32(*any.downcast().expect("f32")),
            WeightDtype::F16 => PackedWeights::F16(*any.downcast().expect("f16")),
            WeightDtype::Bf16 => PackedWeights::Bf16(*any.downcast().expect("bf16")),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            PackedWeights::F32(v) => v.len() * 4,
            PackedWeights::F16(v) => v.len() * 2,
            PackedWeights::Bf16(v) => v.len() * 2,
        }
    }
}

/// One expert's weights in the model-file layout (PyTorch `[out, in]`): `up` and `gate`
/// `[h, d]`, `down` `[d, h]`, row-major.
#[derive(Clone, Debug, Default)]
pub struct ExpertData<T> {
    /// Up projection `[h, d]`.
    pub up: Vec<T>,
    /// Gate projection `[h, d]` (gated experts only).
    pub gate: Option<Vec<T>>,
    /// Down projection `[d, h]`.
    pub down: Vec<T>,
}

/// The shapes of a packed layer: what [`PackedExperts::new`] derives from `E`, `d`, `h`.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    d: usize,
    h: usize,
    h_pad: usize,
    d_pad: usize,
    n1: usize,
    /// Rows of `w1` stored per panel: `d`, rounded up to even for bf16 pairs.
    k1: usize,
    gated: bool,
    pairs: bool,
}

impl Geometry {
    fn new(d: usize, h: usize, gated: bool, dtype: WeightDtype) -> Self {
        let h_pad = round_up(h, PANEL);
        let pairs = dtype == WeightDtype::Bf16;
        Geometry {
            d,
            h,
            h_pad,
            d_pad: round_up(d, PANEL),
            n1: if gated { 2 * h_pad } else { h_pad },
            k1: if pairs { round_up(d, 2) } else { d },
            gated,
            pairs,
        }
    }

    fn w1_len(&self) -> usize {
        self.k1 * self.n1
    }

    fn w2_len(&self) -> usize {
        self.h_pad * self.d_pad
    }

    /// Index of element (`k`, `col`) in a panel-packed matrix with `k_len` stored rows.
    fn at(&self, k_len: usize, k: usize, col: usize) -> usize {
        if self.pairs {
            panel_pair_at(k_len, k, col)
        } else {
            panel_at(k_len, k, col)
        }
    }

    /// Packs one expert (model-file layout, see [`ExpertData`]) into its zeroed slices of `w1`
    /// and `w2`.
    fn pack_expert<T: Copy>(
        &self,
        w1e: &mut [T],
        w2e: &mut [T],
        up: &[T],
        gate: Option<&[T]>,
        down: &[T],
    ) {
        let (d, h) = (self.d, self.h);
        let up_col0 = if self.gated { self.h_pad } else { 0 };
        for j in 0..h {
            for k in 0..d {
                w1e[self.at(self.k1, k, up_col0 + j)] = up[j * d + k];
            }
        }
        if let Some(g) = gate {
            for j in 0..h {
                for k in 0..d {
                    w1e[self.at(self.k1, k, j)] = g[j * d + k];
                }
            }
        }
        for n in 0..d {
            for j in 0..h {
                w2e[self.at(self.h_pad, j, n)] = down[n * h + j];
            }
        }
    }
}

/// The biases padded per expert to `h_pad` / `d_pad` (see [`PackedExperts::new`]).
fn pad_biases(
    e_n: usize,
    geo: Geometry,
    up_bias: Option<&[f32]>,
    down_bias: Option<&[f32]>,
) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
    let (d, h, h_pad, d_pad) = (geo.d, geo.h, geo.h_pad, geo.d_pad);
    if let Some(b) = up_bias {
        assert_eq!(b.len(), e_n * h, "up_bias must be [E, h]");
    }
    if let Some(b) = down_bias {
        assert_eq!(b.len(), e_n * d, "down_bias must be [E, d]");
    }
    let pad = |b: &[f32], n: usize, n_pad: usize| {
        let mut p = vec![0.0f32; e_n * n_pad];
        for e in 0..e_n {
            p[e * n_pad..e * n_pad + n].copy_from_slice(&b[e * n..(e + 1) * n]);
        }
        p
    };
    (
        up_bias.map(|b| pad(b, h, h_pad)),
        down_bias.map(|b| pad(b, d, d_pad)),
    )
}

/// Index of element (`k`, `col`) of a `[k_len][n]` matrix stored as `[n / 32][k_len / 2][32][2]`:
/// rows in pairs, each column's `(k, k + 1)` adjacent, so that one 32-bit lane holds a pair (the
/// layout `vdpbf16ps` reads, and the one a shift and a mask widen). `k_len` is even.
fn panel_pair_at(k_len: usize, k: usize, col: usize) -> usize {
    (col / PANEL) * k_len * PANEL + (k / 2) * 2 * PANEL + (col % PANEL) * 2 + k % 2
}

/// Where a layer's weights are: packed panels it owns, or rows read in place.
#[derive(Clone, Debug)]
enum Store {
    Panels {
        w1: PackedWeights,
        w2: PackedWeights,
    },
    Rows(rows::RowWeights),
}

/// Expert weights of one MoE layer, packed once at load in the orientation the kernel reads, or
/// (built with [`PackedExperts::from_rows`]) read in place in the checkpoint's own layout.
///
/// Layout (per expert, zero padded): the first matmul's matrix `[d][n1]` has `n1 = h_pad` columns
/// of `up` (non-gated) or `2 * h_pad` columns, `gate` then `up` (gated); the second's is
/// `[h_pad][d_pad]` (`down` transposed). Both are stored as 32-column panels, `[n/32][k][32]`, so
/// the micro-kernel streams each panel contiguously: a row-major `[k][n]` layout made it stride by
/// `n` floats per k (up to 4 KiB, a new page per k at d = 1024) and cost ~20% at large widths.
/// `h_pad` and `d_pad` round up to 32. Zero padding is harmless: a padded hidden unit is
/// `act(0) = 0` and meets a zero row of the second matrix. bf16 weights interleave row pairs
/// inside each panel (`[n/32][k/2][32][2]`, `k` padded to even with zeros) so that one load
/// widens into two rows; f16 and f32 use the plain panels.
#[derive(Clone, Debug)]
pub struct PackedExperts {
    n_experts: usize,
    d: usize,
    h: usize,
    h_pad: usize,
    d_pad: usize,
    n1: usize,
    k1: usize,
    gated: bool,
    activation: Activation,
    store: Store,
    b1: Option<Vec<f32>>,
    b2: Option<Vec<f32>>,
}

impl PackedExperts {
    /// Packs expert weights given in the model-file layout: `up`/`gate` `[E, h, d]` (PyTorch
    /// `[out, in]` per expert), `down` `[E, d, h]`, `up_bias` `[E, h]`, `down_bias` `[E, d]`,
    /// keeping the element type (`f32`, [`half::f16`] or [`half::bf16`]).
    ///
    /// # Panics
    /// When a slice length does not match the shapes.
    #[allow(clippy::too_many_arguments)]
    pub fn new<T: ExpertWeight>(
        n_experts: usize,
        d: usize,
        h: usize,
        activation: Activation,
        up: &[T],
        gate: Option<&[T]>,
        down: &[T],
        up_bias: Option<&[f32]>,
        down_bias: Option<&[f32]>,
    ) -> Self {
        let (e_n, hd) = (n_experts, h * d);
        assert_eq!(up.len(), e_n * hd, "up must be [E, h, d]");
        assert_eq!(down.len(), e_n * hd, "down must be [E, d, h]");
        if let Some(g) = gate {
            assert_eq!(g.len(), e_n * hd, "gate must be [E, h, d]");
        }
        let geo = Geometry::new(d, h, gate.is_some(), T::DTYPE);
        let packed: Result<Self, std::convert::Infallible> = Self::pack_with(
            n_experts,
            geo,
            activation,
            up_bias,
            down_bias,
            |e, w1e: &mut [T], w2e: &mut [T]| {
                let r = e * hd..(e + 1) * hd;
                geo.pack_expert(
                    w1e,
                    w2e,
                    &up[r.clone()],
                    gate.map(|g| &g[r.clone()]),
                    &down[r],
                );
                Ok(())
            },
        );
        let Ok(p) = packed;
        p
    }

    /// Packs `n_experts` experts fetched one at a time by `expert(e)`, so that a loader holds one
    /// expert's unpacked copy at a time (the packed layer is the only full-size allocation).
    /// `gated` says whether every expert has a `gate`; the biases are as in [`PackedExperts::new`].
    ///
    /// # Errors
    /// The first error `expert` returns, or a description of a weight whose length does not
    /// match the shapes (as `Er::from(String)`).
    #[allow(clippy::too_many_arguments)]
    pub fn from_experts<T: ExpertWeight, Er: From<String>>(
        n_experts: usize,
        d: usize,
        h: usize,
        gated: bool,
        activation: Activation,
        up_bias: Option<&[f32]>,
        down_bias: Option<&[f32]>,
        mut expert: impl FnMut(usize) -> Result<ExpertData<T>, Er>,
    ) -> Result<Self, Er> {
        let geo = Geometry::new(d, h, gated, T::DTYPE);
        Self::pack_with(
            n_experts,
            geo,
            activation,
            up_bias,
            down_bias,
            |e, w1e: &mut [T], w2e: &mut [T]| {
                let x = expert(e)?;
                let hd = h * d;
                let bad = |what: &str, found: usize| -> Er {
                    Er::from(format!(
                        "expert {e}: {what} has {found} values, expected {hd} ([{h}, {d}] / [{d}, {h}])"
                    ))
                };
                if x.up.len() != hd {
                    return Err(bad("up", x.up.len()));
                }
                if x.down.len() != hd {
                    return Err(bad("down", x.down.len()));
                }
                match (&x.gate, gated) {
                    (Some(g), true) if g.len() != hd => return Err(bad("gate", g.len())),
                    (Some(_), true) | (None, false) => {}
                    (None, true) => return Err(Er::from(format!("expert {e}: gate missing"))),
                    (Some(_), false) => {
                        return Err(Er::from(format!(
                            "expert {e}: a gate for non-gated experts"
                        )));
                    }
                }
                geo.pack_expert(w1e, w2e, &x.up, x.gate.as_deref(), &x.down);
                Ok(())
            },
        )
    }

    fn pack_with<T: ExpertWeight, Er>(
        n_experts: usize,
        geo: Geometry,
        activation: Activation,
        up_bias: Option<&[f32]>,
        down_bias: Option<&[f32]>,
        mut pack_one: impl FnMut(usize, &mut [T], &mut [T]) -> Result<(), Er>,
    ) -> Result<Self, Er> {
        let (e_n, d, h, h_pad, d_pad) = (n_experts, geo.d, geo.h, geo.h_pad, geo.d_pad);
        // Biases first: a wrong length panics before the packing work.
        let (b1, b2) = pad_biases(e_n, geo, up_bias, down_bias);
        let (l1, l2) = (geo.w1_len(), geo.w2_len());
        let mut w1 = vec![T::default(); e_n * l1];
        let mut w2 = vec![T::default(); e_n * l2];
        for e in 0..e_n {
            pack_one(
                e,
                &mut w1[e * l1..(e + 1) * l1],
                &mut w2[e * l2..(e + 1) * l2],
            )?;
        }
        Ok(PackedExperts {
            n_experts,
            d,
            h,
            h_pad,
            d_pad,
            n1: geo.n1,
            k1: geo.k1,
            gated: geo.gated,
            activation,
            store: Store::Panels {
                w1: PackedWeights::from_vec(w1),
                w2: PackedWeights::from_vec(w2),
            },
            b1,
            b2,
        })
    }

    /// Experts read in place: each expert's matrices in the checkpoint's `[out, in]` layout
    /// (`gate`/`up` `[h, d]`, `down` `[d, h]`, row-major, dtype `dtype`) at the given places in
    /// `sources` (typically memory-mapped shards), which the layer keeps alive. Nothing is copied:
    /// the layer takes no memory of its own beyond the biases, and a page of a mapped file is read
    /// when an expert that lies there is first chosen. Biases as in [`PackedExperts::new`].
    ///
    /// # Errors
    /// A description of the first matrix that does not lie inside its source, or of a gate that
    /// is missing (`gated`) or present (not `gated`).
    #[allow(clippy::too_many_arguments)]
    pub fn from_rows(
        d: usize,
        h: usize,
        gated: bool,
        activation: Activation,
        dtype: WeightDtype,
        sources: Vec<std::sync::Arc<dyn RowSource>>,
        experts: Vec<ExpertRows>,
        up_bias: Option<&[f32]>,
        down_bias: Option<&[f32]>,
    ) -> Result<Self, String> {
        let n_experts = experts.len();
        let geo = Geometry::new(d, h, gated, WeightDtype::F32);
        let (b1, b2) = pad_biases(n_experts, geo, up_bias, down_bias);
        let rows = rows::RowWeights::new(dtype, d, h, gated, sources, experts)?;
        Ok(PackedExperts {
            n_experts,
            d,
            h,
            h_pad: geo.h_pad,
            d_pad: geo.d_pad,
            n1: geo.n1,
            k1: geo.k1,
            gated,
            activation,
            store: Store::Rows(rows),
            b1,
            b2,
        })
    }

    /// True when the weights are read in place ([`PackedExperts::from_rows`]), not packed.
    pub fn in_place(&self) -> bool {
        matches!(self.store, Store::Rows(_))
    }

    /// The packed matrices (panel layout only: `run` sends row layouts elsewhere).
    fn panels(&self) -> (&PackedWeights, &PackedWeights) {
        match &self.store {
            Store::Panels { w1, w2 } => (w1, w2),
            Store::Rows(_) => unreachable!("panel kernel on row-layout weights"),
        }
    }

    /// The precision the weights are kept in.
    pub fn dtype(&self) -> WeightDtype {
        match &self.store {
            Store::Panels { w1, .. } => match w1 {
                PackedWeights::F32(_) => WeightDtype::F32,
                PackedWeights::F16(_) => WeightDtype::F16,
                PackedWeights::Bf16(_) => WeightDtype::Bf16,
            },
            Store::Rows(r) => r.dtype,
        }
    }

    /// Bytes of the weights (packed: padding included; in place: the matrices where they lie)
    /// and biases: what the layer's weights take in memory.
    pub fn bytes(&self) -> usize {
        let bias = |b: &Option<Vec<f32>>| b.as_ref().map_or(0, |b| b.len() * 4);
        let weights = match &self.store {
            Store::Panels { w1, w2 } => w1.bytes() + w2.bytes(),
            Store::Rows(r) => r.matrix_bytes(self.d, self.h),
        };
        weights + bias(&self.b1) + bias(&self.b2)
    }

    /// Bytes of one expert's weights (packed: padding included): what a pass streams from
    /// memory for each distinct expert it runs.
    pub fn expert_bytes(&self) -> usize {
        match &self.store {
            Store::Panels { .. } => {
                (self.k1 * self.n1 + self.h_pad * self.d_pad) * self.dtype().bytes()
            }
            Store::Rows(_) => {
                (if self.gated { 3 } else { 2 }) * self.d * self.h * self.dtype().bytes()
            }
        }
    }

    /// Number of experts E.
    pub fn n_experts(&self) -> usize {
        self.n_experts
    }

    /// Model width d.
    pub fn d_model(&self) -> usize {
        self.d
    }

    /// Hidden width h of one expert.
    pub fn hidden(&self) -> usize {
        self.h
    }

    /// True for gated (SwiGLU-style) experts.
    pub fn gated(&self) -> bool {
        self.gated
    }

    /// Multiply-add FLOPs (2 per multiply-add) of one (token, expert) pair, without padding.
    pub fn flops_per_pair(&self) -> usize {
        2 * self.d * self.h * if self.gated { 3 } else { 2 }
    }

    /// Rows of the per-thread scratch block: large enough to reuse each weight panel over many
    /// rows, small enough that the `rows x n1` block stays in L2.
    fn block_rows(&self) -> usize {
        (32 * 1024 / self.n1).clamp(24, 96) / 12 * 12
    }

    /// Expert `e`'s first matrix (`k1` rows per panel) in element type `E`.
    fn w1<E: Elem>(&self, e: usize) -> *const E {
        E::weights(self.panels().0)[e * self.k1 * self.n1..].as_ptr()
    }

    /// Expert `e`'s second matrix (`h_pad` rows per panel) in element type `E`.
    fn w2<E: Elem>(&self, e: usize) -> *const E {
        E::weights(self.panels().1)[e * self.h_pad * self.d_pad..].as_ptr()
    }
}

/// Environment variable with the kernel variants (comma-separated [`KernelVariant::name`]s)
/// the tests must run: [`KernelVariant::testable`] fails instead of skipping one this CPU lacks.
/// CI sets it to the variants its machine has.
pub const REQUIRE_KERNELS_ENV: &str = "XMOE_REQUIRE_KERNELS";

/// Which implementation [`moe_forward`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelVariant {
    /// The fastest exact variant supported here: AVX-512, else AVX2, else portable (never
    /// `Avx512Bf16`, which rounds activations: a model must give the same results on every CPU
    /// unless its user asks otherwise).
    Auto,
    /// Fused kernel in plain Rust; any CPU.
    Portable,
    /// Fused kernel with AVX2 + FMA (x86-64).
    Avx2,
    /// Fused kernel with AVX-512F (x86-64).
    Avx512,
    /// As `Avx512`, and bf16 weights meet bf16-rounded activations in `vdpbf16ps` (AVX-512 BF16;
    /// see the `bf16dot` module): twice the multiply-adds per instruction, activations rounded
    /// as transformers and llama.cpp round them for bf16 weights. f32 and f16 weights run as
    /// under `Avx512`.
    Avx512Bf16,
    /// As `Avx512Bf16`, with the bf16 products on Intel AMX tiles (`tdpbf16ps`; see the `amx`
    /// module) where `d` (and, read in place, `h`) is a multiple of 32.
    Amx,
    /// Gather + two `gemm` crate calls per row block, epilogue with the best SIMD available.
    Gemm,
}

impl KernelVariant {
    /// Every variant except `Auto`, for tests and benchmarks.
    pub const ALL: [KernelVariant; 6] = [
        KernelVariant::Portable,
        KernelVariant::Avx2,
        KernelVariant::Avx512,
        KernelVariant::Avx512Bf16,
        KernelVariant::Amx,
        KernelVariant::Gemm,
    ];

    /// True when this CPU can run the variant (checked at run time).
    pub fn is_supported(self) -> bool {
        match self {
            KernelVariant::Auto | KernelVariant::Portable | KernelVariant::Gemm => true,
            KernelVariant::Avx2 => has_avx2(),
            KernelVariant::Avx512 => has_avx512(),
            KernelVariant::Avx512Bf16 => has_avx512_bf16(),
            KernelVariant::Amx => has_amx(),
        }
    }

    /// The name `XMOE_REQUIRE_KERNELS` and `MOE_BENCH_VARIANT` use: `auto`, `portable`, `avx2`,
    /// `avx512`, `avx512bf16`, `amx`, `gemm`.
    pub fn name(self) -> &'static str {
        match self {
            KernelVariant::Auto => "auto",
            KernelVariant::Portable => "portable",
            KernelVariant::Avx2 => "avx2",
            KernelVariant::Avx512 => "avx512",
            KernelVariant::Avx512Bf16 => "avx512bf16",
            KernelVariant::Amx => "amx",
            KernelVariant::Gemm => "gemm",
        }
    }

    /// The variants of [`KernelVariant::ALL`] this CPU runs, for tests that cover every variant.
    ///
    /// # Panics
    /// When [`REQUIRE_KERNELS_ENV`] names a variant this CPU cannot run, or a name that is no
    /// variant's: a run that asks for a variant must not pass by skipping it.
    pub fn testable() -> Vec<KernelVariant> {
        if let Ok(list) = std::env::var(REQUIRE_KERNELS_ENV) {
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                let v = KernelVariant::ALL
                    .into_iter()
                    .find(|v| v.name() == name)
                    .unwrap_or_else(|| panic!("{REQUIRE_KERNELS_ENV}: unknown variant {name:?}"));
                assert!(
                    v.is_supported(),
                    "{REQUIRE_KERNELS_ENV} requires {name}, which this CPU cannot run"
                );
            }
        }
        KernelVariant::ALL
            .into_iter()
            .filter(|v| v.is_supported())
            .collect()
    }

    /// The concrete variant `Auto` stands for on this CPU (other variants map to themselves).
    pub fn resolve(self) -> KernelVariant {
        match self {
            KernelVariant::Auto if has_avx512() => KernelVariant::Avx512,
            KernelVariant::Auto if has_avx2() => KernelVariant::Avx2,
            KernelVariant::Auto => KernelVariant::Portable,
            v => v,
        }
    }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // F16C (every AVX2 CPU has it) widens f16 weights.
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && has_avx2()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx512()
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `y = x w^T` for `x` `[rows, k]` (f32, rounded to bf16 as [`KernelVariant::Amx`] rounds
/// activations) and a stored bf16 weight `w` `[n, k]`, on AMX tiles over up to `threads`
/// threads, when this CPU runs [`KernelVariant::Amx`], `k` is a multiple of 32 and `n` of 16.
/// Returns false, touching nothing, otherwise.
///
/// # Panics
/// When a slice is shorter than its shape says.
pub fn amx_linear(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[half::bf16],
    n: usize,
    y: &mut [f32],
    threads: usize,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if has_amx() && k.is_multiple_of(32) && n.is_multiple_of(16) {
            amx::linear(x, rows, k, w, n, y, threads);
            return true;
        }
    }
    let _ = (x, rows, k, w, n, y, threads);
    false
}

fn has_amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        amx::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// An output buffer shared by the threads of one kernel call, each writing elements no other
/// thread writes (its own rows, columns or heads), within a scope that ends before the caller's
/// `&mut` borrow of the buffer does.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: the users write disjoint elements and join before the buffer's borrow ends (above).
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Element `i` (a method, so that closures capture the `Send` wrapper, not the pointer).
    pub(crate) fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// Grows `v` to at least `n` elements (scratch that keeps its largest size).
#[cfg(target_arch = "x86_64")]
fn grow<T: Default + Clone>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    }
}

/// One thread's reusable buffers.
#[derive(Default, Debug)]
struct ThreadScratch {
    /// Pre-activation / hidden block, `block_rows x n1`.
    z: Vec<f32>,
    /// Gathered token rows (gemm variant).
    xg: Vec<f32>,
    /// Second-matmul result rows (gemm variant).
    y: Vec<f32>,
    /// One weight panel widened to f32 (gemm variant on half-precision weights).
    wp: Vec<f32>,
    /// Work items: (expert, first pair, end pair).
    items: Vec<(u32, u32, u32)>,
    /// Token rows rounded to bf16 pairs (AVX-512 BF16 variant).
    a16: Vec<u32>,
    /// Hidden rows rounded to bf16 pairs (AVX-512 BF16 variant).
    h16: Vec<u32>,
}

/// Buffers reused across [`moe_forward`] calls (one per calling thread): nothing is allocated once
/// they have grown to the largest pass seen.
#[derive(Debug)]
pub struct MoeScratch {
    threads: Vec<ThreadScratch>,
    /// Per-pair outputs when pairs are split over threads, `pairs x d`.
    pair_out: Vec<f32>,
    /// Pairs per token.
    token_pairs: Vec<u32>,
    /// Passes below this many FLOPs stay on the calling thread (tests lower it to reach the
    /// threaded paths with small shapes).
    pub(crate) par_min_flops: usize,
}

impl Default for MoeScratch {
    fn default() -> Self {
        MoeScratch {
            threads: Vec::new(),
            pair_out: Vec::new(),
            token_pairs: Vec::new(),
            par_min_flops: PAR_MIN_FLOPS,
        }
    }
}

/// Where a thread's results go: its own rows of `out` (indexed by token) or its slice of the
/// per-pair buffer (indexed by pair).
#[derive(Clone, Copy)]
enum Dst {
    Tokens { base: *mut f32, row0: usize },
    Pairs { base: *mut f32, pair0: usize },
}

struct Job<'a> {
    ex: &'a PackedExperts,
    x: &'a [f32],
    groups: &'a ExpertGroups,
}

impl Job<'_> {
    /// Whether AMX tiles pay here: `d` a multiple of 32 (a tile's 32 values), and at least 16
    /// tokens in the pass (a tile's rows; a decode step's lone token runs `vdpbf16ps` instead).
    fn amx_tiles(&self) -> bool {
        self.ex.d.is_multiple_of(32) && self.x.len() >= 16 * self.ex.d
    }

    #[inline(always)]
    fn dst_row(&self, dst: Dst, pair: usize) -> *mut f32 {
        let d = self.ex.d;
        match dst {
            Dst::Tokens { base, row0 } => {
                let t = self.groups.tokens[pair] as usize;
                base.wrapping_add((t - row0) * d)
            }
            Dst::Pairs { base, pair0 } => base.wrapping_add((pair - pair0) * d),
        }
    }
}

/// Runs the MoE layer: `out[t] = sum over (t, e, w) in groups of w * expert_e(x[t])`; rows with no
/// pair get 0. `x` and `out` are `[T, d]` row-major; `threads` caps the threads used (0 or 1: the
/// calling thread only; more: the rayon global pool, only when the pass is large enough).
///
/// # Panics
/// When shapes disagree (`x`/`out` not `T x d`, groups for another E, a token id >= T) or the
/// variant is not supported by this CPU (see [`KernelVariant::is_supported`]).
pub fn moe_forward(
    experts: &PackedExperts,
    x: &[f32],
    groups: &ExpertGroups,
    out: &mut [f32],
    scratch: &mut MoeScratch,
    variant: KernelVariant,
    threads: usize,
) {
    let d = experts.d;
    assert!(d > 0, "d_model must be positive");
    assert_eq!(x.len() % d, 0, "x must be [T, d]");
    assert_eq!(out.len(), x.len(), "out must have the shape of x");
    assert_eq!(
        groups.n_experts(),
        experts.n_experts,
        "groups are for another number of experts"
    );
    let tokens = x.len() / d;
    if let Some(&t) = groups.tokens.iter().max() {
        assert!(
            (t as usize) < tokens,
            "token id {t} out of range 0..{tokens}"
        );
    }
    let variant = variant.resolve();
    assert!(
        variant.is_supported(),
        "kernel variant {variant:?} is not supported by this CPU"
    );
    let job = Job {
        ex: experts,
        x,
        groups,
    };
    let pairs = groups.pairs();
    let flops = pairs * 2 * (d * experts.n1 + experts.h_pad * d);
    let threads = threads.max(1);
    if scratch.threads.len() < threads {
        scratch.threads.resize_with(threads, ThreadScratch::default);
    }
    let min_flops = split::split_from(
        scratch.par_min_flops,
        scratch.par_min_flops.min(POOL_PAR_MIN_FLOPS),
    );

    if threads == 1 || flops < min_flops || pairs < 2 {
        out.fill(0.0);
        let ts = &mut scratch.threads[0];
        plan_tokens(groups, 0, tokens, &mut ts.items);
        let dst = Dst::Tokens {
            base: out.as_mut_ptr(),
            row0: 0,
        };
        run(variant, &job, dst, ts);
    } else if tokens >= threads * MIN_TOKENS_PER_THREAD && !pairs_split_better(groups, d, threads) {
        // Token split: cut points balanced by pairs, so a hot expert does not load one thread.
        let cuts = token_cuts(groups, tokens, threads, &mut scratch.token_pairs);
        let mut rest: &mut [f32] = out;
        let mut chunks = Vec::with_capacity(threads);
        for w in cuts.windows(2) {
            let (a, b) = rest.split_at_mut((w[1] - w[0]) * d);
            chunks.push((w[0], w[1], a));
            rest = b;
        }
        let work: Vec<_> = chunks.into_iter().zip(scratch.threads.iter_mut()).collect();
        let job = &job;
        split::each(work, |((t0, t1, chunk), ts)| {
            token_range(variant, job, t0, t1, chunk, ts);
        });
    } else {
        // Too few tokens to split: split the expert-sorted pairs, one output row per pair, then
        // sum per token in pair (= ascending expert) order, as the serial path does.
        scratch.pair_out.clear();
        scratch.pair_out.resize(pairs * d, 0.0);
        let mut rest: &mut [f32] = &mut scratch.pair_out;
        let mut chunks = Vec::with_capacity(threads);
        for i in 0..threads {
            let (p0, p1) = (pairs * i / threads, pairs * (i + 1) / threads);
            let (a, b) = rest.split_at_mut((p1 - p0) * d);
            chunks.push((p0, p1, a));
            rest = b;
        }
        let work: Vec<_> = chunks.into_iter().zip(scratch.threads.iter_mut()).collect();
        let job = &job;
        split::each(work, |((p0, p1, chunk), ts)| {
            pair_range(variant, job, p0, p1, chunk, ts);
        });
        out.fill(0.0);
        for (p, y) in scratch.pair_out.chunks_exact(d).enumerate() {
            let t = groups.tokens[p] as usize;
            for (o, v) in out[t * d..(t + 1) * d].iter_mut().zip(y) {
                *o += v;
            }
        }
    }
}

/// True when a token split would leave each thread fewer than [`MIN_EXPERT_ROWS_PER_THREAD`]
/// rows of a chosen expert on average and the pair split's rows fit [`PAIR_SPLIT_MAX_BYTES`].
fn pairs_split_better(groups: &ExpertGroups, d: usize, threads: usize) -> bool {
    let pairs = groups.pairs();
    let chosen = (0..groups.n_experts())
        .filter(|&e| groups.offsets[e] < groups.offsets[e + 1])
        .count();
    pairs * d * size_of::<f32>() <= PAIR_SPLIT_MAX_BYTES
        && pairs < chosen * threads * MIN_EXPERT_ROWS_PER_THREAD
}

fn token_range(
    variant: KernelVariant,
    job: &Job,
    t0: usize,
    t1: usize,
    out: &mut [f32],
    ts: &mut ThreadScratch,
) {
    out.fill(0.0);
    plan_tokens(job.groups, t0, t1, &mut ts.items);
    let dst = Dst::Tokens {
        base: out.as_mut_ptr(),
        row0: t0,
    };
    run(variant, job, dst, ts);
}

fn pair_range(
    variant: KernelVariant,
    job: &Job,
    p0: usize,
    p1: usize,
    out: &mut [f32],
    ts: &mut ThreadScratch,
) {
    ts.items.clear();
    let g = job.groups;
    for e in 0..g.n_experts() {
        let lo = (g.offsets[e] as usize).max(p0);
        let hi = (g.offsets[e + 1] as usize).min(p1);
        if lo < hi {
            ts.items.push((e as u32, lo as u32, hi as u32));
        }
    }
    let dst = Dst::Pairs {
        base: out.as_mut_ptr(),
        pair0: p0,
    };
    run(variant, job, dst, ts);
}

/// Work items for tokens `t0..t1`: in each expert's group (tokens ascending) the pairs in range.
fn plan_tokens(g: &ExpertGroups, t0: usize, t1: usize, items: &mut Vec<(u32, u32, u32)>) {
    items.clear();
    for e in 0..g.n_experts() {
        let (toks, _) = g.group(e);
        let lo = toks.partition_point(|&t| (t as usize) < t0);
        let hi = toks.partition_point(|&t| (t as usize) < t1);
        if lo < hi {
            let base = g.offsets[e];
            items.push((e as u32, base + lo as u32, base + hi as u32));
        }
    }
}

/// `threads + 1` token cut points with about the same number of pairs between them.
fn token_cuts(g: &ExpertGroups, tokens: usize, threads: usize, buf: &mut Vec<u32>) -> Vec<usize> {
    buf.clear();
    buf.resize(tokens, 0);
    for &t in &g.tokens {
        buf[t as usize] += 1;
    }
    let total = g.pairs();
    let mut cuts = Vec::with_capacity(threads + 1);
    cuts.push(0);
    let mut acc = 0usize;
    let mut t = 0usize;
    for i in 1..threads {
        let target = total * i / threads;
        while t < tokens && acc + (buf[t] as usize) <= target {
            acc += buf[t] as usize;
            t += 1;
        }
        cuts.push(t.max(cuts[i - 1]));
    }
    cuts.push(tokens);
    cuts
}

fn run(variant: KernelVariant, job: &Job, dst: Dst, ts: &mut ThreadScratch) {
    let rows = job.ex.block_rows();
    let n1 = job.ex.n1;
    if ts.z.len() < rows * n1 {
        ts.z.resize(rows * n1, 0.0);
    }
    match &job.ex.store {
        Store::Panels { w1, .. } => match w1 {
            PackedWeights::F32(_) => run_as::<f32>(variant, job, dst, ts),
            PackedWeights::F16(_) => run_as::<half::f16>(variant, job, dst, ts),
            PackedWeights::Bf16(_) => run_as::<half::bf16>(variant, job, dst, ts),
        },
        Store::Rows(r) => match r.dtype {
            WeightDtype::F32 => rows::run_rows::<f32>(variant, job, r, dst, ts),
            WeightDtype::F16 => rows::run_rows::<half::f16>(variant, job, r, dst, ts),
            WeightDtype::Bf16 => rows::run_rows::<half::bf16>(variant, job, r, dst, ts),
        },
    }
}

/// [`run`] with the weights' element type fixed (`E` is the type of `job.ex`'s weights).
fn run_as<E: Elem>(variant: KernelVariant, job: &Job, dst: Dst, ts: &mut ThreadScratch) {
    let rows = job.ex.block_rows();
    match variant {
        // SAFETY: the CPU has the features this variant's intrinsics need: `moe_forward` asserts
        // `variant.is_supported()` before it calls `run`. `ts.z` was sized for a block in `run`,
        // `E` is the weights' type (`run` matched it), and `moe_forward` checked the shapes and
        // token ids that bound every pointer the kernel forms (see `fused_items`).
        #[cfg(target_arch = "x86_64")]
        KernelVariant::Avx512 => unsafe { run_avx512::<E>(job, dst, ts) },
        // SAFETY: as for the AVX-512 arm; `is_supported` also covered AVX-512BW and BF16, and
        // `E` is bf16, so `job.ex` holds bf16 panels.
        #[cfg(target_arch = "x86_64")]
        KernelVariant::Avx512Bf16 if E::DTYPE == WeightDtype::Bf16 => unsafe {
            bf16dot::run_panels(job, dst, ts)
        },
        // SAFETY: as for the AVX-512 BF16 arm; `is_supported` also covered AMX (and the OS's
        // grant), and `d` is a multiple of 32, as the tiles need.
        #[cfg(target_arch = "x86_64")]
        KernelVariant::Amx if E::DTYPE == WeightDtype::Bf16 && job.amx_tiles() => unsafe {
            amx::run_panels(job, dst, ts)
        },
        // SAFETY: as for the AVX-512 BF16 arm (AMX implies AVX-512 BF16 here).
        #[cfg(target_arch = "x86_64")]
        KernelVariant::Amx if E::DTYPE == WeightDtype::Bf16 => unsafe {
            bf16dot::run_panels(job, dst, ts)
        },
        // SAFETY: as for the AVX-512 arm (f32 and f16 weights run the AVX-512 kernel).
        #[cfg(target_arch = "x86_64")]
        KernelVariant::Avx512Bf16 | KernelVariant::Amx => unsafe { run_avx512::<E>(job, dst, ts) },
        // SAFETY: as for the AVX-512 arm: `is_supported` was asserted; the same bounds hold.
        #[cfg(target_arch = "x86_64")]
        KernelVariant::Avx2 => unsafe { run_avx2::<E>(job, dst, ts) },
        KernelVariant::Gemm => {
            let (d, d_pad) = (job.ex.d, job.ex.d_pad);
            if ts.xg.len() < rows * d {
                ts.xg.resize(rows * d, 0.0);
            }
            if ts.y.len() < rows * d_pad {
                ts.y.resize(rows * d_pad, 0.0);
            }
            // gemm reads f32 panels: half-precision weights are widened one panel at a time.
            let panel = PANEL * job.ex.k1.max(job.ex.h_pad);
            if E::DTYPE != WeightDtype::F32 && ts.wp.len() < panel {
                ts.wp.resize(panel, 0.0);
            }
            #[cfg(target_arch = "x86_64")]
            {
                if has_avx512() {
                    // SAFETY: `has_avx512()` just checked the entry point's features; `ts.xg`,
                    // `ts.y` and `ts.wp` were sized above, `ts.z` in `run` (bounds: see
                    // `gemm_items`).
                    return unsafe { run_gemm_avx512::<E>(job, dst, ts) };
                }
                if has_avx2() {
                    // SAFETY: `has_avx2()` just checked the entry point's features; buffers as
                    // above.
                    return unsafe { run_gemm_avx2::<E>(job, dst, ts) };
                }
            }
            // SAFETY: `Portable` needs no CPU feature; buffers sized above (bounds: see
            // `gemm_items`).
            unsafe { gemm_items::<Portable, E>(job, dst, ts) }
        }
        // 2 rows: 8 accumulator [f32; 8] values, which fit the 32 128-bit registers of NEON and
        // spill less on SSE2's 16 than 4 rows did.
        // SAFETY: `Portable` needs no CPU feature; `ts.z` sized in `run` (bounds: see
        // `fused_items`).
        _ => unsafe { fused_items::<Portable, E, 2, 4>(job, dst, ts) },
    }
}

// The entry points carry the target features; everything below them is `#[inline(always)]` so the
// intrinsics are compiled with those features in one function body.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn run_avx512<E: Elem>(job: &Job, dst: Dst, ts: &mut ThreadScratch) {
    // 12 rows x 2 registers = 24 of the 32 zmm registers as accumulators.
    // SAFETY: this function enables what `Avx512` uses; the caller (`run`) checked the CPU
    // has it and upholds `fused_items`'s bounds.
    unsafe { fused_items::<Avx512, E, 12, 2>(job, dst, ts) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_avx2<E: Elem>(job: &Job, dst: Dst, ts: &mut ThreadScratch) {
    // 2 rows x 4 registers = 8 accumulators + 4 panel registers + 1 broadcast of the 16 ymm
    // registers; 3 rows (12 accumulators, 17 live registers) spilled and ran at half the speed.
    // SAFETY: this function enables what `Avx2` uses; the caller (`run`) checked the CPU has
    // it and upholds `fused_items`'s bounds.
    unsafe { fused_items::<Avx2, E, 2, 4>(job, dst, ts) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn run_gemm_avx512<E: Elem>(job: &Job, dst: Dst, ts: &mut ThreadScratch) {
    // SAFETY: this function enables what `Avx512` uses; `run` checked `has_avx512()` and
    // upholds `gemm_items`'s bounds.
    unsafe { gemm_items::<Avx512, E>(job, dst, ts) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_gemm_avx2<E: Elem>(job: &Job, dst: Dst, ts: &mut ThreadScratch) {
    // SAFETY: this function enables what `Avx2` uses; `run` checked `has_avx2()` and upholds
    // `gemm_items`'s bounds.
    unsafe { gemm_items::<Avx2, E>(job, dst, ts) }
}

/// A weight element type the micro-kernel reads: how a panel is multiplied and widened.
///
/// Every implementation runs the k loop in order with one FMA per (k, element), so the result
/// is the same, bit for bit, as the f32 kernel's on the widened weights.
trait Elem: ExpertWeight {
    /// The packed matrices in this type (`run` matched the storage before choosing `Self`).
    fn weights(w: &PackedWeights) -> &[Self];

    /// `acc[i][v] = sum_k a[i][k] * b[k][v * W ..]` over one 32-column panel of `k` rows (stored
    /// as this type lays panels out): M rows by `NV * W` = 32 columns.
    ///
    /// # Safety
    /// Each `a[i]` has `k` readable floats, `b` is the start of a panel with `k` rows (rounded up
    /// to this type's row step), and the caller enabled the features `S` needs.
    unsafe fn tile<S: Simd, const M: usize, const NV: usize>(
        a: &[*const f32; M],
        b: *const Self,
        k: usize,
    ) -> [[S::V; NV]; M];

    /// Panels `b` and `b + stride` (elements) for one row at once: twice the independent FMA
    /// chains of [`Elem::tile`], for the one-token tiles of a decode step, which are otherwise
    /// bound by the FMA latency. Each element sees the same FMAs in the same order as in
    /// `tile`, so the result is the same, bit for bit.
    ///
    /// # Safety
    /// As for [`Elem::tile`] with `M = 1`, for both panels.
    #[inline(always)]
    unsafe fn tile_pair<S: Simd, const NV: usize>(
        a: *const f32,
        b: *const Self,
        stride: usize,
        k: usize,
    ) -> [[S::V; NV]; 2] {
        // SAFETY: forwarded from the caller.
        unsafe {
            [
                Self::tile::<S, 1, NV>(&[a], b, k)[0],
                Self::tile::<S, 1, NV>(&[a], b.add(stride), k)[0],
            ]
        }
    }

    /// Widens a panel of `k` rows into `out` as plain f32 `[k][32]` (the gemm variant).
    fn widen_panel(b: &[Self], k: usize, out: &mut [f32]);
}

/// A weight type whose panels store one row of 32 values after another (f32, f16; bf16 pairs
/// rows), so a row's `W` values load as one vector.
trait RowPanel: Elem {
    /// `S::W` consecutive values at `p`, widened.
    ///
    /// # Safety
    /// `p` points to `S::W` readable values and the CPU has what `S` needs.
    unsafe fn load_row<S: Simd>(p: *const Self) -> S::V;
}

impl RowPanel for f32 {
    #[inline(always)]
    unsafe fn load_row<S: Simd>(p: *const f32) -> S::V {
        // SAFETY: forwarded from the caller.
        unsafe { S::load(p) }
    }
}

impl RowPanel for half::f16 {
    #[inline(always)]
    unsafe fn load_row<S: Simd>(p: *const half::f16) -> S::V {
        // SAFETY: forwarded from the caller.
        unsafe { S::load_f16(p.cast()) }
    }
}

/// [`Elem::tile_pair`] for row-by-row panels: both panels' rows `kk` multiplied by the same
/// broadcast value, one FMA per element per row, in row order.
///
/// # Safety
/// As for [`Elem::tile`] with `M = 1`, for the panels at `b` and `b + stride`.
#[inline(always)]
unsafe fn tile_pair_rows<S: Simd, E: RowPanel, const NV: usize>(
    a: *const f32,
    b: *const E,
    stride: usize,
    k: usize,
) -> [[S::V; NV]; 2] {
    // SAFETY: `a` has `k` readable floats and each panel `k` rows of 32 values (the caller).
    unsafe {
        let mut acc = [[S::zero(); NV]; 2];
        let (mut p0, mut p1) = (b, b.add(stride));
        for kk in 0..k {
            let av = S::splat(*a.add(kk));
            let [acc0, acc1] = &mut acc;
            for (v, (x0, x1)) in acc0.iter_mut().zip(acc1.iter_mut()).enumerate() {
                *x0 = S::fma(av, E::load_row::<S>(p0.add(v * S::W)), *x0);
                *x1 = S::fma(av, E::load_row::<S>(p1.add(v * S::W)), *x1);
            }
            p0 = p0.add(PANEL);
            p1 = p1.add(PANEL);
        }
        acc
    }
}

impl Elem for f32 {
    fn weights(w: &PackedWeights) -> &[Self] {
        match w {
            PackedWeights::F32(v) => v,
            _ => unreachable!("f32 kernel on {:?} weights", std::mem::discriminant(w)),
        }
    }

    #[inline(always)]
    unsafe fn tile<S: Simd, const M: usize, const NV: usize>(
        a: &[*const f32; M],
        b: *const f32,
        k: usize,
    ) -> [[S::V; NV]; M] {
        // SAFETY: the caller guarantees each `a[i]` has `k` readable floats and `b` `k` rows of
        // 32 readable floats (a weight panel, zero padded in `PackedExperts::new`).
        unsafe {
            let mut acc = [[S::zero(); NV]; M];
            let mut bp = b;
            for kk in 0..k {
                let mut bv = [S::zero(); NV];
                for (v, b) in bv.iter_mut().enumerate() {
                    *b = S::load(bp.add(v * S::W));
                }
                for i in 0..M {
                    let av = S::splat(*a[i].add(kk));
                    for v in 0..NV {
                        acc[i][v] = S::fma(av, bv[v], acc[i][v]);
                    }
                }
                bp = bp.add(PANEL);
            }
            acc
        }
    }

    #[inline(always)]
    unsafe fn tile_pair<S: Simd, const NV: usize>(
        a: *const f32,
        b: *const f32,
        stride: usize,
        k: usize,
    ) -> [[S::V; NV]; 2] {
        // SAFETY: forwarded from the caller.
        unsafe { tile_pair_rows::<S, Self, NV>(a, b, stride, k) }
    }

    fn widen_panel(b: &[Self], k: usize, out: &mut [f32]) {
        out[..k * PANEL].copy_from_slice(&b[..k * PANEL]);
    }
}

impl Elem for half::f16 {
    fn weights(w: &PackedWeights) -> &[Self] {
        match w {
            PackedWeights::F16(v) => v,
            _ => unreachable!("f16 kernel on {:?} weights", std::mem::discriminant(w)),
        }
    }

    #[inline(always)]
    unsafe fn tile<S: Simd, const M: usize, const NV: usize>(
        a: &[*const f32; M],
        b: *const half::f16,
        k: usize,
    ) -> [[S::V; NV]; M] {
        // SAFETY: as for f32, with panels of 32 half-precision values per row.
        unsafe {
            let mut acc = [[S::zero(); NV]; M];
            let mut bp = b.cast::<u16>();
            for kk in 0..k {
                let mut bv = [S::zero(); NV];
                for (v, b) in bv.iter_mut().enumerate() {
                    *b = S::load_f16(bp.add(v * S::W));
                }
                for i in 0..M {
                    let av = S::splat(*a[i].add(kk));
                    for v in 0..NV {
                        acc[i][v] = S::fma(av, bv[v], acc[i][v]);
                    }
                }
                bp = bp.add(PANEL);
            }
            acc
        }
    }

    #[inline(always)]
    unsafe fn tile_pair<S: Simd, const NV: usize>(
        a: *const f32,
        b: *const half::f16,
        stride: usize,
        k: usize,
    ) -> [[S::V; NV]; 2] {
        // SAFETY: forwarded from the caller.
        unsafe { tile_pair_rows::<S, Self, NV>(a, b, stride, k) }
    }

    fn widen_panel(b: &[Self], k: usize, out: &mut [f32]) {
        for (o, w) in out[..k * PANEL].iter_mut().zip(b) {
            *o = w.to_f32();
        }
    }
}

impl Elem for half::bf16 {
    fn weights(w: &PackedWeights) -> &[Self] {
        match w {
            PackedWeights::Bf16(v) => v,
            _ => unreachable!("bf16 kernel on {:?} weights", std::mem::discriminant(w)),
        }
    }

    #[inline(always)]
    unsafe fn tile<S: Simd, const M: usize, const NV: usize>(
        a: &[*const f32; M],
        b: *const half::bf16,
        k: usize,
    ) -> [[S::V; NV]; M] {
        // SAFETY: `b` is a pair-interleaved panel (`panel_pair_at`) of `round_up(k, 2)` rows: each
        // step reads 2 rows x 32 columns = 64 values; `a[i]` is read at `kk + 1 < k` only.
        unsafe {
            let mut acc = [[S::zero(); NV]; M];
            let mut bp = b.cast::<u16>();
            let mut kk = 0;
            while kk + 1 < k {
                let mut bv = [(S::zero(), S::zero()); NV];
                for (v, b) in bv.iter_mut().enumerate() {
                    *b = S::load_bf16_pairs(bp.add(v * 2 * S::W));
                }
                for i in 0..M {
                    let a0 = S::splat(*a[i].add(kk));
                    let a1 = S::splat(*a[i].add(kk + 1));
                    for v in 0..NV {
                        acc[i][v] = S::fma(a1, bv[v].1, S::fma(a0, bv[v].0, acc[i][v]));
                    }
                }
                bp = bp.add(2 * PANEL);
                kk += 2;
            }
            if kk < k {
                // Odd k: the last pair's second row is padding, and `a[i][k]` is past the row.
                let mut bv = [(S::zero(), S::zero()); NV];
                for (v, b) in bv.iter_mut().enumerate() {
                    *b = S::load_bf16_pairs(bp.add(v * 2 * S::W));
                }
                for i in 0..M {
                    let a0 = S::splat(*a[i].add(kk));
                    for v in 0..NV {
                        acc[i][v] = S::fma(a0, bv[v].0, acc[i][v]);
                    }
                }
            }
            acc
        }
    }

    fn widen_panel(b: &[Self], k: usize, out: &mut [f32]) {
        for kk in 0..k {
            for c in 0..PANEL {
                out[kk * PANEL + c] = b[panel_pair_at(0, kk, c)].to_f32();
            }
        }
    }
}

/// First matmul for rows `r0..r0+M` of the block: gathered token rows times all `w1` panels.
#[inline(always)]
unsafe fn mm1_rows<S: Simd, E: Elem, const M: usize, const NV: usize>(
    job: &Job,
    e: usize,
    pair0: usize,
    r0: usize,
    z: *mut f32,
) {
    let ex = job.ex;
    let (d, n1) = (ex.d, ex.n1);
    let xp = job.x.as_ptr();
    let a: [*const f32; M] = std::array::from_fn(|i| {
        let t = job.groups.tokens[pair0 + r0 + i] as usize;
        xp.wrapping_add(t * d)
    });
    let (w1, k1) = (ex.w1::<E>(e), ex.k1);
    let mut p = 0;
    while p < n1 {
        // SAFETY: each `a[i]` is a token row of `x` (token ids < T, asserted in `moe_forward`),
        // `d` floats; panel `p` of `w1(e)` has `k1 >= d` rows of 32 values (`n1` is a multiple of 32); `z` has
        // `block_rows() * n1` floats (sized in `run`) and `r0 + i < m <= block_rows()`. The pair
        // path reads panels `p` and `p + PANEL < n1`, each `k1` rows apart.
        unsafe {
            if M == 1 && p + PANEL < n1 {
                let acc = E::tile_pair::<S, NV>(a[0], w1.add(p * k1), PANEL * k1, d);
                for (half, row) in acc.iter().enumerate() {
                    for (v, &r) in row.iter().enumerate() {
                        S::store(z.add(r0 * n1 + p + half * PANEL + v * S::W), r);
                    }
                }
                p += 2 * PANEL;
                continue;
            }
            let acc = E::tile::<S, M, NV>(&a, w1.add(p * k1), d);
            for (i, row) in acc.iter().enumerate() {
                for (v, &r) in row.iter().enumerate() {
                    S::store(z.add((r0 + i) * n1 + p + v * S::W), r);
                }
            }
        }
        p += PANEL;
    }
}

/// Second matmul for rows `r0..r0+M`: hidden rows times `w2`, plus `w * down_bias`, added into
/// the destination rows.
#[inline(always)]
unsafe fn mm2_rows<S: Simd, E: Elem, const M: usize, const NV: usize>(
    job: &Job,
    e: usize,
    pair0: usize,
    r0: usize,
    z: *const f32,
    dst: Dst,
) {
    let ex = job.ex;
    let (d, d_pad, n1) = (ex.d, ex.d_pad, ex.n1);
    let a: [*const f32; M] = std::array::from_fn(|i| z.wrapping_add((r0 + i) * n1));
    let out: [*mut f32; M] = std::array::from_fn(|i| job.dst_row(dst, pair0 + r0 + i));
    let w: [f32; M] = std::array::from_fn(|i| job.groups.weights[pair0 + r0 + i]);
    let w2 = ex.w2::<E>(e);
    let b2 = ex.b2.as_ref().map(|b| b[e * d_pad..].as_ptr());
    let mut q = 0;
    while q < d_pad {
        // SAFETY: `a[i]` is a row of the `z` block (`h_pad` floats of its `n1`); panel `q` of
        // `w2(e)` has `h_pad` rows of 32 floats; `out[i]` is a destination row of `d` floats (see
        // `Job::dst_row`), and `accumulate` touches only `d - col` of them; `b2` has `d_pad` floats from
        // `e * d_pad`. The pair path reads panels `q` and `q + PANEL < d_pad`, `h_pad` rows apart.
        unsafe {
            let (acc, panels): ([[S::V; NV]; 2], usize) = if M == 1 && q + PANEL < d_pad {
                let pair =
                    E::tile_pair::<S, NV>(a[0], w2.add(q * ex.h_pad), PANEL * ex.h_pad, ex.h_pad);
                (pair, 2)
            } else {
                let one = E::tile::<S, M, NV>(&a, w2.add(q * ex.h_pad), ex.h_pad);
                for (i, row) in one.iter().enumerate() {
                    for (v, &r) in row.iter().enumerate() {
                        let col = q + v * S::W;
                        if col >= d {
                            break;
                        }
                        accumulate::<S>(out[i].add(col), r, w[i], b2.map(|b| b.add(col)), d - col);
                    }
                }
                q += PANEL;
                continue;
            };
            for (half, row) in acc.iter().enumerate().take(panels) {
                for (v, &r) in row.iter().enumerate() {
                    let col = q + half * PANEL + v * S::W;
                    if col >= d {
                        break;
                    }
                    accumulate::<S>(out[0].add(col), r, w[0], b2.map(|b| b.add(col)), d - col);
                }
            }
            q += panels * PANEL;
        }
    }
}

/// `dst[..] += acc + w * bias[..]` for the first `min(valid, W)` lanes.
#[inline(always)]
unsafe fn accumulate<S: Simd>(
    dst: *mut f32,
    mut acc: S::V,
    w: f32,
    bias: Option<*const f32>,
    valid: usize,
) {
    // SAFETY: the caller guarantees `dst` has `min(valid, W)` writable floats and `bias`, if
    // any, `W` readable floats (bias rows are padded to `d_pad`); `tmp` holds 16 >= W floats.
    unsafe {
        if let Some(b) = bias {
            acc = S::fma(S::splat(w), S::load(b), acc);
        }
        if valid >= S::W {
            S::store(dst, S::add(S::load(dst), acc));
        } else {
            let mut tmp = [0.0f32; 16];
            S::store(tmp.as_mut_ptr(), acc);
            for (l, &t) in tmp[..valid].iter().enumerate() {
                *dst.add(l) += t;
            }
        }
    }
}

/// Hidden epilogue on rows `0..m` of the block: `z[r][j] = w_r * act(gate + ...)`: bias, activation,
/// gating and the routing weight, in place (the hidden lands in the first `h_pad` columns).
#[inline(always)]
unsafe fn hidden<S: Simd>(job: &Job, e: usize, pair0: usize, m: usize, z: *mut f32) {
    let ex = job.ex;
    let (h_pad, n1) = (ex.h_pad, ex.n1);
    let b1 = ex.b1.as_ref().map(|b| b[e * h_pad..].as_ptr());
    let act = ex.activation;
    for r in 0..m {
        // SAFETY: `splat` only needs the feature the caller's entry point enabled; `pair0 + r`
        // is a pair of this block (`m <= hi - pair0`).
        let w = unsafe { S::splat(job.groups.weights[pair0 + r]) };
        let row = z.wrapping_add(r * n1);
        for j in (0..h_pad).step_by(S::W) {
            // SAFETY: row `r < m` of the `z` block has `n1` floats, and `j + W <= h_pad` (a multiple
            // of 32), so `row.add(j)` and `row.add(h_pad + j)` (gated: `n1 = 2 * h_pad`) load in bounds;
            // `b1` has `h_pad` floats from `e * h_pad`.
            unsafe {
                let up_at = if ex.gated {
                    row.add(h_pad + j)
                } else {
                    row.add(j)
                };
                let mut u = S::load(up_at);
                if let Some(b) = b1 {
                    u = S::add(u, S::load(b.add(j)));
                }
                let hv = if ex.gated {
                    S::mul(S::act(act, S::load(row.add(j))), u)
                } else {
                    S::act(act, u)
                };
                S::store(row.add(j), S::mul(hv, w));
            }
        }
    }
}

/// Runs `f::<S, M, NV>(.., r0, ..)` over rows `0..m` in tiles of `MR` rows, then 4, 2 and 1 for the
/// remainder (const generics need a literal per tile height).
macro_rules! row_tiles {
    ($m:expr, $mr:ident, $r0:ident => $f:ident::<$s:ident, $e:ident, _, $nv:ident>($($arg:expr),*)) => {{
        let m = $m;
        let mut $r0 = 0usize;
        while $r0 + $mr <= m {
            $f::<$s, $e, $mr, $nv>($($arg),*);
            $r0 += $mr;
        }
        while $r0 + 4 <= m {
            $f::<$s, $e, 4, $nv>($($arg),*);
            $r0 += 4;
        }
        while $r0 + 2 <= m {
            $f::<$s, $e, 2, $nv>($($arg),*);
            $r0 += 2;
        }
        while $r0 < m {
            $f::<$s, $e, 1, $nv>($($arg),*);
            $r0 += 1;
        }
    }};
}

#[inline(always)]
unsafe fn fused_items<S: Simd, E: Elem, const MR: usize, const NV: usize>(
    job: &Job,
    dst: Dst,
    ts: &mut ThreadScratch,
) {
    debug_assert_eq!(NV * S::W, PANEL);
    let block = job.ex.block_rows();
    let z = ts.z.as_mut_ptr();
    for &(e, lo, hi) in &ts.items {
        let (e, lo, hi) = (e as usize, lo as usize, hi as usize);
        let mut b0 = lo;
        while b0 < hi {
            let m = (hi - b0).min(block);
            // SAFETY: the work items come from `plan_tokens` / `pair_range`, so every pair in
            // `b0..b0 + m` is in this thread's destination (`dst`), and `m <= block_rows()`, the rows `z`
            // was sized for in `run`; the pointer bounds of each step are stated where they are formed.
            unsafe {
                row_tiles!(m, MR, r0 => mm1_rows::<S, E, _, NV>(job, e, b0, r0, z));
                hidden::<S>(job, e, b0, m, z);
                row_tiles!(m, MR, r0 => mm2_rows::<S, E, _, NV>(job, e, b0, r0, z, dst));
            }
            b0 += m;
        }
    }
}

#[inline(always)]
unsafe fn gemm_items<S: Simd, E: Elem>(job: &Job, dst: Dst, ts: &mut ThreadScratch) {
    let ex = job.ex;
    let (d, d_pad, n1, h_pad, k1) = (ex.d, ex.d_pad, ex.n1, ex.h_pad, ex.k1);
    let (w1_all, w2_all) = (E::weights(ex.panels().0), E::weights(ex.panels().1));
    let wide = E::DTYPE != WeightDtype::F32;
    let block = ex.block_rows();
    let z = ts.z.as_mut_ptr();
    let xg = ts.xg.as_mut_ptr();
    let y = ts.y.as_mut_ptr();
    for &(e, lo, hi) in &ts.items {
        let (e, lo, hi) = (e as usize, lo as usize, hi as usize);
        let b2 = ex.b2.as_ref().map(|b| b[e * d_pad..].as_ptr());
        let mut b0 = lo;
        while b0 < hi {
            let m = (hi - b0).min(block);
            // SAFETY: as in `fused_items`; in addition `xg` holds `block_rows() * d` and `y`
            // `block_rows() * d_pad` floats (sized in `run`), every `gemm` call stays within `m` rows and one
            // 32-column panel, and `y`'s rows are `d_pad` wide so the `W`-lane loads at `col < d` are in
            // bounds.
            unsafe {
                for r in 0..m {
                    let t = job.groups.tokens[b0 + r] as usize;
                    std::ptr::copy_nonoverlapping(job.x.as_ptr().add(t * d), xg.add(r * d), d);
                }
                // z = xg @ w1, one call per 32-column panel (read_dst false: dst = beta * lhs @ rhs).
                for p in (0..n1).step_by(PANEL) {
                    let panel = if wide {
                        let at = e * k1 * n1 + p * k1;
                        E::widen_panel(&w1_all[at..at + k1 * PANEL], d, &mut ts.wp);
                        ts.wp.as_ptr()
                    } else {
                        ex.w1::<f32>(e).add(p * d)
                    };
                    gemm::gemm(
                        m,
                        PANEL,
                        d,
                        z.add(p),
                        1,
                        n1 as isize,
                        false,
                        xg,
                        1,
                        d as isize,
                        panel,
                        1,
                        PANEL as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                hidden::<S>(job, e, b0, m, z);
                for q in (0..d_pad).step_by(PANEL) {
                    let panel = if wide {
                        let at = e * h_pad * d_pad + q * h_pad;
                        E::widen_panel(&w2_all[at..at + h_pad * PANEL], h_pad, &mut ts.wp);
                        ts.wp.as_ptr()
                    } else {
                        ex.w2::<f32>(e).add(q * h_pad)
                    };
                    gemm::gemm(
                        m,
                        PANEL,
                        h_pad,
                        y.add(q),
                        1,
                        d_pad as isize,
                        false,
                        z,
                        1,
                        n1 as isize,
                        panel,
                        1,
                        PANEL as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                for r in 0..m {
                    let w = job.groups.weights[b0 + r];
                    let out = job.dst_row(dst, b0 + r);
                    for col in (0..d).step_by(S::W) {
                        let acc = S::load(y.add(r * d_pad + col));
                        accumulate::<S>(out.add(col), acc, w, b2.map(|b| b.add(col)), d - col);
                    }
                }
            }
            b0 += m;
        }
    }
}
