//! The DeepSeek routers: how DeepSeek-V2 and DeepSeek-V3 score experts, which experts a token may
//! choose from (group-limited selection), how they weight the chosen ones, and what the routing
//! policies (top-k, threshold, dense) mean on them. Pure code, no tensors, like the rest of
//! [`crate::routing`]; `docs/model-families.md` explains the threshold definitions.
//!
//! As transformers 5.24 computes them (`DeepseekV2TopkRouter`, `DeepseekV3TopkRouter`):
//! - V2: `p = softmax(logits)`; `greedy`: the k largest p; `group_limited_greedy`: the experts
//!   are cut into `n_group` contiguous groups, a group scores the **max** p in it, only the
//!   `topk_group` best groups stay, then the k largest p among them. Weights `p ×
//!   routed_scaling_factor`, never renormalised.
//! - V3: `s = sigmoid(logits)`, `c = s + e_score_correction_bias`; a group scores the **sum of
//!   its two largest** c; only the `topk_group` best groups stay; the k largest c among them are
//!   chosen, but weighted by the *unbiased* s, divided by their sum (+1e-20) when
//!   `norm_topk_prob`, times `routed_scaling_factor`.

use super::{
    CapacityFactor, CheckedPolicy, Routing, RoutingError, RoutingPolicy, apply_capacity, begin,
    expert_capacity, softmax_into, threshold_keeps,
};

/// Group-limited selection: `n_group` contiguous groups of `E / n_group` experts, of which each
/// token may use the `topk_group` best.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupLimit {
    /// Number of groups; divides the expert count.
    pub n_group: usize,
    /// Groups kept per token, 1..=n_group.
    pub topk_group: usize,
}

impl GroupLimit {
    /// Checks the limit against `n_experts` experts and a top-k of `k` (the kept groups must hold
    /// at least k experts, or top-k would pick masked experts).
    pub fn check(self, n_experts: usize, k: usize) -> Result<Self, RoutingError> {
        let bad = |why: String| {
            Err(RoutingError::BadGroups {
                n_group: self.n_group,
                topk_group: self.topk_group,
                n_experts,
                why,
            })
        };
        if self.n_group == 0 || !n_experts.is_multiple_of(self.n_group) {
            return bad("n_group must divide the number of experts".into());
        }
        if self.topk_group == 0 || self.topk_group > self.n_group {
            return bad("topk_group must be in 1..=n_group".into());
        }
        if self.topk_group * (n_experts / self.n_group) < k {
            return bad(format!(
                "the kept groups hold {} experts, fewer than the {k} chosen per token",
                self.topk_group * (n_experts / self.n_group)
            ));
        }
        Ok(self)
    }

    fn size(self, n_experts: usize) -> usize {
        n_experts / self.n_group
    }
}

/// DeepSeek-V2's router: softmax probabilities, optionally group-limited, weights times a
/// scaling factor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SoftmaxGroups {
    /// `group_limited_greedy`'s limit; `None` for `greedy`.
    pub groups: Option<GroupLimit>,
    /// `routed_scaling_factor`.
    pub scaling: f32,
}

/// Which scores a threshold runs on for a sigmoid router (see `docs/model-families.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SigmoidSelection {
    /// The scores the router chooses by, `sigmoid + e_score_correction_bias` (negative ones
    /// count as 0), normalised over the allowed groups: the threshold ranks exactly as the native
    /// top-k ranks. The default.
    #[default]
    Biased,
    /// The unbiased sigmoid scores (the ones the router weights by), normalised over the allowed
    /// groups: the mass the threshold counts is the weight mass the experts receive.
    Unbiased,
}

impl std::str::FromStr for SigmoidSelection {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "biased" => Ok(SigmoidSelection::Biased),
            "unbiased" => Ok(SigmoidSelection::Unbiased),
            _ => Err(format!(
                "expected \"biased\" or \"unbiased\", found \"{s}\""
            )),
        }
    }
}

