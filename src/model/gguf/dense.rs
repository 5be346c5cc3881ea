//! A dense `llama` GGUF file (no experts; e.g. SmolLM2-135M): its configuration, its tensors
//! under Hugging Face names in `[out, in]` orientation (q/k rows un-permuted, every tensor
//! dequantised to f32); its tokenizer is read by `workload::gguf_tokenizer`. The input of the dense-to-XMoE conversion (issue 14).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::Map;

use super::build::unpermute_rope_rows;
use super::config::{Meta, common_keys, vocab_size};
use super::{GgufFile, candle_message, gguf_error};
use crate::model::format::LoadError;

/// What a dense Llama-family model needs, read from the GGUF metadata.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct DenseLlamaConfig {
    /// `general.name` (else the file stem).
    pub name: String,
    /// `llama.embedding_length`.
    pub hidden: usize,
    /// `llama.block_count`.
    pub layers: usize,
    /// `llama.attention.head_count`.
    pub heads: usize,
    /// `llama.attention.head_count_kv` (default: `heads`).
    pub kv_heads: usize,
    /// `llama.attention.key_length` (default: `hidden / heads`).
    pub head_dim: usize,
    /// `llama.feed_forward_length`: the SwiGLU FFN width.
    pub ffn_hidden: usize,
    /// Rows of `token_embd.weight`.
    pub vocab: usize,
    /// `llama.attention.layer_norm_rms_epsilon`.
    pub rms_norm_eps: f64,
    /// `llama.rope.freq_base` (default 10000).
    pub rope_theta: f64,
    /// `llama.context_length`.
    pub context_length: Option<usize>,
    /// No `output.weight`: the LM head is the embedding.
    pub tie_embeddings: bool,
}

/// A dense `llama` GGUF file, loaded.
pub struct DenseLlama {
    /// The configuration.
    pub config: DenseLlamaConfig,
    /// Every tensor under its Hugging Face name (`model.embed_tokens.weight`,
    /// `model.layers.{i}.self_attn.q_proj.weight`, `model.layers.{i}.mlp.gate_proj.weight`,
    /// `model.norm.weight`, `lm_head.weight` when untied, ...), `[out, in]`, f32.
    pub tensors: BTreeMap<String, Tensor>,
}

/// `(GGUF suffix, HF suffix)` of each block tensor.
const BLOCK_NAMES: &[(&str, &str)] = &[
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

impl DenseLlama {
    /// Reads only the configuration of the dense `llama` file `g`.
    pub fn read_config(g: &GgufFile) -> Result<DenseLlamaConfig, LoadError> {
        let arch = g.architecture()?;
        if arch != "llama" {
            return Err(LoadError::HfUnknownFamily {
                path: g.path().to_path_buf(),
                found: format!("GGUF architecture \"{arch}\" for a dense model"),
                supported: "llama".into(),
            });
        }
        let m = Meta { g, arch: "llama" };
        if m.uint_opt("expert_count")?.is_some_and(|e| e > 0) {
            return Err(gguf_error(
                g.path(),
                "metadata `llama.expert_count` is positive: this is an MoE file, not a dense one",
            ));
        }
        let mut c = Map::new();
        common_keys(&m, &mut c)?;
        let get = |k: &str| {
            c.get(k)
                .and_then(serde_json::Value::as_u64)
                .map(|n| n as usize)
        };
        let hidden = get("hidden_size").unwrap_or_default();
        let heads = get("num_attention_heads").unwrap_or_default();
        Ok(DenseLlamaConfig {
            name: g.model_name(),
            hidden,
            layers: get("num_hidden_layers").unwrap_or_default(),
            heads,
            kv_heads: get("num_key_value_heads").unwrap_or(heads),
            head_dim: get("head_dim").unwrap_or(hidden / heads.max(1)),
            ffn_hidden: m.uint("feed_forward_length", 1 << 20)?,
            vocab: vocab_size(&m)?,
            rms_norm_eps: c
                .get("rms_norm_eps")
                .and_then(serde_json::Value::as_f64)
                .unwrap_or_default(),
            rope_theta: c
                .get("rope_theta")
                .and_then(serde_json::Value::as_f64)
                .unwrap_or(10_000.0),
            context_length: get("max_position_embeddings"),
            tie_embeddings: !g.has("output.weight"),
        })
    }

    /// Opens the dense `llama` GGUF file at `path` and loads every tensor (dequantised to f32,
    /// q/k un-permuted) onto `device`; the tokenizer is `workload::gguf_tokenizer::from_file`.
    pub fn open(path: &Path, device: &Device) -> Result<Self, LoadError> {
        let g = GgufFile::open(path)?;
        let config = Self::read_config(&g)?;
        let c = &config;
        let (h, q_w, kv_w) = (c.hidden, c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let mut tensors = BTreeMap::new();
        let de = |e: candle_core::Error| gguf_error(path, candle_message(&e));
        tensors.insert(
            "model.embed_tokens.weight".to_string(),
            g.tensor("token_embd.weight", &[c.vocab, h], device)?,
        );
        tensors.insert(
            "model.norm.weight".to_string(),
            g.tensor("output_norm.weight", &[h], device)?,
        );
        if !c.tie_embeddings {
            tensors.insert(
                "lm_head.weight".to_string(),
                g.tensor("output.weight", &[c.vocab, h], device)?,
            );
        }
        for i in 0..c.layers {
            for &(gg, hf) in BLOCK_NAMES {
                let shape: Vec<usize> = match gg {
                    "attn_q.weight" => vec![q_w, h],
                    "attn_k.weight" | "attn_v.weight" => vec![kv_w, h],
                    "attn_output.weight" => vec![h, q_w],
                    "ffn_gate.weight" | "ffn_up.weight" => vec![c.ffn_hidden, h],
                    "ffn_down.weight" => vec![h, c.ffn_hidden],
                    _ => vec![h],
                };
                let mut t = g.tensor(&format!("blk.{i}.{gg}"), &shape, device)?;
                if gg == "attn_q.weight" {
                    t = unpermute_rope_rows(&t, c.heads).map_err(de)?;
                } else if gg == "attn_k.weight" {
                    t = unpermute_rope_rows(&t, c.kv_heads).map_err(de)?;
                }
                tensors.insert(format!("model.layers.{i}.{hf}"), t);
            }
        }
        // The tokenizer lives in the workload layer: `workload::gguf_tokenizer::from_file`.
        Ok(DenseLlama { config, tensors })
    }
}
