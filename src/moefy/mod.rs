//! Dense to XMoE (`xmoe-top moefy`, issue 14; the method is in `docs/dense-to-xmoe.md`): split
//! each FFN of a trained dense Llama-family model into `E` equal experts (neurons grouped by
//! co-activation, or at random), train a router per block to predict each expert's share of the
//! FFN output, and write a model of the project's format whose experts are summed
//! (`combine: "sum"`), so that selecting every expert is exactly the dense model. Everything that
//! is not an FFN is copied unchanged.

pub mod eval;
pub mod lm;
pub mod router;
pub mod source;
pub mod split;

use anyhow::{Result, bail};
use candle_core::Tensor;

use crate::kernel::Activation;
use crate::model::config::{
    Combine, FORMAT_VERSION, ModelConfig, MoeLayers, NormKind, PositionKind, TokenizerKind,
};
use crate::routing::RoutingPolicy;
use crate::workload::tokenizer::{Encoded, TextTokenizer};
pub use lm::Lm;
pub use router::RouterTraining;
pub use source::DenseModel;
pub use split::SplitKind;

/// What a conversion does.
#[derive(Clone, Debug)]
pub struct MoefyOptions {
    /// Experts per FFN.
    pub experts: usize,
    /// How neurons are grouped.
    pub split: SplitKind,
    /// Calibration tokens used (the text must have at least this many).
    pub calib_tokens: usize,
    /// Convert only the first this many blocks (the rest keep their dense FFN).
    pub blocks: Option<usize>,
    /// Tokens per calibration sequence.
    pub seq_len: usize,
    /// Router training.
    pub router: RouterTraining,
    /// Seed of the random split, the k-means start and the router's batches.
    pub seed: u64,
}

/// Fewest calibration tokens accepted: the router needs several tokens per expert to learn from,
/// and the clustering a firing pattern longer than the expert count.
pub fn min_calib_tokens(experts: usize) -> usize {
    (16 * experts).max(256)
}

/// Checks the options against the dense model before any work: `--experts` must divide the FFN
/// width and not exceed it, `--blocks` must be within the model, enough calibration tokens.
pub fn check_options(dense: &DenseModel, o: &MoefyOptions) -> Result<()> {
    let h = dense.config.ffn_hidden;
    if o.experts == 0 || o.experts > h {
        bail!(
            "--experts {} must be in 1..={h} (the FFN width of {})",
            o.experts,
            dense.path.display()
        );
    }
    if !h.is_multiple_of(o.experts) {
        let divisors: Vec<String> = (2..=h.min(256))
            .filter(|k| h.is_multiple_of(*k))
            .map(|k| k.to_string())
            .collect();
        bail!(
            "--experts {} does not divide the FFN width {h} of {}; experts must be equal (divisors up to 256: {})",
            o.experts,
            dense.path.display(),
            divisors.join(", ")
        );
    }
    if o.experts > u16::MAX as usize {
        bail!("--experts {} exceeds {}", o.experts, u16::MAX);
    }
    if let Some(b) = o.blocks
        && (b == 0 || b > dense.config.layers)
    {
        bail!(
            "--blocks {b} must be in 1..={} (the model's blocks)",
            dense.config.layers
        );
    }
    let min = min_calib_tokens(o.experts);
    if o.calib_tokens < min {
        bail!(
            "--calib-tokens {} is too few for {} experts: at least {min} (16 per expert, at least 256)",
            o.calib_tokens,
            o.experts
        );
    }
    let ctx = dense.config.context_length.unwrap_or(lm::DEFAULT_CONTEXT);
    if o.seq_len < 2 || o.seq_len > ctx {
        bail!(
            "--seq-len {} must be in 2..={ctx} (the model's context)",
            o.seq_len
        );
    }
    Ok(())
}

/// The calibration sequences: the first `calib_tokens` tokens of `text`, cut into sequences of
/// `seq_len` (the last one shorter sequences are dropped, so the count is rounded down to whole
/// sequences). Fails, saying how much text is needed, when the text is too short.
pub fn calibration_tokens(
    tokenizer: &TextTokenizer,
    text: &[u8],
    name: &str,
    o: &MoefyOptions,
) -> Result<Vec<Vec<u32>>> {
    let enc = tokenizer.encode(text)?;
    let need = o.calib_tokens.div_ceil(o.seq_len) * o.seq_len;
    if enc.ids.len() < need {
        let per_token = text.len() as f64 / enc.ids.len().max(1) as f64;
        bail!(
            "{name}: the calibration text has {} tokens ({} bytes) but --calib-tokens {} needs {need} (whole sequences of {}): about {:.0} kB of text like it, or lower --calib-tokens (at least {} for {} experts)",
            enc.ids.len(),
            text.len(),
            o.calib_tokens,
            o.seq_len,
            need as f64 * per_token.max(1.0) / 1000.0,
            min_calib_tokens(o.experts),
            o.experts
        );
    }
    Ok(enc.ids[..need]
        .chunks(o.seq_len)
        .map(<[u32]>::to_vec)
        .collect())
}

