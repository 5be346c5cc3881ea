//! Per-layer threshold tuning: the thresholds that spend the fewest MoE FLOPs while the quality
//! stays within a budget against the reference policy.
//!
//! Greedy coordinate descent on a grid of thresholds. Every layer starts at the best uniform
//! threshold (the lowest-FLOP single threshold within the budget), so the result never spends
//! more than one global threshold would; each round takes, among the one-grid-step lowerings of a
//! layer's threshold that stay within the budget on the search tokens, the one that saves the
//! most MoE FLOPs per unit of quality lost. A layer whose next step broke the budget is frozen
//! (its later steps would only cost more, as the other layers' thresholds only fall).
//!
//! [`SearchMode::Exhaustive`] measures every layer's step in every round: rounds x layers passes,
//! too many for a model of 30-60 MoE layers. [`SearchMode::Lazy`] (the default) keeps each step's
//! score from when it was last measured and re-measures only the best-ranked stale ones until
//! the best-ranked step is fresh (lazy greedy): a step's score changes little when another layer
//! moves, so a round costs a few passes instead of one per layer. The result is
//! then measured on verification tokens that the search never saw, beside the best uniform
//! threshold chosen by the same budget on the same search tokens, so the comparison is fair.

use std::time::Instant;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::model::forward::{Model, RoutingConfig};
use crate::model::trace::ForwardTrace;
use crate::profiling::flops::FlopModel;
use crate::profiling::stats::{DeltaSums, cross_entropy_nats, kl_nats};
use crate::routing::RoutingPolicy;

/// What "within budget" means.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Budget {
    /// Bits per byte may exceed the reference's by at most this fraction of it (`--budget 1%`).
    RelativeBitsPerByte(f64),
    /// Bits per byte may exceed the reference's by at most this many bits (`--budget 0.01`).
    AbsoluteBitsPerByte(f64),
    /// Mean KL(reference || policy) of next-token distributions, bits per token (`--kl 0.01`).
    KlBits(f64),
}

impl Budget {
    /// Parses `--budget`: `1%` (relative to the reference's bits per byte) or `0.01` (bits per
    /// byte).
    pub fn parse_budget(s: &str) -> Result<Self> {
        let s = s.trim();
        let (num, relative) = match s.strip_suffix('%') {
            Some(n) => (n.trim(), true),
            None => (s, false),
        };
        let v: f64 = num
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "--budget `{s}`: expected a non-negative number of bits per byte (0.01) or a percentage of the reference's (1%)"
                )
            })?;
        Ok(if relative {
            Self::RelativeBitsPerByte(v / 100.0)
        } else {
            Self::AbsoluteBitsPerByte(v)
        })
    }

    /// The budget in words.
    pub fn describe(&self) -> String {
        match *self {
            Self::RelativeBitsPerByte(f) => {
                format!("bits/byte at most {}% above the reference", 100.0 * f)
            }
            Self::AbsoluteBitsPerByte(d) => format!("bits/byte at most {d} above the reference"),
            Self::KlBits(k) => format!("mean KL to the reference at most {k} bits/token"),
        }
    }

    /// The quantity the budget limits, for an evaluation against a reference of `ref_bpb`.
    fn cost(&self, e: &Evaluation, ref_bpb: f64) -> f64 {
        match self {
            Self::RelativeBitsPerByte(_) => e.delta_bits_per_byte / ref_bpb,
            Self::AbsoluteBitsPerByte(_) => e.delta_bits_per_byte,
            Self::KlBits(_) => e.mean_kl_bits.unwrap_or(f64::INFINITY),
        }
    }

    fn limit(&self) -> f64 {
        match *self {
            Self::RelativeBitsPerByte(v) | Self::AbsoluteBitsPerByte(v) | Self::KlBits(v) => v,
        }
    }
}

/// One policy (uniform or per layer) measured on a set of tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// A label: "t=0.9", "top-2", or the per-layer thresholds in `--threshold` syntax.
    pub label: String,
    /// The policy of each MoE layer, in MoE slot order.
    pub policies: Vec<RoutingPolicy>,
    /// Bits per byte of next-token prediction.
    pub bits_per_byte: f64,
    /// Bits per byte minus the reference's on the same tokens.
    pub delta_bits_per_byte: f64,
    /// Standard error of the difference over the batches (the sampled units); 0 below 2 batches.
    pub delta_bits_per_byte_stderr: f64,
    /// Mean KL(reference || this policy), bits per token; measured only for a KL budget (it
    /// needs the reference's logits of every batch kept in memory).
    pub mean_kl_bits: Option<f64>,
    /// MoE FLOPs (routers and kept experts) as a fraction of running all experts.
    pub moe_flops_fraction: f64,
    /// Mean experts per token over the MoE layers.
    pub mean_experts_per_token: f64,
    /// Mean experts per token of each MoE layer.
    pub layer_experts_per_token: Vec<f64>,
}

