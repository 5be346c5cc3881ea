//! A recording (`docs/recording-format.md`) read back by `record::Recording::from_bytes`
//! (`src/record/reader.rs`): magic, version, header chunk, the chunk walk, every frame decoded
//! (key frames and deltas), the notes, and the routing trace extracted and parsed. Built with
//! `--cfg fuzzing`, the reader skips chunk CRCs, so mutations reach the payloads.
#![no_main]
use libfuzzer_sys::fuzz_target;
use xmoe_top::record::Recording;
use xmoe_top::report::TraceReader;

fuzz_target!(|data: &[u8]| {
    if let Ok(mut r) = Recording::from_bytes(data.to_vec(), "fuzz") {
        let _ = r.notes();
        let n = r.frames().len();
        // Backwards too, so decoding starts from key frames and from the cache.
        for i in (0..n.min(64)).chain((0..n.min(64)).rev()) {
            let _ = r.frame(i);
        }
        let mut out = Vec::new();
        if r.write_trace(&mut out).is_ok()
            && let Ok(reader) = TraceReader::new(&out[..])
        {
            for record in reader {
                let _ = record;
            }
        }
    }
});
