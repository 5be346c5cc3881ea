//! Writes the example session reports (synthetic data pushed through the real statistics
//! pipeline; see `tests/common/fixtures.rs`) into a directory, every format: for previewing
//! the report layout without a model.
//!
//! `cargo run --release --example example_report -- DIR`

#[path = "../tests/common/fixtures.rs"]
#[allow(dead_code)]
mod fixtures;

use std::path::PathBuf;

use fixtures::example_snapshot;

use xmoe_top::profiling::snapshot::WorkloadKind;
use xmoe_top::report::{ReportData, ReportFormat, write_report};

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| ".".into()));
    for (name, kind, gpu) in [
        ("example-eval", WorkloadKind::Eval, true),
        ("example-generate", WorkloadKind::Generate, false),
    ] {
        let data = ReportData::new(example_snapshot(kind, 64, gpu), None);
        for f in ReportFormat::ALL {
            let path = dir.join(format!("{name}.{}", f.extension()));
            write_report(&data, &path, Some(f), true)?;
            println!("{}", path.display());
        }
    }
    Ok(())
}
