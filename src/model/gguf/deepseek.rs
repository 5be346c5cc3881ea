//! llama.cpp's `deepseek2` architecture (DeepSeek-V2, V2-Lite, V3, Kimi-K2), as
//! `convert_hf_to_gguf.py`'s `DeepseekV2Model` writes it and `llama-model.cpp` reads it
//! (`docs/gguf.md`): the metadata mapped onto the same `deepseek_v2` / `deepseek_v3`
//! configuration a Hugging Face checkpoint gives, and the tensors onto the same blocks
//! ([`LatentAttention`], the DeepSeek routers, ungated shared experts, leading dense blocks).
//!
//! Two key/value layouts exist: legacy files hold `attn_kv_b` (Hugging Face's `kv_b_proj`), current
//! converters split it into `attn_k_b` (each head's key half, transposed) and `attn_v_b`, which
//! run absorbed ([`LatentKv::Absorbed`]) so that both stay as stored.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde_json::{Map, json};

use super::build::{experts, in_place_experts, is_block_type};
use super::config::{Meta, describe, vocab_size};
use super::{GgufFile, GgufModel, TensorType, candle_message, gguf_error};
use crate::kernel::Activation;
use crate::model::blocks::mla::softmax_scale;
use crate::model::blocks::{
    Block, BlockFfn, Embedding, Ffn, LatentAttention, LatentKv, LatentParts, LatentQuery, Linear,
    MoeBlock, Norm, Rotary, SharedExpert,
};
use crate::model::format::LoadError;
use crate::model::forward::ModelParts;
use crate::model::hf::{HfConfig, HfFamily};
use crate::model::moe::{LoadOptions, MoeDispatch, MoeExperts};
use crate::model::quant::{GateUp, QuantExperts, QuantMatrix};

/// llama.cpp's `LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX` (`expert_gating_func`).
const GATING_SOFTMAX: usize = 1;
/// `LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID`.
const GATING_SIGMOID: usize = 2;

