//! Synthetic Hugging Face checkpoints with published shapes and random bf16 weights, for checking
//! that real-size models load and run. The tensors are generated while they are written, one at a
//! time, so writing a 14 GB checkpoint never holds more than one tensor in memory.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use safetensors::{Dtype, View};

/// The shapes of a synthetic OLMoE checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OlmoeShape {
    /// `hidden_size`.
    pub hidden: usize,
    /// `num_hidden_layers`.
    pub layers: usize,
    /// `num_attention_heads` (= key/value heads).
    pub heads: usize,
    /// `num_experts`.
    pub experts: usize,
    /// `num_experts_per_tok`.
    pub top_k: usize,
    /// `intermediate_size` (one expert).
    pub expert_hidden: usize,
    /// `vocab_size`.
    pub vocab: usize,
    /// `max_position_embeddings`.
    pub max_positions: usize,
}

impl OlmoeShape {
    /// OLMoE-1B-7B's published configuration (`allenai/OLMoE-1B-7B-0924`): 6.9 B parameters.
    pub fn olmoe_1b_7b() -> Self {
        Self {
            hidden: 2048,
            layers: 16,
            heads: 16,
            experts: 64,
            top_k: 8,
            expert_hidden: 1024,
            vocab: 50304,
            max_positions: 4096,
        }
    }

    /// A small model of the same family, for tests.
    pub fn tiny() -> Self {
        Self {
            hidden: 64,
            layers: 2,
            heads: 4,
            experts: 16,
            top_k: 4,
            expert_hidden: 32,
            vocab: 512,
            max_positions: 256,
        }
    }

    /// Every tensor, in file order, with its shape.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (self.hidden, self.expert_hidden);
        let mut v = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            v.push((format!("{p}.input_layernorm.weight"), vec![h]));
            for x in ["q", "k", "v", "o"] {
                v.push((format!("{p}.self_attn.{x}_proj.weight"), vec![h, h]));
            }
            v.push((format!("{p}.self_attn.q_norm.weight"), vec![h]));
            v.push((format!("{p}.self_attn.k_norm.weight"), vec![h]));
            v.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            v.push((format!("{p}.mlp.gate.weight"), vec![self.experts, h]));
            for e in 0..self.experts {
                let x = format!("{p}.mlp.experts.{e}");
                v.push((format!("{x}.gate_proj.weight"), vec![i, h]));
                v.push((format!("{x}.up_proj.weight"), vec![i, h]));
                v.push((format!("{x}.down_proj.weight"), vec![h, i]));
            }
        }
        v.push(("model.norm.weight".to_string(), vec![h]));
        v.push(("lm_head.weight".to_string(), vec![self.vocab, h]));
        v
    }

    /// `config.json` as OLMoE's published checkpoint has it (transformers 4 spelling).
    pub fn config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["OlmoeForCausalLM"],
            "model_type": "olmoe",
            "hidden_size": self.hidden,
            "intermediate_size": self.expert_hidden,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads,
            "num_experts": self.experts,
            "num_experts_per_tok": self.top_k,
            "vocab_size": self.vocab,
            "max_position_embeddings": self.max_positions,
            "rope_theta": 10000.0,
            "rope_scaling": null,
            "rms_norm_eps": 1e-5,
            "norm_topk_prob": false,
            "tie_word_embeddings": false,
            "clip_qkv": null,
            "attention_bias": false,
            "hidden_act": "silu",
            "torch_dtype": "bfloat16",
            "xmoe_top_synthetic": "random weights written by `xmoe-top synth --hf`; not a trained model"
        })
    }
}

/// A checkpoint layout [`write_checkpoint`] can write: its tensors in file order and its
/// `config.json`.
pub trait SynthShape {
    /// Every tensor, in file order, with its shape.
    fn tensors(&self) -> Vec<(String, Vec<usize>)>;
    /// `config.json`.
    fn config_json(&self) -> serde_json::Value;
}

impl SynthShape for OlmoeShape {
    fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        OlmoeShape::tensors(self)
    }
    fn config_json(&self) -> serde_json::Value {
        OlmoeShape::config_json(self)
    }
}

