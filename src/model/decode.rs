//! The lean decode path: one token with a KV cache, on plain f32 buffers.
//!
//! # Why
//! Decoding one token runs every dense part of the model on a single row. Through candle each of
//! those tiny ops (a norm, a projection, a reshape, the KV-cache concatenation, a softmax over a
//! few keys) allocates a tensor and goes through a generic dispatch; on the embedded model that
//! fixed cost was about 25 times the arithmetic (186 us per token for about 7 us of FLOPs, issue
//! 15). Here a step reads the weights where the model already keeps them (the candle tensors'
//! storage, through a read guard per matrix: nothing is copied but the small vectors), writes into
//! buffers that live in the [`KvCache`](super::KvCache) and are reused every step, keeps the KV
//! cache as one `Vec<f32>` per layer (position-major, appended in place), and runs the routed
//! experts through the same CPU kernel as a full pass (`T = 1`). Routing is
//! [`crate::routing::route_with`], unchanged: the policy sees the same logits a full pass would.
//!
//! # When it is used
//! [`LeanDecoder::build`] decides once, at load, from the blocks the architecture file assembled:
//! a CPU model whose every part is covered (f32 / f16 / bf16 weights, multi-head or grouped-query
//! attention with rotary or learned positions, q/k norms, sliding windows and sinks, DeepSeek's
//! multi-head latent attention (Hugging Face's `kv_b_proj` or llama.cpp's split `attn_k_b` /
//! `attn_v_b`, run absorbed: see [`LeanDecoder::latent_attention`]), dense or MoE feed-forwards
//! with the experts on the CPU kernel, shared experts, any [`crate::routing::Router`]) decodes
//! here; anything else (a GPU, GGUF-quantised weights, experts on the candle path) keeps the
//! candle path, and [`DecodePath::Candle`] says why. `xmoe-top inspect` and `xmoe-top bench`
//! print it.
//!
//! # Threads
//! A step splits its large products (weights of [`POOL_SPLIT_MIN_BYTES`] or more, the routed
//! experts from eight of the embedded model's, attention over long contexts) over the rayon
//! pool. The model's thread is a pool thread (`model::on_pool`), from which a split costs about a
//! microsecond (`kernel::split`); from any other thread the larger sizes of full passes
//! apply. Splits give the unsplit result bit for bit.
//!
//! Latent attention caches what the candle path caches (per position the normalised latent and
//! the rotated shared key), so the cache changes hands between the paths as for plain attention.
//!
//! # Numerics
//! Products accumulate in f32, as candle's do, but in another order: logits agree with the candle
//! path to float rounding (tests/decode.rs states the tolerance), not bit for bit.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Storage, Tensor};

use super::blocks::linear::matvec_stored;
use super::blocks::{
    AttentionParts, Block, BlockAttention, BlockFfn, Embedding, LatentKv, LatentQuery, LatentView,
    Linear, LinearWeight, Norm, QkNorm, Rotary,
};
use super::config::{Combine, MlaShape};
use super::forward::RoutingConfig;
use super::quant::QuantMatrix;
use super::trace::ForwardTrace;
use crate::kernel::Activation;
use crate::kernel::KernelVariant;
use crate::kernel::attention::{DecodeShape, attend_one, scores_len};
use crate::kernel::matvec::{MatvecWeight, matvec_rows, matvec_rows_split, matvec_t};
use crate::kernel::split;
use crate::routing::route_with;

/// Which code decodes one token with a KV cache, decided once when the model is loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodePath {
    /// The lean path of this module.
    Lean,
    /// Candle ops, as a full pass; `reason` says which part of the model the lean path lacks.
    Candle {
        /// The first part of the model the lean path does not cover.
        reason: String,
    },
}

impl std::fmt::Display for DecodePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodePath::Lean => write!(f, "lean (plain f32 buffers, CPU kernel experts)"),
            DecodePath::Candle { reason } => write!(f, "candle ({reason})"),
        }
    }
}

/// A norm's vectors, copied (they are `d` floats).
struct NormW {
    w: Vec<f32>,
    b: Option<Vec<f32>>,
    eps: f32,
}

impl NormW {
    fn new(n: &Norm) -> Result<Self> {
        let (w, b, eps) = n.parts();
        Ok(Self {
            w: host_vec(w)?,
            b: b.map(host_vec).transpose()?,
            eps,
        })
    }

    /// `out = norm(x)` over the whole slice (LayerNorm with a bias, RMSNorm without), with the
    /// full pass's formulas: candle-nn's LayerNorm (one pass, `var = E[x^2] - mean^2`; the
    /// two-pass variance differs by enough rounding to move the embedded model's logits by 5e-5)
    /// and [`crate::kernel::norm`]'s RMSNorm.
    fn apply(&self, x: &[f32], out: &mut [f32]) {
        let n = x.len() as f32;
        match &self.b {
            Some(b) => {
                let (mut sum, mut sum2) = (0.0f32, 0.0f32);
                for &v in x {
                    sum += v;
                    sum2 += v * v;
                }
                let mean = sum / n;
                let var = sum2 / n - mean * mean;
                let inv_std = (var + self.eps).sqrt().recip();
                for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(&self.w).zip(b) {
                    *o = (v - mean) * inv_std * w + b;
                }
            }
            None => crate::kernel::norm::rms_norm_row(x, &self.w, self.eps, out),
        }
    }

    /// Normalises `x` in place, in chunks of `self.w.len()` (one per head for a per-head norm).
    fn apply_in_place(&self, x: &mut [f32], tmp: &mut [f32]) {
        let n = self.w.len();
        for chunk in x.chunks_exact_mut(n) {
            tmp[..n].copy_from_slice(chunk);
            self.apply(&tmp[..n], chunk);
        }
    }
}

/// A projection: the weight stays in the model's tensor (read through a guard each step), the
/// bias is copied.
struct Proj {
    w: Tensor,
    /// `[in, out]` f32 (true) or `[out, in]` in its stored dtype (false).
    transposed: bool,
    b: Option<Vec<f32>>,
    n_in: usize,
    n_out: usize,
    /// `[out, in]` f16 copy of a transposed f32 weight whose every value is an f16 (a model
    /// stored in f16 and widened at load): half the bytes per step, the same products.
    half: Option<Vec<half::f16>>,
}

/// A stored-layout weight of at least this many bytes is multiplied on every rayon thread when
/// the caller is outside the pool. `xmoe-top bench`'s "Splitting" table times each size twice:
/// repeated (the weight stays in the caches, as a small model's do) and from memory (a cycle over
/// copies 4x the L3, as a large model's decode step reads them). From memory, splitting gained
/// 1.43x at 1 MB and 1.6x from 8.4 MB up on a quiet machine; in cache, 1 MB lost (0.90x) and
/// 8.4 MB gained 1.34x (docs/benchmarks.md, "Experts read in place").
pub const SPLIT_MIN_BYTES: usize = 1 << 20;

/// The same for a caller on a pool thread (the lean decoder's, `model::on_pool`), whose split
/// costs about 1 us instead of about 6: a 128 KiB product split ran 1.4x faster in cache and
/// 1.9x from memory at that cost. Smaller ones stay on the calling thread: splitting the embedded
/// model's 32 KiB projections (q, k and v together in one split) made its decode steps slower,
/// not faster (docs/benchmarks.md, "A decode team").
pub const POOL_SPLIT_MIN_BYTES: usize = 128 << 10;

/// Threads a product over `bytes` of weights takes (1: the calling thread alone).
pub(crate) fn split_parts(bytes: usize) -> usize {
    if bytes >= split::split_from(SPLIT_MIN_BYTES, POOL_SPLIT_MIN_BYTES) {
        split::parts()
    } else {
        1
    }
}

