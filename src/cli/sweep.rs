//! `xmoe-top sweep`: the same tokens under a range of thresholds (and top-k), Dense as reference.

use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;

use super::exit::{Classify, usage};
use anyhow::{Context, Result};
use clap::Args;

use crate::model::device::DeviceChoice;
use crate::report::text::sweep_table;
use crate::report::{ReportData, ReportFormat, write_report};
use crate::session::sweep::{
    SweepSpec, parse_thresholds, parse_top_k, run_sweep_until, token_batches,
};

/// Arguments of `sweep`.
#[derive(Args, Debug)]
pub struct SweepArgs {
    /// Model: a .safetensors file or a Hugging Face checkpoint directory; default: the embedded
    /// model.
    model: Option<PathBuf>,
    /// Thresholds: a range start:end:step (end included) or a list such as 0.5,0.7,0.9.
    #[arg(long, default_value = "0.5:1.0:0.05")]
    thresholds: String,
    /// Also sweep top-k with these k (e.g. 1,2,4).
    #[arg(long, value_name = "K,K,...")]
    with_topk: Option<String>,
    /// Renormalise the selected experts' weights for the threshold and top-k points (`true` or
    /// `false`; default: as the model's native rule does).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    renormalize: Option<bool>,
    /// Load a model even when its weights exceed the available memory.
    #[arg(long)]
    allow_large: bool,
    /// Scores a threshold ranks on in a sigmoid router (DeepSeek-V3): `biased` (the router's
    /// choice values, sigmoid + correction bias) or `unbiased` (the sigmoid scores it weights by).
    #[arg(long, default_value = "biased", value_name = "biased|unbiased")]
    sigmoid_scores: crate::routing::SigmoidSelection,
    /// Quality reference of every point: `native`, `dense`, `topk:K` or `threshold:T`. Default:
    /// native for a model with a native top-k (Hugging Face checkpoints), dense otherwise.
    #[arg(long, value_name = "POLICY")]
    reference: Option<String>,
    /// Tokens per point (rounded up to whole batches), 1..=10^9.
    #[arg(long, default_value_t = 4096, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000_000))]
    tokens: usize,
    /// Times each pass of each point runs, 1..=100: the tokens/s and latency figures are medians
    /// over the repeats (the table shows the spread); quality and routing come from the first.
    #[arg(long, default_value_t = 3, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100))]
    repeats: usize,
    /// Sequences per forward pass, 1..=4096.
    #[arg(long, default_value_t = 4, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    batch: usize,
    /// Tokens per sequence (default: 128, or the model's context if shorter).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Text to evaluate on (any bytes); default with the embedded model: its held-out text.
    #[arg(long, value_name = "FILE")]
    text: Option<PathBuf>,
    /// k of the top-k baseline for "compute saved" (default: the model's).
    #[arg(long)]
    top_k_baseline: Option<usize>,
    /// Inference-time capacity factor for every point, in (0, 10^6] (default: the model's setting).
    #[arg(long, value_parser = super::values::capacity_factor)]
    capacity_factor: Option<f32>,
    /// Write a report here; the format follows the extension (.json, .md, .csv, .html) or --format.
    #[arg(long, value_name = "PATH")]
    report: Option<PathBuf>,
    /// Report format: json, md, csv or html.
    #[arg(long, value_parser = |s: &str| s.parse::<ReportFormat>())]
    format: Option<ReportFormat>,
    /// Overwrite an existing report file.
    #[arg(long)]
    force: bool,
    /// Device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_parser = |s: &str| s.parse::<DeviceChoice>())]
    device: DeviceChoice,
}

/// Runs the sweep, prints its table and writes the report.
pub fn run(a: SweepArgs, threads: usize) -> Result<ExitCode> {
    let _signals =
        crate::signals::TerminationGuard::install().context("cannot install signal handlers")?;
    let thresholds = parse_thresholds(&a.thresholds)
        .context("--thresholds")
        .usage()?;
    // Refuse an existing report before spending minutes on the sweep.
    if let Some(path) = &a.report {
        ReportFormat::resolve(path, a.format).usage()?;
        crate::atomic_file::check_target(path, a.force).usage()?;
    }
    let options = crate::model::LoadOptions {
        threads,
        sigmoid_selection: a.sigmoid_scores,
        ..Default::default()
    };
    let (model, device) = super::load_model(
        a.model.as_deref(),
        &a.device,
        threads,
        a.allow_large,
        options,
    )?;
    let cfg = model.config();
    let top_k = match &a.with_topk {
        Some(s) => parse_top_k(s, cfg.n_experts)
            .context("--with-topk")
            .usage()?,
        None => Vec::new(),
    };
    if let Some(k) = a.top_k_baseline
        && (k == 0 || k > cfg.n_experts)
    {
        return Err(usage(format!(
            "--top-k-baseline needs k in 1..={}, found {k}",
            cfg.n_experts
        )));
    }
    let seq_len = super::seq_len(a.seq_len, cfg)?;
    let tokenizer = super::model_tokenizer(&model)?;
    let source = super::eval_text(a.text.as_deref(), a.model.is_some(), &tokenizer, "sweep")?;
    let text = source.bytes;
    let (batches, batch_bytes) =
        token_batches(&tokenizer.encode(&text)?, a.batch, seq_len, a.tokens)
            .with_context(|| format!("in {}", source.name))
            .usage()?;
    let spec = SweepSpec {
        thresholds,
        top_k,
        top_k_baseline: a.top_k_baseline,
        capacity_factor: a.capacity_factor,
        renormalize: a.renormalize,
        reference: a
            .reference
            .as_deref()
            .map(|r| super::run::parse_reference(r, cfg))
            .transpose()?,
        batch_bytes: Some(batch_bytes),
        source: source.name.clone(),
        source_size: text.len(),
        device,
        repeats: a.repeats,
    };
    let show = std::io::stderr().is_terminal();
    let mut stopped_at = (0, 0);
    let mut progress = |done: usize, total: usize| {
        if show {
            eprint!("\rsweep: {done}/{total} passes");
            if done == total {
                eprintln!();
            }
        }
        stopped_at = (done, total);
        match crate::signals::received() {
            Some(_) => ControlFlow::Break(()),
            None => ControlFlow::Continue(()),
        }
    };
    let Some(run) = run_sweep_until(&model, &batches, a.batch, &spec, &mut progress)? else {
        let signal = crate::signals::received().unwrap_or(crate::signals::SIGTERM);
        if show {
            eprintln!();
        }
        eprintln!(
            "xmoe-top: sweep stopped by {} after {} of {} passes; no table or report (a sweep with points missing would mislead)",
            crate::signals::name(signal),
            stopped_at.0,
            stopped_at.1
        );
        return Ok(ExitCode::from(crate::signals::exit_status(signal)));
    };
    super::print_stdout(&sweep_table(&run.result))?;
    if let Some(path) = &a.report {
        let data = ReportData::new(run.snapshot, Some(run.result));
        let written = write_report(&data, path, a.format, a.force)?;
        eprintln!("wrote {}", written.display());
    }
    Ok(ExitCode::SUCCESS)
}
