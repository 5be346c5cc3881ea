//! Multi-head latent attention (DeepSeek-V2/V3), as transformers 5.24 computes it
//! (`DeepseekV2Attention`, `DeepseekV3Attention`; `docs/hf-families-notes.md`): queries through an
//! optional low-rank bottleneck, keys and values expanded from one normalised latent per token,
//! and a decoupled rotary part: `qk_rope_head_dim` dimensions of each query head and one key
//! head shared by all heads carry the positions, the other `qk_nope_head_dim` do not.
//!
//! The cache holds what DeepSeek designed it to hold: the latent (`kv_lora_rank` values per
//! token) and the rotated shared key (`qk_rope_head_dim`), not per-head keys and values.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{D, Tensor};

use super::attention::{AttentionOutput, FusedAttention, KvSlot, PassContext, Rotary};
use super::{Linear, Norm, elapsed_ns};
use crate::model::config::MlaShape;
use crate::model::quant::QuantMatrix;
use crate::model::trace::BlockTiming;

/// How queries are projected.
pub enum LatentQuery {
    /// One `q_proj` (`q_lora_rank` null, as DeepSeek-V2-Lite).
    Direct(Linear),
    /// `q_b_proj(q_a_layernorm(q_a_proj(x)))`.
    LowRank {
        /// `q_a_proj`, width -> rank.
        a: Linear,
        /// `q_a_layernorm` over the rank.
        norm: Norm,
        /// `q_b_proj`, rank -> heads x qk_head_dim.
        b: Linear,
    },
}

/// How the cached latents become per-head keys and values.
pub enum LatentKv {
    /// `kv_b_proj`, latent -> heads x (qk_nope_head_dim + v_head_dim): every cached latent is
    /// expanded to per-head keys and values (transformers' computation).
    Expand(Linear),
    /// llama.cpp's split form (`attn_k_b`, `attn_v_b`), used absorbed as llama.cpp uses it: each
    /// head's no-position query part is taken into the latent space by its `k_b` rows, the
    /// scores are taken against the latents themselves, and the attention output stays latent
    /// until its `v_b` rows. `kv_b`'s key half is stored transposed per head there, so this is the
    /// form in which both stay as stored (quantised) instead of being transposed back.
    Absorbed {
        /// `[heads * kv_lora_rank, qk_nope_head_dim]`: head h's rows are its key half of `kv_b`,
        /// transposed.
        k_b: Arc<QuantMatrix>,
        /// `[heads * v_head_dim, kv_lora_rank]`: head h's rows are its value half of `kv_b`.
        v_b: Arc<QuantMatrix>,
    },
}

/// The attention sublayer of a DeepSeek block: `x + o(attn(n(x)))` with latent keys and values.
pub struct LatentAttention {
    norm: Norm,
    q: LatentQuery,
    /// `kv_a_proj_with_mqa`: width -> kv_lora_rank + qk_rope_head_dim.
    kv_a: Linear,
    /// `kv_a_layernorm` over the latent.
    kv_norm: Norm,
    /// `kv_b_proj` or its split form.
    kv_b: LatentKv,
    o: Linear,
    heads: usize,
    shape: MlaShape,
    rotary: Rotary,
    interleaved: bool,
    scale: f64,
}

/// The parts of a [`LatentAttention`] (named as the checkpoint names them).
pub struct LatentParts {
    /// Pre-norm.
    pub norm: Norm,
    /// Query projection.
    pub q: LatentQuery,
    /// `kv_a_proj_with_mqa`.
    pub kv_a: Linear,
    /// `kv_a_layernorm`.
    pub kv_norm: Norm,
    /// `kv_b_proj` (or llama.cpp's split `attn_k_b` / `attn_v_b`).
    pub kv_b: LatentKv,
    /// `o_proj`.
    pub o: Linear,
}

/// Every part of a [`LatentAttention`], borrowed (for the lean decode path, `model::decode`).
pub struct LatentView<'a> {
    /// Pre-norm.
    pub norm: &'a Norm,
    /// Query projection.
    pub q: &'a LatentQuery,
    /// `kv_a_proj_with_mqa`: width -> kv_lora_rank + qk_rope_head_dim.
    pub kv_a: &'a Linear,
    /// `kv_a_layernorm` over the latent.
    pub kv_norm: &'a Norm,
    /// `kv_b_proj` or its split form.
    pub kv_b: &'a LatentKv,
    /// `o_proj`.
    pub o: &'a Linear,
    /// Query heads.
    pub heads: usize,
    /// The latent sizes.
    pub shape: MlaShape,
    /// Rotary tables of `qk_rope_head_dim` (YaRN's factor already in cos and sin).
    pub rotary: &'a Rotary,
    /// Rotary pairs are adjacent dimensions, laid out as halves before rotating (see
    /// [`LatentAttention::new`]).
    pub interleaved: bool,
    /// Multiplier of the query-key products.
    pub scale: f64,
}

