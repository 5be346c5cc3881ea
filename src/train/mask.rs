//! The threshold selection mask used in training: the same rule as
//! [`crate::routing::route`] with [`crate::routing::RoutingPolicy::Threshold`], written as a
//! 0/1 mask over a `tokens x experts` probability matrix so that training can run every expert
//! densely and multiply by the mask (the same function as sparse execution).

/// Selection statistics of one mask computation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MaskStats {
    /// Selected (token, expert) pairs.
    pub pairs: usize,
    /// For each expert, the number of tokens whose most probable expert it is.
    pub top1_counts: Vec<usize>,
}

/// Writes into `mask` (resized to `probs.len()`) 1.0 for every selected (token, expert) pair and
/// 0.0 elsewhere. `probs` holds softmax probabilities, `tokens x n_experts`, row-major.
///
/// The rule is XMoE's: experts in descending probability (ties to the lower id), an expert is
/// selected while the mass ranked before it is below `t`, and the first expert always.
pub fn threshold_mask(probs: &[f32], n_experts: usize, t: f32, mask: &mut Vec<f32>) -> MaskStats {
    assert!(n_experts > 0 && probs.len().is_multiple_of(n_experts));
    mask.clear();
    mask.resize(probs.len(), 0.0);
    let mut stats = MaskStats {
        pairs: 0,
        top1_counts: vec![0; n_experts],
    };
    let mut order: Vec<usize> = Vec::with_capacity(n_experts);
    for (row, m) in probs
        .chunks_exact(n_experts)
        .zip(mask.chunks_exact_mut(n_experts))
    {
        order.clear();
        order.extend(0..n_experts);
        order.sort_unstable_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        stats.top1_counts[order[0]] += 1;
        let mut cum = 0.0f32;
        for (rank, &e) in order.iter().enumerate() {
            cum += row[e];
            if !crate::routing::threshold_keeps(rank, cum, row[e], t) {
                break;
            }
            m[e] = 1.0;
            stats.pairs += 1;
        }
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{Routing, RoutingPolicy, route};
    use rand::{Rng, SeedableRng, rngs::StdRng};

    #[test]
    fn mask_equals_the_routing_module_on_random_probabilities() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut r = Routing::default();
        let mut mask = Vec::new();
        for &e in &[1usize, 2, 5, 16, 32] {
            for &t in &[0.05f32, 0.5, 0.9, 0.99, 1.0] {
                for scale in [0.1f32, 1.0, 6.0] {
                    let tokens = 50;
                    let logits: Vec<f32> = (0..tokens * e)
                        .map(|_| rng.random_range(-1.0f32..1.0) * scale)
                        .collect();
                    let policy = RoutingPolicy::threshold(t).check(e).unwrap();
                    route(&logits, policy, None, &mut r).unwrap();
                    let stats = threshold_mask(&r.probs, e, t, &mut mask);
                    assert_eq!(stats.pairs, r.pairs());
                    for i in 0..tokens {
                        let mut want: Vec<usize> = r.choices(i).map(|c| c.0).collect();
                        want.sort_unstable();
                        let got: Vec<usize> = (0..e).filter(|&x| mask[i * e + x] == 1.0).collect();
                        assert_eq!(got, want, "e={e} t={t} token {i}");
                    }
                    let top1: usize = stats.top1_counts.iter().sum();
                    assert_eq!(top1, tokens);
                }
            }
        }
    }

    #[test]
    fn crossing_expert_is_selected_and_ties_go_low() {
        let mut m = Vec::new();
        // 0.5 + 0.3 = 0.8 < 0.9 so the third (0.15) is selected too; the fourth is not.
        let s = threshold_mask(&[0.05, 0.5, 0.15, 0.3], 4, 0.9, &mut m);
        assert_eq!(m, vec![0.0, 1.0, 1.0, 1.0]);
        assert_eq!(s.pairs, 3);
        assert_eq!(s.top1_counts, vec![0, 1, 0, 0]);
        let s = threshold_mask(&[0.25; 4], 4, 0.5, &mut m);
        assert_eq!(m, vec![1.0, 1.0, 0.0, 0.0]);
        assert_eq!(s.top1_counts, vec![1, 0, 0, 0]);
    }
}
