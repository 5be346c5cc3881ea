//! The project's own format (`docs/model-format.md`): `tok_embeddings`, optional `pos_embeddings`,
//! `layers.{i}.{attn_norm, attn.{q,k,v,o}_proj, ffn_norm, ffn.* | moe.{router, experts}.*}`,
//! `norm_f` and an optional untied `lm_head`.

use candle_core::{Device, Tensor};

use crate::model::blocks::{
    Attention, Block, BlockFfn, Embedding, Ffn, Linear, MoeBlock, Norm, Rotary,
};
use crate::model::config::{NormKind, PositionKind};
use crate::model::format::{LoadError, ModelFile};
use crate::model::forward::ModelParts;
use crate::model::moe::{LoadOptions, MoeExperts};

/// Builds every block of `file` on `device`.
pub fn build(
    file: &ModelFile,
    device: &Device,
    options: LoadOptions,
) -> Result<ModelParts, LoadError> {
    let cfg = file.config();
    let de = |e: candle_core::Error| LoadError::Device {
        path: file.path().to_path_buf(),
        detail: e.to_string(),
    };
    let t = |name: &str, shape: &[usize]| -> Result<Tensor, LoadError> {
        Tensor::from_vec(file.f32(name), shape, device).map_err(de)
    };
    let (d, v) = (cfg.d_model, cfg.vocab_size);
    let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear, LoadError> {
        let w = t(&format!("{name}.weight"), &[out, inp])?;
        let b = if bias {
            Some(t(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        Linear::new(&w, b).map_err(de)
    };
    let norm = |prefix: &str| -> Result<Norm, LoadError> {
        let b = if cfg.norm == NormKind::LayerNorm {
            Some(t(&format!("{prefix}.bias"), &[d])?)
        } else {
            None
        };
        Ok(Norm::new(
            t(&format!("{prefix}.weight"), &[d])?,
            b,
            cfg.norm_eps as f32,
        ))
    };
    let tok_emb = t("tok_embeddings.weight", &[v, d])?;
    let pos_emb = if cfg.positions == PositionKind::Learned {
        Some(t("pos_embeddings.weight", &[cfg.max_seq_len, d])?)
    } else {
        None
    };
    let rotary = if cfg.positions == PositionKind::Rotary {
        Some(Rotary::new(cfg.head_dim(), cfg.max_seq_len, cfg.rope_theta, device).map_err(de)?)
    } else {
        None
    };
    let moe_layers = cfg.moe_layer_indices();
    let block = |i: usize| -> Result<Block, LoadError> {
        let p = format!("layers.{i}");
        let ffn_norm = norm(&format!("{p}.ffn_norm"))?;
        let ffn = if let Some(slot) = moe_layers.iter().position(|&l| l == i) {
            let router = t(&format!("{p}.moe.router.weight"), &[cfg.n_experts, d])?;
            let experts = MoeExperts::load(
                file,
                &format!("{p}.moe.experts"),
                file.is_per_expert(i),
                device,
                options,
            )?;
            BlockFfn::Moe(Box::new(
                MoeBlock::new(ffn_norm, &router, experts, slot)
                    .map_err(de)?
                    .with_combine(cfg.combine),
            ))
        } else {
            let h = cfg.dense_ffn_hidden;
            let gate = if cfg.gated {
                Some(linear(&format!("{p}.ffn.gate_proj"), h, d, cfg.ffn_bias)?)
            } else {
                None
            };
            BlockFfn::Dense(Ffn::new(
                ffn_norm,
                linear(&format!("{p}.ffn.up_proj"), h, d, cfg.ffn_bias)?,
                gate,
                linear(&format!("{p}.ffn.down_proj"), d, h, cfg.ffn_bias)?,
                cfg.activation,
            ))
        };
        let (qw, kvw) = (
            cfg.n_heads * cfg.head_dim(),
            cfg.kv_heads() * cfg.head_dim(),
        );
        let attention = Attention::new(
            norm(&format!("{p}.attn_norm"))?,
            linear(&format!("{p}.attn.q_proj"), qw, d, cfg.attn_bias)?,
            linear(&format!("{p}.attn.k_proj"), kvw, d, cfg.attn_bias)?,
            linear(&format!("{p}.attn.v_proj"), kvw, d, cfg.attn_bias)?,
            linear(&format!("{p}.attn.o_proj"), d, qw, cfg.attn_bias)?,
            cfg.n_heads,
            cfg.head_dim(),
            rotary.clone(),
        )
        .with_kv_heads(cfg.kv_heads());
        Ok(Block::new(attention, ffn))
    };
    // Converting and packing the weights is most of the load time: on the CPU, layers load on
    // all cores. (GPU uploads stay on one thread.)
    let blocks = if device.is_cpu() {
        use rayon::prelude::*;
        (0..cfg.n_layers)
            .into_par_iter()
            .map(block)
            .collect::<Result<Vec<_>, _>>()?
    } else {
        (0..cfg.n_layers)
            .map(block)
            .collect::<Result<Vec<_>, _>>()?
    };
    let head = if cfg.tie_embeddings {
        tok_emb.clone()
    } else {
        t("lm_head.weight", &[v, d])?
    };
    Ok(ModelParts {
        embedding: Embedding::new(tok_emb, pos_emb),
        blocks,
        final_norm: norm("norm_f")?,
        lm_head: Linear::new(&head, None).map_err(de)?,
    })
}
