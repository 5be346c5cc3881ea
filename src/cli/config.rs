//! `xmoe-top config`: which settings file is in force and what it sets; `--init` writes a
//! commented one.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;

use super::exit::Classify;
use super::settings::{Settings, SettingsOrigin, TEMPLATE, default_path};

/// Arguments of `config`.
#[derive(Args, Debug)]
pub struct ConfigArgs {
    /// The settings file to show or create (default: the platform's, see docs/config.md).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Write a commented settings file with every setting and its built-in default.
    #[arg(long)]
    init: bool,
    /// With --init: replace an existing file.
    #[arg(long, requires = "init")]
    force: bool,
}

/// Shows the settings in force, or writes the template.
pub fn run(a: ConfigArgs) -> Result<ExitCode> {
    if a.init {
        let path = match a.config.clone().or_else(default_path) {
            Some(p) => p,
            None => {
                return Err(super::exit::usage(
                    "no configuration directory on this platform: pass --config FILE",
                ));
            }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        crate::atomic_file::write_atomically(&path, TEMPLATE.as_bytes(), a.force).usage()?;
        eprintln!("wrote {}", path.display());
        return Ok(ExitCode::SUCCESS);
    }
    let (s, origin) = Settings::load(a.config.as_deref(), false).bad_input()?;
    super::print_stdout(&describe(&s, &origin))?;
    Ok(ExitCode::SUCCESS)
}

/// The settings in force, one per line, each with where its value comes from.
fn describe(s: &Settings, origin: &SettingsOrigin) -> String {
    let mut o = format!("{origin}\n");
    let from = |set: bool| if set { "settings file" } else { "built-in" };
    let line = |o: &mut String, key: &str, value: String, set: bool| {
        o.push_str(&format!("{key:<26} {value:<22} ({})\n", from(set)));
    };
    line(
        &mut o,
        "ui.fps",
        s.ui.fps.unwrap_or(crate::tui::DEFAULT_FPS).to_string(),
        s.ui.fps.is_some(),
    );
    line(
        &mut o,
        "ui.color",
        s.ui.color.clone().unwrap_or_else(|| "auto".into()),
        s.ui.color.is_some(),
    );
    line(
        &mut o,
        "ui.heatmap",
        s.ui.heatmap.clone().unwrap_or_else(|| "viridis".into()),
        s.ui.heatmap.is_some(),
    );
    line(
        &mut o,
        "keys",
        if s.keys.is_empty() {
            "defaults".to_string()
        } else {
            format!("{} command(s) rebound", s.keys.len())
        },
        !s.keys.is_empty(),
    );
    let d = &s.defaults;
    line(
        &mut o,
        "defaults.policy",
        d.policy.clone().unwrap_or_else(|| "the model's".into()),
        d.policy.is_some(),
    );
    line(
        &mut o,
        "defaults.threshold",
        d.threshold
            .as_ref()
            .map_or("the model's".into(), |t| t.as_arg()),
        d.threshold.is_some(),
    );
    line(
        &mut o,
        "defaults.k",
        d.k.map_or("compute-matched".into(), |k| k.to_string()),
        d.k.is_some(),
    );
    line(
        &mut o,
        "defaults.renormalize",
        d.renormalize
            .map_or("as the model's rule".into(), |r| r.to_string()),
        d.renormalize.is_some(),
    );
    line(
        &mut o,
        "defaults.capacity_factor",
        d.capacity_factor
            .map_or("the model's".into(), |c| c.to_string()),
        d.capacity_factor.is_some(),
    );
    line(
        &mut o,
        "defaults.report_dir",
        s.report_dir()
            .map_or(".".into(), |p| p.display().to_string()),
        d.report_dir.is_some(),
    );
    o.push_str("A flag on the command line wins over the file; any routing flag replaces all routing defaults.\n");
    o
}
