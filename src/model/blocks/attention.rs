//! Causal multi-head self-attention with its pre-norm and residual, optional rotary positions and
//! a per-layer KV cache slot.

use std::time::Instant;

use candle_core::{Device, Tensor};

use super::{Linear, Norm, cpu_slice, elapsed_ns};
use crate::model::trace::BlockTiming;

/// What every block of one pass shares: its shape and the causal mask.
pub struct PassContext {
    /// Sequences in the batch.
    pub batch: usize,
    /// Tokens per sequence in this pass.
    pub seq: usize,
    /// Position of the first token of each sequence (cached positions before it).
    pub start_pos: usize,
    /// `[seq, start_pos + seq]` additive mask; none for a single token, which sees every key.
    pub mask: Option<Tensor>,
}

impl PassContext {
    /// The context of a pass of `batch` sequences of `seq` tokens starting at `start_pos`.
    pub fn new(
        batch: usize,
        seq: usize,
        start_pos: usize,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let mask = if seq > 1 {
            Some(attention_mask(seq, start_pos, None, device)?)
        } else {
            None
        };
        Ok(Self {
            batch,
            seq,
            start_pos,
            mask,
        })
    }

    /// Rows in the pass: batch x seq.
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }
}

/// `[seq, start_pos + seq]` additive mask: query `i` (at position `start_pos + i`) sees key `j`
/// when `j <= start_pos + i` and, with a sliding `window`, `j > start_pos + i - window`.
fn attention_mask(
    seq: usize,
    start_pos: usize,
    window: Option<usize>,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let keys = start_pos + seq;
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| {
            (0..keys).map(move |j| {
                let q = start_pos + i;
                if j <= q && window.is_none_or(|w| j + w > q) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (seq, keys), device)
}

/// YaRN rotary scaling ("YaRN: Efficient Context Window Extension", Peng et al. 2023) as
/// transformers computes it (`_compute_yarn_parameters`): the frequencies of the dimensions that
/// rotate fast are kept (extrapolated), the slow ones divided by `factor` (interpolated), with a
/// linear ramp between, and cos and sin are multiplied by an attention factor. Used by gpt-oss
/// and by DeepSeek's configs; see `docs/hf-families-notes.md`, "YaRN rope".
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Yarn {
    /// Context extension factor (`factor`).
    pub factor: f64,
    /// Context the model was pretrained with (`original_max_position_embeddings`).
    pub original_max_positions: f64,
    /// Rotations over the original context above which a dimension is extrapolated (default 32).
    pub beta_fast: f64,
    /// Rotations below which a dimension is interpolated (default 1).
    pub beta_slow: f64,
    /// Round the correction range outward to whole dimensions (default true; gpt-oss: false).
    pub truncate: bool,
    /// Explicit multiplier of cos and sin (`attention_factor`).
    pub attention_factor: Option<f64>,
    /// DeepSeek's `mscale` (numerator of the inferred attention factor, with `mscale_all_dim`).
    pub mscale: Option<f64>,
    /// DeepSeek's `mscale_all_dim`.
    pub mscale_all_dim: Option<f64>,
}

impl Yarn {
    /// `inv_freq` (`[head_dim / 2]`, f32 as transformers computes it) and the attention factor
    /// for heads of `head_dim` with rotary base `theta`.
    pub fn inv_freq(&self, head_dim: usize, theta: f32) -> (Vec<f32>, f32) {
        let d = head_dim;
        let base = theta as f64;
        let factor = self.factor as f32;
        let find_dim = |rotations: f64| {
            d as f64 * (self.original_max_positions / (rotations * 2.0 * std::f64::consts::PI)).ln()
                / (2.0 * base.ln())
        };
        let (mut low, mut high) = (find_dim(self.beta_fast), find_dim(self.beta_slow));
        if self.truncate {
            low = low.floor();
            high = high.ceil();
        }
        low = low.max(0.0);
        high = high.min(d as f64 - 1.0);
        if low == high {
            high += 0.001;
        }
        let (low, span) = (low as f32, (high - low) as f32);
        let inv_freq = (0..d / 2)
            .map(|i| {
                let pos_freq = theta.powf((2 * i) as f32 / d as f32);
                let extrapolated = 1.0 / pos_freq;
                let interpolated = 1.0 / (factor * pos_freq);
                let ramp = ((i as f32 - low) / span).clamp(0.0, 1.0);
                let keep = 1.0 - ramp;
                interpolated * (1.0 - keep) + extrapolated * keep
            })
            .collect();
        let mscale = |scale: f64, m: f64| {
            if scale <= 1.0 {
                1.0
            } else {
                0.1 * m * scale.ln() + 1.0
            }
        };
        let attention = match (self.attention_factor, self.mscale, self.mscale_all_dim) {
            (Some(a), _, _) => a,
            (None, Some(m), Some(all)) => mscale(self.factor, m) / mscale(self.factor, all),
            _ => mscale(self.factor, 1.0),
        };
        (inv_freq, attention as f32)
    }
}

/// Rotary position tables (half-split layout, as in GPT-NeoX / Llama).
#[derive(Clone)]
pub struct Rotary {
    /// [max_positions, head_dim / 2].
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    /// Tables for positions `0..max_positions` of heads of `head_dim` with base `theta`.
    pub fn new(
        head_dim: usize,
        max_positions: usize,
        theta: f64,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let freq: Vec<f64> = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64))
            .collect();
        Self::from_angles(max_positions, freq.len(), device, |p, i| {
            let a = p as f64 * freq[i];
            (a.cos() as f32, a.sin() as f32)
        })
    }

    /// Tables computed the way Hugging Face `transformers` computes them (default rope type), in
    /// f32 throughout: `inv_freq = 1 / theta^(2i/d)`, `angle = position * inv_freq`, then cos and
    /// sin. At long positions the f32 product differs from an exact angle; matching the reference
    /// matters more than the exact angle.
    pub fn like_transformers(
        head_dim: usize,
        max_positions: usize,
        theta: f32,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Self::from_angles(max_positions, inv_freq.len(), device, |p, i| {
            let a = p as f32 * inv_freq[i];
            (a.cos(), a.sin())
        })
    }

    /// [`Rotary::yarn_like_transformers`] when the model configures YaRN, else
    /// [`Rotary::like_transformers`]: what every architecture builds from its config.
    pub fn for_config(
        head_dim: usize,
        max_positions: usize,
        theta: f32,
        yarn: Option<&Yarn>,
        device: &Device,
    ) -> candle_core::Result<Self> {
        match yarn {
            Some(y) => Self::yarn_like_transformers(head_dim, max_positions, theta, y, device),
            None => Self::like_transformers(head_dim, max_positions, theta, device),
        }
    }

    /// Tables with YaRN scaling, computed as transformers does (f32 `inv_freq`, f32 angles, cos
    /// and sin times the attention factor).
    pub fn yarn_like_transformers(
        head_dim: usize,
        max_positions: usize,
        theta: f32,
        yarn: &Yarn,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let (inv_freq, scale) = yarn.inv_freq(head_dim, theta);
        Self::from_angles(max_positions, inv_freq.len(), device, |p, i| {
            let a = p as f32 * inv_freq[i];
            (a.cos() * scale, a.sin() * scale)
        })
    }

    /// Tables `[max_positions, half]` of `cos_sin(position, i)`.
    fn from_angles(
        max_positions: usize,
        half: usize,
        device: &Device,
        cos_sin: impl Fn(usize, usize) -> (f32, f32),
    ) -> candle_core::Result<Self> {
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for i in 0..half {
                let (c, s) = cos_sin(p, i);
                cos.push(c);
                sin.push(s);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_positions, half), device)?,
            sin: Tensor::from_vec(sin, (max_positions, half), device)?,
        })
    }

    /// The tables `[max_positions, head_dim / 2]`: cos and sin of every position's angles.
    pub fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// Rotates `x` = [batch, heads, seq, head_dim] by the positions of the pass.
    pub(super) fn apply(&self, x: &Tensor, pass: &PassContext) -> candle_core::Result<Tensor> {
        let cos = self.cos.narrow(0, pass.start_pos, pass.seq)?;
        let sin = self.sin.narrow(0, pass.start_pos, pass.seq)?;
        candle_nn::rotary_emb::rope(x, &cos, &sin)
    }
}

