//! Reading the committed Hugging Face goldens and loading fixture checkpoints, shared by the
//! golden tests of every family and format.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use xmoe_top::model::forward::Model;
use xmoe_top::model::{LoadOptions, ModelSource, MoeDispatch};

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
