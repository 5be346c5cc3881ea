//! Splitting an FFN's neurons into `E` equal groups (the experts).
//!
//! MoEfication (Zhang et al. 2022) groups neurons that fire together, so that a token needs few
//! groups. Each neuron is described by how strongly it fires on each calibration token (`|h_i|`
//! over the tokens, scaled to unit length), and neurons are clustered by balanced spherical
//! k-means: similarity is the cosine of two neurons' firing patterns (their co-activation), and
//! every cluster holds exactly `H / E` neurons. The random split is the baseline it must beat.

use anyhow::Result;
use candle_core::{D, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

/// How neurons are grouped into experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SplitKind {
    /// Balanced clustering of co-activation patterns (MoEfication).
    Coactivation,
    /// A random permutation (the baseline).
    Random,
}

impl std::fmt::Display for SplitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SplitKind::Coactivation => "co-activation",
            SplitKind::Random => "random",
        })
    }
}

/// k-means rounds at most (it usually settles sooner).
const ROUNDS: usize = 20;

/// The neuron order that puts expert `e`'s neurons at `e·H/E .. (e+1)·H/E`, from the activations
/// `h` `[n, H]` of the calibration tokens.
pub fn split(h: &Tensor, experts: usize, kind: SplitKind, seed: u64) -> Result<Vec<u32>> {
    let width = h.dim(1)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let groups = match kind {
        SplitKind::Random => {
            let mut p: Vec<u32> = (0..width as u32).collect();
            p.shuffle(&mut rng);
            return Ok(p);
        }
        SplitKind::Coactivation => coactivation_groups(h, experts, &mut rng)?,
    };
    let mut perm = Vec::with_capacity(width);
    for e in 0..experts {
        perm.extend((0..width).filter(|&i| groups[i] == e).map(|i| i as u32));
    }
    Ok(perm)
}

/// Expert of each neuron, by balanced spherical k-means on the normalised firing patterns.
fn coactivation_groups(h: &Tensor, experts: usize, rng: &mut StdRng) -> Result<Vec<usize>> {
    let width = h.dim(1)?;
    let size = width / experts;
    let a = unit_rows(&h.abs()?.t()?.contiguous()?)?; // [H, n]
    let mut seeds: Vec<usize> = (0..width).collect();
    seeds.shuffle(rng);
    let idx = Tensor::from_vec(
        seeds[..experts]
            .iter()
            .map(|&i| i as u32)
            .collect::<Vec<_>>(),
        experts,
        a.device(),
    )?;
    let mut centroids = a.index_select(&idx, 0)?; // [E, n]
    let mut assign = vec![usize::MAX; width];
    for _ in 0..ROUNDS {
        let sim = a.matmul(&centroids.t()?)?.flatten_all()?.to_vec1::<f32>()?; // [H, E]
        let next = balanced_assign(&sim, width, experts, size);
        if next == assign {
            break;
        }
        assign = next;
        let mut onehot = vec![0f32; experts * width];
        for (i, &e) in assign.iter().enumerate() {
            onehot[e * width + i] = 1.0;
        }
        let m = Tensor::from_vec(onehot, (experts, width), a.device())?;
        centroids = unit_rows(&m.matmul(&a)?)?;
    }
    Ok(assign)
}

/// Greedy balanced assignment: the most similar (neuron, expert) pairs first, each neuron once,
/// each expert at most `size` neurons.
fn balanced_assign(sim: &[f32], width: usize, experts: usize, size: usize) -> Vec<usize> {
    let mut pairs: Vec<u32> = (0..(width * experts) as u32).collect();
    pairs.sort_unstable_by(|&x, &y| sim[y as usize].total_cmp(&sim[x as usize]).then(x.cmp(&y)));
    let mut assign = vec![usize::MAX; width];
    let mut fill = vec![0usize; experts];
    for p in pairs {
        let (i, e) = (p as usize / experts, p as usize % experts);
        if assign[i] == usize::MAX && fill[e] < size {
            assign[i] = e;
            fill[e] += 1;
        }
    }
    assign
}

/// Rows scaled to unit length (all-zero rows stay zero).
fn unit_rows(m: &Tensor) -> Result<Tensor> {
    let norms = m
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f32::MAX)?;
    Ok(m.broadcast_div(&norms)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn neurons_that_fire_together_share_an_expert_and_groups_are_equal() {
        // 8 neurons, 2 experts: neurons {0,2,5,7} fire on even tokens, {1,3,4,6} on odd ones.
        let firing = [0usize, 2, 5, 7];
        let n = 64;
        let mut v = vec![0f32; n * 8];
        for t in 0..n {
            for i in 0..8 {
                let on = firing.contains(&i) == (t % 2 == 0);
                v[t * 8 + i] = if on { 1.0 + (i as f32) * 0.1 } else { 0.01 };
            }
        }
        let h = Tensor::from_vec(v, (n, 8), &Device::Cpu).unwrap();
        for seed in 0..5 {
            let perm = split(&h, 2, SplitKind::Coactivation, seed).unwrap();
            let mut first: Vec<u32> = perm[..4].to_vec();
            first.sort_unstable();
            let mut all = perm.clone();
            all.sort_unstable();
            assert_eq!(all, (0..8).collect::<Vec<u32>>(), "a permutation");
            assert!(
                first == [0, 2, 5, 7] || first == [1, 3, 4, 6],
                "seed {seed}: {perm:?}"
            );
        }
        let r = split(&h, 2, SplitKind::Random, 3).unwrap();
        let mut all = r.clone();
        all.sort_unstable();
        assert_eq!(all, (0..8).collect::<Vec<u32>>());
    }
}
