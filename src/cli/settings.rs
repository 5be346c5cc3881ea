//! The user's settings file: TOML, in the platform's configuration directory
//! (`$XDG_CONFIG_HOME/xmoe-top/config.toml`, else `~/.config/xmoe-top/config.toml` on Linux;
//! `~/Library/Application Support/xmoe-top/config.toml` on macOS), or the file `--config` names.
//!
//! Settings are defaults: a flag on the command line always wins. A file that exists but does not
//! parse is an error naming the file, line and field, never silently ignored: a user who wrote a
//! setting expects it to be in force. Reference: `docs/config.md`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// File name inside the configuration directory.
pub const FILE_NAME: &str = "config.toml";

/// Largest settings file read (a settings file is a few hundred bytes).
const MAX_BYTES: u64 = 1 << 20;

/// Everything the settings file may hold.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// How the live UI draws.
    #[serde(default)]
    pub ui: UiSettings,
    /// Defaults of the main command and `run`.
    #[serde(default)]
    pub defaults: DefaultSettings,
    /// Key bindings of the live UI: command name -> a key or a list of keys, replacing that
    /// command's default keys (names in `docs/config.md`).
    #[serde(default)]
    pub keys: std::collections::BTreeMap<String, KeySetting>,
}

/// One key or several.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum KeySetting {
    /// `quit = "x"`.
    One(String),
    /// `quit = ["x", "ctrl-q"]`.
    Many(Vec<String>),
}

/// `[ui]`: how the live UI draws.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UiSettings {
    /// Most redraws per second, 0.5..=120 (`--fps`).
    pub fps: Option<f64>,
    /// `auto`, `always` or `never` (`--color`).
    pub color: Option<String>,
    /// The heatmap's colours: `viridis`, `cividis`, `magma` or `gray` (`--heatmap`).
    pub heatmap: Option<String>,
    /// Budget of the quick tune, `1%` or `0.01` bits/byte (`--tune-budget`).
    pub tune_budget: Option<String>,
}

/// `[defaults]`: the routing policy and where reports go, unless the command line says otherwise.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultSettings {
    /// `native`, `threshold`, `topk` or `dense` (`--policy`).
    pub policy: Option<String>,
    /// A threshold for every MoE layer (`0.9`) or per layer (`"0:0.8,3:0.95"`) (`--threshold`).
    pub threshold: Option<ThresholdSetting>,
    /// k of the top-k policy (`--k`).
    pub k: Option<usize>,
    /// Renormalise the selected experts' weights (`--renormalize`).
    pub renormalize: Option<bool>,
    /// Inference-time capacity factor (`--capacity-factor`).
    pub capacity_factor: Option<f32>,
    /// Where the live UI's `e` key writes reports (`--report-dir`); `~/` is the home directory.
    pub report_dir: Option<PathBuf>,
}

/// A threshold written as a number or in the `--threshold` syntax.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ThresholdSetting {
    /// One threshold for every MoE layer.
    Number(f64),
    /// The `--threshold` syntax (`0.9` or `0:0.8,3:0.95`).
    Text(String),
}

impl ThresholdSetting {
    /// The value in the `--threshold` syntax.
    pub fn as_arg(&self) -> String {
        match self {
            Self::Number(t) => t.to_string(),
            Self::Text(s) => s.clone(),
        }
    }
}

/// Where the settings came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SettingsOrigin {
    /// Read from this file.
    File(PathBuf),
    /// No file at the default location (this path): built-in defaults.
    NoFile(PathBuf),
    /// The platform has no configuration directory (no home directory): built-in defaults.
    NoConfigDir,
    /// `--no-config`: built-in defaults.
    Disabled,
}

impl std::fmt::Display for SettingsOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "settings from {}", p.display()),
            Self::NoFile(p) => write!(f, "no settings file ({} does not exist)", p.display()),
            Self::NoConfigDir => write!(f, "no settings file (no configuration directory)"),
            Self::Disabled => write!(f, "settings file ignored (--no-config)"),
        }
    }
}

/// The default location of the settings file, if the platform has a configuration directory.
pub fn default_path() -> Option<PathBuf> {
    dirs::config_dir().map(|d| d.join("xmoe-top").join(FILE_NAME))
}

