//! Threshold sliders: a global one, then one per MoE layer, each with its t (or the policy in
//! force), experts per token and the MoE compute saved against running all experts (the
//! header's framing).

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::text::Span;

use crate::profiling::snapshot::Snapshot;
use crate::routing::RoutingPolicy;
use crate::tui::app::{App, Panel, Target};
use crate::tui::render::{layout::first_visible, panel_block};

const MARK_W: u16 = 2;
const LABEL_W: u16 = 5;
const POLICY_W: u16 = 13;
const FIGURES_W: u16 = 29;

/// One drawn slider.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SliderRow {
    /// What it controls.
    pub target: Target,
    /// The whole line.
    pub line: Rect,
    /// The bar (clicking or dragging here sets t).
    pub bar: Rect,
}

/// The drawn sliders in panel `area`: the global one first, then the visible layers.
pub fn geometry(area: Rect, app: &App, snap: &Snapshot) -> Vec<SliderRow> {
    let inner_h = area.height.saturating_sub(1);
    let n = snap.policy.layers.len();
    let bar_x = area.x + MARK_W + LABEL_W + POLICY_W;
    let bar_w = area
        .width
        .saturating_sub(MARK_W + LABEL_W + POLICY_W + FIGURES_W);
    let row = |target, y| SliderRow {
        target,
        line: Rect::new(area.x, y, area.width, 1),
        bar: Rect::new(bar_x, y, bar_w, 1),
    };
    let mut rows = Vec::new();
    if inner_h == 0 {
        return rows;
    }
    rows.push(row(Target::Global, area.y + 1));
    let layer_rows = (inner_h - 1) as usize;
    let focus = match app.slider {
        Target::Layer(s) => s,
        Target::Global => app.layer,
    };
    let first = first_visible(focus, layer_rows, n);
    for (i, slot) in (first..n).take(layer_rows).enumerate() {
        rows.push(row(Target::Layer(slot), area.y + 2 + i as u16));
    }
    rows
}

/// The threshold for a click at absolute column `x` on `bar`: the bar's last cell is 1.0,
/// rounded to the 0.01 step and never below it.
pub fn t_at(bar: Rect, x: u16) -> f32 {
    let w = bar.width.max(1) as f32;
    let f = (x.saturating_sub(bar.x) as f32 + 1.0) / w;
    ((f * 100.0).round() / 100.0).clamp(0.01, 1.0)
}

/// `t 0.70`, `top-4`, `dense`; `+n` when the weights are renormalised (`t 0.70+n`).
pub fn policy_text(p: &RoutingPolicy) -> String {
    let n = if p.renormalizes() { "+n" } else { "" };
    match p {
        RoutingPolicy::Threshold { t, .. } => format!("t {t:.2}{n}"),
        RoutingPolicy::TopK { k, .. } => format!("top-{k}{n}"),
        RoutingPolicy::Dense => "dense".to_string(),
    }
}

/// Short form for a pending request (`0.65`, `top-4`, `dense`).
fn pending_text(p: &RoutingPolicy) -> String {
    match p {
        RoutingPolicy::Threshold { t, .. } => format!("{t:.2}"),
        other => policy_text(other),
    }
}

/// The common policy of all layers, if they share one.
pub fn common_policy(snap: &Snapshot) -> Option<RoutingPolicy> {
    let first = snap.policy.layers.first()?.policy;
    snap.policy
        .layers
        .iter()
        .all(|l| l.policy.same_as(&first))
        .then_some(first)
}

