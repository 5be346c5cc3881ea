//! The model configuration: what a `.safetensors` file says about itself in its
//! `__metadata__["xmoe_config"]` entry (or a `config.json` beside it).

use serde::{Deserialize, Serialize};

use crate::kernel::Activation;
use crate::routing::RoutingPolicy;

/// Current version of the configuration schema written by this crate.
pub const FORMAT_VERSION: u32 = 1;

/// The metadata key under which the JSON configuration is stored in a safetensors header.
pub const METADATA_KEY: &str = "xmoe_config";

/// The metadata key under which a file of the project's format with `"tokenizer":
/// "hugging_face"` stores its `tokenizer.json` text, so that the file stays self-describing.
pub const TOKENIZER_KEY: &str = "xmoe_tokenizer";

/// How text becomes token ids.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerKind {
    /// One token per byte; `vocab_size` must be at least 256.
    Byte,
    /// A Hugging Face `tokenizer.json`: beside a checkpoint, or (the project's own format) its
    /// text stored in the header's `__metadata__["xmoe_tokenizer"]`.
    HuggingFace,
}

/// Normalisation used before attention, before the FFN and at the end.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    /// LayerNorm with weight and bias.
    LayerNorm,
    /// RMSNorm with weight only.
    RmsNorm,
}

/// How token positions enter the model.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PositionKind {
    /// A learned table `pos_embeddings.weight` [max_seq_len, d_model] added to the embeddings.
    Learned,
    /// Rotary embeddings on queries and keys (half-split layout, as in GPT-NeoX / Llama).
    Rotary,
}

/// Normalisation of queries and keys before the rotary positions.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum QkNormKind {
    /// RMSNorm of each head (weights `[head_dim]`).
    PerHead,
    /// RMSNorm over the whole projection (weights `[heads * head_dim]`).
    Full,
}

/// The shape of multi-head latent attention (DeepSeek-V2/V3), which replaces the q, k, v
/// projections of plain attention: queries through an optional low-rank bottleneck, keys and
/// values from one shared latent of `kv_lora_rank` plus a single rotary key head.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct MlaShape {
    /// Rank of the query bottleneck (`q_a_proj`, `q_a_layernorm`, `q_b_proj`); `None`: one
    /// `q_proj`.
    pub q_lora_rank: Option<usize>,
    /// Rank of the key/value latent.
    pub kv_lora_rank: usize,
    /// Per-head query/key width without positions.
    pub qk_nope_head_dim: usize,
    /// Per-head query/key width with rotary positions (the key part shared by all heads).
    pub qk_rope_head_dim: usize,
    /// Per-head value width.
    pub v_head_dim: usize,
}

impl MlaShape {
    /// Query/key width per head.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Weights of one block's attention (without its pre-norm) for `heads` heads over width
    /// `d`, with biases on `q_a_proj`, `kv_a_proj_with_mqa` and `o_proj` when `bias`.
    pub fn params(&self, d: usize, heads: usize, bias: bool) -> usize {
        let qk = heads * self.qk_head_dim();
        let q = match self.q_lora_rank {
            Some(r) => d * r + r + r * qk + if bias { r } else { 0 },
            None => d * qk,
        };
        let kv_a = self.kv_lora_rank + self.qk_rope_head_dim;
        let kv = d * kv_a
            + self.kv_lora_rank
            + self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim)
            + if bias { kv_a } else { 0 };
        let o = heads * self.v_head_dim * d + if bias { d } else { 0 };
        q + kv + o
    }

    /// FLOPs of one token's attention projections (norms not counted, biases 1 per element):
    /// the latents are expanded once per token.
    pub fn projection_flops(&self, d: usize, heads: usize, bias: bool) -> u64 {
        let (d, h) = (d as u64, heads as u64);
        let qk = h * self.qk_head_dim() as u64;
        let q = match self.q_lora_rank {
            Some(r) => 2 * d * r as u64 + 2 * r as u64 * qk + if bias { r as u64 } else { 0 },
            None => 2 * d * qk,
        };
        let kv_a = (self.kv_lora_rank + self.qk_rope_head_dim) as u64;
        let kv = 2 * d * kv_a
            + 2 * self.kv_lora_rank as u64 * h * (self.qk_nope_head_dim + self.v_head_dim) as u64
            + if bias { kv_a } else { 0 };
        let o = 2 * h * self.v_head_dim as u64 * d + if bias { d } else { 0 };
        q + kv + o
    }
}

