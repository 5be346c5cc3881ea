//! Hugging Face `deepseek_v2` and `deepseek_v3` checkpoints: multi-head latent attention, the
//! DeepSeek routers, ungated shared experts, dense blocks before `first_k_dense_replace`. Tensor
//! names as transformers 5.24 writes them (`docs/hf-families-notes.md`), experts either per
//! expert (`mlp.experts.{j}.{gate,up,down}_proj.weight`, the published layout) or fused.

use std::cell::RefCell;
use std::collections::BTreeSet;

use candle_core::{Device, Tensor};

use super::hf::gated_experts;
use crate::kernel::Activation;
use crate::model::blocks::mla::softmax_scale;
use crate::model::blocks::{
    Block, BlockFfn, Embedding, Ffn, LatentAttention, LatentKv, LatentParts, LatentQuery, Linear,
    MoeBlock, Norm, Rotary, SharedExpert,
};
use crate::model::format::LoadError;
use crate::model::forward::ModelParts;
use crate::model::hf::{HfCheckpoint, HfFamily};
use crate::model::moe::LoadOptions;
use crate::routing::{GroupLimit, Router, SigmoidRouter, SoftmaxGroups};

/// Builds every block of a DeepSeek checkpoint on `device`. Returns the parts and the names of
/// the tensors it did not use (reported as warnings: e.g. the multi-token-prediction layers
/// after `num_hidden_layers`, which the forward does not run).
/// The router of a DeepSeek MoE block: V3's sigmoid scores with their correction bias (given
/// as `v3_bias`) for choosing, else V2's softmax with its group limit.
pub(crate) fn router_of(
    c: &crate::model::hf::HfConfig,
    ds: &crate::model::hf::config::DeepseekConfig,
    v3_bias: Option<Vec<f32>>,
    selection: crate::routing::SigmoidSelection,
) -> Router {
    match v3_bias {
        Some(bias) => Router::Sigmoid(SigmoidRouter {
            bias,
            // noaux_tc always groups; config.rs filled the groups (1 x all by default).
            groups: ds.groups.unwrap_or(GroupLimit {
                n_group: 1,
                topk_group: 1,
            }),
            norm_topk_prob: c.norm_topk_prob,
            scaling: ds.routed_scaling_factor as f32,
            selection,
        }),
        None => Router::SoftmaxGroups(SoftmaxGroups {
            groups: ds.groups,
            scaling: ds.routed_scaling_factor as f32,
        }),
    }
}

