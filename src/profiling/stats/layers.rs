//! Per-layer routing counts: what each MoE layer selected, summed over a set of passes so that
//! a window can add a pass on arrival and subtract it on eviction.

use crate::model::trace::ForwardTrace;
use crate::profiling::flops::FlopModel;
use crate::profiling::snapshot::{
    FlopSummary, FlopTriple, LayerStatsSnapshot, LoadBalance, PolicyState, RoutingStats,
};
use crate::routing::Routing;
use crate::routing::RoutingPolicy;

/// What one MoE layer did in one pass, kept compactly so it can be subtracted again on eviction.
#[derive(Clone, Debug, Default)]
pub(super) struct LayerPassRecord {
    /// Selected expert of each pair.
    pub(super) experts: Vec<u16>,
    /// Gate weight of each pair.
    pub(super) weights: Vec<f32>,
    /// Experts selected by each token.
    pub(super) selected: Vec<u16>,
    /// Experts kept by each token (after capacity).
    pub(super) kept: Vec<u16>,
    /// Top-1 probability of each token.
    pub(super) top1: Vec<f32>,
    pub(super) dropped_pairs: u64,
}

/// Empties `v` for `n` elements, giving back capacity far beyond what `n` needs.
fn refit<T>(v: &mut Vec<T>, n: usize) {
    v.clear();
    let keep = n.max(16);
    if v.capacity() > 4 * keep {
        v.shrink_to(keep);
    }
}

impl LayerPassRecord {
    pub(super) fn fill(&mut self, r: &Routing) {
        // Records are pooled and reused; without refitting, every record of a decode window
        // (thousands of one-token passes) would keep the capacity of the largest prefill it
        // ever held, and resident memory would creep up over hours.
        refit(&mut self.experts, r.experts.len());
        self.experts.extend_from_slice(&r.experts);
        refit(&mut self.weights, r.weights.len());
        self.weights.extend_from_slice(&r.weights);
        refit(&mut self.top1, r.top1.len());
        self.top1.extend_from_slice(&r.top1);
        refit(&mut self.selected, r.tokens());
        refit(&mut self.kept, r.tokens());
        for i in 0..r.tokens() {
            let range = r.offsets[i] as usize..r.offsets[i + 1] as usize;
            self.selected.push(range.len() as u16);
            self.kept
                .push(r.kept[range].iter().filter(|&&k| k).count() as u16);
        }
        self.dropped_pairs = r.dropped_pairs as u64;
    }
}

/// One pass in the window ring.
#[derive(Clone, Debug, Default)]
pub(super) struct PassRecord {
    pub(super) tokens: u64,
    pub(super) decode_tokens: u64,
    pub(super) wall_ns: u64,
    pub(super) decode_wall_ns: u64,
    pub(super) non_moe_flops: u64,
    pub(super) layers: Vec<LayerPassRecord>,
}

/// Additive routing counts of one MoE layer over a set of tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerStats {
    /// Tokens routed.
    pub tokens: u64,
    /// Per expert: tokens whose selection includes it.
    pub expert_selected: Vec<u64>,
    /// Per expert: sum of its gate weights.
    pub expert_gate_mass: Vec<f64>,
    /// `experts_per_token[i]`: tokens that selected `i + 1` experts (length E).
    pub experts_per_token: Vec<u64>,
    /// Selected (token, expert) pairs.
    pub selected_pairs: u64,
    /// Pairs kept after the capacity limit.
    pub kept_pairs: u64,
    /// Sum of the top-1 probabilities.
    pub top1_sum: f64,
    /// Pairs dropped by the capacity limit.
    pub dropped_pairs: u64,
    /// Tokens that kept no expert.
    pub tokens_fully_dropped: u64,
}

impl LayerStats {
    /// Empty statistics for a layer of `n_experts` experts.
    pub fn new(n_experts: usize) -> Self {
        Self {
            tokens: 0,
            expert_selected: vec![0; n_experts],
            expert_gate_mass: vec![0.0; n_experts],
            experts_per_token: vec![0; n_experts],
            selected_pairs: 0,
            kept_pairs: 0,
            top1_sum: 0.0,
            dropped_pairs: 0,
            tokens_fully_dropped: 0,
        }
    }

    /// Experts in the layer.
    pub fn n_experts(&self) -> usize {
        self.expert_selected.len()
    }