/// The configuration of a `deepseek2` file, as the equivalent `config.json` keys checked by
/// [`HfConfig::parse`]. Every GGUF key is read and checked here first, so that an error names it.
pub(crate) fn hf_config(m: &Meta) -> Result<HfConfig, LoadError> {
    let g = m.g;
    let mut c = Map::new();
    let hidden = m.uint("embedding_length", 1 << 16)?;
    let all_blocks = m.uint("block_count", 4096)?;
    // Multi-token-prediction blocks (DeepSeek-V3.2, GLM) follow the trunk; the forward does not
    // run them and their tensors are reported as unused.
    let nextn = m.uint_opt("nextn_predict_layers")?.unwrap_or(0);
    if nextn >= all_blocks {
        return Err(m.bad(
            &m.key("nextn_predict_layers"),
            format!("must be fewer than block_count {all_blocks}, found {nextn}"),
        ));
    }
    let layers = all_blocks - nextn;
    let heads = m.uint("attention.head_count", 4096)?;
    let eps = m.rms_eps("")?;
    let rope = m.uint("rope.dimension_count", 4096)?;
    let kv_rank = m.uint("attention.kv_lora_rank", 1 << 16)?;
    let q_rank = m.uint_opt("attention.q_lora_rank")?.filter(|&r| r > 0);
    // Current converters write the MLA head sizes under `*_mla` and, under `key_length` /
    // `value_length`, the sizes llama.cpp's absorbed attention sees (rank + rope, rank); legacy
    // files have only the latter, meaning the per-head sizes.
    let (qk, v) = match (
        m.uint_opt("attention.key_length_mla")?,
        m.uint_opt("attention.value_length_mla")?,
    ) {
        (Some(k), Some(v)) => {
            for (key, want) in [
                ("attention.key_length", kv_rank + rope),
                ("attention.value_length", kv_rank),
            ] {
                if let Some(found) = m.uint_opt(key)?
                    && found != want
                {
                    return Err(m.bad(
                        &m.key(key),
                        format!(
                            "with attention.key_length_mla, expected kv_lora_rank (+ rope.dimension_count) = {want}, found {found}"
                        ),
                    ));
                }
            }
            (k, v)
        }
        (None, None) => (
            m.uint("attention.key_length", 1 << 16)?,
            m.uint("attention.value_length", 1 << 16)?,
        ),
        (Some(_), None) => {
            return Err(m.bad(
                &m.key("attention.value_length_mla"),
                "required with attention.key_length_mla but missing",
            ));
        }
        (None, Some(_)) => {
            return Err(m.bad(
                &m.key("attention.key_length_mla"),
                "required with attention.value_length_mla but missing",
            ));
        }
    };
    if qk <= rope {
        return Err(m.bad(
            &m.key("attention.key_length_mla"),
            format!(
                "the query/key head size must exceed rope.dimension_count {rope} (the part without positions), found {qk}"
            ),
        ));
    }
    let experts = m.uint("expert_count", u16::MAX as usize)?;
    let top_k = m.uint("expert_used_count", experts)?;
    let expert_ffn = m.uint("expert_feed_forward_length", 1 << 20)?;
    let dense = m.uint_opt("leading_dense_block_count")?.unwrap_or(0);
    if dense > layers {
        return Err(m.bad(
            &m.key("leading_dense_block_count"),
            format!("at most the {layers} blocks, found {dense}"),
        ));
    }
    let ffn = m.uint_opt("feed_forward_length")?;
    let dense_ffn = match (ffn, dense) {
        (Some(f), _) => f,
        (None, 0) => expert_ffn,
        (None, _) => {
            return Err(m.bad(
                &m.key("feed_forward_length"),
                format!("required for the {dense} leading dense blocks but missing"),
            ));
        }
    };
    let gating = m.uint_opt("expert_gating_func")?.unwrap_or(GATING_SOFTMAX);
    let norm = m.bool_opt("expert_weights_norm")?.unwrap_or(false);
    let sigmoid = match gating {
        GATING_SOFTMAX => false,
        GATING_SIGMOID => true,
        other => {
            return Err(m.bad(
                &m.key("expert_gating_func"),
                format!("only softmax (1) and sigmoid (2) are supported, found {other}"),
            ));
        }
    };
    if !sigmoid && norm {
        return Err(m.bad(
            &m.key("expert_weights_norm"),
            "true with softmax gating: DeepSeek-V2's router never renormalises its top-k weights (not supported)",
        ));
    }
    let n_group = m.uint_opt("expert_group_count")?.unwrap_or(0);
    let topk_group = m.uint_opt("expert_group_used_count")?.unwrap_or(0);
    if n_group > 1 {
        if !experts.is_multiple_of(n_group) {
            return Err(m.bad(
                &m.key("expert_group_count"),
                format!("must divide the {experts} experts (expert_count), found {n_group}"),
            ));
        }
        if topk_group == 0 || topk_group > n_group {
            return Err(m.bad(
                &m.key("expert_group_used_count"),
                format!("must be in 1..={n_group} (expert_group_count), found {topk_group}"),
            ));
        }
    }
    // Absent: llama.cpp does not scale (its `scale_w` is false).
    let scaling = m.float_opt("expert_weights_scale")?.unwrap_or(1.0);
    let shared = m.uint_opt("expert_shared_count")?.unwrap_or(0);

    c.insert(
        "model_type".into(),
        json!(if sigmoid {
            "deepseek_v3"
        } else {
            "deepseek_v2"
        }),
    );
    c.insert("hidden_size".into(), json!(hidden));
    c.insert("num_hidden_layers".into(), json!(layers));
    c.insert("num_attention_heads".into(), json!(heads));
    // MLA has one latent per token, not key/value heads; the converter writes 1 (an MQA view).
    c.insert("num_key_value_heads".into(), json!(heads));
    c.insert("rms_norm_eps".into(), json!(eps));
    c.insert("vocab_size".into(), json!(vocab_size(m)?));
    if let Some(ctx) = m.uint_opt("context_length")? {
        c.insert("max_position_embeddings".into(), json!(ctx.max(1)));
    }
    c.insert("rope_parameters".into(), rope_parameters(m)?);
    c.insert("q_lora_rank".into(), json!(q_rank));
    c.insert("kv_lora_rank".into(), json!(kv_rank));
    c.insert("qk_nope_head_dim".into(), json!(qk - rope));
    c.insert("qk_rope_head_dim".into(), json!(rope));
    // transformers' alias of the rotary width; without it the parser would want the embedding
    // width divisible by the heads, which MLA does not need.
    c.insert("head_dim".into(), json!(rope));
    c.insert("v_head_dim".into(), json!(v));
    // llama.cpp rotates adjacent pairs (its NORM rope) on the converter's unpermuted rows: what
    // transformers calls interleaved.
    c.insert("rope_interleave".into(), json!(true));
    c.insert("n_routed_experts".into(), json!(experts));
    c.insert("num_experts_per_tok".into(), json!(top_k));
    c.insert("moe_intermediate_size".into(), json!(expert_ffn));
    c.insert("intermediate_size".into(), json!(dense_ffn));
    c.insert("first_k_dense_replace".into(), json!(dense));
    c.insert("n_shared_experts".into(), json!(shared));
    c.insert("routed_scaling_factor".into(), json!(scaling));
    c.insert("norm_topk_prob".into(), json!(norm));
    c.insert(
        "scoring_func".into(),
        json!(if sigmoid { "sigmoid" } else { "softmax" }),
    );
    let grouped = n_group > 1;
    c.insert(
        "topk_method".into(),
        json!(match (sigmoid, grouped) {
            (true, _) => "noaux_tc",
            (false, true) => "group_limited_greedy",
            (false, false) => "greedy",
        }),
    );
    if grouped {
        c.insert("n_group".into(), json!(n_group));
        c.insert("topk_group".into(), json!(topk_group));
    }
    c.insert("tie_word_embeddings".into(), json!(!g.has("output.weight")));
    let text = serde_json::Value::Object(c).to_string();
    HfConfig::parse(g.path(), &text).map_err(|e| {
        gguf_error(
            g.path(),
            format!("the metadata does not describe a valid model: {e}"),
        )
    })
}

