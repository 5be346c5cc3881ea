//! A/B statistics: two routing policies run on exactly the same batches, compared pass by pass.
//!
//! [`CompareStats`] takes, for every batch, the trace of policy A's pass and of policy B's pass
//! over the same tokens (and, on the eval workload, both cross-entropies and the KL between the
//! two next-token distributions), and keeps running sums only: per layer and expert the tokens
//! that chose it under each policy, experts per token, MoE FLOPs, pass times (HDR histograms),
//! Δ bits/byte with the same ratio-estimator standard error as the live quality figures
//! ([`DeltaSums`]), and the per-token agreement of the two chosen expert sets (Jaccard index per
//! token and layer, its mean and a histogram). [`CompareStats::snapshot`] reads only those sums.
//!
//! Pure: no model runs here, so every figure is tested on hand-made traces.

use anyhow::{Result, bail};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::model::config::ModelConfig;
use crate::model::trace::ForwardTrace;
use crate::profiling::flops::FlopModel;
use crate::profiling::stats::DeltaSums;
use crate::profiling::sweep::policy_label;
use crate::routing::{Routing, RoutingPolicy};

/// Bins of the Jaccard histogram: ten of width 0.1 over [0, 1) and one for exactly 1 (the same
/// set), since "identical" is the figure people ask about first.
pub const JACCARD_BINS: usize = 11;

/// Jaccard index |A ∩ B| / |A ∪ B| of two expert sets given as lists of distinct expert ids;
/// 1 when both are empty (nothing to disagree on). `mark` is scratch space of at least
/// max id + 1 entries, all false on entry and on return.
pub fn jaccard(a: &[usize], b: &[usize], mark: &mut [bool]) -> f64 {
    for &e in a {
        mark[e] = true;
    }
    let common = b.iter().filter(|&&e| mark[e]).count();
    for &e in a {
        mark[e] = false;
    }
    let union = a.len() + b.len() - common;
    if union == 0 {
        1.0
    } else {
        common as f64 / union as f64
    }
}

/// The histogram bin of a Jaccard index (see [`JACCARD_BINS`]).
pub fn jaccard_bin(j: f64) -> usize {
    if j >= 1.0 {
        JACCARD_BINS - 1
    } else {
        ((j.max(0.0) * 10.0) as usize).min(JACCARD_BINS - 2)
    }
}

/// The label of one side: one policy label when every layer agrees, the thresholds in the
/// `--threshold` syntax when all are thresholds, else one label per layer.
pub fn side_label(moe_layers: &[usize], policies: &[RoutingPolicy]) -> String {
    match policies.first() {
        None => "no MoE layers".to_string(),
        Some(first) if policies.iter().all(|p| p.same_as(first)) => policy_label(first),
        Some(_) => {
            let all_thresholds = policies
                .iter()
                .all(|p| matches!(p, RoutingPolicy::Threshold { .. }));
            if all_thresholds {
                let ts: Vec<String> = moe_layers
                    .iter()
                    .zip(policies)
                    .map(|(l, p)| match p {
                        RoutingPolicy::Threshold { t, .. } => {
                            format!("{l}:{}", crate::units::trim_float(*t as f64, 3))
                        }
                        _ => unreachable!("checked above"),
                    })
                    .collect();
                format!("t={}", ts.join(","))
            } else {
                moe_layers
                    .iter()
                    .zip(policies)
                    .map(|(l, p)| format!("L{l} {}", policy_label(p)))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        }
    }
}

/// Quality figures of one batch run under both policies (eval workload only).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PairQuality {
    /// Sum of next-token cross-entropies under A, nats.
    pub nats_a: f64,
    /// The same under B.
    pub nats_b: f64,
    /// Predictions scored (the same tokens for both).
    pub scored_tokens: u64,
    /// Bytes of text those predictions cover.
    pub bytes: u64,
    /// Sum over tokens of KL(P_B ‖ P_A) of the next-token distributions, nats.
    pub kl_nats: f64,
}

