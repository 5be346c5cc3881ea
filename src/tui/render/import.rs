//! The import view (`xmoe-top import FILE --tui`): an engine dump's load as a heatmap of layers ×
//! experts in the live heatmap's palette, each layer's imbalance beside it, and the per-GPU
//! balance panel. The dump is fixed, so the view has its own small loop: arrows scroll, `q` or
//! Esc leaves.

use std::io;

use anyhow::{Context, Result};
use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::Frame;
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Wrap};

use crate::import::{Summary, WhatIf};
use crate::tui::theme::{ColorChoice, ColorMode, Theme};

/// Where the view is scrolled to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImportScroll {
    /// First layer shown.
    pub layer: usize,
    /// First expert shown.
    pub expert: usize,
}

fn ratio(v: Option<f64>) -> String {
    v.map_or_else(|| "—".into(), |r| format!("{r:.2}"))
}

/// Draws the whole view into `area`.
pub fn draw(frame: &mut Frame, area: Rect, s: &Summary, theme: &Theme, scroll: ImportScroll) {
    let gpu_rows = s
        .gpu
        .as_ref()
        .map_or(3, |g| (g.gpus as u16 + 3).min(area.height / 3));
    let [head, heat, gpu, foot] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Min(4),
        Constraint::Length(gpu_rows.max(3)),
        Constraint::Length(2),
    ])
    .areas(area);
    let mut shape = format!(
        "{} layers × {} experts · {} {} · {} assignments",
        s.n_layers, s.n_experts, s.records, s.record_kind, s.total
    );
    if let Some(t) = s.tokens {
        shape.push_str(&format!(" · {t} tokens"));
    }
    frame.render_widget(
        Paragraph::new(vec![
            Line::from(vec![
                Span::styled(format!("{} ", s.format), theme.title()),
                Span::raw(s.file.clone()),
            ]),
            Line::styled(shape, theme.dim()),
        ]),
        head,
    );
    draw_heat(frame, heat, s, theme, scroll);
    draw_gpus(frame, gpu, s, theme);
    let what = match &s.what_if {
        WhatIf::NotAsked => String::new(),
        WhatIf::Unavailable { threshold, .. } => format!(
            "what-if t={threshold}: not computable from this dump (see the text summary) · "
        ),
    };
    frame.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled(what, theme.dim()),
            Span::styled("↑↓←→", theme.value()),
            Span::raw(" scroll  "),
            Span::styled("q", theme.value()),
            Span::raw(" quit"),
        ]))
        .wrap(Wrap { trim: true }),
        foot,
    );
}

fn draw_heat(frame: &mut Frame, area: Rect, s: &Summary, theme: &Theme, scroll: ImportScroll) {
    let max = s.load.iter().flatten().copied().max().unwrap_or(0);
    let title = Line::from(vec![
        Span::styled("Expert load", theme.title()),
        Span::styled(
            format!(
                " (layers × experts; busiest cell {max}) · overall max/mean {}",
                ratio(s.overall_imbalance)
            ),
            theme.dim(),
        ),
    ]);
    let block = Block::new().borders(Borders::TOP).title(title);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    // Row label "L12 " and the imbalance column " 1.23x" take 11 cells.
    let label_w = 5usize;
    let imb_w = 7usize;
    let cols = (inner.width as usize).saturating_sub(label_w + imb_w);
    let rows = inner.height as usize;
    // Up to 4 columns per expert when few experts leave room, so small dumps stay readable.
    let cell_w = (cols / s.n_experts.max(1)).clamp(1, 4);
    let first_e = scroll.expert.min(s.n_experts.saturating_sub(1));
    let last_e = (first_e + cols / cell_w).min(s.n_experts);
    let mut lines = Vec::new();
    for (l, row) in s.load.iter().enumerate().skip(scroll.layer).take(rows) {
        let mut spans = vec![Span::styled(format!("L{l:<3} "), theme.dim())];
        for &v in &row[first_e..last_e] {
            let x = if max > 0 { v as f64 / max as f64 } else { 0.0 };
            let cell = if theme.has_color() {
                Span::styled(" ".repeat(cell_w), Style::new().bg(theme.heat(x)))
            } else {
                Span::raw(Theme::shade(x).repeat(cell_w))
            };
            spans.push(cell);
        }
        spans.push(Span::styled(
            format!(" {:>5}x", ratio(s.layers[l].imbalance)),
            theme.value(),
        ));
        lines.push(Line::from(spans));
    }
    if (last_e < s.n_experts || first_e > 0)
        && let Some(last) = lines.last_mut()
    {
        last.spans.push(Span::styled(
            format!(" experts {first_e}..{last_e}"),
            theme.dim(),
        ));
    }
    frame.render_widget(Paragraph::new(lines), inner);
}

