//! Routing policy: router logits in, (token, expert, weight) selections out.
//!
//! Pure code with no tensors, so that every edge case is tested directly. The threshold rule is
//! exactly the XMoE reference (`main_thresholdGating`): softmax over all experts, experts taken in
//! descending probability, an expert is selected when the probability mass ranked *before* it is
//! still below `t` (so the expert that crosses `t` is selected), the first expert always, and the
//! raw probabilities are the weights (no renormalisation).

use std::fmt;

use serde::{Deserialize, Serialize};

pub mod deepseek;

pub use deepseek::{
    GroupLimit, Router, SigmoidRouter, SigmoidSelection, SoftmaxGroups, route_with,
};

/// How a MoE layer picks experts for each token: the one policy type of the crate, used by model
/// files, the command line, the session, the UI and reports. Its JSON form is
/// `{"kind": "threshold", "t": 0.9}`, `{"kind": "top_k", "k": 2, "renormalize": false}` or
/// `{"kind": "dense"}`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RoutingPolicy {
    /// The smallest descending-probability prefix whose mass reaches `t` (0 < t <= 1).
    Threshold {
        /// Threshold on the cumulative probability.
        t: f32,
        /// Divide the selected probabilities by their sum (the XMoE rule itself does not; a
        /// model trained with a renormalising top-k may degrade less with it).
        #[serde(default)]
        renormalize: bool,
    },
    /// The `k` most probable experts.
    TopK {
        /// Experts per token, 1..=E.
        k: usize,
        /// Divide the selected probabilities by their sum.
        #[serde(default)]
        renormalize: bool,
    },
    /// Every expert, weighted by its probability.
    Dense,
}

impl fmt::Display for RoutingPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RoutingPolicy::Threshold { t, renormalize } => write!(
                f,
                "threshold t={t:.2}{}",
                if *renormalize { " (renorm)" } else { "" }
            ),
            RoutingPolicy::TopK { k, renormalize } => {
                write!(f, "top-{k}{}", if *renormalize { " (renorm)" } else { "" })
            }
            RoutingPolicy::Dense => write!(f, "dense"),
        }
    }
}

/// Why a policy or its input cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RoutingError {
    /// Threshold outside (0, 1] or not finite.
    #[error("threshold must be in (0, 1], found {0}")]
    BadThreshold(f32),
    /// k outside 1..=E.
    #[error("top-k needs k in 1..={n_experts}, found {k}")]
    BadK {
        /// Requested k.
        k: usize,
        /// Experts in the layer.
        n_experts: usize,
    },
    /// A layer with no experts, or more than expert ids can number.
    #[error("a MoE layer needs 1..=65536 experts, found {0}")]
    BadExpertCount(usize),
    /// Capacity factor not positive and finite.
    #[error("capacity factor must be positive and finite, found {0}")]
    BadCapacityFactor(f32),
    /// A router logit is NaN or infinite.
    #[error("router logit for token {token}, expert {expert} is not finite ({value})")]
    NonFiniteLogit {
        /// Token row.
        token: usize,
        /// Expert column.
        expert: usize,
        /// The value found.
        value: f32,
    },
    /// A group-limited router whose groups do not fit its experts or its top-k.
    #[error(
        "group-limited routing with n_group {n_group}, topk_group {topk_group} over {n_experts} experts: {why}"
    )]
    BadGroups {
        /// Groups.
        n_group: usize,
        /// Groups kept per token.
        topk_group: usize,
        /// Experts in the layer.
        n_experts: usize,
        /// What is wrong.
        why: String,
    },
    /// A score correction bias whose length is not the expert count.
    #[error(
        "expected a score correction bias of {expected} values (one per expert), found {found}"
    )]
    BadBias {
        /// Experts.
        expected: usize,
        /// Values found.
        found: usize,
    },
    /// Logit buffer length does not match tokens x experts.
    #[error(
        "expected {expected} router logits ({tokens} tokens x {n_experts} experts), found {found}"
    )]
    ShapeMismatch {
        /// tokens * experts.
        expected: usize,
        /// Tokens.
        tokens: usize,
        /// Experts.
        n_experts: usize,
        /// Actual length.
        found: usize,
    },
}