impl Proj {
    fn new(l: &Linear, what: &str) -> Result<Self, String> {
        let (w, b) = l.weight_view();
        let (w, transposed) = match w {
            LinearWeight::Transposed(t) => (t, true),
            LinearWeight::Stored(t) => (t, false),
            LinearWeight::Quantized => {
                return Err(format!("{what} has quantised (GGUF) weights"));
            }
        };
        if !w.device().is_cpu() {
            return Err(format!("{what} is not on the CPU"));
        }
        if !w.is_contiguous() {
            return Err(format!("{what}'s weight is not contiguous"));
        }
        let ok_dtype = if transposed {
            w.dtype() == DType::F32
        } else {
            matches!(w.dtype(), DType::F32 | DType::F16 | DType::BF16)
        };
        if !ok_dtype {
            return Err(format!("{what} has {:?} weights", w.dtype()));
        }
        let (a, c) = w.dims2().map_err(|e| format!("{what}: {e}"))?;
        let (n_in, n_out) = if transposed { (a, c) } else { (c, a) };
        let b = b
            .map(host_vec)
            .transpose()
            .map_err(|e| format!("{what}'s bias: {e}"))?;
        if b.as_ref().is_some_and(|b| b.len() != n_out) {
            return Err(format!("{what}'s bias is not [{n_out}]"));
        }
        let half = if transposed {
            exact_half_rows(w, n_in, n_out).map_err(|e| format!("{what}: {e}"))?
        } else {
            None
        };
        Ok(Self {
            w: w.clone(),
            transposed,
            b,
            n_in,
            n_out,
            half,
        })
    }

    /// `y = W x + b`, split over the pool when the weight is large enough for it.
    fn apply(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        if let Some(w) = &self.half {
            let parts = split_parts(std::mem::size_of_val(&w[..]));
            matvec_rows_split(w, &x[..self.n_in], &mut y[..self.n_out], parts);
            self.add_bias(y);
            return Ok(());
        }
        let (x, y) = (&x[..self.n_in], &mut y[..self.n_out]);
        if !self.transposed {
            matvec_stored(&self.w, x, y)?;
        } else {
            let (storage, layout) = self.w.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else {
                bail!("a weight left the CPU");
            };
            let (start, end) = layout
                .contiguous_offsets()
                .context("a weight is not contiguous")?;
            matvec_t(&cpu.as_slice::<f32>()?[start..end], x, y);
        }
        self.add_bias(y);
        Ok(())
    }

    fn add_bias(&self, y: &mut [f32]) {
        if let Some(b) = &self.b {
            for (v, b) in y.iter_mut().zip(b) {
                *v += b;
            }
        }
    }
}

enum QkNormW {
    PerHead { q: NormW, k: NormW },
    Full { q: NormW, k: NormW },
}

struct Attn {
    norm: NormW,
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    /// cos and sin `[max_positions, head_dim / 2]`.
    rope: Option<(Vec<f32>, Vec<f32>)>,
    qk_norm: Option<QkNormW>,
    window: Option<usize>,
    sinks: Option<Vec<f32>>,
}

impl Attn {
    fn new(i: usize, a: AttentionParts<'_>) -> Result<Self, String> {
        let proj = |l: &Linear, name: &str| Proj::new(l, &format!("layer {i} {name}"));
        let rope = a.rotary.map(rope_tables).transpose()?;
        let qk_norm = match a.qk_norm {
            None => None,
            Some(QkNorm::PerHead { q, k }) => Some(QkNormW::PerHead {
                q: norm_w(q, "q norm")?,
                k: norm_w(k, "k norm")?,
            }),
            Some(QkNorm::Full { q, k }) => Some(QkNormW::Full {
                q: norm_w(q, "q norm")?,
                k: norm_w(k, "k norm")?,
            }),
        };
        let attn = Attn {
            norm: norm_w(a.norm, "attention norm")?,
            q: proj(a.q, "q_proj")?,
            k: proj(a.k, "k_proj")?,
            v: proj(a.v, "v_proj")?,
            o: proj(a.o, "o_proj")?,
            n_heads: a.n_heads,
            n_kv_heads: a.n_kv_heads,
            head_dim: a.head_dim,
            rope,
            qk_norm,
            window: a.sliding_window,
            sinks: a.sinks.map(host_vec).transpose().map_err(err("sinks"))?,
        };
        let (qw, kvw) = (a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim);
        if attn.q.n_out != qw || attn.k.n_out != kvw || attn.v.n_out != kvw {
            return Err(format!(
                "layer {i}: projections do not match the head counts"
            ));
        }
        if a.n_kv_heads == 0 || !a.n_heads.is_multiple_of(a.n_kv_heads) {
            return Err(format!(
                "layer {i}: {} heads over {} kv heads",
                a.n_heads, a.n_kv_heads
            ));
        }
        Ok(attn)
    }
}

/// How multi-head latent attention projects its queries.
enum MlaQuery {
    Direct(Proj),
    LowRank { a: Proj, norm: NormW, b: Proj },
}

/// Where each head's value half of the latent-to-key/value weight sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KvLayout {
    /// In Hugging Face's `kv_b_proj` `[heads * (nope + vd), rank]`: head `h`'s value rows follow
    /// its `nope` key rows.
    Joint,
    /// In llama.cpp's `attn_v_b` `[heads * vd, rank]`.
    Split,
}

/// Multi-head latent attention (DeepSeek) on plain slices; see [`LeanDecoder::latent_attention`].
struct Mla {
    norm: NormW,
    q: MlaQuery,
    kv_a: Proj,
    kv_norm: NormW,
    /// The key half of `kv_b` as llama.cpp's `attn_k_b` holds it, `[heads * rank, nope]` (head
    /// `h`'s `[nope, rank]` transposed, rows `h * rank..`), f32 / f16 / bf16.
    k_b: Tensor,
    /// `kv_b_proj` or `attn_v_b` (see [`KvLayout`]), read in place, the same dtype as `k_b`.
    v_b: Tensor,
    layout: KvLayout,
    /// Bytes of `kv_b` a step reads: its key half and its value half.
    kv_b_bytes: usize,
    o: Proj,
    heads: usize,
    rank: usize,
    nope: usize,
    rope: usize,
    vd: usize,
    /// cos and sin `[max_positions, rope / 2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    interleaved: bool,
    scale: f32,
}

/// A float weight matrix the lean path can read in place: on the CPU, contiguous, f32 / f16 /
/// bf16, of `rows x cols`.
fn check_matrix(t: &Tensor, rows: usize, cols: usize, what: &str) -> Result<(), String> {
    if !t.device().is_cpu() {
        return Err(format!("{what} is not on the CPU"));
    }
    if !t.is_contiguous() {
        return Err(format!("{what}'s weight is not contiguous"));
    }
    if !matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        return Err(format!("{what} has {:?} weights", t.dtype()));
    }
    match t.dims2() {
        Ok(dims) if dims == (rows, cols) => Ok(()),
        _ => Err(format!("{what} is {:?}, not [{rows}, {cols}]", t.dims())),
    }
}