/// The shapes of a synthetic DeepSeek-V2 checkpoint (multi-head latent attention without a
/// query compression, as V2-Lite; softmax router with greedy top-k; shared experts; leading
/// dense blocks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeepseekV2Shape {
    /// `hidden_size`.
    pub hidden: usize,
    /// `num_hidden_layers`.
    pub layers: usize,
    /// `num_attention_heads`.
    pub heads: usize,
    /// `n_routed_experts`.
    pub routed: usize,
    /// `n_shared_experts`.
    pub shared: usize,
    /// `num_experts_per_tok`.
    pub top_k: usize,
    /// `moe_intermediate_size` (one routed expert).
    pub expert_hidden: usize,
    /// `intermediate_size` (the dense blocks' FFN).
    pub dense_hidden: usize,
    /// `first_k_dense_replace`.
    pub first_dense: usize,
    /// `kv_lora_rank`.
    pub kv_lora_rank: usize,
    /// `qk_nope_head_dim`.
    pub qk_nope: usize,
    /// `qk_rope_head_dim`.
    pub qk_rope: usize,
    /// `v_head_dim`.
    pub v_head: usize,
    /// `vocab_size`.
    pub vocab: usize,
    /// `max_position_embeddings`.
    pub max_positions: usize,
    /// YaRN `factor` and `original_max_position_embeddings`, if the config scales RoPE.
    pub yarn: Option<(u32, usize)>,
}

impl DeepseekV2Shape {
    /// DeepSeek-V2-Lite's published configuration (`deepseek-ai/DeepSeek-V2-Lite`): 15.7 B
    /// parameters, 64 routed experts of 1408 + 2 shared, top-6, one leading dense block.
    pub fn v2_lite() -> Self {
        Self {
            hidden: 2048,
            layers: 27,
            heads: 16,
            routed: 64,
            shared: 2,
            top_k: 6,
            expert_hidden: 1408,
            dense_hidden: 10944,
            first_dense: 1,
            kv_lora_rank: 512,
            qk_nope: 128,
            qk_rope: 64,
            v_head: 128,
            vocab: 102400,
            max_positions: 163840,
            yarn: Some((40, 4096)),
        }
    }

    /// A small model of the same family, for tests.
    pub fn tiny() -> Self {
        Self {
            hidden: 64,
            layers: 3,
            heads: 4,
            routed: 16,
            shared: 2,
            top_k: 4,
            expert_hidden: 32,
            dense_hidden: 128,
            first_dense: 1,
            kv_lora_rank: 32,
            qk_nope: 16,
            qk_rope: 8,
            v_head: 16,
            vocab: 512,
            max_positions: 256,
            yarn: Some((4, 64)),
        }
    }
}

impl SynthShape for DeepseekV2Shape {
    fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden;
        let mut v = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h])];
        let ffn = |v: &mut Vec<(String, Vec<usize>)>, p: &str, width: usize| {
            v.push((format!("{p}.gate_proj.weight"), vec![width, h]));
            v.push((format!("{p}.up_proj.weight"), vec![width, h]));
            v.push((format!("{p}.down_proj.weight"), vec![h, width]));
        };
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            v.push((format!("{p}.input_layernorm.weight"), vec![h]));
            v.push((
                format!("{a}.q_proj.weight"),
                vec![self.heads * (self.qk_nope + self.qk_rope), h],
            ));
            v.push((
                format!("{a}.kv_a_proj_with_mqa.weight"),
                vec![self.kv_lora_rank + self.qk_rope, h],
            ));
            v.push((
                format!("{a}.kv_a_layernorm.weight"),
                vec![self.kv_lora_rank],
            ));
            v.push((
                format!("{a}.kv_b_proj.weight"),
                vec![self.heads * (self.qk_nope + self.v_head), self.kv_lora_rank],
            ));
            v.push((
                format!("{a}.o_proj.weight"),
                vec![h, self.heads * self.v_head],
            ));
            v.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            if l < self.first_dense {
                ffn(&mut v, &format!("{p}.mlp"), self.dense_hidden);
            } else {
                v.push((format!("{p}.mlp.gate.weight"), vec![self.routed, h]));
                for e in 0..self.routed {
                    ffn(&mut v, &format!("{p}.mlp.experts.{e}"), self.expert_hidden);
                }
                ffn(
                    &mut v,
                    &format!("{p}.mlp.shared_experts"),
                    self.shared * self.expert_hidden,
                );
            }
        }
        v.push(("model.norm.weight".to_string(), vec![h]));
        v.push(("lm_head.weight".to_string(), vec![self.vocab, h]));
        v
    }

    /// As DeepSeek-V2-Lite's published `config.json` has it (transformers 4 spelling).
    fn config_json(&self) -> serde_json::Value {
        let rope_scaling = self.yarn.map(|(factor, original)| {
            serde_json::json!({
                "type": "yarn", "factor": factor, "original_max_position_embeddings": original,
                "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707
            })
        });
        serde_json::json!({
            "architectures": ["DeepseekV2ForCausalLM"],
            "model_type": "deepseek_v2",
            "hidden_size": self.hidden,
            "intermediate_size": self.dense_hidden,
            "moe_intermediate_size": self.expert_hidden,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads,
            "n_routed_experts": self.routed,
            "n_shared_experts": self.shared,
            "num_experts_per_tok": self.top_k,
            "first_k_dense_replace": self.first_dense,
            "moe_layer_freq": 1,
            "routed_scaling_factor": 1.0,
            "topk_method": "greedy",
            "n_group": 1,
            "topk_group": 1,
            "norm_topk_prob": false,
            "scoring_func": "softmax",
            "q_lora_rank": null,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope,
            "qk_rope_head_dim": self.qk_rope,
            "v_head_dim": self.v_head,
            "vocab_size": self.vocab,
            "max_position_embeddings": self.max_positions,
            "rope_theta": 10000.0,
            "rope_scaling": rope_scaling,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": false,
            "attention_bias": false,
            "hidden_act": "silu",
            "torch_dtype": "bfloat16",
            "xmoe_top_synthetic": "random weights written by `xmoe-top synth --hf`; not a trained model"
        })
    }
}

