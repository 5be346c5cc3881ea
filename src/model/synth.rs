//! Random models with a chosen configuration: for tests, benchmarks and the GPU check. No weights
//! are ever downloaded; a random model is only ever a stand-in for measuring the engine, never
//! shown as a trained one.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::config::{ModelConfig, NormKind};
use super::format::expected_tensors;

/// Random weights for every tensor `cfg` calls for, in the stacked expert form (or one tensor per
/// expert when `per_expert`). Linear weights are uniform with standard deviation 1/sqrt(fan_in);
/// router weights are scaled by `router_scale` so that routing is not uniform.
pub fn random_weights(
    cfg: &ModelConfig,
    seed: u64,
    per_expert: bool,
    router_scale: f32,
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    expected_tensors(cfg, |_| per_expert)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let fan_in = *shape.last().expect("tensors have a shape") as f32;
            let is_norm = name.contains("norm");
            let values: Vec<f32> = if is_norm && name.ends_with(".weight") {
                (0..n).map(|_| 1.0 + rng.random_range(-0.1..0.1)).collect()
            } else if name.ends_with("bias") || (is_norm && cfg.norm == NormKind::LayerNorm) {
                (0..n).map(|_| rng.random_range(-0.05..0.05)).collect()
            } else {
                let scale = if name.contains("router") {
                    router_scale
                } else if name.contains("embeddings") {
                    1.0
                } else {
                    1.0 / fan_in.sqrt()
                };
                let a = scale * 3f32.sqrt();
                (0..n).map(|_| rng.random_range(-a..a)).collect()
            };
            (name, shape, values)
        })
        .collect()
}
