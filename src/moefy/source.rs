//! The dense model a conversion starts from: a Llama-family GGUF file (read by
//! `model::gguf::DenseLlama`, quantised tensors dequantised) or a Hugging Face checkpoint
//! directory (`config.json` with `model_type: "llama"`, safetensors, `tokenizer.json`). Either way
//! the result is f32 tensors under Hugging Face names and the tokenizer as `tokenizer.json` text.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::model::gguf::{DenseLlama, DenseLlamaConfig, is_gguf};

/// A dense Llama-family model, loaded in f32 on the CPU.
pub struct DenseModel {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its shape.
    pub config: DenseLlamaConfig,
    /// Every tensor under its Hugging Face name (`model.embed_tokens.weight`,
    /// `model.layers.{i}.self_attn.q_proj.weight`, `model.layers.{i}.mlp.gate_proj.weight`,
    /// `model.norm.weight`, `lm_head.weight` when untied), `[out, in]`, f32.
    pub tensors: BTreeMap<String, Tensor>,
    /// The tokenizer as `tokenizer.json` text.
    pub tokenizer_json: String,
}

impl DenseModel {
    /// Opens a dense GGUF file or a Hugging Face checkpoint directory.
    pub fn open(path: &Path) -> Result<Self> {
        if is_gguf(path) {
            Self::open_gguf(path)
        } else if path.is_dir() {
            Self::open_hf(path)
        } else if !path.exists() {
            bail!("{}: no such file or directory", path.display())
        } else {
            bail!(
                "{}: not a GGUF file or a Hugging Face checkpoint directory (a dense Llama-family model is needed)",
                path.display()
            )
        }
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let dense = DenseLlama::open(path, &Device::Cpu)?;
        let tokenizer = crate::workload::gguf_tokenizer::from_file(path)?;
        let tokenizer_json = tokenizer.to_string(false).map_err(|e| {
            anyhow!(
                "{}: cannot write its tokenizer as JSON: {e}",
                path.display()
            )
        })?;
        let m = DenseModel {
            path: path.to_path_buf(),
            config: dense.config,
            tensors: dense.tensors,
            tokenizer_json,
        };
        m.check()?;
        Ok(m)
    }

