//! The dense model as the engine's own blocks (embedding, attention with grouped-query heads and
//! rotary positions, norms, LM head), with the FFN left open: calibration reads each block's FFN
//! input, evaluation chooses which neurons each token uses. The attention, norms and rotary tables
//! are built exactly as `model::arch::xmoe` builds them for the converted file, so the only
//! difference between this model and the converted one is the FFN.

use anyhow::Result;
use candle_core::{D, Device, Tensor};

use super::source::DenseModel;
use crate::model::blocks::{Attention, Embedding, Linear, Norm, PassContext, Rotary};
use crate::model::trace::BlockTiming;

/// One block's SwiGLU FFN weights, `[out, in]`, neurons in the order given at build.
pub struct FfnWeights {
    /// `[H, d]`.
    pub gate: Tensor,
    /// `[H, d]`.
    pub up: Tensor,
    /// `[d, H]`.
    pub down: Tensor,
    gate_l: Linear,
    up_l: Linear,
    down_l: Linear,
}

impl FfnWeights {
    /// The FFN with its neurons in the order of `perm` (all of `0..H`, each once).
    pub fn new(gate: &Tensor, up: &Tensor, down: &Tensor, perm: Option<&[u32]>) -> Result<Self> {
        let (gate, up, down) = match perm {
            Some(p) => {
                let idx = Tensor::from_slice(p, p.len(), gate.device())?;
                (
                    gate.index_select(&idx, 0)?,
                    up.index_select(&idx, 0)?,
                    down.index_select(&idx, 1)?.contiguous()?,
                )
            }
            None => (gate.clone(), up.clone(), down.clone()),
        };
        Ok(Self {
            gate_l: Linear::new(&gate, None)?,
            up_l: Linear::new(&up, None)?,
            down_l: Linear::new(&down, None)?,
            gate,
            up,
            down,
        })
    }

    /// The activations `silu(gate f) * up f`, `[n, H]`.
    pub fn hidden(&self, f: &Tensor) -> Result<Tensor> {
        Ok((self.gate_l.forward(f)?.silu()? * self.up_l.forward(f)?)?)
    }

    /// `down h`, `[n, d]`.
    pub fn down(&self, h: &Tensor) -> Result<Tensor> {
        Ok(self.down_l.forward(h)?)
    }

