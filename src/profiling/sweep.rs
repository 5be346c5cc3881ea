//! Threshold-sweep results: what a sweep measured per policy, as reports render it. Pure data,
//! with no dependency on the session, workload or model-running code.

use serde::{Deserialize, Serialize};

use crate::routing::RoutingPolicy;

/// One policy's figures over the sweep's tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepPoint {
    /// Short label ("t=0.9", "top-2", "dense").
    pub label: String,
    /// The policy, on every MoE layer.
    pub policy: RoutingPolicy,
    /// This is the model's default policy.
    pub is_default: bool,
    /// This is the quality reference (Dense).
    pub is_reference: bool,
    /// Tokens run.
    pub tokens: u64,
    /// Mean experts per token over all MoE layers (before capacity dropping).
    pub mean_experts_per_token: f64,
    /// Mean experts per token of each MoE layer, in MoE slot order.
    pub layer_mean_experts_per_token: Vec<f64>,
    /// MoE FLOPs per token (routers and kept experts of all MoE layers).
    pub moe_flops_per_token: f64,
    /// MoE FLOPs as a fraction of running all experts (0..=1).
    pub moe_flops_fraction_of_all_experts: f64,
    /// MoE compute saved against all experts, percent.
    pub moe_saved_vs_all_experts_pct: f64,
    /// MoE compute saved against the top-k baseline, percent (negative when above it).
    pub moe_saved_vs_top_k_pct: f64,
    /// Whole-model FLOPs per token.
    pub model_flops_per_token: f64,
    /// Whole-model compute saved against the top-k baseline, percent.
    pub model_saved_vs_top_k_pct: f64,
    /// Bits per byte of next-token prediction.
    pub bits_per_byte: Option<f64>,
    /// Bits per byte minus the reference policy's on the same tokens (positive = worse than the
    /// reference; see [`SweepResult::reference_policy`]).
    pub delta_bits_per_byte_vs_reference: Option<f64>,
    /// Per-token perplexity.
    pub perplexity: Option<f64>,
    /// Mean KL(Dense || this policy) of next-token distributions, bits per token.
    pub mean_kl_bits: Option<f64>,
    /// Per-token latency median, microseconds.
    pub token_latency_p50_us: f64,
    /// Per-token latency 99th percentile, microseconds.
    pub token_latency_p99_us: f64,
    /// Forward-pass latency median, microseconds.
    pub forward_latency_p50_us: f64,
    /// Tokens per second of this point: the median over the repeats of (tokens / forward time
    /// of all its passes in that repeat).
    pub tokens_per_second: f64,
    /// Tokens per second of each repeat, in the order they ran (the spread of
    /// `tokens_per_second`); empty in reports written before repeats existed.
    #[serde(default)]
    pub tokens_per_second_repeats: Vec<f64>,
}

impl SweepPoint {
    /// The slowest and fastest repeat's tokens per second (both `tokens_per_second` when the
    /// repeats were not recorded).
    pub fn tokens_per_second_range(&self) -> (f64, f64) {
        let v = &self.tokens_per_second_repeats;
        if v.is_empty() {
            return (self.tokens_per_second, self.tokens_per_second);
        }
        (
            v.iter().copied().fold(f64::INFINITY, f64::min),
            v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        )
    }
}

/// A finished sweep.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepResult {
    /// Model name.
    pub model: String,
    /// Block indices of the MoE layers.
    pub moe_layers: Vec<usize>,
    /// Experts per MoE layer.
    pub n_experts: usize,
    /// The model's default policy (marked on the curve).
    pub default_policy: RoutingPolicy,
    /// The quality reference (Dense).
    pub reference_policy: RoutingPolicy,
    /// k of the top-k baseline.
    pub top_k_baseline: usize,
    /// Capacity factor applied to every point.
    pub capacity_factor: Option<f32>,
    /// Where the tokens came from.
    pub source: String,
    /// Sequences per pass.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Passes per point and repeat.
    pub batches: usize,
    /// Times every pass of every point was run, interleaved across points; timings are medians
    /// over the repeats, quality and routing come from the first (they do not change).
    #[serde(default = "one")]
    pub repeats: usize,
    /// Tokens per point.
    pub tokens_per_point: u64,
    /// Where the model ran.
    pub device: String,
    /// Wall time of the whole sweep, seconds.
    pub elapsed_s: f64,
    /// One per policy: thresholds ascending, then top-k ascending, then Dense.
    pub points: Vec<SweepPoint>,
}

fn one() -> usize {
    1
}

impl SweepResult {
    /// The point of the model's default policy, if it was swept.
    pub fn default_point(&self) -> Option<&SweepPoint> {
        self.points.iter().find(|p| p.is_default)
    }
}

/// A short label of a policy: "t=0.90", "top-2", "top-2 renorm", "dense".
pub fn policy_label(p: &RoutingPolicy) -> String {
    let renorm = if p.renormalizes() { " renorm" } else { "" };
    match *p {
        RoutingPolicy::Threshold { t, .. } => {
            format!("t={}{renorm}", crate::units::trim_float(t as f64, 3))
        }
        RoutingPolicy::TopK { k, .. } => format!("top-{k}{renorm}"),
        RoutingPolicy::Dense => "dense".to_string(),
    }
}