/// Draws the sliders panel.
pub fn render(frame: &mut Frame, area: Rect, app: &App) {
    let Some(snap) = app.displayed() else {
        return;
    };
    let theme = &app.theme;
    let focused_panel = app.panel == Panel::Sliders;
    let capacity = match snap.policy.capacity_factor {
        Some(c) => format!("capacity factor {c:.1}"),
        None => "capacity off".to_string(),
    };
    // Key reminders are left out whole when the panel is narrow (never cut mid-word).
    let dim = |t: &str| Span::styled(t.to_string(), theme.dim());
    let title = crate::tui::render::header::fit(
        vec![
            (0, vec![Span::raw(" Thresholds")]),
            (2, vec![dim("←/→ ±0.01")]),
            (3, vec![dim("Shift/PgUp ±0.05")]),
            (4, vec![dim("g all  p policy")]),
            (1, vec![dim(&format!("{capacity} "))]),
        ],
        area.width.saturating_sub(8),
    );
    frame.render_widget(panel_block(app, title, focused_panel), area);
    let window = &snap.epoch.window;
    for row in geometry(area, app, snap) {
        let focused = row.target == app.slider;
        // Compute saved against all experts, the header's framing, so one screen says one thing.
        let (label, policy, pending, experts, saved_pct) = match row.target {
            Target::Global => {
                let pend: Vec<_> = (0..snap.policy.layers.len())
                    .map(|s| app.pending(s).map(|p| p.policy))
                    .collect();
                let pending = match pend.first() {
                    Some(Some(p)) if pend.iter().all(|q| q.is_some_and(|q| q.same_as(p))) => {
                        Some(*p)
                    }
                    _ => None,
                };
                (
                    "all".to_string(),
                    common_policy(snap),
                    pending,
                    window.mean_experts_per_token,
                    window.flops.moe_saved_vs_all_experts_pct,
                )
            }
            Target::Layer(slot) => {
                let Some(l) = window.layers.get(slot) else {
                    continue;
                };
                (
                    format!("L{}", l.layer),
                    snap.policy.layers.get(slot).map(|p| p.policy),
                    app.pending(slot).map(|p| p.policy),
                    l.mean_experts_per_token,
                    100.0 * (1.0 - l.moe_flops_fraction_of_all_experts),
                )
            }
        };
        let buf = frame.buffer_mut();
        let y = row.line.y;
        let mark = if focused { "▶ " } else { "  " };
        let label_style = if focused {
            theme.selected()
        } else {
            theme.value()
        };
        buf.set_string(row.line.x, y, mark, theme.marker());
        buf.set_stringn(
            row.line.x + MARK_W,
            y,
            format!("{label:<4}"),
            (LABEL_W - 1) as usize,
            label_style,
        );
        let mut ptext = policy.as_ref().map_or("mixed".to_string(), policy_text);
        if let Some(p) = pending {
            ptext.push_str(&format!("→{}", pending_text(&p)));
        }
        buf.set_stringn(
            row.line.x + MARK_W + LABEL_W,
            y,
            &ptext,
            (POLICY_W - 1) as usize,
            label_style,
        );
        // The bar: t for threshold, k / E for top-k, full for dense.
        let fill = match policy {
            Some(RoutingPolicy::Threshold { t, .. }) => t as f64,
            Some(RoutingPolicy::TopK { k, .. }) => k as f64 / snap.model.n_experts.max(1) as f64,
            Some(RoutingPolicy::Dense) => 1.0,
            None => 0.0,
        };
        let w = row.bar.width as usize;
        if w > 0 {
            let filled =
                ((fill * w as f64).round() as usize).clamp(usize::from(policy.is_some()), w);
            let knob = if matches!(policy, Some(RoutingPolicy::Threshold { .. })) {
                "●"
            } else {
                "◆"
            };
            let style = if focused {
                theme.bar_focused()
            } else {
                theme.bar()
            };
            for i in 0..w {
                let sym = if i + 1 == filled {
                    knob
                } else if i < filled {
                    "━"
                } else {
                    "─"
                };
                let s = if i < filled { style } else { theme.dim() };
                buf.set_string(row.bar.x + i as u16, y, sym, s);
            }
        }
        // A new epoch starts with an empty window: no figure rather than a misleading 0.
        let figures = if window.tokens == 0 {
            "  no tokens yet in this epoch".to_string()
        } else {
            format!("  {experts:5.2} exp/tok  {saved_pct:5.1}% saved")
        };
        buf.set_stringn(
            row.bar.x + row.bar.width,
            y,
            figures,
            FIGURES_W as usize,
            theme.value(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn click_positions_map_to_thresholds() {
        let bar = Rect::new(10, 0, 50, 1);
        assert_eq!(t_at(bar, 59), 1.0);
        assert_eq!(t_at(bar, 34), 0.5);
        assert_eq!(t_at(bar, 10), 0.02);
        assert_eq!(t_at(bar, 0), 0.02);
        assert_eq!(t_at(Rect::new(0, 0, 200, 1), 0), 0.01);
    }
}
