//! The header of a safetensors shard of a Hugging Face checkpoint (`src/model/hf/mod.rs`), read
//! as `HfCheckpoint::open` reads it: once as a whole file, once as the head of a 1 TiB file.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use xmoe_top::model::hf::check_shard_header;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("model.safetensors");
    let _ = check_shard_header(path, data, data.len());
    let _ = check_shard_header(path, data, 1 << 40);
});
