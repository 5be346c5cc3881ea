//! GGUF metadata (`{arch}.block_count`, `{arch}.expert_count`, ...) mapped onto the
//! configuration a Hugging Face `config.json` gives. The mapping writes the equivalent
//! `config.json` keys and lets [`HfConfig::parse`] check them, so both sources go through the
//! same checks; every GGUF key is first read and checked here, so that an error names the GGUF
//! key, not a `config.json` one.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::{Map, json};

use super::{GgufFile, gguf_error};
use crate::model::format::LoadError;
use crate::model::hf::HfConfig;

/// The llama.cpp architectures (`general.architecture`) xmoe-top runs, in the order messages
/// list them. `llama` must have experts (Mixtral); a dense `llama` is read by
/// [`super::DenseLlama`].
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "llama",
    "qwen2moe",
    "qwen3moe",
    "olmoe",
    "deepseek2",
    "gpt-oss",
];

/// A supported `general.architecture`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufArch {
    /// `llama` (Mixtral when it has experts). Its q/k rows are permuted by the converter.
    Llama,
    /// `qwen2moe` (Qwen1.5-MoE, Qwen2-MoE).
    Qwen2Moe,
    /// `qwen3moe`.
    Qwen3Moe,
    /// `olmoe`.
    Olmoe,
    /// `deepseek2` (DeepSeek-V2, V2-Lite, V3, Kimi-K2): multi-head latent attention and the
    /// DeepSeek routers (`super::deepseek`).
    Deepseek2,
    /// `gpt-oss` (gpt-oss-20b, -120b): attention sinks, biases everywhere, a router with a bias,
    /// clamped SwiGLU experts, usually MXFP4 (`super::gptoss`).
    GptOss,
}

impl GgufArch {
    /// The architecture of `g`, or an error naming the one found and the supported ones.
    pub fn of(g: &GgufFile) -> Result<Self, LoadError> {
        let a = g.architecture()?;
        Ok(match a {
            "llama" => GgufArch::Llama,
            "qwen2moe" => GgufArch::Qwen2Moe,
            "qwen3moe" => GgufArch::Qwen3Moe,
            "olmoe" => GgufArch::Olmoe,
            "deepseek2" => GgufArch::Deepseek2,
            "gpt-oss" => GgufArch::GptOss,
            other => {
                let why = match other {
                    "mixtral" => " (llama.cpp writes Mixtral as \"llama\")",
                    _ => "",
                };
                return Err(LoadError::HfUnknownFamily {
                    path: g.path().to_path_buf(),
                    found: format!("GGUF architecture \"{other}\"{why}"),
                    supported: SUPPORTED_ARCHITECTURES.join(", "),
                });
            }
        })
    }

    /// The `general.architecture` string.
    pub fn name(self) -> &'static str {
        match self {
            GgufArch::Llama => "llama",
            GgufArch::Qwen2Moe => "qwen2moe",
            GgufArch::Qwen3Moe => "qwen3moe",
            GgufArch::Olmoe => "olmoe",
            GgufArch::Deepseek2 => "deepseek2",
            GgufArch::GptOss => "gpt-oss",
        }
    }
}

/// Reads metadata values of one file, each error naming the key.
pub(crate) struct Meta<'a> {
    pub(crate) g: &'a GgufFile,
    pub(crate) arch: &'a str,
}

