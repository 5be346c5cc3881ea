//! The blocks of a GGUF MoE model, from llama.cpp's tensor names (`gguf` Python package,
//! `constants.py` `TENSOR_NAMES`): the same [blocks](crate::model::blocks) a Hugging Face
//! checkpoint of the family builds, every weight dequantised to f32.

use std::cell::RefCell;
use std::collections::BTreeSet;

use candle_core::{Device, Tensor};

use super::{GgufArch, GgufFile, GgufModel, candle_message, gguf_error};
use crate::kernel::Activation;
use crate::model::blocks::{
    Attention, Block, BlockFfn, Embedding, Ffn, Linear, MoeBlock, Norm, QkNorm, Rotary,
    SharedExpert,
};
use crate::model::format::LoadError;
use crate::model::forward::ModelParts;
use crate::model::moe::{ExpertWeights, LoadOptions, MoeExperts};

/// Undoes `convert_hf_to_gguf.py`'s `LlamaModel.permute` on a q or k projection `[heads *
/// head_dim, in]`: the converter reorders each head's rows from Hugging Face's half-split rotary
/// layout (first half, second half) to GGML's adjacent pairs, so that llama.cpp can rotate pairs
/// (x0, x1), (x2, x3), ...; xmoe-top's rotary is the half-split one.
pub fn unpermute_rope_rows(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let half = rows / heads / 2;
    w.reshape((heads, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// Builds every block of `model` on `device`. Returns the parts and the names of the tensors it
/// did not use (reported as warnings).
pub fn build(
    model: &GgufModel,
    device: &Device,
    options: LoadOptions,
) -> Result<(ModelParts, Vec<String>), LoadError> {
    let g = model.file();
    let c = model.hf_config();
    let used = RefCell::new(BTreeSet::new());
    let de = |e: candle_core::Error| LoadError::Device {
        path: g.path().to_path_buf(),
        detail: candle_message(&e),
    };
    let load = |name: &str, shape: &[usize]| -> Result<Tensor, LoadError> {
        used.borrow_mut().insert(name.to_string());
        g.tensor(name, shape, device)
    };
    let (h, eps) = (c.hidden, c.rms_norm_eps as f32);
    let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear, LoadError> {
        let w = load(&format!("{name}.weight"), &[out, inp])?;
        let b = if bias {
            Some(load(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        Linear::stored(w, b).map_err(de)
    };
    let rms = |name: &str, n: usize| -> Result<Norm, LoadError> {
        Ok(Norm::new(load(&format!("{name}.weight"), &[n])?, None, eps))
    };
    let rotary =
        Rotary::like_transformers(c.head_dim, c.max_positions, c.rope_theta as f32, device)
            .map_err(de)?;
    let (q_w, kv_w) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
    let permuted = model.arch() == GgufArch::Llama;
    let mut blocks = Vec::with_capacity(c.layers);
    for i in 0..c.layers {
        let b = format!("blk.{i}");
        let qkv_bias = c.qkv_bias || c.attention_bias;
        let (mut q, mut k) = (
            load(&format!("{b}.attn_q.weight"), &[q_w, h])?,
            load(&format!("{b}.attn_k.weight"), &[kv_w, h])?,
        );
        if permuted {
            q = unpermute_rope_rows(&q, c.heads).map_err(de)?;
            k = unpermute_rope_rows(&k, c.kv_heads).map_err(de)?;
        }
        let bias = |name: &str, n: usize| -> Result<Option<Tensor>, LoadError> {
            qkv_bias
                .then(|| load(&format!("{b}.{name}.bias"), &[n]))
                .transpose()
        };
        let mut attention = Attention::new(
            rms(&format!("{b}.attn_norm"), h)?,
            Linear::stored(q, bias("attn_q", q_w)?).map_err(de)?,
            Linear::stored(k, bias("attn_k", kv_w)?).map_err(de)?,
            linear(&format!("{b}.attn_v"), kv_w, h, qkv_bias)?,
            linear(&format!("{b}.attn_output"), h, q_w, c.attention_bias)?,
            c.heads,
            c.head_dim,
            Some(rotary.clone()),
        )
        .with_kv_heads(c.kv_heads)
        .with_sliding_window(c.sliding_window[i]);
        attention = match model.arch() {
            GgufArch::Qwen3Moe => attention.with_qk_norm(QkNorm::PerHead {
                q: rms(&format!("{b}.attn_q_norm"), c.head_dim)?,
                k: rms(&format!("{b}.attn_k_norm"), c.head_dim)?,
            }),
            GgufArch::Olmoe => attention.with_qk_norm(QkNorm::Full {
                q: rms(&format!("{b}.attn_q_norm"), q_w)?,
                k: rms(&format!("{b}.attn_k_norm"), kv_w)?,
            }),
            GgufArch::Llama | GgufArch::Qwen2Moe => attention,
        };
        let ffn_norm = rms(&format!("{b}.ffn_norm"), h)?;
        let ffn = if let Some(slot) = c.moe_layers.iter().position(|&l| l == i) {
            let router = load(&format!("{b}.ffn_gate_inp.weight"), &[c.experts, h])?;
            let weights = experts(g, &b, c.experts, c.expert_hidden, h, &load)?;
            let experts =
                MoeExperts::from_weights(weights, Activation::Silu, device, options).map_err(de)?;
            let mut moe = MoeBlock::new(ffn_norm, &router, experts, slot).map_err(de)?;
            if let Some(s) = c.shared_expert_hidden {
                let gate = linear(&format!("{b}.ffn_gate_shexp"), s, h, false)?;
                let up = linear(&format!("{b}.ffn_up_shexp"), s, h, false)?;
                let down = linear(&format!("{b}.ffn_down_shexp"), h, s, false)?;
                // The converter keeps the HF shape [1, H]; a file may also hold it as [H].
                let name = format!("{b}.ffn_gate_inp_shexp.weight");
                let scale = match g.shape(&name) {
                    Some([n]) if *n == h => load(&name, &[h])?.reshape((1, h)).map_err(de)?,
                    _ => load(&name, &[1, h])?,
                };
                let scale = Linear::stored(scale, None).map_err(de)?;
                moe = moe.with_shared(SharedExpert::new(
                    gate,
                    up,
                    down,
                    Activation::Silu,
                    Some(scale),
                ));
            }
            BlockFfn::Moe(Box::new(moe))
        } else {
            let width = c.dense_hidden.unwrap_or(c.expert_hidden);
            let gate = linear(&format!("{b}.ffn_gate"), width, h, false)?;
            let up = linear(&format!("{b}.ffn_up"), width, h, false)?;
            let down = linear(&format!("{b}.ffn_down"), h, width, false)?;
            BlockFfn::Dense(Ffn::new(ffn_norm, up, Some(gate), down, Activation::Silu))
        };
        blocks.push(Block::new(attention, ffn));
    }
    let emb = load("token_embd.weight", &[c.vocab, h])?;
    let head = if c.tie_embeddings {
        emb.clone()
    } else {
        load("output.weight", &[c.vocab, h])?
    };
    let parts = ModelParts {
        embedding: Embedding::new(emb, None),
        blocks,
        final_norm: rms("output_norm", h)?,
        lm_head: Linear::stored(head, None).map_err(de)?,
    };
    let used = used.into_inner();
    let unused = g
        .names()
        .into_iter()
        .filter(|n| !used.contains(*n))
        // llama.cpp's precomputed rotary frequencies: the rotary tables are computed from
        // `rope.freq_base` (a file whose factors are not the plain ones was refused at open).
        .filter(|n| *n != "rope_freqs.weight")
        .map(|n| {
            format!(
                "tensor `{n}` is not used by the {} forward",
                model.arch().name()
            )
        })
        .collect();
    Ok((parts, unused))
}

/// Reads a tensor by name, checked against a shape.
type TensorLoader<'a> = dyn Fn(&str, &[usize]) -> Result<Tensor, LoadError> + 'a;

/// The experts of block `b`, split out of the stacked `ffn_{gate,up}_exps.weight` `[E, I, H]`
/// and `ffn_down_exps.weight` `[E, H, I]` (GGUF dims `[H, I, E]` and `[I, H, E]`).
fn experts(
    g: &GgufFile,
    b: &str,
    n: usize,
    inter: usize,
    h: usize,
    load: &TensorLoader,
) -> Result<ExpertWeights, LoadError> {
    let split = |name: &str, shape: [usize; 3]| -> Result<Vec<Tensor>, LoadError> {
        let t = load(&format!("{b}.{name}.weight"), &shape)?;
        (0..n)
            .map(|e| t.get(e))
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(|e| {
                gguf_error(
                    g.path(),
                    format!("tensor `{b}.{name}.weight`: {}", candle_message(&e)),
                )
            })
    };
    Ok(ExpertWeights {
        gate: split("ffn_gate_exps", [n, inter, h])?,
        up: split("ffn_up_exps", [n, inter, h])?,
        down: split("ffn_down_exps", [n, h, inter])?,
    })
}