/// One policy's side of the comparison.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompareSide {
    /// Short label ("t=0.9", "top-2", "t=0:0.8,1:0.9").
    pub label: String,
    /// The policy of each MoE layer, in MoE slot order.
    pub policies: Vec<RoutingPolicy>,
    /// Mean experts chosen per token over all MoE layers (before capacity dropping).
    pub mean_experts_per_token: f64,
    /// MoE FLOPs per token (routers and kept experts of all MoE layers).
    pub moe_flops_per_token: f64,
    /// MoE FLOPs as a fraction of running all experts (0..=1).
    pub moe_flops_fraction_of_all_experts: f64,
    /// Mean wall time of a forward pass, milliseconds.
    pub pass_ms_mean: f64,
    /// Median forward-pass time, milliseconds (HDR histogram, 1% precision).
    pub pass_ms_p50: f64,
    /// 90th percentile of the forward-pass time, milliseconds.
    pub pass_ms_p90: f64,
    /// Bits per byte of next-token prediction (eval only).
    pub bits_per_byte: Option<f64>,
}

/// One MoE layer under both policies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompareLayer {
    /// Block index.
    pub layer: usize,
    /// Per expert: share of the compared tokens that chose it under A (0..=1).
    pub share_a: Vec<f64>,
    /// The same under B.
    pub share_b: Vec<f64>,
    /// Mean experts chosen per token under A.
    pub experts_per_token_a: f64,
    /// The same under B.
    pub experts_per_token_b: f64,
    /// Mean over tokens of the Jaccard index of the two chosen expert sets.
    pub jaccard_mean: f64,
    /// Tokens per Jaccard bin ([`JACCARD_BINS`]: [0, 0.1), ..., [0.9, 1), exactly 1).
    pub jaccard_histogram: Vec<u64>,
}

impl CompareLayer {
    /// Per expert: share under B minus share under A (the difference heatmap's row).
    pub fn share_delta(&self) -> Vec<f64> {
        self.share_b
            .iter()
            .zip(&self.share_a)
            .map(|(b, a)| b - a)
            .collect()
    }

    /// Experts per token under B minus under A.
    pub fn delta_experts_per_token(&self) -> f64 {
        self.experts_per_token_b - self.experts_per_token_a
    }
}

/// Everything an A/B comparison shows, computed from the two runs over the same tokens.
/// Differences are always B minus A.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompareSnapshot {
    /// Policy A (the session's own routing).
    pub a: CompareSide,
    /// Policy B (run again on every batch A ran).
    pub b: CompareSide,
    /// Batches run under both policies.
    pub batches: u64,
    /// Tokens run under both policies (each once per policy).
    pub tokens: u64,
    /// Per MoE layer, in slot order.
    pub layers: Vec<CompareLayer>,
    /// MoE FLOPs per token of running every expert of every MoE layer.
    pub moe_flops_all_experts_per_token: f64,
    /// B's MoE FLOPs per token minus A's.
    pub delta_moe_flops_per_token: f64,
    /// The same as a percentage of the all-experts MoE FLOPs.
    pub delta_moe_flops_pct_of_all_experts: f64,
    /// Mean over batches of B's pass time minus A's on the same batch, milliseconds.
    pub delta_pass_ms_mean: f64,
    /// Standard error of that mean (paired over batches); `None` below 2 batches.
    pub delta_pass_ms_stderr: Option<f64>,
    /// Predictions scored under each policy (0 without an eval workload).
    pub scored_tokens: u64,
    /// B's bits per byte minus A's on the same tokens.
    pub delta_bits_per_byte: Option<f64>,
    /// Standard error of that difference, batches as the sampled units; `None` below 2.
    pub delta_bits_per_byte_stderr: Option<f64>,
    /// Mean over predictions of KL(P_B ‖ P_A) of the next-token distributions, bits per token.
    pub mean_kl_bits: Option<f64>,
    /// Mean Jaccard index of the chosen expert sets over every (token, MoE layer).
    pub jaccard_mean: f64,
    /// (token, layer) pairs per Jaccard bin, all layers together.
    pub jaccard_histogram: Vec<u64>,
}

impl CompareSnapshot {
    /// B's mean experts per token minus A's.
    pub fn delta_experts_per_token(&self) -> f64 {
        self.b.mean_experts_per_token - self.a.mean_experts_per_token
    }

