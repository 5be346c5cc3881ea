//! The A/B view (`a`): drawn over the body while open. The figures of the two policies on the
//! same batches (B − A), the difference heatmap (share of tokens per expert under B minus under
//! A, on a diverging scale with sign glyphs so it reads without colour too), per-layer experts
//! and agreement, and the Jaccard distribution.

use ratatui::Frame;
use ratatui::layout::{Layout, Rect};
use ratatui::style::{Color, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Clear, Paragraph};

use super::layout::{WIDE_WIDTH, first_visible, stack};
use crate::profiling::compare::{CompareSnapshot, JACCARD_BINS};
use crate::tui::app::App;
use crate::tui::theme::Theme;

/// Where each part of the A/B view goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompareLayout {
    /// Policies, sample and the keys.
    pub title: Rect,
    /// The Δ figures.
    pub figures: Rect,
    /// The difference heatmap with its legend and the selected layer's largest shifts.
    pub heatmap: Rect,
    /// Per-layer experts per token and agreement.
    pub layers: Rect,
    /// The Jaccard distribution.
    pub jaccard: Rect,
}

impl CompareLayout {
    /// Every part with its name, for checks and tests.
    pub fn parts(&self) -> [(&'static str, Rect); 5] {
        [
            ("compare title", self.title),
            ("compare figures", self.figures),
            ("compare heatmap", self.heatmap),
            ("compare layers", self.layers),
            ("compare jaccard", self.jaccard),
        ]
    }
}

/// Lines of the figures block.
const FIGURE_LINES: u16 = 6;

/// The view's layout in `body` for a model of `n_layers` MoE layers: one column below
/// [`WIDE_WIDTH`], else the figures across the top, the tables left and the heatmap right.
pub fn layout(body: Rect, n_layers: u16) -> CompareLayout {
    let [title, rest] = stack(body, [(1, 1), (0, u16::MAX)], [0, 1], 1);
    if body.width >= WIDE_WIDTH {
        // The figure lines are long: they take the whole width, the tables and heatmap share
        // what is below.
        let [figures, rest] = stack(rest, [(3, FIGURE_LINES), (0, u16::MAX)], [0, 1], 1);
        let [left, right] = rest.layout(
            &Layout::horizontal([
                ratatui::layout::Constraint::Percentage(50),
                ratatui::layout::Constraint::Fill(1),
            ])
            .spacing(1),
        );
        let [layers, jaccard] = stack(
            left,
            [(2, 1 + n_layers), (1, 2 + JACCARD_BINS as u16)],
            [0, 1],
            1,
        );
        CompareLayout {
            title,
            figures,
            heatmap: right,
            layers,
            jaccard,
        }
    } else {
        let [figures, heatmap, layers, jaccard] = stack(
            rest,
            [
                (3, FIGURE_LINES),
                (3, 2 + n_layers),
                (2, 1 + n_layers),
                (1, 1),
            ],
            [0, 1, 3, 2],
            1,
        );
        CompareLayout {
            title,
            figures,
            heatmap,
            layers,
            jaccard,
        }
    }
}

/// The glyphs of one heatmap cell `w` columns wide for a difference `d` on a scale of ±1: the
/// sign, then a shade for the magnitude (a blank cell for exactly no change).
pub fn cell_text(d: f64, w: usize) -> String {
    let sign = if d > 0.0 {
        '+'
    } else if d < 0.0 {
        '-'
    } else {
        '·'
    };
    let shade = Theme::shade(d.abs());
    match w {
        0 => String::new(),
        1 => sign.to_string(),
        2 => format!("{sign}{shade}"),
        _ => format!("{sign}{}{}", shade.repeat(w - 2), " "),
    }
}

fn diverging(theme: &Theme, d: f64) -> Style {
    if !theme.has_color() {
        return Style::new();
    }
    Style::new().bg(theme.diverging(d)).fg(Color::Black)
}

/// Draws the view over `area` (the body between header and status bar).
pub fn render(frame: &mut Frame, area: Rect, app: &App) {
    frame.render_widget(Clear, area);
    let theme = &app.theme;
    let keys = " · a stop · b B kind · { } B's k/t · Esc hide";
    let Some(c) = app.displayed().and_then(|s| s.compare.as_ref()) else {
        let l = layout(area, 0);
        let b = app.compare.b.map_or("B".to_string(), |b| {
            crate::profiling::sweep::policy_label(&b)
        });
        frame.render_widget(
            Paragraph::new(vec![
                Line::styled(format!("A/B vs {b}{keys}"), theme.title()),
                Line::styled(
                    "waiting for the first batch run under both policies…",
                    theme.dim(),
                ),
            ]),
            Rect {
                height: 2.min(area.height),
                ..l.title
            },
        );
        return;
    };
    let l = layout(area, c.layers.len() as u16);
    frame.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled(
                format!("A/B  A {}  vs  B {}", c.a.label, c.b.label),
                theme.title(),
            ),
            Span::styled(
                format!(" · {} tok, {} batches, B − A{keys}", c.tokens, c.batches),
                theme.dim(),
            ),
        ])),
        l.title,
    );
    frame.render_widget(Paragraph::new(figure_lines(c, theme)), l.figures);
    heatmap(frame, l.heatmap, app, c);
    layers(frame, l.layers, app, c);
    jaccard(frame, l.jaccard, app, c);
}

