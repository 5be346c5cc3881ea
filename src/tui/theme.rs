//! Every colour and text style of the UI, and the no-colour fallback, in one place.
//!
//! Colour never carries information alone: every coloured figure is also printed as a number
//! somewhere (the heatmap's detail line, the sliders' figures), and in [`ColorMode::NoColor`] the
//! heatmap and the generated-text shading switch to the shade glyphs ` ░▒▓█`.

use ratatui::style::{Color, Modifier, Style};

/// How much colour the terminal gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColorMode {
    /// 24-bit colour (`COLORTERM=truecolor` or `24bit`).
    TrueColor,
    /// The xterm 256-colour palette (`TERM` mentions 256).
    Ansi256,
    /// No colour at all: `--no-color`, `NO_COLOR`, or a terminal with 16 colours or fewer, where
    /// a colour ramp cannot be told apart reliably. Shade glyphs and text modifiers only.
    NoColor,
}

/// What the user asked for with `--color` (`--no-color` is `never`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ColorChoice {
    /// Colour when the terminal has 256 colours or more and `NO_COLOR` is not set.
    #[default]
    Auto,
    /// Colour whatever the terminal and `NO_COLOR` say (24-bit if `COLORTERM` offers it,
    /// else the 256-colour palette).
    Always,
    /// No colour: shade glyphs and text styles only.
    Never,
}

impl ColorMode {
    /// Chooses the mode from `--color` and the process environment.
    pub fn detect(choice: ColorChoice) -> Self {
        let var = |k: &str| std::env::var(k).ok();
        Self::from_env(
            choice,
            var("NO_COLOR").as_deref(),
            var("COLORTERM").as_deref(),
            var("TERM").as_deref(),
        )
    }

    /// The decision itself, from explicit values (testable without touching the environment).
    /// `NO_COLOR` counts when set to a non-empty value (<https://no-color.org>).
    pub fn from_env(
        choice: ColorChoice,
        no_color: Option<&str>,
        colorterm: Option<&str>,
        term: Option<&str>,
    ) -> Self {
        let truecolor = colorterm.is_some_and(|c| c.contains("truecolor") || c.contains("24bit"));
        match choice {
            ColorChoice::Never => return ColorMode::NoColor,
            ColorChoice::Always if truecolor => return ColorMode::TrueColor,
            ColorChoice::Always => return ColorMode::Ansi256,
            ColorChoice::Auto => {}
        }
        if no_color.is_some_and(|v| !v.is_empty()) {
            return ColorMode::NoColor;
        }
        if truecolor {
            return ColorMode::TrueColor;
        }
        match term {
            Some(t) if t.contains("truecolor") || t.contains("direct") => ColorMode::TrueColor,
            Some(t) if t.contains("256") => ColorMode::Ansi256,
            // xterm, linux, screen, vt100, dumb or unset: 16 colours at best.
            _ => ColorMode::NoColor,
        }
    }
}

/// The five shade glyphs of the no-colour heatmap, lightest first.
pub const SHADES: [&str; 5] = [" ", "░", "▒", "▓", "█"];

/// Stops of the heat ramp (viridis), from low to high.
/// The heatmap's colour ramp (the settings file's `[ui] heatmap`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Palette {
    /// Viridis: perceptually uniform, readable in grey.
    #[default]
    Viridis,
    /// Cividis: designed to read the same with the common colour-vision deficiencies.
    Cividis,
    /// Magma: black through purple to pale yellow.
    Magma,
    /// Grey levels.
    Gray,
}

impl Palette {
    fn ramp(self) -> &'static [(u8, u8, u8); 5] {
        match self {
            Self::Viridis => &RAMP,
            Self::Cividis => &[
                (0, 34, 78),
                (65, 77, 107),
                (124, 123, 120),
                (187, 175, 113),
                (254, 232, 56),
            ],
            Self::Magma => &[
                (0, 0, 4),
                (81, 18, 124),
                (183, 55, 121),
                (252, 137, 97),
                (252, 253, 191),
            ],
            Self::Gray => &[
                (60, 60, 60),
                (110, 110, 110),
                (160, 160, 160),
                (210, 210, 210),
                (255, 255, 255),
            ],
        }
    }
}

const RAMP: [(u8, u8, u8); 5] = [
    (68, 1, 84),
    (59, 82, 139),
    (33, 145, 140),
    (94, 201, 98),
    (253, 231, 37),
];

/// The colour of a cell no token used: darker than the ramp's lowest stop, so "unused" and
/// "rarely used" differ (the detail line and the unused-experts count say it in words too).
const UNUSED: (u8, u8, u8) = (28, 28, 28);