/// Thresholds closer than this are the same policy: far below the slider's 0.01 step and the
/// two decimals every screen and report shows, far above the f32 error of repeated slider steps.
pub const SAME_THRESHOLD_TOLERANCE: f32 = 1e-5;

impl RoutingPolicy {
    /// The XMoE threshold rule at `t`, with the raw probabilities as weights.
    pub const fn threshold(t: f32) -> Self {
        RoutingPolicy::Threshold {
            t,
            renormalize: false,
        }
    }

    /// Whether the combine weights are renormalised over the selected experts.
    pub fn renormalizes(&self) -> bool {
        match *self {
            RoutingPolicy::Threshold { renormalize, .. }
            | RoutingPolicy::TopK { renormalize, .. } => renormalize,
            RoutingPolicy::Dense => false,
        }
    }

    /// The same policy with the combine weights renormalised or not (dense keeps raw weights,
    /// which already sum to 1).
    pub fn with_renormalize(self, on: bool) -> Self {
        match self {
            RoutingPolicy::Threshold { t, .. } => RoutingPolicy::Threshold { t, renormalize: on },
            RoutingPolicy::TopK { k, .. } => RoutingPolicy::TopK { k, renormalize: on },
            RoutingPolicy::Dense => RoutingPolicy::Dense,
        }
    }

    /// True when both route every token the same way: equal kind and parameters, thresholds
    /// within [`SAME_THRESHOLD_TOLERANCE`].
    pub fn same_as(&self, other: &RoutingPolicy) -> bool {
        match (self, other) {
            (
                RoutingPolicy::Threshold {
                    t: a,
                    renormalize: ra,
                },
                RoutingPolicy::Threshold {
                    t: b,
                    renormalize: rb,
                },
            ) => ra == rb && (a - b).abs() < SAME_THRESHOLD_TOLERANCE,
            (a, b) => a == b,
        }
    }

    /// Checks the policy against a layer of `n_experts` experts: the one way to a
    /// [`CheckedPolicy`].
    pub fn check(self, n_experts: usize) -> Result<CheckedPolicy, RoutingError> {
        if n_experts == 0 || n_experts > u16::MAX as usize + 1 {
            return Err(RoutingError::BadExpertCount(n_experts));
        }
        self.validate(n_experts)?;
        Ok(CheckedPolicy {
            policy: self,
            n_experts,
        })
    }

    /// Checks the policy's parameters against the number of experts.
    pub fn validate(&self, n_experts: usize) -> Result<(), RoutingError> {
        match *self {
            RoutingPolicy::Threshold { t, .. } => {
                if !(t.is_finite() && t > 0.0 && t <= 1.0) {
                    return Err(RoutingError::BadThreshold(t));
                }
            }
            RoutingPolicy::TopK { k, .. } => {
                if k == 0 || k > n_experts {
                    return Err(RoutingError::BadK { k, n_experts });
                }
            }
            RoutingPolicy::Dense => {}
        }
        Ok(())
    }
}

/// A policy checked against the number of experts it routes over. Only [`RoutingPolicy::check`]
/// builds one, so the code that receives it (the model, [`route`]) never checks it again.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CheckedPolicy {
    policy: RoutingPolicy,
    n_experts: usize,
}

impl CheckedPolicy {
    /// The policy.
    pub fn policy(self) -> RoutingPolicy {
        self.policy
    }

    /// The number of experts it was checked against.
    pub fn n_experts(self) -> usize {
        self.n_experts
    }
}

/// A capacity factor checked positive and finite; only [`CapacityFactor::new`] builds one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CapacityFactor(f32);

impl CapacityFactor {
    /// Checks `factor`.
    pub fn new(factor: f32) -> Result<Self, RoutingError> {
        if factor.is_finite() && factor > 0.0 {
            Ok(Self(factor))
        } else {
            Err(RoutingError::BadCapacityFactor(factor))
        }
    }

    /// An optional factor, checked when present.
    pub fn optional(factor: Option<f32>) -> Result<Option<Self>, RoutingError> {
        factor.map(Self::new).transpose()
    }

