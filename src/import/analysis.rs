//! What an imported dump says about load: per layer, per expert and, under a placement of experts
//! on GPUs, per GPU.
//!
//! Imbalance is max/mean throughout (1.0 is perfectly even; SGLang's and vLLM's logged
//! "balancedness" is its inverse, mean/max). Over several layers it is Σ max / Σ mean, because an
//! expert-parallel step waits for the busiest GPU of every layer in turn.

use super::{Dump, Format};
use serde::Serialize;

/// Load of one layer over its logical experts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerLoad {
    /// Index on the dump's layer axis.
    pub layer: usize,
    /// Token-expert assignments in the layer.
    pub total: u64,
    /// The busiest expert's load.
    pub max: u64,
    /// The busiest expert (lowest id on a tie).
    pub max_expert: usize,
    /// Mean load per expert (total / experts).
    pub mean: f64,
    /// max / mean; `None` when the layer routed nothing (a dense layer in SGLang's layer axis).
    pub imbalance: Option<f64>,
}

/// Where each logical expert sits: `gpus[g]` lists the experts GPU `g` holds. An expert held by
/// several GPUs has its load split evenly over them.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    /// Experts on each GPU.
    pub gpus: Vec<Vec<usize>>,
    /// How the placement was given, for the summary.
    pub source: String,
}

/// How the user asked for a placement.
#[derive(Clone, Debug, PartialEq)]
pub enum PlacementChoice {
    /// None asked: the dump's physical map alone cannot say how many GPUs there were.
    None,
    /// `--gpus N`: physical experts in contiguous blocks when the dump has them, else logical.
    Gpus(usize),
    /// `--placement SPEC`.
    Spec(String),
}

impl Placement {
    /// Parses `--placement`: GPUs separated by `;`, each a comma list of expert ids or ranges
    /// `a-b` (inclusive), e.g. `0-3;4-7`. Every expert of `0..n_experts` must be placed.
    pub fn parse(spec: &str, n_experts: usize) -> Result<Self, String> {
        let mut gpus = Vec::new();
        let mut seen = vec![false; n_experts];
        for (g, part) in spec.split(';').enumerate() {
            let mut experts = Vec::new();
            for item in part.split(',').map(str::trim) {
                if item.is_empty() {
                    return Err(format!(
                        "--placement: GPU {g} has an empty entry in {part:?}"
                    ));
                }
                let (a, b) = match item.split_once('-') {
                    Some((a, b)) => (a.trim(), b.trim()),
                    None => (item, item),
                };
                let num = |s: &str| {
                    s.parse::<usize>()
                        .map_err(|_| format!("--placement: {s:?} is not an expert id"))
                };
                let (a, b) = (num(a)?, num(b)?);
                if a > b || b >= n_experts {
                    return Err(format!(
                        "--placement: {item:?} is not a range inside 0..{n_experts} (the dump's experts)"
                    ));
                }
                seen[a..=b].iter_mut().for_each(|s| *s = true);
                experts.extend(a..=b);
            }
            gpus.push(experts);
        }
        if let Some(missing) = seen.iter().position(|s| !s) {
            return Err(format!(
                "--placement: expert {missing} is on no GPU (all {n_experts} must be placed)"
            ));
        }
        Ok(Placement {
            gpus,
            source: format!("--placement {spec}"),
        })
    }

    /// Experts `0..n_experts` in `n_gpus` contiguous blocks, as expert-parallel engines place them
    /// before any rebalancing.
    pub fn contiguous(n_experts: usize, n_gpus: usize) -> Result<Self, String> {
        if n_gpus == 0 || !n_experts.is_multiple_of(n_gpus) {
            return Err(format!(
                "--gpus {n_gpus}: the {n_experts} experts do not split evenly into {n_gpus} contiguous blocks (give --placement instead)"
            ));
        }
        let per = n_experts / n_gpus;
        Ok(Placement {
            gpus: (0..n_gpus)
                .map(|g| (g * per..(g + 1) * per).collect())
                .collect(),
            source: format!("contiguous over {n_gpus} GPUs ({per} experts each)"),
        })
    }
}

