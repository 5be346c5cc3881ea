//! An engine dump read by `xmoe-top import` (`src/import/`, `docs/import-formats.md`): format
//! detection, the zip archive of a torch.save file or SGLang's JSON responses, every format's
//! reader, then the summary under two placements.
#![no_main]
use libfuzzer_sys::fuzz_target;
use xmoe_top::import::analysis::{PlacementChoice, summarize};
use xmoe_top::import::{Hints, parse};

fuzz_target!(|data: &[u8]| {
    let hints = Hints {
        layers: Some(2),
        top_k: Some(2),
        experts: None,
    };
    if let Ok(dump) = parse(data, None, hints) {
        for p in [PlacementChoice::Gpus(2), PlacementChoice::Spec("0;1-3".into())] {
            let _ = summarize(&dump, "fuzz", &p, Some(0.9));
        }
    }
});