impl LatentAttention {
    /// Every part, borrowed.
    pub fn parts(&self) -> LatentView<'_> {
        LatentView {
            norm: &self.norm,
            q: &self.q,
            kv_a: &self.kv_a,
            kv_norm: &self.kv_norm,
            kv_b: &self.kv_b,
            o: &self.o,
            heads: self.heads,
            shape: self.shape,
            rotary: &self.rotary,
            interleaved: self.interleaved,
            scale: self.scale,
        }
    }

    /// Assembles the sublayer. `rotary` has tables of `qk_rope_head_dim`; `interleaved` when the
    /// checkpoint pairs rotary dimensions `(2i, 2i + 1)` (V2; V3's `rope_interleave`) rather than
    /// `(i, i + d/2)`; `scale` multiplies the query-key products (`qk_head_dim^-0.5`, times YaRN's
    /// `mscale^2` where the config asks for it).
    pub fn new(
        parts: LatentParts,
        heads: usize,
        shape: MlaShape,
        rotary: Rotary,
        interleaved: bool,
        scale: f64,
    ) -> Self {
        Self {
            norm: parts.norm,
            q: parts.q,
            kv_a: parts.kv_a,
            kv_norm: parts.kv_norm,
            kv_b: parts.kv_b,
            o: parts.o,
            heads,
            shape,
            rotary,
            interleaved,
            scale,
        }
    }

    /// `x` = [batch * seq, d] -> `x` with attention added. With a cache slot, attends over the
    /// cached positions too and appends this pass's latents and rotated keys to it. Records
    /// `timing.attention_ns`.
    pub fn forward(
        &self,
        x: Tensor,
        pass: &PassContext,
        cache: Option<&mut KvSlot>,
        timing: &mut BlockTiming,
    ) -> candle_core::Result<AttentionOutput> {
        let t0 = Instant::now();
        let (batch, seq, nh) = (pass.batch, pass.seq, self.heads);
        let MlaShape {
            kv_lora_rank: rank,
            qk_nope_head_dim: nope,
            qk_rope_head_dim: rope,
            v_head_dim: vd,
            ..
        } = self.shape;
        let a = self.norm.forward(&x)?;
        let q = match &self.q {
            LatentQuery::Direct(q) => q.forward(&a)?,
            LatentQuery::LowRank { a: qa, norm, b } => {
                b.forward(&norm.forward(&qa.forward(&a)?)?)?
            }
        };
        // [b, h, s, nope + rope]
        let q = q
            .reshape((batch, seq, nh, nope + rope))?
            .transpose(1, 2)?
            .contiguous()?;
        let q_nope = q.narrow(D::Minus1, 0, nope)?;
        let q_rope = self.rotate(&q.narrow(D::Minus1, nope, rope)?, pass)?;
        let compressed = self.kv_a.forward(&a)?;
        let latent = self
            .kv_norm
            .forward(&compressed.narrow(1, 0, rank)?.contiguous()?)?
            .reshape((batch, seq, 1, rank))?
            .transpose(1, 2)?;
        let k_rope = compressed
            .narrow(1, rank, rope)?
            .reshape((batch, seq, 1, rope))?
            .transpose(1, 2)?;
        let k_rope = self.rotate(&k_rope, pass)?;
        let (latent, k_rope) = match cache {
            Some(slot) => slot.append(latent.contiguous()?, k_rope)?,
            None => (latent, k_rope),
        };
        let keys = latent.dim(2)?;
        let (working, ctx) = match &self.kv_b {
            LatentKv::Expand(kv_b) => {
                // Every cached latent is expanded to per-head keys and values for this pass.
                let kv = kv_b
                    .forward(&latent.reshape((batch * keys, rank))?)?
                    .reshape((batch, keys, nh, nope + vd))?
                    .transpose(1, 2)?;
                let k = Tensor::cat(
                    &[
                        &kv.narrow(D::Minus1, 0, nope)?,
                        &k_rope.broadcast_as((batch, nh, keys, rope))?,
                    ],
                    D::Minus1,
                )?;
                let v = kv.narrow(D::Minus1, nope, vd)?.contiguous()?;
                let q = Tensor::cat(&[&q_nope, &q_rope], D::Minus1)?.contiguous()?;
                let fused = FusedAttention {
                    n_kv_heads: nh,
                    window: None,
                    sinks: None,
                    scale: self.scale,
                };
                match fused.forward(&q, &k, &v, pass)? {
                    Some(ctx) => (vec![a, q, k, v, ctx.clone()], ctx),
                    None => {
                        let mut scores = (q.matmul(&k.t()?.contiguous()?)? * self.scale)?;
                        if let Some(m) = &pass.mask {
                            scores = scores.broadcast_add(m)?;
                        }
                        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
                        let ctx = probs
                            .matmul(&v)?
                            .transpose(1, 2)?
                            .contiguous()?
                            .reshape((pass.tokens(), nh * vd))?;
                        (vec![a, q, k, v, scores, probs, ctx.clone()], ctx)
                    }
                }
            }
            LatentKv::Absorbed { k_b, v_b } => {
                // Per head, q_nope · k_nope = (q_nope k_b_h^T) · latent: the query enters the
                // latent space once, instead of every cached latent leaving it.
                let heads_abs = (0..nh)
                    .map(|h| {
                        let qn = q_nope
                            .narrow(1, h, 1)?
                            .contiguous()?
                            .reshape((batch * seq, nope))?;
                        k_b.forward_rows(&qn, h * rank, rank)?
                            .reshape((batch, seq, rank))
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                // [b, h * s, rank]: heads outermost, as q is.
                let q_abs = Tensor::cat(&heads_abs, 1)?;
                let latent = latent.reshape((batch, keys, rank))?.contiguous()?;
                let k_rope = k_rope.reshape((batch, keys, rope))?.contiguous()?;
                let q_rope = q_rope.contiguous()?.reshape((batch, nh * seq, rope))?;
                let scores = (q_abs.matmul(&latent.t()?.contiguous()?)?
                    + q_rope.matmul(&k_rope.t()?.contiguous()?)?)?;
                let mut scores = (scores.reshape((batch, nh, seq, keys))? * self.scale)?;
                if let Some(m) = &pass.mask {
                    scores = scores.broadcast_add(m)?;
                }
                let probs = candle_nn::ops::softmax_last_dim(&scores)?;
                // [b, h, s, rank]: the attention output, still latent.
                let ctx_latent = probs
                    .reshape((batch, nh * seq, keys))?
                    .matmul(&latent)?
                    .reshape((batch, nh, seq, rank))?;
                let heads_out = (0..nh)
                    .map(|h| {
                        let c = ctx_latent
                            .narrow(1, h, 1)?
                            .contiguous()?
                            .reshape((batch * seq, rank))?;
                        v_b.forward_rows(&c, h * vd, vd)?
                            .reshape((batch, seq, 1, vd))
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let ctx = Tensor::cat(&heads_out, 2)?.reshape((pass.tokens(), nh * vd))?;
                (vec![a, q, q_abs, latent, scores, probs, ctx_latent], ctx)
            }
        };
        let out = (x + self.o.forward(&ctx)?)?;
        timing.attention_ns = elapsed_ns(t0, out.device())?;
        Ok(AttentionOutput {
            hidden: out,
            working,
        })
    }

    /// Rotates `x` = [batch, heads, seq, rope] by the pass's positions. Interleaved pairs are
    /// first laid out as halves (evens, then odds), which is exactly what V3's
    /// `apply_rotary_pos_emb_interleave` outputs; V2 keeps the pairs in place instead, a
    /// permutation shared by queries and keys that leaves every product, and so the output,
    /// unchanged.
    fn rotate(&self, x: &Tensor, pass: &PassContext) -> candle_core::Result<Tensor> {
        let x = if self.interleaved {
            let (b, h, s, d) = x.dims4()?;
            x.reshape((b, h, s, d / 2, 2))?
                .transpose(3, 4)?
                .reshape((b, h, s, d))?
        } else {
            x.contiguous()?
        };
        self.rotary.apply(&x.contiguous()?, pass)
    }
}

/// DeepSeek's attention scale: `qk_head_dim^-0.5`, times `m^2` with `m = 0.1 · mscale_all_dim ·
/// ln(factor) + 1` when YaRN has a non-zero `mscale_all_dim` and a factor above 1
/// (`yarn_apply_mscale`).
pub fn softmax_scale(qk_head_dim: usize, yarn: Option<&super::Yarn>) -> f64 {
    let base = (qk_head_dim as f64).powf(-0.5);
    match yarn {
        Some(y) if y.factor > 1.0 => match y.mscale_all_dim {
            Some(all) if all != 0.0 => {
                let m = 0.1 * all * y.factor.ln() + 1.0;
                base * m * m
            }
            _ => base,
        },
        _ => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::blocks::Yarn;

    #[test]
    fn softmax_scale_follows_mscale_all_dim() {
        let yarn = Yarn {
            factor: 4.0,
            original_max_positions: 32.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            truncate: true,
            attention_factor: None,
            mscale: Some(0.707),
            mscale_all_dim: Some(0.707),
        };
        let m = 0.1 * 0.707 * 4f64.ln() + 1.0;
        assert!((softmax_scale(16, Some(&yarn)) - m * m / 4.0).abs() < 1e-12);
        assert_eq!(softmax_scale(16, None), 0.25);
        let none = Yarn {
            mscale_all_dim: None,
            ..yarn
        };
        assert_eq!(softmax_scale(16, Some(&none)), 0.25);
    }
}
