//! A routing trace (JSON Lines, `docs/trace-format.md`) read back by `TraceReader`
//! (`src/report/trace.rs`): the header line, then every record.
#![no_main]
use libfuzzer_sys::fuzz_target;
use xmoe_top::report::TraceReader;

fuzz_target!(|data: &[u8]| {
    if let Ok(reader) = TraceReader::new(data) {
        let _ = reader.header();
        for record in reader {
            let _ = record;
        }
    }
});