impl Mla {
    fn new(i: usize, d: usize, m: &LatentView<'_>) -> Result<Self, String> {
        let proj = |l: &Linear, name: &str| Proj::new(l, &format!("layer {i} {name}"));
        let MlaShape {
            kv_lora_rank: rank,
            qk_nope_head_dim: nope,
            qk_rope_head_dim: rope,
            v_head_dim: vd,
            ..
        } = m.shape;
        let nh = m.heads;
        let q = match m.q {
            LatentQuery::Direct(l) => MlaQuery::Direct(proj(l, "q_proj")?),
            LatentQuery::LowRank { a, norm, b } => MlaQuery::LowRank {
                a: proj(a, "q_a_proj")?,
                norm: norm_w(norm, "q_a_layernorm")?,
                b: proj(b, "q_b_proj")?,
            },
        };
        let (k_b, v_b, layout) = match m.kv_b {
            LatentKv::Expand(l) => {
                let what = format!("layer {i} kv_b_proj");
                let (w, b) = l.weight_view();
                if b.is_some() {
                    // The absorbed form moves kv_b into the query and the output, where a bias
                    // on the keys would need its own term; no DeepSeek checkpoint has one.
                    return Err(format!("{what} has a bias"));
                }
                let w = match w {
                    LinearWeight::Stored(t) => t.clone(),
                    // [rank, out] f32 as converted at load: the stored layout back, once.
                    LinearWeight::Transposed(t) => t
                        .t()
                        .and_then(|t| t.contiguous())
                        .map_err(|e| format!("{what}: {e}"))?,
                    LinearWeight::Quantized => {
                        return Err(format!("{what} has quantised (GGUF) weights"));
                    }
                };
                check_matrix(&w, nh * (nope + vd), rank, &what)?;
                // The absorbed query is `k_half^T q_nope` per head, and the CPU kernel's f16 /
                // bf16 products read rows: so the key half is copied once, transposed, as
                // llama.cpp's converters store it (2 MiB a block for DeepSeek-V2-Lite, 16 MiB
                // for V3; the value half is read in place). A column-wise bf16 loop over the
                // stored `[nope, rank]` instead took 757 us a block for the head loop, against
                // 614 us with the copy (V2-Lite's shapes, one run each, load average 3.5).
                let k = w
                    .reshape((nh, nope + vd, rank))
                    .and_then(|t| t.narrow(1, 0, nope))
                    .and_then(|t| t.transpose(1, 2))
                    .and_then(|t| t.contiguous())
                    .and_then(|t| t.reshape((nh * rank, nope)))
                    .map_err(|e| format!("{what}: {e}"))?;
                (k, w, KvLayout::Joint)
            }
            LatentKv::Absorbed { k_b, v_b } => {
                let float = |q: &QuantMatrix, name: &str| {
                    let what = format!("layer {i} {name}");
                    q.float_rows()
                        .cloned()
                        .ok_or_else(|| format!("{what} has quantised (GGUF) weights"))
                        .map(|t| (t, what))
                };
                let ((k, kw), (v, vw)) = (float(k_b, "attn_k_b")?, float(v_b, "attn_v_b")?);
                check_matrix(&k, nh * rank, nope, &kw)?;
                check_matrix(&v, nh * vd, rank, &vw)?;
                if k.dtype() != v.dtype() {
                    return Err(format!(
                        "layer {i}: attn_k_b is {:?} but attn_v_b {:?}",
                        k.dtype(),
                        v.dtype()
                    ));
                }
                (k, v, KvLayout::Split)
            }
        };
        let (cos, sin) = rope_tables(m.rotary)?;
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let kv_b_bytes = match layout {
            // The key rows of kv_b are read from the copy.
            KvLayout::Joint => bytes(&v_b),
            KvLayout::Split => bytes(&k_b) + bytes(&v_b),
        };
        let mla = Mla {
            norm: norm_w(m.norm, "attention norm")?,
            q,
            kv_a: proj(m.kv_a, "kv_a_proj_with_mqa")?,
            kv_norm: norm_w(m.kv_norm, "kv_a_layernorm")?,
            k_b,
            v_b,
            layout,
            kv_b_bytes,
            o: proj(m.o, "o_proj")?,
            heads: nh,
            rank,
            nope,
            rope,
            vd,
            cos,
            sin,
            interleaved: m.interleaved,
            scale: m.scale as f32,
        };
        let q_out = match &mla.q {
            MlaQuery::Direct(p) => p.n_out,
            MlaQuery::LowRank { a, norm, b } => {
                if norm.w.len() != a.n_out || b.n_in != a.n_out {
                    return Err(format!(
                        "layer {i}: q_a_proj, q_a_layernorm and q_b_proj disagree on the rank"
                    ));
                }
                b.n_out
            }
        };
        if nh == 0
            || q_out != nh * (nope + rope)
            || mla.kv_a.n_out != rank + rope
            || mla.kv_norm.w.len() != rank
            || mla.o.n_in != nh * vd
            || mla.o.n_out != d
        {
            return Err(format!(
                "layer {i}: latent attention projections do not match {nh} heads of {nope} + {rope} (q, k), {vd} (v), latent {rank}"
            ));
        }
        if rope == 0
            || !rope.is_multiple_of(2)
            || mla.cos.len() != mla.sin.len()
            || !mla.cos.len().is_multiple_of(rope / 2)
        {
            return Err(format!(
                "layer {i}: a rotary part of {rope} dimensions (the lean path needs an even, non-zero width and tables of its half)"
            ));
        }
        Ok(mla)
    }

    /// The `[max_positions, rope / 2]` tables hold this many positions.
    fn positions(&self) -> usize {
        self.cos.len() / (self.rope / 2)
    }
}

/// A layer's attention.
enum LayerAttn {
    Multi(Attn),
    Latent(Mla),
}

/// What one layer caches per position: `heads` vectors of `k_dim` and `heads` of `v_dim` (the
/// candle slots' `[1, heads, positions, dim]`). Latent attention caches one latent (`k`) and one
/// rotated shared key (`v`), as the candle path does.
#[derive(Clone, Copy)]
struct CacheShape {
    heads: usize,
    k_dim: usize,
    v_dim: usize,
}

impl LayerAttn {
    fn cache_shape(&self) -> CacheShape {
        match self {
            LayerAttn::Multi(a) => CacheShape {
                heads: a.n_kv_heads,
                k_dim: a.head_dim,
                v_dim: a.head_dim,
            },
            LayerAttn::Latent(m) => CacheShape {
                heads: 1,
                k_dim: m.rank,
                v_dim: m.rope,
            },
        }
    }

    /// The widest vector its step writes into the shared buffers.
    fn widest(&self) -> usize {
        match self {
            LayerAttn::Multi(a) => (a.n_heads * a.head_dim).max(a.n_kv_heads * a.head_dim),
            LayerAttn::Latent(m) => {
                let q = match &m.q {
                    MlaQuery::Direct(p) => p.n_out,
                    MlaQuery::LowRank { a, b, .. } => a.n_out.max(b.n_out),
                };
                q.max(m.kv_a.n_out).max(m.heads * m.vd)
            }
        }
    }
}

enum Ffn {
    Dense {
        norm: NormW,
        up: Proj,
        gate: Option<Proj>,
        down: Proj,
        act: Activation,
    },
    Moe {
        norm: NormW,
        /// `[d, E]`.
        router_t: Vec<f32>,
        router_b: Option<Vec<f32>>,
        n_experts: usize,
        slot: usize,
        combine: Combine,
        shared: Option<Shared>,
    },
}

struct Shared {
    gate: Proj,
    up: Proj,
    down: Proj,
    act: Activation,
    scale: Option<Proj>,
}

struct Layer {
    attn: LayerAttn,
    ffn: Ffn,
}

/// The lean decoder of one model: what it copied (norms, biases, rotary and position tables,
/// routers) and handles on the weights it reads in place.
pub(crate) struct LeanDecoder {
    d: usize,
    vocab: usize,
    max_positions: usize,
    /// `[vocab, d]` in its stored dtype.
    tokens: Tensor,
    /// `[max_positions, d]`.
    positions: Option<Vec<f32>>,
    layers: Vec<Layer>,
    final_norm: NormW,
    head: Proj,
    /// Widest intermediate vector (q, FFN hidden, shared expert hidden).
    widest: usize,
    /// What each layer caches per position.
    cache: Vec<CacheShape>,
}

