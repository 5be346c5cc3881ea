//! The immutable, pre-aggregated picture of a running session that every view reads.
//!
//! A [`Snapshot`] is what the session publishes (at most ~10 per second, plus one per epoch
//! change). The TUI, the headless summary and the reports are thin views over it: everything
//! they show is a field here, already aggregated, so that no view ever walks the history.
//!
//! Conventions:
//! - "window" figures cover the last N tokens of the current epoch (N = [`Snapshot::window_tokens_target`]);
//!   "epoch" figures cover the whole current epoch. An epoch starts at every policy, capacity
//!   or workload change and at a reset, so figures of different settings are never mixed.
//! - Shares and fractions are in 0..=1; percentages are named `*_pct` and are in 0..=100 (compute
//!   saved may be negative when the policy uses more experts than the baseline).
//! - Times are in microseconds (`*_us`) or seconds (`*_s`); FLOPs count a multiply-add as 2.
//! - Per-layer vectors are indexed by MoE slot (the `i`-th MoE layer), and each entry names its
//!   block index in `layer`.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::routing::RoutingPolicy;

/// Version of the snapshot layout; bumped on any incompatible change (reports embed it).
/// Version 2: threshold policies carry `renormalize`.
pub const SNAPSHOT_SCHEMA_VERSION: u32 = 2;

/// Everything a view needs about the session at one instant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// [`SNAPSHOT_SCHEMA_VERSION`] of the code that built this snapshot.
    pub schema_version: u32,
    /// Version of xmoe-top that built it.
    pub xmoe_top_version: String,
    /// Counter of snapshots built by this session (0, 1, 2, ...).
    pub sequence: u64,
    /// Seconds since the session started.
    pub session_elapsed_s: f64,
    /// Wall-clock time the snapshot was built, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The model being run.
    pub model: ModelInfo,
    /// What the model is being run on.
    pub workload: WorkloadInfo,
    /// Routing policy of each MoE layer and the capacity factor, as in force for this epoch.
    pub policy: PolicyState,
    /// The model thread is paused (no forward passes until resumed).
    pub paused: bool,
    /// Set once the session has stopped: why (budget reached, stopped by the user, or the error).
    pub ended: Option<String>,
    /// Tokens run through the model since the session started, all epochs, reference passes excluded.
    pub tokens_processed_total: u64,
    /// Target size of the sliding window, in tokens.
    pub window_tokens_target: u64,
    /// Statistics of the current epoch.
    pub epoch: EpochStats,
    /// Summary of the epoch before the current one, for before/after comparison.
    pub previous_epoch: Option<EpochSummary>,
    /// Latest device counters (GPU through NVML, else this process's CPU and memory).
    pub device: DeviceSnapshot,
    /// Generate workload only: the recent stream of prompt and generated tokens.
    pub generated: Option<GeneratedText>,
    /// A/B comparison of the session's policy with a second one on the same batches, while one
    /// runs (`--compare`, the `a` key). Absent from reports written before A/B existed.
    #[serde(default)]
    pub compare: Option<crate::profiling::compare::CompareSnapshot>,
    /// One point per second over the last minutes, across epochs (oldest first), for the live
    /// UI's history panel. Not part of reports (their schema is unchanged): a report describes
    /// one epoch, the history spans several.
    #[serde(skip)]
    pub history: Vec<HistoryPoint>,
    /// A quick tune the UI asked for (running, finished or failed); live UI only, like
    /// `history`.
    #[serde(skip)]
    pub tune: Option<TuneStatus>,
    /// The routes of recent tokens, published only while the UI's token view asks for them
    /// (shared: snapshots are cloned often and this can be large).
    #[serde(skip)]
    pub routes: Option<std::sync::Arc<TokenRoutes>>,
}

/// Recent tokens with their full route through every MoE layer: what the UI's "follow one
/// token" view shows.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenRoutes {
    /// Where the tokens come from ("eval pass 123, sequence 1 of 4", "generate stream").
    pub source: String,
    /// Block index of each MoE slot.
    pub layers: Vec<usize>,
    /// Experts per MoE layer.
    pub n_experts: usize,
    /// The policy of each MoE slot when the tokens ran.
    pub policies: Vec<RoutingPolicy>,
    /// The tokens, in text order.
    pub tokens: Vec<RoutedToken>,
}

