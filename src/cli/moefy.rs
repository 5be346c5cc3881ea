//! `xmoe-top moefy`: a dense Llama-family model (GGUF file or Hugging Face directory) to an XMoE
//! model of the project's format (`docs/dense-to-xmoe.md`).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;

use super::exit::{Classify, usage};
use crate::model::format::{StoreDtype, write_model_with_tokenizer};
use crate::moefy::eval::{EvalModel, EvalResult, Selection, Windows};
use crate::moefy::{
    Conversion, DenseModel, Lm, MoefyOptions, RouterTraining, SplitKind, calibration_tokens,
    check_options, convert, converted_config, converted_tensors,
};
use crate::workload::tokenizer::TextTokenizer;

/// Arguments of `moefy`.
#[derive(Args, Debug)]
pub struct MoefyArgs {
    /// The dense model: a Llama-family GGUF file or a Hugging Face checkpoint directory
    /// (config.json with model_type "llama", *.safetensors, tokenizer.json).
    dense: PathBuf,
    /// Experts per FFN; must divide the FFN width.
    #[arg(long)]
    experts: usize,
    /// Calibration text (UTF-8): its first --calib-tokens tokens group the neurons and train the
    /// routers. Keep it apart from the texts you evaluate on.
    #[arg(long, value_name = "FILE")]
    calib: PathBuf,
    /// The converted model (.safetensors).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Overwrite --out (and --evaluate's file) if they exist.
    #[arg(long)]
    force: bool,
    /// How neurons are grouped into experts.
    #[arg(long, value_enum, default_value_t = SplitKind::Coactivation)]
    split: SplitKind,
    /// Calibration tokens (rounded up to whole sequences).
    #[arg(long, default_value_t = 8192)]
    calib_tokens: usize,
    /// Convert only the first N blocks (a quick or partial conversion; the rest stay dense).
    #[arg(long, value_name = "N")]
    blocks: Option<usize>,
    /// Tokens per calibration and evaluation sequence.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Router training steps (AdamW, 1024 tokens each).
    #[arg(long, default_value_t = 300)]
    router_steps: usize,
    /// Seed of the split, the clustering's start and the router's batches.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Held-out tokens of the closing table (embedded KJV held-out text); 0: no table.
    #[arg(long, default_value_t = 2048)]
    eval_tokens: usize,
    /// Also run the full evaluation (thresholds 0.5 to 0.99, the other split, static pruning and
    /// the oracle, on the embedded KJV held-out text and each --heldout) and write it as Markdown.
    #[arg(long, value_name = "FILE.md")]
    evaluate: Option<PathBuf>,
    /// Another held-out text for --evaluate (repeatable).
    #[arg(long, value_name = "FILE")]
    heldout: Vec<PathBuf>,
}

/// Thresholds of the closing table.
const TABLE_T: [f32; 5] = [0.5, 0.8, 0.9, 0.95, 0.99];
/// Thresholds of the full evaluation.
const EVAL_T: [f32; 6] = [0.5, 0.7, 0.8, 0.9, 0.95, 0.99];

/// A progress bar on stderr (a terminal only): `what [█████░░░░░] done/total`.
fn bar() -> impl FnMut(&str, usize, usize) {
    let show = std::io::stderr().is_terminal();
    move |what: &str, done: usize, total: usize| {
        if !show {
            return;
        }
        let width = 30;
        let filled = (done * width).checked_div(total).unwrap_or(width);
        let mut e = std::io::stderr().lock();
        let _ = write!(
            e,
            "\r\x1b[2K{what:<32} [{}{}] {done}/{total}",
            "█".repeat(filled),
            "░".repeat(width - filled)
        );
        let _ = e.flush();
    }
}

fn clear_bar() {
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K");
    }
}