/// A bf16 tensor of random values, generated when the writer asks for its bytes.
struct RandomBf16 {
    shape: Vec<usize>,
    seed: u64,
    /// Values are 1 + U(-0.1, 0.1) for norm weights, else U(-a, a).
    norm: bool,
    std: f32,
}

impl View for RandomBf16 {
    fn dtype(&self) -> Dtype {
        Dtype::BF16
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        const CHUNK: usize = 1 << 16;
        let n: usize = self.shape.iter().product();
        let mut out = vec![0u8; 2 * n];
        let a = self.std * 3f32.sqrt();
        // Chunks with their own seeds: the bytes do not depend on the thread count.
        out.par_chunks_mut(2 * CHUNK)
            .enumerate()
            .for_each(|(c, bytes)| {
                let mut rng = StdRng::seed_from_u64(self.seed ^ ((c as u64) << 32));
                for b in bytes.chunks_exact_mut(2) {
                    let x = if self.norm {
                        1.0 + rng.random_range(-0.1f32..0.1)
                    } else {
                        rng.random_range(-a..a)
                    };
                    b.copy_from_slice(&half::bf16::from_f32(x).to_le_bytes());
                }
            });
        Cow::Owned(out)
    }
    fn data_len(&self) -> usize {
        2 * self.shape.iter().product::<usize>()
    }
}

/// Writes a synthetic checkpoint into `dir` (created; must not exist unless `force`): sharded
/// safetensors of at most `shard_bytes` each with their index, `config.json` and a copy of
/// `tokenizer`. Returns the shard paths.
pub fn write_checkpoint(
    dir: &Path,
    shape: &dyn SynthShape,
    tokenizer: &Path,
    seed: u64,
    shard_bytes: usize,
    force: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<PathBuf>> {
    if dir.exists() && !force {
        bail!(
            "{} already exists (use --force to overwrite)",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tensors = shape.tensors();
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0;
    for (i, (_, s)) in tensors.iter().enumerate() {
        let bytes = 2 * s.iter().product::<usize>();
        if size > 0 && size + bytes > shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("one shard at least").push(i);
        size += bytes;
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    let mut paths = Vec::new();
    for (s, members) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{n:05}.safetensors", s + 1);
        let views: Vec<(String, RandomBf16)> = members
            .iter()
            .map(|&i| {
                let (tname, tshape) = &tensors[i];
                weight_map.insert(tname.clone(), name.clone().into());
                let std = if tname.ends_with("mlp.gate.weight") {
                    // A router spread well beyond 1/sqrt(fan_in), so routing is not uniform.
                    0.1
                } else if tname.contains("embed_tokens") {
                    1.0
                } else {
                    1.0 / (*tshape.last().expect("shaped") as f32).sqrt()
                };
                total += 2 * tshape.iter().product::<usize>();
                let view = RandomBf16 {
                    shape: tshape.clone(),
                    seed: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64,
                    norm: tname.contains("norm"),
                    std,
                };
                (tname.clone(), view)
            })
            .collect();
        let path = dir.join(&name);
        let tmp = dir.join(format!(".{name}.partial"));
        safetensors::serialize_to_file(views, None, &tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path)?;
        paths.push(path);
        progress(s + 1, n);
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    crate::atomic_file::write_atomically(
        &dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index)?.as_bytes(),
        true,
    )?;
    crate::atomic_file::write_atomically(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&shape.config_json())?.as_bytes(),
        true,
    )?;
    std::fs::copy(tokenizer, dir.join("tokenizer.json"))
        .with_context(|| format!("cannot copy {}", tokenizer.display()))?;
    Ok(paths)
}