    fn open_hf(dir: &Path) -> Result<Self> {
        let cj = dir.join("config.json");
        let text = std::fs::read_to_string(&cj)
            .with_context(|| format!("{}: cannot read config.json", cj.display()))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: not valid JSON: {e}", cj.display()))?;
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        if model_type != "llama" {
            bail!(
                "{}: unsupported dense architecture `model_type: \"{model_type}\"`; supported: llama (a Llama-family checkpoint: RMSNorm, rotary, SwiGLU FFN)",
                cj.display()
            );
        }
        let uint = |k: &str| -> Result<Option<usize>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .filter(|&n| n > 0 && n < (1 << 24))
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| {
                        anyhow!(
                            "{}: `{k}` must be a positive integer, found {x}",
                            cj.display()
                        )
                    }),
            }
        };
        let need = |k: &str| -> Result<usize> {
            uint(k)?.ok_or_else(|| anyhow!("{}: `{k}` is missing", cj.display()))
        };
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str)
            && act != "silu"
        {
            bail!(
                "{}: `hidden_act` \"{act}\" is not supported; a Llama FFN is SwiGLU (\"silu\")",
                cj.display()
            );
        }
        if v.get("rope_scaling").is_some_and(|r| !r.is_null()) {
            bail!(
                "{}: `rope_scaling` is not supported (plain rotary positions only)",
                cj.display()
            );
        }
        for k in ["attention_bias", "mlp_bias"] {
            if v.get(k).and_then(Value::as_bool) == Some(true) {
                bail!("{}: `{k}: true` is not supported", cj.display());
            }
        }
        let hidden = need("hidden_size")?;
        let heads = need("num_attention_heads")?;
        let config = DenseLlamaConfig {
            name: dir
                .file_name()
                .map_or("dense".into(), |n| n.to_string_lossy().into_owned()),
            hidden,
            layers: need("num_hidden_layers")?,
            heads,
            kv_heads: uint("num_key_value_heads")?.unwrap_or(heads),
            head_dim: uint("head_dim")?.unwrap_or(hidden / heads),
            ffn_hidden: need("intermediate_size")?,
            vocab: need("vocab_size")?,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta: v
                .get("rope_theta")
                .and_then(Value::as_f64)
                .unwrap_or(10_000.0),
            context_length: uint("max_position_embeddings")?,
            tie_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("{}: cannot list the directory", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("{}: no *.safetensors file", dir.display());
        }
        let mut tensors = BTreeMap::new();
        for f in &files {
            let loaded = candle_core::safetensors::load(f, &Device::Cpu)
                .map_err(|e| anyhow!("{}: cannot read: {e}", f.display()))?;
            for (name, t) in loaded {
                let t = t
                    .to_dtype(DType::F32)
                    .map_err(|e| anyhow!("{}: tensor `{name}`: {e}", f.display()))?;
                tensors.insert(name, t);
            }
        }
        let tj = dir.join("tokenizer.json");
        let tokenizer_json = std::fs::read_to_string(&tj)
            .with_context(|| format!("{}: cannot read the tokenizer", tj.display()))?;
        tokenizers::Tokenizer::from_bytes(tokenizer_json.as_bytes())
            .map_err(|e| anyhow!("{}: not a valid tokenizer.json: {e}", tj.display()))?;
        let m = DenseModel {
            path: dir.to_path_buf(),
            config,
            tensors,
            tokenizer_json,
        };
        m.check()?;
        Ok(m)
    }

    /// Every tensor the conversion reads is present with its shape.
    fn check(&self) -> Result<()> {
        let c = &self.config;
        let (h, q, kv) = (c.hidden, c.heads * c.head_dim, c.kv_heads * c.head_dim);
        if c.heads == 0 || c.kv_heads == 0 || !c.heads.is_multiple_of(c.kv_heads) {
            bail!(
                "{}: {} key/value heads do not divide {} attention heads",
                self.path.display(),
                c.kv_heads,
                c.heads
            );
        }
        let mut want: Vec<(String, Vec<usize>)> = vec![
            ("model.embed_tokens.weight".into(), vec![c.vocab, h]),
            ("model.norm.weight".into(), vec![h]),
        ];
        if !c.tie_embeddings {
            want.push(("lm_head.weight".into(), vec![c.vocab, h]));
        }
        for i in 0..c.layers {
            let p = format!("model.layers.{i}");
            for (n, s) in [
                ("input_layernorm.weight", vec![h]),
                ("post_attention_layernorm.weight", vec![h]),
                ("self_attn.q_proj.weight", vec![q, h]),
                ("self_attn.k_proj.weight", vec![kv, h]),
                ("self_attn.v_proj.weight", vec![kv, h]),
                ("self_attn.o_proj.weight", vec![h, q]),
                ("mlp.gate_proj.weight", vec![c.ffn_hidden, h]),
                ("mlp.up_proj.weight", vec![c.ffn_hidden, h]),
                ("mlp.down_proj.weight", vec![h, c.ffn_hidden]),
            ] {
                want.push((format!("{p}.{n}"), s));
            }
        }
        for (name, shape) in want {
            let Some(t) = self.tensors.get(&name) else {
                bail!(
                    "{}: missing tensor `{name}` (expected shape {shape:?})",
                    self.path.display()
                );
            };
            if t.dims() != shape.as_slice() {
                bail!(
                    "{}: tensor `{name}` has shape {:?}, expected {shape:?}",
                    self.path.display(),
                    t.dims()
                );
            }
        }
        Ok(())
    }

    /// The tensor `name` (checked at open).
    pub fn tensor(&self, name: &str) -> &Tensor {
        &self.tensors[name]
    }
}
