//! Reports and routing traces: the files people share and script against. Rendering only: the
//! figures come from snapshot and statistics types (the sweep is run by [`crate::session::sweep`]).
//!
//! Every report is written from one data type, [`ReportData`] (a session [`Snapshot`], an optional
//! [`SweepResult`], the command line, versions and a timestamp), in four formats
//! ([`ReportFormat`]): JSON (every figure; schema in `docs/report.schema.json`), Markdown tables,
//! CSV (one file with a `table` column, see `docs/report-format.md`) and one self-contained HTML
//! file with inline SVG figures. [`text`] renders the headless summary of a snapshot, and a JSON
//! report read back is checked by [`validate`] before any renderer sees it.
//!
//! Writes are atomic (a temporary file in the target directory, then a rename) and never replace
//! an existing file unless asked to (`force`).

pub mod compare;
pub mod csv;
pub mod html;
pub mod import;
pub mod json;
pub mod markdown;
pub mod metrics;
pub mod text;
pub mod trace;
pub mod validate;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::atomic_file::write_atomically;
use crate::profiling::snapshot::{SNAPSHOT_SCHEMA_VERSION, Snapshot};

pub use crate::profiling::sweep::{SweepPoint, SweepResult, policy_label};
pub use trace::{TraceHeader, TraceOptions, TraceReader, TraceRecord, TraceWriter};

/// Version of the report layout (`docs/report.schema.json`); bumped on any incompatible change.
/// Version 2: threshold policies carry `renormalize`.
pub const REPORT_SCHEMA_VERSION: u32 = 2;

/// The file formats a report can be written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportFormat {
    /// Every figure, machine-readable (`.json`).
    Json,
    /// A readable summary with tables (`.md`).
    Markdown,
    /// One row per (layer, expert), per layer and per sweep point, with a `table` column (`.csv`).
    Csv,
    /// One self-contained page with inline SVG figures (`.html`).
    Html,
}

impl ReportFormat {
    /// Every format, in the order `export` writes them.
    pub const ALL: [ReportFormat; 4] = [
        ReportFormat::Html,
        ReportFormat::Json,
        ReportFormat::Markdown,
        ReportFormat::Csv,
    ];

    /// The file extension (without the dot).
    pub fn extension(self) -> &'static str {
        match self {
            ReportFormat::Json => "json",
            ReportFormat::Markdown => "md",
            ReportFormat::Csv => "csv",
            ReportFormat::Html => "html",
        }
    }

    /// The format a path's extension names (`.json`, `.md`/`.markdown`, `.csv`, `.html`/`.htm`).
    pub fn from_path(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        ext.parse().ok()
    }

    /// The format of `path`: `explicit` when given, else from the extension, else an error that
    /// lists the choices.
    pub fn resolve(path: &Path, explicit: Option<ReportFormat>) -> Result<Self> {
        if let Some(f) = explicit {
            return Ok(f);
        }
        Self::from_path(path).with_context(|| {
            format!(
                "cannot tell the report format of {}: use a .json, .md, .csv or .html name, or --format",
                path.display()
            )
        })
    }

    /// Renders `data` in this format.
    pub fn render(self, data: &ReportData) -> String {
        match self {
            ReportFormat::Json => json::render(data),
            ReportFormat::Markdown => markdown::render(data),
            ReportFormat::Csv => csv::render(data),
            ReportFormat::Html => html::render(data),
        }
    }
}

impl FromStr for ReportFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "json" => Ok(ReportFormat::Json),
            "md" | "markdown" => Ok(ReportFormat::Markdown),
            "csv" => Ok(ReportFormat::Csv),
            "html" | "htm" => Ok(ReportFormat::Html),
            _ => Err(format!(
                "unknown report format `{s}`: expected json, md, csv or html"
            )),
        }
    }
}

impl fmt::Display for ReportFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.extension())
    }
}

/// Who wrote a report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Generator {
    /// Always "xmoe-top".
    pub name: String,
    /// Version of xmoe-top.
    pub version: String,
    /// [`REPORT_SCHEMA_VERSION`].
    pub report_schema_version: u32,
    /// [`SNAPSHOT_SCHEMA_VERSION`] of the embedded snapshot.
    pub snapshot_schema_version: u32,
}

impl Default for Generator {
    fn default() -> Self {
        Self {
            name: "xmoe-top".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            report_schema_version: REPORT_SCHEMA_VERSION,
            snapshot_schema_version: SNAPSHOT_SCHEMA_VERSION,
        }
    }
}