/// One token and its route.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutedToken {
    /// Token id.
    pub token: u32,
    /// The text it covers (possibly part of a UTF-8 character).
    pub bytes: Vec<u8>,
    /// Position in its sequence.
    pub position: usize,
    /// Eval: the next token and the text it covers.
    pub target: Option<(u32, Vec<u8>)>,
    /// Eval: cross-entropy of predicting the target, nats.
    pub loss_nats: Option<f32>,
    /// Prompt or generated (generate stream); `None` in eval.
    pub origin: Option<TokenOrigin>,
    /// One entry per MoE slot.
    pub layers: Vec<LayerRoute>,
}

/// A token's routing in one MoE layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerRoute {
    /// The router's probability of every expert (what the threshold rule reads).
    pub probs: Vec<f32>,
    /// The selected experts in choice order: (expert, combine weight, kept by the capacity limit).
    pub chosen: Vec<(u16, f32, bool)>,
}

/// Where a quick tune asked for by the UI stands.
#[derive(Clone, Debug, PartialEq)]
pub enum TuneStatus {
    /// The search is running; live passes wait for it.
    Running {
        /// The budget, as the user reads it ("bits/byte at most 1% above Dense").
        budget: String,
        /// The search's latest line (reference, accepted step).
        line: String,
        /// Forward passes so far.
        passes: usize,
        /// Seconds since it started.
        elapsed_s: f64,
    },
    /// The search finished.
    Done(Box<QuickTune>),
    /// It could not run or failed: why.
    Failed(String),
}

/// One policy as a quick tune measured it on the verification tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct TunePoint {
    /// Per-layer thresholds in the `--threshold` syntax, or "t=0.75".
    pub label: String,
    /// MoE FLOPs as a fraction of running all experts.
    pub moe_flops_fraction: f64,
    /// Bits per byte minus the reference's.
    pub delta_bits_per_byte: f64,
    /// Its standard error over the batches.
    pub delta_bits_per_byte_stderr: f64,
    /// Δ bits/byte relative to the reference's bits/byte (a fraction).
    pub delta_relative: f64,
    /// Mean KL(reference || policy), bits per token, where the budget measured it.
    pub mean_kl_bits: Option<f64>,
    /// Mean experts per token over the MoE layers.
    pub mean_experts_per_token: f64,
    /// Whether it kept the budget on the verification tokens.
    pub within_budget: bool,
}

/// The result of a quick tune: per-layer thresholds the UI offers to apply.
#[derive(Clone, Debug, PartialEq)]
pub struct QuickTune {
    /// The budget, as the user reads it.
    pub budget: String,
    /// The quality reference's label.
    pub reference: String,
    /// The tuned policy of each MoE layer, in slot order (what "apply" sets).
    pub policies: Vec<RoutingPolicy>,
    /// The tuned thresholds on the verification tokens.
    pub tuned: TunePoint,
    /// The lowest-FLOP single threshold within the budget, on the verification tokens.
    pub best_uniform: Option<TunePoint>,
    /// Tokens the search ran on.
    pub search_tokens: u64,
    /// Tokens only the verification saw.
    pub verify_tokens: u64,
    /// Forward passes of the whole run.
    pub passes: usize,
    /// Wall time, seconds.
    pub elapsed_s: f64,
}

/// One point of the session's history (see `profiling::stats::history`). Serialisable for
/// recordings (`crate::record`), which keep what the history panel draws; reports leave it out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryPoint {
    /// Session time of the point, seconds.
    pub t_s: f64,
    /// Epoch in force when it was taken; a change between two points marks a change of settings.
    pub epoch: u64,
    /// Tokens processed since the previous point.
    pub tokens: u64,
    /// Those tokens / wall time of the forward passes that processed them; `None` when none ran.
    pub tokens_per_second: Option<f64>,
    /// Mean experts per token over the window; `None` while the window is empty.
    pub experts_per_token: Option<f64>,
    /// MoE compute saved against all experts over the window, percent; `None` while empty.
    pub moe_saved_pct: Option<f64>,
    /// Δ bits/byte of the epoch so far against the reference policy (eval only).
    pub delta_bits_per_byte: Option<f64>,
    /// Standard error of that Δ (two compared batches or more).
    pub delta_stderr: Option<f64>,
    /// Compared batches behind the Δ.
    pub compared_batches: u64,
}