fn figure_lines<'a>(c: &CompareSnapshot, theme: &Theme) -> Vec<Line<'a>> {
    let row = |name: &str, value: String| {
        Line::from(vec![
            Span::styled(format!("{name:<12}"), theme.dim()),
            Span::styled(value, theme.value()),
        ])
    };
    let (a, b) = (&c.a, &c.b);
    vec![
        row(
            "experts/tok",
            format!(
                "A {:.2}  B {:.2}  Δ {:+.2}",
                a.mean_experts_per_token,
                b.mean_experts_per_token,
                c.delta_experts_per_token()
            ),
        ),
        row(
            "MoE FLOPs",
            format!(
                "A {:.1}%  B {:.1}% of all experts  Δ {:+.1} pp ({}/tok)",
                100.0 * a.moe_flops_fraction_of_all_experts,
                100.0 * b.moe_flops_fraction_of_all_experts,
                c.delta_moe_flops_pct_of_all_experts,
                crate::units::compact(c.delta_moe_flops_per_token)
            ),
        ),
        row(
            "pass ms",
            format!(
                "A {:.1} (p50 {:.1} p90 {:.1})  B {:.1} (p50 {:.1} p90 {:.1})  Δ {:+.2}{}",
                a.pass_ms_mean,
                a.pass_ms_p50,
                a.pass_ms_p90,
                b.pass_ms_mean,
                b.pass_ms_p50,
                b.pass_ms_p90,
                c.delta_pass_ms_mean,
                c.delta_pass_ms_stderr
                    .map_or(String::new(), |s| format!("±{s:.2}"))
            ),
        ),
        row(
            "bits/byte",
            match c.delta_bits_per_byte {
                Some(d) => format!(
                    "A {}  B {}  Δ {d:+.4}{} ({} batches)",
                    crate::units::fixed_or_dash(a.bits_per_byte, 3),
                    crate::units::fixed_or_dash(b.bits_per_byte, 3),
                    c.delta_bits_per_byte_stderr
                        .map_or(String::new(), |s| format!("±{s:.4}")),
                    c.batches
                ),
                None => "-".to_string(),
            },
        ),
        row(
            "KL(B‖A)",
            c.mean_kl_bits.map_or("-".to_string(), |k| {
                format!("{k:.4} bits/token over {} predictions", c.scored_tokens)
            }),
        ),
        row(
            "agreement",
            format!(
                "Jaccard {:.3} · identical sets {:.1}% of {} token-layers",
                c.jaccard_mean,
                100.0 * c.identical_fraction(),
                c.tokens * c.layers.len() as u64
            ),
        ),
    ]
}

