//! The project's own model format (`src/model/format.rs`): the safetensors header, the
//! `xmoe_config` metadata (a `ModelConfig` as JSON) and every tensor's presence, shape, dtype and
//! range, then the router weights' finiteness.
#![no_main]
use libfuzzer_sys::fuzz_target;
use xmoe_top::model::format::ModelFile;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = ModelFile::from_vec("fuzz.safetensors", data.to_vec()) {
        let _ = file.tensor_table();
        let _ = file.file_bytes();
        let _ = file.config().moe_layer_indices();
    }
});
