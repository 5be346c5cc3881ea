//! A GGUF file (`src/model/gguf/`), opened as `GgufFile::open` opens it: candle-core's reader for
//! the header and metadata (shown a tensor count of 0), the project's own tensor index reader
//! (`index.rs`: every count and length bounded by the file size, ggml types named, MXFP4 among
//! them) and the check that every tensor's data lies in the file; then the tokenizer rebuilt from
//! the metadata (`workload::gguf_tokenizer`). The reader takes a path, so each input is written
//! to a file of this process first.
#![no_main]
use libfuzzer_sys::fuzz_target;
use xmoe_top::model::gguf::GgufFile;
use xmoe_top::workload::gguf_tokenizer;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("xmoe-fuzz-gguf-{}.gguf", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(file) = GgufFile::open(&path) {
        let _ = file.architecture();
        let _ = gguf_tokenizer::from_metadata(&path, file.metadata());
    }
});