    /// The factor.
    pub fn get(self) -> f32 {
        self.0
    }
}

/// The threshold rule's test for the expert at `rank` (0-based, descending probability), with
/// `cum` the f32 running sum of the probabilities up to and including it and `p` its own: the
/// first expert always, then every expert while the mass before it is below `t`. The mass before
/// it is `cum - p`, computed as the reference computes it (inclusive cumulative sum minus the
/// probability), so that selections match it to the last bit.
pub fn threshold_keeps(rank: usize, cum: f32, p: f32, t: f32) -> bool {
    rank == 0 || cum - p < t
}

/// Per-expert capacity for `tokens` tokens: `max(4, ceil(factor * tokens / E))`, as in the reference.
pub fn expert_capacity(capacity_factor: f32, tokens: usize, n_experts: usize) -> usize {
    let c = (capacity_factor as f64 * tokens as f64 / n_experts as f64).ceil() as usize;
    c.max(4)
}

/// The selections of one layer for a batch of tokens. Buffers are reused across calls, so the
/// hot path does no per-token allocation once they have grown.
#[derive(Clone, Debug, Default)]
pub struct Routing {
    /// Experts in the layer.
    pub n_experts: usize,
    /// Softmax probabilities, `tokens x n_experts`, row-major.
    pub probs: Vec<f32>,
    /// Choices of token `i` are `offsets[i]..offsets[i + 1]` in the arrays below; length tokens+1.
    pub offsets: Vec<u32>,
    /// Selected expert ids, per token in descending probability (choice rank) order.
    pub experts: Vec<u16>,
    /// Gate weight of each selected pair (p, or renormalised p for top-k with renormalisation).
    pub weights: Vec<f32>,
    /// False where a capacity limit dropped the pair; dropped pairs contribute nothing.
    pub kept: Vec<bool>,
    /// Highest probability of each token.
    pub top1: Vec<f32>,
    /// Number of dropped (token, expert) pairs in this batch.
    pub dropped_pairs: usize,
    order: Vec<u16>,
    priority: Vec<u32>,
}

impl Routing {
    /// Number of tokens routed.
    pub fn tokens(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// Experts selected by the policy for token `i` (before capacity dropping).
    pub fn selected(&self, i: usize) -> usize {
        (self.offsets[i + 1] - self.offsets[i]) as usize
    }

    /// (expert, weight, kept) of token `i`, in choice-rank order.
    pub fn choices(&self, i: usize) -> impl Iterator<Item = (usize, f32, bool)> + '_ {
        let r = self.offsets[i] as usize..self.offsets[i + 1] as usize;
        r.map(move |j| (self.experts[j] as usize, self.weights[j], self.kept[j]))
    }

    /// Total selected pairs (before capacity dropping).
    pub fn pairs(&self) -> usize {
        self.experts.len()
    }
}

/// Routes a batch: softmax each row of `logits` (`tokens x E`, E the policy's expert count),
/// apply `policy`, then the optional capacity limit. Writes into `out`, reusing its buffers. The
/// policy and factor were checked when built; only the logits (shape, finiteness) are checked
/// here.
pub fn route(
    logits: &[f32],
    policy: CheckedPolicy,
    capacity_factor: Option<CapacityFactor>,
    out: &mut Routing,
) -> Result<(), RoutingError> {
    let n_experts = policy.n_experts;
    let tokens = begin(logits, n_experts, out)?;
    let policy = policy.policy;

    for (row, probs) in logits
        .chunks_exact(n_experts)
        .zip(out.probs.chunks_exact_mut(n_experts))
    {
        softmax_into(row, probs);
        // Descending probability; ties go to the lower expert id so that results are deterministic.
        out.order.sort_unstable_by(|&a, &b| {
            probs[b as usize]
                .total_cmp(&probs[a as usize])
                .then(a.cmp(&b))
        });
        out.top1.push(probs[out.order[0] as usize]);
        let start = out.experts.len();
        match policy {
            RoutingPolicy::Threshold { t, .. } => {
                let mut cum = 0.0f32;
                for (rank, &e) in out.order.iter().enumerate() {
                    let p = probs[e as usize];
                    cum += p;
                    if !threshold_keeps(rank, cum, p, t) {
                        break;
                    }
                    out.experts.push(e);
                    out.weights.push(p);
                }
            }
            RoutingPolicy::TopK { k, .. } => {
                for &e in &out.order[..k] {
                    out.experts.push(e);
                    out.weights.push(probs[e as usize]);
                }
            }
            RoutingPolicy::Dense => {
                for &e in &out.order {
                    out.experts.push(e);
                    out.weights.push(probs[e as usize]);
                }
            }
        }
        if policy.renormalizes() {
            let selected = &mut out.weights[start..];
            let sum: f32 = selected.iter().sum();
            if sum > 0.0 {
                selected.iter_mut().for_each(|w| *w /= sum);
            }
        }
        out.offsets.push(out.experts.len() as u32);
    }
    out.kept.resize(out.experts.len(), true);
    if let Some(cf) = capacity_factor {
        apply_capacity(out, expert_capacity(cf.get(), tokens, n_experts));
    }
    Ok(())
}

