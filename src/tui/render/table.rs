//! The per-expert table of the selected layer (an overlay, `x`): each expert's share of the
//! window's tokens, its gate mass and its load against the mean load, sorted by the column `s`
//! chooses. The heatmap shows the pattern; this shows the exact values.

use ratatui::Frame;
use ratatui::layout::{Constraint, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Paragraph};

use crate::profiling::snapshot::LayerStatsSnapshot;
use crate::tui::app::{App, TableSort};

/// One row of the table.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExpertRow {
    /// Expert number.
    pub expert: usize,
    /// Share of the window's tokens that selected it (0..=1).
    pub share: f64,
    /// Mean gate weight per token.
    pub gate_mass: f64,
    /// Its load (selected pairs) divided by the mean load over the layer's experts; `None`
    /// when no expert was selected.
    pub load_vs_mean: Option<f64>,
}

/// The rows of layer `l`, sorted by `sort` (numbers largest first, ties by expert number).
pub fn rows(l: &LayerStatsSnapshot, sort: TableSort) -> Vec<ExpertRow> {
    let e = l.expert_token_share.len();
    // An expert's load is its share times the tokens, so load / mean load = share / mean share.
    let mean_share = l.expert_token_share.iter().sum::<f64>() / e.max(1) as f64;
    let mut rows: Vec<ExpertRow> = (0..e)
        .map(|x| {
            let share = l.expert_token_share[x];
            ExpertRow {
                expert: x,
                share,
                gate_mass: l.expert_gate_mass.get(x).copied().unwrap_or(0.0),
                load_vs_mean: (mean_share > 0.0).then(|| share / mean_share),
            }
        })
        .collect();
    let key = |r: &ExpertRow| match sort {
        TableSort::Expert => 0.0,
        TableSort::Share => r.share,
        TableSort::GateMass => r.gate_mass,
        TableSort::Load => r.load_vs_mean.unwrap_or(0.0),
    };
    rows.sort_by(|a, b| key(b).total_cmp(&key(a)).then(a.expert.cmp(&b.expert)));
    rows
}

/// Draws the table over the middle of `area`.
pub fn render(frame: &mut Frame, area: Rect, app: &App) {
    let Some(snap) = app.displayed() else {
        return;
    };
    let theme = &app.theme;
    let window = &snap.epoch.window;
    let Some(l) = window.layers.get(app.layer) else {
        return;
    };
    let e = l.expert_token_share.len();
    let w = 72.min(area.width);
    let h = (e as u16 + 4).min(area.height.saturating_sub(2)).max(5);
    let popup = area.centered(Constraint::Length(w), Constraint::Length(h));
    frame.render_widget(Clear, popup);
    let block = Block::bordered().title(Line::from(vec![
        Span::styled(format!(" L{} experts ", l.layer), theme.title_focused()),
        Span::styled(
            format!(
                "window {} tok · sort: {} (s) · ↑↓ layer · x/Esc close ",
                window.tokens,
                app.table_sort.name()
            ),
            theme.dim(),
        ),
    ]));
    let inner = block.inner(popup);
    frame.render_widget(block, popup);
    if window.tokens == 0 {
        frame.render_widget(
            Paragraph::new(Span::styled(" no tokens yet in this epoch", theme.dim())),
            inner,
        );
        return;
    }
    let mark = |s: TableSort| if app.table_sort == s { "▼" } else { " " };
    let header = Line::styled(
        format!(
            " {}expert  {}share of tokens  {}gate mass  {}load/mean",
            mark(TableSort::Expert),
            mark(TableSort::Share),
            mark(TableSort::GateMass),
            mark(TableSort::Load)
        ),
        theme.dim(),
    );
    let all = rows(l, app.table_sort);
    let fit = (inner.height as usize).saturating_sub(2);
    let mut lines = vec![header];
    for r in all.iter().take(fit) {
        let cursor = r.expert == app.expert;
        // A bar of the share against the largest share, after the number.
        let max_share = l.expert_token_share.iter().copied().fold(0.0, f64::max);
        let bar_w = 10usize;
        let filled = if max_share > 0.0 {
            ((r.share / max_share) * bar_w as f64).round() as usize
        } else {
            0
        };
        let style = if cursor {
            theme.selected()
        } else {
            theme.value()
        };
        lines.push(Line::from(vec![
            Span::styled(if cursor { "▶" } else { " " }, theme.marker()),
            Span::styled(format!(" {:>6}", r.expert), style),
            Span::styled(format!("  {:>6.1}% ", 100.0 * r.share), style),
            Span::styled(format!("{:<bar_w$}", "█".repeat(filled)), theme.bar()),
            Span::styled(format!("  {:>9.3}", r.gate_mass), style),
            Span::styled(
                format!(
                    "  {:>8}",
                    r.load_vs_mean
                        .map_or("—".to_string(), |x| format!("{x:.2}×"))
                ),
                style,
            ),
        ]));
    }
    let unused = l.unused_experts.len();
    lines.push(Line::styled(
        if all.len() > fit {
            format!(
                " {} of {} experts shown (s sorts) · {unused} unused",
                fit,
                all.len()
            )
        } else {
            format!(" {} experts · {unused} unused", all.len())
        },
        theme.dim(),
    ));
    frame.render_widget(Paragraph::new(lines), inner);
}