/// Static facts about the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Model name from its configuration.
    pub name: String,
    /// Total parameter count.
    pub parameters: u64,
    /// Where the model runs, in words (e.g. "CPU, 8 threads" or "CUDA:0 NVIDIA H200").
    pub device: String,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Block indices of the MoE layers, ascending.
    pub moe_layers: Vec<usize>,
    /// Experts per MoE layer (E).
    pub n_experts: usize,
    /// Hidden width of one expert.
    pub expert_hidden: usize,
    /// Residual stream width.
    pub d_model: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest sequence the model accepts.
    pub max_seq_len: usize,
    /// k of the compute-matched top-k baseline used for "compute saved vs top-k".
    pub top_k_baseline: usize,
    /// Always-on shared experts per MoE layer (Qwen2-MoE: 1), outside the routing.
    #[serde(default)]
    pub shared_experts: usize,
    /// FLOPs per token of the shared experts over all MoE layers: the same under every policy,
    /// part of the whole model's figures, never "saved".
    #[serde(default)]
    pub shared_expert_flops: f64,
    /// k of the model's own top-k rule, for a model trained with one (Hugging Face checkpoints).
    #[serde(default)]
    pub native_top_k: Option<usize>,
}

impl ModelInfo {
    /// How screens and reports name the top-k baseline of `k` experts: `native top-8` when it
    /// is the model's own rule, `top-8` otherwise.
    pub fn top_k_name(&self, k: usize) -> String {
        if self.native_top_k == Some(k) {
            format!("native top-{k}")
        } else {
            format!("top-{k}")
        }
    }
}

/// Which kind of workload drives the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadKind {
    /// Teacher-forced batches over a text (quality figures available).
    Eval,
    /// Autoregressive decoding with a KV cache from prompts.
    Generate,
}

/// A description of the workload, for display.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkloadInfo {
    /// Eval or generate.
    pub kind: WorkloadKind,
    /// Where the text or prompts come from (file path, "embedded held-out text", "built-in prompts").
    pub source: String,
    /// Bytes of text (eval) or number of prompts (generate) available.
    pub source_size: usize,
    /// Sequences per forward pass (eval), 1 for generate.
    pub batch: usize,
    /// Tokens per sequence (eval) or the longest sequence generated before starting a new prompt.
    pub seq_len: usize,
    /// Sampling temperature (generate only; 0 means greedy).
    pub temperature: Option<f32>,
    /// Random seed of the sampler or of the batch order.
    pub seed: u64,
    /// One-line description, e.g. "eval: 8 x 256 tokens over held-out.txt (1.2 MB)".
    pub description: String,
}

/// The routing policy of one MoE layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerPolicy {
    /// Block index of the MoE layer.
    pub layer: usize,
    /// Its policy.
    pub policy: RoutingPolicy,
}

/// Routing settings in force.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyState {
    /// One entry per MoE layer, in MoE slot order.
    pub layers: Vec<LayerPolicy>,
    /// Inference-time capacity factor, if any.
    pub capacity_factor: Option<f32>,
    /// Policy of the reference passes used for the quality comparison (Dense by default).
    pub reference: RoutingPolicy,
}

/// Everything measured in the current epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    /// Epoch number, starting at 0; incremented by every change of settings and every reset.
    pub id: u64,
    /// Why this epoch started (e.g. "start", "threshold of layer 3 set to 0.80", "reset").
    pub reason: String,
    /// Session time at which the epoch started, in seconds.
    pub started_at_s: f64,
    /// Seconds of wall time spent running in this epoch (paused time excluded).
    pub running_s: f64,
    /// Tokens processed in this epoch (reference passes excluded).
    pub tokens: u64,
    /// Forward passes in this epoch (reference passes excluded).
    pub forward_passes: u64,
    /// Tokens per second over the window (wall time, statistics included).
    pub tokens_per_second: f64,
    /// Tokens per second over the whole epoch.
    pub tokens_per_second_epoch: f64,
    /// Generate only: decoded (sampled) tokens per second over the window; prompt prefill excluded.
    pub decode_tokens_per_second: Option<f64>,
    /// Routing and FLOP figures over the last N tokens.
    pub window: RoutingStats,
    /// Routing and FLOP figures over the whole epoch.
    pub cumulative: RoutingStats,
    /// Latency and FLOP distributions over the whole epoch.
    pub histograms: Histograms,
    /// Quality of the current policy, and its difference to the reference policy.
    pub quality: QualityStats,
}