/// Runs `moefy`.
pub fn run(a: MoefyArgs) -> Result<ExitCode> {
    if a.out.exists() && !a.force {
        return Err(usage(format!(
            "{} already exists; pass --force to overwrite it",
            a.out.display()
        )));
    }
    if let Some(md) = &a.evaluate
        && md.exists()
        && !a.force
    {
        return Err(usage(format!(
            "{} already exists; pass --force to overwrite it",
            md.display()
        )));
    }
    let opts = MoefyOptions {
        experts: a.experts,
        split: a.split,
        calib_tokens: a.calib_tokens,
        blocks: a.blocks,
        seq_len: a.seq_len,
        router: RouterTraining {
            steps: a.router_steps,
            ..RouterTraining::default()
        },
        seed: a.seed,
    };
    let t0 = std::time::Instant::now();
    let dense = DenseModel::open(&a.dense).bad_input()?;
    check_options(&dense, &opts).usage()?;
    let tokenizer = TextTokenizer::from_bytes(
        &a.dense,
        dense.tokenizer_json.as_bytes(),
        dense.config.vocab,
    )
    .bad_input()?;
    let calib_text = crate::input_file::read(&a.calib, 1 << 30)
        .with_context(|| format!("{}: cannot read the calibration text", a.calib.display()))
        .bad_input()?;
    let calib = calibration_tokens(
        &tokenizer,
        &calib_text,
        &a.calib.display().to_string(),
        &opts,
    )
    .bad_input()?;
    let c = &dense.config;
    eprintln!(
        "moefy: {} ({} blocks, d {}, FFN {} -> {} experts of {}), {} calibration tokens, {} split (loaded in {:.1} s)",
        a.dense.display(),
        c.layers,
        c.hidden,
        c.ffn_hidden,
        opts.experts,
        c.ffn_hidden / opts.experts,
        calib.len() * opts.seq_len,
        opts.split,
        t0.elapsed().as_secs_f64()
    );
    let lm = Lm::new(&dense)?;
    let conv = convert(&lm, &calib, &opts, &mut bar())?;
    clear_bar();
    for (i, b) in conv.blocks.iter().enumerate() {
        eprintln!(
            "block {i:>2}: router held-out KL {:.3} nats (uniform prediction {:.3})",
            b.heldout_kl.0, b.heldout_kl.1
        );
    }
    let cfg = converted_config(&dense, &conv);
    let tensors = converted_tensors(&dense, &conv)?;
    write_model_with_tokenizer(
        &a.out,
        &cfg,
        &tensors,
        StoreDtype::F32,
        a.force,
        Some(&dense.tokenizer_json),
    )?;
    drop(tensors);
    let size = std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "wrote {} ({:.1} MB, f32) in {:.0} s",
        a.out.display(),
        size as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );
    if a.eval_tokens > 0 {
        let held = crate::embedded::heldout_text();
        let enc = tokenizer.encode(&held.bytes)?;
        let windows = Windows::new(&enc, opts.seq_len, a.eval_tokens);
        let model = EvalModel::new(&lm, &conv)?;
        let mut rows = vec![(
            "dense".to_string(),
            run_eval(&model, &windows, &Selection::Dense)?,
        )];
        for t in TABLE_T {
            rows.push((
                format!("t {t:.2}"),
                run_eval(&model, &windows, &Selection::Router(t))?,
            ));
        }
        let mut out = format!(
            "{} tokens of the {} ({} experts per converted FFN, {} of {} blocks converted)\n{:<8} {:>10} {:>10} {:>12} {:>10}\n",
            windows.tokens(),
            held.name,
            opts.experts,
            conv.blocks.len(),
            c.layers,
            "",
            "bits/byte",
            "vs dense",
            "FFN FLOPs",
            "exp/tok"
        );
        let base = rows[0].1.bits_per_byte();
        for (name, r) in &rows {
            let mean_exp =
                r.experts_per_token.iter().sum::<f64>() / r.experts_per_token.len().max(1) as f64;
            out.push_str(&format!(
                "{name:<8} {:>10.4} {:>+9.2}% {:>11.1}% {:>10}\n",
                r.bits_per_byte(),
                (r.bits_per_byte() / base - 1.0) * 100.0,
                r.ffn_flops_share * 100.0,
                if name == "dense" {
                    format!("{}", opts.experts)
                } else {
                    format!("{mean_exp:.1}")
                }
            ));
        }
        super::print_stdout(&out)?;
    }
    if let Some(md) = &a.evaluate {
        let mut texts = vec![crate::embedded::heldout_text()];
        for p in &a.heldout {
            texts.push(crate::workload::TextSource::from_file(p).bad_input()?);
        }
        let other = match opts.split {
            SplitKind::Coactivation => SplitKind::Random,
            SplitKind::Random => SplitKind::Coactivation,
        };
        eprintln!("evaluation: converting again with the {other} split (the baseline)");
        let base = convert(
            &lm,
            &calib,
            &MoefyOptions {
                split: other,
                ..opts.clone()
            },
            &mut bar(),
        )?;
        clear_bar();
        let report = evaluate(&lm, &conv, &base, &tokenizer, &texts, &opts, a.eval_tokens)?;
        let text = format!(
            "<!-- xmoe-top moefy {} --experts {} --calib {} --calib-tokens {} --seq-len {} --router-steps {} --seed {} --eval-tokens {}{}{} -->\n{report}",
            a.dense.file_name().unwrap_or_default().to_string_lossy(),
            opts.experts,
            a.calib.file_name().unwrap_or_default().to_string_lossy(),
            opts.calib_tokens,
            opts.seq_len,
            opts.router.steps,
            opts.seed,
            a.eval_tokens,
            opts.blocks
                .map_or(String::new(), |b| format!(" --blocks {b}")),
            a.heldout
                .iter()
                .map(|p| format!(" --heldout {}", p.display()))
                .collect::<String>()
        );
        crate::atomic_file::write_atomically(md, text.as_bytes(), a.force)?;
        super::print_stdout(&text)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn run_eval(model: &EvalModel, w: &Windows, sel: &Selection) -> Result<EvalResult> {
    let what = format!("{sel:?}");
    let mut b = bar();
    let r = model.run(w, sel, &mut |_: &str, d, t| b(&what, d, t))?;
    clear_bar();
    Ok(r)
}

/// Bits/byte of `curve` (points of FFN FLOPs share and bits/byte) at `share`, linearly
/// interpolated; `None` outside the curve.
fn at_share(curve: &[(f64, f64)], share: f64) -> Option<f64> {
    let mut pts = curve.to_vec();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    pts.windows(2).find_map(|w| {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        (x0 <= share && share <= x1).then(|| {
            if x1 > x0 {
                y0 + (y1 - y0) * (share - x0) / (x1 - x0)
            } else {
                y0
            }
        })
    })
}

/// Smallest FFN FLOPs share at which `curve` stays within `budget` (relative) of `dense`,
/// interpolating between points; `None` when no point is within it.
fn share_within(curve: &[(f64, f64)], dense: f64, budget: f64) -> Option<f64> {
    let limit = dense * (1.0 + budget);
    let mut pts = curve.to_vec();
    pts.push((1.0, dense));
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    // From the cheapest point up: the first crossing of the limit from above.
    if pts[0].1 <= limit {
        return Some(pts[0].0);
    }
    pts.windows(2).find_map(|w| {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        (y0 > limit && y1 <= limit).then(|| x0 + (x1 - x0) * (y0 - limit) / (y0 - y1))
    })
}

/// The full evaluation as Markdown.
fn evaluate(
    lm: &Lm,
    conv: &Conversion,
    base: &Conversion,
    tokenizer: &TextTokenizer,
    texts: &[crate::workload::TextSource],
    opts: &MoefyOptions,
    tokens: usize,
) -> Result<String> {
    let model = EvalModel::new(lm, conv)?;
    let other = EvalModel::new(lm, base)?;
    let mut md = String::new();
    for text in texts {
        let enc = tokenizer.encode(&text.bytes)?;
        let w = Windows::new(&enc, opts.seq_len, tokens);
        let bytes: u64 = w.windows.iter().map(|x| x.2).sum();
        eprintln!("evaluating on {} ({} tokens)", text.name, w.tokens());
        let dense = run_eval(&model, &w, &Selection::Dense)?;
        let d = dense.bits_per_byte();
        md.push_str(&format!(
            "\n### {}\n\n{} tokens ({} bytes) in windows of {}; dense: **{:.4} bits/byte**.\n\n\
             | t | FFN FLOPs | exp/tok | {} split + router | {} split + router (same t) | static, equal FLOPs | oracle, equal FLOPs |\n\
             |---|---|---|---|---|---|---|\n",
            text.name,
            w.tokens(),
            bytes,
            opts.seq_len,
            d,
            conv.split,
            base.split
        ));
        let mut curve = Vec::new();
        let mut base_curve = Vec::new();
        let mut rows = Vec::new();
        for t in EVAL_T {
            let r = run_eval(&model, &w, &Selection::Router(t))?;
            let ks: Vec<usize> = r
                .experts_per_token
                .iter()
                .map(|k| k.round().max(1.0) as usize)
                .collect();
            let s = run_eval(&model, &w, &Selection::Static(ks))?;
            let o = run_eval(&model, &w, &Selection::Oracle(t))?;
            let b = run_eval(&other, &w, &Selection::Router(t))?;
            curve.push((r.ffn_flops_share, r.bits_per_byte()));
            base_curve.push((b.ffn_flops_share, b.bits_per_byte()));
            rows.push((t, r, b, s, o));
        }
        let cell = |bpb: f64| format!("{bpb:.4} ({:+.1}%)", (bpb / d - 1.0) * 100.0);
        for (t, r, b, s, o) in &rows {
            let mean = |x: &EvalResult| {
                x.experts_per_token.iter().sum::<f64>() / x.experts_per_token.len().max(1) as f64
            };
            md.push_str(&format!(
                "| {t:.2} | {:.1}% | {:.1} | {} | {} at {:.1}% | {} at {:.1}% | {} |\n",
                r.ffn_flops_share * 100.0,
                mean(r),
                cell(r.bits_per_byte()),
                cell(b.bits_per_byte()),
                b.ffn_flops_share * 100.0,
                cell(s.bits_per_byte()),
                s.ffn_flops_share * 100.0,
                cell(o.bits_per_byte()),
            ));
        }
        md.push_str(&format!(
            "\n{} split at the {} split's FLOPs (interpolated): ",
            base.split, conv.split
        ));
        let interp: Vec<String> = curve
            .iter()
            .map(|&(x, _)| match at_share(&base_curve, x) {
                Some(v) => format!("{:.1}%: {}", x * 100.0, cell(v)),
                None => format!("{:.1}%: outside its curve", x * 100.0),
            })
            .collect();
        md.push_str(&interp.join("; "));
        md.push_str(".\n\n");
        for budget in [0.01, 0.05] {
            let f = |c: &[(f64, f64)]| {
                share_within(c, d, budget)
                    .map_or("not reached".to_string(), |s| format!("{:.1}%", s * 100.0))
            };
            md.push_str(&format!(
                "- within +{:.0}% bits/byte of dense: {} split {} of the FFN FLOPs, {} split {}\n",
                budget * 100.0,
                conv.split,
                f(&curve),
                base.split,
                f(&base_curve)
            ));
        }
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_and_budget_crossings() {
        let c = [(0.2, 2.0), (0.6, 1.2), (0.4, 1.5)];
        assert_eq!(at_share(&c, 0.5), Some(1.35));
        assert_eq!(at_share(&c, 0.1), None);
        // Dense 1.0 at share 1: +5% is 1.05, crossed between 0.6 (1.2) and 1.0 (1.0).
        let s = share_within(&c, 1.0, 0.05).unwrap();
        assert!((s - (0.6 + 0.4 * 0.15 / 0.2)).abs() < 1e-12, "{s}");
        assert_eq!(share_within(&[(0.3, 1.0)], 1.0, 0.01), Some(0.3));
    }
}