    /// Fraction of (token, layer) pairs whose two expert sets are identical.
    pub fn identical_fraction(&self) -> f64 {
        let n: u64 = self.jaccard_histogram.iter().sum();
        if n == 0 {
            0.0
        } else {
            self.jaccard_histogram.last().copied().unwrap_or(0) as f64 / n as f64
        }
    }

    /// The largest |share under B − share under A| over every layer and expert (the
    /// difference heatmap's scale); 0 before any token.
    pub fn max_abs_share_delta(&self) -> f64 {
        self.layers
            .iter()
            .flat_map(|l| l.share_delta())
            .fold(0.0, |m: f64, d| m.max(d.abs()))
    }
}

/// Running sums of one side.
#[derive(Clone, Debug)]
struct SideSums {
    policies: Vec<RoutingPolicy>,
    /// [slot][expert]: tokens that chose the expert.
    chosen: Vec<Vec<u64>>,
    /// [slot]: experts chosen, summed over tokens.
    selected: Vec<u64>,
    moe_flops: f64,
    pass_ns: Histogram<u64>,
    pass_ns_sum: u128,
    pass_ns_min: u64,
    pass_ns_max: u64,
    nats: f64,
}

impl SideSums {
    fn new(policies: Vec<RoutingPolicy>, n_moe: usize, n_experts: usize) -> Self {
        Self {
            policies,
            chosen: vec![vec![0; n_experts]; n_moe],
            selected: vec![0; n_moe],
            moe_flops: 0.0,
            // 2 significant figures, up to ~3 hours in ns: the live histograms' precision.
            pass_ns: Histogram::new_with_bounds(1, 10_000_000_000_000, 2)
                .expect("static histogram bounds are valid"),
            pass_ns_sum: 0,
            pass_ns_min: u64::MAX,
            pass_ns_max: 0,
            nats: 0.0,
        }
    }

    fn record_pass(&mut self, ns: u64) {
        self.pass_ns.saturating_record(ns.max(1));
        self.pass_ns_sum += ns as u128;
        self.pass_ns_min = self.pass_ns_min.min(ns);
        self.pass_ns_max = self.pass_ns_max.max(ns);
    }

    fn pass_ms_quantile(&self, q: f64) -> f64 {
        if self.pass_ns.is_empty() {
            return 0.0;
        }
        (self.pass_ns.value_at_quantile(q) as f64)
            .clamp(self.pass_ns_min as f64, self.pass_ns_max as f64)
            * 1e-6
    }
}

/// A/B statistics of the current comparison (see the module documentation).
#[derive(Clone, Debug)]
pub struct CompareStats {
    moe_layers: Vec<usize>,
    n_experts: usize,
    /// MoE FLOPs of one token of one layer with k kept experts, k = 0..=n_experts.
    layer_flops: Vec<f64>,
    all_experts_flops: f64,
    a: SideSums,
    b: SideSums,
    batches: u64,
    tokens: u64,
    /// [slot]: Jaccard indices summed over tokens, and their histogram.
    jaccard_sum: Vec<f64>,
    jaccard_hist: Vec<[u64; JACCARD_BINS]>,
    /// Paired pass-time differences (ms): sum and sum of squares, for the mean and its error.
    dt_sum: f64,
    dt_sq: f64,
    quality_batches: u64,
    scored_tokens: u64,
    bytes: u64,
    deltas: DeltaSums,
    kl_nats: f64,
    scratch_a: Vec<usize>,
    scratch_b: Vec<usize>,
    mark: Vec<bool>,
}

impl CompareStats {
    /// Empty statistics for comparing `a` with `b` (one policy per MoE layer each) on a model
    /// of configuration `cfg`.
    pub fn new(cfg: &ModelConfig, a: Vec<RoutingPolicy>, b: Vec<RoutingPolicy>) -> Result<Self> {
        let moe_layers = cfg.moe_layer_indices();
        let n_moe = moe_layers.len();
        if a.len() != n_moe || b.len() != n_moe {
            bail!(
                "A/B: policy A names {} layers and B {}, but the model has {n_moe} MoE layers",
                a.len(),
                b.len()
            );
        }
        let flops = FlopModel::new(cfg);
        let e = cfg.n_experts;
        Ok(Self::with_flops(
            moe_layers,
            e,
            (0..=e).map(|k| flops.moe_layer(k) as f64).collect(),
            flops.moe_layer_all_experts() as f64,
            a,
            b,
        ))
    }

