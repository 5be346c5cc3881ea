//! The `data.pkl` of a torch.save archive decoded as plain data (`src/import/torch_file.rs`):
//! the pre-scan, candle's pickle machine and the conversion, with every tensor storage 256 bytes
//! of counting data (inside a zip the CRC would stop most mutations before the pickle), then
//! every torch.save format's reader and the summary.
#![no_main]
use std::rc::Rc;

use libfuzzer_sys::fuzz_target;
use xmoe_top::import::analysis::{PlacementChoice, summarize};
use xmoe_top::import::torch_file::decode_pickle;
use xmoe_top::import::{Format, from_value};

fuzz_target!(|data: &[u8]| {
    let storage = Rc::new((0u8..=255).collect::<Vec<u8>>());
    let mut lookup = |_: &str| Ok(storage.clone());
    if let Ok(value) = decode_pickle(data, &mut lookup) {
        for format in [
            None,
            Some(Format::SglangStat),
            Some(Format::SglangPerPass),
            Some(Format::SglangPerToken),
            Some(Format::VllmEplb),
        ] {
            if let Ok(dump) = from_value(&value, format) {
                let _ = summarize(&dump, "fuzz", &PlacementChoice::Gpus(2), None);
            }
        }
    }
});
