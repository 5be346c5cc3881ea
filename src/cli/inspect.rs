//! `xmoe-top inspect`.

use std::path::PathBuf;
use std::process::ExitCode;

use super::exit::Classify;
use anyhow::Result;
use clap::Args;

use crate::inspect::InspectReport;
use crate::model::ModelSource;

/// Arguments of `inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Model: a .safetensors file or a Hugging Face checkpoint (directory, index or shard);
    /// default: the embedded model.
    model: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Prints the report.
pub fn run(a: InspectArgs) -> Result<ExitCode> {
    let file = match &a.model {
        Some(p) => ModelSource::open(p).bad_input()?,
        None => crate::embedded::model_file()?.into(),
    };
    let report = InspectReport::new(&file);
    if a.json {
        super::print_stdout(&(serde_json::to_string_pretty(&report)? + "\n"))?;
    } else {
        super::print_stdout(&report.to_text())?;
    }
    Ok(ExitCode::SUCCESS)
}