    /// Norm of each expert's contribution `down_e h_e` when the neurons are in `e` consecutive
    /// groups of `H / e`: `[n, e]`, in token chunks so the `[e, n, d]` products stay small.
    pub fn expert_norms(&self, h: &Tensor, experts: usize) -> Result<Tensor> {
        let (n, width) = h.dims2()?;
        let hs = width / experts;
        let d = self.down.dim(0)?;
        // [E, hs, d]: expert e's columns of down, transposed.
        let down_t = self
            .down
            .reshape((d, experts, hs))?
            .permute((1, 2, 0))?
            .contiguous()?;
        let mut parts = Vec::new();
        let chunk = 512;
        let mut start = 0;
        while start < n {
            let m = chunk.min(n - start);
            let hc = h
                .narrow(0, start, m)?
                .reshape((m, experts, hs))?
                .transpose(0, 1)?
                .contiguous()?; // [E, m, hs]
            let y = hc.matmul(&down_t)?; // [E, m, d]
            let norms = y.sqr()?.sum(D::Minus1)?.sqrt()?; // [E, m]
            parts.push(norms.t()?.contiguous()?);
            start += m;
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}

/// One block: attention sublayer (with its pre-norm and residual), FFN pre-norm, FFN weights.
pub struct LmBlock {
    /// The attention sublayer.
    pub attention: Attention,
    /// The FFN's pre-norm.
    pub ffn_norm: Norm,
    /// The original FFN (neurons in the dense model's order).
    pub ffn: FfnWeights,
}

/// The dense model's non-FFN parts plus its FFNs.
pub struct Lm {
    /// Token embedding.
    pub embedding: Embedding,
    /// Blocks in order.
    pub blocks: Vec<LmBlock>,
    /// Final norm.
    pub final_norm: Norm,
    /// LM head.
    pub lm_head: Linear,
    /// Vocabulary size.
    pub vocab: usize,
    /// Context length the rotary tables cover.
    pub max_seq_len: usize,
}

/// Context the rotary tables cover when the model does not say.
pub const DEFAULT_CONTEXT: usize = 2048;

impl Lm {
    /// Builds the model from `dense` (f32, CPU).
    pub fn new(dense: &DenseModel) -> Result<Self> {
        let c = &dense.config;
        let dev = Device::Cpu;
        let eps = c.rms_norm_eps as f32;
        let norm = |name: &str| Norm::new(dense.tensor(name).clone(), None, eps);
        let linear = |name: &str| Linear::new(dense.tensor(name), None);
        let max_seq_len = c.context_length.unwrap_or(DEFAULT_CONTEXT);
        let rotary = Rotary::new(c.head_dim, max_seq_len, c.rope_theta, &dev)?;
        let mut blocks = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let p = format!("model.layers.{i}");
            let attention = Attention::new(
                norm(&format!("{p}.input_layernorm.weight")),
                linear(&format!("{p}.self_attn.q_proj.weight"))?,
                linear(&format!("{p}.self_attn.k_proj.weight"))?,
                linear(&format!("{p}.self_attn.v_proj.weight"))?,
                linear(&format!("{p}.self_attn.o_proj.weight"))?,
                c.heads,
                c.head_dim,
                Some(rotary.clone()),
            )
            .with_kv_heads(c.kv_heads);
            let ffn = FfnWeights::new(
                dense.tensor(&format!("{p}.mlp.gate_proj.weight")),
                dense.tensor(&format!("{p}.mlp.up_proj.weight")),
                dense.tensor(&format!("{p}.mlp.down_proj.weight")),
                None,
            )?;
            blocks.push(LmBlock {
                attention,
                ffn_norm: norm(&format!("{p}.post_attention_layernorm.weight")),
                ffn,
            });
        }
        let embed = dense.tensor("model.embed_tokens.weight").clone();
        let head = if c.tie_embeddings {
            embed.clone()
        } else {
            dense.tensor("lm_head.weight").clone()
        };
        Ok(Lm {
            embedding: Embedding::new(embed, None),
            blocks,
            final_norm: norm("model.norm.weight"),
            lm_head: Linear::new(&head, None)?,
            vocab: c.vocab,
            max_seq_len,
        })
    }

    /// The pass context of `batch` sequences of `seq` tokens.
    pub fn pass(&self, batch: usize, seq: usize) -> Result<PassContext> {
        Ok(PassContext::new(batch, seq, 0, &Device::Cpu)?)
    }

    /// Token embeddings of `tokens` (`batch` sequences, row-major), `[n, d]`.
    pub fn embed(&self, tokens: &[u32], pass: &PassContext) -> Result<Tensor> {
        let ids = Tensor::from_slice(tokens, tokens.len(), &Device::Cpu)?;
        Ok(self.embedding.forward(&ids, pass)?)
    }

    /// Block `i`'s attention sublayer: `x` plus attention.
    pub fn attend(&self, i: usize, x: Tensor, pass: &PassContext) -> Result<Tensor> {
        let mut timing = BlockTiming::default();
        let out = self.blocks[i]
            .attention
            .forward(x, pass, None, &mut timing)?;
        Ok(out.hidden)
    }

    /// Logits `[n, vocab]` of the final residual `x`.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(&self.final_norm.forward(x)?)?)
    }

    /// The dense model's logits for `batch` sequences of `tokens` (row-major), `[n, vocab]`.
    pub fn dense_logits(&self, tokens: &[u32], batch: usize) -> Result<Tensor> {
        let pass = self.pass(batch, tokens.len() / batch)?;
        let mut x = self.embed(tokens, &pass)?;
        for (i, b) in self.blocks.iter().enumerate() {
            x = self.attend(i, x, &pass)?;
            let f = b.ffn_norm.forward(&x)?;
            x = (x + b.ffn.down(&b.ffn.hidden(&f)?)?)?;
        }
        self.logits(&x)
    }
}

/// Cross-entropy in nats of `logits` `[n, vocab]` against `targets`, summed.
pub fn nll_sum(logits: &Tensor, targets: &[u32]) -> Result<f64> {
    let lp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let idx = Tensor::from_slice(targets, (targets.len(), 1), logits.device())?;
    let picked = lp.gather(&idx, 1)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(-picked.iter().map(|&v| v as f64).sum::<f64>())
}