/// `x` `[batch, seq, heads, head_dim]` -> `[batch, heads, seq, head_dim]`, rotated by the pass's
/// positions where `rotary` is given: one pass on the CPU ([`crate::kernel::heads`]), candle's
/// transpose and rope elsewhere (the same bits).
fn split_heads(
    x: Tensor,
    rotary: Option<&Rotary>,
    pass: &PassContext,
) -> candle_core::Result<Tensor> {
    if let Some(y) = split_heads_cpu(&x, rotary, pass)? {
        return Ok(y);
    }
    let x = x.transpose(1, 2)?.contiguous()?;
    match rotary {
        Some(r) => r.apply(&x, pass),
        None => Ok(x),
    }
}

fn split_heads_cpu(
    x: &Tensor,
    rotary: Option<&Rotary>,
    pass: &PassContext,
) -> candle_core::Result<Option<Tensor>> {
    use crate::kernel::heads::RotaryRows;
    // `cpu_slice` is `None` for another device or dtype (of `x` or of the tables): those run
    // candle's transpose and rope.
    let (batch, seq, n, hd) = x.dims4()?;
    let (xs, xl) = x.storage_and_layout();
    let Some(src) = cpu_slice::<f32>(&xs, xl) else {
        return Ok(None);
    };
    let tables = rotary.map(|r| (r.cos.storage_and_layout(), r.sin.storage_and_layout()));
    let rows = match &tables {
        Some(((cs, cl), (ss, sl))) => {
            let half = hd / 2;
            let (Some(cos), Some(sin)) = (cpu_slice::<f32>(cs, cl), cpu_slice::<f32>(ss, sl))
            else {
                return Ok(None);
            };
            let (lo, hi) = (pass.start_pos * half, (pass.start_pos + seq) * half);
            if !hd.is_multiple_of(2) || cos.len() < hi || sin.len() < hi || pass.seq != seq {
                return Ok(None);
            }
            Some(RotaryRows {
                cos: &cos[lo..hi],
                sin: &sin[lo..hi],
            })
        }
        None => None,
    };
    let mut out = vec![0f32; src.len()];
    crate::kernel::heads::split_heads(src, batch, seq, n, hd, rows.as_ref(), &mut out);
    Tensor::from_vec(out, (batch, n, seq, hd), x.device()).map(Some)
}

