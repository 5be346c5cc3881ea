//! `--record FILE` (hooked into `run` and the live UI) and `xmoe-top replay FILE`: play a
//! recording back in the UI, or write a report of one moment of it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use clap::Args;

use super::exit::{Classify, usage};
use crate::model::trace::ForwardTrace;
use crate::profiling::snapshot::Snapshot;
use crate::record::{Recorder, Recording};
use crate::report::{RecordingSource, ReportData, ReportFormat, write_report};
use crate::session::{PassObserver, SnapshotObserver};
use crate::tui::Exporter;

/// Flags of `xmoe-top replay`.
#[derive(Args, Debug, Clone)]
pub struct ReplayArgs {
    /// The recording (`--record FILE`; the `FILE.partial` of a session that crashed works too).
    pub file: PathBuf,
    /// Write a report of one moment of the recording here (.json, .md, .csv or .html, or
    /// --format) instead of opening the UI.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Report format: json, md, csv or html (default: from the extension).
    #[arg(long)]
    pub format: Option<ReportFormat>,
    /// The moment for --report and the summary: session time in seconds (the last snapshot
    /// at or before it) or `end` [default: end]
    #[arg(long, value_name = "SECONDS|end")]
    pub at: Option<String>,
    /// Write the recorded routing trace here (docs/trace-format.md; `xmoe-top route` reads it).
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Print a summary of the moment instead of opening the UI (automatic when stdout is not a
    /// terminal).
    #[arg(long)]
    pub headless: bool,
    /// Headless: print the snapshot of the moment as JSON instead of the text summary.
    #[arg(long)]
    pub json: bool,
    /// Overwrite existing report or trace files.
    #[arg(long)]
    pub force: bool,
    /// Where the UI's `e` and `r` keys write reports [default: the current directory]
    #[arg(long)]
    pub report_dir: Option<PathBuf>,
    #[command(flatten)]
    pub tui: super::tui::TuiArgs,
}

/// Starts recording to `path` (when given): hooks a [`Recorder`] into the session's snapshot
/// observer and, `with_trace`, its pass observer (after any observer already there, e.g.
/// `--trace`).
pub fn attach_recorder(
    path: Option<&std::path::Path>,
    p: &mut super::run::Prepared,
    force: bool,
    with_trace: bool,
) -> Result<Option<Recorder>> {
    let Some(path) = path else {
        return Ok(None);
    };
    let trace = crate::report::TraceHeader::new(
        p.model.config(),
        crate::report::TraceOptions { probs: false },
    );
    let rec = Recorder::create(path, trace, force)
        .context("--record")
        .usage()?;
    let mut on_snapshot = rec.snapshot_observer();
    p.config.snapshot_observer = Some(SnapshotObserver(Arc::new(Mutex::new(
        move |s: &Snapshot| on_snapshot(s),
    ))));
    if !with_trace {
        return Ok(Some(rec));
    }
    let mut on_pass = rec.pass_observer();
    let before = p.config.pass_observer.take();
    p.config.pass_observer = Some(PassObserver(Arc::new(Mutex::new(
        move |tokens: &[u32], trace: &ForwardTrace| -> Result<()> {
            if let Some(b) = &before {
                (b.0.lock().unwrap_or_else(|e| e.into_inner()))(tokens, trace)?;
            }
            on_pass(tokens, trace)
        },
    ))));
    Ok(Some(rec))
}

/// Finishes a recording after the session has stopped and says where it is.
pub fn finish_recorder(rec: Option<Recorder>) -> Result<()> {
    if let Some(rec) = rec {
        let summary = rec.finish()?;
        eprintln!("xmoe-top: {summary}");
    }
    Ok(())
}

/// The frame `--at` names.
fn frame_at(rec: &Recording, at: Option<&str>) -> Result<usize> {
    let last = rec.frames().len() - 1;
    match at.map(str::trim) {
        None | Some("end") => Ok(last),
        Some(s) => {
            let t: f64 = s
                .parse()
                .ok()
                .filter(|t: &f64| t.is_finite() && *t >= 0.0)
                .ok_or_else(|| {
                    usage(format!(
                        "--at: expected seconds (a number, 0 or more) or `end`, found `{s}`"
                    ))
                })?;
            Ok(rec.frame_at(t))
        }
    }
}

/// The report of frame `i` of `rec`, marked as played back from it.
fn report_of(rec: &Recording, snapshot: Snapshot, i: usize) -> ReportData {
    let mut data = ReportData::new(snapshot, None);
    data.recording = Some(source_of(rec, &data.snapshot, i));
    data
}

fn source_of(rec: &Recording, s: &Snapshot, i: usize) -> RecordingSource {
    RecordingSource {
        file: rec.label().to_string(),
        recorded_utc: rec.header().created_utc.clone(),
        recorded_command_line: rec.header().command_line.clone(),
        at_s: s.session_elapsed_s,
        frame: i as u64,
        frames: rec.frames().len() as u64,
    }
}

/// `xmoe-top replay FILE`.
pub fn run(a: ReplayArgs) -> Result<ExitCode> {
    let mut rec = Recording::open(&a.file).bad_input()?;
    for note in rec.notes() {
        eprintln!("xmoe-top: {note}");
    }
    if let Some(path) = &a.report {
        ReportFormat::resolve(path, a.format).usage()?;
        crate::atomic_file::check_target(path, a.force).usage()?;
    }
    if let Some(path) = &a.trace {
        crate::atomic_file::check_target(path, a.force).usage()?;
        let mut buf = Vec::new();
        let n = rec.write_trace(&mut buf).bad_input()?;
        crate::atomic_file::write_atomically(path, &buf, a.force)?;
        eprintln!(
            "xmoe-top: routing trace of {n} token records written to {}",
            path.display()
        );
    }
    let headless = a.headless || a.json || a.report.is_some() || a.trace.is_some();
    if headless || !super::tui::can_draw() {
        let i = frame_at(&rec, a.at.as_deref())?;
        let snap = rec.frame(i).bad_input()?;
        let h = rec.header();
        eprintln!(
            "xmoe-top: replay of {} (model {}, recorded {} by `{}`): snapshot {} of {} at {:.1} s",
            rec.label(),
            h.model,
            h.created_utc,
            h.command_line.join(" "),
            i + 1,
            rec.frames().len(),
            snap.session_elapsed_s
        );
        if let Some(path) = &a.report {
            let written = write_report(&report_of(&rec, snap.clone(), i), path, a.format, a.force)?;
            eprintln!("xmoe-top: report written to {}", written.display());
        }
        if a.json {
            super::print_stdout(&(snap.to_json_pretty() + "\n"))?;
        } else if a.report.is_none() && a.trace.is_none() {
            super::print_stdout(&crate::report::text::render(&snap))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if a.at.is_some() {
        return Err(usage(
            "--at goes with --report or --headless; in the UI press End, Home or click the timeline",
        ));
    }
    let settings = crate::cli::settings::Settings::load(None, false)
        .map(|(s, _)| s)
        .bad_input()?;
    let tui = a.tui.clone().with_settings(&settings).bad_input()?;
    let dir = a.report_dir.clone().unwrap_or_else(|| PathBuf::from("."));
    crate::atomic_file::check_dir(&dir)
        .context("--report-dir (where `e` and `r` write reports)")
        .usage()?;
    // The exporter needs the recording's header and the frame index of the snapshot shown,
    // which the snapshot's sequence number gives.
    let sequences: Vec<u64> = rec.frames().iter().map(|f| f.sequence).collect();
    let first = rec.frame(0).bad_input()?;
    let template = source_of(&rec, &first, 0);
    let exporter: Exporter = Box::new(move |s: &Snapshot| {
        let i = sequences.partition_point(|&q| q < s.sequence);
        let mut data = ReportData::new(s.clone(), None);
        data.recording = Some(RecordingSource {
            at_s: s.session_elapsed_s,
            frame: i as u64,
            ..template.clone()
        });
        crate::report::export_data(
            &data,
            &dir,
            &[ReportFormat::Html, ReportFormat::Json],
            false,
        )
    });
    crate::tui::replay::run_replay(rec, tui.options(None, Some(exporter)))?;
    Ok(ExitCode::SUCCESS)
}
