//! The `xmoe-top` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use xmoe_top::inspect::InspectReport;
use xmoe_top::model::config::{
    Activation, FORMAT_VERSION, ModelConfig, MoeLayers, NormKind, PolicySpec, PositionKind,
    TokenizerKind,
};
use xmoe_top::model::format::{ModelFile, StoreDtype, write_model};
use xmoe_top::model::synth::random_weights;

/// Watch an XMoE (threshold-routed Mixture-of-Experts) model route tokens, live.
#[derive(Parser, Debug)]
#[command(
    name = "xmoe-top",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Worker threads for the CPU (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print a model's configuration, parameter counts, FLOPs per token and tensor table.
    Inspect(InspectArgs),
    /// Write a model with random weights (for benchmarks and engine checks; not a trained model).
    Synth(SynthArgs),
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// Model file (.safetensors).
    model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct SynthArgs {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = cli
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // candle's CPU matmul re-reads /proc/cpuinfo on every call unless this is set, which makes
    // small matmuls 100x slower. Set before any thread exists.
    // SAFETY: no other thread has been started yet.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xmoe-top: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Some(Command::Inspect(a)) => inspect(a),
        Some(Command::Synth(a)) => synth(a),
        None => {
            anyhow::bail!("no command given: try `xmoe-top inspect MODEL` or `xmoe-top --help`")
        }
    }
}

fn inspect(a: InspectArgs) -> Result<ExitCode> {
    let file = ModelFile::open(&a.model)?;
    let report = InspectReport::new(&file);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(ExitCode::SUCCESS)
}

fn synth(a: SynthArgs) -> Result<ExitCode> {
    let cfg = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            ModelConfig::from_json(&text).with_context(|| format!("in {}", p.display()))?
        }
        None => ModelConfig {
            format_version: FORMAT_VERSION,
            name: format!(
                "random-d{}-l{}-e{}x{}",
                a.d_model, a.layers, a.experts, a.expert_hidden
            ),
            vocab_size: 256,
            tokenizer: TokenizerKind::Byte,
            d_model: a.d_model,
            n_layers: a.layers,
            n_heads: a.heads,
            max_seq_len: a.seq,
            norm: NormKind::LayerNorm,
            norm_eps: 1e-5,
            positions: PositionKind::Learned,
            rope_theta: 10_000.0,
            activation: Activation::Gelu,
            gated: false,
            attn_bias: false,
            dense_ffn_hidden: a.dense_hidden,
            ffn_bias: false,
            moe_layers: MoeLayers::Keyword("all".into()),
            n_experts: a.experts,
            expert_hidden: a.expert_hidden,
            expert_bias: true,
            tie_embeddings: true,
            default_policy: PolicySpec::default(),
            top_k_baseline: None,
            capacity_factor: None,
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