/// Routing and FLOP figures over a set of tokens (the window or the epoch).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoutingStats {
    /// Tokens covered.
    pub tokens: u64,
    /// Forward passes covered.
    pub forward_passes: u64,
    /// One entry per MoE layer, in MoE slot order.
    pub layers: Vec<LayerStatsSnapshot>,
    /// Mean experts per token over all MoE layers (policy selections, before capacity dropping).
    pub mean_experts_per_token: f64,
    /// FLOPs per token and compute saved.
    pub flops: FlopSummary,
}

impl RoutingStats {
    /// Mean experts per token of each MoE layer, in slot order.
    pub fn layer_mean_experts_per_token(&self) -> Vec<f64> {
        self.layers
            .iter()
            .map(|l| l.mean_experts_per_token)
            .collect()
    }
}

/// Routing figures of one MoE layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerStatsSnapshot {
    /// Block index of the layer.
    pub layer: usize,
    /// Its policy.
    pub policy: RoutingPolicy,
    /// The heatmap row: for each expert, the share of tokens whose selection includes it (0..=1).
    pub expert_token_share: Vec<f64>,
    /// For each expert, its mean gate weight per token (0 where not selected); the row sums to
    /// the mean selected probability mass.
    pub expert_gate_mass: Vec<f64>,
    /// `experts_per_token_counts[i]` = tokens that selected exactly `i + 1` experts; length E.
    pub experts_per_token_counts: Vec<u64>,
    /// Mean experts selected per token (before capacity dropping).
    pub mean_experts_per_token: f64,
    /// Mean experts kept per token (after capacity dropping; equals the above without a capacity factor).
    pub mean_kept_experts_per_token: f64,
    /// Mean of the highest router probability.
    pub mean_top1_prob: f64,
    /// How evenly the tokens spread over the experts.
    pub load_balance: LoadBalance,
    /// Experts no token selected, ascending.
    pub unused_experts: Vec<usize>,
    /// (token, expert) pairs dropped by the capacity limit.
    pub dropped_pairs: u64,
    /// Dropped pairs as a fraction of selected pairs.
    pub dropped_fraction: f64,
    /// Tokens whose every selected expert was dropped (residual only).
    pub tokens_fully_dropped: u64,
    /// This layer's MoE FLOPs (router + kept experts) as a fraction of running all E experts.
    pub moe_flops_fraction_of_all_experts: f64,
}

/// Load-balance figures of one layer, over the expert loads (selected pairs per expert).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadBalance {
    /// Coefficient of variation (population std / mean) of the loads; 0 = perfectly even.
    pub coefficient_of_variation: f64,
    /// Entropy of the load distribution divided by ln E; 1 = perfectly even (1 when E = 1).
    pub normalized_entropy: f64,
    /// Largest load divided by the mean load; 1 = perfectly even.
    pub max_over_mean: f64,
}

/// FLOPs of one token for the actual selections and the two baselines on the same tokens.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlopTriple {
    /// With the experts actually used (kept pairs).
    pub actual: f64,
    /// Every token through all E experts.
    pub all_experts: f64,
    /// Every token through the top-k baseline's k experts.
    pub top_k: f64,
}

impl FlopTriple {
    /// Percentage of the all-experts cost saved by the actual selections.
    pub fn saved_vs_all_experts_pct(&self) -> f64 {
        saved_pct(self.actual, self.all_experts)
    }

    /// Percentage of the top-k cost saved by the actual selections (negative when above top-k).
    pub fn saved_vs_top_k_pct(&self) -> f64 {
        saved_pct(self.actual, self.top_k)
    }
}

/// `100 * (1 - actual / baseline)`, 0 when the baseline is 0.
pub fn saved_pct(actual: f64, baseline: f64) -> f64 {
    if baseline > 0.0 {
        100.0 * (1.0 - actual / baseline)
    } else {
        0.0
    }
}

/// Mean FLOPs per token, MoE layers only and whole model, with compute saved against both baselines.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlopSummary {
    /// k of the top-k baseline.
    pub top_k: usize,
    /// All MoE layers together (routers + experts), per token.
    pub moe_per_token: FlopTriple,
    /// The whole model (attention, dense FFNs, MoE layers, LM head), per token.
    pub model_per_token: FlopTriple,
    /// MoE compute saved against all experts, percent.
    pub moe_saved_vs_all_experts_pct: f64,
    /// MoE compute saved against top-k, percent (negative when above top-k).
    pub moe_saved_vs_top_k_pct: f64,
    /// Whole-model compute saved against all experts, percent.
    pub model_saved_vs_all_experts_pct: f64,
    /// Whole-model compute saved against top-k, percent.
    pub model_saved_vs_top_k_pct: f64,
}