/// One layer's cached keys and values, [batch, heads, positions, head_dim] each.
#[derive(Clone, Default)]
pub struct KvSlot {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

impl KvSlot {
    /// Appends this pass's keys and values and returns every cached position's.
    pub(super) fn append(&mut self, k: Tensor, v: Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let k = match &self.k {
            Some(prev) => Tensor::cat(&[prev, &k], 2)?,
            None => k,
        };
        let v = match &self.v {
            Some(prev) => Tensor::cat(&[prev, &v], 2)?,
            None => v,
        };
        self.k = Some(k.clone());
        self.v = Some(v.clone());
        Ok((k, v))
    }

    /// Forgets every position.
    pub fn clear(&mut self) {
        self.k = None;
        self.v = None;
    }

    /// The cached keys and values, `[batch, heads, positions, head_dim]` each (none before the
    /// first pass).
    pub fn get(&self) -> Option<(&Tensor, &Tensor)> {
        self.k.as_ref().zip(self.v.as_ref())
    }

    /// Replaces the cached keys and values (`[batch, heads, positions, head_dim]` each): the lean
    /// decode path hands back the positions it decoded.
    pub fn set(&mut self, k: Tensor, v: Tensor) {
        self.k = Some(k);
        self.v = Some(v);
    }
}

/// What the attention sublayer returns: its output and the tensors it computed on the way.
pub struct AttentionOutput {
    /// `x` with attention added.
    pub hidden: Tensor,
    /// Normed input, q, k, v, scores, probabilities and context. The block drops them only after
    /// its FFN has run: freeing these few MiB before the FFN allocates lets glibc return the top
    /// of the heap to the OS and fault it back in at every block (measured on the embedded model:
    /// 25x the page faults and about 30% fewer eval tokens/s).
    pub(super) working: Vec<Tensor>,
}

/// Normalisation of queries and keys, applied before the rotary positions.
pub enum QkNorm {
    /// RMSNorm of each head's vector, weights `[head_dim]` (Qwen3).
    PerHead {
        /// Query norm.
        q: Norm,
        /// Key norm.
        k: Norm,
    },
    /// RMSNorm over the whole projection, all heads together, weights `[heads * head_dim]` and
    /// `[kv_heads * head_dim]` (OLMoE).
    Full {
        /// Query norm.
        q: Norm,
        /// Key norm.
        k: Norm,
    },
}

/// Every part of an [`Attention`], borrowed (for the lean decode path, `model::decode`).
pub struct AttentionParts<'a> {
    /// Pre-norm.
    pub norm: &'a Norm,
    /// Query projection.
    pub q: &'a Linear,
    /// Key projection.
    pub k: &'a Linear,
    /// Value projection.
    pub v: &'a Linear,
    /// Output projection.
    pub o: &'a Linear,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// Rotary tables, if positions are rotary.
    pub rotary: Option<&'a Rotary>,
    /// Query/key norms.
    pub qk_norm: Option<&'a QkNorm>,
    /// Sliding window, if any.
    pub sliding_window: Option<usize>,
    /// `[n_heads]` sink logits.
    pub sinks: Option<&'a Tensor>,
}