/// `rope.freq_base` and `rope.scaling.*` as transformers' `rope_parameters`. llama.cpp stores
/// YaRN's `mscale_all_dim` as `rope.scaling.yarn_log_multiplier` = 0.1 x it (and divides by 0.1
/// again on load), and not `mscale` at all: its attention computes as if `mscale` =
/// `mscale_all_dim`, as every published DeepSeek config has it, so that is what is mapped.
pub(crate) fn rope_parameters(m: &Meta) -> Result<serde_json::Value, LoadError> {
    let theta = m.float_opt("rope.freq_base")?.unwrap_or(10_000.0);
    let kind = m.str_opt("rope.scaling.type")?.unwrap_or("none");
    match kind {
        "none" => Ok(json!({"rope_type": "default", "rope_theta": theta})),
        "yarn" => {
            let factor = m.float_opt("rope.scaling.factor")?.ok_or_else(|| {
                m.bad(
                    &m.key("rope.scaling.factor"),
                    "required for rope scaling \"yarn\" but missing",
                )
            })?;
            let original = m
                .uint_opt("rope.scaling.original_context_length")?
                .ok_or_else(|| {
                    m.bad(
                        &m.key("rope.scaling.original_context_length"),
                        "required for rope scaling \"yarn\" but missing",
                    )
                })?;
            let mut p = json!({
                "rope_type": "yarn",
                "rope_theta": theta,
                "factor": factor,
                "original_max_position_embeddings": original,
                "beta_fast": m.float_opt("rope.scaling.yarn_beta_fast")?.unwrap_or(32.0),
                "beta_slow": m.float_opt("rope.scaling.yarn_beta_slow")?.unwrap_or(1.0),
            });
            let key = m.key("rope.scaling.yarn_log_multiplier");
            let log_mul = match m.g.metadata().get(&key) {
                None => None,
                Some(v) => match v {
                    candle_core::quantized::gguf_file::Value::F32(x) if x.is_finite() => {
                        Some(*x as f64)
                    }
                    candle_core::quantized::gguf_file::Value::F64(x) if x.is_finite() => Some(*x),
                    other => {
                        return Err(m.bad(
                            &key,
                            format!("expected a number, found {}", describe(other)),
                        ));
                    }
                },
            };
            if let Some(l) = log_mul.filter(|&l| l > 0.0) {
                let all = l / 0.1;
                p["mscale"] = json!(all);
                p["mscale_all_dim"] = json!(all);
            }
            if let Some(a) = m.float_opt("rope.scaling.yarn_attn_factor")? {
                p["attention_factor"] = json!(a);
            }
            Ok(p)
        }
        other => Err(m.bad(
            &m.key("rope.scaling.type"),
            format!("rope scaling \"{other}\" is not supported (none, yarn)"),
        )),
    }
}

/// Reads the tensors of one file onto a device, recording which it used; matrices stay as
/// stored on the CPU unless the f32 reference is asked for.
struct Loader<'a> {
    g: &'a GgufFile,
    device: &'a Device,
    keep: bool,
    eps: f32,
    used: RefCell<BTreeSet<String>>,
}