impl Meta<'_> {
    pub(crate) fn path(&self) -> &Path {
        self.g.path()
    }

    /// `{arch}.{key}`.
    pub(crate) fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.arch)
    }

    pub(crate) fn bad(&self, key: &str, message: impl std::fmt::Display) -> LoadError {
        gguf_error(self.path(), format!("metadata `{key}`: {message}"))
    }

    /// An unsigned integer at `{arch}.{key}`, if present.
    pub(crate) fn uint_opt(&self, key: &str) -> Result<Option<usize>, LoadError> {
        let k = self.key(key);
        let Some(v) = self.g.metadata().get(&k) else {
            return Ok(None);
        };
        let n: Option<u64> = match v {
            Value::U8(x) => Some(*x as u64),
            Value::U16(x) => Some(*x as u64),
            Value::U32(x) => Some(*x as u64),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        match n.and_then(|n| usize::try_from(n).ok()) {
            Some(n) => Ok(Some(n)),
            None => Err(self.bad(
                &k,
                format!("expected a non-negative integer, found {}", describe(v)),
            )),
        }
    }

    /// A required positive integer at `{arch}.{key}`, at most `max`.
    pub(crate) fn uint(&self, key: &str, max: usize) -> Result<usize, LoadError> {
        let k = self.key(key);
        let n = self
            .uint_opt(key)?
            .ok_or_else(|| self.bad(&k, "required key is missing"))?;
        if n == 0 || n > max {
            return Err(self.bad(&k, format!("expected 1 to {max}, found {n}")));
        }
        Ok(n)
    }

    /// A positive finite number at `{arch}.{key}`, if present.
    pub(crate) fn float_opt(&self, key: &str) -> Result<Option<f64>, LoadError> {
        let k = self.key(key);
        let Some(v) = self.g.metadata().get(&k) else {
            return Ok(None);
        };
        let x = match v {
            Value::F32(x) => Some(*x as f64),
            Value::F64(x) => Some(*x),
            _ => None,
        };
        match x.filter(|x| x.is_finite() && *x > 0.0) {
            Some(x) => Ok(Some(x)),
            None => Err(self.bad(
                &k,
                format!("expected a positive number, found {}", describe(v)),
            )),
        }
    }

    /// The RMSNorm epsilon (`attention.layer_norm_rms_epsilon`), required; `why` is added to the
    /// message when it is missing.
    pub(crate) fn rms_eps(&self, why: &str) -> Result<f64, LoadError> {
        let key = "attention.layer_norm_rms_epsilon";
        self.float_opt(key)?
            .ok_or_else(|| self.bad(&self.key(key), format!("required key is missing{why}")))
    }

    /// A boolean at `{arch}.{key}`, if present.
    pub(crate) fn bool_opt(&self, key: &str) -> Result<Option<bool>, LoadError> {
        let k = self.key(key);
        match self.g.metadata().get(&k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.bad(&k, format!("expected true or false, found {}", describe(v)))),
        }
    }

    /// A string at `{arch}.{key}`, if present.
    pub(crate) fn str_opt(&self, key: &str) -> Result<Option<&str>, LoadError> {
        let k = self.key(key);
        match self.g.metadata().get(&k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.bad(&k, format!("expected a string, found {}", describe(v)))),
        }
    }
}

/// A short description of a metadata value for messages (arrays by length, not contents).
pub(crate) fn describe(v: &Value) -> String {
    match v {
        Value::Array(a) => format!("an array of {} values", a.len()),
        Value::String(s) => format!("the string {s:?}"),
        other => format!("{other:?}"),
    }
}

/// The attention and rotary keys every architecture shares, as `config.json` keys, checked.
pub(crate) fn common_keys(
    m: &Meta,
    out: &mut Map<String, serde_json::Value>,
) -> Result<(), LoadError> {
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
    let key_len = m.uint_opt("attention.key_length")?;
    let value_len = m.uint_opt("attention.value_length")?;
    if let (Some(k), Some(v)) = (key_len, value_len)
        && k != v
    {
        return Err(m.bad(
            &m.key("attention.value_length"),
            format!(
                "a value head size different from the key head size {k} is not supported, found {v}"
            ),
        ));
    }
    if key_len.is_none() && !hidden.is_multiple_of(heads) {
        return Err(m.bad(
            &m.key("attention.head_count"),
            format!("embedding_length {hidden} is not divisible by {heads} heads and there is no attention.key_length"),
        ));
    }
    let head_dim = key_len.unwrap_or(hidden / heads);
    if let Some(r) = m.uint_opt("rope.dimension_count")?
        && r != head_dim
    {
        return Err(m.bad(
            &m.key("rope.dimension_count"),
            format!("partial rotary embeddings are not supported: expected the head size {head_dim}, found {r}"),
        ));
    }
    if let Some(kind) = m.str_opt("rope.scaling.type")?
        && kind != "none"
    {
        return Err(m.bad(
            &m.key("rope.scaling.type"),
            format!("rope scaling \"{kind}\" is not supported (only none)"),
        ));
    }
    let eps = m.rms_eps(" (only RMSNorm models are supported)")?;
    out.insert("hidden_size".into(), json!(hidden));
    out.insert("num_hidden_layers".into(), json!(layers));
    out.insert("num_attention_heads".into(), json!(heads));
    out.insert("num_key_value_heads".into(), json!(kv));
    if let Some(k) = key_len {
        out.insert("head_dim".into(), json!(k));
    }
    out.insert("rms_norm_eps".into(), json!(eps));
    out.insert(
        "rope_theta".into(),
        json!(m.float_opt("rope.freq_base")?.unwrap_or(10_000.0)),
    );
    if let Some(ctx) = m.uint_opt("context_length")? {
        out.insert("max_position_embeddings".into(), json!(ctx.max(1)));
    }
    Ok(())
}

