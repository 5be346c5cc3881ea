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
    /// Output .safetensors path.
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
}

/// Writes the random model.
pub fn run(a: SynthArgs) -> Result<ExitCode> {
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
    cfg.validate()?;
    let dtype = match a.dtype.as_str() {
        "f32" => StoreDtype::F32,
        "f16" => StoreDtype::F16,
        "bf16" => StoreDtype::BF16,
        other => anyhow::bail!("--dtype: expected f32, f16 or bf16, found `{other}`"),
    };
    let weights = random_weights(&cfg, a.seed, false, 2.0);
    write_model(&a.out, &cfg, &weights, dtype, a.force)?;
    eprintln!("wrote {} ({})", a.out.display(), cfg.name);
    Ok(ExitCode::SUCCESS)
}
