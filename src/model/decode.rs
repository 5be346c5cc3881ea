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
//! attention with rotary or learned positions, q/k norms, sliding windows and sinks, dense or MoE
//! feed-forwards with the experts on the CPU kernel, shared experts) decodes here; anything else
//! (a GPU, GGUF-quantised weights, latent attention, experts on the candle path) keeps the candle
//! path, and [`DecodePath::Candle`] says why. `xmoe-top inspect` and `xmoe-top bench` print it.
//!
//! # Numerics
//! Products accumulate in f32, as candle's do, but in another order: logits agree with the candle
//! path to float rounding (tests/decode.rs states the tolerance), not bit for bit.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Storage, Tensor};

use super::blocks::linear::matvec_stored;
use super::blocks::{
    Block, BlockAttention, BlockFfn, Embedding, Linear, LinearWeight, Norm, QkNorm,
};
use super::config::Combine;
use super::forward::RoutingConfig;
use super::trace::ForwardTrace;
use crate::kernel::Activation;
use crate::kernel::matvec::{matvec_rows_split, matvec_t};
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

    /// `out = norm(x)` over the whole slice (LayerNorm with a bias, RMSNorm without), with
    /// candle-nn's own formulas (one pass, `var = E[x^2] - mean^2`; RMSNorm divides by the root):
    /// a full pass normalises the prompt with them, and the two-pass variance differs by enough
    /// rounding to move the embedded model's logits by 5e-5.
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
            None => {
                let sum2 = x.iter().map(|v| v * v).sum::<f32>();
                let m = (sum2 / n + self.eps).sqrt();
                for ((o, &v), &w) in out.iter_mut().zip(x).zip(&self.w) {
                    *o = v / m * w;
                }
            }
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