impl std::fmt::Display for SigmoidSelection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SigmoidSelection::Biased => "biased",
            SigmoidSelection::Unbiased => "unbiased",
        })
    }
}

/// DeepSeek-V3's router: sigmoid scores, a correction bias for choosing only, group-limited by
/// the sum of each group's two best biased scores.
#[derive(Clone, Debug, PartialEq)]
pub struct SigmoidRouter {
    /// `e_score_correction_bias`, one per expert.
    pub bias: Vec<f32>,
    /// Groups (`n_group` 1 is a single group holding every expert).
    pub groups: GroupLimit,
    /// `norm_topk_prob`: the native weights are divided by their sum. Also how the dense policy
    /// weights (it has no renormalisation flag of its own).
    pub norm_topk_prob: bool,
    /// `routed_scaling_factor`.
    pub scaling: f32,
    /// What a threshold is applied to.
    pub selection: SigmoidSelection,
}

/// How a MoE layer turns router logits into expert scores and weights. The routing policy (top-k,
/// threshold, dense) is chosen separately; this is the part fixed by the model family.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum Router {
    /// Softmax over all experts, weights the probabilities (every family but DeepSeek).
    #[default]
    Softmax,
    /// DeepSeek-V2.
    SoftmaxGroups(SoftmaxGroups),
    /// DeepSeek-V3 (and Kimi-K2-style configs).
    Sigmoid(SigmoidRouter),
}

