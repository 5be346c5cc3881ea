//! `xmoe-top parity`: the same tokens through two engines, compared. With `--device cuda` it
//! checks the GPU path against the CPU; with `--device cpu` the candle dispatch (the
//! device-generic path a GPU runs: per-expert candle ops, weights in their device form) against
//! the CPU's default path. Any model the other commands open: the project's format, a Hugging
//! Face checkpoint, a GGUF file. Logits must agree within `--tol` (relative to each row's largest
//! logit) and the expert selections must be identical wherever the routing decision is not within
//! rounding of a tie.

use std::path::PathBuf;
use std::process::ExitCode;

use super::exit::Classify;
use anyhow::{Result, bail};
use candle_core::Device;
use clap::{Args, ValueEnum};

use crate::model::ModelSource;
use crate::model::config::ModelConfig;
use crate::model::format::{ModelFile, StoreDtype, write_model};
use crate::model::synth::random_weights;
use crate::model::trace::ForwardTrace;
use crate::model::{DeviceChoice, LoadOptions, Model, MoeDispatch, RoutingConfig};
use crate::routing::{Routing, RoutingPolicy};

/// Which policies to compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ParityPolicy {
    /// The model's own rule (its family's top-k, or the file's policy).
    Native,
    /// Every expert.
    Dense,
    /// Top-k with the model's baseline k.
    Topk,
    /// Threshold 0.9 and 0.5.
    Threshold,
    /// All of the above.
    All,
}

/// Arguments of `parity`.
#[derive(Args, Debug)]
pub struct ParityArgs {
    /// Model: a file of the project's format, a Hugging Face checkpoint or a GGUF file; default:
    /// the embedded model.
    model: Option<PathBuf>,
    /// Use a generated random model (d 512, 4 layers, 64 experts x 32) instead.
    #[arg(long, conflicts_with = "model")]
    synthetic: bool,
    /// The engine under test: cuda[:N] (against the CPU) or cpu (candle dispatch against the kernel).
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
    /// Policies to compare.
    #[arg(long, value_enum, default_value = "all")]
    policy: ParityPolicy,
    /// Largest allowed |a - b| / max(1, max |row|) over all logits, in (0, 1].
    #[arg(long, default_value_t = 1e-3, value_parser = super::values::tolerance)]
    tol: f64,
}

