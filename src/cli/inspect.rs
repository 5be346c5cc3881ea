//! `xmoe-top inspect`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use crate::inspect::InspectReport;
use crate::model::format::ModelFile;

/// Arguments of `inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Model file (.safetensors).
    model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Prints the report.
pub fn run(a: InspectArgs) -> Result<ExitCode> {
    let file = ModelFile::open(&a.model)?;
    let report = InspectReport::new(&file);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(ExitCode::SUCCESS)
}