impl FlopSummary {
    /// Builds the summary (with the saved percentages) from the two triples.
    pub fn new(top_k: usize, moe_per_token: FlopTriple, model_per_token: FlopTriple) -> Self {
        Self {
            top_k,
            moe_per_token,
            model_per_token,
            moe_saved_vs_all_experts_pct: moe_per_token.saved_vs_all_experts_pct(),
            moe_saved_vs_top_k_pct: moe_per_token.saved_vs_top_k_pct(),
            model_saved_vs_all_experts_pct: model_per_token.saved_vs_all_experts_pct(),
            model_saved_vs_top_k_pct: model_per_token.saved_vs_top_k_pct(),
        }
    }
}

/// Distributions over the current epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Histograms {
    /// Per-token latency in microseconds (eval: pass time / tokens, recorded once per token;
    /// generate: time of each decode step). Prompt prefill and reference passes excluded.
    pub token_latency_us: HistogramSnapshot,
    /// Per forward pass latency in microseconds (reference passes excluded).
    pub forward_latency_us: HistogramSnapshot,
    /// MoE FLOPs of each token (all MoE layers together).
    pub token_moe_flops: HistogramSnapshot,
    /// Per block, time of its parts in each forward pass, microseconds.
    pub layer_time_us: Vec<LayerTimeHistograms>,
}

/// Time of one block's parts per forward pass.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerTimeHistograms {
    /// Block index.
    pub layer: usize,
    /// True for MoE blocks (the router histogram is empty for dense blocks).
    pub is_moe: bool,
    /// Norm + attention.
    pub attention_us: HistogramSnapshot,
    /// Router logits and routing policy.
    pub router_us: HistogramSnapshot,
    /// Experts (MoE blocks) or the dense FFN.
    pub ffn_us: HistogramSnapshot,
}

/// How bucket edges are spaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BucketScale {
    /// Equal widths.
    Linear,
    /// Equal ratios (chosen when max / min is 20 or more).
    Log,
}

/// A plain, serialisable histogram: bucket edges and counts, with exact summary figures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistogramSnapshot {
    /// Unit of the values ("us", "FLOPs").
    pub unit: String,
    /// Number of recorded values.
    pub count: u64,
    /// Smallest value (0 when empty).
    pub min: f64,
    /// Mean value (0 when empty).
    pub mean: f64,
    /// Median (within the histogram's 1% precision).
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest value.
    pub max: f64,
    /// Spacing of the bucket edges.
    pub scale: BucketScale,
    /// `counts.len() + 1` ascending edges; bucket `i` holds values in `[edges[i], edges[i+1])`,
    /// the last bucket includes its upper edge. Empty when nothing was recorded.
    pub edges: Vec<f64>,
    /// Values per bucket.
    pub counts: Vec<u64>,
}

/// Exact figures kept beside an HDR histogram (its own min/max/mean are rounded to its precision).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct ExactSummary {
    /// Smallest recorded value.
    pub min: u64,
    /// Largest recorded value.
    pub max: u64,
    /// Sum of recorded values (each counted as often as recorded).
    pub sum: u128,
}

impl HistogramSnapshot {
    /// An empty histogram in `unit`.
    pub fn empty(unit: &str) -> Self {
        Self {
            unit: unit.to_string(),
            count: 0,
            min: 0.0,
            mean: 0.0,
            p50: 0.0,
            p90: 0.0,
            p99: 0.0,
            max: 0.0,
            scale: BucketScale::Linear,
            edges: Vec::new(),
            counts: Vec::new(),
        }
    }

