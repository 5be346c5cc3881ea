//! `xmoe-top inspect`: what a model file holds, its parameter counts and its FLOPs per token.

use serde::Serialize;

use crate::model::ModelSource;
use crate::model::config::ModelConfig;
use crate::model::forward::{ParamCounts, param_counts};
use crate::profiling::flops::FlopModel;
use crate::units::{bytes_one_decimal as human_bytes, group_digits as group, printable};

/// One row of the tensor table.
#[derive(Clone, Debug, Serialize)]
pub struct TensorRow {
    /// Tensor name.
    pub name: String,
    /// Storage dtype.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Bytes in the file.
    pub bytes: usize,
}

/// FLOPs per token, computed by [`FlopModel`].
#[derive(Clone, Debug, Serialize)]
pub struct FlopSummary {
    /// Context length (keys attended) the attention figures assume.
    pub context: usize,
    /// Router FLOPs of one MoE layer.
    pub router: u64,
    /// One expert on one token (with the weighted combine).
    pub per_expert: u64,
    /// One MoE layer with every expert.
    pub moe_layer_all_experts: u64,
    /// One MoE layer under the top-k baseline.
    pub moe_layer_top_k: u64,
    /// k of the top-k baseline.
    pub top_k: usize,
    /// One MoE layer under the default policy cannot be known without running; this is the
    /// whole model with all experts.
    pub model_all_experts: u64,
    /// The whole model under the top-k baseline.
    pub model_top_k: u64,
}

/// Everything `inspect` prints.
#[derive(Clone, Debug, Serialize)]
pub struct InspectReport {
    /// Where the model came from.
    pub source: String,
    /// `xmoe` for the project's own format, else the Hugging Face `model_type`.
    pub family: String,
    /// Files holding the weights.
    pub files: usize,
    /// Parameters one token uses under the top-k baseline: everything but the experts, plus k
    /// experts in each MoE layer.
    pub active_params_top_k: usize,
    /// File size in bytes.
    pub file_bytes: usize,
    /// Bytes the weights take in memory once loaded on the CPU with the defaults, not counting
    /// the experts read in place.
    pub loaded_bytes: usize,
    /// Bytes of expert weights the CPU kernel reads in place from the files (mapped, not loaded).
    pub in_place_expert_bytes: usize,
    /// The configuration.
    pub config: ModelConfig,
    /// MoE block indices.
    pub moe_layers: Vec<usize>,
    /// Split ratio (dense FFN width / expert width).
    pub split_ratio: usize,
    /// Parameter counts.
    pub params: ParamCounts,
    /// FLOPs per token.
    pub flops: FlopSummary,
    /// Every tensor in the file.
    pub tensors: Vec<TensorRow>,
    /// Non-fatal findings.
    pub warnings: Vec<String>,
}

impl InspectReport {
    /// Describes a checked model file.
    pub fn new(file: &ModelSource) -> Self {
        let cfg = file.config().clone();
        let f = FlopModel::new(&cfg);
        let context = cfg.max_seq_len / 2;
        let n_moe = cfg.moe_layer_indices().len() as u64;
        let non_moe = f.non_moe(context);
        let params = param_counts(&cfg);
        let (family, files) = match file {
            ModelSource::Xmoe(_) => ("xmoe".to_string(), 1),
            ModelSource::HuggingFace(c) => (
                c.hf_config().family.model_type().to_string(),
                c.shard_paths().len(),
            ),
            ModelSource::Gguf(g) => (format!("gguf {}", g.arch().name()), 1),
        };
        let active_params_top_k =
            params.total - params.experts_total + n_moe as usize * f.top_k() * params.per_expert;
        Self {
            source: file.path().display().to_string(),
            family,
            files,
            active_params_top_k,
            file_bytes: file.file_bytes(),
            loaded_bytes: file.resident_weight_bytes() - file.in_place_bytes(true),
            in_place_expert_bytes: file.in_place_bytes(true),
            moe_layers: cfg.moe_layer_indices(),
            split_ratio: cfg.split_ratio(),
            params,
            flops: FlopSummary {
                context,
                router: f.router(),
                per_expert: f.expert(),
                moe_layer_all_experts: f.moe_layer_all_experts(),
                moe_layer_top_k: f.moe_layer_top_k(),
                top_k: f.top_k(),
                model_all_experts: non_moe + n_moe * f.moe_layer_all_experts(),
                model_top_k: non_moe + n_moe * f.moe_layer_top_k(),
            },
            tensors: file
                .tensor_table()
                .into_iter()
                .map(|(name, dtype, shape, bytes)| TensorRow {
                    name,
                    dtype,
                    shape,
                    bytes,
                })
                .collect(),
            warnings: file.warnings().to_vec(),
            config: cfg,
        }
    }