/// Runs the comparison and prints one row per policy.
pub fn run(a: ParityArgs, threads: usize) -> Result<ExitCode> {
    let tmp;
    let source: ModelSource = if a.synthetic {
        tmp = tempfile::tempdir()?;
        let path = tmp.path().join("synthetic.safetensors");
        let cfg = synthetic_config();
        write_model(
            &path,
            &cfg,
            &random_weights(&cfg, 3, false, 2.0),
            StoreDtype::F32,
            true,
        )?;
        ModelFile::open(&path)?.into()
    } else {
        match &a.model {
            Some(p) => ModelSource::open(p).bad_input()?,
            None => crate::embedded::model_file()?.into(),
        }
    };
    let device = a.device.resolve(threads).usage()?;
    let reference = Model::from_source(
        &source,
        &Device::Cpu,
        LoadOptions {
            dispatch: MoeDispatch::Auto,
            threads,
            ..Default::default()
        },
    )
    .bad_input()?;
    // On the CPU, `candle` is the device-generic path; on a GPU, `auto` is that same path.
    let test_dispatch = if device.device.is_cpu() {
        MoeDispatch::Candle
    } else {
        MoeDispatch::Auto
    };
    let tested = Model::from_source(
        &source,
        &device.device,
        LoadOptions {
            dispatch: test_dispatch,
            threads,
            ..Default::default()
        },
    )
    .bad_input()?;
    let cfg = reference.config().clone();
    let n_moe = reference.moe_layers().len();
    let (batch, seq) = (4, cfg.max_seq_len.min(64));
    let text = crate::embedded::HELDOUT_TEXT;
    let tokens: Vec<u32> = text[1000..1000 + batch * seq]
        .iter()
        .map(|&b| (b as u32) % cfg.vocab_size as u32)
        .collect();
    let k = cfg.top_k_baseline();
    let native = reference.default_routing();
    let uniform = |p: RoutingPolicy| RoutingConfig::uniform(p, n_moe, cfg.n_experts);
    let policies: Vec<RoutingPolicy> = match a.policy {
        ParityPolicy::Native => vec![],
        ParityPolicy::Dense => vec![RoutingPolicy::Dense],
        ParityPolicy::Topk => vec![RoutingPolicy::TopK {
            k,
            renormalize: false,
        }],
        ParityPolicy::Threshold => {
            vec![RoutingPolicy::threshold(0.9), RoutingPolicy::threshold(0.5)]
        }
        ParityPolicy::All => vec![
            RoutingPolicy::Dense,
            RoutingPolicy::TopK {
                k,
                renormalize: false,
            },
            RoutingPolicy::threshold(0.9),
            RoutingPolicy::threshold(0.5),
        ],
    };
    let mut runs: Vec<(String, RoutingConfig, Option<RoutingPolicy>)> = Vec::new();
    if matches!(a.policy, ParityPolicy::Native | ParityPolicy::All) {
        runs.push(("native".into(), native, None));
    }
    for p in policies {
        runs.push((p.to_string(), uniform(p)?, Some(p)));
    }
    println!(
        "parity: {} ({}) on {} ({:?} dispatch) against the CPU's default path; {batch} x {seq} tokens; tolerance {}",
        cfg.name,
        source.path().display(),
        device.description,
        test_dispatch,
        a.tol
    );
    println!(
        "{:<20} {:>14} {:>12} {:>12} {:>8}",
        "policy", "max rel err", "sel. differ", "near ties", "result"
    );
    let mut failed = false;
    for (label, routing, policy) in runs {
        let (mut rt, mut tt) = (ForwardTrace::default(), ForwardTrace::default());
        let lr = reference.forward(&tokens, batch, &routing, None, &mut rt)?;
        let lt = tested.forward(&tokens, batch, &routing, None, &mut tt)?;
        let err = max_rel_err(&lr, &lt, cfg.vocab_size);
        let (mut differ, mut near) = (0usize, 0usize);
        for (r, t) in rt.moe.iter().zip(&tt.moe) {
            for i in 0..r.routing.tokens() {
                let mut a: Vec<usize> = r.routing.choices(i).map(|c| c.0).collect();
                let mut b: Vec<usize> = t.routing.choices(i).map(|c| c.0).collect();
                a.sort_unstable();
                b.sort_unstable();
                if a != b {
                    if decision_margin(&r.routing, i, policy) < 1e-4 {
                        near += 1;
                    } else {
                        differ += 1;
                    }
                }
            }
        }
        // A flipped near-tie changes logits legitimately; only a clean run is held to `tol`.
        let ok = differ == 0 && (near > 0 || err <= a.tol);
        failed |= !ok;
        println!(
            "{:<20} {:>14.3e} {:>12} {:>12} {:>8}",
            label,
            err,
            differ,
            near,
            if ok { "ok" } else { "FAIL" }
        );
    }
    if failed {
        bail!("the engines disagree beyond the tolerance");
    }
    Ok(ExitCode::SUCCESS)
}

fn synthetic_config() -> ModelConfig {
    ModelConfig {
        name: "synthetic-d512-l4-e64x32".into(),
        ..ModelConfig::byte_level(512, 4, 8, 256, 64, 32, 2048)
    }
}

/// Largest |a - b| / max(1, max |a row|).
fn max_rel_err(a: &[f32], b: &[f32], vocab: usize) -> f64 {
    a.chunks_exact(vocab)
        .zip(b.chunks_exact(vocab))
        .map(|(ra, rb)| {
            let scale = ra.iter().fold(1.0f32, |m, v| m.max(v.abs())) as f64;
            ra.iter()
                .zip(rb)
                .map(|(x, y)| (x - y).abs() as f64 / scale)
                .fold(0.0, f64::max)
        })
        .fold(0.0, f64::max)
}

/// How far token `i`'s decision is from flipping: the gap between the last selected and the
/// first unselected probability, and for thresholds the distance of the cumulative mass from t
/// (`None`: the model's native rule, judged by the gap).
fn decision_margin(r: &Routing, i: usize, policy: Option<RoutingPolicy>) -> f32 {
    let e = r.n_experts;
    let mut p: Vec<f32> = r.probs[i * e..(i + 1) * e].to_vec();
    p.sort_unstable_by(|a, b| b.total_cmp(a));
    let n = r.selected(i);
    if n >= e {
        return f32::INFINITY;
    }
    let gap = p[n - 1] - p[n];
    match policy {
        Some(RoutingPolicy::Threshold { t, .. }) => {
            let before_last: f32 = p[..n - 1].iter().sum();
            let with_last = before_last + p[n - 1];
            gap.min((t - before_last).abs()).min((with_last - t).abs())
        }
        _ => gap,
    }
}