    /// Empty sums for `a` and `b` on `moe_layers` x `n_experts`, with the MoE FLOPs of a layer
    /// that keeps k experts at `layer_flops[k]`.
    fn with_flops(
        moe_layers: Vec<usize>,
        n_experts: usize,
        layer_flops: Vec<f64>,
        all_experts_flops: f64,
        a: Vec<RoutingPolicy>,
        b: Vec<RoutingPolicy>,
    ) -> Self {
        let n_moe = moe_layers.len();
        Self {
            layer_flops,
            all_experts_flops,
            a: SideSums::new(a, n_moe, n_experts),
            b: SideSums::new(b, n_moe, n_experts),
            batches: 0,
            tokens: 0,
            jaccard_sum: vec![0.0; n_moe],
            jaccard_hist: vec![[0; JACCARD_BINS]; n_moe],
            dt_sum: 0.0,
            dt_sq: 0.0,
            quality_batches: 0,
            scored_tokens: 0,
            bytes: 0,
            deltas: DeltaSums::default(),
            kl_nats: 0.0,
            scratch_a: Vec::new(),
            scratch_b: Vec::new(),
            mark: vec![false; n_experts],
            moe_layers,
            n_experts,
        }
    }

    /// Policy A, per MoE layer.
    pub fn policies_a(&self) -> &[RoutingPolicy] {
        &self.a.policies
    }

    /// Policy B, per MoE layer.
    pub fn policies_b(&self) -> &[RoutingPolicy] {
        &self.b.policies
    }

    /// Batches recorded so far.
    pub fn batches(&self) -> u64 {
        self.batches
    }

    /// Records one batch: `a` and `b` are the traces of the two passes over the same tokens,
    /// `ns_a` and `ns_b` their forward times, `quality` the two cross-entropies and the KL
    /// (eval workload). Refuses traces that do not describe the same tokens and layers.
    pub fn record(
        &mut self,
        a: &ForwardTrace,
        b: &ForwardTrace,
        ns_a: u64,
        ns_b: u64,
        quality: Option<PairQuality>,
    ) -> Result<()> {
        let n_moe = self.moe_layers.len();
        if a.tokens() != b.tokens() {
            bail!(
                "A/B: the two passes ran different tokens ({} under A, {} under B)",
                a.tokens(),
                b.tokens()
            );
        }
        if a.moe.len() < n_moe || b.moe.len() < n_moe {
            bail!(
                "A/B: a trace has {} / {} MoE layers, expected {n_moe}",
                a.moe.len(),
                b.moe.len()
            );
        }
        for slot in 0..n_moe {
            let (ra, rb) = (&a.moe[slot].routing, &b.moe[slot].routing);
            if ra.tokens() != a.tokens() || rb.tokens() != a.tokens() {
                bail!(
                    "A/B: MoE layer {} routed {} / {} tokens, expected {}",
                    self.moe_layers[slot],
                    ra.tokens(),
                    rb.tokens(),
                    a.tokens()
                );
            }
            if ra.n_experts != self.n_experts || rb.n_experts != self.n_experts {
                bail!(
                    "A/B: MoE layer {} has {} / {} experts, expected {}",
                    self.moe_layers[slot],
                    ra.n_experts,
                    rb.n_experts,
                    self.n_experts
                );
            }
        }
        let n = a.tokens();
        for slot in 0..n_moe {
            let (ra, rb) = (&a.moe[slot].routing, &b.moe[slot].routing);
            for t in 0..n {
                let kept_a = side_token(ra, t, &mut self.scratch_a, &mut self.a, slot);
                let kept_b = side_token(rb, t, &mut self.scratch_b, &mut self.b, slot);
                self.a.moe_flops += self.layer_flops[kept_a];
                self.b.moe_flops += self.layer_flops[kept_b];
                let j = jaccard(&self.scratch_a, &self.scratch_b, &mut self.mark);
                self.jaccard_sum[slot] += j;
                self.jaccard_hist[slot][jaccard_bin(j)] += 1;
            }
        }
        self.a.record_pass(ns_a);
        self.b.record_pass(ns_b);
        let dt = (ns_b as f64 - ns_a as f64) * 1e-6;
        self.dt_sum += dt;
        self.dt_sq += dt * dt;
        self.batches += 1;
        self.tokens += n as u64;
        if let Some(q) = quality {
            self.quality_batches += 1;
            self.a.nats += q.nats_a;
            self.b.nats += q.nats_b;
            self.scored_tokens += q.scored_tokens;
            self.bytes += q.bytes;
            self.kl_nats += q.kl_nats;
            self.deltas.add(
                (q.nats_b - q.nats_a) / std::f64::consts::LN_2,
                q.bytes as f64,
            );
        }
        Ok(())
    }

