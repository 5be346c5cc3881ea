//! `tokenizer.json` through the `tokenizers` crate (`src/workload/tokenizer.rs`), then a short
//! encode/decode round with a tokenizer that loaded.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use xmoe_top::workload::tokenizer::TextTokenizer;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = TextTokenizer::from_bytes(Path::new("tokenizer.json"), data, 1 << 20)
        && let Ok(enc) = t.encode(b"The quick brown fox, 12 \xc3\xa9t\xc3\xa9s.")
    {
        let _ = t.decode(&enc.ids);
    }
});