/// The attention sublayer: `x + o(attn(q(n(x)), k(n(x)), v(n(x))))` with `n` its pre-norm, and
/// grouped-query attention when there are fewer key/value heads than query heads.
pub struct Attention {
    norm: Norm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    rotary: Option<Rotary>,
    qk_norm: Option<QkNorm>,
    sliding_window: Option<usize>,
    /// `[n_heads]` sink logits (f32).
    sinks: Option<Tensor>,
}

impl Attention {
    /// Assembles the sublayer with as many key/value heads as query heads; `q`, `k` and `v` map
    /// the model width to `n_heads * head_dim`, `o` maps it back.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        norm: Norm,
        q: Linear,
        k: Linear,
        v: Linear,
        o: Linear,
        n_heads: usize,
        head_dim: usize,
        rotary: Option<Rotary>,
    ) -> Self {
        Self {
            norm,
            q,
            k,
            v,
            o,
            n_heads,
            n_kv_heads: n_heads,
            head_dim,
            rotary,
            qk_norm: None,
            sliding_window: None,
            sinks: None,
        }
    }

    /// Grouped-query attention: `k` and `v` have `n_kv_heads` heads, each serving `n_heads /
    /// n_kv_heads` consecutive query heads.
    pub fn with_kv_heads(mut self, n_kv_heads: usize) -> Self {
        self.n_kv_heads = n_kv_heads;
        self
    }

    /// Normalises queries and keys before the rotary positions.
    pub fn with_qk_norm(mut self, qk_norm: QkNorm) -> Self {
        self.qk_norm = Some(qk_norm);
        self
    }

    /// Attention sinks (gpt-oss): each head's learned logit `sinks[h]` joins the softmax
    /// denominator as an extra key with no value, so a query's probabilities over the real keys
    /// sum to less than 1. `sinks` is `[n_heads]`.
    pub fn with_sinks(mut self, sinks: Tensor) -> Self {
        self.sinks = Some(sinks);
        self
    }

    /// Every part, borrowed.
    pub fn parts(&self) -> AttentionParts<'_> {
        AttentionParts {
            norm: &self.norm,
            q: &self.q,
            k: &self.k,
            v: &self.v,
            o: &self.o,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            rotary: self.rotary.as_ref(),
            qk_norm: self.qk_norm.as_ref(),
            sliding_window: self.sliding_window,
            sinks: self.sinks.as_ref(),
        }
    }

    /// A query sees itself and the `window - 1` positions before it, not further back.
    pub fn with_sliding_window(mut self, window: Option<usize>) -> Self {
        self.sliding_window = window;
        self
    }

    /// `x` = [batch * seq, d] -> `x` with attention added. With a cache slot, attends over the
    /// cached positions too and appends this pass's keys and values to it. Records
    /// `timing.attention_ns`. The caller holds the output's working tensors until its block ends.
    pub fn forward(
        &self,
        x: Tensor,
        pass: &PassContext,
        cache: Option<&mut KvSlot>,
        timing: &mut BlockTiming,
    ) -> candle_core::Result<AttentionOutput> {
        let t0 = Instant::now();
        let (batch, seq, nh, hd) = (pass.batch, pass.seq, self.n_heads, self.head_dim);
        let nkv = self.n_kv_heads;
        let a = self.norm.forward(&x)?;
        let (mut q, mut k) = (self.q.forward(&a)?, self.k.forward(&a)?);
        if let Some(QkNorm::Full { q: qn, k: kn }) = &self.qk_norm {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let heads = |t: Tensor, n: usize| t.reshape((batch, seq, n, hd));
        let (mut q, mut k) = (heads(q, nh)?, heads(k, nkv)?);
        if let Some(QkNorm::PerHead { q: qn, k: kn }) = &self.qk_norm {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let rotary = self.rotary.as_ref();
        let (q, k) = (split_heads(q, rotary, pass)?, split_heads(k, rotary, pass)?);
        let v = split_heads(heads(self.v.forward(&a)?, nkv)?, None, pass)?;
        let (k, v) = match cache {
            Some(slot) => slot.append(k, v)?,
            None => (k, v),
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let fused = FusedAttention {
            n_kv_heads: nkv,
            window: self.sliding_window,
            sinks: self.sinks.as_ref(),
            scale,
        };
        let (ctx, working) = match fused.forward(&q, &k, &v, pass)? {
            Some(ctx) => (ctx.clone(), vec![a, q, k, v, ctx]),
            None => {
                let (ctx, [scores, probs]) =
                    self.candle_attention(&q, k.clone(), v.clone(), pass)?;
                (ctx.clone(), vec![a, q, k, v, scores, probs, ctx])
            }
        };
        // Taking `x` by value frees it as soon as the sum exists (allocation order is measurable).
        let out = (x + self.o.forward(&ctx)?)?;
        timing.attention_ns = elapsed_ns(t0, out.device())?;
        Ok(AttentionOutput {
            hidden: out,
            working,
        })
    }
}

impl Attention {
    /// Scores, softmax and context through candle's tensor operations (any device and dtype):
    /// `q` `[b, h, seq, hd]`, `k` and `v` `[b, kv heads, keys, hd]` -> context `[tokens, h * hd]`,
    /// with the scores and probabilities it computed.
    fn candle_attention(
        &self,
        q: &Tensor,
        k: Tensor,
        v: Tensor,
        pass: &PassContext,
    ) -> candle_core::Result<(Tensor, [Tensor; 2])> {
        let (nh, nkv, hd, seq) = (self.n_heads, self.n_kv_heads, self.head_dim, pass.seq);
        let (k, v) = (repeat_kv(k, nh / nkv)?, repeat_kv(v, nh / nkv)?);
        let scale = 1.0 / (hd as f64).sqrt();
        let mut scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?; // [b, h, seq, keys]
        let keys = pass.start_pos + seq;
        match self.sliding_window {
            Some(w) if keys > w => {
                let mask = attention_mask(seq, pass.start_pos, Some(w), scores.device())?;
                scores = scores.broadcast_add(&mask)?;
            }
            _ => {
                if let Some(m) = &pass.mask {
                    scores = scores.broadcast_add(m)?;
                }
            }
        }
        let probs = match &self.sinks {
            // As transformers' eager gpt-oss attention: the sink column joins after the mask,
            // the softmax runs over keys and sink, and the sink's probability is dropped.
            Some(sinks) => {
                let (b, h, rows, keys) = scores.dims4()?;
                let column = sinks
                    .to_dtype(scores.dtype())?
                    .reshape((1, h, 1, 1))?
                    .broadcast_as((b, h, rows, 1))?
                    .contiguous()?;
                let all = Tensor::cat(&[&scores, &column], 3)?;
                candle_nn::ops::softmax_last_dim(&all)?
                    .narrow(3, 0, keys)?
                    .contiguous()?
            }
            None => candle_nn::ops::softmax_last_dim(&scores)?,
        };
        let ctx = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((pass.tokens(), nh * hd))?;
        Ok((ctx, [scores, probs]))
    }
}

/// Scores, softmax and context of a pass in one CPU kernel (`kernel::attention`), where it
/// applies: f32 tensors on the CPU. Elsewhere (a GPU, half-precision activations) the candle
/// path runs.
pub(super) struct FusedAttention<'a> {
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Sliding window, if any.
    pub window: Option<usize>,
    /// `[n_heads]` sink logits.
    pub sinks: Option<&'a Tensor>,
    /// Multiplies every score.
    pub scale: f64,
}

impl FusedAttention<'_> {
    /// `q` `[b, h, seq, hd]`, `k` `[b, kv heads, keys, hd]`, `v` `[b, kv heads, keys, vd]` ->
    /// context `[tokens, h * vd]`; `None` where the kernel does not apply.
    pub(super) fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        pass: &PassContext,
    ) -> candle_core::Result<Option<Tensor>> {
        use crate::kernel::attention::{AttentionShape, causal_attention};
        let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
        if !(cpu_f32(q) && cpu_f32(k) && cpu_f32(v)) {
            return Ok(None);
        }
        let (batch, nh, seq, hd) = q.dims4()?;
        let (_, nkv, keys, vd) = v.dims4()?;
        if nkv != self.n_kv_heads
            || k.dims4()? != (batch, nkv, keys, hd)
            || v.dim(0)? != batch
            || keys != pass.start_pos + seq
            || nkv == 0
            || !nh.is_multiple_of(nkv)
            || self.window == Some(0)
        {
            return Ok(None);
        }
        let sinks = match self.sinks {
            Some(t) => Some(t.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        if sinks.as_ref().is_some_and(|s| s.len() != nh) {
            return Ok(None);
        }
        let shape = AttentionShape {
            batch,
            seq,
            keys,
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            v_dim: vd,
            window: self.window,
        };
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (Some(qv), Some(kv), Some(vv)) = (
            cpu_slice::<f32>(&qs, ql),
            cpu_slice::<f32>(&ks, kl),
            cpu_slice::<f32>(&vs, vl),
        ) else {
            return Ok(None);
        };
        let mut out = vec![0f32; batch * seq * nh * vd];
        causal_attention(
            crate::kernel::KernelVariant::Auto,
            &shape,
            qv,
            kv,
            vv,
            sinks.as_deref(),
            self.scale as f32,
            &mut out,
        );
        Tensor::from_vec(out, (batch * seq, nh * vd), q.device()).map(Some)
    }
}

/// `[b, g, n, d]` -> `[b, g * rep, n, d]`, each key/value head repeated for its `rep` query heads.
fn repeat_kv(t: Tensor, rep: usize) -> candle_core::Result<Tensor> {
    if rep == 1 {
        return Ok(t);
    }
    let (b, g, n, d) = t.dims4()?;
    t.unsqueeze(2)?
        .expand((b, g, rep, n, d))?
        .reshape((b, g * rep, n, d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    /// The candle path (what a GPU runs) and the fused CPU kernel on the same inputs: grouped
    /// heads, a cache before the pass, a sliding window shorter than the keys, sinks.
    #[test]
    fn fused_cpu_kernel_matches_the_candle_path() {
        let dev = Device::Cpu;
        let (nh, nkv, hd) = (4, 2, 16);
        let lin = |o: usize, i: usize| {
            Linear::new(&Tensor::zeros((o, i), DType::F32, &dev).unwrap(), None).unwrap()
        };
        for (batch, seq, start, window, sinks) in [
            (2, 5, 0, None, false),
            (1, 6, 7, None, false),
            (2, 9, 4, Some(5), true),
            (1, 1, 12, Some(4), true),
        ] {
            let keys = start + seq;
            let norm = Norm::new(Tensor::ones(nh * hd, DType::F32, &dev).unwrap(), None, 1e-5);
            let mut attn = Attention::new(
                norm,
                lin(nh * hd, nh * hd),
                lin(nkv * hd, nh * hd),
                lin(nkv * hd, nh * hd),
                lin(nh * hd, nh * hd),
                nh,
                hd,
                None,
            )
            .with_kv_heads(nkv)
            .with_sliding_window(window);
            let sink = Tensor::randn(0f32, 1.0, nh, &dev).unwrap();
            if sinks {
                attn = attn.with_sinks(sink.clone());
            }
            let pass = PassContext::new(batch, seq, start, &dev).unwrap();
            let q = Tensor::randn(0f32, 1.0, (batch, nh, seq, hd), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (batch, nkv, keys, hd), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (batch, nkv, keys, hd), &dev).unwrap();
            let fused = FusedAttention {
                n_kv_heads: nkv,
                window,
                sinks: sinks.then_some(&sink),
                scale: 1.0 / (hd as f64).sqrt(),
            }
            .forward(&q, &k, &v, &pass)
            .unwrap()
            .expect("f32 on the CPU takes the fused kernel");
            let (candle, _) = attn.candle_attention(&q, k, v, &pass).unwrap();
            assert_eq!(fused.dims(), candle.dims());
            let diff = super::super::max_abs_diff(&fused, &candle);
            assert!(
                diff < 1e-5,
                "batch {batch} seq {seq} start {start} window {window:?} sinks {sinks}: {diff}"
            );
        }
    }

    #[test]
    fn causal_mask_lets_each_token_see_the_cache_and_its_predecessors() {
        let pass = PassContext::new(1, 2, 3, &Device::Cpu).unwrap();
        let mask = pass.mask.unwrap().to_vec2::<f32>().unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(
            mask,
            vec![vec![0.0, 0.0, 0.0, 0.0, inf], vec![0.0, 0.0, 0.0, 0.0, 0.0]]
        );
        assert!(
            PassContext::new(4, 1, 7, &Device::Cpu)
                .unwrap()
                .mask
                .is_none()
        );
    }

    #[test]
    fn sliding_window_mask_keeps_the_last_window_positions() {
        let inf = f32::NEG_INFINITY;
        let mask = attention_mask(3, 2, Some(2), &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // Query positions 2, 3, 4 over keys 0..5: each sees itself and the one before.
        assert_eq!(
            mask,
            vec![
                vec![inf, 0.0, 0.0, inf, inf],
                vec![inf, inf, 0.0, 0.0, inf],
                vec![inf, inf, inf, 0.0, 0.0]
            ]
        );
    }

    #[test]
    fn repeat_kv_gives_consecutive_query_heads_the_same_kv_head() {
        let t = Tensor::new(&[[[[1f32]], [[2.]]]], &Device::Cpu).unwrap(); // [1, 2, 1, 1]
        let r = repeat_kv(t, 3).unwrap();
        assert_eq!(r.dims(), &[1, 6, 1, 1]);
        assert_eq!(
            r.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![1., 1., 1., 2., 2., 2.]
        );
    }

    #[test]
    fn kv_slot_appends_positions_in_order_and_clears() {
        let dev = Device::Cpu;
        let first = Tensor::new(&[[[[1f32, 2.]]]], &dev).unwrap(); // [1, 1, 1, 2]
        let second = Tensor::new(&[[[[3f32, 4.], [5., 6.]]]], &dev).unwrap(); // [1, 1, 2, 2]
        let mut slot = KvSlot::default();
        slot.append(first.clone(), first.neg().unwrap()).unwrap();
        let (k, v) = slot.append(second.clone(), second.neg().unwrap()).unwrap();
        let keys = vec![vec![1f32, 2.], vec![3., 4.], vec![5., 6.]];
        assert_eq!(
            k.squeeze(0)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
            keys
        );
        assert_eq!(v.dims(), &[1, 1, 3, 2]);
        assert_eq!(v.sum_all().unwrap().to_scalar::<f32>().unwrap(), -21.0);
        slot.clear();
        let (k, _) = slot.append(second.clone(), second).unwrap();
        assert_eq!(k.dims(), &[1, 1, 2, 2]);
    }

    #[test]
    fn yarn_frequencies_match_transformers() {
        // `ROPE_INIT_FUNCTIONS["yarn"]` of transformers 5.24 on these parameters.
        let check = |yarn: Yarn, d: usize, theta: f32, want: &[f64], want_factor: f64| {
            let (inv, factor) = yarn.inv_freq(d, theta);
            assert_eq!(inv.len(), want.len());
            for (i, (a, b)) in inv.iter().zip(want).enumerate() {
                assert!(
                    (f64::from(*a) - b).abs() <= 1e-6 * b,
                    "inv_freq[{i}] {a} vs {b}"
                );
            }
            assert!((f64::from(factor) - want_factor).abs() < 1e-6, "{factor}");
        };
        let gpt_oss = Yarn {
            factor: 4.0,
            original_max_positions: 32.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            truncate: false,
            attention_factor: None,
            mscale: None,
            mscale_all_dim: None,
        };
        check(
            gpt_oss,
            12,
            150_000.0,
            &[
                1.0,
                0.034_297_157_078_981_4,
                0.004_705_179_482_698_440_6,
                0.000_645_497_231_744_229_8,
                8.855_486_521_497_369e-5,
                1.214_872_645_505_238_3e-5,
            ],
            1.138_629_436_111_989,
        );
        // DeepSeek-style: truncated correction range, mscale / mscale_all_dim.
        let deepseek = Yarn {
            factor: 40.0,
            original_max_positions: 64.0,
            truncate: true,
            mscale: Some(1.0),
            mscale_all_dim: Some(0.707),
            ..gpt_oss
        };
        check(
            deepseek,
            16,
            10_000.0,
            &[
                1.0,
                0.213_453_724_980_354_3,
                0.034_999_996_423_721_31,
                0.000_790_569_465_607_404_7,
                0.000_250_000_011_874_362_8,
                7.905_694_656_074_047e-5,
                2.499_999_936_844_688e-5,
                7.905_694_474_175_107e-6,
            ],
            1.085_726_399_256_135_5,
        );
    }

    #[test]
    fn rotary_leaves_position_zero_and_rotates_later_positions() {
        let dev = Device::Cpu;
        let rotary = Rotary::new(4, 8, 10_000.0, &dev).unwrap();
        let x = Tensor::new(&[[[[1f32, 2., 3., 4.]]]], &dev).unwrap(); // [1, 1, 1, 4]
        let at = |start_pos| {
            let pass = PassContext::new(1, 1, start_pos, &dev).unwrap();
            rotary
                .apply(&x, &pass)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(at(0), vec![1., 2., 3., 4.]);
        // Half-split layout: (x0, x2) rotate by angle p * theta^0 = p.
        let (c, s) = (1f32.cos(), 1f32.sin());
        let moved = at(1);
        assert!((moved[0] - (c - 3. * s)).abs() < 1e-5, "{moved:?}");
        assert!((moved[2] - (3. * c + s)).abs() < 1e-5, "{moved:?}");
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&moved) - 30.).abs() < 1e-4);
    }
}
