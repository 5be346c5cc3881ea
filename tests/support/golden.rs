//! Reading the committed Hugging Face goldens and loading fixture checkpoints, shared by the
//! golden tests of every family and format.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use xmoe_top::model::forward::Model;
use xmoe_top::model::trace::ForwardTrace;
use xmoe_top::model::{LoadOptions, ModelSource, MoeDispatch, RoutingConfig};

/// `tests/fixtures/hf` of this checkout.
pub fn hf_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf")
}

/// Every tensor of a golden file.
pub fn golden_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// The golden's `input_ids` as token ids.
pub fn input_ids(g: &HashMap<String, Tensor>) -> Vec<u32> {
    g["input_ids"]
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

/// A tensor's values as f32, flattened.
pub fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Loads a checkpoint (directory, file) on the CPU with `options`, panicking with its path.
pub fn load_with(path: &Path, options: LoadOptions) -> Model {
    let source = ModelSource::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Model::from_source(&source, &Device::Cpu, options)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// [`load_with`] with one MoE dispatch and default options otherwise.
pub fn load(path: &Path, dispatch: MoeDispatch) -> Model {
    load_with(
        path,
        LoadOptions {
            dispatch,
            ..Default::default()
        },
    )
}

/// A pass over `tokens` as 2 sequences with no cache: logits and trace.
pub fn run(model: &Model, tokens: &[u32], routing: &RoutingConfig) -> (Vec<f32>, ForwardTrace) {
    let mut trace = ForwardTrace::default();
    let logits = model.forward(tokens, 2, routing, None, &mut trace).unwrap();
    (logits, trace)
}

/// Largest |a - b|.
pub fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Largest |a - b| / (1 + |b|), the measure the safetensors tests bound by 1e-4.
pub fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f32::max)
}

/// Per MoE slot and token, the golden's (expert, weight) pairs sorted by expert
/// (`torch.topk(sorted=False)`: the order is unspecified).
pub fn golden_choices(g: &HashMap<String, Tensor>, model: &Model) -> Vec<Vec<Vec<(usize, f32)>>> {
    model
        .moe_layers()
        .iter()
        .map(|&layer| {
            let ids: Vec<i64> = g[&format!("topk_ids.{layer}")]
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let w = f32s(&g[&format!("topk_weights.{layer}")]);
            let k = g[&format!("topk_ids.{layer}")].dims()[1];
            (0..ids.len() / k)
                .map(|t| {
                    let mut v: Vec<(usize, f32)> = (0..k)
                        .map(|r| (ids[t * k + r] as usize, w[t * k + r]))
                        .collect();
                    v.sort_by_key(|p| p.0);
                    v
                })
                .collect()
        })
        .collect()
}

/// Per MoE slot and token, the pass's (expert, weight) pairs sorted by expert.
pub fn choices(trace: &ForwardTrace) -> Vec<Vec<Vec<(usize, f32)>>> {
    trace
        .moe
        .iter()
        .map(|m| {
            (0..m.routing.tokens())
                .map(|t| {
                    let mut v: Vec<(usize, f32)> =
                        m.routing.choices(t).map(|(e, w, _)| (e, w)).collect();
                    v.sort_by_key(|p| p.0);
                    v
                })
                .collect()
        })
        .collect()
}