/// The difference heatmap: a legend line, one row per layer (scrolled around the selected
/// layer when they do not fit), and the selected layer's largest shifts.
fn heatmap(frame: &mut Frame, area: Rect, app: &App, c: &CompareSnapshot) {
    if area.height == 0 {
        return;
    }
    let theme = &app.theme;
    let scale = c.max_abs_share_delta();
    let scale_or_one = if scale > 0.0 { scale } else { 1.0 };
    let mut lines = vec![Line::from(vec![
        Span::styled("Δ share of tokens B − A ", theme.title()),
        Span::styled("-", diverging(theme, -1.0)),
        Span::styled(format!(" {:+.1} pp ", -100.0 * scale), theme.dim()),
        Span::styled("·", diverging(theme, 0.0)),
        Span::styled(" 0 ", theme.dim()),
        Span::styled("+", diverging(theme, 1.0)),
        Span::styled(format!(" {:+.1} pp", 100.0 * scale), theme.dim()),
    ])];
    let n_experts = c.layers.first().map_or(0, |l| l.share_a.len());
    let label_w = 5usize;
    let room = (area.width as usize).saturating_sub(label_w);
    // One column per expert when they fit, up to 3 each; else experts share a column and it
    // shows the largest change among them.
    let (per_cell, cell_w) = if n_experts == 0 || room == 0 {
        (1, 0)
    } else if n_experts <= room {
        (1, (room / n_experts).min(3))
    } else {
        (n_experts.div_ceil(room), 1)
    };
    let rows = area.height.saturating_sub(2) as usize;
    let first = first_visible(app.layer, rows, c.layers.len());
    for (slot, l) in c.layers.iter().enumerate().skip(first).take(rows) {
        let marker = if slot == app.layer { "▶" } else { " " };
        let mut spans = vec![Span::styled(
            format!("{marker}L{:<3}", l.layer),
            if slot == app.layer {
                theme.selected()
            } else {
                theme.dim()
            },
        )];
        for chunk in l.share_delta().chunks(per_cell) {
            let d = chunk
                .iter()
                .fold(0.0f64, |m, &x| if x.abs() > m.abs() { x } else { m });
            let v = d / scale_or_one;
            spans.push(Span::styled(cell_text(v, cell_w), diverging(theme, v)));
        }
        lines.push(Line::from(spans));
    }
    if let Some(l) = c.layers.get(app.layer) {
        let mut d: Vec<(usize, f64)> = l.share_delta().into_iter().enumerate().collect();
        d.sort_by(|x, y| y.1.abs().total_cmp(&x.1.abs()));
        let shifts: Vec<String> = d
            .iter()
            .take(4)
            .filter(|(_, v)| *v != 0.0)
            .map(|(e, v)| format!("e{e} {:+.1}", 100.0 * v))
            .collect();
        lines.push(Line::styled(
            format!(
                " L{} largest shifts (pp): {}",
                l.layer,
                if shifts.is_empty() {
                    "none".to_string()
                } else {
                    shifts.join(", ")
                }
            ),
            theme.dim(),
        ));
    }
    frame.render_widget(Paragraph::new(lines), area);
}

/// Per-layer experts per token under A and B, and how often the two sets agree.
fn layers(frame: &mut Frame, area: Rect, app: &App, c: &CompareSnapshot) {
    if area.height == 0 {
        return;
    }
    let theme = &app.theme;
    let mut lines = vec![Line::styled(
        format!(
            "{:<6}{:>8}{:>8}{:>8}{:>9}{:>11}",
            "layer", "exp/tok A", "B", "Δ", "Jaccard", "identical"
        ),
        theme.title(),
    )];
    let rows = area.height.saturating_sub(1) as usize;
    let first = first_visible(app.layer, rows, c.layers.len());
    for (slot, l) in c.layers.iter().enumerate().skip(first).take(rows) {
        let n: u64 = l.jaccard_histogram.iter().sum();
        let same = l.jaccard_histogram.last().copied().unwrap_or(0);
        let text = format!(
            "{:<6}{:>8.2}{:>8.2}{:>+8.2}{:>9.3}{:>10.1}%",
            format!("L{}", l.layer),
            l.experts_per_token_a,
            l.experts_per_token_b,
            l.delta_experts_per_token(),
            l.jaccard_mean,
            if n > 0 {
                100.0 * same as f64 / n as f64
            } else {
                0.0
            }
        );
        lines.push(if slot == app.layer {
            Line::styled(text, theme.selected())
        } else {
            Line::raw(text)
        });
    }
    frame.render_widget(Paragraph::new(lines), area);
}

/// The Jaccard distribution over every (token, layer): one bar per bin on one line (wide
/// screens also get one line per bin with its share).
fn jaccard(frame: &mut Frame, area: Rect, app: &App, c: &CompareSnapshot) {
    if area.height == 0 {
        return;
    }
    let theme = &app.theme;
    const BARS: [&str; 9] = [" ", "▁", "▂", "▃", "▄", "▅", "▆", "▇", "█"];
    let total: u64 = c.jaccard_histogram.iter().sum();
    let max = c.jaccard_histogram.iter().copied().max().unwrap_or(0);
    let bars: String = c
        .jaccard_histogram
        .iter()
        .map(|&n| {
            let level = if max == 0 || n == 0 {
                0
            } else {
                ((n as f64 / max as f64 * 8.0).ceil() as usize).clamp(1, 8)
            };
            BARS[level].repeat(2)
        })
        .collect();
    let mut lines = vec![Line::from(vec![
        Span::styled("Jaccard 0 ", theme.dim()),
        Span::styled(bars, theme.bar()),
        Span::styled(" =1", theme.dim()),
    ])];
    let labels = [
        "0-.1", ".1-.2", ".2-.3", ".3-.4", ".4-.5", ".5-.6", ".6-.7", ".7-.8", ".8-.9", ".9-1",
        "=1",
    ];
    for (label, &n) in labels.iter().zip(&c.jaccard_histogram) {
        let pct = if total > 0 {
            100.0 * n as f64 / total as f64
        } else {
            0.0
        };
        lines.push(Line::raw(format!("  {label:<6}{pct:>6.1}%  {n}")));
    }
    lines.truncate(area.height as usize);
    frame.render_widget(Paragraph::new(lines), area);
}