    /// The figures so far.
    pub fn snapshot(&self) -> CompareSnapshot {
        let n_moe = self.moe_layers.len();
        let tokens = self.tokens as f64;
        let per_token = |x: f64| if tokens > 0.0 { x / tokens } else { 0.0 };
        let all = self.all_experts_flops * n_moe as f64;
        let side = |s: &SideSums| {
            let flops = per_token(s.moe_flops);
            CompareSide {
                label: side_label(&self.moe_layers, &s.policies),
                policies: s.policies.clone(),
                mean_experts_per_token: per_token(s.selected.iter().sum::<u64>() as f64)
                    / n_moe.max(1) as f64,
                moe_flops_per_token: flops,
                moe_flops_fraction_of_all_experts: if all > 0.0 { flops / all } else { 0.0 },
                pass_ms_mean: if self.batches > 0 {
                    s.pass_ns_sum as f64 / self.batches as f64 * 1e-6
                } else {
                    0.0
                },
                pass_ms_p50: s.pass_ms_quantile(0.5),
                pass_ms_p90: s.pass_ms_quantile(0.9),
                bits_per_byte: (self.bytes > 0)
                    .then(|| s.nats / std::f64::consts::LN_2 / self.bytes as f64),
            }
        };
        let (a, b) = (side(&self.a), side(&self.b));
        let layers = (0..n_moe)
            .map(|slot| CompareLayer {
                layer: self.moe_layers[slot],
                share_a: self.a.chosen[slot]
                    .iter()
                    .map(|&c| per_token(c as f64))
                    .collect(),
                share_b: self.b.chosen[slot]
                    .iter()
                    .map(|&c| per_token(c as f64))
                    .collect(),
                experts_per_token_a: per_token(self.a.selected[slot] as f64),
                experts_per_token_b: per_token(self.b.selected[slot] as f64),
                jaccard_mean: per_token(self.jaccard_sum[slot]),
                jaccard_histogram: self.jaccard_hist[slot].to_vec(),
            })
            .collect();
        let mut hist = vec![0u64; JACCARD_BINS];
        for h in &self.jaccard_hist {
            for (t, x) in hist.iter_mut().zip(h) {
                *t += x;
            }
        }
        let pairs = tokens * n_moe as f64;
        let nb = self.batches as f64;
        let delta_flops = b.moe_flops_per_token - a.moe_flops_per_token;
        CompareSnapshot {
            batches: self.batches,
            tokens: self.tokens,
            layers,
            moe_flops_all_experts_per_token: all,
            delta_moe_flops_per_token: delta_flops,
            delta_moe_flops_pct_of_all_experts: if all > 0.0 {
                100.0 * delta_flops / all
            } else {
                0.0
            },
            delta_pass_ms_mean: if nb > 0.0 { self.dt_sum / nb } else { 0.0 },
            delta_pass_ms_stderr: (self.batches >= 2).then(|| {
                let var = ((self.dt_sq - self.dt_sum * self.dt_sum / nb) / (nb - 1.0)).max(0.0);
                (var / nb).sqrt()
            }),
            scored_tokens: self.scored_tokens,
            delta_bits_per_byte: match (b.bits_per_byte, a.bits_per_byte) {
                (Some(x), Some(y)) => Some(x - y),
                _ => None,
            },
            delta_bits_per_byte_stderr: self.deltas.stderr(),
            mean_kl_bits: (self.scored_tokens > 0)
                .then(|| self.kl_nats / self.scored_tokens as f64 / std::f64::consts::LN_2),
            jaccard_mean: if pairs > 0.0 {
                self.jaccard_sum.iter().sum::<f64>() / pairs
            } else {
                0.0
            },
            jaccard_histogram: hist,
            a,
            b,
        }
    }
}