/// One layer's cached keys and values, position-major: position `p` is `[p * width, (p + 1) *
/// width)` with `width = kv_heads * head_dim`.
#[derive(Default)]
struct LayerKv {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// The lean path's half of a [`KvCache`](super::KvCache): its keys and values and every buffer a
/// step writes, allocated on the first step and reused after.
#[derive(Default)]
pub(crate) struct LeanState {
    kv: Vec<LayerKv>,
    /// Positions held in `kv`.
    pub(crate) len: usize,
    x: Vec<f32>,
    a: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    ctx: Vec<f32>,
    h1: Vec<f32>,
    h2: Vec<f32>,
    y: Vec<f32>,
    tmp: Vec<f32>,
    scores: Vec<f32>,
    /// Latent attention's scratch, one run per thread: the query taken into the latent space,
    /// the attention output still latent, and the scores.
    heads: Vec<f32>,
    router: Vec<f32>,
    pub(crate) logits: Vec<f32>,
}

impl LeanState {
    /// Forgets every position (buffers kept).
    pub(crate) fn clear(&mut self) {
        for l in &mut self.kv {
            l.k.clear();
            l.v.clear();
        }
        self.len = 0;
    }
}

/// A norm's vectors copied, or why not (for [`DecodePath::Candle`]).
fn norm_w(n: &Norm, what: &str) -> Result<NormW, String> {
    NormW::new(n).map_err(|e| format!("{what}: {e}"))
}

/// A rotary's cos and sin tables copied to the host.
fn rope_tables(r: &Rotary) -> Result<(Vec<f32>, Vec<f32>), String> {
    let (c, s) = r.tables();
    Ok((
        host_vec(c).map_err(err("rotary tables"))?,
        host_vec(s).map_err(err("rotary tables"))?,
    ))
}

/// Describes a candle error with the part it happened in (for [`DecodePath::Candle`]).
fn err(what: &'static str) -> impl FnOnce(candle_core::Error) -> String {
    move |e| format!("{what}: {e}")
}

/// A small tensor copied to the host as f32.
fn host_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

impl LeanDecoder {
    /// The lean decoder for these parts, or why the model keeps the candle path.
    pub(crate) fn build(
        device: &Device,
        embedding: &Embedding,
        blocks: &[Block],
        final_norm: &Norm,
        lm_head: &Linear,
        max_positions: usize,
    ) -> Result<Self, String> {
        if !device.is_cpu() {
            return Err(format!(
                "the model runs on {device:?}, the lean path on the CPU"
            ));
        }
        let tokens = embedding
            .token_table()
            .ok_or("the token embeddings are quantised (GGUF)")?;
        if !matches!(tokens.dtype(), DType::F32 | DType::F16 | DType::BF16)
            || !tokens.is_contiguous()
        {
            return Err(format!("{:?} token embeddings", tokens.dtype()));
        }
        let (vocab, d) = tokens.dims2().map_err(|e| e.to_string())?;
        let positions = embedding
            .position_table()
            .map(host_vec)
            .transpose()
            .map_err(err("position table"))?;
        let mut layers = Vec::with_capacity(blocks.len());
        let mut widest = d;
        let mut cache = Vec::with_capacity(blocks.len());
        for (i, block) in blocks.iter().enumerate() {
            let proj = |l: &Linear, name: &str| Proj::new(l, &format!("layer {i} {name}"));
            let attn = match block.attention() {
                BlockAttention::Multi(a) => LayerAttn::Multi(Attn::new(i, a.parts())?),
                BlockAttention::Latent(m) => LayerAttn::Latent(Mla::new(i, d, &m.parts())?),
            };
            widest = widest.max(attn.widest());
            cache.push(attn.cache_shape());
            let ffn = match block.ffn() {
                BlockFfn::Dense(f) => {
                    let (n, up, gate, down, act) = f.parts();
                    let up = proj(up, "ffn up")?;
                    widest = widest.max(up.n_out);
                    Ffn::Dense {
                        norm: norm_w(n, "ffn norm")?,
                        up,
                        gate: gate.map(|g| proj(g, "ffn gate")).transpose()?,
                        down: proj(down, "ffn down")?,
                        act,
                    }
                }
                BlockFfn::Moe(m) => {
                    let p = m.parts();
                    if p.experts.packed().is_none() {
                        return Err(format!(
                            "layer {i}'s experts run on the candle path (not the CPU kernel)"
                        ));
                    }
                    let router_t = host_vec(p.router_t).map_err(err("router"))?;
                    let n_experts = router_t.len() / d;
                    let shared = match p.shared {
                        None => None,
                        Some(s) => {
                            let (gate, up, down, act, scale) = s.parts();
                            let up = proj(up, "shared expert up")?;
                            widest = widest.max(up.n_out);
                            Some(Shared {
                                gate: proj(gate, "shared expert gate")?,
                                up,
                                down: proj(down, "shared expert down")?,
                                act,
                                scale: scale.map(|s| proj(s, "shared expert gate")).transpose()?,
                            })
                        }
                    };
                    Ffn::Moe {
                        norm: norm_w(p.norm, "moe norm")?,
                        router_t,
                        router_b: p
                            .router_b
                            .map(host_vec)
                            .transpose()
                            .map_err(err("router"))?,
                        n_experts,
                        slot: p.slot,
                        combine: p.combine,
                        shared,
                    }
                }
            };
            layers.push(Layer { attn, ffn });
        }
        let head = Proj::new(lm_head, "the LM head")?;
        Ok(Self {
            d,
            vocab,
            max_positions,
            tokens: tokens.clone(),
            positions,
            layers,
            final_norm: norm_w(final_norm, "final norm")?,
            head,
            widest,
            cache,
        })
    }

    /// Weight bytes a step reads whatever the routing (projections, routers, dense FFNs, shared
    /// experts, the LM head and one embedding row), and the bytes of one routed expert as the
    /// kernel keeps it.
    pub(crate) fn weight_bytes(&self, blocks: &[Block]) -> (usize, usize) {
        let p = |p: &Proj| match &p.half {
            Some(h) => 2 * h.len(),
            None => p.w.elem_count() * p.w.dtype().size_in_bytes(),
        };
        let mut dense = p(&self.head) + self.d * self.tokens.dtype().size_in_bytes();
        for l in &self.layers {
            dense += match &l.attn {
                LayerAttn::Multi(a) => p(&a.q) + p(&a.k) + p(&a.v) + p(&a.o),
                LayerAttn::Latent(m) => {
                    let q = match &m.q {
                        MlaQuery::Direct(q) => p(q),
                        MlaQuery::LowRank { a, b, .. } => p(a) + p(b),
                    };
                    q + p(&m.kv_a) + m.kv_b_bytes + p(&m.o)
                }
            };
            dense += match &l.ffn {
                Ffn::Dense { up, gate, down, .. } => p(up) + gate.as_ref().map_or(0, p) + p(down),
                Ffn::Moe {
                    router_t, shared, ..
                } => {
                    4 * router_t.len()
                        + shared.as_ref().map_or(0, |s| {
                            p(&s.gate) + p(&s.up) + p(&s.down) + s.scale.as_ref().map_or(0, p)
                        })
                }
            };
        }
        let expert = blocks
            .iter()
            .find_map(|b| b.moe().and_then(|m| m.parts().experts.packed()))
            .map_or(0, |k| k.expert_bytes());
        (dense, expert)
    }