impl Loader<'_> {
    fn de(&self, e: candle_core::Error) -> LoadError {
        LoadError::Device {
            path: self.g.path().to_path_buf(),
            detail: candle_message(&e),
        }
    }

    /// Tensor `name` dequantised to f32.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor, LoadError> {
        self.used.borrow_mut().insert(name.to_string());
        self.g.tensor(name, shape, self.device)
    }

    /// Tensor `name` as stored when kept (quantised blocks, F16/BF16), else f32; outer
    /// dimensions flattened into rows.
    fn matrix(&self, name: &str, shape: &[usize]) -> Result<QuantMatrix, LoadError> {
        let kept = self.keep && self.g.dtype(name).is_some_and(|d| d != TensorType::F32);
        if kept {
            self.used.borrow_mut().insert(name.to_string());
            self.g.matrix(name, shape)
        } else {
            let t = self.tensor(name, shape)?;
            QuantMatrix::float(t).map_err(|e| self.de(e))
        }
    }

    fn linear(&self, name: &str, out: usize, inp: usize) -> Result<Linear, LoadError> {
        let w = format!("{name}.weight");
        let kept = self.keep && self.g.dtype(&w).is_some_and(|d| d != TensorType::F32);
        if kept {
            let m = self.matrix(&w, &[out, inp])?;
            Linear::quantized(Arc::new(m), None)
        } else {
            Linear::stored(self.tensor(&w, &[out, inp])?, None)
        }
        .map_err(|e| self.de(e))
    }

    fn rms(&self, name: &str, n: usize) -> Result<Norm, LoadError> {
        Ok(Norm::new(
            self.tensor(&format!("{name}.weight"), &[n])?,
            None,
            self.eps,
        ))
    }
}