/// Routes a batch with `router`: [`super::route`] for the softmax router, else the DeepSeek rules
/// (module docs) under `policy`:
/// - top-k: the native selection with k experts; weights the router's (p or the unbiased
///   sigmoid), divided by their sum if the policy renormalises, times the scaling factor;
/// - threshold t: the router's selection scores restricted to the allowed groups and normalised
///   to sum to 1, the XMoE rule on them; the chosen experts weighted as top-k weights its set;
/// - dense: every expert (no group limit), weighted as top-k weights its set; a sigmoid router
///   renormalises iff `norm_topk_prob`.
///
/// `out.probs` holds the distribution a threshold ranks on before the group limit (V2: p; V3:
/// the normalised selection scores), and `out.top1` its maximum.
pub fn route_with(
    logits: &[f32],
    router: &Router,
    policy: CheckedPolicy,
    capacity_factor: Option<CapacityFactor>,
    out: &mut Routing,
) -> Result<(), RoutingError> {
    let n_experts = policy.n_experts;
    let (limit, scaling) = match router {
        Router::Softmax => return super::route(logits, policy, capacity_factor, out),
        Router::SoftmaxGroups(r) => (r.groups, r.scaling),
        Router::Sigmoid(r) => {
            if r.bias.len() != n_experts {
                return Err(RoutingError::BadBias {
                    expected: n_experts,
                    found: r.bias.len(),
                });
            }
            (Some(r.groups), r.scaling)
        }
    };
    let k = match policy.policy {
        RoutingPolicy::TopK { k, .. } => k,
        _ => 1,
    };
    if let Some(g) = limit {
        g.check(n_experts, k)?;
    }
    let tokens = begin(logits, n_experts, out)?;
    let policy = policy.policy;
    // Per-row scratch: native weight values, selection values (masked groups NEG_INFINITY),
    // group scores and group order.
    let mut weight = vec![0f32; n_experts];
    let mut select = vec![0f32; n_experts];
    let mut group_order: Vec<usize> = Vec::new();
    let mut group_score: Vec<f32> = Vec::new();
    for (row, probs) in logits
        .chunks_exact(n_experts)
        .zip(out.probs.chunks_exact_mut(n_experts))
    {
        // Native weight values and choice values, before any group limit.
        match router {
            Router::Softmax => unreachable!("handled above"),
            Router::SoftmaxGroups(_) => {
                softmax_into(row, &mut weight);
                select.copy_from_slice(&weight);
                probs.copy_from_slice(&weight);
            }
            Router::Sigmoid(r) => {
                for (e, &z) in row.iter().enumerate() {
                    weight[e] = sigmoid(z);
                    select[e] = weight[e] + r.bias[e];
                }
                let by = |e: usize| match r.selection {
                    SigmoidSelection::Biased => select[e].max(0.0),
                    SigmoidSelection::Unbiased => weight[e],
                };
                let sum: f32 = (0..n_experts).map(by).sum();
                for (e, p) in probs.iter_mut().enumerate() {
                    *p = if sum > 0.0 { by(e) / sum } else { 0.0 };
                }
            }
        }
        out.top1.push(probs.iter().copied().fold(0.0, f32::max));
        // The group limit (not for dense, which uses every expert).
        if let (Some(g), false) = (limit, policy == RoutingPolicy::Dense) {
            let size = g.size(n_experts);
            group_score.clear();
            for members in select.chunks_exact(size) {
                group_score.push(match router {
                    Router::Sigmoid(_) => top2_sum(members),
                    _ => members.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                });
            }
            group_order.clear();
            group_order.extend(0..g.n_group);
            group_order.sort_by(|&a, &b| group_score[b].total_cmp(&group_score[a]).then(a.cmp(&b)));
            for &dropped in &group_order[g.topk_group..] {
                select[dropped * size..(dropped + 1) * size].fill(f32::NEG_INFINITY);
            }
        }
        out.order.clear();
        out.order
            .extend((0..n_experts as u16).filter(|&e| select[e as usize] > f32::NEG_INFINITY));
        // Descending selection value; ties go to the lower expert id.
        out.order.sort_unstable_by(|&a, &b| {
            select[b as usize]
                .total_cmp(&select[a as usize])
                .then(a.cmp(&b))
        });
        let start = out.experts.len();
        match policy {
            RoutingPolicy::TopK { k, .. } => out.experts.extend_from_slice(&out.order[..k]),
            RoutingPolicy::Dense => out.experts.extend_from_slice(&out.order),
            RoutingPolicy::Threshold { t, .. } => {
                // The distribution the rule runs on: the selection scores of the allowed experts,
                // normalised to sum to 1.
                let score = |e: usize| match router {
                    Router::Sigmoid(r) if r.selection == SigmoidSelection::Unbiased => weight[e],
                    _ => select[e].max(0.0),
                };
                let sum: f32 = out.order.iter().map(|&e| score(e as usize)).sum();
                // Descending in the distribution itself (the unbiased scores can order the
                // experts differently from the choice values); the stable sort leaves equal
                // scores in choice order.
                out.order
                    .sort_by(|&a, &b| score(b as usize).total_cmp(&score(a as usize)));
                let mut cum = 0.0f32;
                for (rank, &e) in out.order.iter().enumerate() {
                    // All-zero scores (every biased score negative): the first expert alone.
                    let p = if sum > 0.0 {
                        score(e as usize) / sum
                    } else {
                        1.0
                    };
                    cum += p;
                    if !threshold_keeps(rank, cum, p, t) {
                        break;
                    }
                    out.experts.push(e);
                }
            }
        }
        let renormalize = match (policy, router) {
            (RoutingPolicy::Dense, Router::Sigmoid(r)) => r.norm_topk_prob,
            _ => policy.renormalizes(),
        };
        let chosen = &out.experts[start..];
        // transformers adds 1e-20 to the denominator.
        let denominator = if renormalize {
            chosen.iter().map(|&e| weight[e as usize]).sum::<f32>() + 1e-20
        } else {
            1.0
        };
        out.weights.extend(
            chosen
                .iter()
                .map(|&e| weight[e as usize] / denominator * scaling),
        );
        out.offsets.push(out.experts.len() as u32);
    }
    out.kept.resize(out.experts.len(), true);
    if let Some(cf) = capacity_factor {
        apply_capacity(out, expert_capacity(cf.get(), tokens, n_experts));
    }
    Ok(())
}