pub fn build(
    ckpt: &HfCheckpoint,
    device: &Device,
    options: LoadOptions,
) -> Result<(ModelParts, Vec<String>), LoadError> {
    let c = ckpt.hf_config();
    let Some(ds) = c.deepseek.as_deref().copied() else {
        return Err(LoadError::Device {
            path: ckpt.dir().to_path_buf(),
            detail: format!("{} is not a DeepSeek configuration", c.family.model_type()),
        });
    };
    let mla = ds.mla;
    let used = RefCell::new(BTreeSet::new());
    let de = |e: candle_core::Error| LoadError::Device {
        path: ckpt.dir().to_path_buf(),
        detail: e.to_string(),
    };
    let stored = |name: &str, shape: &[usize]| -> Result<Tensor, LoadError> {
        used.borrow_mut().insert(name.to_string());
        ckpt.tensor(name, shape, device)
    };
    let widened = |name: &str, shape: &[usize]| -> Result<Tensor, LoadError> {
        used.borrow_mut().insert(name.to_string());
        ckpt.tensor_f32(name, shape, device)
    };
    let (h, eps, heads) = (c.hidden, c.rms_norm_eps as f32, c.heads);
    let dense_amx = options.dense_amx(device);
    let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear, LoadError> {
        let w = stored(&format!("{name}.weight"), &[out, inp])?;
        let b = if bias {
            Some(widened(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear::stored(w, b).map_err(de)?.on_amx(dense_amx))
    };
    let rms = |name: &str, n: usize| -> Result<Norm, LoadError> {
        Ok(Norm::new(
            widened(&format!("{name}.weight"), &[n])?,
            None,
            eps,
        ))
    };
    let gated_mlp = |p: &str, width: usize| -> Result<(Linear, Linear, Linear), LoadError> {
        Ok((
            linear(&format!("{p}.gate_proj"), width, h, false)?,
            linear(&format!("{p}.up_proj"), width, h, false)?,
            linear(&format!("{p}.down_proj"), h, width, false)?,
        ))
    };
    let rope = mla.qk_rope_head_dim;
    let rotary = Rotary::for_config(
        rope,
        c.max_positions,
        c.rope_theta as f32,
        c.rope_yarn.as_deref(),
        device,
    )
    .map_err(de)?;
    let scale = softmax_scale(mla.qk_head_dim(), c.rope_yarn.as_deref());
    let qk = heads * mla.qk_head_dim();
    let bias = c.attention_bias;
    let mut blocks = Vec::with_capacity(c.layers);
    for i in 0..c.layers {
        let p = format!("model.layers.{i}");
        let a = format!("{p}.self_attn");
        let q = match mla.q_lora_rank {
            None => LatentQuery::Direct(linear(&format!("{a}.q_proj"), qk, h, false)?),
            Some(r) => LatentQuery::LowRank {
                a: linear(&format!("{a}.q_a_proj"), r, h, bias)?,
                norm: rms(&format!("{a}.q_a_layernorm"), r)?,
                b: linear(&format!("{a}.q_b_proj"), qk, r, false)?,
            },
        };
        let parts = LatentParts {
            norm: rms(&format!("{p}.input_layernorm"), h)?,
            q,
            kv_a: linear(
                &format!("{a}.kv_a_proj_with_mqa"),
                mla.kv_lora_rank + rope,
                h,
                bias,
            )?,
            kv_norm: rms(&format!("{a}.kv_a_layernorm"), mla.kv_lora_rank)?,
            kv_b: LatentKv::Expand(linear(
                &format!("{a}.kv_b_proj"),
                heads * (mla.qk_nope_head_dim + mla.v_head_dim),
                mla.kv_lora_rank,
                false,
            )?),
            o: linear(&format!("{a}.o_proj"), h, heads * mla.v_head_dim, bias)?,
        };
        let attention =
            LatentAttention::new(parts, heads, mla, rotary.clone(), ds.rope_interleave, scale);
        let ffn_norm = rms(&format!("{p}.post_attention_layernorm"), h)?;
        let ffn = if let Some(slot) = c.moe_layers.iter().position(|&l| l == i) {
            let m = format!("{p}.mlp");
            let router_w = widened(&format!("{m}.gate.weight"), &[c.experts, h])?;
            let router = match c.family {
                HfFamily::DeepseekV3 => Some(
                    widened(&format!("{m}.gate.e_score_correction_bias"), &[c.experts])?
                        .to_vec1::<f32>()
                        .map_err(de)?,
                ),
                _ => None,
            };
            let router = router_of(c, &ds, router, options.sigmoid_selection);
            let shape = (c.experts, c.expert_hidden, h);
            let experts =
                gated_experts(ckpt, c.family, &m, shape, device, options, &stored, &used)?;
            let mut moe = MoeBlock::new(ffn_norm, &router_w, experts, slot)
                .map_err(de)?
                .with_router(router);
            if let Some(s) = c.shared_expert_hidden {
                let (g, u, d) = gated_mlp(&format!("{m}.shared_experts"), s)?;
                moe = moe.with_shared(SharedExpert::new(g, u, d, Activation::Silu, None));
            }
            BlockFfn::Moe(Box::new(moe))
        } else {
            let width = c.dense_hidden.unwrap_or(c.expert_hidden);
            let (g, u, d) = gated_mlp(&format!("{p}.mlp"), width)?;
            BlockFfn::Dense(Ffn::new(ffn_norm, u, Some(g), d, Activation::Silu))
        };
        blocks.push(Block::new(attention, ffn));
    }
    let emb = stored("model.embed_tokens.weight", &[c.vocab, h])?;
    let head = if c.tie_embeddings {
        emb.clone()
    } else {
        stored("lm_head.weight", &[c.vocab, h])?
    };
    let parts = ModelParts {
        embedding: Embedding::new(emb, None),
        blocks,
        final_norm: rms("model.norm", h)?,
        lm_head: Linear::stored(head, None).map_err(de)?.on_amx(dense_amx),
    };
    let used = used.into_inner();
    let unused = ckpt
        .names()
        .into_iter()
        .filter(|n| !used.contains(*n))
        .map(|n| {
            format!(
                "tensor `{n}` is not used by the {} forward",
                c.family.model_type()
            )
        })
        .collect();
    Ok((parts, unused))
}