/// One converted block.
pub struct ConvertedBlock {
    /// Neuron order: expert `e` is neurons `perm[e·h .. (e+1)·h]` of the dense FFN.
    pub perm: Vec<u32>,
    /// The router `[E, d]`.
    pub router: Tensor,
    /// Mean share of the FFN output each expert carries over the calibration tokens.
    pub mean_share: Vec<f32>,
    /// Held-out KL (nats) of the router's prediction, and of the uniform one.
    pub heldout_kl: (f64, f64),
}

/// A finished conversion, ready to write or evaluate.
pub struct Conversion {
    /// Experts per converted block.
    pub experts: usize,
    /// How neurons were grouped.
    pub split: SplitKind,
    /// The converted blocks, first to last (blocks past these keep their dense FFN).
    pub blocks: Vec<ConvertedBlock>,
}

/// Progress of a long step: `(what, done, total)`.
pub type Progress<'a> = &'a mut dyn FnMut(&str, usize, usize);

/// Converts the first blocks of `lm` (all, or `o.blocks`) with the calibration sequences `calib`.
/// Runs the dense model block by block: each block's FFN inputs and activations on the
/// calibration tokens give its split, the experts' true shares and its router; the dense FFN
/// output then feeds the next block.
pub fn convert(
    lm: &Lm,
    calib: &[Vec<u32>],
    o: &MoefyOptions,
    progress: Progress,
) -> Result<Conversion> {
    let n_blocks = o.blocks.unwrap_or(lm.blocks.len());
    let seq = calib[0].len();
    // Sequences per pass: bounds the attention scores' memory.
    let group = 8usize;
    let mut xs: Vec<(Tensor, usize)> = Vec::new();
    for chunk in calib.chunks(group) {
        let tokens: Vec<u32> = chunk.concat();
        let pass = lm.pass(chunk.len(), seq)?;
        xs.push((lm.embed(&tokens, &pass)?, chunk.len()));
    }
    let mut blocks = Vec::with_capacity(n_blocks);
    for i in 0..n_blocks {
        progress(&format!("block {i}: calibration"), i, n_blocks);
        let b = &lm.blocks[i];
        let mut fs = Vec::new();
        let mut hs = Vec::new();
        for (x, batch) in xs.iter_mut() {
            let pass = lm.pass(*batch, seq)?;
            let a = lm.attend(i, x.clone(), &pass)?;
            let f = b.ffn_norm.forward(&a)?;
            let h = b.ffn.hidden(&f)?;
            *x = (a + b.ffn.down(&h)?)?;
            fs.push(f);
            hs.push(h);
        }
        let f = Tensor::cat(&fs, 0)?;
        let h = Tensor::cat(&hs, 0)?;
        drop((fs, hs));
        progress(&format!("block {i}: {} split", o.split), i, n_blocks);
        let perm = split::split(&h, o.experts, o.split, o.seed.wrapping_add(i as u64))?;
        let permuted = lm::FfnWeights::new(&b.ffn.gate, &b.ffn.up, &b.ffn.down, Some(&perm))?;
        let idx = Tensor::from_slice(&perm, perm.len(), h.device())?;
        let hp = h.index_select(&idx, 1)?;
        drop(h);
        let norms = permuted.expert_norms(&hp, o.experts)?;
        let total = norms.sum_keepdim(1)?.clamp(1e-30, f32::MAX)?;
        let shares = norms.broadcast_div(&total)?;
        let mean_share = shares.mean(0)?.to_vec1::<f32>()?;
        progress(&format!("block {i}: router training"), i, n_blocks);
        let r = router::train(&f, &shares, o.router, o.seed.wrapping_add(1000 + i as u64))?;
        blocks.push(ConvertedBlock {
            perm,
            router: r.weight,
            mean_share,
            heldout_kl: (r.heldout_kl, r.uniform_kl),
        });
    }
    progress("done", n_blocks, n_blocks);
    Ok(Conversion {
        experts: o.experts,
        split: o.split,
        blocks,
    })
}

