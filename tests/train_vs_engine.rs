//! The trainer's forward pass (`train::model`: candle, every expert run densely and masked by the
//! routing) and the engine's (`Model::forward`: only the selected experts) compute the same
//! function: one file written by the trainer's save path gives the same logits through both.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng, rngs::StdRng};
use xmoe_top::model::config::ModelConfig;
use xmoe_top::model::trace::ForwardTrace;
use xmoe_top::model::{Model, RoutingConfig};
use xmoe_top::routing::RoutingPolicy;
use xmoe_top::train::model::TrainModel;
use xmoe_top::train::save::save_safetensors;

/// Largest allowed |trainer - engine| per logit, relative to the largest |logit| of the pass:
/// the two sum in different orders in f32 (candle's dense matmuls over all experts against the
/// engine's per-expert kernel), so they agree to a few ulp, not bitwise (measured: 5e-7).
const REL_TOLERANCE: f32 = 1e-5;

/// The threshold the trainer routes with by default (`xmoe-top train --threshold`).
const TRAIN_THRESHOLD: f32 = 0.9;

#[test]
fn trainer_and_engine_compute_the_same_logits() {
    let cfg = ModelConfig {
        name: "train-vs-engine".into(),
        ..ModelConfig::byte_level(32, 2, 4, 16, 8, 16, 64)
    };
    let dev = Device::Cpu;
    // A peaked router (std 0.5) so that the threshold keeps different numbers of experts per
    // token; every other parameter, biases and norms included, random and non-trivial.
    let trained = TrainModel::new(&cfg, TRAIN_THRESHOLD, 11, 0.5, 0.1, &dev).unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    for p in trained.params() {
        let t = p.var.as_tensor();
        let noise: Vec<f32> = (0..t.elem_count())
            .map(|_| rng.random_range(-0.05f32..0.05))
            .collect();
        let noise = Tensor::from_vec(noise, t.dims(), &dev).unwrap();
        p.var.set(&(t + noise).unwrap()).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    save_safetensors(&trained, &path).unwrap();

    // Both read the saved (f16) weights, so both compute with exactly the same values.
    let mut trainer = TrainModel::from_file(&path, &dev).unwrap();
    let engine = Model::load(&path, &dev).unwrap();
    let (batch, seq) = (2, 12);
    let tokens: Vec<u32> = (0..batch * seq).map(|i| (i * 37 % 256) as u32).collect();
    let ids = Tensor::from_vec(tokens.clone(), (batch, seq), &dev).unwrap();
    let n_moe = engine.moe_layers().len();
    assert_eq!(n_moe, cfg.n_layers);

    for policy in [
        RoutingPolicy::Dense,
        RoutingPolicy::threshold(TRAIN_THRESHOLD),
    ] {
        trainer.set_policy(policy).unwrap();
        let out = trainer.forward(&ids).unwrap();
        let want = out.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        if let RoutingPolicy::Threshold { .. } = policy {
            // The comparison means something only if the threshold left experts out.
            let pairs: usize = out.layers.iter().map(|l| l.pairs).sum();
            let all = out.layers.iter().map(|l| l.tokens).sum::<usize>() * cfg.n_experts;
            assert!(pairs < all, "the threshold kept every expert");
        }

        let routing = RoutingConfig::uniform(policy, n_moe, cfg.n_experts).unwrap();
        let mut trace = ForwardTrace::default();
        let got = engine
            .forward(&tokens, batch, &routing, None, &mut trace)
            .unwrap();
        assert_eq!(got.len(), want.len(), "{policy}");
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{policy}: all logits are zero");
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst <= REL_TOLERANCE * scale,
            "{policy}: logits differ by up to {worst} (largest |logit| {scale})"
        );
    }
}