    /// Sizes `s`'s buffers for this model (a no-op once they are).
    fn prepare(&self, s: &mut LeanState) {
        let grow = |v: &mut Vec<f32>, n: usize| {
            if v.len() < n {
                v.resize(n, 0.0);
            }
        };
        let w = self.widest;
        for v in [&mut s.x, &mut s.a, &mut s.y, &mut s.tmp] {
            grow(v, self.d);
        }
        for v in [
            &mut s.q, &mut s.k, &mut s.v, &mut s.ctx, &mut s.h1, &mut s.h2,
        ] {
            grow(v, w);
        }
        grow(&mut s.tmp, w);
        // One run of scores per thread, for a split of the heads.
        grow(
            &mut s.scores,
            split::parts() * scores_len(self.max_positions + 1),
        );
        grow(&mut s.logits, self.vocab);
        let e = self
            .layers
            .iter()
            .map(|l| match &l.ffn {
                Ffn::Moe { n_experts, .. } => *n_experts,
                Ffn::Dense { .. } => 0,
            })
            .max()
            .unwrap_or(0);
        grow(&mut s.router, e);
        let rank = (self.layers.iter())
            .filter_map(|l| match &l.attn {
                LayerAttn::Latent(m) => Some(m.rank),
                LayerAttn::Multi(_) => None,
            })
            .max();
        if let Some(rank) = rank {
            let parts = rayon::current_num_threads();
            grow(&mut s.heads, parts * head_scratch(rank, self.max_positions));
        }
        if s.kv.len() != self.layers.len() {
            s.kv = (0..self.layers.len()).map(|_| LayerKv::default()).collect();
            // Room for every position up front when that is small (the embedded model: 1 MiB),
            // so that no step reallocates; large contexts grow as they fill.
            let per_position: usize = (self.cache.iter())
                .map(|c| c.heads * (c.k_dim + c.v_dim))
                .sum();
            if per_position * 4 * self.max_positions <= 64 << 20 {
                for (kv, c) in s.kv.iter_mut().zip(&self.cache) {
                    kv.k.reserve_exact(c.heads * c.k_dim * self.max_positions);
                    kv.v.reserve_exact(c.heads * c.v_dim * self.max_positions);
                }
            }
        }
    }

    /// Copies every cached position of the candle path's slots (`[1, kv_heads, positions,
    /// head_dim]` each; latent attention: `[1, 1, positions, rank]` latents and `[1, 1,
    /// positions, rope]` rotated keys) into `s`, replacing what it held.
    pub(crate) fn load_from_slots(
        &self,
        s: &mut LeanState,
        slots: &[super::blocks::KvSlot],
        len: usize,
    ) -> Result<()> {
        self.prepare(s);
        for (li, ((kv, slot), c)) in s.kv.iter_mut().zip(slots).zip(&self.cache).enumerate() {
            kv.k.clear();
            kv.v.clear();
            if let Some((k, v)) = slot.get() {
                // [1, heads, pos, dim] -> [pos, heads * dim]
                let flat = |t: &Tensor, dim: usize| -> Result<Vec<f32>> {
                    if t.dims() != [1, c.heads, len, dim] {
                        bail!(
                            "layer {li}'s cache is {:?}, not [1, {}, {len}, {dim}]",
                            t.dims(),
                            c.heads
                        );
                    }
                    Ok(t.transpose(1, 2)?
                        .contiguous()?
                        .flatten_all()?
                        .to_vec1::<f32>()?)
                };
                kv.k.extend_from_slice(&flat(k, c.k_dim)?);
                kv.v.extend_from_slice(&flat(v, c.v_dim)?);
            }
        }
        s.len = len;
        Ok(())
    }

    /// The candle path's slots rebuilt from `s`'s positions.
    pub(crate) fn store_to_slots(
        &self,
        s: &LeanState,
        slots: &mut [super::blocks::KvSlot],
        device: &Device,
    ) -> Result<()> {
        for ((kv, slot), c) in s.kv.iter().zip(slots).zip(&self.cache) {
            let h = c.heads;
            let t = |v: &[f32], dim: usize| -> candle_core::Result<Tensor> {
                Tensor::from_slice(&v[..s.len * h * dim], (1, s.len, h, dim), device)?
                    .transpose(1, 2)?
                    .contiguous()
            };
            slot.set(t(&kv.k, c.k_dim)?, t(&kv.v, c.v_dim)?);
        }
        Ok(())
    }

    /// Decodes `token` at position `s.len` (appending its keys and values to `s`), leaves the
    /// logits in `s.logits[..vocab]` and fills `trace` as a full pass of one token would. `blocks`
    /// are the model's (the experts and routers are run from them); the caller checked the
    /// token, the position and the routing's shape.
    pub(crate) fn step(
        &self,
        blocks: &[Block],
        token: u32,
        routing: &RoutingConfig,
        s: &mut LeanState,
        trace: &mut ForwardTrace,
    ) -> Result<()> {
        let start = Instant::now();
        self.prepare(s);
        let pos = s.len;
        let d = self.d;
        trace.begin(1, 1, pos, self.layers.len());
        trace.lean_decode = true;
        let head_start = Instant::now();
        self.embed(token, pos, &mut s.x[..d])?;
        let mut head_ns = head_start.elapsed().as_nanos() as u64;
        for (li, layer) in self.layers.iter().enumerate() {
            let t0 = Instant::now();
            match &layer.attn {
                LayerAttn::Multi(a) => self.attention(a, li, pos, s)?,
                LayerAttn::Latent(m) => self.latent_attention(m, li, pos, s)?,
            }
            trace.blocks[li].attention_ns = t0.elapsed().as_nanos() as u64;
            match &layer.ffn {
                Ffn::Dense {
                    norm,
                    up,
                    gate,
                    down,
                    act,
                } => {
                    let t1 = Instant::now();
                    norm.apply(&s.x[..d], &mut s.a[..d]);
                    up.apply(&s.a, &mut s.h1)?;
                    let hn = up.n_out;
                    match gate {
                        Some(g) => {
                            g.apply(&s.a, &mut s.h2)?;
                            for (u, &g) in s.h1[..hn].iter_mut().zip(&s.h2[..hn]) {
                                *u *= act.apply(g);
                            }
                        }
                        None => s.h1[..hn].iter_mut().for_each(|u| *u = act.apply(*u)),
                    }
                    down.apply(&s.h1, &mut s.y)?;
                    add(&mut s.x[..d], &s.y[..d]);
                    trace.blocks[li].ffn_ns = t1.elapsed().as_nanos() as u64;
                }
                Ffn::Moe {
                    norm,
                    router_t,
                    router_b,
                    n_experts,
                    slot,
                    combine,
                    shared,
                } => {
                    let t1 = Instant::now();
                    let parts = blocks[li]
                        .moe()
                        .context("the lean decoder's MoE layer is not a MoE block")?
                        .parts();
                    norm.apply(&s.x[..d], &mut s.a[..d]);
                    let logits = &mut s.router[..*n_experts];
                    matvec_t(router_t, &s.a[..d], logits);
                    if let Some(b) = router_b {
                        add(logits, b);
                    }
                    let lt = trace.moe_slot(*slot, li);
                    route_with(
                        logits,
                        parts.router,
                        routing.checked(*slot),
                        routing.checked_capacity(),
                        &mut lt.routing,
                    )
                    .with_context(|| format!("routing in layer {li}"))?;
                    lt.groups.build(&lt.routing);
                    if *combine == Combine::Sum {
                        lt.groups.weights.fill(1.0);
                    }
                    let router_ns = t1.elapsed().as_nanos() as u64;
                    let t2 = Instant::now();
                    parts
                        .experts
                        .forward_slices(&s.a[..d], &lt.groups, &mut s.y[..d])
                        .context("the experts left the CPU kernel")?;
                    add(&mut s.x[..d], &s.y[..d]);
                    if let Some(sh) = shared {
                        let hn = sh.up.n_out;
                        sh.gate.apply(&s.a, &mut s.h1)?;
                        sh.up.apply(&s.a, &mut s.h2)?;
                        for (g, &u) in s.h1[..hn].iter_mut().zip(&s.h2[..hn]) {
                            *g = sh.act.apply(*g) * u;
                        }
                        sh.down.apply(&s.h1, &mut s.y)?;
                        let scale = match &sh.scale {
                            Some(p) => {
                                p.apply(&s.a, &mut s.tmp)?;
                                1.0 / (1.0 + (-s.tmp[0]).exp())
                            }
                            None => 1.0,
                        };
                        for (x, &y) in s.x[..d].iter_mut().zip(&s.y[..d]) {
                            *x += y * scale;
                        }
                    }
                    let timing = &mut trace.blocks[li];
                    timing.router_ns = router_ns;
                    timing.ffn_ns = t2.elapsed().as_nanos() as u64;
                }
            }
        }
        s.len = pos + 1;
        let t3 = Instant::now();
        self.final_norm.apply(&s.x[..d], &mut s.a[..d]);
        self.head.apply(&s.a, &mut s.logits)?;
        let logits = &s.logits[..self.vocab];
        if let Some(i) = logits.iter().position(|v| !v.is_finite()) {
            bail!(
                "the model produced a non-finite logit ({}) for token 0 of this pass (vocabulary entry {i}): its weights or activations overflow or hold NaN",
                logits[i]
            );
        }
        head_ns += t3.elapsed().as_nanos() as u64;
        trace.head_ns = head_ns;
        trace.total_ns = start.elapsed().as_nanos() as u64;
        Ok(())
    }

