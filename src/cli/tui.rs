//! Options of the live UI and the entry the main command calls when stdout is a terminal.

use std::io::IsTerminal;

use anyhow::Result;
use clap::Args;

use crate::model::Model;
use crate::session::{SessionConfig, SessionOutcome};
use crate::tui::app::DEFAULT_CAPACITY_FACTOR;
use crate::tui::session_link::run_session_tui;
use crate::tui::{ColorChoice, ColorMode, DEFAULT_FPS, Exporter, TuiOptions};
use crate::workload::Workload;

/// How the live UI draws.
#[derive(Args, Debug, Clone)]
pub struct TuiArgs {
    /// Most redraws per second, 0.5..=120 (the screen is redrawn only when something changed)
    /// [default: 10, or the settings file's]
    #[arg(long, value_parser = parse_fps)]
    pub fps: Option<f64>,
    /// Colours: auto (256-colour or better terminals, unless NO_COLOR is set), always, or never
    /// (shade glyphs in the heatmap) [default: auto, or the settings file's]
    #[arg(long, value_enum)]
    pub color: Option<ColorChoice>,
    /// Same as --color never.
    #[arg(long, conflicts_with = "color")]
    pub no_color: bool,
    /// Key bindings (from the settings file).
    #[arg(skip)]
    pub keymap: crate::tui::keys::KeyMap,
    /// Heatmap colours: viridis, cividis (colour-vision-deficiency friendly), magma or gray
    /// [default: viridis, or the settings file's]
    #[arg(long, value_enum)]
    pub heatmap: Option<crate::tui::Palette>,
    /// Budget of the quick tune (`T` in the UI): `1%` (bits/byte at most 1% above the
    /// reference's) or `0.01` (bits/byte) [default: 1%, or the settings file's]
    #[arg(long, value_name = "BUDGET", value_parser = parse_tune_budget)]
    pub tune_budget: Option<crate::session::tune::Budget>,
    /// The recorder's counters while `--record` runs (the header shows them).
    #[arg(skip)]
    pub recording: Option<std::sync::Arc<crate::record::RecorderStatus>>,
}

fn parse_tune_budget(s: &str) -> Result<crate::session::tune::Budget, String> {
    crate::session::tune::Budget::parse_budget(s)
        .map_err(|e| e.to_string().replace("--budget", "--tune-budget"))
}

fn parse_fps(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.5..=120.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("--fps must be between 0.5 and 120, found {v}"))
    }
}

impl TuiArgs {
    /// Fills what the command line left open from the settings file.
    pub fn with_settings(mut self, settings: &crate::cli::settings::Settings) -> Result<Self> {
        if self.fps.is_none() {
            self.fps = settings.ui.fps;
        }
        self.keymap = settings.keymap()?;
        if self.heatmap.is_none() {
            self.heatmap = settings
                .ui
                .heatmap
                .as_deref()
                .map(crate::cli::settings::parse_value_enum)
                .transpose()?;
        }
        if self.tune_budget.is_none()
            && let Some(b) = &settings.ui.tune_budget
        {
            self.tune_budget = Some(
                crate::session::tune::Budget::parse_budget(b)
                    .map_err(|e| anyhow::anyhow!("[ui] tune_budget: {e}"))?,
            );
        }
        if self.color.is_none() && !self.no_color {
            self.color = settings
                .ui
                .color
                .as_deref()
                .map(crate::cli::settings::parse_value_enum)
                .transpose()?;
        }
        Ok(self)
    }

    /// The UI options for these arguments; `capacity_factor` is what the `c` key switches on
    /// (pass the model's or the command line's factor when there is one).
    pub fn options(&self, capacity_factor: Option<f32>, exporter: Option<Exporter>) -> TuiOptions {
        TuiOptions {
            fps: self.fps.unwrap_or(DEFAULT_FPS),
            color: ColorMode::detect(if self.no_color {
                ColorChoice::Never
            } else {
                self.color.unwrap_or(ColorChoice::Auto)
            }),
            capacity_factor: capacity_factor.unwrap_or(DEFAULT_CAPACITY_FACTOR),
            exporter,
            keymap: self.keymap.clone(),
            palette: self.heatmap.unwrap_or_default(),
            tune_budget: self
                .tune_budget
                .unwrap_or(crate::tui::app::DEFAULT_TUNE_BUDGET),
            replay: None,
            recording: self.recording.clone(),
        }
    }
}

/// True when the UI can draw: stdout (and stdin, for keys) are terminals. Otherwise the caller
/// prints the headless summary.
pub fn can_draw() -> bool {
    std::io::stdout().is_terminal() && std::io::stdin().is_terminal()
}

/// Runs `model` over `workload` in the live UI until the user quits; returns the session's
/// outcome (its last snapshot, for a summary after the UI closes).
pub fn run(
    args: &TuiArgs,
    model: Model,
    workload: Workload,
    config: SessionConfig,
    exporter: Option<Exporter>,
) -> Result<SessionOutcome> {
    if !can_draw() {
        return Err(super::exit::usage(
            "the live UI needs a terminal on stdin and stdout",
        ));
    }
    let capacity = config
        .routing
        .capacity_factor()
        .or(model.config().capacity_factor);
    run_session_tui(model, workload, config, args.options(capacity, exporter))
}