/// The vocabulary size: the rows of `token_embd.weight`, checked against `{arch}.vocab_size`
/// and the tokenizer's token list where present.
pub(crate) fn vocab_size(m: &Meta) -> Result<usize, LoadError> {
    let rows = match m.g.shape("token_embd.weight") {
        Some(&[rows, _]) => rows,
        Some(s) => {
            return Err(gguf_error(
                m.path(),
                format!(
                    "tensor `token_embd.weight` has shape {s:?}, expected [vocab, embedding_length]"
                ),
            ));
        }
        None => {
            return Err(LoadError::MissingTensor {
                path: m.path().to_path_buf(),
                tensor: "token_embd.weight".into(),
                expected: vec![],
            });
        }
    };
    if let Some(v) = m.uint_opt("vocab_size")?
        && v != rows
    {
        return Err(m.bad(
            &m.key("vocab_size"),
            format!("token_embd.weight has {rows} rows, found {v}"),
        ));
    }
    Ok(rows)
}

/// The configuration of a GGUF MoE file.
pub(crate) fn hf_config(g: &GgufFile) -> Result<HfConfig, LoadError> {
    let arch = super::GgufArch::of(g)?;
    let m = Meta {
        g,
        arch: arch.name(),
    };
    if arch == GgufArch::Deepseek2 {
        return super::deepseek::hf_config(&m);
    }
    if arch == GgufArch::GptOss {
        return super::gptoss::hf_config(&m);
    }
    let mut c = Map::new();
    common_keys(&m, &mut c)?;
    let layers = m.uint("block_count", 4096)?;
    let experts = m.uint_opt("expert_count")?.unwrap_or(0);
    if experts == 0 {
        return Err(m.bad(
            &m.key("expert_count"),
            format!(
                "missing or 0: a dense {} model has no router to profile (xmoe-top's dense-to-MoE path reads it instead)",
                arch.name()
            ),
        ));
    }
    if experts > u16::MAX as usize {
        return Err(m.bad(
            &m.key("expert_count"),
            format!("at most {} supported, found {experts}", u16::MAX),
        ));
    }
    let top_k = m.uint("expert_used_count", experts)?;
    c.insert("vocab_size".into(), json!(vocab_size(&m)?));
    c.insert("num_local_experts".into(), json!(experts));
    c.insert("num_experts_per_tok".into(), json!(top_k));
    // MoE blocks are the ones with a router; a block without one is dense (the converter has no
    // key for it).
    let dense: Vec<usize> = (0..layers)
        .filter(|i| !g.has(&format!("blk.{i}.ffn_gate_inp.weight")))
        .collect();
    let ffn = m.uint_opt("feed_forward_length")?;
    let expert_ffn = m.uint_opt("expert_feed_forward_length")?;
    // llama.cpp's own defaults per architecture (llm_build_* of each): Mixtral and Qwen3-MoE
    // renormalise the top-k weights, Qwen2-MoE and OLMoE do not; `expert_weights_norm`, where a
    // converter writes it, says so explicitly.
    let norm_default = matches!(arch, GgufArch::Llama | GgufArch::Qwen3Moe);
    let norm = m.bool_opt("expert_weights_norm")?.unwrap_or(norm_default);
    if let Some(func) = m.uint_opt("expert_gating_func")?
        && func != 1
    {
        return Err(m.bad(
            &m.key("expert_gating_func"),
            format!("only softmax gating (1) is supported, found {func}"),
        ));
    }
    let has0 = |t: &str| (0..layers).any(|i| g.has(&format!("blk.{i}.{t}")));
    match arch {
        GgufArch::Llama => {
            if !dense.is_empty() {
                return Err(gguf_error(
                    g.path(),
                    format!(
                        "blocks {dense:?} have no router `ffn_gate_inp.weight`: a llama (Mixtral) file with experts must have one in every block"
                    ),
                ));
            }
            c.insert("model_type".into(), json!("mixtral"));
            let width = expert_ffn
                .or(ffn)
                .ok_or_else(|| m.bad(&m.key("feed_forward_length"), "required key is missing"))?;
            c.insert("intermediate_size".into(), json!(width));
            if let Some(w) = m.uint_opt("attention.sliding_window")?.filter(|&w| w > 0) {
                c.insert("sliding_window".into(), json!(w));
            }
            if !norm {
                return Err(m.bad(
                    &m.key("expert_weights_norm"),
                    "a Mixtral router always renormalises its top-k weights; false is not supported",
                ));
            }
        }
        GgufArch::Qwen2Moe | GgufArch::Qwen3Moe => {
            c.insert(
                "model_type".into(),
                json!(if arch == GgufArch::Qwen2Moe {
                    "qwen2_moe"
                } else {
                    "qwen3_moe"
                }),
            );
            let e = expert_ffn.ok_or_else(|| {
                m.bad(
                    &m.key("expert_feed_forward_length"),
                    "required key is missing",
                )
            })?;
            c.insert("moe_intermediate_size".into(), json!(e));
            // The dense width matters only for dense blocks; without any, any positive value.
            let d = match (ffn, dense.is_empty()) {
                (Some(d), _) => d,
                (None, true) => e,
                (None, false) => {
                    return Err(m.bad(
                        &m.key("feed_forward_length"),
                        format!("required for the dense blocks {dense:?} but missing"),
                    ));
                }
            };
            c.insert("intermediate_size".into(), json!(d));
            c.insert("mlp_only_layers".into(), json!(dense));
            c.insert("norm_topk_prob".into(), json!(norm));
            if arch == GgufArch::Qwen2Moe {
                c.insert("qkv_bias".into(), json!(has0("attn_q.bias")));
                let shared = m
                    .uint_opt("expert_shared_feed_forward_length")?
                    .or_else(|| {
                        g.shape("blk.0.ffn_gate_shexp.weight")
                            .and_then(|s| s.first().copied())
                    });
                if let Some(s) = shared
                    && has0("ffn_gate_shexp.weight")
                {
                    c.insert("shared_expert_intermediate_size".into(), json!(s));
                }
            } else {
                c.insert("attention_bias".into(), json!(has0("attn_q.bias")));
            }
        }
        GgufArch::Olmoe => {
            if !dense.is_empty() {
                return Err(gguf_error(
                    g.path(),
                    format!(
                        "blocks {dense:?} have no router `ffn_gate_inp.weight`: every OLMoE block is MoE"
                    ),
                ));
            }
            c.insert("model_type".into(), json!("olmoe"));
            let width = expert_ffn.or(ffn).ok_or_else(|| {
                m.bad(
                    &m.key("expert_feed_forward_length"),
                    "required key is missing",
                )
            })?;
            c.insert("intermediate_size".into(), json!(width));
            c.insert("norm_topk_prob".into(), json!(norm));
            c.insert("attention_bias".into(), json!(has0("attn_q.bias")));
        }
        // Mapped above, before the keys DeepSeek does not share; kept for an exhaustive match.
        GgufArch::Deepseek2 => return super::deepseek::hf_config(&m),
        GgufArch::GptOss => return super::gptoss::hf_config(&m),
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