    /// `x` = the token's embedding row (widened) plus its position's row, if learned.
    fn embed(&self, token: u32, pos: usize, x: &mut [f32]) -> Result<()> {
        let d = self.d;
        let (storage, layout) = self.tokens.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            bail!("the embedding table left the CPU");
        };
        let (start, _) = layout
            .contiguous_offsets()
            .context("the embedding table is not contiguous")?;
        let at = start + token as usize * d;
        match self.tokens.dtype() {
            DType::F32 => x.copy_from_slice(&cpu.as_slice::<f32>()?[at..at + d]),
            DType::F16 => {
                for (o, v) in x.iter_mut().zip(&cpu.as_slice::<half::f16>()?[at..at + d]) {
                    *o = v.to_f32();
                }
            }
            DType::BF16 => {
                for (o, v) in x.iter_mut().zip(&cpu.as_slice::<half::bf16>()?[at..at + d]) {
                    *o = v.to_f32();
                }
            }
            other => bail!("{other:?} embedding table on the lean decode path"),
        }
        if let Some(p) = &self.positions {
            add(x, &p[pos * d..(pos + 1) * d]);
        }
        Ok(())
    }

    /// The attention sublayer for the token at `pos`: `s.x += o(attn(...))`, its keys and values
    /// appended to layer `li`'s cache.
    fn attention(&self, a: &Attn, li: usize, pos: usize, s: &mut LeanState) -> Result<()> {
        let d = self.d;
        let (nh, nkv, hd) = (a.n_heads, a.n_kv_heads, a.head_dim);
        let (qw, kvw) = (nh * hd, nkv * hd);
        a.norm.apply(&s.x[..d], &mut s.a[..d]);
        a.q.apply(&s.a, &mut s.q)?;
        a.k.apply(&s.a, &mut s.k)?;
        a.v.apply(&s.a, &mut s.v)?;
        let (q, k) = (&mut s.q[..qw], &mut s.k[..kvw]);
        match &a.qk_norm {
            Some(QkNormW::Full { q: qn, k: kn }) | Some(QkNormW::PerHead { q: qn, k: kn }) => {
                // A full norm has weights as wide as the projection (one chunk), a per-head norm
                // `head_dim` wide ones (one chunk per head).
                qn.apply_in_place(q, &mut s.tmp);
                kn.apply_in_place(k, &mut s.tmp);
            }
            None => {}
        }
        if let Some((cos, sin)) = &a.rope {
            let half = hd / 2;
            let (c, sn) = (
                &cos[pos * half..(pos + 1) * half],
                &sin[pos * half..(pos + 1) * half],
            );
            for head in q.chunks_exact_mut(hd).chain(k.chunks_exact_mut(hd)) {
                crate::kernel::heads::rotate_half(head, c, sn);
            }
        }
        let kv = &mut s.kv[li];
        debug_assert_eq!(kv.k.len(), pos * kvw, "layer {li}'s cache is out of step");
        kv.k.extend_from_slice(k);
        kv.v.extend_from_slice(&s.v[..kvw]);
        let keys = pos + 1;
        let first = match a.window {
            Some(w) if keys > w => keys - w,
            _ => 0,
        };
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let shape = DecodeShape {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            first,
            keys,
        };
        attend_one(
            KernelVariant::Auto,
            &shape,
            q,
            &kv.k,
            &kv.v,
            a.sinks.as_deref(),
            scale,
            &mut s.scores,
            &mut s.ctx[..qw],
        );
        a.o.apply(&s.ctx, &mut s.y)?;
        add(&mut s.x[..d], &s.y[..d]);
        Ok(())
    }

    /// The latent attention sublayer (DeepSeek) for the token at `pos`: `s.x += o(attn(...))`,
    /// its normalised latent and rotated shared key appended to layer `li`'s cache (what the
    /// candle path caches, so the two halves of a [`KvCache`](super::KvCache) convert as for
    /// plain attention).
    ///
    /// Computed absorbed, as DeepSeek's own inference code and llama.cpp do: per head, `q_nope ·
    /// (W_k latent_j) = (W_k^T q_nope) · latent_j` and `sum_j p_j (W_v latent_j) = W_v (sum_j p_j
    /// latent_j)`, so the query enters the latent space once and the output leaves it once. The
    /// candle path expands every cached latent through `kv_b` at every step instead: `keys *
    /// heads * (nope + vd) * rank` multiply-adds, growing with the context, and per-head keys and
    /// values written and read back. Absorbed, a step reads and multiplies `kv_b` once (`heads *
    /// (nope + vd) * rank`) whatever the context, and a cached position costs each head `2 *
    /// rank + rope` multiply-adds (its score and its share of the output).
    fn latent_attention(&self, m: &Mla, li: usize, pos: usize, s: &mut LeanState) -> Result<()> {
        let d = self.d;
        let (nh, rank, nope, rope, vd) = (m.heads, m.rank, m.nope, m.rope, m.vd);
        let qk = nope + rope;
        if pos >= m.positions() {
            bail!(
                "position {pos} is past layer {li}'s rotary tables ({} positions)",
                m.positions()
            );
        }
        m.norm.apply(&s.x[..d], &mut s.a[..d]);
        match &m.q {
            MlaQuery::Direct(p) => p.apply(&s.a, &mut s.q)?,
            MlaQuery::LowRank { a, norm, b } => {
                a.apply(&s.a, &mut s.h1)?;
                norm.apply(&s.h1[..a.n_out], &mut s.h2[..a.n_out]);
                b.apply(&s.h2, &mut s.q)?;
            }
        }
        m.kv_a.apply(&s.a, &mut s.k)?;
        let half = rope / 2;
        let (c, sn) = (
            &m.cos[pos * half..(pos + 1) * half],
            &m.sin[pos * half..(pos + 1) * half],
        );
        for head in s.q[..nh * qk].chunks_exact_mut(qk) {
            rotate_latent(&mut head[nope..], c, sn, m.interleaved, &mut s.tmp);
        }
        let (latent, k_rope) = s.k[..rank + rope].split_at_mut(rank);
        m.kv_norm.apply_in_place(latent, &mut s.tmp);
        rotate_latent(k_rope, c, sn, m.interleaved, &mut s.tmp);
        let kv = &mut s.kv[li];
        if kv.k.len() != pos * rank || kv.v.len() != pos * rope {
            bail!("layer {li}'s latent cache is out of step with position {pos}");
        }
        kv.k.extend_from_slice(latent);
        kv.v.extend_from_slice(k_rope);
        let keys = pos + 1;
        // The head loop streams kv_b and, per head, the cached latents twice: split over the
        // threads on the same rule as one large product.
        let bytes = m.kv_b_bytes + nh * keys * (2 * rank + rope) * 4;
        let stride = head_scratch(rank, keys);
        let parts = split_parts(bytes).min(nh).min(s.heads.len() / stride);
        let cached = Cached {
            latents: &kv.k,
            k_ropes: &kv.v,
            keys,
        };
        m.all_heads(
            &s.q[..nh * qk],
            &cached,
            &mut s.heads,
            &mut s.ctx[..nh * vd],
            parts.max(1),
        )?;
        m.o.apply(&s.ctx, &mut s.y)?;
        add(&mut s.x[..d], &s.y[..d]);
        Ok(())
    }
}