/// What to tune and on which grid.
#[derive(Clone, Debug)]
pub struct TuneSpec {
    /// Candidate thresholds, ascending; every layer starts at the best uniform one.
    pub grid: Vec<f32>,
    /// The quality budget.
    pub budget: Budget,
    /// The quality reference (None: the model's native rule, else Dense).
    pub reference: Option<RoutingPolicy>,
    /// k values of the top-k points on the frontier.
    pub top_k: Vec<usize>,
    /// Renormalise the threshold weights (None: as the model's native rule).
    pub renormalize: Option<bool>,
    /// How each round of the descent finds its step.
    pub search: SearchMode,
}

/// How each round of the greedy descent finds the step it takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SearchMode {
    /// Re-measure only the best-ranked steps whose score is stale (lazy greedy).
    #[default]
    Lazy,
    /// Measure every layer's step in every round.
    Exhaustive,
}

impl std::str::FromStr for SearchMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lazy" => Ok(Self::Lazy),
            "exhaustive" => Ok(Self::Exhaustive),
            _ => Err(format!("expected lazy or exhaustive, found `{s}`")),
        }
    }
}

/// The threshold grid `xmoe-top tune` and the UI's quick tune search by default.
pub const DEFAULT_GRID: &str = "0.5:1.0:0.05";

/// Search tokens, and as many verification tokens, that both take by default.
pub const DEFAULT_TOKENS: usize = 4096;

/// Cuts `encoded` into `n_search` search batches and, after them, `n_verify` verification
/// batches of `batch` windows of `seq_len` tokens: the verification never sees a search token.
pub fn search_and_verify(
    encoded: &crate::workload::tokenizer::Encoded,
    batch: usize,
    seq_len: usize,
    n_search: usize,
    n_verify: usize,
) -> Result<(TokenSet, TokenSet)> {
    let (mut batches, mut bytes) = super::sweep::token_batches(
        encoded,
        batch,
        seq_len,
        (n_search + n_verify) * batch * seq_len,
    )?;
    let verify = TokenSet {
        batches: batches.split_off(n_search),
        bytes: bytes.split_off(n_search),
    };
    Ok((TokenSet { batches, bytes }, verify))
}

/// What the search reports while it runs.
#[derive(Clone, Copy, Debug)]
pub enum TuneProgress<'a> {
    /// A line for the user: the reference, then each accepted step.
    Line(&'a str),
    /// Another forward pass finished; the count so far (search and verification).
    Pass(usize),
}

/// The tokens of one side of the split.
#[derive(Clone, Debug)]
pub struct TokenSet {
    /// Batches of `batch` windows of `seq_len + 1` token ids.
    pub batches: Vec<Vec<u32>>,
    /// Bytes of text that each batch's targets cover.
    pub bytes: Vec<u64>,
}

/// A finished tuning run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuneResult {
    /// Model name.
    pub model: String,
    /// Block indices of the MoE layers.
    pub moe_layers: Vec<usize>,
    /// Experts per MoE layer.
    pub n_experts: usize,
    /// The budget.
    pub budget: Budget,
    /// The reference policy.
    pub reference_policy: RoutingPolicy,
    /// The threshold grid.
    pub grid: Vec<f32>,
    /// Tokens used by the search.
    pub search_tokens: u64,
    /// Tokens used only for verification.
    pub verify_tokens: u64,
    /// Where the tokens came from.
    pub source: String,
    /// Reference bits per byte on the search tokens.
    pub reference_bits_per_byte_search: f64,
    /// Reference bits per byte on the verification tokens.
    pub reference_bits_per_byte_verify: f64,
    /// Uniform thresholds on the search tokens (the grid, ascending).
    pub uniform: Vec<Evaluation>,
    /// Top-k points on the search tokens.
    pub top_k: Vec<Evaluation>,
    /// Accepted steps of the search, from the start (every layer at the best uniform threshold).
    pub path: Vec<Evaluation>,
    /// The tuned per-layer thresholds on the search tokens (the last step of `path`).
    pub tuned: Evaluation,
    /// The lowest-FLOP uniform threshold within the budget on the search tokens, if any.
    pub best_uniform: Option<Evaluation>,
    /// The tuned thresholds on the verification tokens.
    pub tuned_verify: Evaluation,
    /// The best uniform threshold on the verification tokens.
    pub best_uniform_verify: Option<Evaluation>,
    /// Whether the tuned thresholds kept the budget on the verification tokens.
    pub tuned_within_budget_on_verify: bool,
    /// Whether the best uniform threshold kept the budget on the verification tokens.
    pub best_uniform_within_budget_on_verify: bool,
    /// How the descent found its steps.
    #[serde(default)]
    pub search: SearchMode,
    /// Forward passes over the search tokens' batches that the search ran.
    pub evaluations: usize,
    /// Wall time, seconds.
    pub elapsed_s: f64,
}