    /// Converts an HDR histogram of integer values into at most `n_buckets` buckets, each value
    /// multiplied by `scale` (e.g. 1e-3 for nanoseconds to microseconds). `exact` supplies the
    /// true min, max and sum; percentiles come from the HDR histogram and are clamped to
    /// `[min, max]`.
    pub fn from_hdr(
        hist: &Histogram<u64>,
        exact: ExactSummary,
        n_buckets: usize,
        scale: f64,
        unit: &str,
    ) -> Self {
        let count = hist.len();
        if count == 0 || n_buckets == 0 {
            return Self::empty(unit);
        }
        let (lo, hi) = (exact.min as f64 * scale, exact.max as f64 * scale);
        let q = |x: f64| (hist.value_at_quantile(x) as f64 * scale).clamp(lo, hi);
        let bucket_scale = if lo > 0.0 && hi / lo >= 20.0 {
            BucketScale::Log
        } else {
            BucketScale::Linear
        };
        let edges: Vec<f64> = if hi <= lo {
            vec![lo, hi]
        } else {
            (0..=n_buckets)
                .map(|i| {
                    let f = i as f64 / n_buckets as f64;
                    match bucket_scale {
                        BucketScale::Linear => lo + f * (hi - lo),
                        BucketScale::Log => lo * (hi / lo).powf(f),
                    }
                })
                .collect()
        };
        let nb = edges.len() - 1;
        let mut counts = vec![0u64; nb];
        for v in hist.iter_recorded() {
            // The representative of an HDR bucket: its median equivalent value, clamped into the range.
            let x = (hist.median_equivalent(v.value_iterated_to()) as f64 * scale).clamp(lo, hi);
            let i = edges[1..nb].partition_point(|&e| e <= x);
            counts[i] += v.count_at_value();
        }
        Self {
            unit: unit.to_string(),
            count,
            min: lo,
            mean: exact.sum as f64 * scale / count as f64,
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            max: hi,
            scale: bucket_scale,
            edges,
            counts,
        }
    }
}

/// Quality of the current policy over the epoch (eval workload only).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QualityStats {
    /// Next-token predictions scored (one per input token that has a following token).
    pub scored_tokens: u64,
    /// Bits of the current policy per byte of text (cross-entropy in bits / bytes), over the epoch.
    pub bits_per_byte: Option<f64>,
    /// Per-token perplexity, `exp(mean cross-entropy in nats)`.
    pub perplexity: Option<f64>,
    /// Reference policy (Dense by default).
    pub reference_policy: RoutingPolicy,
    /// Batches also run under the reference policy.
    pub reference_batches: u64,
    /// Tokens scored in those batches.
    pub reference_scored_tokens: u64,
    /// Bits per byte of the reference policy on the compared batches.
    pub reference_bits_per_byte: Option<f64>,
    /// Bits per byte of the current policy on the same compared batches.
    pub compared_bits_per_byte: Option<f64>,
    /// `compared_bits_per_byte - reference_bits_per_byte` (positive = current policy is worse).
    pub delta_bits_per_byte: Option<f64>,
    /// Standard error of `delta_bits_per_byte` over the compared batches (the batches are the
    /// sampled units); `None` below two batches.
    #[serde(default)]
    pub delta_bits_per_byte_stderr: Option<f64>,
    /// Mean KL(reference || current) of next-token distributions, in bits per token.
    pub mean_kl_bits: Option<f64>,
    /// Wall time spent in reference passes, seconds (not in the latency statistics).
    pub reference_time_s: f64,
    /// Reference time as a fraction of all forward time in the epoch.
    pub reference_time_fraction: f64,
}

/// A short summary of a finished epoch, kept for comparison with the current one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochSummary {
    /// Epoch number.
    pub id: u64,
    /// Why it started.
    pub reason: String,
    /// Settings in force during it.
    pub policy: PolicyState,
    /// Tokens processed.
    pub tokens: u64,
    /// Seconds of running time.
    pub running_s: f64,
    /// Tokens per second over the epoch.
    pub tokens_per_second: f64,
    /// Mean experts per token over all MoE layers.
    pub mean_experts_per_token: f64,
    /// Mean experts per token of each MoE layer, in MoE slot order.
    pub layer_mean_experts_per_token: Vec<f64>,
    /// FLOPs and compute saved over the epoch.
    pub flops: FlopSummary,
    /// Per-token latency median, microseconds.
    pub token_latency_p50_us: f64,
    /// Per-token latency 99th percentile, microseconds.
    pub token_latency_p99_us: f64,
    /// Bits per byte of the policy (eval only).
    pub bits_per_byte: Option<f64>,
    /// Difference to the reference policy in bits per byte.
    pub delta_bits_per_byte: Option<f64>,
}

/// Where the device counters came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceBackend {
    /// NVIDIA Management Library; GPU counters are present.
    Nvml,
    /// No usable NVML: only this process's CPU use and memory.
    ProcessOnly,
}

