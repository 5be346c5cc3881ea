//! `xmoe-top tune`: per-layer thresholds that minimise MoE FLOPs within a quality budget.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;

use super::exit::{Classify, usage};
use crate::model::device::DeviceChoice;
use crate::session::sweep::{parse_thresholds, parse_top_k};
use crate::session::tune::{
    Budget, DEFAULT_GRID, DEFAULT_TOKENS, TuneProgress, TuneResult, TuneSpec, kl_text,
    search_and_verify, tune,
};

/// Arguments of `tune`.
#[derive(Args, Debug)]
pub struct TuneArgs {
    /// Model: a .safetensors file or a Hugging Face checkpoint directory; default: the embedded
    /// model.
    model: Option<PathBuf>,
    /// Quality budget: `1%` (bits/byte at most 1% above the reference's) or `0.01` (at most 0.01
    /// bits/byte above it).
    #[arg(long, conflicts_with = "kl", required_unless_present = "kl")]
    budget: Option<String>,
    /// Quality budget as the mean KL(reference || policy) of next-token distributions, bits per
    /// token.
    #[arg(long)]
    kl: Option<f64>,
    /// Threshold grid: start:end:step (end included) or a list; the search starts from the best
    /// single threshold of the grid.
    #[arg(long, default_value = DEFAULT_GRID)]
    grid: String,
    /// Search tokens (rounded up to whole batches), 1..=10^8.
    #[arg(long, default_value_t = DEFAULT_TOKENS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000_000))]
    tokens: usize,
    /// Verification tokens, after the search tokens in the text and never seen by the search.
    #[arg(long, default_value_t = DEFAULT_TOKENS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000_000))]
    verify_tokens: usize,
    /// Sequences per forward pass, 1..=4096.
    #[arg(long, default_value_t = 4, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    batch: usize,
    /// Tokens per sequence (default: 128, or the model's context if shorter).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Text to tune on (default with the embedded model: its held-out text).
    #[arg(long, value_name = "FILE")]
    text: Option<PathBuf>,
    /// How each round of the descent finds its step: `lazy` re-measures only the best-ranked
    /// layers whose score is stale (a few passes a round), `exhaustive` measures every layer's
    /// step every round (one pass per layer a round).
    #[arg(long, default_value = "lazy", value_name = "lazy|exhaustive")]
    search: crate::session::tune::SearchMode,
    /// Quality reference: `native`, `dense`, `topk:K` or `threshold:T` (default: native for a
    /// model with a native top-k, dense otherwise).
    #[arg(long, value_name = "POLICY")]
    reference: Option<String>,
    /// Also put these top-k points on the frontier (default: 1, 2 and the model's top-k).
    #[arg(long, value_name = "K,K,...")]
    with_topk: Option<String>,
    /// Write the result here: .json or .md (or --format).
    #[arg(long, value_name = "PATH")]
    report: Option<PathBuf>,
    /// Report format: json or md.
    #[arg(long, value_parser = ["json", "md"])]
    format: Option<String>,
    /// Overwrite an existing report.
    #[arg(long)]
    force: bool,
    /// Load a model even when its weights exceed the available memory.
    #[arg(long)]
    allow_large: bool,
    /// Scores a threshold ranks on in a sigmoid router (DeepSeek-V3): `biased` (the router's
    /// choice values, sigmoid + correction bias) or `unbiased` (the sigmoid scores it weights by).
    #[arg(long, default_value = "biased", value_name = "biased|unbiased")]
    sigmoid_scores: crate::routing::SigmoidSelection,
    /// Device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_parser = |s: &str| s.parse::<DeviceChoice>())]
    device: DeviceChoice,
}

fn report_format(a: &TuneArgs, path: &std::path::Path) -> Result<&'static str> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    match a.format.as_deref().unwrap_or(ext) {
        "json" => Ok("json"),
        "md" => Ok("md"),
        other => Err(usage(format!(
            "--report {}: cannot tell the format from `{other}`; use .json or .md, or --format",
            path.display()
        ))),
    }
}