/// How the selected experts' outputs are added up.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Combine {
    /// `sum over selected e of w_e * expert_e(x)`, with `w_e` the routing policy's weight (XMoE,
    /// and every trained MoE).
    #[default]
    GateWeighted,
    /// `sum over selected e of expert_e(x)`: the router only selects. A dense FFN split into
    /// experts (`xmoe-top moefy`) is this sum over all experts, so selecting all reproduces it.
    Sum,
}

impl Combine {
    fn is_gate_weighted(&self) -> bool {
        *self == Combine::GateWeighted
    }
}

/// Which blocks carry a Mixture-of-Experts FFN (the others carry a dense FFN).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(untagged)]
pub enum MoeLayers {
    /// An explicit list of block indices.
    List(Vec<usize>),
    /// Every `every`-th block starting at `offset` (offset, offset + every, ...).
    Every {
        /// Stride between MoE blocks (>= 1).
        every: usize,
        /// Index of the first MoE block.
        #[serde(default)]
        offset: usize,
    },
    /// The keyword `"all"` (every block) or `"none"` (a dense model).
    Keyword(String),
}

fn default_format_version() -> u32 {
    FORMAT_VERSION
}
fn default_name() -> String {
    "xmoe".to_string()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_true() -> bool {
    true
}
fn default_policy() -> RoutingPolicy {
    RoutingPolicy::threshold(0.9)
}

/// The full configuration of an XMoE decoder-only language model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Schema version; this crate writes [`FORMAT_VERSION`].
    #[serde(default = "default_format_version")]
    pub format_version: u32,
    /// Human-readable model name.
    #[serde(default = "default_name")]
    pub name: String,
    /// Number of token ids.
    pub vocab_size: usize,
    /// Tokenizer kind.
    pub tokenizer: TokenizerKind,
    /// Residual stream width.
    pub d_model: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Attention heads per block; must divide `d_model` unless `head_dim` is given.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention); must divide `n_heads`. Default: `n_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_kv_heads: Option<usize>,
    /// Size of one attention head when it is not `d_model / n_heads`.
    #[serde(default, rename = "head_dim", skip_serializing_if = "Option::is_none")]
    pub head_size: Option<usize>,
    /// Longest sequence the model accepts.
    pub max_seq_len: usize,
    /// Normalisation kind.
    pub norm: NormKind,
    /// Normalisation epsilon.
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    /// Position encoding kind.
    pub positions: PositionKind,
    /// Rotary base (used only with rotary positions).
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// FFN / expert nonlinearity.
    pub activation: Activation,
    /// Gated FFN and experts (`act(gate(x)) * up(x)`, SwiGLU-style) when true.
    #[serde(default)]
    pub gated: bool,
    /// Biases on the attention projections (q, k, v and o).
    #[serde(default)]
    pub attn_bias: bool,
    /// Queries and keys are normalised before the rotary positions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qk_norm: Option<QkNormKind>,
    /// Biases on q, k and v only, not on o (Qwen2-MoE).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub qkv_bias: bool,
    /// Hidden width of the dense FFN blocks (and the reference width for the split ratio).
    pub dense_ffn_hidden: usize,
    /// Biases on the dense FFN projections.
    #[serde(default)]
    pub ffn_bias: bool,
    /// Which blocks are MoE.
    pub moe_layers: MoeLayers,
    /// Experts per MoE block.
    pub n_experts: usize,
    /// Hidden width of one expert.
    pub expert_hidden: usize,
    /// Each expert has an input bias `[h]` and an output bias `[d]` (added before gating).
    #[serde(default)]
    pub expert_bias: bool,
    /// How the selected experts' outputs are combined (default: gate-weighted).
    #[serde(default, skip_serializing_if = "Combine::is_gate_weighted")]
    pub combine: Combine,
    /// The gated experts also have a gate bias `[h]` (gpt-oss's `gate_up_proj_bias` holds gate and
    /// up biases); counted only with `expert_bias`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub expert_gate_bias: bool,
    /// The experts' nonlinearity is gpt-oss's clamped SwiGLU instead of `activation(gate) * up`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clamped_swiglu: Option<crate::kernel::ClampedSwiglu>,
    /// The router has a bias `[E]` (gpt-oss), or DeepSeek-V3's score correction bias `[E]`
    /// (added for choosing): E parameters and E additions per token either way.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub router_bias: bool,
    /// Every attention head has a learned sink logit in its softmax denominator (gpt-oss).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub attn_sinks: bool,
    /// Sliding attention window of each block (`None`: full causal attention); empty when no block
    /// has one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sliding_windows: Vec<Option<usize>>,
    /// Width of an always-on shared expert in every MoE block (gated like the experts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_expert_hidden: Option<usize>,
    /// The shared expert's output is scaled per token by `sigmoid(w . x)` (Qwen2-MoE).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared_expert_gate: bool,
    /// Multi-head latent attention instead of q, k, v projections (DeepSeek).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mla: Option<MlaShape>,
    /// LM head shares the token embedding matrix.
    #[serde(default = "default_true")]
    pub tie_embeddings: bool,
    /// Policy used when the user does not choose one.
    #[serde(default = "default_policy")]
    pub default_policy: RoutingPolicy,
    /// k of the compute-matched top-k baseline; default: the split ratio.
    #[serde(default)]
    pub top_k_baseline: Option<usize>,
    /// Optional inference-time capacity factor.
    #[serde(default)]
    pub capacity_factor: Option<f32>,
}

/// A configuration field that is missing, out of range or inconsistent.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("configuration field `{field}`: {message}")]
pub struct ConfigError {
    /// The offending field.
    pub field: &'static str,
    /// What is wrong, with expected versus found.
    pub message: String,
}

fn err(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        message: message.into(),
    }
}

impl ModelConfig {
    /// Checks every field for range and consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.format_version != FORMAT_VERSION {
            return Err(err(
                "format_version",
                format!(
                    "expected {FORMAT_VERSION}, found {} (file written by a newer or older xmoe-top?)",
                    self.format_version
                ),
            ));
        }
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("max_seq_len", self.max_seq_len),
            ("dense_ffn_hidden", self.dense_ffn_hidden),
            ("n_experts", self.n_experts),
            ("expert_hidden", self.expert_hidden),
        ] {
            if v == 0 {
                return Err(err(field, "must be positive, found 0"));
            }
        }
        // Sizes from an untrusted file are bounded before anything is allocated from them.
        for (field, v, max) in [
            ("vocab_size", self.vocab_size, 1 << 24),
            ("d_model", self.d_model, 1 << 16),
            ("n_layers", self.n_layers, 4096),
            ("n_heads", self.n_heads, 4096),
            ("max_seq_len", self.max_seq_len, 1 << 20),
            ("dense_ffn_hidden", self.dense_ffn_hidden, 1 << 20),
            ("expert_hidden", self.expert_hidden, 1 << 20),
        ] {
            if v > max {
                return Err(err(field, format!("at most {max} supported, found {v}")));
            }
        }
        if self.tokenizer == TokenizerKind::Byte && self.vocab_size < 256 {
            return Err(err(
                "vocab_size",
                format!(
                    "a byte tokenizer needs at least 256, found {}",
                    self.vocab_size
                ),
            ));
        }
        if self.head_size == Some(0) {
            return Err(err("head_dim", "must be positive, found 0"));
        }
        if let Some(kv) = self.n_kv_heads
            && (kv == 0 || !self.n_heads.is_multiple_of(kv))
        {
            return Err(err(
                "n_kv_heads",
                format!("must divide n_heads {}, found {kv}", self.n_heads),
            ));
        }
        if self.head_size.is_none() && !self.d_model.is_multiple_of(self.n_heads) {
            return Err(err(
                "n_heads",
                format!(
                    "d_model {} is not divisible by n_heads {}",
                    self.d_model, self.n_heads
                ),
            ));
        }
        if self.positions == PositionKind::Rotary && !self.head_dim().is_multiple_of(2) {
            return Err(err(
                "positions",
                format!(
                    "rotary positions need an even head size, found {}",
                    self.head_dim()
                ),
            ));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(err(
                "norm_eps",
                format!("must be positive and finite, found {}", self.norm_eps),
            ));
        }
        if self.n_experts > u16::MAX as usize {
            return Err(err(
                "n_experts",
                format!("at most {} supported, found {}", u16::MAX, self.n_experts),
            ));
        }
        match &self.moe_layers {
            MoeLayers::List(list) => {
                for &l in list {
                    if l >= self.n_layers {
                        return Err(err(
                            "moe_layers",
                            format!(
                                "layer {l} is out of range: the model has {} layers (0..{})",
                                self.n_layers, self.n_layers
                            ),
                        ));
                    }
                }
                let mut sorted = list.clone();
                sorted.sort_unstable();
                sorted.dedup();
                if sorted.len() != list.len() {
                    return Err(err("moe_layers", "the list names a layer twice"));
                }
            }
            MoeLayers::Every { every, offset } => {
                if *every == 0 {
                    return Err(err("moe_layers", "`every` must be at least 1, found 0"));
                }
                if *offset >= self.n_layers {
                    return Err(err(
                        "moe_layers",
                        format!(
                            "offset {offset} is out of range: the model has {} layers",
                            self.n_layers
                        ),
                    ));
                }
            }
            MoeLayers::Keyword(k) if k == "all" || k == "none" => {}
            MoeLayers::Keyword(k) => {
                return Err(err(
                    "moe_layers",
                    format!(
                        "expected \"all\", \"none\", a list or {{\"every\": n}}, found \"{k}\""
                    ),
                ));
            }
        }
        self.default_policy
            .validate(self.n_experts)
            .map_err(|e| err("default_policy", e.to_string()))?;
        if let Some(k) = self.top_k_baseline
            && (k == 0 || k > self.n_experts)
        {
            return Err(err(
                "top_k_baseline",
                format!("must be in 1..={}, found {k}", self.n_experts),
            ));
        }
        if let Some(c) = self.capacity_factor
            && !(c.is_finite() && c > 0.0)
        {
            return Err(err(
                "capacity_factor",
                format!("must be positive and finite, found {c}"),
            ));
        }
        Ok(())
    }

    /// A byte-level model with the common choices (pre-norm LayerNorm, learned positions, GELU,
    /// non-gated experts with biases, every block MoE, tied embeddings, threshold 0.9); change
    /// fields with struct update syntax.
    pub fn byte_level(
        d_model: usize,
        n_layers: usize,
        n_heads: usize,
        max_seq_len: usize,
        n_experts: usize,
        expert_hidden: usize,
        dense_ffn_hidden: usize,
    ) -> Self {
        ModelConfig {
            format_version: FORMAT_VERSION,
            name: default_name(),
            vocab_size: 256,
            tokenizer: TokenizerKind::Byte,
            d_model,
            n_layers,
            n_heads,
            n_kv_heads: None,
            head_size: None,
            max_seq_len,
            norm: NormKind::LayerNorm,
            norm_eps: default_eps(),
            positions: PositionKind::Learned,
            rope_theta: default_rope_theta(),
            activation: Activation::Gelu,
            gated: false,
            attn_bias: false,
            qk_norm: None,
            qkv_bias: false,
            dense_ffn_hidden,
            ffn_bias: false,
            moe_layers: MoeLayers::Keyword("all".into()),
            n_experts,
            expert_hidden,
            expert_bias: true,
            combine: Combine::GateWeighted,
            expert_gate_bias: false,
            clamped_swiglu: None,
            router_bias: false,
            attn_sinks: false,
            sliding_windows: Vec::new(),
            shared_expert_hidden: None,
            shared_expert_gate: false,
            mla: None,
            tie_embeddings: true,
            default_policy: default_policy(),
            top_k_baseline: None,
            capacity_factor: None,
        }
    }

    /// Indices of the MoE blocks, ascending.
    pub fn moe_layer_indices(&self) -> Vec<usize> {
        match &self.moe_layers {
            MoeLayers::List(list) => {
                let mut v = list.clone();
                v.sort_unstable();
                v
            }
            MoeLayers::Every { every, offset } => {
                (*offset..self.n_layers).step_by((*every).max(1)).collect()
            }
            MoeLayers::Keyword(k) if k == "all" => (0..self.n_layers).collect(),
            MoeLayers::Keyword(_) => Vec::new(),
        }
    }

    /// True when block `layer` has an MoE FFN.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.moe_layer_indices().contains(&layer)
    }

    /// Attention head size.
    pub fn head_dim(&self) -> usize {
        self.head_size.unwrap_or(self.d_model / self.n_heads)
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.n_kv_heads.unwrap_or(self.n_heads)
    }

    /// The fields only the Hugging Face architectures use, by name, when any is set: the project's
    /// own format does not read them. (Grouped-query attention, a head size of its own and a
    /// Hugging Face tokenizer stored in the file are part of the format: `xmoe-top moefy` writes
    /// Llama-family models with them.)
    pub fn hf_only_fields(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.qk_norm.is_some() {
            v.push("qk_norm");
        }
        if self.qkv_bias {
            v.push("qkv_bias");
        }
        if !self.sliding_windows.is_empty() {
            v.push("sliding_windows");
        }
        if self.shared_expert_hidden.is_some() {
            v.push("shared_expert_hidden");
        }
        if self.shared_expert_gate {
            v.push("shared_expert_gate");
        }
        if self.expert_gate_bias {
            v.push("expert_gate_bias");
        }
        if self.clamped_swiglu.is_some() {
            v.push("clamped_swiglu");
        }
        if self.router_bias {
            v.push("router_bias");
        }
        if self.attn_sinks {
            v.push("attn_sinks");
        }
        if self.mla.is_some() {
            v.push("mla");
        }
        v
    }

    /// Split ratio: how many experts together are as wide as the dense FFN (at least 1).
    pub fn split_ratio(&self) -> usize {
        ((self.dense_ffn_hidden as f64 / self.expert_hidden as f64).round() as usize).max(1)
    }

    /// k of the compute-matched top-k baseline (configured, or the split ratio), clamped to 1..=E.
    pub fn top_k_baseline(&self) -> usize {
        self.top_k_baseline
            .unwrap_or_else(|| self.split_ratio())
            .clamp(1, self.n_experts)
    }

    /// Parses and validates a JSON configuration.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        let cfg: ModelConfig = serde_json::from_str(json)
            .map_err(|e| err("(json)", format!("cannot parse the configuration: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Serialises to compact JSON (as stored in safetensors metadata).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("ModelConfig serialises")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small valid configuration for tests.
    pub fn small() -> ModelConfig {
        ModelConfig {
            name: "test".into(),
            ..ModelConfig::byte_level(16, 2, 2, 32, 8, 16, 64)
        }
    }

    #[test]
    fn json_round_trip_and_defaults() {
        let c = small();
        let back = ModelConfig::from_json(&c.to_json()).unwrap();
        assert_eq!(c, back);
        assert_eq!(c.split_ratio(), 4);
        assert_eq!(c.top_k_baseline(), 4);
    }

    #[test]
    fn moe_layer_forms() {
        let mut c = small();
        c.n_layers = 6;
        c.moe_layers = serde_json::from_str(r#"{"every": 2, "offset": 1}"#).unwrap();
        assert_eq!(c.moe_layer_indices(), vec![1, 3, 5]);
        c.moe_layers = serde_json::from_str("[0, 4]").unwrap();
        assert_eq!(c.moe_layer_indices(), vec![0, 4]);
        c.moe_layers = serde_json::from_str(r#""all""#).unwrap();
        assert_eq!(c.moe_layer_indices().len(), 6);
    }

    #[test]
    fn inconsistent_configs_are_rejected_with_the_field() {
        let mut c = small();
        c.n_heads = 3;
        assert_eq!(c.validate().unwrap_err().field, "n_heads");
        let mut c = small();
        c.moe_layers = MoeLayers::List(vec![0, 2]);
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "moe_layers");
        assert!(e.message.contains("layer 2 is out of range"), "{e}");
        let mut c = small();
        c.d_model = 0;
        assert_eq!(c.validate().unwrap_err().field, "d_model");
        let mut c = small();
        c.default_policy = RoutingPolicy::threshold(1.5);
        assert_eq!(c.validate().unwrap_err().field, "default_policy");
        let mut c = small();
        c.vocab_size = 100;
        assert_eq!(c.validate().unwrap_err().field, "vocab_size");
        let mut c = small();
        c.max_seq_len = 1 << 40;
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "max_seq_len");
        assert!(e.message.contains("at most 1048576"), "{e}");
        assert!(ModelConfig::from_json("{\"d_model\": 3}").is_err());
    }
}