    /// Human-readable text.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let c = &self.config;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "model      {} ({})",
            printable(&c.name),
            printable(&self.source)
        );
        let _ = writeln!(s, "family     {}", self.family);
        let _ = writeln!(
            s,
            "weights    {} in {} file{}",
            human_bytes(self.file_bytes as u64),
            self.files,
            if self.files == 1 { "" } else { "s" }
        );
        if self.in_place_expert_bytes > 0 {
            let _ = writeln!(
                s,
                "memory     {} loaded; experts {} read in place from the file{} (CPU kernel; \
                 --expert-weights packed loads them too)",
                human_bytes(self.loaded_bytes as u64),
                human_bytes(self.in_place_expert_bytes as u64),
                if self.files == 1 { "" } else { "s" }
            );
        }
        let _ = writeln!(
            s,
            "shape      {} layers, d_model {}, {} heads ({} key/value) of {}, context {}, vocab {} ({:?} tokenizer)",
            c.n_layers,
            c.d_model,
            c.n_heads,
            c.kv_heads(),
            c.head_dim(),
            c.max_seq_len,
            c.vocab_size,
            c.tokenizer
        );
        if let Some(m) = c.mla {
            // The shape line's head size is the rotary width here; this line gives the rest.
            let _ = writeln!(
                s,
                "attention  multi-head latent: q {}, kv latent {}, per head {} + {} rotary (shared key) for q.k, {} for v",
                m.q_lora_rank
                    .map_or("full rank".to_string(), |r| format!("rank {r}")),
                m.kv_lora_rank,
                m.qk_nope_head_dim,
                m.qk_rope_head_dim,
                m.v_head_dim
            );
        }
        if c.qk_norm.is_some() || c.qkv_bias || c.attn_bias || c.attn_sinks {
            let _ = writeln!(
                s,
                "attention  q/k norm {}, bias {}{}",
                c.qk_norm.map_or("none".to_string(), |k| format!("{k:?}")),
                if c.attn_bias {
                    "q, k, v, o"
                } else if c.qkv_bias {
                    "q, k, v"
                } else {
                    "none"
                },
                if c.attn_sinks {
                    ", a learned sink logit per head"
                } else {
                    ""
                }
            );
        }
        if let Some(w) = c.shared_expert_hidden {
            let _ = writeln!(
                s,
                "shared     one always-on expert of width {w} per MoE layer{}",
                if c.shared_expert_gate {
                    ", scaled by sigmoid(gate . x)"
                } else {
                    ""
                }
            );
        }
        let _ = writeln!(
            s,
            "blocks     {:?} norm, {:?} positions, {:?}{} FFN, dense FFN width {}",
            c.norm,
            c.positions,
            c.activation,
            if c.gated { " gated" } else { "" },
            c.dense_ffn_hidden
        );
        let _ = writeln!(
            s,
            "MoE        layers {:?}: {} experts x hidden {} (split ratio {}), expert bias {}{}",
            self.moe_layers,
            c.n_experts,
            c.expert_hidden,
            self.split_ratio,
            if c.expert_bias && c.expert_gate_bias {
                "gate, up, down"
            } else if c.expert_bias {
                "up, down"
            } else {
                "none"
            },
            if c.router_bias { ", router bias" } else { "" }
        );
        if let Some(g) = c.clamped_swiglu {
            let _ = writeln!(
                s,
                "experts    clamped SwiGLU: (clamp(up, -{l}, {l}) + 1) * g * sigmoid({a} g), g = min(gate, {l})",
                l = g.limit,
                a = g.alpha
            );
        }
        let policy: crate::routing::RoutingPolicy = c.default_policy;
        let _ = writeln!(
            s,
            "routing    default {policy}, top-k baseline k = {}, capacity factor {}",
            self.flops.top_k,
            c.capacity_factor
                .map_or("none".to_string(), |v| v.to_string())
        );
        let p = &self.params;
        let _ = writeln!(s, "\nparameters");
        let _ = writeln!(s, "  total        {:>12}", group(p.total as u64));
        let _ = writeln!(s, "  embeddings   {:>12}", group(p.embeddings as u64));
        let _ = writeln!(s, "  experts      {:>12}", group(p.experts_total as u64));
        let _ = writeln!(
            s,
            "  active, top-{} {:>11}",
            self.flops.top_k,
            group(self.active_params_top_k as u64)
        );
        let _ = writeln!(s, "  per expert   {:>12}", group(p.per_expert as u64));
        for (i, n) in p.per_layer.iter().enumerate() {
            let kind = if self.moe_layers.contains(&i) {
                "MoE"
            } else {
                "dense"
            };
            let _ = writeln!(s, "  layer {i:<3} {kind:<5}{:>12}", group(*n as u64));
        }
        let f = &self.flops;
        let _ = writeln!(
            s,
            "\nFLOPs per token (multiply-add = 2; attention at context {})",
            f.context
        );
        let _ = writeln!(
            s,
            "  router, one MoE layer          {:>14}",
            group(f.router)
        );
        let _ = writeln!(
            s,
            "  one expert                     {:>14}",
            group(f.per_expert)
        );
        let _ = writeln!(
            s,
            "  MoE layer, all experts         {:>14}",
            group(f.moe_layer_all_experts)
        );
        let _ = writeln!(
            s,
            "  MoE layer, top-{} baseline      {:>14}",
            f.top_k,
            group(f.moe_layer_top_k)
        );
        let _ = writeln!(
            s,
            "  whole model, all experts       {:>14}",
            group(f.model_all_experts)
        );
        let _ = writeln!(
            s,
            "  whole model, top-{} baseline    {:>14}",
            f.top_k,
            group(f.model_top_k)
        );
        let _ = writeln!(
            s,
            "  (threshold routing's cost depends on the tokens: run `xmoe-top run` or `sweep`)"
        );
        let _ = writeln!(s, "\ntensors ({})", self.tensors.len());
        let names: Vec<String> = self.tensors.iter().map(|t| printable(&t.name)).collect();
        let w = names.iter().map(String::len).max().unwrap_or(0);
        for (t, name) in self.tensors.iter().zip(&names) {
            let _ = writeln!(
                s,
                "  {:<w$}  {:<5} {:<18} {:>10}",
                name,
                t.dtype,
                format!("{:?}", t.shape),
                human_bytes(t.bytes as u64)
            );
        }
        for warn in &self.warnings {
            let _ = writeln!(s, "warning: {}", printable(warn));
        }
        s
    }
}