/// Checks the logits of a batch (shape, finiteness) and empties `out` for `n_experts` experts;
/// returns the number of tokens. Every router's routing starts here.
fn begin(logits: &[f32], n_experts: usize, out: &mut Routing) -> Result<usize, RoutingError> {
    let tokens = logits.len().checked_div(n_experts).unwrap_or(0);
    if n_experts == 0 || tokens * n_experts != logits.len() {
        return Err(RoutingError::ShapeMismatch {
            expected: tokens * n_experts,
            tokens,
            n_experts,
            found: logits.len(),
        });
    }
    if let Some(pos) = logits.iter().position(|v| !v.is_finite()) {
        return Err(RoutingError::NonFiniteLogit {
            token: pos / n_experts,
            expert: pos % n_experts,
            value: logits[pos],
        });
    }
    out.n_experts = n_experts;
    out.probs.clear();
    out.probs.resize(logits.len(), 0.0);
    out.offsets.clear();
    out.offsets.push(0);
    out.experts.clear();
    out.weights.clear();
    out.kept.clear();
    out.top1.clear();
    out.dropped_pairs = 0;
    out.order.clear();
    out.order.extend(0..n_experts as u16);
    Ok(tokens)
}

/// Numerically stable softmax of one row, computed in f32 like the reference.
fn softmax_into(row: &[f32], out: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for (o, &z) in out.iter_mut().zip(row) {
        *o = (z - max).exp();
        sum += *o;
    }
    let inv = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// Drops pairs beyond `capacity` per expert. Priority within an expert: lower choice rank first
/// (a token's first choice beats another token's second), then higher probability, then the
/// earlier token.
fn apply_capacity(out: &mut Routing, capacity: usize) {
    let n = out.experts.len();
    let mut rank = vec![0u32; n];
    let mut token = vec![0u32; n];
    for i in 0..out.tokens() {
        for j in out.offsets[i] as usize..out.offsets[i + 1] as usize {
            rank[j] = j as u32 - out.offsets[i];
            token[j] = i as u32;
        }
    }
    out.priority.clear();
    out.priority.extend(0..n as u32);
    let (experts, weights) = (&out.experts, &out.weights);
    out.priority.sort_unstable_by(|&a, &b| {
        let (a, b) = (a as usize, b as usize);
        experts[a]
            .cmp(&experts[b])
            .then(rank[a].cmp(&rank[b]))
            .then(weights[b].total_cmp(&weights[a]))
            .then(token[a].cmp(&token[b]))
    });
    let mut current = u16::MAX;
    let mut used = 0usize;
    for &j in &out.priority {
        let j = j as usize;
        if out.experts[j] != current {
            current = out.experts[j];
            used = 0;
        }
        if used < capacity {
            used += 1;
        } else {
            out.kept[j] = false;
            out.dropped_pairs += 1;
        }
    }
}

/// Kept (token, expert) pairs grouped by expert with a counting sort: the rows of expert `e` are
/// `tokens[offsets[e]..offsets[e + 1]]` with gate weights alongside, tokens ascending.
#[derive(Clone, Debug, Default)]
pub struct ExpertGroups {
    /// Length E+1.
    pub offsets: Vec<u32>,
    /// Token row of each pair.
    pub tokens: Vec<u32>,
    /// Gate weight of each pair.
    pub weights: Vec<f32>,
}

impl ExpertGroups {
    /// Rebuilds the groups from a routing result, reusing buffers.
    pub fn build(&mut self, routing: &Routing) {
        let e = routing.n_experts;
        self.offsets.clear();
        self.offsets.resize(e + 1, 0);
        for (&x, &k) in routing.experts.iter().zip(&routing.kept) {
            if k {
                self.offsets[x as usize + 1] += 1;
            }
        }
        for i in 0..e {
            self.offsets[i + 1] += self.offsets[i];
        }
        let total = self.offsets[e] as usize;
        self.tokens.clear();
        self.tokens.resize(total, 0);
        self.weights.clear();
        self.weights.resize(total, 0.0);
        let mut cursor: Vec<u32> = self.offsets[..e].to_vec();
        for t in 0..routing.tokens() {
            for (x, w, k) in routing.choices(t) {
                if k {
                    let slot = cursor[x] as usize;
                    self.tokens[slot] = t as u32;
                    self.weights[slot] = w;
                    cursor[x] += 1;
                }
            }
        }
    }

    /// Number of experts.
    pub fn n_experts(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// Rows (tokens) routed to expert `e`.
    pub fn rows(&self, e: usize) -> usize {
        (self.offsets[e + 1] - self.offsets[e]) as usize
    }

    /// Token ids and weights of expert `e`.
    pub fn group(&self, e: usize) -> (&[u32], &[f32]) {
        let r = self.offsets[e] as usize..self.offsets[e + 1] as usize;
        (&self.tokens[r.clone()], &self.weights[r])
    }

    /// Total kept pairs.
    pub fn pairs(&self) -> usize {
        self.tokens.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn logits_for(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    fn run(logits: &[f32], e: usize, policy: RoutingPolicy, cf: Option<f32>) -> Routing {
        let mut r = Routing::default();
        let cf = CapacityFactor::optional(cf).unwrap();
        route(logits, policy.check(e).unwrap(), cf, &mut r).unwrap();
        r
    }

    fn chosen(r: &Routing, t: usize) -> Vec<usize> {
        r.choices(t).map(|(e, _, _)| e).collect()
    }

    #[test]
    fn hand_computed_threshold() {
        // p = [0.1, 0.5, 0.3, 0.1]; order 1,2,0,3; before = 0, 0.5, 0.8, 0.9.
        let l = logits_for(&[0.1, 0.5, 0.3, 0.1]);
        let th = |t| run(&l, 4, RoutingPolicy::threshold(t), None);
        // (t = 0.5 exactly is a knife edge: cumsum - p lands on 0.5 or one unit below it
        // depending on the last bit of exp, which differs between libm and the reference's.)
        assert_eq!(chosen(&th(0.49), 0), vec![1]);
        assert_eq!(chosen(&th(0.51), 0), vec![1, 2]);
        assert_eq!(chosen(&th(0.79), 0), vec![1, 2]);
        assert_eq!(chosen(&th(0.85), 0), vec![1, 2, 0]);
        // The expert that crosses t is selected; weights are raw p.
        let r = th(0.7);
        let w: Vec<f32> = r.choices(0).map(|(_, w, _)| w).collect();
        assert!((w[0] - 0.5).abs() < 1e-6 && (w[1] - 0.3).abs() < 1e-6);
        assert!(
            (w.iter().sum::<f32>() - 0.8).abs() < 1e-6,
            "no renormalisation"
        );
        assert!((r.top1[0] - 0.5).abs() < 1e-6);
    }

    #[test]
    fn threshold_with_renormalisation_keeps_the_selection_and_rescales_the_weights() {
        // p = [0.1, 0.5, 0.3, 0.1]: t = 0.7 selects 1 and 2 (mass 0.8).
        let l = logits_for(&[0.1, 0.5, 0.3, 0.1]);
        let raw = run(&l, 4, RoutingPolicy::threshold(0.7), None);
        let policy = RoutingPolicy::threshold(0.7).with_renormalize(true);
        assert!(policy.renormalizes() && !policy.same_as(&RoutingPolicy::threshold(0.7)));
        let r = run(&l, 4, policy, None);
        assert_eq!(chosen(&r, 0), chosen(&raw, 0));
        let w: Vec<f32> = r.choices(0).map(|(_, w, _)| w).collect();
        assert!(
            (w[0] - 0.625).abs() < 1e-6 && (w[1] - 0.375).abs() < 1e-6,
            "{w:?}"
        );
        assert_eq!(policy.to_string(), "threshold t=0.70 (renorm)");
        let json = serde_json::to_string(&policy).unwrap();
        assert_eq!(
            serde_json::from_str::<RoutingPolicy>(&json).unwrap(),
            policy
        );
        // Files written before the switch existed read as raw weights.
        let old: RoutingPolicy = serde_json::from_str(r#"{"kind":"threshold","t":0.7}"#).unwrap();
        assert_eq!(old, RoutingPolicy::threshold(0.7));
    }

    #[test]
    fn threshold_arithmetic_is_the_references_to_the_last_bit() {
        // The reference compares (inclusive cumsum - p) with t in f32. Here that is one unit in
        // the last place above the plain running sum of the experts before.
        let (p0, p1) = (0.802f32, 0.569f32);
        let cum = p0 + p1;
        let t = f32::from_bits(p0.to_bits() + 1);
        assert_eq!(cum - p1, t);
        assert!(p0 < t, "a running exclusive sum would select expert 1");
        assert!(!threshold_keeps(1, cum, p1, t), "the reference does not");
        assert!(threshold_keeps(0, p0, p0, 0.0), "the first expert always");
    }

    #[test]
    fn ties_go_to_lower_expert_id() {
        let l = vec![0.0; 4];
        let r = run(&l, 4, RoutingPolicy::threshold(0.5), None);
        // all 0.25: before = 0, .25, .5 -> experts 0 and 1.
        assert_eq!(chosen(&r, 0), vec![0, 1]);
        let r = run(
            &l,
            4,
            RoutingPolicy::TopK {
                k: 3,
                renormalize: false,
            },
            None,
        );
        assert_eq!(chosen(&r, 0), vec![0, 1, 2]);
        let l = vec![1.0, 2.0, 2.0, 0.0];
        let r = run(
            &l,
            4,
            RoutingPolicy::TopK {
                k: 1,
                renormalize: false,
            },
            None,
        );
        assert_eq!(chosen(&r, 0), vec![1]);
    }

    #[test]
    fn all_equal_probabilities_threshold_one_takes_all() {
        let e = 8;
        let l = vec![0.3; e];
        let r = run(&l, e, RoutingPolicy::threshold(1.0), None);
        // before of the last expert is 7/8 < 1.
        assert_eq!(r.selected(0), e);
    }

    #[test]
    fn tiny_threshold_takes_exactly_one() {
        let l = vec![0.1, 0.2, 0.3, 0.4, 0.5];
        let r = run(&l, 5, RoutingPolicy::threshold(1e-9), None);
        assert_eq!(chosen(&r, 0), vec![4]);
    }

    #[test]
    fn single_expert() {
        let l = vec![3.0, -2.0];
        for p in [
            RoutingPolicy::threshold(0.9),
            RoutingPolicy::threshold(1.0),
            RoutingPolicy::TopK {
                k: 1,
                renormalize: true,
            },
            RoutingPolicy::Dense,
        ] {
            let r = run(&l, 1, p, None);
            assert_eq!(r.tokens(), 2);
            assert_eq!(chosen(&r, 0), vec![0]);
            assert_eq!(chosen(&r, 1), vec![0]);
            assert!((r.weights[0] - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn threshold_one_vs_dense_when_one_expert_has_negligible_mass() {
        // One expert has p ~ 1e-30: f32 cumulative sum of the others reaches 1.0 exactly, so
        // t = 1.0 leaves that expert out; Dense must still include it.
        let l = vec![0.0, 0.0, -70.0];
        let t1 = run(&l, 3, RoutingPolicy::threshold(1.0), None);
        let dense = run(&l, 3, RoutingPolicy::Dense, None);
        assert_eq!(dense.selected(0), 3);
        assert!(t1.selected(0) >= 2);
    }

    #[test]
    fn topk_renormalisation_is_a_flag() {
        let l = logits_for(&[0.1, 0.5, 0.3, 0.1]);
        let raw = run(
            &l,
            4,
            RoutingPolicy::TopK {
                k: 2,
                renormalize: false,
            },
            None,
        );
        let ren = run(
            &l,
            4,
            RoutingPolicy::TopK {
                k: 2,
                renormalize: true,
            },
            None,
        );
        assert!((raw.weights.iter().sum::<f32>() - 0.8).abs() < 1e-6);
        assert!((ren.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((ren.weights[0] - 0.625).abs() < 1e-6);
    }

    #[test]
    fn non_finite_logits_are_an_error_naming_the_position() {
        let mut r = Routing::default();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let l = vec![0.0, 1.0, 2.0, bad, 0.0, 0.0];
            let dense = RoutingPolicy::Dense.check(3).unwrap();
            let e = route(&l, dense, None, &mut r).unwrap_err();
            assert!(matches!(
                e,
                RoutingError::NonFiniteLogit {
                    token: 1,
                    expert: 0,
                    ..
                }
            ));
            assert!(e.to_string().contains("token 1, expert 0"), "{e}");
        }
    }

    #[test]
    fn bad_parameters_are_rejected() {
        for t in [0.0, -0.1, 1.01, f32::NAN] {
            assert!(matches!(
                RoutingPolicy::threshold(t).check(4),
                Err(RoutingError::BadThreshold(_))
            ));
        }
        for k in [0, 5] {
            let top_k = RoutingPolicy::TopK {
                k,
                renormalize: false,
            };
            assert!(matches!(top_k.check(4), Err(RoutingError::BadK { .. })));
        }
        for e in [0, 65537] {
            assert!(matches!(
                RoutingPolicy::Dense.check(e),
                Err(RoutingError::BadExpertCount(_))
            ));
        }
        for c in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            assert!(CapacityFactor::new(c).is_err());
        }
        assert_eq!(CapacityFactor::new(1.5).unwrap().get(), 1.5);
        // The logits are the one thing `route` still checks: their shape and finiteness.
        let mut r = Routing::default();
        let dense = RoutingPolicy::Dense.check(4).unwrap();
        assert!(route(&[0.0; 3], dense, None, &mut r).is_err());
        assert!(route(&[0.0; 4], dense, None, &mut r).is_ok());
    }

    #[test]
    fn capacity_priority_is_rank_then_probability() {
        // 6 tokens, 2 experts, capacity max(4, ceil(0.5*6/2)=2) = 4.
        // Tokens 0..4 choose expert 0 first with p 0.9,0.8,0.7,0.6,0.55; token 5 chooses expert 1 first
        // and expert 0 second. Dense: everyone takes both.
        let ps = [0.9f32, 0.8, 0.7, 0.6, 0.55, 0.2];
        let l: Vec<f32> = ps.iter().flat_map(|&p| [p.ln(), (1.0 - p).ln()]).collect();
        let r = run(&l, 2, RoutingPolicy::Dense, Some(0.5));
        assert_eq!(expert_capacity(0.5, 6, 2), 4);
        // Expert 0: first choices of tokens 0..4 (5 pairs) + second choice of token 5.
        // Keeps the 4 first choices with highest p (tokens 0..3): drops token 4's first choice
        // and token 5's second choice.
        let kept0: Vec<usize> = (0..6)
            .filter(|&t| r.choices(t).any(|(e, _, k)| e == 0 && k))
            .collect();
        assert_eq!(kept0, vec![0, 1, 2, 3]);
        // Expert 1: first choice of token 5, second choices of tokens 0..4 -> 6 pairs, keeps
        // token 5 (rank 0) then the 3 highest-p second choices: tokens 4 (0.45), 3 (0.4), 2 (0.3).
        let kept1: Vec<usize> = (0..6)
            .filter(|&t| r.choices(t).any(|(e, _, k)| e == 1 && k))
            .collect();
        assert_eq!(kept1, vec![2, 3, 4, 5]);
        assert_eq!(r.dropped_pairs, 4);
        let mut g = ExpertGroups::default();
        g.build(&r);
        assert_eq!(g.pairs(), 8);
        assert_eq!(g.group(0).0, &[0, 1, 2, 3]);
    }

    #[test]
    fn token_whose_every_choice_is_dropped_has_no_kept_pair() {
        // 10 tokens all choose only expert 0 under top-1; capacity 4 keeps tokens with highest p.
        let l: Vec<f32> = (0..10).flat_map(|i| [1.0 + i as f32 * 0.1, 0.0]).collect();
        let r = run(
            &l,
            2,
            RoutingPolicy::TopK {
                k: 1,
                renormalize: false,
            },
            Some(0.1),
        );
        let kept: Vec<usize> = (0..10).filter(|&t| r.choices(t).any(|c| c.2)).collect();
        assert_eq!(kept, vec![6, 7, 8, 9]);
        assert_eq!(r.dropped_pairs, 6);
    }

    #[test]
    fn groups_hold_exactly_the_rows_that_chose_each_expert() {
        let l: Vec<f32> = (0..40).map(|i| ((i * 37 % 11) as f32) * 0.3).collect();
        let r = run(&l, 4, RoutingPolicy::threshold(0.8), None);
        let mut g = ExpertGroups::default();
        g.build(&r);
        for e in 0..4 {
            let expected: Vec<u32> = (0..r.tokens())
                .filter(|&t| r.choices(t).any(|(x, _, _)| x == e))
                .map(|t| t as u32)
                .collect();
            assert_eq!(g.group(e).0, expected.as_slice());
        }
        assert_eq!(g.pairs(), r.pairs());
    }

    proptest! {
        #[test]
        fn threshold_selects_the_minimal_descending_prefix_reaching_t(
            logits in prop::collection::vec(-8.0f32..8.0, 1..40),
            t in 0.001f32..=1.0,
        ) {
            let e = logits.len();
            let r = run(&logits, e, RoutingPolicy::threshold(t), None);
            let sel: Vec<(usize, f32, bool)> = r.choices(0).collect();
            let n = sel.len();
            prop_assert!(n >= 1);
            // Descending order, weights are the raw probabilities.
            for w in sel.windows(2) {
                prop_assert!(w[0].1 >= w[1].1);
            }
            for &(x, w, _) in &sel {
                prop_assert_eq!(w, r.probs[x]);
            }
            // Every unselected expert is no more probable than the last selected one.
            let last = sel[n - 1].1;
            for x in 0..e {
                if !sel.iter().any(|s| s.0 == x) {
                    prop_assert!(r.probs[x] <= last);
                }
            }
            // Minimal: the mass before the last selected expert is below t ...
            let cum_last: f32 = sel.iter().map(|s| s.1).sum();
            prop_assert!(n == 1 || cum_last - sel[n - 1].1 < t);
            // ... and the selection reaches t unless every expert was taken.
            let mass: f32 = sel.iter().map(|s| s.1).sum();
            prop_assert!(mass >= t || n == e);
        }

        #[test]
        fn topk_and_dense_counts(logits in prop::collection::vec(-5.0f32..5.0, 2..32), k in 1usize..32) {
            let e = logits.len();
            let k = k.min(e);
            let r = run(&logits, e, RoutingPolicy::TopK { k, renormalize: false }, None);
            prop_assert_eq!(r.selected(0), k);
            let d = run(&logits, e, RoutingPolicy::Dense, None);
            prop_assert_eq!(d.selected(0), e);
            let s: f32 = d.weights.iter().sum();
            prop_assert!((s - 1.0).abs() < 1e-5);
        }
    }
}
