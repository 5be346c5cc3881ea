//! `xmoe-top report`: re-render a saved JSON report in another format (no model needed).

use std::path::PathBuf;
use std::process::ExitCode;

use super::exit::Classify;
use anyhow::{Context, Result, bail};
use clap::Args;

use crate::report::{REPORT_SCHEMA_VERSION, ReportData, ReportFormat, json, write_report};

/// Arguments of `report`.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// A JSON report written by `sweep --report x.json`, `run --report x.json` or the TUI.
    input: PathBuf,
    /// Output path; the format follows the extension (.json, .md, .csv, .html) or --format.
    output: PathBuf,
    /// Output format: json, md, csv or html.
    #[arg(long, value_parser = |s: &str| s.parse::<ReportFormat>())]
    format: Option<ReportFormat>,
    /// Overwrite an existing output file.
    #[arg(long)]
    force: bool,
}

/// Reads the JSON report and writes it in the requested format.
pub fn run(a: ReportArgs) -> Result<ExitCode> {
    crate::atomic_file::check_target(&a.output, a.force).usage()?;
    let data = read_report(&a.input).bad_input()?;
    let path = write_report(&data, &a.output, a.format, a.force)?;
    eprintln!("wrote {}", path.display());
    Ok(ExitCode::SUCCESS)
}

fn read_report(input: &std::path::Path) -> Result<ReportData> {
    let text = crate::input_file::read_to_string(input, crate::input_file::MAX_JSON_BYTES)
        .with_context(|| format!("cannot read {}", input.display()))?;
    let version = serde_json::from_str::<serde_json::Value>(&text)
        .with_context(|| format!("{} is not JSON", input.display()))?
        .pointer("/generator/report_schema_version")
        .and_then(serde_json::Value::as_u64);
    match version {
        Some(v) if v == REPORT_SCHEMA_VERSION as u64 => {}
        Some(v) => bail!(
            "{} is a version {v} report; this build reads version {REPORT_SCHEMA_VERSION}",
            input.display()
        ),
        None => bail!("{} is not an xmoe-top JSON report", input.display()),
    }
    json::read(&text).with_context(|| format!("in {}", input.display()))
}
