//! `config.json` of a Hugging Face MoE checkpoint, read into what the loader needs. Every key is
//! checked where it is read, so an error names the key, what was expected and what was found.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::kernel::ClampedSwiglu;
use crate::model::blocks::Yarn;
use crate::model::config::{
    MlaShape, ModelConfig, MoeLayers, NormKind, PositionKind, QkNormKind, TokenizerKind,
};
use crate::model::format::LoadError;
use crate::routing::{GroupLimit, RoutingPolicy};

/// The model families this loader runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HfFamily {
    /// `mixtral` (`MixtralForCausalLM`).
    Mixtral,
    /// `qwen2_moe` (`Qwen2MoeForCausalLM`).
    Qwen2Moe,
    /// `qwen3_moe` (`Qwen3MoeForCausalLM`).
    Qwen3Moe,
    /// `olmoe` (`OlmoeForCausalLM`).
    Olmoe,
    /// `gpt_oss` (`GptOssForCausalLM`).
    GptOss,
    /// `deepseek_v2` (`DeepseekV2ForCausalLM`).
    DeepseekV2,
    /// `deepseek_v3` (`DeepseekV3ForCausalLM`; also Kimi-K2-style configs).
    DeepseekV3,
}

/// Longest context xmoe-top runs a checkpoint with (its rotary tables are precomputed for every
/// position); a longer `max_position_embeddings` is capped.
pub const MAX_CONTEXT: usize = 1 << 17;

/// `model_type` values, in the order the error message lists them.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "gpt_oss",
    "deepseek_v2",
    "deepseek_v3",
];

impl HfFamily {
    fn from_model_type(s: &str) -> Option<Self> {
        Some(match s {
            "mixtral" => HfFamily::Mixtral,
            "qwen2_moe" => HfFamily::Qwen2Moe,
            "qwen3_moe" => HfFamily::Qwen3Moe,
            "olmoe" => HfFamily::Olmoe,
            "gpt_oss" => HfFamily::GptOss,
            "deepseek_v2" => HfFamily::DeepseekV2,
            "deepseek_v3" | "kimi_k2" => HfFamily::DeepseekV3,
            _ => return None,
        })
    }

    fn from_architecture(s: &str) -> Option<Self> {
        Some(match s {
            "MixtralForCausalLM" => HfFamily::Mixtral,
            "Qwen2MoeForCausalLM" => HfFamily::Qwen2Moe,
            "Qwen3MoeForCausalLM" => HfFamily::Qwen3Moe,
            "OlmoeForCausalLM" => HfFamily::Olmoe,
            "GptOssForCausalLM" => HfFamily::GptOss,
            "DeepseekV2ForCausalLM" => HfFamily::DeepseekV2,
            "DeepseekV3ForCausalLM" => HfFamily::DeepseekV3,
            _ => return None,
        })
    }

    /// The `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            HfFamily::Mixtral => "mixtral",
            HfFamily::Qwen2Moe => "qwen2_moe",
            HfFamily::Qwen3Moe => "qwen3_moe",
            HfFamily::Olmoe => "olmoe",
            HfFamily::GptOss => "gpt_oss",
            HfFamily::DeepseekV2 => "deepseek_v2",
            HfFamily::DeepseekV3 => "deepseek_v3",
        }
    }

    /// DeepSeek-V2 or V3: latent attention, DeepSeek routers, ungated shared experts.
    pub fn is_deepseek(self) -> bool {
        matches!(self, HfFamily::DeepseekV2 | HfFamily::DeepseekV3)
    }
}

/// What DeepSeek's attention and router need from `config.json` (the router's correction bias
/// is a tensor).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeepseekConfig {
    /// Multi-head latent attention sizes.
    pub mla: MlaShape,
    /// The rotary pairs are adjacent dimensions `(2i, 2i + 1)` (V2 always, V3 with
    /// `rope_interleave`, its default), not the two halves.
    pub rope_interleave: bool,
    /// `group_limited_greedy` (V2) or `noaux_tc` (V3) groups; `None` for V2's `greedy`.
    pub groups: Option<GroupLimit>,
    /// `routed_scaling_factor`.
    pub routed_scaling_factor: f64,
}