    /// Adds (`add = true`) or removes the contribution of one pass.
    pub(super) fn apply(&mut self, rec: &LayerPassRecord, add: bool) {
        let n_tok = rec.selected.len() as u64;
        let fully_dropped = rec.kept.iter().filter(|&&k| k == 0).count() as u64;
        let kept: u64 = rec.kept.iter().map(|&k| k as u64).sum();
        let top1: f64 = rec.top1.iter().map(|&p| p as f64).sum();
        let e_max = self.n_experts();
        if add {
            self.tokens += n_tok;
            self.selected_pairs += rec.experts.len() as u64;
            self.kept_pairs += kept;
            self.top1_sum += top1;
            self.dropped_pairs += rec.dropped_pairs;
            self.tokens_fully_dropped += fully_dropped;
            for (&e, &w) in rec.experts.iter().zip(&rec.weights) {
                self.expert_selected[e as usize] += 1;
                self.expert_gate_mass[e as usize] += w as f64;
            }
            for &n in &rec.selected {
                self.experts_per_token[(n as usize).clamp(1, e_max) - 1] += 1;
            }
        } else {
            self.tokens -= n_tok;
            self.selected_pairs -= rec.experts.len() as u64;
            self.kept_pairs -= kept;
            self.top1_sum -= top1;
            self.dropped_pairs -= rec.dropped_pairs;
            self.tokens_fully_dropped -= fully_dropped;
            for (&e, &w) in rec.experts.iter().zip(&rec.weights) {
                self.expert_selected[e as usize] -= 1;
                self.expert_gate_mass[e as usize] -= w as f64;
            }
            for &n in &rec.selected {
                self.experts_per_token[(n as usize).clamp(1, e_max) - 1] -= 1;
            }
            if self.tokens == 0 {
                // Float sums return to exactly zero instead of carrying rounding residue.
                self.top1_sum = 0.0;
                self.expert_gate_mass.iter_mut().for_each(|m| *m = 0.0);
            }
        }
    }

    /// Mean experts selected per token (0 without tokens).
    pub fn mean_experts_per_token(&self) -> f64 {
        ratio(self.selected_pairs as f64, self.tokens as f64)
    }

    /// Load-balance figures over the selected pairs per expert.
    pub fn load_balance(&self) -> LoadBalance {
        load_balance(&self.expert_selected)
    }

    /// The snapshot of this layer. `flops` prices the kept pairs.
    pub fn snapshot(
        &self,
        layer: usize,
        policy: RoutingPolicy,
        flops: &FlopModel,
    ) -> LayerStatsSnapshot {
        let t = self.tokens as f64;
        let all = t * flops.moe_layer_all_experts() as f64;
        let actual = t * flops.router() as f64 + self.kept_pairs as f64 * flops.expert() as f64;
        LayerStatsSnapshot {
            layer,
            policy,
            expert_token_share: self
                .expert_selected
                .iter()
                .map(|&c| ratio(c as f64, t))
                .collect(),
            expert_gate_mass: self
                .expert_gate_mass
                .iter()
                .map(|&m| ratio(m.max(0.0), t))
                .collect(),
            experts_per_token_counts: self.experts_per_token.clone(),
            mean_experts_per_token: self.mean_experts_per_token(),
            mean_kept_experts_per_token: ratio(self.kept_pairs as f64, t),
            mean_top1_prob: ratio(self.top1_sum.max(0.0), t),
            load_balance: self.load_balance(),
            unused_experts: if self.tokens == 0 {
                Vec::new()
            } else {
                (0..self.n_experts())
                    .filter(|&e| self.expert_selected[e] == 0)
                    .collect()
            },
            dropped_pairs: self.dropped_pairs,
            dropped_fraction: ratio(self.dropped_pairs as f64, self.selected_pairs as f64),
            tokens_fully_dropped: self.tokens_fully_dropped,
            moe_flops_fraction_of_all_experts: ratio(actual, all),
        }
    }
}

/// `a / b`, 0 when `b` is 0.
pub(super) fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// Coefficient of variation, normalised entropy and max/mean of expert loads. Without any load
/// (no tokens) every figure is 0.
pub fn load_balance(loads: &[u64]) -> LoadBalance {
    let n = loads.len();
    let total: u64 = loads.iter().sum();
    if n == 0 || total == 0 {
        return LoadBalance {
            coefficient_of_variation: 0.0,
            normalized_entropy: 0.0,
            max_over_mean: 0.0,
        };
    }
    let mean = total as f64 / n as f64;
    let var = loads
        .iter()
        .map(|&l| (l as f64 - mean).powi(2))
        .sum::<f64>()
        / n as f64;
    let entropy: f64 = loads
        .iter()
        .filter(|&&l| l > 0)
        .map(|&l| {
            let p = l as f64 / total as f64;
            p * (1.0 / p).ln()
        })
        .sum();
    let max = *loads.iter().max().expect("non-empty") as f64;
    LoadBalance {
        coefficient_of_variation: var.sqrt() / mean,
        normalized_entropy: if n > 1 {
            entropy / (n as f64).ln()
        } else {
            1.0
        },
        max_over_mean: max / mean,
    }
}