/// Collects token `t`'s chosen experts into `set`, adds them to the side's counts, and returns
/// how many the capacity limit kept (what its FLOPs are).
fn side_token(
    r: &Routing,
    t: usize,
    set: &mut Vec<usize>,
    sums: &mut SideSums,
    slot: usize,
) -> usize {
    set.clear();
    let mut kept = 0;
    for (e, _, k) in r.choices(t) {
        set.push(e);
        sums.chosen[slot][e] += 1;
        kept += k as usize;
    }
    sums.selected[slot] += set.len() as u64;
    kept
}

/// A comparison for render tests of `moe_layers` x `n_experts`: A takes one expert per token,
/// B two (A's and the next), recorded through [`CompareStats`]'s own
/// sums rather than written by hand.
#[cfg(test)]
pub fn example(moe_layers: &[usize], n_experts: usize) -> CompareSnapshot {
    let n_moe = moe_layers.len();
    let mut stats = CompareStats::with_flops(
        moe_layers.to_vec(),
        n_experts,
        (0..=n_experts).map(|k| 1000.0 + 500.0 * k as f64).collect(),
        1000.0 + 500.0 * n_experts as f64,
        vec![RoutingPolicy::threshold(0.9); n_moe],
        vec![
            RoutingPolicy::TopK {
                k: 2,
                renormalize: false
            };
            n_moe
        ],
    );
    let tokens = 64;
    let trace = |offset: usize, width: usize| {
        let mut tr = ForwardTrace {
            batch: 1,
            seq_len: tokens,
            ..Default::default()
        };
        for (slot, &layer) in moe_layers.iter().enumerate() {
            let r = &mut tr.moe_slot(slot, layer).routing;
            r.n_experts = n_experts;
            r.offsets = vec![0];
            for t in 0..tokens {
                for j in 0..width {
                    r.experts.push(((t + slot + offset + j) % n_experts) as u16);
                    r.weights.push(0.5);
                    r.kept.push(true);
                }
                r.offsets.push(r.experts.len() as u32);
            }
        }
        tr
    };
    let (a, b) = (trace(0, 1), trace(0, 2));
    for i in 0..3u64 {
        let q = PairQuality {
            nats_a: 100.0,
            nats_b: 98.0 + i as f64,
            scored_tokens: tokens as u64,
            bytes: tokens as u64,
            kl_nats: 2.0,
        };
        stats
            .record(&a, &b, 2_000_000 + i * 100_000, 3_000_000, Some(q))
            .expect("consistent traces");
    }
    stats.snapshot()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profiling::stats::kl_nats;

    fn cfg() -> ModelConfig {
        // 2 MoE layers of 8 experts.
        let mut c = crate::model::config::tests::small();
        c.n_layers = 2;
        c.moe_layers = crate::model::config::MoeLayers::Every {
            every: 1,
            offset: 0,
        };
        c
    }

    /// A trace whose every MoE layer gives token i the experts `sets[i]` (all kept).
    fn trace(sets: &[&[usize]], n_moe: usize, n_experts: usize) -> ForwardTrace {
        let mut tr = ForwardTrace {
            batch: 1,
            seq_len: sets.len(),
            ..Default::default()
        };
        for slot in 0..n_moe {
            let m = tr.moe_slot(slot, slot);
            let r = &mut m.routing;
            r.n_experts = n_experts;
            r.offsets = vec![0];
            for s in sets {
                r.experts.extend(s.iter().map(|&e| e as u16));
                r.weights.extend(s.iter().map(|_| 0.5));
                r.kept.extend(s.iter().map(|_| true));
                r.offsets.push(r.experts.len() as u32);
            }
        }
        tr
    }

    fn t(x: f32) -> RoutingPolicy {
        RoutingPolicy::threshold(x)
    }

    #[test]
    fn jaccard_of_equal_disjoint_and_overlapping_sets() {
        let mut mark = vec![false; 8];
        assert_eq!(jaccard(&[1, 2, 3], &[3, 2, 1], &mut mark), 1.0);
        assert_eq!(jaccard(&[0, 1], &[2, 3], &mut mark), 0.0);
        assert_eq!(jaccard(&[0, 1, 2], &[1, 2, 3], &mut mark), 0.5);
        assert_eq!(jaccard(&[4], &[4, 5, 6, 7], &mut mark), 0.25);
        assert_eq!(jaccard(&[], &[], &mut mark), 1.0);
        assert!(mark.iter().all(|m| !m), "scratch left clean");
        assert_eq!(jaccard_bin(1.0), 10);
        assert_eq!(jaccard_bin(0.0), 0);
        assert_eq!(jaccard_bin(0.5), 5);
        assert_eq!(jaccard_bin(0.999), 9);
    }

    #[test]
    fn kl_of_identical_logits_is_zero_and_of_different_ones_positive() {
        let l = [1.0f32, 2.0, 0.5, -1.0, 0.0, 3.0];
        assert!(kl_nats(&l, &l, 3).abs() < 1e-12);
        let m = [2.0f32, 1.0, 0.5, -1.0, 0.0, 3.0];
        assert!(kl_nats(&l, &m, 3) > 1e-3);
    }

    #[test]
    fn identical_policies_agree_everywhere() {
        let c = cfg();
        let mut s = CompareStats::new(&c, vec![t(0.9); 2], vec![t(0.9); 2]).unwrap();
        let tr = trace(&[&[0, 1], &[3], &[7, 2, 5]], 2, 8);
        let q = PairQuality {
            nats_a: 3.0,
            nats_b: 3.0,
            scored_tokens: 3,
            bytes: 3,
            kl_nats: 0.0,
        };
        s.record(&tr, &tr, 1_000_000, 1_000_000, Some(q)).unwrap();
        s.record(&tr, &tr, 2_000_000, 2_000_000, Some(q)).unwrap();
        let snap = s.snapshot();
        assert_eq!((snap.batches, snap.tokens), (2, 6));
        assert_eq!(snap.jaccard_mean, 1.0);
        assert_eq!(snap.identical_fraction(), 1.0);
        assert_eq!(snap.jaccard_histogram[10], 12);
        assert_eq!(snap.delta_experts_per_token(), 0.0);
        assert_eq!(snap.delta_moe_flops_per_token, 0.0);
        assert_eq!(snap.delta_bits_per_byte, Some(0.0));
        assert_eq!(snap.delta_bits_per_byte_stderr, Some(0.0));
        assert_eq!(snap.mean_kl_bits, Some(0.0));
        assert_eq!(snap.max_abs_share_delta(), 0.0);
        assert_eq!(snap.delta_pass_ms_mean, 0.0);
        assert_eq!(snap.a.label, "t=0.9");
        // 2 experts, 1, 3: 6 of 3 tokens.
        assert_eq!(snap.a.mean_experts_per_token, 2.0);
        assert_eq!(snap.layers[0].share_a[0], 1.0 / 3.0);
        assert!((snap.a.pass_ms_mean - 1.5).abs() < 1e-12);
    }

    #[test]
    fn disjoint_sets_and_every_difference_is_b_minus_a() {
        let c = cfg();
        let flops = FlopModel::new(&c);
        let mut s = CompareStats::new(&c, vec![t(0.5); 2], vec![RoutingPolicy::Dense; 2]).unwrap();
        // A: one expert per token; B: two others.
        let a = trace(&[&[0], &[1]], 2, 8);
        let b = trace(&[&[2, 3], &[4, 5]], 2, 8);
        let q = |na: f64, nb: f64| PairQuality {
            nats_a: na,
            nats_b: nb,
            scored_tokens: 2,
            bytes: 4,
            kl_nats: 0.2,
        };
        s.record(&a, &b, 1_000_000, 3_000_000, Some(q(2.0, 1.0)))
            .unwrap();
        s.record(&a, &b, 1_000_000, 5_000_000, Some(q(2.0, 1.5)))
            .unwrap();
        let snap = s.snapshot();
        assert_eq!(snap.jaccard_mean, 0.0);
        assert_eq!(snap.jaccard_histogram[0], 8);
        assert_eq!(snap.layers[1].jaccard_mean, 0.0);
        assert_eq!(snap.delta_experts_per_token(), 1.0);
        assert_eq!(snap.layers[0].delta_experts_per_token(), 1.0);
        let one = (flops.moe_layer(2) - flops.moe_layer(1)) as f64 * 2.0;
        assert!((snap.delta_moe_flops_per_token - one).abs() < 1e-9);
        let all = flops.moe_layer_all_experts() as f64 * 2.0;
        assert!((snap.delta_moe_flops_pct_of_all_experts - 100.0 * one / all).abs() < 1e-9);
        // Share of expert 0 falls from 1/2 to 0, of expert 2 rises from 0 to 1/2.
        let d = snap.layers[0].share_delta();
        assert_eq!((d[0], d[2]), (-0.5, 0.5));
        assert_eq!(snap.max_abs_share_delta(), 0.5);
        // B is 2 and 4 ms slower: mean 3, sample variance 2, stderr sqrt(2 / 2).
        assert!((snap.delta_pass_ms_mean - 3.0).abs() < 1e-9);
        assert!((snap.delta_pass_ms_stderr.unwrap() - 1.0).abs() < 1e-9);
        assert!((snap.b.pass_ms_p90 - 5.0).abs() < 0.05);
        // B saves (1 + 0.5) nats over 8 bytes.
        let want = -1.5 / std::f64::consts::LN_2 / 8.0;
        assert!((snap.delta_bits_per_byte.unwrap() - want).abs() < 1e-12);
        assert!(snap.delta_bits_per_byte_stderr.unwrap() > 0.0);
        assert!((snap.mean_kl_bits.unwrap() - 0.1 / std::f64::consts::LN_2).abs() < 1e-12);
    }

    #[test]
    fn mismatched_traces_are_refused() {
        let c = cfg();
        let mut s = CompareStats::new(&c, vec![t(0.9); 2], vec![t(0.8); 2]).unwrap();
        let a = trace(&[&[0], &[1]], 2, 8);
        let b = trace(&[&[0]], 2, 8);
        let e = s.record(&a, &b, 1, 1, None).unwrap_err().to_string();
        assert!(e.contains("different tokens"), "{e}");
        let b = trace(&[&[0], &[1]], 1, 8);
        assert!(s.record(&a, &b, 1, 1, None).is_err());
        let b = trace(&[&[0], &[1]], 2, 4);
        assert!(s.record(&a, &b, 1, 1, None).is_err());
        assert_eq!(s.batches(), 0);
        assert!(CompareStats::new(&c, vec![t(0.9); 3], vec![t(0.9); 2]).is_err());
        // Without quality, no quality figure is made up.
        s.record(&a, &a, 1, 1, None).unwrap();
        let snap = s.snapshot();
        assert_eq!(snap.delta_bits_per_byte, None);
        assert_eq!(snap.mean_kl_bits, None);
        assert_eq!(snap.delta_pass_ms_stderr, None);
    }

    #[test]
    fn labels_of_sides() {
        assert_eq!(side_label(&[0, 1], &[t(0.9), t(0.9)]), "t=0.9");
        assert_eq!(side_label(&[0, 3], &[t(0.8), t(0.95)]), "t=0:0.8,3:0.95");
        let k = RoutingPolicy::TopK {
            k: 2,
            renormalize: false,
        };
        assert_eq!(side_label(&[0, 1], &[k, k]), "top-2");
        assert_eq!(side_label(&[0, 1], &[t(0.8), k]), "L0 t=0.8, L1 top-2");
    }
}