/// Runs the search, prints the result and writes the report.
pub fn run(a: TuneArgs, threads: usize) -> Result<ExitCode> {
    let budget = match (&a.budget, a.kl) {
        (Some(b), _) => Budget::parse_budget(b).usage()?,
        (None, Some(k)) if k.is_finite() && k >= 0.0 => Budget::KlBits(k),
        (None, Some(k)) => {
            return Err(usage(format!(
                "--kl must be a non-negative number, found {k}"
            )));
        }
        (None, None) => return Err(usage("give --budget or --kl")),
    };
    let grid = parse_thresholds(&a.grid).context("--grid").usage()?;
    if let Some(path) = &a.report {
        report_format(&a, path)?;
        crate::atomic_file::check_target(path, a.force).usage()?;
    }
    let options = crate::model::LoadOptions {
        threads,
        sigmoid_selection: a.sigmoid_scores,
        ..Default::default()
    };
    let (model, _) = super::load_model(
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
        None => {
            let mut v = vec![1, 2, cfg.top_k_baseline()];
            v.retain(|&k| k <= cfg.n_experts);
            v.sort_unstable();
            v.dedup();
            v
        }
    };
    let seq_len = super::seq_len(a.seq_len, cfg)?;
    let tokenizer = super::model_tokenizer(&model)?;
    let source = super::eval_text(a.text.as_deref(), a.model.is_some(), &tokenizer, "tune")?;
    let encoded = tokenizer.encode(&source.bytes)?;
    let per_batch = a.batch * seq_len;
    let (n_search, n_verify) = (
        a.tokens.div_ceil(per_batch).max(1),
        a.verify_tokens.div_ceil(per_batch).max(1),
    );
    // The verification tokens must be other tokens than the search's: no wrapping around.
    let needed = (n_search + n_verify) * per_batch + 1;
    if encoded.ids.len() < needed {
        return Err(usage(format!(
            "{} has {} tokens; {} search and {} verification batches of {} x {seq_len} need {needed} distinct tokens: use a longer --text or fewer --tokens/--verify-tokens",
            source.name,
            encoded.ids.len(),
            n_search,
            n_verify,
            a.batch
        )));
    }
    let (search, verify) = search_and_verify(&encoded, a.batch, seq_len, n_search, n_verify)
        .with_context(|| format!("in {}", source.name))
        .usage()?;
    let spec = TuneSpec {
        grid,
        budget,
        reference: a
            .reference
            .as_deref()
            .map(|r| super::run::parse_reference(r, cfg))
            .transpose()?,
        top_k,
        renormalize: None,
        search: a.search,
    };
    let result = tune(
        &model,
        a.batch,
        &search,
        &verify,
        &source.name,
        &spec,
        &mut |p| {
            if let TuneProgress::Line(line) = p {
                eprintln!("tune: {line}");
            }
            Ok(())
        },
    )
    .usage()?;
    super::print_stdout(&render_text(&result))?;
    if let Some(path) = &a.report {
        let text = match report_format(&a, path)? {
            "json" => serde_json::to_string_pretty(&result)? + "\n",
            _ => render_markdown(&result),
        };
        crate::atomic_file::write_atomically(path, text.as_bytes(), a.force)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn pct(v: f64) -> String {
    format!("{:.1}%", 100.0 * v)
}

/// The headline comparison: how much of all-experts MoE compute each choice spends.
fn comparison(r: &TuneResult) -> Vec<String> {
    let mut o = Vec::new();
    let t = &r.tuned_verify;
    o.push(format!(
        "tuned per-layer   --threshold {}   {} of all-experts MoE FLOPs, {:.2} experts/token, Δ {:+.4} ± {:.4} bits/byte{} (verification tokens){}",
        r.threshold_arg(),
        pct(t.moe_flops_fraction),
        t.mean_experts_per_token,
        t.delta_bits_per_byte,
        t.delta_bits_per_byte_stderr,
        kl_text(t.mean_kl_bits),
        if r.tuned_within_budget_on_verify {
            ""
        } else {
            "  OUTSIDE the budget on these tokens"
        }
    ));
    match (&r.best_uniform, &r.best_uniform_verify) {
        (Some(b), Some(v)) => {
            o.push(format!(
                "best uniform      {:<width$}   {} of all-experts MoE FLOPs, {:.2} experts/token, Δ {:+.4} ± {:.4} bits/byte{} (verification tokens){}",
                b.label,
                pct(v.moe_flops_fraction),
                v.mean_experts_per_token,
                v.delta_bits_per_byte,
                v.delta_bits_per_byte_stderr,
                kl_text(v.mean_kl_bits),
                if r.best_uniform_within_budget_on_verify {
                    ""
                } else {
                    "  OUTSIDE the budget on these tokens"
                },
                width = r.threshold_arg().len() + 12
            ));
            o.push(format!(
                "per-layer tuning spends {:.1}% less MoE compute than the best single threshold at the same budget (search tokens: {} vs {})",
                100.0 * (1.0 - r.tuned.moe_flops_fraction / b.moe_flops_fraction),
                pct(r.tuned.moe_flops_fraction),
                pct(b.moe_flops_fraction)
            ));
        }
        _ => o.push("no single threshold of the grid is within the budget".to_string()),
    }
    o
}

/// The result as text for stdout.
pub fn render_text(r: &TuneResult) -> String {
    let mut o = format!(
        "{} | budget: {} | reference {} ({:.4} bits/byte on search tokens) | {} search + {} verification tokens from {} | {} search: {} passes in {:.1} s\n\n",
        r.model,
        r.budget.describe(),
        crate::profiling::sweep::policy_label(&r.reference_policy),
        r.reference_bits_per_byte_search,
        r.search_tokens,
        r.verify_tokens,
        r.source,
        search_name(r.search),
        r.evaluations,
        r.elapsed_s
    );
    o.push_str("frontier on the search tokens (MoE FLOPs as % of all experts, Δ bits/byte, KL bits/token):\n");
    o.push_str(&format!(
        "  {:<36} {:>9} {:>10} {:>9} {:>8}\n",
        "policy", "MoE FLOPs", "Δ bits/B", "KL", "exp/tok"
    ));
    let row = |o: &mut String, kind: &str, e: &crate::session::tune::Evaluation| {
        o.push_str(&format!(
            "  {:<36} {:>9} {:>+10.4} {:>9} {:>8.2}\n",
            format!("{kind} {}", e.label),
            pct(e.moe_flops_fraction),
            e.delta_bits_per_byte,
            e.mean_kl_bits.map_or("-".into(), |k| format!("{k:.4}")),
            e.mean_experts_per_token
        ));
    };
    for e in &r.uniform {
        row(&mut o, "uniform", e);
    }
    for e in &r.top_k {
        row(&mut o, "", e);
    }
    for (i, e) in r.path.iter().enumerate() {
        row(&mut o, &format!("tuned step {i}"), e);
    }
    o.push('\n');
    for l in comparison(r) {
        o.push_str(&l);
        o.push('\n');
    }
    o
}

fn search_name(m: crate::session::tune::SearchMode) -> &'static str {
    match m {
        crate::session::tune::SearchMode::Lazy => "lazy",
        crate::session::tune::SearchMode::Exhaustive => "exhaustive",
    }
}

/// The result as a Markdown report.
pub fn render_markdown(r: &TuneResult) -> String {
    let esc = crate::report::markdown::text;
    let mut o = format!(
        "# Threshold tuning: {}\n\nBudget: {}. Reference: {} ({:.4} bits/byte on the search tokens, {:.4} on the verification tokens). {} search tokens and {} verification tokens from {}; grid {}; {} search, {} forward passes in {:.1} s.\n\n## Result (verification tokens)\n\n",
        esc(&r.model),
        r.budget.describe(),
        crate::profiling::sweep::policy_label(&r.reference_policy),
        r.reference_bits_per_byte_search,
        r.reference_bits_per_byte_verify,
        r.search_tokens,
        r.verify_tokens,
        esc(&r.source),
        r.grid
            .iter()
            .map(|t| crate::units::trim_float(*t as f64, 3))
            .collect::<Vec<_>>()
            .join(", "),
        search_name(r.search),
        r.evaluations,
        r.elapsed_s
    );
    for l in comparison(r) {
        o.push_str(&format!("- {}\n", esc(&l)));
    }
    o.push_str("\n## Frontier (search tokens)\n\n| policy | MoE FLOPs / all experts | Δ bits/byte | ± | KL bits/token | experts/token | per layer |\n|---|---:|---:|---:|---:|---:|---|\n");
    let row = |o: &mut String, kind: &str, e: &crate::session::tune::Evaluation| {
        o.push_str(&format!(
            "| {kind} `{}` | {} | {:+.4} | {:.4} | {} | {:.2} | {} |\n",
            e.label,
            pct(e.moe_flops_fraction),
            e.delta_bits_per_byte,
            e.delta_bits_per_byte_stderr,
            e.mean_kl_bits.map_or("-".into(), |k| format!("{k:.4}")),
            e.mean_experts_per_token,
            e.layer_experts_per_token
                .iter()
                .map(|v| format!("{v:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        ));
    };
    for e in &r.uniform {
        row(&mut o, "uniform", e);
    }
    for e in &r.top_k {
        row(&mut o, "", e);
    }
    for (i, e) in r.path.iter().enumerate() {
        row(&mut o, &format!("tuned step {i}"), e);
    }
    o
}