/// Floats of one thread's latent attention scratch for `keys` keys: see [`LeanState::heads`].
fn head_scratch(rank: usize, keys: usize) -> usize {
    2 * rank + keys + 1
}

/// One layer's cached latents (`[keys, rank]`) and rotated shared keys (`[keys, rope]`).
struct Cached<'a> {
    latents: &'a [f32],
    k_ropes: &'a [f32],
    keys: usize,
}

impl Mla {
    /// Every head's attention output (`ctx`, `[heads * vd]`) from the rotated queries (`q`,
    /// `[heads * (nope + rope)]`), on `parts` threads (each a contiguous run of heads and its own
    /// scratch run of `scratch`). A head's arithmetic is the same whatever `parts`.
    fn all_heads(
        &self,
        q: &[f32],
        cached: &Cached<'_>,
        scratch: &mut [f32],
        ctx: &mut [f32],
        parts: usize,
    ) -> Result<()> {
        let (ks, kl) = self.k_b.storage_and_layout();
        let (vs, vl) = self.v_b.storage_and_layout();
        let (Storage::Cpu(kc), Storage::Cpu(vc)) = (&*ks, &*vs) else {
            bail!("a weight left the CPU");
        };
        let (kr, vr) = (offsets(kl)?, offsets(vl)?);
        macro_rules! run {
            ($t:ty) => {{
                let k = &kc.as_slice::<$t>()?[kr];
                let v = &vc.as_slice::<$t>()?[vr];
                self.heads_on::<$t>(k, v, q, cached, scratch, ctx, parts);
            }};
        }
        match self.k_b.dtype() {
            DType::F32 => run!(f32),
            DType::F16 => run!(half::f16),
            DType::BF16 => run!(half::bf16),
            other => bail!("{other:?} kv_b on the lean decode path"),
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn heads_on<E: MatvecWeight>(
        &self,
        k: &[E],
        v: &[E],
        q: &[f32],
        cached: &Cached<'_>,
        scratch: &mut [f32],
        ctx: &mut [f32],
        parts: usize,
    ) {
        let vd = self.vd;
        let stride = head_scratch(self.rank, cached.keys);
        let per = self.heads.div_ceil(parts);
        let run = |h0: usize, ctx: &mut [f32], scratch: &mut [f32]| {
            for (i, out) in ctx.chunks_exact_mut(vd).enumerate() {
                self.head(h0 + i, k, v, q, cached, scratch, out);
            }
        };
        if parts <= 1 {
            return run(0, ctx, &mut scratch[..stride]);
        }
        let work: Vec<_> = ctx
            .chunks_mut(per * vd)
            .zip(scratch.chunks_mut(stride))
            .enumerate()
            .collect();
        split::each(work, |(i, (c, s))| run(i * per, c, s));
    }

    /// Head `h`'s attention output `out` (`[vd]`), absorbed (see
    /// [`LeanDecoder::latent_attention`]).
    #[allow(clippy::too_many_arguments)]
    fn head<E: MatvecWeight>(
        &self,
        h: usize,
        k: &[E],
        v: &[E],
        q: &[f32],
        cached: &Cached<'_>,
        scratch: &mut [f32],
        out: &mut [f32],
    ) {
        let (rank, nope, rope, vd) = (self.rank, self.nope, self.rope, self.vd);
        let qk = nope + rope;
        let (q_nope, q_rope) = q[h * qk..(h + 1) * qk].split_at(nope);
        let (q_abs, rest) = scratch.split_at_mut(rank);
        let (ctx_lat, scores) = rest.split_at_mut(rank);
        matvec_rows(&k[h * rank * nope..(h + 1) * rank * nope], q_nope, q_abs);
        let v0 = match self.layout {
            KvLayout::Joint => (h * (nope + vd) + nope) * rank,
            KvLayout::Split => h * vd * rank,
        };
        let v_h = &v[v0..v0 + vd * rank];
        let scores = &mut scores[..cached.keys];
        let keys = cached
            .latents
            .chunks_exact(rank)
            .zip(cached.k_ropes.chunks_exact(rope));
        for (sc, (lat, kr)) in scores.iter_mut().zip(keys) {
            *sc = (dot(q_abs, lat) + dot(q_rope, kr)) * self.scale;
        }
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for sc in scores.iter_mut() {
            *sc = (*sc - max).exp();
            sum += *sc;
        }
        let inv = 1.0 / sum;
        ctx_lat.fill(0.0);
        for (&p, lat) in scores.iter().zip(cached.latents.chunks_exact(rank)) {
            let w = p * inv;
            for (o, &l) in ctx_lat.iter_mut().zip(lat) {
                *o += w * l;
            }
        }
        matvec_rows(v_h, ctx_lat, out);
    }
}

/// A weight's element range in its CPU storage.
fn offsets(layout: &candle_core::Layout) -> Result<std::ops::Range<usize>> {
    let (start, end) = layout
        .contiguous_offsets()
        .context("a weight is not contiguous")?;
    Ok(start..end)
}

/// One latent attention head's rotary part rotated in place, as `LatentAttention::rotate` does
/// it: when `interleaved`, the adjacent pairs `(2i, 2i + 1)` are first laid out as halves (evens,
/// then odds), so that the keys cached here are the very vectors the candle path caches.
fn rotate_latent(x: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool, tmp: &mut [f32]) {
    if interleaved {
        let (n, half) = (x.len(), x.len() / 2);
        tmp[..n].copy_from_slice(x);
        for i in 0..half {
            x[i] = tmp[2 * i];
            x[half + i] = tmp[2 * i + 1];
        }
    }
    crate::kernel::heads::rotate_half(x, cos, sin);
}

/// `w_t` (`[n_in, n_out]` f32) as `[n_out, n_in]` f16, if every value converts exactly.
fn exact_half_rows(
    w_t: &Tensor,
    n_in: usize,
    n_out: usize,
) -> candle_core::Result<Option<Vec<half::f16>>> {
    let v = w_t.flatten_all()?.to_vec1::<f32>()?;
    let mut rows = vec![half::f16::ZERO; n_in * n_out];
    for (i, row) in v.chunks_exact(n_out).enumerate() {
        for (o, &x) in row.iter().enumerate() {
            let h = half::f16::from_f32(x);
            if h.to_f32() != x {
                return Ok(None);
            }
            rows[o * n_in + i] = h;
        }
    }
    Ok(Some(rows))
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums: the compiler vectorises this into one register of lanes.
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const NH: usize = 4;
    const RANK: usize = 16;
    const NOPE: usize = 8;
    const ROPE: usize = 6;
    const VD: usize = 12;
    const D: usize = 10;
    const KEYS: usize = 5;
    const SCALE: f64 = 0.3;

    /// Deterministic values in [-1, 1).
    fn vals(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104_729 + 13) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    fn linear(rows: usize, cols: usize, seed: usize) -> Linear {
        let t = Tensor::from_vec(vals(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap();
        Linear::stored(t, None).unwrap()
    }

    /// Head outputs from the expanded form, in f64: every latent through the key and value rows of
    /// `kv_b` (`[NH * (NOPE + VD), RANK]`), as the candle path computes them.
    fn expanded(kv_b: &[f32], q: &[f32], latents: &[f32], k_ropes: &[f32]) -> Vec<f64> {
        let row = |r: usize, x: &[f32]| -> f64 {
            (0..RANK)
                .map(|c| f64::from(kv_b[r * RANK + c]) * f64::from(x[c]))
                .sum()
        };
        let mut out = vec![0f64; NH * VD];
        for h in 0..NH {
            let qh = &q[h * (NOPE + ROPE)..(h + 1) * (NOPE + ROPE)];
            let base = h * (NOPE + VD);
            let scores: Vec<f64> = (0..KEYS)
                .map(|j| {
                    let lat = &latents[j * RANK..(j + 1) * RANK];
                    let nope: f64 = (0..NOPE)
                        .map(|i| f64::from(qh[i]) * row(base + i, lat))
                        .sum();
                    let rope: f64 = (0..ROPE)
                        .map(|i| f64::from(qh[NOPE + i]) * f64::from(k_ropes[j * ROPE + i]))
                        .sum();
                    (nope + rope) * SCALE
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for (j, p) in e.iter().enumerate() {
                let lat = &latents[j * RANK..(j + 1) * RANK];
                for c in 0..VD {
                    out[h * VD + c] += p / sum * row(base + NOPE + c, lat);
                }
            }
        }
        out
    }

    /// The absorbed head loop (both kv_b layouts, f32 and bf16, on one and on three threads)
    /// against the expanded form, and the same bits whatever the number of threads.
    #[test]
    fn absorbed_heads_match_the_expanded_form_in_both_layouts() {
        let dev = Device::Cpu;
        let q = vals(NH * (NOPE + ROPE), 1);
        let latents = vals(KEYS * RANK, 2);
        let k_ropes = vals(KEYS * ROPE, 3);
        let joint = vals(NH * (NOPE + VD) * RANK, 4);
        let rotary = Rotary::like_transformers(ROPE, 8, 10000.0, &dev).unwrap();
        let norm = |n: usize| Norm::new(Tensor::ones(n, DType::F32, &dev).unwrap(), None, 1e-6);
        let (attn_norm, kv_norm) = (norm(D), norm(RANK));
        let (q_proj, kv_a, o) = (
            LatentQuery::Direct(linear(NH * (NOPE + ROPE), D, 5)),
            linear(RANK + ROPE, D, 6),
            linear(D, NH * VD, 7),
        );
        // llama.cpp's split of the same weight: k_b[h * RANK + r][i] = kv_b[h * (NOPE + VD) + i][r].
        let mut k_b = vec![0f32; NH * RANK * NOPE];
        let mut v_b = vec![0f32; NH * VD * RANK];
        for h in 0..NH {
            for r in 0..RANK {
                for i in 0..NOPE {
                    k_b[(h * RANK + r) * NOPE + i] = joint[(h * (NOPE + VD) + i) * RANK + r];
                }
            }
            for c in 0..VD {
                let from = (h * (NOPE + VD) + NOPE + c) * RANK;
                v_b[(h * VD + c) * RANK..(h * VD + c + 1) * RANK]
                    .copy_from_slice(&joint[from..from + RANK]);
            }
        }
        let cached = Cached {
            latents: &latents,
            k_ropes: &k_ropes,
            keys: KEYS,
        };
        for dtype in [DType::F32, DType::BF16] {
            let t = |v: &[f32], rows: usize, cols: usize| {
                Tensor::from_slice(v, (rows, cols), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            // The reference sees the weights as rounded to the dtype.
            let rounded = t(&joint, NH * (NOPE + VD), RANK)
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let want = expanded(&rounded, &q, &latents, &k_ropes);
            let layouts = [
                (
                    KvLayout::Joint,
                    LatentKv::Expand(
                        Linear::stored(t(&joint, NH * (NOPE + VD), RANK), None).unwrap(),
                    ),
                ),
                (
                    KvLayout::Split,
                    LatentKv::Absorbed {
                        k_b: Arc::new(QuantMatrix::float(t(&k_b, NH * RANK, NOPE)).unwrap()),
                        v_b: Arc::new(QuantMatrix::float(t(&v_b, NH * VD, RANK)).unwrap()),
                    },
                ),
            ];
            for (layout, kv_b) in &layouts {
                let view = LatentView {
                    norm: &attn_norm,
                    q: &q_proj,
                    kv_a: &kv_a,
                    kv_norm: &kv_norm,
                    kv_b,
                    o: &o,
                    heads: NH,
                    shape: MlaShape {
                        q_lora_rank: None,
                        kv_lora_rank: RANK,
                        qk_nope_head_dim: NOPE,
                        qk_rope_head_dim: ROPE,
                        v_head_dim: VD,
                    },
                    rotary: &rotary,
                    interleaved: true,
                    scale: SCALE,
                };
                let mla = Mla::new(0, D, &view).unwrap();
                assert_eq!(mla.layout, *layout);
                let mut outs = Vec::new();
                for parts in [1, 3] {
                    let mut scratch = vec![0f32; parts * head_scratch(RANK, KEYS)];
                    let mut ctx = vec![0f32; NH * VD];
                    mla.all_heads(&q, &cached, &mut scratch, &mut ctx, parts)
                        .unwrap();
                    for (i, (&g, &w)) in ctx.iter().zip(&want).enumerate() {
                        let err = (f64::from(g) - w).abs() / (1.0 + w.abs());
                        assert!(
                            err < 1e-5,
                            "{dtype:?} {layout:?} {parts} threads, output {i}: {g} vs {w}"
                        );
                    }
                    outs.push(ctx);
                }
                assert_eq!(
                    outs[0], outs[1],
                    "{dtype:?} {layout:?}: threads changed bits"
                );
            }
        }
    }

    /// A quantised key/value weight keeps the candle path, and says which.
    #[test]
    fn quantised_split_kv_b_is_refused_with_its_name() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let dev = Device::Cpu;
        let q8 = |rows: usize, cols: usize| {
            let t = Tensor::from_vec(vals(rows * cols, 9), (rows, cols), &dev).unwrap();
            Arc::new(
                QuantMatrix::ggml(Arc::new(QTensor::quantize(&t, GgmlDType::Q8_0).unwrap()))
                    .unwrap(),
            )
        };
        let rotary = Rotary::like_transformers(ROPE, 8, 10000.0, &dev).unwrap();
        let norm = |n: usize| Norm::new(Tensor::ones(n, DType::F32, &dev).unwrap(), None, 1e-6);
        let (attn_norm, kv_norm) = (norm(D), norm(RANK));
        let q_proj = LatentQuery::Direct(linear(NH * (NOPE + ROPE), D, 5));
        let (kv_a, o) = (linear(RANK + ROPE, D, 6), linear(D, NH * VD, 7));
        // Rows of 32 values for Q8_0's blocks: RANK 16 would not quantise, so v_b is [NH * VD, 32]
        // and the shape check would fire after the dtype one; only the dtype matters here.
        let kv_b = LatentKv::Absorbed {
            k_b: q8(NH * RANK, 32),
            v_b: q8(NH * VD, 32),
        };
        let view = LatentView {
            norm: &attn_norm,
            q: &q_proj,
            kv_a: &kv_a,
            kv_norm: &kv_norm,
            kv_b: &kv_b,
            o: &o,
            heads: NH,
            shape: MlaShape {
                q_lora_rank: None,
                kv_lora_rank: RANK,
                qk_nope_head_dim: NOPE,
                qk_rope_head_dim: ROPE,
                v_head_dim: VD,
            },
            rotary: &rotary,
            interleaved: true,
            scale: SCALE,
        };
        let Err(why) = Mla::new(3, D, &view) else {
            panic!("quantised k_b accepted");
        };
        assert_eq!(why, "layer 3 attn_k_b has quantised (GGUF) weights");
    }
}