/// Everything a report shows: the one type every writer reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReportData {
    /// Versions of the writer and of the layouts.
    pub generator: Generator,
    /// When the report was made, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The same instant as ISO 8601 UTC, e.g. "2026-11-28T12:00:00Z".
    pub created_utc: String,
    /// The command line that produced the figures (program name first).
    pub command_line: Vec<String>,
    /// The session picture (for a sweep: the session of the default policy's point).
    pub snapshot: Snapshot,
    /// The threshold sweep, when the report comes from `xmoe-top sweep`.
    pub sweep: Option<SweepResult>,
    /// Set when the figures were played back from a recording (`xmoe-top replay`) rather than
    /// measured by this process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recording: Option<RecordingSource>,
}

/// Which recording a report was played back from, and where in it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordingSource {
    /// The recording file as given to `xmoe-top replay`.
    pub file: String,
    /// When the recording was started, ISO 8601 UTC.
    pub recorded_utc: String,
    /// The command line that made the recording (program name first).
    pub recorded_command_line: Vec<String>,
    /// Session time of the snapshot reported, seconds.
    pub at_s: f64,
    /// Index of that snapshot among the recorded ones (0-based) and how many there are.
    pub frame: u64,
    /// Snapshots in the recording.
    pub frames: u64,
}

impl RecordingSource {
    /// One line for the report's header, e.g. "played back from session.xmoe-rec (recorded
    /// 2026-11-29T10:00:00Z), snapshot 120 of 300 at 12.0 s".
    pub fn describe(&self) -> String {
        format!(
            "played back from the recording {} (recorded {}), snapshot {} of {} at {:.1} s",
            self.file,
            self.recorded_utc,
            self.frame + 1,
            self.frames,
            self.at_s
        )
    }
}

impl ReportData {
    /// A report of `snapshot` (and `sweep`) made now by this process's command line.
    pub fn new(snapshot: Snapshot, sweep: Option<SweepResult>) -> Self {
        let now = unix_ms_now();
        Self {
            generator: Generator::default(),
            created_unix_ms: now,
            created_utc: iso8601_utc(now),
            command_line: std::env::args().collect(),
            snapshot,
            sweep,
            recording: None,
        }
    }
}

/// Renders `data` as `format` (or the format `path`'s extension names) and writes it atomically
/// to `path`. An existing file is kept and reported as an error unless `force`.
pub fn write_report(
    data: &ReportData,
    path: &Path,
    format: Option<ReportFormat>,
    force: bool,
) -> Result<PathBuf> {
    let format = ReportFormat::resolve(path, format)?;
    check_target_dir(path)?;
    let text = format.render(data);
    write_atomically(path, text.as_bytes(), force)
        .with_context(|| format!("writing the {format} report"))?;
    Ok(path.to_path_buf())
}

/// Writes `snapshot`'s report in each of `formats` into `dir` under a timestamped name
/// (`xmoe-top-report-YYYYMMDD-HHMMSS.EXT`, UTC; `-2`, `-3`, ... appended when that name is taken)
/// and returns the paths written. For the TUI's `e` key and `run --headless --report-dir`. Stops
/// at the first error (files already written stay).
pub fn export(
    snapshot: &Snapshot,
    dir: &Path,
    formats: &[ReportFormat],
    force: bool,
) -> Result<Vec<PathBuf>> {
    export_data(
        &ReportData::new(snapshot.clone(), None),
        dir,
        formats,
        force,
    )
}

/// [`export`] for a complete [`ReportData`] (e.g. with a sweep).
pub fn export_data(
    data: &ReportData,
    dir: &Path,
    formats: &[ReportFormat],
    force: bool,
) -> Result<Vec<PathBuf>> {
    if formats.is_empty() {
        bail!("no report format chosen");
    }
    if !dir.is_dir() {
        bail!(
            "cannot write reports into {}: not an existing directory",
            dir.display()
        );
    }
    let base = format!("xmoe-top-report-{}", file_timestamp(data.created_unix_ms));
    // Two exports within one second get "-2", "-3", ... rather than an error.
    let taken = |stem: &str| {
        formats
            .iter()
            .any(|f| dir.join(format!("{stem}.{}", f.extension())).exists())
    };
    let stem = if force || !taken(&base) {
        base
    } else {
        (2..1000)
            .map(|i| format!("{base}-{i}"))
            .find(|s| !taken(s))
            .with_context(|| format!("too many reports named {base}-N in {}", dir.display()))?
    };
    let mut written = Vec::with_capacity(formats.len());
    for &f in formats {
        let path = dir.join(format!("{stem}.{}", f.extension()));
        written.push(write_report(data, &path, Some(f), force)?);
    }
    Ok(written)
}

