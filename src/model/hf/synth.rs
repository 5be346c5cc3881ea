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
pub fn write_olmoe(
    dir: &Path,
    shape: &OlmoeShape,
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