/// A tensor to write: name, shape, f32 values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// The configuration of the converted model.
pub fn converted_config(dense: &DenseModel, conv: &Conversion) -> ModelConfig {
    let c = &dense.config;
    let e = conv.experts;
    let converted = conv.blocks.len();
    let moe_layers = if converted == c.layers {
        MoeLayers::Keyword("all".into())
    } else {
        MoeLayers::List((0..converted).collect())
    };
    ModelConfig {
        format_version: FORMAT_VERSION,
        name: format!("{}-moefy{e}", c.name),
        vocab_size: c.vocab,
        tokenizer: TokenizerKind::HuggingFace,
        d_model: c.hidden,
        n_layers: c.layers,
        n_heads: c.heads,
        n_kv_heads: Some(c.kv_heads),
        head_size: Some(c.head_dim),
        max_seq_len: c.context_length.unwrap_or(lm::DEFAULT_CONTEXT),
        norm: NormKind::RmsNorm,
        norm_eps: c.rms_norm_eps,
        positions: PositionKind::Rotary,
        rope_theta: c.rope_theta,
        activation: Activation::Silu,
        gated: true,
        attn_bias: false,
        dense_ffn_hidden: c.ffn_hidden,
        ffn_bias: false,
        moe_layers,
        n_experts: e,
        expert_hidden: c.ffn_hidden / e,
        expert_bias: false,
        combine: Combine::Sum,
        tie_embeddings: c.tie_embeddings,
        default_policy: RoutingPolicy::threshold(0.9),
        ..ModelConfig::byte_level(c.hidden, c.layers, c.heads, 1, e, c.ffn_hidden / e, 1)
    }
}

/// Every tensor of the converted model under the format's names, f32: the dense model's
/// non-FFN tensors unchanged, dense FFNs for the blocks not converted, and for the converted ones
/// the router and the stacked experts (`gate_proj`/`up_proj` `[E, h, d]`, `down_proj`
/// `[E, d, h]`).
pub fn converted_tensors(dense: &DenseModel, conv: &Conversion) -> Result<Vec<NamedTensor>> {
    let c = &dense.config;
    let mut out = Vec::new();
    let mut put = |name: String, t: &Tensor| -> Result<()> {
        out.push((name, t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?));
        Ok(())
    };
    put(
        "tok_embeddings.weight".into(),
        dense.tensor("model.embed_tokens.weight"),
    )?;
    put("norm_f.weight".into(), dense.tensor("model.norm.weight"))?;
    if !c.tie_embeddings {
        put("lm_head.weight".into(), dense.tensor("lm_head.weight"))?;
    }
    let (e, d) = (conv.experts, c.hidden);
    for i in 0..c.layers {
        let hf = |n: &str| dense.tensor(&format!("model.layers.{i}.{n}"));
        let p = format!("layers.{i}");
        put(
            format!("{p}.attn_norm.weight"),
            hf("input_layernorm.weight"),
        )?;
        put(
            format!("{p}.ffn_norm.weight"),
            hf("post_attention_layernorm.weight"),
        )?;
        for x in ["q", "k", "v", "o"] {
            put(
                format!("{p}.attn.{x}_proj.weight"),
                hf(&format!("self_attn.{x}_proj.weight")),
            )?;
        }
        let (gate, up, down) = (
            hf("mlp.gate_proj.weight"),
            hf("mlp.up_proj.weight"),
            hf("mlp.down_proj.weight"),
        );
        match conv.blocks.get(i) {
            None => {
                put(format!("{p}.ffn.gate_proj.weight"), gate)?;
                put(format!("{p}.ffn.up_proj.weight"), up)?;
                put(format!("{p}.ffn.down_proj.weight"), down)?;
            }
            Some(b) => {
                let h = c.ffn_hidden / e;
                let w = lm::FfnWeights::new(gate, up, down, Some(&b.perm))?;
                put(format!("{p}.moe.router.weight"), &b.router)?;
                put(
                    format!("{p}.moe.experts.gate_proj"),
                    &w.gate.reshape((e, h, d))?,
                )?;
                put(
                    format!("{p}.moe.experts.up_proj"),
                    &w.up.reshape((e, h, d))?,
                )?;
                put(
                    format!("{p}.moe.experts.down_proj"),
                    &w.down.reshape((d, e, h))?.transpose(0, 1)?.contiguous()?,
                )?;
            }
        }
    }
    Ok(out)
}

/// Tokens of `text` with the bytes each covers (for bits per byte).
pub fn encode(tokenizer: &TextTokenizer, text: &[u8]) -> Result<Encoded> {
    Ok(tokenizer.encode(text)?)
}
