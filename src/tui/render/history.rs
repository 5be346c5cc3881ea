//! The history panel: tokens/s, experts per token, MoE compute saved and Δ bits/byte over the
//! last minutes (one point per second, carried in the snapshot, sampled on the stats side), with
//! the points where the settings changed (a new epoch) marked on a time axis.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

use crate::profiling::snapshot::{HistoryPoint, WorkloadKind};
use crate::tui::app::App;
use crate::tui::render::panel_block;
use crate::units::si;

const EIGHTHS: [&str; 9] = [" ", "▁", "▂", "▃", "▄", "▅", "▆", "▇", "█"];
/// Width of the series names.
const LABEL_W: u16 = 13;
/// Width of the latest value, right of the plot.
const VALUE_W: u16 = 24;

/// One plotted series: its name, its value at each point, and how its latest value reads.
struct Series {
    name: &'static str,
    value: fn(&HistoryPoint) -> Option<f64>,
    latest: fn(&HistoryPoint) -> String,
    /// Bars start at zero (a rate, a count) rather than at the lowest value shown (a difference).
    from_zero: bool,
}

fn series(kind: WorkloadKind) -> Vec<Series> {
    let mut v = vec![
        Series {
            name: "tok/s",
            value: |p| p.tokens_per_second,
            latest: |p| match p.tokens_per_second {
                Some(r) => format!("{r:.0} ({} tok in 1 s)", p.tokens),
                None => "— (no pass)".to_string(),
            },
            from_zero: true,
        },
        Series {
            name: "experts/tok",
            value: |p| p.experts_per_token,
            latest: |p| {
                p.experts_per_token
                    .map_or("—".into(), |e| format!("{e:.2}"))
            },
            from_zero: true,
        },
        Series {
            name: "MoE saved %",
            value: |p| p.moe_saved_pct,
            latest: |p| p.moe_saved_pct.map_or("—".into(), |e| format!("{e:.1}%")),
            from_zero: true,
        },
    ];
    if kind == WorkloadKind::Eval {
        v.push(Series {
            name: "Δ bits/byte",
            value: |p| p.delta_bits_per_byte,
            latest: |p| match p.delta_bits_per_byte {
                Some(d) => format!(
                    "{d:+.3}{} ({} b)",
                    p.delta_stderr
                        .map_or(String::new(), |se| format!("±{se:.3}")),
                    p.compared_batches
                ),
                None => "— (no reference)".to_string(),
            },
            from_zero: false,
        });
    }
    v
}

/// Draws the history panel.
pub fn render(frame: &mut Frame, area: Rect, app: &App) {
    let Some(snap) = app.displayed() else {
        return;
    };
    if area.height < 2 || area.width < LABEL_W + VALUE_W + 10 {
        return;
    }
    let theme = &app.theme;
    let points = &snap.history;
    let plot_w = (area.width - LABEL_W - VALUE_W - 1) as usize;
    let shown = &points[points.len().saturating_sub(plot_w)..];
    let span_s = match (shown.first(), shown.last()) {
        (Some(a), Some(b)) => b.t_s - a.t_s,
        _ => 0.0,
    };
    let title = Line::from(vec![
        Span::raw(" History "),
        Span::styled(
            if area.width >= 90 {
                format!("1 point/s, last {span_s:.0} s, all epochs · ▲ new settings (epoch) ")
            } else {
                format!("1 point/s, last {span_s:.0} s · ▲ new epoch ")
            },
            theme.dim(),
        ),
    ]);
    frame.render_widget(panel_block(app, title, false), area);
    let inner = Rect {
        y: area.y + 1,
        height: area.height - 1,
        ..area
    };
    if shown.is_empty() {
        frame.render_widget(
            Paragraph::new(Span::styled(
                " collecting: the first point comes after one second",
                theme.dim(),
            )),
            Rect { height: 1, ..inner },
        );
        return;
    }
    let all = series(snap.workload.kind);
    // The time axis takes a line when the series have theirs.
    let axis = inner.height as usize > all.len();
    let lines = inner.height as usize - usize::from(axis);
    let n_series = all.len().min(lines);
    let rows_each = (lines / n_series.max(1)).max(1);
    // A point whose epoch differs from the one before it starts new settings.
    let changed: Vec<bool> = shown
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let before = if i == 0 {
                points
                    .len()
                    .checked_sub(shown.len() + 1)
                    .map(|j| &points[j])
            } else {
                Some(&shown[i - 1])
            };
            before.is_some_and(|b| b.epoch != p.epoch)
        })
        .collect();
    let x0 = inner.x + LABEL_W;
    let buf = frame.buffer_mut();
    for (si_, s) in all.iter().take(n_series).enumerate() {
        let top = inner.y + (si_ * rows_each) as u16;
        let h = rows_each as u16;
        let label_y = top + h - 1;
        buf.set_stringn(
            inner.x,
            label_y,
            format!(" {:<w$}", s.name, w = LABEL_W as usize - 1),
            LABEL_W as usize,
            theme.dim(),
        );
        let vals: Vec<Option<f64>> = shown.iter().map(|p| (s.value)(p)).collect();
        let present = vals.iter().flatten().copied();
        let (mut lo, mut hi) = present.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
        if s.from_zero {
            lo = lo.min(0.0);
        }
        if !lo.is_finite() {
            (lo, hi) = (0.0, 1.0);
        }
        let levels = (h as usize) * 8;
        for (i, v) in vals.iter().enumerate() {
            let x = x0 + i as u16;
            let style = if changed[i] {
                theme.marker()
            } else {
                theme.bar()
            };
            // Absent values stay blank: no pass, or an empty window, is not a zero.
            let Some(v) = v else { continue };
            let f = if hi > lo { (v - lo) / (hi - lo) } else { 1.0 };
            // Present values show at least one eighth.
            let eighths = ((f * (levels - 1) as f64).round() as usize + 1).min(levels);
            for r in 0..h as usize {
                let level = eighths.saturating_sub(r * 8).min(8);
                buf[(x, top + h - 1 - r as u16)]
                    .set_symbol(EIGHTHS[level])
                    .set_style(style);
            }
        }
        // Latest value and the scale of the bars.
        let last = shown.last().expect("not empty");
        let scale = if s.from_zero {
            format!(" ≤{}", si(hi))
        } else {
            String::new()
        };
        let mut text = (s.latest)(last);
        if text.chars().count() + scale.chars().count() <= VALUE_W as usize {
            text.push_str(&scale);
        }
        buf.set_stringn(
            x0 + plot_w as u16 + 1,
            label_y,
            text,
            VALUE_W as usize,
            theme.value(),
        );
    }
    if axis {
        let y = inner.y + inner.height - 1;
        buf.set_stringn(
            inner.x,
            y,
            format!(" {:<w$}", "time", w = LABEL_W as usize - 1),
            LABEL_W as usize,
            theme.dim(),
        );
        let left = format!("-{span_s:.0} s");
        buf.set_string(x0, y, &left, theme.dim());
        let now = "now";
        let nx = x0 + shown.len().saturating_sub(now.len()) as u16;
        if nx > x0 + left.len() as u16 {
            buf.set_string(nx, y, now, theme.dim());
        }
        for (i, &c) in changed.iter().enumerate() {
            if c {
                buf.set_string(x0 + i as u16, y, "▲", theme.marker());
            }
        }
    }
}
