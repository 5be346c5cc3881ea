//! `model.safetensors.index.json` of a sharded Hugging Face checkpoint (`src/model/hf/mod.rs`).
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use xmoe_top::model::hf::index_shard_files;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = index_shard_files(Path::new("model.safetensors.index.json"), text);
});
