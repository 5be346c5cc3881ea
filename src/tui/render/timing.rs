//! Where the time of a forward pass goes: attention, router, experts (or dense FFNs) and the
//! rest (embedding, final norm, LM head, the session's own work inside the pass), as means per
//! pass over the epoch. It explains why tokens/s need not follow the FLOPs saved.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

use crate::profiling::snapshot::Histograms;
use crate::tui::app::App;
use crate::tui::render::panel_block;
use crate::units::micros;

/// Mean time per forward pass of each part, microseconds: (attention, router, FFN / experts,
/// rest, whole pass). `None` before a timed pass.
pub fn breakdown(h: &Histograms) -> Option<[f64; 5]> {
    let pass = &h.forward_latency_us;
    if pass.count == 0 {
        return None;
    }
    let sum = |f: &dyn Fn(&crate::profiling::snapshot::LayerTimeHistograms) -> f64| -> f64 {
        h.layer_time_us.iter().map(f).sum()
    };
    let attention = sum(&|l| l.attention_us.mean);
    let router = sum(&|l| if l.is_moe { l.router_us.mean } else { 0.0 });
    let ffn = sum(&|l| l.ffn_us.mean);
    // The parts are timed inside the pass, so they cannot exceed it; rounding may make them.
    let rest = (pass.mean - attention - router - ffn).max(0.0);
    Some([attention, router, ffn, rest, pass.mean])
}

/// Draws the timing panel.
pub fn render(frame: &mut Frame, area: Rect, app: &App) {
    let Some(snap) = app.displayed() else {
        return;
    };
    if area.height < 2 {
        return;
    }
    let theme = &app.theme;
    let h = &snap.epoch.histograms;
    // The longest title that fits, shortened whole rather than cut mid-word.
    let n = h.forward_latency_us.count;
    let room = (area.width as usize).saturating_sub(4);
    let (name, detail) = [
        (
            " Time per forward pass ",
            format!("mean over {n} passes, epoch "),
        ),
        (" Time per pass ", format!("mean of {n} passes ")),
        (" Time per pass ", String::new()),
    ]
    .into_iter()
    .find(|(a, b)| a.chars().count() + b.chars().count() <= room)
    .unwrap_or((" Time ", String::new()));
    let title = Line::from(vec![Span::raw(name), Span::styled(detail, theme.dim())]);
    frame.render_widget(panel_block(app, title, false), area);
    let inner = Rect {
        y: area.y + 1,
        height: area.height - 1,
        ..area
    };
    let Some([attn, router, ffn, rest, pass]) = breakdown(h) else {
        frame.render_widget(
            Paragraph::new(Span::styled(
                " no timed pass yet in this epoch",
                theme.dim(),
            )),
            Rect { height: 1, ..inner },
        );
        return;
    };
    let dense_blocks = snap.model.moe_layers.len() < snap.model.n_layers;
    let pct = |v: f64| if pass > 0.0 { 100.0 * v / pass } else { 0.0 };
    let part = |name: &str, v: f64| -> Vec<Span<'static>> {
        vec![
            Span::styled(format!("{name} "), theme.dim()),
            Span::styled(micros(v), theme.value()),
            Span::styled(format!(" {:.0}%", pct(v)), theme.dim()),
        ]
    };
    let ffn_name = if dense_blocks {
        "experts+FFN"
    } else {
        "experts"
    };
    // Wrapped between parts onto as many lines as the panel needs.
    let mut parts: Vec<Vec<Span<'static>>> = vec![vec![
        Span::styled(" pass ", theme.dim()),
        Span::styled(micros(pass), theme.value()),
        Span::styled(" =", theme.dim()),
    ]];
    for (i, (name, v)) in [
        ("attention", attn),
        ("router", router),
        (ffn_name, ffn),
        ("rest", rest),
    ]
    .into_iter()
    .enumerate()
    {
        let mut p = vec![Span::styled(if i == 0 { " " } else { " + " }, theme.dim())];
        p.extend(part(name, v));
        parts.push(p);
    }
    let width = inner.width as usize;
    let len = |p: &[Span]| p.iter().map(|s| s.content.chars().count()).sum::<usize>();
    let mut lines: Vec<Vec<Span<'static>>> = vec![Vec::new()];
    for p in parts {
        let cur = lines.last_mut().expect("one line");
        if !cur.is_empty() && len(cur) + len(&p) > width {
            lines.push(p);
        } else {
            cur.extend(p);
        }
    }
    frame.render_widget(
        Paragraph::new(lines.into_iter().map(Line::from).collect::<Vec<_>>()),
        inner,
    );
}