/// Counters of one GPU; a counter the driver does not report is `None`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuCounters {
    /// NVML device index.
    pub index: u32,
    /// Product name.
    pub name: String,
    /// GPU utilisation over the last sample period, percent.
    pub utilization_pct: Option<u32>,
    /// Memory in use, bytes.
    pub memory_used_bytes: Option<u64>,
    /// Total memory, bytes.
    pub memory_total_bytes: Option<u64>,
    /// Power draw, watts.
    pub power_watts: Option<f64>,
    /// Core temperature, degrees Celsius.
    pub temperature_c: Option<u32>,
    /// SM clock, MHz.
    pub sm_clock_mhz: Option<u32>,
}

/// CPU use and memory of this process.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct ProcessCounters {
    /// CPU time used over the last sample period, as a percentage of one core (may exceed 100).
    pub cpu_pct: Option<f64>,
    /// Resident memory, bytes.
    pub rss_bytes: Option<u64>,
    /// Of the resident memory, the pages of mapped files (`RssFile`): experts read in place
    /// from a model's files live there, and the kernel can drop and reread them; absent in
    /// reports written before this field.
    #[serde(default)]
    pub rss_file_bytes: Option<u64>,
    /// Logical CPUs available to the process.
    pub cpus: usize,
}

/// One point of the device history, for sparklines.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceHistoryPoint {
    /// Seconds since the sampler started.
    pub t_s: f64,
    /// Utilisation of each GPU, percent (empty without NVML).
    pub gpu_utilization_pct: Vec<Option<u32>>,
    /// Memory used on each GPU, bytes (empty without NVML).
    pub gpu_memory_used_bytes: Vec<Option<u64>>,
    /// Process CPU use, percent of one core.
    pub process_cpu_pct: Option<f64>,
    /// Process resident memory, bytes.
    pub process_rss_bytes: Option<u64>,
}

/// Latest device counters with a short history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceSnapshot {
    /// NVML or process-only.
    pub backend: DeviceBackend,
    /// A plain note for the user, e.g. "no NVIDIA driver found: showing this process's CPU and memory".
    pub note: Option<String>,
    /// NVIDIA driver version (NVML only).
    pub driver_version: Option<String>,
    /// Latest counters of each GPU (empty without NVML).
    pub gpus: Vec<GpuCounters>,
    /// Latest counters of this process (always sampled).
    pub process: ProcessCounters,
    /// Sample period, seconds.
    pub sample_period_s: f64,
    /// Recent samples, oldest first (bounded length).
    pub history: Vec<DeviceHistoryPoint>,
}

impl DeviceSnapshot {
    /// The state before the sampler has produced anything.
    pub fn not_sampled() -> Self {
        Self {
            backend: DeviceBackend::ProcessOnly,
            note: Some("device counters not sampled yet".to_string()),
            driver_version: None,
            gpus: Vec::new(),
            process: ProcessCounters::default(),
            sample_period_s: 0.0,
            history: Vec::new(),
        }
    }
}

/// Whether a token of the generated stream came from the prompt or from the sampler.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenOrigin {
    /// Part of the prompt (routed during prefill).
    Prompt,
    /// Sampled by the model.
    Generated,
}

/// One token of the generate stream with the experts it used.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GeneratedToken {
    /// Token id (the byte value for a byte tokenizer).
    pub token: u32,
    /// What the token decodes to (its byte for a byte tokenizer; possibly part of a UTF-8
    /// character).
    #[serde(default)]
    pub bytes: Vec<u8>,
    /// Prompt or generated.
    pub origin: TokenOrigin,
    /// Which prompt run (sequence) the token belongs to; a new sequence starts at each prompt.
    pub sequence: u64,
    /// Experts selected for this token in each MoE layer, in MoE slot order.
    pub experts_per_layer: Vec<u16>,
    /// Mean of `experts_per_layer`.
    pub mean_experts: f32,
}

/// The recent generate stream (bounded; oldest tokens are dropped first).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct GeneratedText {
    /// Tokens, oldest first.
    pub tokens: Vec<GeneratedToken>,
    /// Tokens dropped from the front to bound the length.
    pub dropped_tokens: u64,
}

impl GeneratedText {
    /// The stream as text (the tokens' bytes decoded as UTF-8, invalid sequences replaced), one
    /// string per sequence.
    pub fn text_by_sequence(&self) -> Vec<(u64, String)> {
        let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
        for t in &self.tokens {
            match out.last_mut() {
                Some((s, bytes)) if *s == t.sequence => bytes.extend_from_slice(&t.bytes),
                _ => out.push((t.sequence, t.bytes.clone())),
            }
        }
        out.into_iter()
            .map(|(s, b)| (s, String::from_utf8_lossy(&b).into_owned()))
            .collect()
    }
}