/// Load per GPU under a placement.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuBalance {
    /// How the placement was decided.
    pub source: String,
    /// GPUs.
    pub gpus: usize,
    /// Load per layer and GPU.
    pub per_layer: Vec<Vec<f64>>,
    /// max/mean over GPUs, per layer (`None` for a layer without load).
    pub layer_imbalance: Vec<Option<f64>>,
    /// Σ over layers of the busiest GPU's load / Σ of the mean GPU load.
    pub overall: Option<f64>,
    /// Load per GPU summed over layers.
    pub total_per_gpu: Vec<f64>,
}

/// What a threshold would have changed, or why it cannot be said.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WhatIf {
    /// No `--threshold` asked.
    NotAsked,
    /// The dump lacks what re-routing needs.
    Unavailable {
        /// The threshold asked for.
        threshold: f32,
        /// Which figures cannot be computed, and why.
        reason: String,
    },
}

/// Everything the text summary, reports and the TUI view show about a dump.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    /// Format read.
    pub format: Format,
    /// The file it came from.
    pub file: String,
    /// Layers on the dump's axis.
    pub n_layers: usize,
    /// Logical experts per layer.
    pub n_experts: usize,
    /// Records on the leading axis and what they are.
    pub records: usize,
    /// What a record is (responses, steps, passes, window steps).
    pub record_kind: String,
    /// Tokens, where recorded.
    pub tokens: Option<u64>,
    /// Experts per token, where recorded.
    pub top_k: Option<usize>,
    /// Token-expert assignments in all layers.
    pub total: u64,
    /// Per layer.
    pub layers: Vec<LayerLoad>,
    /// Load per layer and logical expert (the heatmap).
    pub load: Vec<Vec<u64>>,
    /// Σ max / Σ mean over layers with load.
    pub overall_imbalance: Option<f64>,
    /// Per-GPU balance, where a placement is known.
    pub gpu: Option<GpuBalance>,
    /// Why there is no per-GPU balance, when there is none.
    pub gpu_unavailable: Option<String>,
    /// The threshold what-if.
    pub what_if: WhatIf,
    /// Facts about the file.
    pub notes: Vec<String>,
}

/// Summarises `dump` under `placement`, with the what-if for `threshold`.
pub fn summarize(
    dump: &Dump,
    file: &str,
    placement: &PlacementChoice,
    threshold: Option<f32>,
) -> Result<Summary, String> {
    let layers: Vec<LayerLoad> = dump
        .load
        .iter()
        .enumerate()
        .map(|(layer, row)| layer_load(layer, row))
        .collect();
    let overall_imbalance = ratio(
        layers.iter().map(|l| l.max as f64).sum(),
        layers.iter().map(|l| l.mean).sum(),
    );
    let gpu = gpu_balance(dump, placement)?;
    let what_if = match threshold {
        None => WhatIf::NotAsked,
        Some(t) => WhatIf::Unavailable {
            threshold: t,
            reason: what_if_reason(dump),
        },
    };
    Ok(Summary {
        format: dump.format,
        file: file.to_string(),
        n_layers: dump.n_layers,
        n_experts: dump.n_experts,
        records: dump.records.0,
        record_kind: dump.records.1.to_string(),
        tokens: dump.tokens,
        top_k: dump.top_k,
        total: layers.iter().map(|l| l.total).sum(),
        layers,
        load: dump.load.clone(),
        overall_imbalance,
        gpu_unavailable: gpu.as_ref().err().cloned(),
        gpu: gpu.ok(),
        what_if,
        notes: dump.notes.clone(),
    })
}

fn ratio(num: f64, den: f64) -> Option<f64> {
    (den > 0.0).then(|| num / den)
}

fn layer_load(layer: usize, row: &[u64]) -> LayerLoad {
    let total: u64 = row.iter().sum();
    let (max_expert, max) =
        row.iter().enumerate().fold(
            (0, 0),
            |best, (e, &v)| if v > best.1 { (e, v) } else { best },
        );
    let mean = total as f64 / row.len().max(1) as f64;
    LayerLoad {
        layer,
        total,
        max,
        max_expert,
        mean,
        imbalance: ratio(max as f64, mean),
    }
}

