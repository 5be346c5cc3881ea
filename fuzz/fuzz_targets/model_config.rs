//! The `ModelConfig` JSON stored in a model file's metadata (`src/model/config.rs`), and what is
//! derived from a configuration that passed its checks: the expected tensor list.
#![no_main]
use libfuzzer_sys::fuzz_target;
use xmoe_top::model::config::ModelConfig;
use xmoe_top::model::format::expected_tensors;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = ModelConfig::from_json(text) {
        let _ = expected_tensors(&cfg, |_| false);
        let _ = expected_tensors(&cfg, |_| true);
        let _ = (
            cfg.head_dim(),
            cfg.kv_heads(),
            cfg.split_ratio(),
            cfg.top_k_baseline(),
        );
        let _ = cfg.hf_only_fields();
    }
});
