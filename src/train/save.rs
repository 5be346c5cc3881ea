//! Writing a trained model as one safetensors file in the project's format (`docs/model-format.md`),
//! through the same writer and checker as every other model file.

use std::path::Path;

use safetensors::Dtype;

use super::model::TrainModel;
use crate::model::format::{ModelFile, StoreDtype, expected_tensors, write_model};

/// Saves every parameter in f16 with the configuration JSON under `__metadata__["xmoe_config"]`,
/// atomically (a checkpoint being replaced is never seen half-written).
pub fn save_safetensors(model: &TrainModel, path: &Path) -> anyhow::Result<()> {
    let mut tensors = Vec::new();
    for p in model.params() {
        let t = p.var.as_tensor();
        let data = t.flatten_all()?.to_vec1::<f32>()?;
        anyhow::ensure!(
            data.iter().all(|v| v.is_finite()),
            "parameter {} has non-finite values",
            p.name
        );
        tensors.push((p.name.clone(), t.dims().to_vec(), data));
    }
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    write_model(path, model.config(), &tensors, StoreDtype::F16, true)
}

/// Reads a saved file back with the engine's checks (header, configuration, every tensor's
/// presence, shape and dtype), then insists on exactly the trainer's tensors, stored in f16, with
/// finite values. Returns the checked file.
pub fn check_saved(path: &Path) -> anyhow::Result<ModelFile> {
    let file = ModelFile::open(path)?;
    anyhow::ensure!(
        file.warnings().is_empty(),
        "unexpected tensors: {:?}",
        file.warnings()
    );
    for (name, _) in expected_tensors(file.config(), |_| false) {
        let raw = file.raw(&name);
        anyhow::ensure!(
            raw.dtype == Dtype::F16,
            "tensor {name}: dtype {:?}",
            raw.dtype
        );
        anyhow::ensure!(
            raw.to_f32().iter().all(|v| v.is_finite()),
            "tensor {name} has non-finite values"
        );
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::model::TrainModel;
    use candle_core::{Device, Tensor};

    #[test]
    fn saved_file_round_trips_config_and_shapes() {
        let mut cfg = crate::model::config::tests::small();
        cfg.name = "roundtrip".into();
        let model = TrainModel::new(&cfg, 0.9, 3, 0.02, 0.02, &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        save_safetensors(&model, &path).unwrap();
        let back = check_saved(&path).unwrap();
        assert_eq!(back.config(), &cfg);
        // Values survive (to f16 precision).
        let p = &model.params()[0];
        let want = p
            .var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let got = back.f32(&p.name);
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-3 * b.abs().max(1e-3), "{a} vs {b}");
        }
        // A forward pass works and routes at least one expert per token.
        let ids = Tensor::from_vec((0..20u32).collect::<Vec<_>>(), (2, 10), &Device::Cpu).unwrap();
        let out = model.forward(&ids).unwrap();
        assert_eq!(out.logits.dims(), &[20, 256]);
        assert!(out.layers.iter().all(|l| l.pairs >= l.tokens));
    }
}