impl TuneResult {
    /// The tuned thresholds in the `--threshold` syntax (block index : threshold).
    pub fn threshold_arg(&self) -> String {
        threshold_arg(&self.moe_layers, &self.tuned.policies)
    }
}

/// Per-layer thresholds in the `--threshold` syntax; a single value when all layers agree.
pub fn threshold_arg(moe_layers: &[usize], policies: &[RoutingPolicy]) -> String {
    let ts: Vec<f32> = policies
        .iter()
        .map(|p| match p {
            RoutingPolicy::Threshold { t, .. } => *t,
            _ => f32::NAN,
        })
        .collect();
    let fmt = |t: f32| crate::units::trim_float(t as f64, 3);
    if ts.windows(2).all(|w| w[0] == w[1]) && !ts.is_empty() {
        return fmt(ts[0]);
    }
    moe_layers
        .iter()
        .zip(&ts)
        .map(|(l, &t)| format!("{l}:{}", fmt(t)))
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs a policy over a token set and scores it against cached reference figures.
struct Evaluator<'a> {
    model: &'a Model,
    batch: usize,
    window: usize,
    flops: FlopModel,
    trace: ForwardTrace,
    inputs: Vec<u32>,
    targets: Vec<u32>,
    passes: usize,
    /// Every forward pass, the references' included: what progress counts.
    all_passes: usize,
    progress: &'a mut dyn FnMut(TuneProgress<'_>) -> Result<()>,
}

/// The reference's per-batch cross-entropy and (for a KL budget) logits on one token set.
struct ReferenceRun {
    nats: Vec<f64>,
    logits: Vec<Vec<f32>>,
    bits_per_byte: f64,
}

impl<'a> Evaluator<'a> {
    fn forward(&mut self, routing: &RoutingConfig) -> Result<Vec<f32>> {
        let l = self
            .model
            .forward(&self.inputs, self.batch, routing, None, &mut self.trace)?;
        self.all_passes += 1;
        (self.progress)(TuneProgress::Pass(self.all_passes))?;
        Ok(l)
    }

    fn line(&mut self, line: &str) -> Result<()> {
        (self.progress)(TuneProgress::Line(line))
    }

    fn split(&mut self, tokens: &[u32]) {
        let seq = self.window - 1;
        self.inputs.clear();
        self.targets.clear();
        for w in tokens.chunks_exact(self.window) {
            self.inputs.extend_from_slice(&w[..seq]);
            self.targets.extend_from_slice(&w[1..]);
        }
    }

    fn reference(
        &mut self,
        set: &TokenSet,
        policy: RoutingPolicy,
        keep_logits: bool,
    ) -> Result<ReferenceRun> {
        let n_moe = self.model.moe_layers().len();
        let routing = RoutingConfig::uniform(policy, n_moe, self.model.config().n_experts)?;
        let vocab = self.model.config().vocab_size;
        let (mut nats, mut logits) = (Vec::new(), Vec::new());
        for b in &set.batches {
            self.split(b);
            let l = self.forward(&routing)?;
            nats.push(cross_entropy_nats(&l, vocab, &self.targets));
            if keep_logits {
                logits.push(l);
            }
        }
        let bytes: u64 = set.bytes.iter().sum();
        let bits_per_byte = nats.iter().sum::<f64>() / std::f64::consts::LN_2 / bytes as f64;
        Ok(ReferenceRun {
            nats,
            logits,
            bits_per_byte,
        })
    }