/// What the loader reads from `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct HfConfig {
    /// The family.
    pub family: HfFamily,
    /// `hidden_size`.
    pub hidden: usize,
    /// `num_hidden_layers`.
    pub layers: usize,
    /// `num_attention_heads`.
    pub heads: usize,
    /// `num_key_value_heads` (default: `heads`).
    pub kv_heads: usize,
    /// `head_dim` (default: `hidden / heads`).
    pub head_dim: usize,
    /// True when `head_dim` was given and differs from `hidden / heads`.
    pub explicit_head_dim: bool,
    /// `vocab_size`.
    pub vocab: usize,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f64,
    /// Rotary base.
    pub rope_theta: f64,
    /// YaRN rotary scaling (`rope_type: "yarn"`), if the config asks for it (boxed: it is rare,
    /// and the checkpoint that holds this configuration stays small).
    pub rope_yarn: Option<Box<Yarn>>,
    /// `max_position_embeddings`.
    pub max_positions: usize,
    /// `tie_word_embeddings`.
    pub tie_embeddings: bool,
    /// Experts per MoE block.
    pub experts: usize,
    /// `num_experts_per_tok`.
    pub top_k: usize,
    /// The native rule renormalises the top-k weights.
    pub norm_topk_prob: bool,
    /// Width of one expert.
    pub expert_hidden: usize,
    /// Width of the dense FFN blocks (Qwen's `intermediate_size`), if the family has them.
    pub dense_hidden: Option<usize>,
    /// Block indices of the MoE blocks.
    pub moe_layers: Vec<usize>,
    /// Shared expert width (Qwen2-MoE).
    pub shared_expert_hidden: Option<usize>,
    /// Bias on q, k, v (Qwen2-MoE `qkv_bias`).
    pub qkv_bias: bool,
    /// Bias on q, k, v and o (`attention_bias`).
    pub attention_bias: bool,
    /// q/k normalisation.
    pub qk_norm: Option<QkNormKind>,
    /// Sliding window of each block, if any.
    pub sliding_window: Vec<Option<usize>>,
    /// gpt-oss's clamped SwiGLU (`swiglu_alpha`, `swiglu_limit`) and expert biases.
    pub clamped_swiglu: Option<ClampedSwiglu>,
    /// The router has a bias (gpt-oss `mlp.router.bias`; DeepSeek-V3's
    /// `e_score_correction_bias`).
    pub router_bias: bool,
    /// Attention sinks (gpt-oss `self_attn.sinks`).
    pub attn_sinks: bool,
    /// DeepSeek's latent attention and router (boxed: the other families do without it).
    pub deepseek: Option<Box<DeepseekConfig>>,
}

struct Reader<'a> {
    path: &'a Path,
    json: &'a serde_json::Map<String, Value>,
}

impl Reader<'_> {
    fn error(&self, key: &str, message: impl Into<String>) -> LoadError {
        LoadError::HfConfigKey {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// The value of `key`, treating JSON `null` as absent.
    fn get(&self, key: &str) -> Option<&Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>, LoadError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                self.error(key, format!("expected a non-negative integer, found {v}"))
            }),
        }
    }

    /// A required positive integer no larger than `max`: sizes from an untrusted file are bounded
    /// before anything is allocated from them.
    fn bounded(&self, key: &str, max: usize) -> Result<usize, LoadError> {
        let n = self.usize(key)?;
        if n > max {
            return Err(self.error(key, format!("at most {max} supported, found {n}")));
        }
        Ok(n)
    }

    fn usize(&self, key: &str) -> Result<usize, LoadError> {
        let n = self
            .usize_opt(key)?
            .ok_or_else(|| self.error(key, "required key is missing"))?;
        if n == 0 {
            return Err(self.error(key, "must be positive, found 0"));
        }
        Ok(n)
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64, LoadError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| self.error(key, format!("expected a positive number, found {v}"))),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool, LoadError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.error(key, format!("expected true or false, found {v}"))),
        }
    }

    /// The first of `keys` present.
    fn usize_any(&self, keys: &[&str]) -> Result<usize, LoadError> {
        for k in keys {
            if self.get(k).is_some() {
                return self.usize(k);
            }
        }
        Err(self.error(
            keys[0],
            format!("required key is missing (also looked for {:?})", &keys[1..]),
        ))
    }
}