impl Settings {
    /// Parses settings from TOML text; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        let s: Settings =
            toml::from_str(text).with_context(|| format!("settings file {}", origin.display()))?;
        s.check()
            .with_context(|| format!("settings file {}", origin.display()))?;
        Ok(s)
    }

    /// Reads the settings: `explicit` (must exist), else the default location (may be absent);
    /// `disabled` skips every file.
    pub fn load(explicit: Option<&Path>, disabled: bool) -> Result<(Self, SettingsOrigin)> {
        if disabled {
            return Ok((Self::default(), SettingsOrigin::Disabled));
        }
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None => match default_path() {
                None => return Ok((Self::default(), SettingsOrigin::NoConfigDir)),
                Some(p) if !p.exists() => return Ok((Self::default(), SettingsOrigin::NoFile(p))),
                Some(p) => p,
            },
        };
        let text = crate::input_file::read_to_string(&path, MAX_BYTES)
            .with_context(|| format!("cannot read the settings file {}", path.display()))?;
        Ok((Self::parse(&text, &path)?, SettingsOrigin::File(path)))
    }

    /// Range checks that need no model (thresholds and layer indices are checked against the
    /// model when the policy is built).
    fn check(&self) -> Result<()> {
        if let Some(fps) = self.ui.fps
            && !(0.5..=120.0).contains(&fps)
        {
            bail!("[ui] fps must be between 0.5 and 120, found {fps}");
        }
        if let Some(c) = &self.ui.color {
            parse_value_enum::<crate::tui::ColorChoice>(c)
                .with_context(|| format!("[ui] color = \"{c}\""))?;
        }
        self.keymap()?;
        if let Some(h) = &self.ui.heatmap {
            parse_value_enum::<crate::tui::Palette>(h)
                .with_context(|| format!("[ui] heatmap = \"{h}\""))?;
        }
        if let Some(b) = &self.ui.tune_budget {
            crate::session::tune::Budget::parse_budget(b)
                .map_err(|e| anyhow::anyhow!("[ui] tune_budget: {e}"))?;
        }
        let d = &self.defaults;
        if let Some(p) = &d.policy {
            parse_value_enum::<super::policy_args::PolicyKind>(p)
                .with_context(|| format!("[defaults] policy = \"{p}\""))?;
        }
        if let Some(ThresholdSetting::Number(t)) = d.threshold
            && !(t > 0.0 && t <= 1.0)
        {
            bail!("[defaults] threshold must be in (0, 1], found {t}");
        }
        if d.k == Some(0) {
            bail!("[defaults] k must be at least 1");
        }
        if let Some(c) = d.capacity_factor {
            super::values::capacity_factor(&c.to_string())
                .map_err(|e| anyhow::anyhow!("[defaults] capacity_factor: {e}"))?;
        }
        Ok(())
    }

    /// The live UI's key bindings with this file's `[keys]` applied.
    pub fn keymap(&self) -> Result<crate::tui::keys::KeyMap> {
        let pairs: Vec<(String, Vec<String>)> = self
            .keys
            .iter()
            .map(|(name, k)| {
                let keys = match k {
                    KeySetting::One(k) => vec![k.clone()],
                    KeySetting::Many(v) => v.clone(),
                };
                (name.clone(), keys)
            })
            .collect();
        crate::tui::keys::KeyMap::from_names(&pairs).map_err(anyhow::Error::msg)
    }

    /// The report directory with a leading `~/` expanded.
    pub fn report_dir(&self) -> Option<PathBuf> {
        let p = self.defaults.report_dir.as_ref()?;
        Some(match (p.strip_prefix("~"), dirs::home_dir()) {
            (Ok(rest), Some(home)) => home.join(rest),
            _ => p.clone(),
        })
    }

    /// True when the file sets any routing default.
    pub fn has_policy(&self) -> bool {
        let d = &self.defaults;
        d.policy.is_some()
            || d.threshold.is_some()
            || d.k.is_some()
            || d.renormalize.is_some()
            || d.capacity_factor.is_some()
    }
}

/// A clap value enum from its name, case-insensitive, with the accepted names in the error.
pub(crate) fn parse_value_enum<T: clap::ValueEnum>(s: &str) -> Result<T> {
    T::from_str(s, true).map_err(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value())
            .map(|v| v.get_name().to_string())
            .collect();
        anyhow::anyhow!("expected one of {}, found \"{s}\"", names.join(", "))
    })
}

/// The commented settings file `xmoe-top config --init` writes: every setting, commented out, with
/// its built-in default.
pub const TEMPLATE: &str = r#"# xmoe-top settings (docs/config.md). Every setting is optional; a flag on the command line
# always wins over this file. Uncomment a line to use it.

[ui]
# Most redraws per second, 0.5..=120 (the screen is redrawn only when something changed).
# fps = 10
# Colours: "auto" (256-colour or better terminals, unless NO_COLOR is set), "always" or "never".
# color = "auto"
# Heatmap colours: "viridis", "cividis" (reads the same with common colour-vision deficiencies),
# "magma" or "gray".
# heatmap = "viridis"
# Budget of the quick tune (T): "1%" (bits/byte at most 1% above the reference) or "0.01" (bits/byte).
# tune_budget = "1%"

[defaults]
# Routing policy: "native" (the model's own rule), "threshold", "topk" or "dense".
# If the command line gives any of --policy, --threshold, --k, --renormalize or
# --capacity-factor, this whole group is ignored (no mixing of the two sources).
# policy = "threshold"
# threshold = 0.9            # or per layer by block index: "0:0.8,3:0.95"
# k = 2
# renormalize = false
# capacity_factor = 1.25
# Where the live UI's `e` key writes its reports ("~/" is your home directory).
# report_dir = "~/xmoe-reports"