    fn evaluate(
        &mut self,
        set: &TokenSet,
        reference: &ReferenceRun,
        policies: &[RoutingPolicy],
        label: String,
    ) -> Result<Evaluation> {
        let cfg = self.model.config();
        let (vocab, n_experts) = (cfg.vocab_size, cfg.n_experts);
        let routing = RoutingConfig::new(policies, None, n_experts)?;
        let n_moe = policies.len();
        let mut nats_total = 0.0;
        // Δ and its standard error exactly as the live statistics compute them.
        let mut deltas = DeltaSums::default();
        let (mut kl, mut kl_tokens) = (0.0, 0u64);
        let mut selected = vec![0u64; n_moe];
        let (mut moe_flops, mut tokens) = (0u128, 0u64);
        for (i, b) in set.batches.iter().enumerate() {
            self.split(b);
            let l = self.forward(&routing)?;
            self.passes += 1;
            let nats = cross_entropy_nats(&l, vocab, &self.targets);
            nats_total += nats;
            deltas.add(
                (nats - reference.nats[i]) / std::f64::consts::LN_2,
                set.bytes[i] as f64,
            );
            if let Some(r) = reference.logits.get(i) {
                kl += kl_nats(r, &l, vocab);
                kl_tokens += self.targets.len() as u64;
            }
            let n = self.trace.tokens();
            tokens += n as u64;
            for (slot, m) in self.trace.moe.iter().enumerate().take(n_moe) {
                for t in 0..m.routing.tokens() {
                    selected[slot] += m.routing.selected(t) as u64;
                    let kept = m.routing.choices(t).filter(|c| c.2).count();
                    moe_flops += self.flops.moe_layer(kept) as u128;
                }
            }
        }
        let bytes: u64 = set.bytes.iter().sum();
        let bits_per_byte = nats_total / std::f64::consts::LN_2 / bytes as f64;
        let all = tokens as f64 * n_moe as f64 * self.flops.moe_layer_all_experts() as f64;
        Ok(Evaluation {
            label,
            policies: policies.to_vec(),
            bits_per_byte,
            delta_bits_per_byte: bits_per_byte - reference.bits_per_byte,
            delta_bits_per_byte_stderr: deltas.stderr().unwrap_or(0.0),
            mean_kl_bits: (kl_tokens > 0).then(|| kl / kl_tokens as f64 / std::f64::consts::LN_2),
            moe_flops_fraction: if all > 0.0 {
                moe_flops as f64 / all
            } else {
                0.0
            },
            mean_experts_per_token: selected.iter().sum::<u64>() as f64
                / (tokens as f64 * n_moe as f64).max(1.0),
            layer_experts_per_token: selected
                .iter()
                .map(|&s| s as f64 / (tokens as f64).max(1.0))
                .collect(),
        })
    }
}

/// ", KL 0.0123 bits/token" when the KL was measured, else nothing.
pub fn kl_text(kl: Option<f64>) -> String {
    kl.map_or(String::new(), |k| format!(", KL {k:.4} bits/token"))
}