impl HfConfig {
    /// Reads `config.json` at `path`.
    pub fn read(path: &Path) -> Result<Self, LoadError> {
        let text = crate::input_file::read_to_string(path, crate::input_file::MAX_JSON_BYTES)
            .map_err(|io| LoadError::Open {
                path: path.to_path_buf(),
                io,
            })?;
        Self::parse(path, &text)
    }

    /// Parses the text of `config.json` (`path` is for messages).
    pub fn parse(path: &Path, text: &str) -> Result<Self, LoadError> {
        let value: Value = serde_json::from_str(text).map_err(|e| LoadError::HfConfigJson {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        let Some(json) = value.as_object() else {
            return Err(LoadError::HfConfigJson {
                path: path.to_path_buf(),
                detail: format!("expected a JSON object, found {}", kind_of(&value)),
            });
        };
        let r = Reader { path, json };
        let family = family_of(&r)?;
        let hidden = r.bounded("hidden_size", 1 << 16)?;
        let layers = r.bounded("num_hidden_layers", 4096)?;
        let heads = r.bounded("num_attention_heads", 4096)?;
        let kv_heads = r.usize_opt("num_key_value_heads")?.unwrap_or(heads);
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(r.error(
                "num_key_value_heads",
                format!("must divide num_attention_heads {heads}, found {kv_heads}"),
            ));
        }
        let explicit = r.usize_opt("head_dim")?;
        if explicit.is_none() && !hidden.is_multiple_of(heads) {
            return Err(r.error(
                "num_attention_heads",
                format!("hidden_size {hidden} is not divisible by {heads} heads and there is no head_dim"),
            ));
        }
        let head_dim = explicit.unwrap_or(hidden / heads);
        if head_dim > 4096 {
            return Err(r.error(
                "head_dim",
                format!("at most 4096 supported, found {head_dim}"),
            ));
        }
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(r.error(
                "head_dim",
                format!("rotary positions need an even head size, found {head_dim}"),
            ));
        }
        let vocab = r.bounded("vocab_size", 1 << 24)?;
        let act = r
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu");
        if act != "silu" {
            return Err(r.error(
                "hidden_act",
                format!("only \"silu\" is supported, found \"{act}\""),
            ));
        }
        let (rope_theta, rope_yarn) = rope(&r)?;
        let experts = r.usize_any(&["num_local_experts", "num_experts", "n_routed_experts"])?;
        if experts > u16::MAX as usize {
            return Err(r.error(
                "num_experts",
                format!("at most {} supported, found {experts}", u16::MAX),
            ));
        }
        let top_k = if family == HfFamily::GptOss {
            // The published gpt-oss configs also carry the original name `experts_per_token`.
            r.usize_any(&["num_experts_per_tok", "experts_per_token"])?
        } else {
            r.usize("num_experts_per_tok")?
        };
        if top_k > experts {
            return Err(r.error(
                "num_experts_per_tok",
                format!("must be at most the {experts} experts, found {top_k}"),
            ));
        }
        let qwen =
            matches!(family, HfFamily::Qwen2Moe | HfFamily::Qwen3Moe) || family.is_deepseek();
        let (expert_hidden, dense_hidden) = if qwen {
            (
                r.usize("moe_intermediate_size")?,
                Some(r.usize("intermediate_size")?),
            )
        } else {
            (r.usize("intermediate_size")?, None)
        };
        let moe_layers = if family.is_deepseek() {
            deepseek_moe_layers(&r, layers)?
        } else if qwen {
            let step = r.usize_opt("decoder_sparse_step")?.unwrap_or(1);
            if step == 0 {
                return Err(r.error("decoder_sparse_step", "must be positive, found 0"));
            }
            let only = match r.get("mlp_only_layers") {
                None => Vec::new(),
                Some(v) => v
                    .as_array()
                    .and_then(|a| {
                        a.iter()
                            .map(|x| x.as_u64().map(|n| n as usize))
                            .collect::<Option<Vec<_>>>()
                    })
                    .ok_or_else(|| {
                        r.error(
                            "mlp_only_layers",
                            format!("expected a list of layer indices, found {v}"),
                        )
                    })?,
            };
            (0..layers)
                .filter(|i| !only.contains(i) && (i + 1) % step == 0)
                .collect()
        } else {
            (0..layers).collect()
        };
        let norm_topk_prob = match family {
            // Mixtral's router always renormalises (`MixtralTopKRouter`); the key does not exist.
            // gpt-oss softmaxes the k chosen logits: the same as renormalising the chosen
            // probabilities of the softmax over all experts.
            HfFamily::Mixtral | HfFamily::GptOss => true,
            // `DeepseekV2TopkRouter` never reads `norm_topk_prob`.
            HfFamily::DeepseekV2 => false,
            _ => r.bool_or("norm_topk_prob", false)?,
        };
        let shared_expert_hidden = match family {
            HfFamily::Qwen2Moe => r
                .usize_opt("shared_expert_intermediate_size")?
                .filter(|&s| s > 0),
            // One MLP as wide as `n_shared_experts` experts, without a gate.
            HfFamily::DeepseekV2 | HfFamily::DeepseekV3 => r
                .usize_opt("n_shared_experts")?
                .filter(|&n| n > 0)
                .map(|n| n * expert_hidden),
            _ => None,
        };
        let (qkv_bias, attention_bias) = match family {
            HfFamily::Qwen2Moe => (r.bool_or("qkv_bias", true)?, false),
            HfFamily::Mixtral => (false, false),
            // `GptOssConfig.attention_bias` defaults to true.
            HfFamily::GptOss => (false, r.bool_or("attention_bias", true)?),
            _ => (false, r.bool_or("attention_bias", false)?),
        };
        let qk_norm = match family {
            HfFamily::Qwen3Moe => Some(QkNormKind::PerHead),
            HfFamily::Olmoe => Some(QkNormKind::Full),
            _ => None,
        };
        if family == HfFamily::Olmoe {
            if r.get("clip_qkv").is_some() {
                return Err(r.error(
                    "clip_qkv",
                    "clipping q, k and v is not supported (OLMoE-1B-7B has null)",
                ));
            }
            if explicit.is_some_and(|h| h * heads != hidden) {
                return Err(r.error(
                    "head_dim",
                    "OLMoE's q/k norms need head_dim x heads = hidden_size",
                ));
            }
        }
        let sliding_window = sliding_windows(&r, family, layers)?;
        let deepseek = if family.is_deepseek() {
            let (groups, routed_scaling_factor) = deepseek_routing(&r, family, experts, top_k)?;
            Some(Box::new(DeepseekConfig {
                mla: mla_shape(&r)?,
                rope_interleave: family == HfFamily::DeepseekV2
                    || r.bool_or("rope_interleave", true)?,
                groups,
                routed_scaling_factor,
            }))
        } else {
            None
        };
        let mla = deepseek.as_ref().map(|d| d.mla);
        // DeepSeek's `head_dim` key (when written) is the rotary width; the rotary tables need
        // exactly that.
        let head_dim = match mla {
            Some(m) => m.qk_rope_head_dim,
            None => head_dim,
        };
        let clamped_swiglu = if family == HfFamily::GptOss {
            Some(ClampedSwiglu {
                alpha: r.f64_or("swiglu_alpha", 1.702)? as f32,
                limit: r.f64_or("swiglu_limit", 7.0)? as f32,
            })
        } else {
            None
        };
        // The rotary tables are computed for every position up front, so the context is capped.
        let max_positions = r
            .usize_opt("max_position_embeddings")?
            .unwrap_or(4096)
            .clamp(1, MAX_CONTEXT);
        Ok(HfConfig {
            family,
            hidden,
            layers,
            heads,
            kv_heads,
            head_dim,
            explicit_head_dim: mla.is_none() && explicit.is_some_and(|h| h * heads != hidden),
            vocab,
            rms_norm_eps: r.f64_or(
                "rms_norm_eps",
                if matches!(family, HfFamily::Olmoe | HfFamily::GptOss) {
                    1e-5
                } else {
                    1e-6
                },
            )?,
            rope_theta,
            rope_yarn,
            max_positions,
            tie_embeddings: r.bool_or("tie_word_embeddings", false)?,
            experts,
            top_k,
            norm_topk_prob,
            expert_hidden,
            dense_hidden,
            moe_layers,
            shared_expert_hidden,
            qkv_bias,
            attention_bias,
            qk_norm,
            sliding_window,
            clamped_swiglu,
            // DeepSeek-V3's `e_score_correction_bias` is added to the scores for choosing: E
            // parameters and E additions per token, as gpt-oss's router bias.
            router_bias: matches!(family, HfFamily::GptOss | HfFamily::DeepseekV3),
            attn_sinks: family == HfFamily::GptOss,
            deepseek,
        })
    }