fn draw_gpus(frame: &mut Frame, area: Rect, s: &Summary, theme: &Theme) {
    let block = Block::new()
        .borders(Borders::TOP)
        .title(Line::from(Span::styled("Per-GPU load", theme.title())));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let Some(g) = &s.gpu else {
        let why = s.gpu_unavailable.clone().unwrap_or_default();
        frame.render_widget(
            Paragraph::new(Line::styled(format!("not computed: {why}"), theme.dim()))
                .wrap(Wrap { trim: true }),
            inner,
        );
        return;
    };
    let mut lines = vec![Line::styled(
        format!(
            "{} · overall max/mean {} (Σ busiest GPU / Σ mean, over layers)",
            g.source,
            ratio(g.overall)
        ),
        theme.dim(),
    )];
    let max = g.total_per_gpu.iter().copied().fold(0.0, f64::max);
    let bar_w = (inner.width as usize).saturating_sub(20).max(1);
    for (i, &v) in g.total_per_gpu.iter().enumerate() {
        let n = if max > 0.0 {
            ((v / max) * bar_w as f64).round() as usize
        } else {
            0
        };
        lines.push(Line::from(vec![
            Span::styled(format!("GPU{i:<3} "), theme.dim()),
            Span::styled(format!("{v:>10.0} "), theme.value()),
            Span::styled("█".repeat(n), theme.bar()),
        ]));
    }
    frame.render_widget(Paragraph::new(lines), inner);
}

/// Shows `s` until the user quits; the terminal is restored on every way out.
pub fn run(s: &Summary) -> Result<()> {
    let theme = Theme::new(ColorMode::detect(ColorChoice::Auto));
    let _guard = crate::tui::TerminalGuard::enter()?;
    let mut terminal =
        Terminal::new(CrosstermBackend::new(io::stdout())).context("cannot set up the terminal")?;
    let mut scroll = ImportScroll::default();
    loop {
        terminal
            .draw(|f| draw(f, f.area(), s, &theme, scroll))
            .context("cannot draw")?;
        if let Event::Key(k) = event::read().context("cannot read the terminal")? {
            if k.kind != KeyEventKind::Press {
                continue;
            }
            match k.code {
                KeyCode::Char('q') | KeyCode::Esc => break,
                KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => break,
                KeyCode::Down => {
                    scroll.layer = (scroll.layer + 1).min(s.n_layers.saturating_sub(1))
                }
                KeyCode::Up => scroll.layer = scroll.layer.saturating_sub(1),
                KeyCode::Right => {
                    scroll.expert = (scroll.expert + 8).min(s.n_experts.saturating_sub(1))
                }
                KeyCode::Left => scroll.expert = scroll.expert.saturating_sub(8),
                _ => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::analysis::{PlacementChoice, summarize};
    use crate::import::{Dump, Format};
    use ratatui::backend::TestBackend;

    fn summary(placement: PlacementChoice) -> Summary {
        let dump = Dump {
            format: Format::SglangStat,
            n_layers: 3,
            n_experts: 4,
            load: vec![vec![4, 2, 2, 2], vec![5, 1, 2, 2], vec![0, 0, 0, 0]],
            records: (2, "steps"),
            tokens: None,
            top_k: None,
            physical: None,
            notes: vec![],
        };
        summarize(&dump, "dump.pt", &placement, Some(0.9)).unwrap()
    }

    fn screen(s: &Summary, w: u16, h: u16, theme: &Theme) -> String {
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| draw(f, f.area(), s, theme, ImportScroll::default()))
            .unwrap();
        let buf = t.backend().buffer().clone();
        (0..h)
            .map(|y| (0..w).map(|x| buf[(x, y)].symbol()).collect::<String>() + "\n")
            .collect()
    }

    #[test]
    fn shows_the_heatmap_imbalance_and_gpu_panel_at_both_sizes() {
        let s = summary(PlacementChoice::Gpus(2));
        let theme = Theme::new(ColorMode::NoColor);
        for (w, h) in [(80, 24), (120, 40)] {
            let text = screen(&s, w, h, &theme);
            assert!(text.contains("sglang-stat"), "{text}");
            // Layer 0: loads 4,2,2,2 of max 5 shade as █▒▒▒ (0.8 and 0.4 of the busiest cell, in
            // quarter steps rounded up) and max/mean 1.60.
            // Each expert is 4 columns wide: there is room for it at both sizes.
            let row = |cells: &str| {
                cells
                    .chars()
                    .map(|c| c.to_string().repeat(4))
                    .collect::<String>()
            };
            assert!(
                text.contains(&format!("L0   {}  1.60x", row("█▒▒▒"))),
                "{text}"
            );
            assert!(
                text.contains(&format!("L1   {}  2.00x", row("█░▒▒"))),
                "{text}"
            );
            // A layer without load is blank with no ratio.
            assert!(
                text.contains(&format!("L2{}—x", " ".repeat(3 + 16 + 5))),
                "{text}"
            );
            assert!(text.contains("GPU0"), "{text}");
            assert!(text.contains("GPU1"), "{text}");
            assert!(text.contains("overall max/mean 1.20"), "{text}");
            assert!(text.contains("what-if t=0.9: not computable"), "{text}");
        }
        let s = summary(PlacementChoice::None);
        let text = screen(&s, 80, 24, &theme);
        assert!(text.contains("not computed: needs a placement"), "{text}");
    }
}