/// A clear error when the directory a file would go into does not exist or is not a directory.
fn check_target_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if dir.is_dir() {
        return Ok(());
    }
    if dir.exists() {
        bail!(
            "cannot write {}: {} is not a directory",
            path.display(),
            dir.display()
        );
    }
    bail!(
        "cannot write {}: the directory {} does not exist",
        path.display(),
        dir.display()
    )
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// (year, month, day, hour, minute, second) in UTC of a Unix time in milliseconds.
fn civil_utc(unix_ms: u64) -> (i64, u32, u32, u32, u32, u32) {
    let secs = (unix_ms / 1000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        (rem / 60 % 60) as u32,
        (rem % 60) as u32,
    )
}

/// ISO 8601 UTC, seconds resolution: "2026-11-28T12:00:00Z".
pub fn iso8601_utc(unix_ms: u64) -> String {
    let (y, mo, d, h, mi, s) = civil_utc(unix_ms);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// File-name timestamp in UTC: "20261128-120000".
pub fn file_timestamp(unix_ms: u64) -> String {
    let (y, mo, d, h, mi, s) = civil_utc(unix_ms);
    format!("{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}")
}

/// The difference in bits per byte to the reference policy with its sample: "+0.0014 ± 0.0006
/// (standard error over 29 compared batches)", or "-" before any compared batch.
pub fn delta_with_sample(q: &crate::profiling::snapshot::QualityStats) -> String {
    match (q.delta_bits_per_byte, q.delta_bits_per_byte_stderr) {
        (Some(d), Some(se)) => format!(
            "{d:+.4} ± {se:.4} (standard error over {} compared batches)",
            q.reference_batches
        ),
        (Some(d), None) => format!(
            "{d:+.4} ({} compared batch{}, no standard error below 2)",
            q.reference_batches,
            if q.reference_batches == 1 { "" } else { "es" }
        ),
        _ => "-".to_string(),
    }
}

/// The policies of a snapshot's layers in brief: one label when all layers agree, else one per layer.
pub fn policies_label(snapshot: &Snapshot) -> String {
    let labels: Vec<String> = snapshot
        .policy
        .layers
        .iter()
        .map(|l| policy_label(&l.policy))
        .collect();
    match labels.first() {
        Some(first) if labels.iter().all(|l| l == first) => first.clone(),
        Some(_) => snapshot
            .policy
            .layers
            .iter()
            .zip(&labels)
            .map(|(l, s)| format!("L{}: {s}", l.layer))
            .collect::<Vec<_>>()
            .join(", "),
        None => "no MoE layers".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::RoutingPolicy;

    #[test]
    fn timestamps() {
        assert_eq!(iso8601_utc(0), "1970-01-01T00:00:00Z");
        // 2024-02-29T23:59:59Z = 1709251199 s.
        assert_eq!(iso8601_utc(1_709_251_199_000), "2024-02-29T23:59:59Z");
        assert_eq!(file_timestamp(1_709_251_199_999), "20240229-235959");
    }

    #[test]
    fn formats_from_names() {
        assert_eq!(
            ReportFormat::from_path(Path::new("a/b.HTML")),
            Some(ReportFormat::Html)
        );
        assert_eq!(
            ReportFormat::from_path(Path::new("r.md")),
            Some(ReportFormat::Markdown)
        );
        assert_eq!(ReportFormat::from_path(Path::new("r.txt")), None);
        assert!(ReportFormat::resolve(Path::new("r"), None).is_err());
        assert_eq!(
            ReportFormat::resolve(Path::new("r"), Some(ReportFormat::Csv)).unwrap(),
            ReportFormat::Csv
        );
        assert!("xml".parse::<ReportFormat>().is_err());
    }

    #[test]
    fn labels() {
        assert_eq!(policy_label(&RoutingPolicy::threshold(0.9)), "t=0.9");
        assert_eq!(policy_label(&RoutingPolicy::threshold(0.85)), "t=0.85");
        assert_eq!(
            policy_label(&RoutingPolicy::TopK {
                k: 2,
                renormalize: false
            }),
            "top-2"
        );
    }
}
