//! `xmoe-top synth`: random-weight models for benchmarks and engine checks.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;

use crate::model::config::ModelConfig;
use crate::model::format::{StoreDtype, write_model};
use crate::model::synth::random_weights;

/// Arguments of `synth`.
#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Output .safetensors path (with --hf: the checkpoint directory).
    out: PathBuf,
    /// Take the configuration from this JSON file (docs/model-format.md) instead of the flags.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Residual width.
    #[arg(long, default_value_t = 512)]
    d_model: usize,
    /// Transformer blocks (all MoE).
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 8)]
    heads: usize,
    /// Experts per MoE layer.
    #[arg(long, default_value_t = 64)]
    experts: usize,
    /// Hidden width of one expert.
    #[arg(long, default_value_t = 32)]
    expert_hidden: usize,
    /// Width of the dense FFN the experts split (sets the split ratio).
    #[arg(long, default_value_t = 2048)]
    dense_hidden: usize,
    /// Maximum sequence length.
    #[arg(long, default_value_t = 1024)]
    seq: usize,
    /// Storage dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f16")]
    dtype: String,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Overwrite an existing file.
    #[arg(long)]
    force: bool,
    /// Write a Hugging Face checkpoint directory with a published family's shapes instead:
    /// `olmoe-1b-7b` (6.9 B parameters, 13.8 GB of bf16), `deepseek-v2-lite` (15.7 B, 31.4 GB),
    /// or the small `olmoe-tiny` and `deepseek-v2-tiny`. Random weights, written shard by shard
    /// without holding the model in memory.
    #[arg(long, value_name = "PRESET")]
    hf: Option<String>,
    /// With --hf: keep only the preset's first N blocks (a published shape too large for this
    /// machine, cut to one that fits; the configuration says N).
    #[arg(long, value_name = "N")]
    hf_layers: Option<usize>,
    /// With --hf: the tokenizer.json to put beside it (default: the 512-token BPE tokenizer of the
    /// test fixtures, built into xmoe-top).
    #[arg(long, value_name = "FILE")]
    tokenizer: Option<PathBuf>,
    /// With --hf: the largest shard, in GB (as `save_pretrained`'s `max_shard_size`), in
    /// [0.001, 1000].
    #[arg(long, default_value_t = 5.0, value_parser = super::values::shard_gb)]
    shard_gb: f64,
}

/// The tokenizer of the test fixtures (`tests/fixtures/hf/tokenizer.json`, 8.5 kB).
const FIXTURE_TOKENIZER: &[u8] = include_bytes!("../../tests/fixtures/hf/tokenizer.json");

/// A preset's shape with its block count set.
type ShapeWithLayers = Box<dyn FnOnce(usize) -> Box<dyn crate::model::hf::synth::SynthShape>>;

fn run_hf(a: &SynthArgs, preset: &str) -> Result<ExitCode> {
    use crate::model::hf::synth::{DeepseekV2Shape, OlmoeShape, write_checkpoint};
    let (layers, shape): (usize, ShapeWithLayers) = match preset {
        "olmoe-1b-7b" | "olmoe-tiny" => {
            let base = if preset == "olmoe-tiny" {
                OlmoeShape::tiny()
            } else {
                OlmoeShape::olmoe_1b_7b()
            };
            (
                base.layers,
                Box::new(move |layers| Box::new(OlmoeShape { layers, ..base })),
            )
        }
        "deepseek-v2-lite" | "deepseek-v2-tiny" => {
            let base = if preset == "deepseek-v2-tiny" {
                DeepseekV2Shape::tiny()
            } else {
                DeepseekV2Shape::v2_lite()
            };
            (
                base.layers,
                Box::new(move |layers| Box::new(DeepseekV2Shape { layers, ..base })),
            )
        }
        other => {
            return Err(super::exit::usage(format!(
                "--hf: expected olmoe-1b-7b, olmoe-tiny, deepseek-v2-lite or deepseek-v2-tiny, found `{other}`"
            )));
        }
    };
    let layers = match a.hf_layers {
        None => layers,
        Some(n) if (1..=layers).contains(&n) => n,
        Some(n) => {
            return Err(super::exit::usage(format!(
                "--hf-layers {n}: {preset} has {layers} blocks; keep 1 to {layers}"
            )));
        }
    };
    let shape = shape(layers);
    let fallback;
    let tokenizer = match &a.tokenizer {
        Some(p) => p.as_path(),
        None => {
            fallback = tempfile::NamedTempFile::new()?;
            std::fs::write(fallback.path(), FIXTURE_TOKENIZER)?;
            fallback.path()
        }
    };
    let start = std::time::Instant::now();
    let shards = write_checkpoint(
        &a.out,
        shape.as_ref(),
        tokenizer,
        a.seed,
        (a.shard_gb * 1e9) as usize,
        a.force,
        &mut |done, total| {
            eprintln!(
                "  shard {done}/{total} written ({:.0} s)",
                start.elapsed().as_secs_f64()
            )
        },
    )?;
    eprintln!(
        "wrote {} ({} shards, {preset}, random bf16 weights) in {:.0} s",
        a.out.display(),
        shards.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// Writes the random model.
pub fn run(a: SynthArgs) -> Result<ExitCode> {
    if let Some(preset) = a.hf.clone() {
        return run_hf(&a, &preset);
    }
    let cfg = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            ModelConfig::from_json(&text).with_context(|| format!("in {}", p.display()))?
        }
        None => ModelConfig {
            name: format!(
                "random-d{}-l{}-e{}x{}",
                a.d_model, a.layers, a.experts, a.expert_hidden
            ),
            ..ModelConfig::byte_level(
                a.d_model,
                a.layers,
                a.heads,
                a.seq,
                a.experts,
                a.expert_hidden,
                a.dense_hidden,
            )
        },
    };
    super::exit::Classify::usage(cfg.validate())?;
    let dtype = match a.dtype.as_str() {
        "f32" => StoreDtype::F32,
        "f16" => StoreDtype::F16,
        "bf16" => StoreDtype::BF16,
        other => {
            return Err(super::exit::usage(format!(
                "--dtype: expected f32, f16 or bf16, found `{other}`"
            )));
        }
    };
    let weights = random_weights(&cfg, a.seed, false, 2.0);
    write_model(&a.out, &cfg, &weights, dtype, a.force)?;
    eprintln!("wrote {} ({})", a.out.display(), cfg.name);
    Ok(ExitCode::SUCCESS)
}
