//! llama.cpp's `gpt-oss` architecture (`LLM_ARCH_OPENAI_MOE`: gpt-oss-20b, -120b), as
//! llama.cpp's converter (`conversion/gpt_oss.py` `GptOssModel`) writes it and
//! `src/models/openai-moe.cpp` reads it: the metadata mapped onto the same `gpt_oss`
//! configuration a Hugging Face checkpoint gives (`docs/gguf.md`, "gpt-oss"). The tensors are
//! built by [`super::build`] with the blocks of the safetensors gpt-oss path.

use serde_json::{Map, json};

use super::config::{Meta, describe, vocab_size};
use super::gguf_error;
use crate::model::format::LoadError;
use crate::model::hf::HfConfig;

/// llama.cpp's clamped SwiGLU constants (`llama-graph.cpp`, `LLM_FFN_SWIGLU_OAI_MOE`: not read
/// from the file), which are also transformers' `GptOssConfig` defaults.
const SWIGLU_ALPHA: f64 = 1.702;
const SWIGLU_LIMIT: f64 = 7.0;

/// llama.cpp's sliding-window pattern for gpt-oss (`load_swa_pattern(ml, 2)`): with a pattern
/// `n`, block `i` slides when `n == 0 || i % n < n - 1` (`llama_hparams::set_swa_pattern`), so
/// with 2 the even blocks slide and the odd ones attend to everything.
const DEFAULT_SWA_PATTERN: usize = 2;

/// Which blocks use the sliding window: `{arch}.attention.sliding_window_pattern` as llama.cpp
/// reads it (an array of booleans, one per block, or a pattern number), else the default.
fn sliding_blocks(m: &Meta, layers: usize) -> Result<Vec<bool>, LoadError> {
    let key = m.key("attention.sliding_window_pattern");
    match m.g.metadata().get(&key) {
        Some(candle_core::quantized::gguf_file::Value::Array(a)) => {
            if a.len() != layers {
                return Err(m.bad(
                    &key,
                    format!("expected one entry per block ({layers}), found {}", a.len()),
                ));
            }
            a.iter()
                .map(|v| match v {
                    candle_core::quantized::gguf_file::Value::Bool(b) => Ok(*b),
                    other => Err(m.bad(
                        &key,
                        format!("expected booleans, found {}", describe(other)),
                    )),
                })
                .collect()
        }
        _ => {
            let n = m
                .uint_opt("attention.sliding_window_pattern")?
                .unwrap_or(DEFAULT_SWA_PATTERN);
            Ok((0..layers).map(|i| n == 0 || i % n < n - 1).collect())
        }
    }
}

/// The configuration of a `gpt-oss` file, as the equivalent `config.json` keys checked by
/// [`HfConfig::parse`]. Every GGUF key is read and checked here first, so that an error names it.
pub(crate) fn hf_config(m: &Meta) -> Result<HfConfig, LoadError> {
    let g = m.g;
    let mut c = Map::new();
    let hidden = m.uint("embedding_length", 1 << 16)?;
    let layers = m.uint("block_count", 4096)?;
    let heads = m.uint("attention.head_count", 4096)?;
    let kv = m.uint_opt("attention.head_count_kv")?.unwrap_or(heads);
    if kv == 0 || !heads.is_multiple_of(kv) {
        return Err(m.bad(
            &m.key("attention.head_count_kv"),
            format!("must divide attention.head_count {heads}, found {kv}"),
        ));
    }
    // llama.cpp's default head size is embedding_length / head_count; gpt-oss's 64 is not
    // (2880 / 64 = 45), so the converter writes it.
    let head_dim = match m.uint_opt("attention.key_length")? {
        Some(k) => k,
        None if hidden.is_multiple_of(heads) => hidden / heads,
        None => {
            return Err(m.bad(
                &m.key("attention.key_length"),
                format!("required: embedding_length {hidden} is not divisible by {heads} heads"),
            ));
        }
    };
    for key in ["attention.value_length", "rope.dimension_count"] {
        if let Some(v) = m.uint_opt(key)?
            && v != head_dim
        {
            return Err(m.bad(
                &m.key(key),
                format!("expected the head size {head_dim} (attention.key_length), found {v}"),
            ));
        }
    }
    let eps = m.rms_eps("")?;
    let experts = m.uint("expert_count", u16::MAX as usize)?;
    let top_k = m.uint("expert_used_count", experts)?;
    let expert_ffn = m.uint("expert_feed_forward_length", 1 << 20)?;
    let window = m.uint("attention.sliding_window", 1 << 24)?;
    let sliding = sliding_blocks(m, layers)?;
    // Every block is MoE: llama.cpp creates `ffn_gate_inp` for each.
    if let Some(dense) = (0..layers).find(|i| !g.has(&format!("blk.{i}.ffn_gate_inp.weight"))) {
        return Err(LoadError::MissingTensor {
            path: g.path().to_path_buf(),
            tensor: format!("blk.{dense}.ffn_gate_inp.weight"),
            expected: vec![experts, hidden],
        });
    }
    let mut rope = super::deepseek::rope_parameters(m)?;
    if rope["rope_type"] == "yarn" {
        // The GGUF has no key for it; every gpt-oss config has `truncate: false` (the correction
        // range is not rounded to whole dimensions), which llama.cpp's `ggml_rope_yarn_corr_dims`
        // always does. xmoe-top runs the model's definition (docs/gguf.md).
        rope["truncate"] = json!(false);
    }
    c.insert("model_type".into(), json!("gpt_oss"));
    c.insert("hidden_size".into(), json!(hidden));
    c.insert("num_hidden_layers".into(), json!(layers));
    c.insert("num_attention_heads".into(), json!(heads));
    c.insert("num_key_value_heads".into(), json!(kv));
    c.insert("head_dim".into(), json!(head_dim));
    c.insert("rms_norm_eps".into(), json!(eps));
    c.insert("vocab_size".into(), json!(vocab_size(m)?));
    if let Some(ctx) = m.uint_opt("context_length")? {
        c.insert("max_position_embeddings".into(), json!(ctx.max(1)));
    }
    c.insert("rope_parameters".into(), rope);
    c.insert("num_local_experts".into(), json!(experts));
    c.insert("num_experts_per_tok".into(), json!(top_k));
    c.insert("intermediate_size".into(), json!(expert_ffn));
    c.insert("sliding_window".into(), json!(window));
    c.insert(
        "layer_types".into(),
        json!(
            sliding
                .iter()
                .map(|&s| if s {
                    "sliding_attention"
                } else {
                    "full_attention"
                })
                .collect::<Vec<_>>()
        ),
    );
    c.insert("swiglu_alpha".into(), json!(SWIGLU_ALPHA));
    c.insert("swiglu_limit".into(), json!(SWIGLU_LIMIT));
    c.insert(
        "attention_bias".into(),
        json!((0..layers).any(|i| g.has(&format!("blk.{i}.attn_q.bias")))),
    );
    c.insert("tie_word_embeddings".into(), json!(!g.has("output.weight")));
    let text = serde_json::Value::Object(c).to_string();
    HfConfig::parse(g.path(), &text).map_err(|e| {
        gguf_error(
            g.path(),
            format!("the metadata does not describe a valid model: {e}"),
        )
    })
}