/// Builds every block of a `deepseek2` model on `device`. Returns the parts and the names of
/// the tensors it did not use (reported as warnings).
pub(crate) fn build(
    model: &GgufModel,
    device: &Device,
    options: LoadOptions,
) -> Result<(ModelParts, Vec<String>), LoadError> {
    let g = model.file();
    let c = model.hf_config();
    let Some(ds) = c.deepseek.as_deref().copied() else {
        return Err(gguf_error(
            g.path(),
            "a deepseek2 file mapped to a configuration without DeepSeek settings",
        ));
    };
    let l = Loader {
        g,
        device,
        keep: device.is_cpu() && !model.dequantizes(),
        eps: c.rms_norm_eps as f32,
        used: RefCell::new(BTreeSet::new()),
    };
    let mla = ds.mla;
    let (h, heads) = (c.hidden, c.heads);
    let (rank, nope, rope, vd) = (
        mla.kv_lora_rank,
        mla.qk_nope_head_dim,
        mla.qk_rope_head_dim,
        mla.v_head_dim,
    );
    let rotary = Rotary::for_config(
        rope,
        c.max_positions,
        c.rope_theta as f32,
        c.rope_yarn.as_deref(),
        device,
    )
    .map_err(|e| l.de(e))?;
    let scale = softmax_scale(mla.qk_head_dim(), c.rope_yarn.as_deref());
    let qk = heads * mla.qk_head_dim();
    let mut blocks = Vec::with_capacity(c.layers);
    for i in 0..c.layers {
        let b = format!("blk.{i}");
        let q = match mla.q_lora_rank {
            None => LatentQuery::Direct(l.linear(&format!("{b}.attn_q"), qk, h)?),
            Some(r) => LatentQuery::LowRank {
                a: l.linear(&format!("{b}.attn_q_a"), r, h)?,
                norm: l.rms(&format!("{b}.attn_q_a_norm"), r)?,
                b: l.linear(&format!("{b}.attn_q_b"), qk, r)?,
            },
        };
        // The split form when the file has it (current converters), else the legacy `kv_b`.
        let kv_b = if g.has(&format!("{b}.attn_k_b.weight")) {
            LatentKv::Absorbed {
                k_b: Arc::new(l.matrix(&format!("{b}.attn_k_b.weight"), &[heads, rank, nope])?),
                v_b: Arc::new(l.matrix(&format!("{b}.attn_v_b.weight"), &[heads, vd, rank])?),
            }
        } else {
            LatentKv::Expand(l.linear(&format!("{b}.attn_kv_b"), heads * (nope + vd), rank)?)
        };
        let parts = LatentParts {
            norm: l.rms(&format!("{b}.attn_norm"), h)?,
            q,
            kv_a: l.linear(&format!("{b}.attn_kv_a_mqa"), rank + rope, h)?,
            kv_norm: l.rms(&format!("{b}.attn_kv_a_norm"), rank)?,
            kv_b,
            o: l.linear(&format!("{b}.attn_output"), h, heads * vd)?,
        };
        let attention = LatentAttention::new(parts, heads, mla, rotary.clone(), true, scale);
        let ffn_norm = l.rms(&format!("{b}.ffn_norm"), h)?;
        let ffn = if let Some(slot) = c.moe_layers.iter().position(|&x| x == i) {
            let router_w = l.tensor(&format!("{b}.ffn_gate_inp.weight"), &[c.experts, h])?;
            let router = match c.family {
                HfFamily::DeepseekV3 => {
                    // llama.cpp treats the correction bias as optional (no bias: none added).
                    let name = format!("{b}.exp_probs_b.bias");
                    Some(if g.has(&name) {
                        l.tensor(&name, &[c.experts])?
                            .to_vec1::<f32>()
                            .map_err(|e| l.de(e))?
                    } else {
                        vec![0.0; c.experts]
                    })
                }
                _ => None,
            };
            let router =
                crate::model::arch::deepseek::router_of(c, &ds, router, options.sigmoid_selection);
            let names = ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]
                .map(|t| format!("{b}.{t}.weight"));
            // `--moe-dispatch candle` and `--moe-dispatch kernel` ask for a float path (see build.rs).
            let float_path = options.dispatch != MoeDispatch::Auto;
            let quantised = l.keep && names.iter().any(|n| g.dtype(n).is_some_and(is_block_type));
            let (n, inter) = (c.experts, c.expert_hidden);
            let in_place = in_place_experts(
                g,
                &b,
                (n, inter, h),
                l.keep && !quantised,
                device,
                options,
                &l.used,
            )?;
            let moe_experts = if let Some(x) = in_place {
                x
            } else if quantised && !float_path {
                let gate = l.matrix(&names[0], &[n, inter, h])?;
                let up = l.matrix(&names[1], &[n, inter, h])?;
                let down = l.matrix(&names[2], &[n, h, inter])?;
                let q = QuantExperts::new(n, inter, h, GateUp::Separate { gate, up }, down)
                    .map_err(|e| gguf_error(g.path(), format!("{b}: {}", candle_message(&e))))?;
                MoeExperts::quantized(q, Activation::Silu)
            } else {
                let load = |name: &str, shape: &[usize]| l.tensor(name, shape);
                let weights = experts(g, &b, n, inter, h, &load)?;
                MoeExperts::from_weights(weights, Activation::Silu, device, options)
                    .map_err(|e| l.de(e))?
            };
            let mut moe = MoeBlock::new(ffn_norm, &router_w, moe_experts, slot)
                .map_err(|e| l.de(e))?
                .with_router(router);
            if let Some(s) = c.shared_expert_hidden {
                let gate = l.linear(&format!("{b}.ffn_gate_shexp"), s, h)?;
                let up = l.linear(&format!("{b}.ffn_up_shexp"), s, h)?;
                let down = l.linear(&format!("{b}.ffn_down_shexp"), h, s)?;
                moe = moe.with_shared(SharedExpert::new(gate, up, down, Activation::Silu, None));
            }
            BlockFfn::Moe(Box::new(moe))
        } else {
            let width = c.dense_hidden.unwrap_or(c.expert_hidden);
            let gate = l.linear(&format!("{b}.ffn_gate"), width, h)?;
            let up = l.linear(&format!("{b}.ffn_up"), width, h)?;
            let down = l.linear(&format!("{b}.ffn_down"), h, width)?;
            BlockFfn::Dense(Ffn::new(ffn_norm, up, Some(gate), down, Activation::Silu))
        };
        blocks.push(Block::new(attention, ffn));
    }
    let emb = "token_embd.weight";
    let (embedding, lm_head) = if l.keep && g.dtype(emb).is_some_and(|d| d != TensorType::F32) {
        let m = Arc::new(l.matrix(emb, &[c.vocab, h])?);
        let head = if c.tie_embeddings {
            Linear::quantized(m.clone(), None).map_err(|e| l.de(e))?
        } else {
            l.linear("output", c.vocab, h)?
        };
        (Embedding::quantized(m), head)
    } else {
        let t = l.tensor(emb, &[c.vocab, h])?;
        let head = if c.tie_embeddings {
            Linear::stored(t.clone(), None).map_err(|e| l.de(e))?
        } else {
            l.linear("output", c.vocab, h)?
        };
        (Embedding::new(t, None), head)
    };
    let parts = ModelParts {
        embedding,
        blocks,
        final_norm: l.rms("output_norm", h)?,
        lm_head,
    };
    let used = l.used.into_inner();
    let unused = g
        .names()
        .into_iter()
        .filter(|n| !used.contains(*n))
        .filter(|n| *n != "rope_freqs.weight")
        .map(|n| format!("tensor `{n}` is not used by the deepseek2 forward"))
        .collect();
    Ok((parts, unused))
}