impl Snapshot {
    /// The MoE slot of block `layer`, if it is an MoE layer.
    pub fn moe_slot(&self, layer: usize) -> Option<usize> {
        self.model.moe_layers.iter().position(|&l| l == layer)
    }

    /// Serialises to pretty JSON.
    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("a snapshot always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact_of(values: &[u64]) -> ExactSummary {
        ExactSummary {
            min: *values.iter().min().unwrap(),
            max: *values.iter().max().unwrap(),
            sum: values.iter().map(|&v| v as u128).sum(),
        }
    }

    #[test]
    fn histogram_of_one_to_hundred() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 1_000_000, 2).unwrap();
        let values: Vec<u64> = (1..=100).collect();
        for &v in &values {
            h.record(v).unwrap();
        }
        let s = HistogramSnapshot::from_hdr(&h, exact_of(&values), 10, 1.0, "us");
        assert_eq!(s.count, 100);
        assert_eq!((s.min, s.max), (1.0, 100.0));
        assert_eq!(s.p50, 50.0);
        assert_eq!(s.p90, 90.0);
        assert_eq!(s.p99, 99.0);
        assert!((s.mean - 50.5).abs() < 1e-12);
        // max / min = 100 -> log buckets.
        assert_eq!(s.scale, BucketScale::Log);
        assert_eq!(s.edges.len(), 11);
        assert_eq!(s.counts.iter().sum::<u64>(), 100);
        assert_eq!(s.edges[0], 1.0);
        assert!((s.edges[10] - 100.0).abs() < 1e-9);
        // Log edges 10^(0.2 i): the first bucket [1, 1.585) holds only the value 1.
        assert_eq!(s.counts[0], 1);
        // The last bucket [63.1, 100] holds 64..=100.
        assert_eq!(s.counts[9], 37);
    }

    #[test]
    fn linear_buckets_and_scaling() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 1_000_000, 2).unwrap();
        // 1000 ns x 3, 2000 ns x 1.
        let values = [1000u64, 1000, 1000, 2000];
        for &v in &values {
            h.record(v).unwrap();
        }
        let s = HistogramSnapshot::from_hdr(&h, exact_of(&values), 4, 1e-3, "us");
        assert_eq!(s.scale, BucketScale::Linear);
        assert_eq!(s.edges, vec![1.0, 1.25, 1.5, 1.75, 2.0]);
        assert_eq!(s.counts, vec![3, 0, 0, 1]);
        assert!((s.p50 - 1.0).abs() < 0.01);
        assert_eq!(s.max, 2.0);
        assert!((s.mean - 1.25).abs() < 1e-12);
    }

    #[test]
    fn single_value_and_empty() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 1_000_000, 2).unwrap();
        let s = HistogramSnapshot::from_hdr(&h, ExactSummary::default(), 8, 1.0, "FLOPs");
        assert_eq!(s, HistogramSnapshot::empty("FLOPs"));
        h.record_n(42, 5).unwrap();
        let s = HistogramSnapshot::from_hdr(&h, exact_of(&[42; 5]), 8, 1.0, "FLOPs");
        assert_eq!(s.edges, vec![42.0, 42.0]);
        assert_eq!(s.counts, vec![5]);
        assert_eq!((s.p50, s.p99, s.max), (42.0, 42.0, 42.0));
    }

    #[test]
    fn saved_percentages() {
        let t = FlopTriple {
            actual: 25.0,
            all_experts: 100.0,
            top_k: 20.0,
        };
        assert_eq!(t.saved_vs_all_experts_pct(), 75.0);
        assert_eq!(t.saved_vs_top_k_pct(), -25.0);
        assert_eq!(saved_pct(1.0, 0.0), 0.0);
    }

    #[test]
    fn generated_text_splits_by_sequence() {
        let tok = |b: u8, s: u64| GeneratedToken {
            token: b as u32,
            bytes: vec![b],
            origin: TokenOrigin::Generated,
            sequence: s,
            experts_per_layer: vec![1],
            mean_experts: 1.0,
        };
        let g = GeneratedText {
            tokens: vec![tok(b'h', 0), tok(b'i', 0), tok(0xff, 1), tok(b'!', 1)],
            dropped_tokens: 0,
        };
        assert_eq!(
            g.text_by_sequence(),
            vec![(0, "hi".to_string()), (1, "\u{fffd}!".to_string())]
        );
    }
}