/// Routing and FLOP sums over a set of passes.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingAggregate {
    /// Tokens covered.
    pub tokens: u64,
    /// Forward passes covered.
    pub passes: u64,
    /// Wall time attributed to those passes, ns.
    pub wall_ns: u64,
    /// Decoded tokens (generate).
    pub decode_tokens: u64,
    /// Wall time of decode passes, ns.
    pub decode_wall_ns: u64,
    /// FLOPs outside the MoE layers (attention, dense FFNs, LM head), summed over tokens.
    pub non_moe_flops: u64,
    /// One per MoE layer.
    pub layers: Vec<LayerStats>,
}

impl RoutingAggregate {
    pub(super) fn new(n_moe: usize, n_experts: usize) -> Self {
        Self {
            tokens: 0,
            passes: 0,
            wall_ns: 0,
            decode_tokens: 0,
            decode_wall_ns: 0,
            non_moe_flops: 0,
            layers: (0..n_moe).map(|_| LayerStats::new(n_experts)).collect(),
        }
    }

    pub(super) fn apply(&mut self, rec: &PassRecord, add: bool) {
        if add {
            self.tokens += rec.tokens;
            self.passes += 1;
            self.wall_ns += rec.wall_ns;
            self.decode_tokens += rec.decode_tokens;
            self.decode_wall_ns += rec.decode_wall_ns;
            self.non_moe_flops += rec.non_moe_flops;
        } else {
            self.tokens -= rec.tokens;
            self.passes -= 1;
            self.wall_ns -= rec.wall_ns;
            self.decode_tokens -= rec.decode_tokens;
            self.decode_wall_ns -= rec.decode_wall_ns;
            self.non_moe_flops -= rec.non_moe_flops;
        }
        for (l, r) in self.layers.iter_mut().zip(&rec.layers) {
            l.apply(r, add);
        }
    }

    /// The snapshot view of these sums.
    pub fn snapshot(&self, policy: &PolicyState, flops: &FlopModel) -> RoutingStats {
        let t = self.tokens as f64;
        let layers: Vec<LayerStatsSnapshot> = self
            .layers
            .iter()
            .enumerate()
            .map(|(slot, l)| {
                let (layer, p) = policy
                    .layers
                    .get(slot)
                    .map(|lp| (lp.layer, lp.policy))
                    .unwrap_or((flops.moe_layers()[slot], RoutingPolicy::Dense));
                l.snapshot(layer, p, flops)
            })
            .collect();
        let n_moe = self.layers.len() as f64;
        let kept: u64 = self.layers.iter().map(|l| l.kept_pairs).sum();
        let selected: u64 = self.layers.iter().map(|l| l.selected_pairs).sum();
        let router = n_moe * flops.router() as f64;
        let moe = FlopTriple {
            actual: ratio(kept as f64 * flops.expert() as f64, t)
                + if t > 0.0 { router } else { 0.0 },
            all_experts: if t > 0.0 {
                n_moe * flops.moe_layer_all_experts() as f64
            } else {
                0.0
            },
            top_k: if t > 0.0 {
                n_moe * flops.moe_layer_top_k() as f64
            } else {
                0.0
            },
        };
        let rest = ratio(self.non_moe_flops as f64, t);
        let model = FlopTriple {
            actual: moe.actual + rest,
            all_experts: moe.all_experts + rest,
            top_k: moe.top_k + rest,
        };
        RoutingStats {
            tokens: self.tokens,
            forward_passes: self.passes,
            layers,
            mean_experts_per_token: ratio(selected as f64, t * n_moe),
            flops: FlopSummary::new(flops.top_k(), moe, model),
        }
    }

    pub(super) fn tokens_per_second(&self) -> f64 {
        ratio(self.tokens as f64 * 1e9, self.wall_ns as f64)
    }
}

/// Experts selected by token `token` in each MoE layer of a pass, in MoE slot order.
pub fn experts_per_layer(trace: &ForwardTrace, token: usize) -> Vec<u16> {
    trace
        .moe
        .iter()
        .map(|m| {
            if token < m.routing.tokens() {
                m.routing.selected(token) as u16
            } else {
                0
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_balance_figures() {
        let even = load_balance(&[5, 5, 5, 5]);
        assert_eq!(even.coefficient_of_variation, 0.0);
        assert!((even.normalized_entropy - 1.0).abs() < 1e-12);
        assert_eq!(even.max_over_mean, 1.0);
        let one = load_balance(&[8, 0, 0, 0]);
        assert_eq!(one.normalized_entropy, 0.0);
        assert_eq!(one.max_over_mean, 4.0);
        assert!((one.coefficient_of_variation - 3f64.sqrt()).abs() < 1e-12);
        assert_eq!(load_balance(&[0, 0]).max_over_mean, 0.0);
    }
}