/// The logistic function in f32, as torch's `sigmoid`.
fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// Sum of the two largest values (V3's group score; a group of one scores its one value).
fn top2_sum(v: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &x in v {
        if x > a {
            b = a;
            a = x;
        } else if x > b {
            b = x;
        }
    }
    if b == f32::NEG_INFINITY { a } else { a + b }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3(bias: Vec<f32>, n_group: usize, topk_group: usize) -> Router {
        Router::Sigmoid(SigmoidRouter {
            bias,
            groups: GroupLimit {
                n_group,
                topk_group,
            },
            norm_topk_prob: true,
            scaling: 2.5,
            selection: SigmoidSelection::Biased,
        })
    }

    fn v2(groups: Option<GroupLimit>) -> Router {
        Router::SoftmaxGroups(SoftmaxGroups {
            groups,
            scaling: 16.0,
        })
    }

    fn logit(s: f32) -> f32 {
        (s / (1.0 - s)).ln()
    }

    fn run(logits: &[f32], router: &Router, policy: RoutingPolicy) -> Routing {
        let mut out = Routing::default();
        let e = logits.len();
        route_with(logits, router, policy.check(e).unwrap(), None, &mut out).unwrap();
        out
    }

    fn chosen(r: &Routing, t: usize) -> Vec<(usize, f32)> {
        let mut v: Vec<(usize, f32)> = r.choices(t).map(|(e, w, _)| (e, w)).collect();
        v.sort_by_key(|&(e, _)| e);
        v
    }

    const TOP2: RoutingPolicy = RoutingPolicy::TopK {
        k: 2,
        renormalize: true,
    };

    #[test]
    fn v3_groups_rank_by_the_sum_of_their_two_best_not_their_best() {
        // Group 0 = experts 0..4 holds the single best score (0.95) but then 0.1s; group 1 has
        // 0.8 and 0.7 (sum 1.5 > 1.05). Only group 1 is kept, so expert 0 is not chosen.
        let s = [0.95, 0.1, 0.1, 0.1, 0.8, 0.7, 0.2, 0.1];
        let logits: Vec<f32> = s.iter().map(|&x| logit(x)).collect();
        let r = run(&logits, &v3(vec![0.0; 8], 2, 1), TOP2);
        let got = chosen(&r, 0);
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![4, 5]);
        // Weights: the sigmoid scores over their sum, times 2.5.
        assert!((got[0].1 - 0.8 / 1.5 * 2.5).abs() < 1e-5, "{got:?}");
        assert!((got[1].1 - 0.7 / 1.5 * 2.5).abs() < 1e-5, "{got:?}");
        // Both groups kept: the plain top-2 (experts 0 and 4).
        let r = run(&logits, &v3(vec![0.0; 8], 2, 2), TOP2);
        assert_eq!(
            chosen(&r, 0).iter().map(|g| g.0).collect::<Vec<_>>(),
            vec![0, 4]
        );
    }

    #[test]
    fn v3_bias_changes_the_choice_but_not_the_weight() {
        let s = [0.9, 0.8, 0.7, 0.1];
        let logits: Vec<f32> = s.iter().map(|&x| logit(x)).collect();
        let plain = run(&logits, &v3(vec![0.0; 4], 1, 1), TOP2);
        assert_eq!(
            chosen(&plain, 0).iter().map(|g| g.0).collect::<Vec<_>>(),
            vec![0, 1]
        );
        // A bias of +0.15 on expert 2 lifts its choice value to 0.85 > 0.8: it replaces expert 1,
        // and is weighted by its unbiased 0.7.
        let biased = run(&logits, &v3(vec![0.0, 0.0, 0.15, 0.0], 1, 1), TOP2);
        let got = chosen(&biased, 0);
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![0, 2]);
        assert!((got[0].1 - 0.9 / 1.6 * 2.5).abs() < 1e-5, "{got:?}");
        assert!((got[1].1 - 0.7 / 1.6 * 2.5).abs() < 1e-5, "{got:?}");
        // The same set without the bias weighs the same: the bias never reaches the weights.
        let no_renorm = RoutingPolicy::TopK {
            k: 2,
            renormalize: false,
        };
        let raw = run(&logits, &v3(vec![0.0, 0.0, 0.15, 0.0], 1, 1), no_renorm);
        assert!((chosen(&raw, 0)[1].1 - 0.7 * 2.5).abs() < 1e-5);
    }

    #[test]
    fn ties_go_to_the_lower_group_and_the_lower_expert() {
        // Two identical groups: group 0 wins the tie; inside it experts 0 and 1 tie with each
        // other and beat 2 and 3.
        let s = [0.6, 0.6, 0.3, 0.3, 0.6, 0.6, 0.3, 0.3];
        let logits: Vec<f32> = s.iter().map(|&x| logit(x)).collect();
        let r = run(
            &logits,
            &v3(vec![0.0; 8], 2, 1),
            RoutingPolicy::TopK {
                k: 1,
                renormalize: true,
            },
        );
        assert_eq!(chosen(&r, 0)[0].0, 0);
        let p = [0.2, 0.05, 0.05, 0.2, 0.2, 0.05, 0.05, 0.2];
        let logits: Vec<f32> = p.iter().map(|x: &f32| x.ln()).collect();
        let groups = Some(GroupLimit {
            n_group: 2,
            topk_group: 1,
        });
        let r = run(&logits, &v2(groups), TOP2);
        assert_eq!(
            chosen(&r, 0).iter().map(|g| g.0).collect::<Vec<_>>(),
            vec![0, 3]
        );
    }

    #[test]
    fn v2_groups_rank_by_their_best_and_weights_are_scaled_probabilities() {
        // Group 0 (experts 0..4) has the best single probability 0.3; group 1 has 0.25 + 0.2 (a
        // larger sum, which V2 ignores).
        let p = [0.3, 0.05, 0.05, 0.05, 0.25, 0.2, 0.05, 0.05];
        let logits: Vec<f32> = p.iter().map(|x: &f32| x.ln()).collect();
        let groups = Some(GroupLimit {
            n_group: 2,
            topk_group: 1,
        });
        let native = RoutingPolicy::TopK {
            k: 2,
            renormalize: false,
        };
        let r = run(&logits, &v2(groups), native);
        let got = chosen(&r, 0);
        // Expert 0 and one of the 0.05s of group 0 (the lowest id on the tie): not expert 4.
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![0, 1]);
        assert!((got[0].1 - 0.3 * 16.0).abs() < 1e-4 && (got[1].1 - 0.05 * 16.0).abs() < 1e-4);
        // greedy: the global top-2.
        let r = run(&logits, &v2(None), native);
        assert_eq!(
            chosen(&r, 0).iter().map(|g| g.0).collect::<Vec<_>>(),
            vec![0, 4]
        );
    }

    #[test]
    fn threshold_runs_on_the_allowed_groups_normalised() {
        // V2, group 0 kept: its probabilities 0.3, 0.05 x3 (sum 0.45) normalise to 0.667, 0.111
        // x3. t = 0.7 takes expert 0 (before 0 < 0.7) and expert 1 (before 0.667 < 0.7), and
        // stops at expert 2 (before 0.778). On the unrestricted p it would stop after 0 and 4.
        let p = [0.3, 0.05, 0.05, 0.05, 0.25, 0.2, 0.05, 0.05];
        let logits: Vec<f32> = p.iter().map(|x: &f32| x.ln()).collect();
        let groups = Some(GroupLimit {
            n_group: 2,
            topk_group: 1,
        });
        let r = run(&logits, &v2(groups), RoutingPolicy::threshold(0.7));
        let got = chosen(&r, 0);
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![0, 1]);
        // Weighted as the native rule weights that set: p x 16, not the normalised scores.
        assert!((got[0].1 - 0.3 * 16.0).abs() < 1e-4);
        // probs/top1 describe the unrestricted softmax.
        assert!((r.top1[0] - 0.3).abs() < 1e-6);
    }

    #[test]
    fn sigmoid_threshold_selection_scores_are_selectable() {
        // s = 0.9, 0.6, 0.5, 0.1 with a bias of -0.45 on expert 1: biased scores 0.9, 0.15,
        // 0.5, 0.1 (sum 1.65), unbiased 0.9, 0.6, 0.5, 0.1 (sum 2.1).
        let s = [0.9, 0.6, 0.5, 0.1];
        let logits: Vec<f32> = s.iter().map(|&x| logit(x)).collect();
        let bias = vec![0.0, -0.45, 0.0, 0.0];
        let t = RoutingPolicy::threshold(0.6).with_renormalize(true);
        // Biased: 0.545 (expert 0), then 0.303 (expert 2): before 0.545 < 0.6; then expert 1:
        // before 0.848, stop. {0, 2}, the router's own ranking.
        let r = run(&logits, &v3(bias.clone(), 1, 1), t);
        let got = chosen(&r, 0);
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![0, 2]);
        // Weights: unbiased scores of the set, renormalised (policy flag), times 2.5.
        assert!((got[0].1 - 0.9 / 1.4 * 2.5).abs() < 1e-5, "{got:?}");
        assert!((got[1].1 - 0.5 / 1.4 * 2.5).abs() < 1e-5, "{got:?}");
        let Router::Sigmoid(mut unbiased) = v3(bias, 1, 1) else {
            unreachable!()
        };
        unbiased.selection = SigmoidSelection::Unbiased;
        // Unbiased: 0.429 (expert 0), then 0.286 (expert 1): before 0.429 < 0.6; then expert 2:
        // before 0.714, stop. {0, 1}, though the router ranks expert 1 last.
        let r = run(&logits, &Router::Sigmoid(unbiased), t);
        let got = chosen(&r, 0);
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![0, 1]);
        assert!((got[1].1 - 0.6 / 1.5 * 2.5).abs() < 1e-5, "{got:?}");
        assert_eq!("unbiased".parse(), Ok(SigmoidSelection::Unbiased));
        assert!("both".parse::<SigmoidSelection>().is_err());
    }

    #[test]
    fn dense_uses_every_expert_and_the_native_normalisation() {
        let s = [0.9, 0.5, 0.5, 0.1];
        let logits: Vec<f32> = s.iter().map(|&x| logit(x)).collect();
        let r = run(&logits, &v3(vec![0.0; 4], 2, 1), RoutingPolicy::Dense);
        let w: f32 = r.choices(0).map(|(_, w, _)| w).sum();
        assert_eq!(r.selected(0), 4);
        assert!((w - 2.5).abs() < 1e-5, "{w}");
    }

    #[test]
    fn bad_groups_and_bias_are_errors() {
        let logits = [0f32; 6];
        let mut out = Routing::default();
        let bad = v3(vec![0.0; 6], 4, 1);
        let e = route_with(&logits, &bad, TOP2.check(6).unwrap(), None, &mut out).unwrap_err();
        assert!(e.to_string().contains("n_group must divide"), "{e}");
        let few = v3(vec![0.0; 6], 6, 1);
        let e = route_with(&logits, &few, TOP2.check(6).unwrap(), None, &mut out).unwrap_err();
        assert!(e.to_string().contains("fewer than the 2"), "{e}");
        let short = v3(vec![0.0; 5], 1, 1);
        let e = route_with(&logits, &short, TOP2.check(6).unwrap(), None, &mut out).unwrap_err();
        assert!(e.to_string().contains("5"), "{e}");
    }
}