/// Colours and styles of the UI for one [`ColorMode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Theme {
    /// The colour mode in force.
    pub mode: ColorMode,
    /// The heatmap's colour ramp.
    pub palette: Palette,
}

impl Theme {
    /// A theme for `mode`.
    pub fn new(mode: ColorMode) -> Self {
        Self {
            mode,
            palette: Palette::default(),
        }
    }

    /// The same theme with the heatmap drawn in `palette`.
    pub fn with_palette(self, palette: Palette) -> Self {
        Self { palette, ..self }
    }

    /// True when colours may be used.
    pub fn has_color(&self) -> bool {
        self.mode != ColorMode::NoColor
    }

    fn rgb(&self, (r, g, b): (u8, u8, u8)) -> Color {
        match self.mode {
            ColorMode::TrueColor => Color::Rgb(r, g, b),
            ColorMode::Ansi256 => Color::Indexed(ansi256_of(r, g, b)),
            ColorMode::NoColor => Color::Reset,
        }
    }

    fn color(&self, c: Color) -> Color {
        if self.has_color() { c } else { Color::Reset }
    }

    /// Heat colour of a normalised intensity `v` in 0..=1; exactly 0 is the "unused" colour.
    pub fn heat(&self, v: f64) -> Color {
        self.rgb(ramp_rgb(self.palette.ramp(), v))
    }

    /// Colour of a difference `d` in [-1, 1] on the A/B view's diverging scale.
    pub fn diverging(&self, d: f64) -> Color {
        self.rgb(diverging_rgb(d))
    }

    /// Shade glyph of a normalised intensity `v` in 0..=1: a blank only for exactly 0, so an
    /// expert that a few tokens used is never drawn like an unused one.
    pub fn shade(v: f64) -> &'static str {
        SHADES[shade_level(v)]
    }

    /// Panel titles.
    pub fn title(&self) -> Style {
        Style::new()
            .fg(self.color(Color::Cyan))
            .add_modifier(Modifier::BOLD)
    }

    /// The title of the focused panel.
    pub fn title_focused(&self) -> Style {
        Style::new()
            .fg(self.color(Color::Yellow))
            .add_modifier(Modifier::BOLD | Modifier::REVERSED)
    }

    /// The focused slider row or selected heatmap row label.
    pub fn selected(&self) -> Style {
        Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED)
    }

    /// Secondary text (units, hints).
    pub fn dim(&self) -> Style {
        if self.has_color() {
            Style::new().fg(Color::DarkGray)
        } else {
            Style::new().add_modifier(Modifier::DIM)
        }
    }

    /// Key figures.
    pub fn value(&self) -> Style {
        Style::new()
            .fg(self.color(Color::White))
            .add_modifier(Modifier::BOLD)
    }

    /// Good news (compute saved).
    pub fn good(&self) -> Style {
        Style::new()
            .fg(self.color(Color::Green))
            .add_modifier(Modifier::BOLD)
    }

    /// FROZEN / PAUSED marks.
    pub fn mark(&self) -> Style {
        Style::new()
            .fg(self.color(Color::Black))
            .bg(self.color(Color::Yellow))
            .add_modifier(Modifier::BOLD | Modifier::REVERSED)
    }

    /// Error messages.
    pub fn error(&self) -> Style {
        Style::new()
            .fg(self.color(Color::Red))
            .add_modifier(Modifier::BOLD)
    }

    /// Informational messages.
    pub fn info(&self) -> Style {
        Style::new().fg(self.color(Color::Cyan))
    }

    /// The filled part of a slider bar and histogram bars.
    pub fn bar(&self) -> Style {
        Style::new().fg(self.color(Color::LightBlue))
    }

    /// The filled part of the focused slider.
    pub fn bar_focused(&self) -> Style {
        Style::new()
            .fg(self.color(Color::Yellow))
            .add_modifier(Modifier::BOLD)
    }

    /// Percentile markers under histograms, the heatmap cursor.
    pub fn marker(&self) -> Style {
        Style::new()
            .fg(self.color(Color::Magenta))
            .add_modifier(Modifier::BOLD)
    }

    /// Prompt tokens in the generated-text strip (sampled tokens use the plain style).
    pub fn prompt_text(&self) -> Style {
        Style::new().add_modifier(Modifier::ITALIC | Modifier::UNDERLINED)
    }
}

/// RGB of the A/B difference scale at `d` in [-1, 1]: blue where B uses an expert less, white
/// at no change, red where B uses it more (the ends of ColorBrewer's RdBu, as in the HTML
/// report).
pub fn diverging_rgb(d: f64) -> (u8, u8, u8) {
    let d = if d.is_nan() { 0.0 } else { d.clamp(-1.0, 1.0) };
    let (end, f) = if d < 0.0 {
        ((33.0, 102.0, 172.0), -d)
    } else {
        ((178.0, 24.0, 43.0), d)
    };
    let mix = |e: f64| (247.0 + (e - 247.0) * f).round() as u8;
    (mix(end.0), mix(end.1), mix(end.2))
}

