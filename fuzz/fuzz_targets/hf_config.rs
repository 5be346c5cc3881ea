//! A Hugging Face `config.json` of any supported family (`src/model/hf/config.rs`), and the
//! `ModelConfig` and routing policy derived from one that parsed.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use xmoe_top::model::format::expected_tensors;
use xmoe_top::model::hf::HfConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = HfConfig::parse(Path::new("config.json"), text) {
        let _ = cfg.native_policy();
        let model = cfg.model_config("fuzz");
        let _ = model.moe_layer_indices();
        let _ = (model.head_dim(), model.kv_heads());
        let _ = expected_tensors(&model, |_| true);
    }
});
