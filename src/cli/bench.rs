//! `xmoe-top bench`: whole-model throughput per policy and model load time, on any device.

use std::process::ExitCode;

use super::exit::Classify;
use anyhow::Result;
use clap::Args;

use crate::model::DeviceChoice;

/// Arguments of `bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Fewer passes and a 0.24 GiB model instead of 1 GiB (a minute instead of several).
    #[arg(long)]
    quick: bool,
    /// Where the model runs: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
}

/// Runs the benchmarks and prints markdown tables.
pub fn run(a: BenchArgs, threads: usize) -> Result<ExitCode> {
    let device = a.device.resolve(threads).usage()?;
    if let Some(note) = &device.note {
        eprintln!("xmoe-top: {note}");
    }
    crate::bench::run(a.quick, &device.device, threads)?;
    Ok(ExitCode::SUCCESS)
}