[keys]
# Replace a command's default keys: one key or a list. Keys: one character ("x", "Q", "?"),
# "ctrl-<char>", "f1".."f12", or up, down, left, right, pageup, pagedown, home, end, tab,
# backtab, esc, enter, space. A key given here is taken from the command that had it.
# Commands: quit, escape, help, next_panel, up, down, left, right, left_big, right_big,
# threshold_up_big, threshold_down_big, apply_to_all, cycle_policy, k_up, k_down, capacity,
# capacity_down, capacity_up, renormalize, zoom, freeze, pause, reset, export, suspend,
# expert_table, sort, fps_down, fps_up.
# quit = ["q", "ctrl-c"]
# freeze = "f5"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Settings> {
        Settings::parse(s, Path::new("c.toml"))
    }

    #[test]
    fn the_template_parses_to_the_built_in_defaults() {
        assert_eq!(parse(TEMPLATE).unwrap(), Settings::default());
        // And with every line uncommented it is a valid file that sets everything.
        let all: String = TEMPLATE
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if rest.contains(" = ") => rest.to_string(),
                _ => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        let s = parse(&all).unwrap();
        assert_eq!(s.ui.fps, Some(10.0));
        assert_eq!(s.ui.color.as_deref(), Some("auto"));
        assert_eq!(s.ui.heatmap.as_deref(), Some("viridis"));
        assert_eq!(s.defaults.policy.as_deref(), Some("threshold"));
        assert_eq!(s.defaults.threshold, Some(ThresholdSetting::Number(0.9)));
        assert_eq!(s.defaults.k, Some(2));
        assert_eq!(s.defaults.renormalize, Some(false));
        assert_eq!(s.defaults.capacity_factor, Some(1.25));
        assert_eq!(s.keys.len(), 2);
        assert!(s.keymap().is_ok());
        assert!(s.has_policy());
        let home = dirs::home_dir().unwrap();
        assert_eq!(s.report_dir().unwrap(), home.join("xmoe-reports"));
    }

    #[test]
    fn thresholds_take_a_number_or_the_per_layer_syntax() {
        let s = parse("[defaults]\nthreshold = \"0:0.8,3:0.95\"").unwrap();
        assert_eq!(s.defaults.threshold.unwrap().as_arg(), "0:0.8,3:0.95");
        let s = parse("[defaults]\nthreshold = 0.75").unwrap();
        assert_eq!(s.defaults.threshold.unwrap().as_arg(), "0.75");
    }

    #[test]
    fn mistakes_name_the_file_and_the_field() {
        for (text, needles) in [
            (
                "[ui]\nfsp = 10",
                &["c.toml", "unknown field `fsp`", "fps"][..],
            ),
            ("[ui]\nfps = 500", &["c.toml", "between 0.5 and 120", "500"]),
            ("[ui]\nfps = \"fast\"", &["c.toml", "invalid type"]),
            (
                "[ui]\ncolor = \"purple\"",
                &["c.toml", "color", "auto, always, never", "purple"],
            ),
            (
                "[defaults]\npolicy = \"top2\"",
                &["policy", "native, threshold, topk, dense"],
            ),
            (
                "[defaults]\nthreshold = 1.5",
                &["threshold", "(0, 1]", "1.5"],
            ),
            ("[defaults]\nk = 0", &["k must be at least 1"]),
            ("[defaults]\ncapacity_factor = -1", &["capacity_factor"]),
            ("[keyz]\nq = 1", &["unknown field `keyz`"]),
            (
                "[keys]\nqiut = \"x\"",
                &["c.toml", "`qiut` is not a command"],
            ),
            ("[keys]\nquit = \"x\"\nreset = [\"x\"]", &["given to both"]),
            ("[ui\nfps = 1", &["c.toml", "line 1"]),
        ] {
            let e = format!("{:#}", parse(text).unwrap_err());
            for n in needles {
                assert!(e.contains(n), "{text:?}: {e}");
            }
        }
    }

    #[test]
    fn an_explicit_file_must_exist_and_a_default_one_may_not() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.toml");
        let e = format!("{:#}", Settings::load(Some(&missing), false).unwrap_err());
        assert!(e.contains("none.toml"), "{e}");
        let (s, origin) = Settings::load(Some(&missing), true).unwrap();
        assert_eq!((s, origin), (Settings::default(), SettingsOrigin::Disabled));
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[ui]\nfps = 4\n").unwrap();
        let (s, origin) = Settings::load(Some(&file), false).unwrap();
        assert_eq!(s.ui.fps, Some(4.0));
        assert_eq!(origin, SettingsOrigin::File(file));
    }
}