/// A stored-layout weight of at least this many bytes is multiplied on every rayon thread.
/// `xmoe-top bench`'s "Splitting" table times one product repeated, so a product of 8.4 MB sits
/// in the 32 MiB L3 after the first call, and there splitting never gained (0.58-1.15x). In a
/// decode step every weight comes from memory once, and there it does: OLMoE-1B-7B's attention
/// (64 products of 8.4 MB per token) took 41 ms on one thread and 28 ms split (docs/benchmarks.md,
/// "Experts read in place"). Products under 4 MiB (every one of the embedded model and of the
/// d-1024 peers) stay on the calling thread, where the hand-off would cost more than it saves.
pub const SPLIT_MIN_BYTES: Option<usize> = Some(4 << 20);

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

    /// `y = W x + b`.
    fn apply(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        if let Some(w) = &self.half {
            matvec_rows_split(w, &x[..self.n_in], &mut y[..self.n_out], 1);
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
    attn: Attn,
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
    kv_width: Vec<usize>,
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
        let norm = |n: &Norm, what: &str| NormW::new(n).map_err(|e| format!("{what}: {e}"));
        let mut layers = Vec::with_capacity(blocks.len());
        let mut widest = d;
        let mut kv_width = Vec::with_capacity(blocks.len());
        for (i, block) in blocks.iter().enumerate() {
            let a = match block.attention() {
                BlockAttention::Multi(a) => a.parts(),
                BlockAttention::Latent(_) => {
                    return Err(format!("layer {i} has multi-head latent attention"));
                }
            };
            let proj = |l: &Linear, name: &str| Proj::new(l, &format!("layer {i} {name}"));
            let rope = a
                .rotary
                .map(|r| {
                    let (c, s) = r.tables();
                    Ok::<_, candle_core::Error>((host_vec(c)?, host_vec(s)?))
                })
                .transpose()
                .map_err(err("rotary tables"))?;
            let qk_norm = match a.qk_norm {
                None => None,
                Some(QkNorm::PerHead { q, k }) => Some(QkNormW::PerHead {
                    q: norm(q, "q norm")?,
                    k: norm(k, "k norm")?,
                }),
                Some(QkNorm::Full { q, k }) => Some(QkNormW::Full {
                    q: norm(q, "q norm")?,
                    k: norm(k, "k norm")?,
                }),
            };
            let attn = Attn {
                norm: norm(a.norm, "attention norm")?,
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
            widest = widest.max(qw).max(kvw);
            kv_width.push(kvw);
            let ffn = match block.ffn() {
                BlockFfn::Dense(f) => {
                    let (n, up, gate, down, act) = f.parts();
                    let up = proj(up, "ffn up")?;
                    widest = widest.max(up.n_out);
                    Ffn::Dense {
                        norm: norm(n, "ffn norm")?,
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
                        norm: norm(p.norm, "moe norm")?,
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
            final_norm: norm(final_norm, "final norm")?,
            head,
            widest,
            kv_width,
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
            let a = &l.attn;
            dense += p(&a.q) + p(&a.k) + p(&a.v) + p(&a.o);
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
        grow(&mut s.scores, self.max_positions + 1);
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
        if s.kv.len() != self.layers.len() {
            s.kv = (0..self.layers.len()).map(|_| LayerKv::default()).collect();
            // Room for every position up front when that is small (the embedded model: 1 MiB),
            // so that no step reallocates; large contexts grow as they fill.
            let total: usize = self.kv_width.iter().sum::<usize>() * 2 * 4 * self.max_positions;
            if total <= 64 << 20 {
                for (kv, &w) in s.kv.iter_mut().zip(&self.kv_width) {
                    kv.k.reserve_exact(w * self.max_positions);
                    kv.v.reserve_exact(w * self.max_positions);
                }
            }
        }
    }

    /// Copies every cached position of the candle path's slots (`[1, kv_heads, positions,
    /// head_dim]` each) into `s`, replacing what it held.
    pub(crate) fn load_from_slots(
        &self,
        s: &mut LeanState,
        slots: &[super::blocks::KvSlot],
        len: usize,
    ) -> Result<()> {
        self.prepare(s);
        for (kv, slot) in s.kv.iter_mut().zip(slots) {
            kv.k.clear();
            kv.v.clear();
            if let Some((k, v)) = slot.get() {
                // [1, heads, pos, hd] -> [pos, heads * hd]
                let flat = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
                    t.transpose(1, 2)?
                        .contiguous()?
                        .flatten_all()?
                        .to_vec1::<f32>()
                };
                kv.k.extend_from_slice(&flat(k)?);
                kv.v.extend_from_slice(&flat(v)?);
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
        for ((kv, slot), l) in s.kv.iter().zip(slots).zip(&self.layers) {
            let (h, hd) = (l.attn.n_kv_heads, l.attn.head_dim);
            let t = |v: &[f32]| -> candle_core::Result<Tensor> {
                Tensor::from_slice(&v[..s.len * h * hd], (1, s.len, h, hd), device)?
                    .transpose(1, 2)?
                    .contiguous()
            };
            slot.set(t(&kv.k)?, t(&kv.v)?);
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
            self.attention(&layer.attn, li, pos, s)?;
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
                let (x1, x2) = head.split_at_mut(half);
                for i in 0..half {
                    let (a1, a2) = (x1[i], x2[i]);
                    x1[i] = a1 * c[i] - a2 * sn[i];
                    x2[i] = a2 * c[i] + a1 * sn[i];
                }
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
        let group = nh / nkv;
        let ctx = &mut s.ctx[..qw];
        for h in 0..nh {
            let kh = h / group;
            let qh = &q[h * hd..(h + 1) * hd];
            let scores = &mut s.scores[..keys - first];
            for (j, sc) in (first..keys).zip(scores.iter_mut()) {
                let kj = &kv.k[j * kvw + kh * hd..j * kvw + (kh + 1) * hd];
                *sc = dot(qh, kj) * scale;
            }
            let sink = a.sinks.as_ref().map(|sk| sk[h]);
            let max = scores
                .iter()
                .copied()
                .chain(sink)
                .fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            if let Some(sk) = sink {
                sum += (sk - max).exp();
            }
            let inv = 1.0 / sum;
            let out = &mut ctx[h * hd..(h + 1) * hd];
            out.fill(0.0);
            for (j, &p) in (first..keys).zip(scores.iter()) {
                let vj = &kv.v[j * kvw + kh * hd..j * kvw + (kh + 1) * hd];
                let w = p * inv;
                for (o, &v) in out.iter_mut().zip(vj) {
                    *o += w * v;
                }
            }
        }
        a.o.apply(&s.ctx, &mut s.y)?;
        add(&mut s.x[..d], &s.y[..d]);
        Ok(())
    }
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