    /// The family's own routing rule: softmax, top-k, renormalised when the family/config says so.
    pub fn native_policy(&self) -> RoutingPolicy {
        RoutingPolicy::TopK {
            k: self.top_k,
            renormalize: self.norm_topk_prob,
        }
    }

    /// The model description the rest of xmoe-top reads (FLOPs, parameter counts, screens).
    pub fn model_config(&self, name: &str) -> ModelConfig {
        ModelConfig {
            name: name.to_string(),
            vocab_size: self.vocab,
            tokenizer: TokenizerKind::HuggingFace,
            n_kv_heads: (self.kv_heads != self.heads).then_some(self.kv_heads),
            head_size: self.explicit_head_dim.then_some(self.head_dim),
            norm: NormKind::RmsNorm,
            norm_eps: self.rms_norm_eps,
            positions: PositionKind::Rotary,
            rope_theta: self.rope_theta,
            activation: crate::kernel::Activation::Silu,
            gated: true,
            attn_bias: self.attention_bias,
            qk_norm: self.qk_norm,
            qkv_bias: self.qkv_bias,
            ffn_bias: false,
            moe_layers: MoeLayers::List(self.moe_layers.clone()),
            expert_bias: self.clamped_swiglu.is_some(),
            expert_gate_bias: self.clamped_swiglu.is_some(),
            clamped_swiglu: self.clamped_swiglu,
            router_bias: self.router_bias,
            attn_sinks: self.attn_sinks,
            sliding_windows: if self.sliding_window.iter().any(Option::is_some) {
                self.sliding_window.clone()
            } else {
                Vec::new()
            },
            shared_expert_hidden: self.shared_expert_hidden,
            shared_expert_gate: self.shared_expert_hidden.is_some() && !self.family.is_deepseek(),
            mla: self.deepseek.as_ref().map(|d| d.mla),
            tie_embeddings: self.tie_embeddings,
            default_policy: self.native_policy(),
            top_k_baseline: Some(self.top_k),
            capacity_factor: None,
            ..ModelConfig::byte_level(
                self.hidden,
                self.layers,
                self.heads,
                self.max_positions,
                self.experts,
                self.expert_hidden,
                self.dense_hidden.unwrap_or(self.expert_hidden),
            )
        }
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn family_of(r: &Reader) -> Result<HfFamily, LoadError> {
    let unknown = |found: String| LoadError::HfUnknownFamily {
        path: r.path.to_path_buf(),
        found,
        supported: SUPPORTED_MODEL_TYPES.join(", "),
    };
    if let Some(v) = r.get("model_type") {
        let s = v
            .as_str()
            .ok_or_else(|| r.error("model_type", format!("expected a string, found {v}")))?;
        return HfFamily::from_model_type(s).ok_or_else(|| unknown(format!("model_type \"{s}\"")));
    }
    match r
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str)
    {
        Some(a) => {
            HfFamily::from_architecture(a).ok_or_else(|| unknown(format!("architecture \"{a}\"")))
        }
        None => Err(r.error(
            "model_type",
            "required key is missing (and there is no `architectures` list)",
        )),
    }
}

/// `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (transformers 4): the
/// rotary base and, for `rope_type: "yarn"`, the YaRN parameters. Other rope types are refused.
fn rope(r: &Reader) -> Result<(f64, Option<Box<Yarn>>), LoadError> {
    let (params_key, params) = match (r.get("rope_parameters"), r.get("rope_scaling")) {
        (Some(p), _) => ("rope_parameters", Some(p)),
        (None, Some(s)) => ("rope_scaling", Some(s)),
        (None, None) => ("", None),
    };
    let mut yarn = None;
    let mut theta = None;
    if let Some(p) = params {
        let obj = p
            .as_object()
            .ok_or_else(|| r.error(params_key, format!("expected an object, found {p}")))?;
        let kind = obj
            .get("rope_type")
            .or_else(|| obj.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        // A positive number under `params_key.name`, if present and not null.
        let num = |name: &str| -> Result<Option<f64>, LoadError> {
            match obj.get(name).filter(|v| !v.is_null()) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .map(Some)
                    .ok_or_else(|| {
                        r.error(
                            &format!("{params_key}.{name}"),
                            format!("expected a positive number, found {v}"),
                        )
                    }),
            }
        };
        match kind {
            "default" => {}
            "yarn" => {
                if num("partial_rotary_factor")?.is_some_and(|f| f != 1.0) {
                    return Err(r.error(
                        &format!("{params_key}.partial_rotary_factor"),
                        "only a rotary factor of 1 is supported with YaRN",
                    ));
                }
                let original = num("original_max_position_embeddings")?.ok_or_else(|| {
                    r.error(
                        &format!("{params_key}.original_max_position_embeddings"),
                        "required for rope type \"yarn\" but missing",
                    )
                })?;
                let factor = match num("factor")? {
                    Some(f) => f,
                    None => r.f64_or("max_position_embeddings", 4096.0)? / original,
                };
                let truncate = match obj.get("truncate").filter(|v| !v.is_null()) {
                    None => true,
                    Some(v) => v.as_bool().ok_or_else(|| {
                        r.error(
                            &format!("{params_key}.truncate"),
                            format!("expected true or false, found {v}"),
                        )
                    })?,
                };
                yarn = Some(Box::new(Yarn {
                    factor,
                    original_max_positions: original,
                    beta_fast: num("beta_fast")?.unwrap_or(32.0),
                    beta_slow: num("beta_slow")?.unwrap_or(1.0),
                    truncate,
                    attention_factor: num("attention_factor")?,
                    mscale: num("mscale")?,
                    mscale_all_dim: num("mscale_all_dim")?,
                }));
            }
            other => {
                return Err(r.error(
                    params_key,
                    format!(
                        "rope type \"{other}\" is not supported (supported: \"default\", \"yarn\")"
                    ),
                ));
            }
        }
        theta = num("rope_theta")?;
    }
    let theta = match theta {
        Some(t) => t,
        None => r.f64_or("rope_theta", 10_000.0)?,
    };
    Ok((theta, yarn))
}

fn sliding_windows(
    r: &Reader,
    family: HfFamily,
    layers: usize,
) -> Result<Vec<Option<usize>>, LoadError> {
    let window = r.usize_opt("sliding_window")?.filter(|&w| w > 0);
    Ok(match family {
        HfFamily::Mixtral => vec![window; layers],
        HfFamily::Olmoe | HfFamily::DeepseekV2 | HfFamily::DeepseekV3 => vec![None; layers],
        // transformers' default: alternating, sliding first; `GptOssConfig.sliding_window` 128.
        HfFamily::GptOss => {
            let window = Some(r.usize_opt("sliding_window")?.unwrap_or(128)).filter(|&w| w > 0);
            match r.get("layer_types") {
                Some(_) => layer_types(r, layers, window)?,
                None => (0..layers)
                    .map(|i| if i % 2 == 0 { window } else { None })
                    .collect(),
            }
        }
        HfFamily::Qwen3Moe => {
            let on = r.bool_or("use_sliding_window", false)?;
            vec![if on { window } else { None }; layers]
        }
        HfFamily::Qwen2Moe => {
            if !r.bool_or("use_sliding_window", false)? {
                vec![None; layers]
            } else if r.get("layer_types").is_some() {
                layer_types(r, layers, window)?
            } else {
                let max_window = r.usize_opt("max_window_layers")?.unwrap_or(layers);
                (0..layers)
                    .map(|i| (i % 2 == 0 && i < max_window).then_some(window).flatten())
                    .collect()
            }
        }
    })
}

/// `layer_types`: one `"sliding_attention"` (window `window`) or `"full_attention"` per layer.
fn layer_types(
    r: &Reader,
    layers: usize,
    window: Option<usize>,
) -> Result<Vec<Option<usize>>, LoadError> {
    let Some(types) = r.get("layer_types") else {
        return Err(r.error("layer_types", "required key is missing"));
    };
    let list = types.as_array().ok_or_else(|| {
        r.error(
            "layer_types",
            format!("expected a list of {layers} strings, found {types}"),
        )
    })?;
    if list.len() != layers {
        return Err(r.error(
            "layer_types",
            format!(
                "expected one entry per layer (num_hidden_layers {layers}), found {} entries",
                list.len()
            ),
        ));
    }
    list.iter()
        .map(|t| match t.as_str() {
            Some("sliding_attention") => Ok(window),
            Some("full_attention") => Ok(None),
            _ => Err(r.error(
                "layer_types",
                format!("expected \"full_attention\" or \"sliding_attention\", found {t}"),
            )),
        })
        .collect()
}

/// DeepSeek's dense/MoE split: block `i` is MoE iff `i >= first_k_dense_replace` and `i %
/// moe_layer_freq == 0`, as DeepSeek's own modelling code has it (transformers 5.24 ignores
/// `moe_layer_freq`; every published config has 1, where the two agree).
fn deepseek_moe_layers(r: &Reader, layers: usize) -> Result<Vec<usize>, LoadError> {
    let first_dense = r.usize_opt("first_k_dense_replace")?.unwrap_or(0);
    let freq = r.usize_opt("moe_layer_freq")?.unwrap_or(1);
    if freq == 0 {
        return Err(r.error("moe_layer_freq", "must be positive, found 0"));
    }
    Ok((first_dense..layers).filter(|i| i % freq == 0).collect())
}

/// The latent attention sizes (`q_lora_rank` may be null: one `q_proj`).
fn mla_shape(r: &Reader) -> Result<MlaShape, LoadError> {
    let q_lora_rank = r.usize_opt("q_lora_rank")?;
    if q_lora_rank == Some(0) {
        return Err(r.error("q_lora_rank", "must be positive or null, found 0"));
    }
    let shape = MlaShape {
        q_lora_rank,
        kv_lora_rank: r.bounded("kv_lora_rank", 1 << 16)?,
        qk_nope_head_dim: r.bounded("qk_nope_head_dim", 4096)?,
        qk_rope_head_dim: r.bounded("qk_rope_head_dim", 4096)?,
        v_head_dim: r.bounded("v_head_dim", 4096)?,
    };
    if !shape.qk_rope_head_dim.is_multiple_of(2) {
        return Err(r.error(
            "qk_rope_head_dim",
            format!(
                "rotary positions need an even width, found {}",
                shape.qk_rope_head_dim
            ),
        ));
    }
    if let Some(q) = q_lora_rank
        && q > 1 << 16
    {
        return Err(r.error("q_lora_rank", format!("at most 65536 supported, found {q}")));
    }
    Ok(shape)
}

/// `topk_method`, `scoring_func`, `n_group`, `topk_group` and `routed_scaling_factor`, checked
/// against the experts and the top-k: the groups (none for V2's `greedy`) and the scaling.
fn deepseek_routing(
    r: &Reader,
    family: HfFamily,
    experts: usize,
    top_k: usize,
) -> Result<(Option<GroupLimit>, f64), LoadError> {
    let string = |key: &str| -> Result<Option<&str>, LoadError> {
        match r.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| r.error(key, format!("expected a string, found {v}"))),
        }
    };
    let v3 = family == HfFamily::DeepseekV3;
    let (method_default, scoring) = if v3 {
        ("noaux_tc", "sigmoid")
    } else {
        ("greedy", "softmax")
    };
    let method = string("topk_method")?.unwrap_or(method_default);
    let grouped = match (v3, method) {
        (false, "greedy") => false,
        (false, "group_limited_greedy") | (true, "noaux_tc") => true,
        _ => {
            let supported = if v3 {
                "\"noaux_tc\""
            } else {
                "\"greedy\" or \"group_limited_greedy\""
            };
            return Err(r.error(
                "topk_method",
                format!(
                    "{} routes with {supported}, found \"{method}\"",
                    family.model_type()
                ),
            ));
        }
    };
    if let Some(found) = string("scoring_func")?
        && found != scoring
    {
        return Err(r.error(
            "scoring_func",
            format!(
                "{} scores experts with \"{scoring}\", found \"{found}\"",
                family.model_type()
            ),
        ));
    }
    let groups = if grouped {
        let n_group = r.usize_opt("n_group")?.unwrap_or(1);
        let topk_group = r.usize_opt("topk_group")?.unwrap_or(1);
        if n_group == 0 || !experts.is_multiple_of(n_group) {
            return Err(r.error(
                "n_group",
                format!(
                    "must divide the {experts} routed experts (n_routed_experts), found {n_group}"
                ),
            ));
        }
        if topk_group == 0 || topk_group > n_group {
            return Err(r.error(
                "topk_group",
                format!("must be in 1..={n_group} (n_group), found {topk_group}"),
            ));
        }
        if topk_group * (experts / n_group) < top_k {
            return Err(r.error(
                "topk_group",
                format!(
                    "{topk_group} groups of {} experts hold fewer than the {top_k} chosen per token (num_experts_per_tok)",
                    experts / n_group
                ),
            ));
        }
        Some(GroupLimit {
            n_group,
            topk_group,
        })
    } else {
        None
    };
    Ok((groups, r.f64_or("routed_scaling_factor", 1.0)?))
}