/// The 0..=4 level of the shade glyph for intensity `v`.
pub fn shade_level(v: f64) -> usize {
    if v.is_nan() || v <= 0.0 {
        0
    } else {
        ((v.min(1.0) * 4.0).ceil() as usize).clamp(1, 4)
    }
}

/// RGB of the heat ramp at `v` (0..=1), linear between the stops; exactly 0 is the colour of an unused expert.
pub fn heat_rgb(v: f64) -> (u8, u8, u8) {
    ramp_rgb(&RAMP, v)
}

fn ramp_rgb(ramp: &[(u8, u8, u8); 5], v: f64) -> (u8, u8, u8) {
    if v.is_nan() || v <= 0.0 {
        return UNUSED;
    }
    let x = v.min(1.0) * (ramp.len() - 1) as f64;
    let i = (x.floor() as usize).min(ramp.len() - 2);
    let f = x - i as f64;
    let (a, b) = (ramp[i], ramp[i + 1]);
    let mix = |p: u8, q: u8| (p as f64 + (q as f64 - p as f64) * f).round() as u8;
    (mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// The nearest entry of the xterm 6x6x6 colour cube.
pub fn ansi256_of(r: u8, g: u8, b: u8) -> u8 {
    let q = |c: u8| ((c as u16 * 5 + 127) / 255) as u8;
    16 + 36 * q(r) + 6 * q(g) + q(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_detection() {
        use ColorMode::*;
        assert_eq!(
            ColorMode::from_env(ColorChoice::Never, None, Some("truecolor"), None),
            NoColor
        );
        assert_eq!(
            ColorMode::from_env(ColorChoice::Auto, Some("1"), Some("truecolor"), None),
            NoColor
        );
        // An empty NO_COLOR does not count.
        assert_eq!(
            ColorMode::from_env(ColorChoice::Auto, Some(""), Some("truecolor"), None),
            TrueColor
        );
        assert_eq!(
            ColorMode::from_env(ColorChoice::Auto, None, None, Some("xterm-256color")),
            Ansi256
        );
        assert_eq!(
            ColorMode::from_env(ColorChoice::Auto, None, None, Some("xterm")),
            NoColor
        );
        assert_eq!(
            ColorMode::from_env(ColorChoice::Auto, None, None, Some("linux")),
            NoColor
        );
        assert_eq!(
            ColorMode::from_env(ColorChoice::Auto, None, None, None),
            NoColor
        );
        // --color always overrides NO_COLOR and a 16-colour TERM; never overrides everything.
        assert_eq!(
            ColorMode::from_env(ColorChoice::Always, Some("1"), None, Some("xterm")),
            ColorMode::Ansi256
        );
        assert_eq!(
            ColorMode::from_env(ColorChoice::Always, Some("1"), Some("24bit"), None),
            ColorMode::TrueColor
        );
    }

    #[test]
    fn shades_and_ramp() {
        assert_eq!(Theme::shade(0.0), " ");
        assert_eq!(Theme::shade(0.001), "░");
        assert_eq!(Theme::shade(0.25), "░");
        assert_eq!(Theme::shade(0.26), "▒");
        assert_eq!(Theme::shade(0.6), "▓");
        assert_eq!(Theme::shade(1.0), "█");
        assert_eq!(heat_rgb(0.0), UNUSED);
        assert_eq!(heat_rgb(1.0), RAMP[4]);
        for p in [
            Palette::Viridis,
            Palette::Cividis,
            Palette::Magma,
            Palette::Gray,
        ] {
            let t = Theme::new(ColorMode::TrueColor).with_palette(p);
            let r = p.ramp();
            assert_eq!(t.heat(1.0), Color::Rgb(r[4].0, r[4].1, r[4].2), "{p:?}");
            assert_eq!(
                t.heat(0.0),
                Color::Rgb(UNUSED.0, UNUSED.1, UNUSED.2),
                "{p:?}"
            );
            // Brighter with the value, so the ramp reads in order.
            let lum = |c: (u8, u8, u8)| 0.3 * c.0 as f64 + 0.59 * c.1 as f64 + 0.11 * c.2 as f64;
            assert!(r.windows(2).all(|w| lum(w[1]) > lum(w[0])), "{p:?}");
        }
        assert_eq!(heat_rgb(1e-9), RAMP[0]);
        assert_eq!(heat_rgb(0.5), RAMP[2]);
        assert_eq!(ansi256_of(0, 0, 0), 16);
        assert_eq!(ansi256_of(255, 255, 255), 231);
    }
}