/// Tunes per-layer thresholds on `search` and verifies them on `verify` (disjoint tokens).
/// `progress` hears of every step and pass; an error it returns ends the search with that error
/// (how a caller cancels).
pub fn tune(
    model: &Model,
    batch: usize,
    search: &TokenSet,
    verify: &TokenSet,
    source: &str,
    spec: &TuneSpec,
    progress: &mut dyn FnMut(TuneProgress<'_>) -> Result<()>,
) -> Result<TuneResult> {
    let started = Instant::now();
    let cfg = model.config();
    let moe_layers = model.moe_layers().to_vec();
    let n_moe = moe_layers.len();
    if n_moe == 0 {
        bail!("the model has no MoE layers: there are no thresholds to tune");
    }
    if spec.grid.is_empty() {
        bail!("the threshold grid is empty");
    }
    if search.batches.is_empty() || verify.batches.is_empty() {
        bail!("tuning needs both search and verification tokens");
    }
    let window = search.batches[0].len() / batch;
    let renormalize = spec
        .renormalize
        .unwrap_or(cfg.default_policy.renormalizes());
    let reference_policy = spec
        .reference
        .unwrap_or(super::native_reference(cfg.default_policy));
    let keep_logits = matches!(spec.budget, Budget::KlBits(_));
    if keep_logits {
        let per_set = |s: &TokenSet| s.batches.len() * batch * (window - 1) * cfg.vocab_size * 4;
        let bytes = per_set(search).max(per_set(verify));
        if bytes > 1 << 30 {
            bail!(
                "--kl keeps the reference's logits of every batch: {} MiB for these tokens and a vocabulary of {}; use fewer --tokens",
                bytes >> 20,
                cfg.vocab_size
            );
        }
    }
    let mut ev = Evaluator {
        model,
        batch,
        window,
        flops: FlopModel::new(cfg),
        trace: ForwardTrace::default(),
        inputs: Vec::new(),
        targets: Vec::new(),
        passes: 0,
        all_passes: 0,
        progress,
    };
    let thr = |t: f32| RoutingPolicy::threshold(t).with_renormalize(renormalize);
    let label_of = |p: &[RoutingPolicy]| threshold_arg(&moe_layers, p);
    let reference = ev.reference(search, reference_policy, keep_logits)?;
    let ref_bpb = reference.bits_per_byte;
    let budget = spec.budget;
    let within = |e: &Evaluation| budget.cost(e, ref_bpb) <= budget.limit();
    ev.line(&format!(
        "reference {}: {ref_bpb:.4} bits/byte on {} search tokens",
        crate::profiling::sweep::policy_label(&reference_policy),
        search.batches.len() * batch * (window - 1)
    ))?;

    // The frontier of one global threshold, and top-k.
    let mut uniform = Vec::new();
    for &t in &spec.grid {
        let p = vec![thr(t); n_moe];
        uniform.push(ev.evaluate(search, &reference, &p, format!("t={}", label_of(&p)))?);
    }
    let mut top_k = Vec::new();
    for &k in &spec.top_k {
        let p = vec![RoutingPolicy::TopK { k, renormalize }; n_moe];
        top_k.push(ev.evaluate(search, &reference, &p, format!("top-{k}"))?);
    }
    let best_uniform = uniform
        .iter()
        .filter(|e| within(e))
        .min_by(|a, b| a.moe_flops_fraction.total_cmp(&b.moe_flops_fraction))
        .cloned();

    // Greedy descent from the best uniform threshold, so the result never spends more than it.
    let top = spec.grid.len() - 1;
    let Some(start_t) = best_uniform.as_ref().map(|b| match b.policies[0] {
        RoutingPolicy::Threshold { t, .. } => t,
        _ => spec.grid[top],
    }) else {
        let e = &uniform[top];
        bail!(
            "no threshold of the grid is within the budget, not even t={} on every layer ({}: {:+.4} bits/byte{}): raise the budget or the grid's top",
            spec.grid[top],
            budget.describe(),
            e.delta_bits_per_byte,
            kl_text(e.mean_kl_bits)
        );
    };
    let start_i = spec.grid.iter().position(|&t| t == start_t).unwrap_or(top);
    let mut idx = vec![start_i; n_moe];
    let policies =
        |idx: &[usize]| -> Vec<RoutingPolicy> { idx.iter().map(|&i| thr(spec.grid[i])).collect() };
    let mut current = best_uniform.clone().expect("checked above");
    let mut path = vec![current.clone()];
    let mut frozen = vec![false; n_moe];
    // Lazy mode: each layer's step score when last measured (unmeasured: +inf, so it is
    // measured before any finite score is trusted) and the measurement, while it is current.
    let mut stale = vec![f64::INFINITY; n_moe];
    let mut fresh: Vec<Option<Evaluation>> = vec![None; n_moe];
    let score_of = |e: &Evaluation, current: &Evaluation| {
        let saved = current.moe_flops_fraction - e.moe_flops_fraction;
        let lost = budget.cost(e, ref_bpb) - budget.cost(current, ref_bpb);
        // A step that saves FLOPs at no quality cost ranks above every other.
        if lost <= 0.0 {
            f64::INFINITY
        } else {
            saved / lost
        }
    };
    loop {
        let open = |slot: usize, frozen: &[bool], idx: &[usize]| !frozen[slot] && idx[slot] > 0;
        let step = match spec.search {
            SearchMode::Exhaustive => {
                let mut best: Option<(f64, usize, Evaluation)> = None;
                for slot in 0..n_moe {
                    if !open(slot, &frozen, &idx) {
                        continue;
                    }
                    let mut cand = idx.clone();
                    cand[slot] -= 1;
                    let p = policies(&cand);
                    let e = ev.evaluate(search, &reference, &p, label_of(&p))?;
                    if !within(&e) {
                        frozen[slot] = true;
                        continue;
                    }
                    let score = score_of(&e, &current);
                    if best.as_ref().is_none_or(|b| score > b.0) {
                        best = Some((score, slot, e));
                    }
                }
                best.map(|(_, slot, e)| (slot, e))
            }
            SearchMode::Lazy => loop {
                // The best-ranked open step; on equal scores a current measurement first, then
                // the lowest slot (the exhaustive order).
                let mut top: Option<usize> = None;
                for slot in (0..n_moe).filter(|&s| open(s, &frozen, &idx)) {
                    let better = match top {
                        None => true,
                        Some(t) => {
                            stale[slot] > stale[t]
                                || (stale[slot] == stale[t]
                                    && fresh[slot].is_some()
                                    && fresh[t].is_none())
                        }
                    };
                    if better {
                        top = Some(slot);
                    }
                }
                let Some(slot) = top else { break None };
                if let Some(e) = fresh[slot].take() {
                    break Some((slot, e));
                }
                let mut cand = idx.clone();
                cand[slot] -= 1;
                let p = policies(&cand);
                let e = ev.evaluate(search, &reference, &p, label_of(&p))?;
                if !within(&e) {
                    frozen[slot] = true;
                    continue;
                }
                stale[slot] = score_of(&e, &current);
                fresh[slot] = Some(e);
            },
        };
        let Some((slot, e)) = step else { break };
        // Every other measurement was taken against the state this step changes.
        fresh.iter_mut().for_each(|f| *f = None);
        stale[slot] = f64::INFINITY;
        idx[slot] -= 1;
        ev.line(&format!(
            "step {}: layer {} to t={} -> {:.1}% of all-experts MoE FLOPs, {:+.4} bits/byte{}",
            path.len(),
            moe_layers[slot],
            crate::units::trim_float(spec.grid[idx[slot]] as f64, 3),
            100.0 * e.moe_flops_fraction,
            e.delta_bits_per_byte,
            kl_text(e.mean_kl_bits)
        ))?;
        current = e;
        path.push(current.clone());
    }
    let evaluations = ev.passes;

    // Verification on tokens the search never saw.
    let vref = ev.reference(verify, reference_policy, keep_logits)?;
    let tuned_verify = ev.evaluate(verify, &vref, &current.policies, current.label.clone())?;
    let best_uniform_verify = match &best_uniform {
        Some(b) => Some(ev.evaluate(verify, &vref, &b.policies, b.label.clone())?),
        None => None,
    };
    let tuned_within_budget_on_verify =
        budget.cost(&tuned_verify, vref.bits_per_byte) <= budget.limit();
    let best_uniform_within_budget_on_verify = best_uniform_verify
        .as_ref()
        .is_some_and(|e| budget.cost(e, vref.bits_per_byte) <= budget.limit());
    Ok(TuneResult {
        model: cfg.name.clone(),
        moe_layers,
        n_experts: cfg.n_experts,
        budget,
        reference_policy,
        grid: spec.grid.clone(),
        search_tokens: (search.batches.len() * batch * (window - 1)) as u64,
        verify_tokens: (verify.batches.len() * batch * (window - 1)) as u64,
        source: source.to_string(),
        reference_bits_per_byte_search: ref_bpb,
        reference_bits_per_byte_verify: vref.bits_per_byte,
        uniform,
        top_k,
        path,
        tuned: current,
        best_uniform,
        tuned_verify,
        best_uniform_verify,
        tuned_within_budget_on_verify,
        best_uniform_within_budget_on_verify,
        search: spec.search,
        evaluations,
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse_as_percent_or_bits() {
        assert_eq!(
            Budget::parse_budget("1%").unwrap(),
            Budget::RelativeBitsPerByte(0.01)
        );
        assert_eq!(
            Budget::parse_budget(" 0.02 ").unwrap(),
            Budget::AbsoluteBitsPerByte(0.02)
        );
        for bad in ["", "-1%", "x", "nan", "1%%"] {
            assert!(Budget::parse_budget(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn threshold_args_are_compact() {
        let t = |t| RoutingPolicy::threshold(t);
        assert_eq!(threshold_arg(&[0, 1], &[t(0.9), t(0.9)]), "0.9");
        assert_eq!(threshold_arg(&[0, 3], &[t(0.7), t(0.95)]), "0:0.7,3:0.95");
    }
}