/// `config.json` beside `dir`.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("config.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_style_gpt_oss_config_reads_yarn_and_its_defaults() {
        // The transformers 4 shape of openai/gpt-oss-20b's config.json (sizes shrunk):
        // `rope_scaling` beside a top-level `rope_theta`, `experts_per_token`, no `layer_types`.
        let text = r#"{
            "model_type": "gpt_oss", "hidden_size": 64, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "vocab_size": 100, "intermediate_size": 64, "num_local_experts": 4,
            "experts_per_token": 2, "sliding_window": 8, "max_position_embeddings": 512,
            "rope_theta": 150000,
            "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                             "original_max_position_embeddings": 16, "rope_type": "yarn",
                             "truncate": false},
            "swiglu_limit": 7.0
        }"#;
        let c = HfConfig::parse(Path::new("config.json"), text).unwrap();
        assert_eq!(c.family, HfFamily::GptOss);
        assert_eq!(c.top_k, 2);
        assert_eq!(c.rope_theta, 150_000.0);
        let yarn = c.rope_yarn.as_deref().unwrap();
        assert_eq!((yarn.factor, yarn.original_max_positions), (32.0, 16.0));
        assert!(!yarn.truncate);
        assert_eq!(c.sliding_window, vec![Some(8), None, Some(8)]);
        assert!(c.attention_bias && c.router_bias && c.attn_sinks && c.norm_topk_prob);
        assert_eq!(
            c.clamped_swiglu,
            Some(ClampedSwiglu {
                alpha: 1.702,
                limit: 7.0
            })
        );
        assert_eq!(c.rms_norm_eps, 1e-5);
        let m = c.model_config("tiny");
        assert!(m.expert_bias && m.expert_gate_bias && m.router_bias && m.attn_sinks);
        assert_eq!(
            m.default_policy,
            RoutingPolicy::TopK {
                k: 2,
                renormalize: true
            }
        );
    }
}
