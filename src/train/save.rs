//! Writing a trained model as one safetensors file in the project's format (`docs/model-format.md`).

use std::collections::HashMap;
use std::path::Path;

use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};

use super::model::TrainModel;
use crate::model::config::{METADATA_KEY, ModelConfig};

/// Saves every parameter in f16 with the configuration JSON under `__metadata__["xmoe_config"]`.
pub fn save_safetensors(model: &TrainModel, path: &Path) -> anyhow::Result<()> {
    let mut blobs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for p in model.params() {
        let t = p.var.as_tensor();
        let data = t.flatten_all()?.to_vec1::<f32>()?;
        anyhow::ensure!(
            data.iter().all(|v| v.is_finite()),
            "parameter {} has non-finite values",
            p.name
        );
        let bytes: Vec<u8> = data
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        blobs.push((p.name.clone(), t.dims().to_vec(), bytes));
    }
    let views = blobs
        .iter()
        .map(|(name, shape, bytes)| {
            Ok((
                name.clone(),
                TensorView::new(Dtype::F16, shape.clone(), bytes)?,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let meta = HashMap::from([(METADATA_KEY.to_string(), model.config().to_json())]);
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    safetensors::serialize_to_file(views, Some(meta), path)?;
    Ok(())
}

/// Names and shapes of the tensors the trainer writes for `cfg` (stacked expert form).
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (v, d, e, h) = (
        cfg.vocab_size,
        cfg.d_model,
        cfg.n_experts,
        cfg.expert_hidden,
    );
    let mut out = vec![
        ("tok_embeddings.weight".to_string(), vec![v, d]),
        (
            "pos_embeddings.weight".to_string(),
            vec![cfg.max_seq_len, d],
        ),
        ("norm_f.weight".to_string(), vec![d]),
        ("norm_f.bias".to_string(), vec![d]),
    ];
    for i in 0..cfg.n_layers {
        let p = |s: &str| format!("layers.{i}.{s}");
        for n in [
            "attn_norm.weight",
            "attn_norm.bias",
            "ffn_norm.weight",
            "ffn_norm.bias",
        ] {
            out.push((p(n), vec![d]));
        }
        for n in ["q", "k", "v", "o"] {
            out.push((p(&format!("attn.{n}_proj.weight")), vec![d, d]));
        }
        out.push((p("moe.router.weight"), vec![e, d]));
        out.push((p("moe.experts.up_proj"), vec![e, h, d]));
        out.push((p("moe.experts.up_bias"), vec![e, h]));
        out.push((p("moe.experts.down_proj"), vec![e, d, h]));
        out.push((p("moe.experts.down_bias"), vec![e, d]));
    }
    out
}

/// Reads a saved file back: parses the header and the configuration, and checks that exactly the
/// expected tensors are present with the expected shapes and finite values. Returns the
/// configuration.
pub fn check_saved(path: &Path) -> anyhow::Result<ModelConfig> {
    let bytes = std::fs::read(path)?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)?;
    let json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(METADATA_KEY))
        .ok_or_else(|| anyhow::anyhow!("no `{METADATA_KEY}` in the safetensors metadata"))?;
    let cfg = ModelConfig::from_json(json)?;
    let st = SafeTensors::deserialize(&bytes)?;
    let expected = expected_tensors(&cfg);
    anyhow::ensure!(
        st.len() == expected.len(),
        "{} tensors in the file, {} expected",
        st.len(),
        expected.len()
    );
    for (name, shape) in expected {
        let t = st
            .tensor(&name)
            .map_err(|e| anyhow::anyhow!("tensor {name}: {e}"))?;
        anyhow::ensure!(
            t.shape() == shape.as_slice(),
            "tensor {name}: shape {:?}, expected {shape:?}",
            t.shape()
        );
        anyhow::ensure!(
            t.dtype() == Dtype::F16,
            "tensor {name}: dtype {:?}",
            t.dtype()
        );
        anyhow::ensure!(
            t.data()
                .chunks_exact(2)
                .all(|c| half::f16::from_le_bytes([c[0], c[1]]).is_finite()),
            "tensor {name} has non-finite values"
        );
    }
    Ok(cfg)
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
        assert_eq!(back, cfg);
        // Values survive (to f16 precision).
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let p = &model.params()[0];
        let want = p
            .var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let got: Vec<f32> = st
            .tensor(&p.name)
            .unwrap()
            .data()
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
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