/// An error (`Err`) is a placement the user gave that does not fit the dump; a balance that
/// cannot be computed for want of a placement is `Ok(Err(reason))`.
fn gpu_balance(
    dump: &Dump,
    choice: &PlacementChoice,
) -> Result<Result<GpuBalance, String>, String> {
    let per_layer: Vec<Vec<f64>>;
    let source: String;
    match (choice, &dump.physical) {
        (PlacementChoice::None, Some(p)) => {
            return Ok(Err(format!(
                "needs --gpus N: the dump maps {} physical experts to logical ones but does not record how many GPUs held them (or give --placement)",
                p.to_logical.first().map_or(0, Vec::len)
            )));
        }
        (PlacementChoice::None, None) => {
            return Ok(Err(
                "needs a placement: --gpus N (contiguous blocks of experts) or --placement SPEC"
                    .into(),
            ));
        }
        (PlacementChoice::Gpus(n), Some(p)) => {
            let physical = p.to_logical.first().map_or(0, Vec::len);
            if *n == 0 || physical % n != 0 {
                return Err(format!(
                    "--gpus {n}: the dump's {physical} physical experts do not split evenly over {n} GPUs"
                ));
            }
            let per = physical / n;
            per_layer = p
                .load
                .iter()
                .map(|row| {
                    let mut g = vec![0.0; *n];
                    for (slot, &v) in row.iter().enumerate() {
                        g[slot / per] += v as f64;
                    }
                    g
                })
                .collect();
            source = format!(
                "the dump's physical experts, {per} per GPU on {n} GPUs (physical expert p on GPU p / {per}, as SGLang and vLLM lay them out)"
            );
        }
        (PlacementChoice::Gpus(n), None) => {
            let p = Placement::contiguous(dump.n_experts, *n)?;
            per_layer = place(&dump.load, &p);
            source = p.source;
        }
        (PlacementChoice::Spec(spec), _) => {
            let p = Placement::parse(spec, dump.n_experts)?;
            per_layer = place(&dump.load, &p);
            source = p.source;
        }
    }
    let gpus = per_layer.first().map_or(0, Vec::len);
    let stats: Vec<(f64, f64)> = per_layer
        .iter()
        .map(|g| {
            let max = g.iter().copied().fold(0.0, f64::max);
            (max, g.iter().sum::<f64>() / g.len().max(1) as f64)
        })
        .collect();
    let mut total_per_gpu = vec![0.0; gpus];
    for g in &per_layer {
        for (t, v) in total_per_gpu.iter_mut().zip(g) {
            *t += v;
        }
    }
    Ok(Ok(GpuBalance {
        source,
        gpus,
        layer_imbalance: stats.iter().map(|&(m, a)| ratio(m, a)).collect(),
        overall: ratio(
            stats.iter().map(|s| s.0).sum(),
            stats.iter().map(|s| s.1).sum(),
        ),
        per_layer,
        total_per_gpu,
    }))
}

fn place(load: &[Vec<u64>], p: &Placement) -> Vec<Vec<f64>> {
    let n_experts = load.first().map_or(0, Vec::len);
    let mut replicas = vec![0usize; n_experts];
    for e in p.gpus.iter().flatten() {
        replicas[*e] += 1;
    }
    load.iter()
        .map(|row| {
            p.gpus
                .iter()
                .map(|experts| {
                    experts
                        .iter()
                        .map(|&e| row[e] as f64 / replicas[e] as f64)
                        .sum()
                })
                .collect()
        })
        .collect()
}

fn what_if_reason(dump: &Dump) -> String {
    match dump.format {
        Format::SglangRouted | Format::SglangPerToken => format!(
            "{} records which experts each token chose (top-{}), not their router probabilities or logits. A threshold keeps the smallest set of experts whose probabilities reach t, so without the probabilities neither that set, nor experts per token, nor the MoE FLOPs or per-GPU load it would save can be computed; only the present load (above) is known.",
            dump.format,
            dump.top_k.map_or("k".to_string(), |k| k.to_string())
        ),
        _ => format!(
            "{} records only how many tokens each expert took, not which tokens chose which experts nor any router probability or logit, so re-routing under a threshold (its experts per token, FLOPs or per-GPU load) cannot be computed; only the present load (above) is known.",
            dump.format
        ),
    }
}
