//! A JSON report read back by `xmoe-top report` (`src/report/json.rs` and the checks of
//! `src/report/validate.rs`), then rendered in every format as that command does.
#![no_main]
use libfuzzer_sys::fuzz_target;
use xmoe_top::report::{ReportFormat, json};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(report) = json::read(text) {
        for format in ReportFormat::ALL {
            let _ = format.render(&report);
        }
    }
});
