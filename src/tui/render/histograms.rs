//! Histograms of the epoch: per-token latency and per-token MoE FLOPs (with p50 / p90 / p99 /
//! max marked), and experts per token of the selected layer.

use ratatui::Frame;
use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph};

use crate::profiling::snapshot::{BucketScale, HistogramSnapshot};
use crate::tui::app::App;
use crate::tui::render::layout::WIDE_WIDTH;
use crate::tui::theme::Theme;
use crate::units::in_unit;

const EIGHTHS: [&str; 9] = [" ", "▁", "▂", "▃", "▄", "▅", "▆", "▇", "█"];

/// Bars to draw: bucket counts, and a function from value to bucket.
struct Bars<'a> {
    counts: &'a [u64],
    /// Values marked under the bars, as bucket indices, with their labels.
    marks: Vec<(usize, &'static str)>,
}

/// Which column of `width` shows bucket `i` of `n`, and how many columns each bucket spans.
fn bucket_columns(i: usize, n: usize, width: usize) -> (usize, usize) {
    if n <= width {
        let w = width / n;
        (i * w, w)
    } else {
        (i * width / n, 1)
    }
}

/// Draws vertical bars scaled to the tallest column, with eighth-block tops, and a marker line.
fn draw_bars(buf: &mut Buffer, area: Rect, bars: &Bars, theme: &Theme) {
    let n = bars.counts.len();
    if n == 0 || area.height < 2 || area.width == 0 {
        return;
    }
    let width = area.width as usize;
    let cols = n.min(width);
    // Merge buckets into columns when they outnumber them.
    let mut col_counts = vec![0u64; cols];
    for (i, &c) in bars.counts.iter().enumerate() {
        let (x, _) = bucket_columns(i, n, cols);
        col_counts[x.min(cols - 1)] += c;
    }
    let span = if n <= width { width / n } else { 1 };
    let max = col_counts.iter().copied().max().unwrap_or(0).max(1);
    let bar_h = (area.height - 1) as usize;
    for (c, &count) in col_counts.iter().enumerate() {
        // Eighths of a row; a non-zero count shows at least one eighth.
        let eighths = if count == 0 {
            0
        } else {
            ((count as f64 / max as f64 * (bar_h * 8) as f64).round() as usize).max(1)
        };
        for dx in 0..span.max(1) {
            let x = area.x + (c * span.max(1) + dx) as u16;
            if x >= area.x + area.width {
                break;
            }
            for r in 0..bar_h {
                let level = eighths.saturating_sub(r * 8).min(8);
                let y = area.y + (bar_h - 1 - r) as u16;
                buf[(x, y)]
                    .set_symbol(EIGHTHS[level])
                    .set_style(theme.bar());
            }
        }
    }
    let my = area.y + area.height - 1;
    for &(bucket, label) in &bars.marks {
        let (x, w) = bucket_columns(bucket.min(n - 1), n, width);
        let x = area.x + (x + w / 2).min(width - 1) as u16;
        buf[(x, my)].set_symbol(label).set_style(theme.marker());
    }
}

/// The bucket of `v` in a histogram.
fn bucket_of(h: &HistogramSnapshot, v: f64) -> usize {
    let nb = h.counts.len();
    if nb == 0 {
        return 0;
    }
    h.edges[1..nb].partition_point(|&e| e <= v)
}

/// One histogram with percentiles: title, figures line(s), bars, markers.
fn render_percentiles(frame: &mut Frame, area: Rect, app: &App, name: &str, h: &HistogramSnapshot) {
    let theme = &app.theme;
    let scale = match h.scale {
        BucketScale::Log => "log ",
        BucketScale::Linear => "",
    };
    let block = Block::new().borders(Borders::TOP).title(Line::from(vec![
        Span::styled(format!(" {name} "), theme.title()),
        Span::styled(format!("{scale}n={} ", h.count), theme.dim()),
    ]));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    if h.count == 0 {
        frame.render_widget(
            Paragraph::new(Span::styled("no tokens yet in this epoch", theme.dim())),
            inner,
        );
        return;
    }
    // The title names the unit; the figures stay short enough for a third of 80 columns.
    let f = |v: f64| {
        if h.unit == "us" {
            in_unit(v, "us")
        } else {
            in_unit(v, "")
        }
    };
    let parts = [
        ("▲p50 ", f(h.p50)),
        (" p90 ", f(h.p90)),
        (" p99 ", f(h.p99)),
        (" max ", f(h.max)),
    ];
    let total: usize = parts
        .iter()
        .map(|(a, b)| a.chars().count() + b.chars().count())
        .sum();
    let spans = |ps: &[(&str, String)]| -> Line<'static> {
        Line::from(
            ps.iter()
                .flat_map(|(a, b)| {
                    [
                        Span::styled(a.to_string(), theme.dim()),
                        Span::styled(b.clone(), theme.value()),
                    ]
                })
                .collect::<Vec<_>>(),
        )
    };
    let lines: Vec<Line> = if total <= inner.width as usize || inner.height < 4 {
        vec![spans(&parts)]
    } else {
        vec![spans(&parts[..2]), spans(&parts[2..])]
    };
    let fig_h = lines.len() as u16;
    frame.render_widget(
        Paragraph::new(lines),
        Rect {
            height: fig_h.min(inner.height),
            ..inner
        },
    );
    let bars_area = Rect {
        y: inner.y + fig_h,
        height: inner.height.saturating_sub(fig_h),
        ..inner
    };
    let bars = Bars {
        counts: &h.counts,
        marks: vec![
            (bucket_of(h, h.p50), "▲"),
            (bucket_of(h, h.p90), "▲"),
            (bucket_of(h, h.p99), "▲"),
            (bucket_of(h, h.max), "▲"),
        ],
    };
    draw_bars(frame.buffer_mut(), bars_area, &bars, theme);
}

/// Experts per token of the selected layer: bars for 1..=E (trimmed after the last non-empty).
fn render_experts(frame: &mut Frame, area: Rect, app: &App) {
    let theme = &app.theme;
    let Some(snap) = app.displayed() else {
        return;
    };
    let Some(l) = snap.epoch.cumulative.layers.get(app.layer) else {
        return;
    };
    let block = Block::new().borders(Borders::TOP).title(Line::from(vec![
        Span::styled(format!(" Experts/token L{} ", l.layer), theme.title()),
        Span::styled("epoch ", theme.dim()),
    ]));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let counts = &l.experts_per_token_counts;
    if counts.iter().all(|&c| c == 0) {
        // An empty epoch has no distribution: no mean, mode or bars that look measured.
        frame.render_widget(
            Paragraph::new(Span::styled("no tokens yet in this epoch", theme.dim())),
            Rect { height: 1, ..inner },
        );
        return;
    }
    let last = counts.iter().rposition(|&c| c > 0).unwrap_or(0);
    let shown = &counts[..(last + 1).max(snap.model.top_k_baseline.min(counts.len()))];
    let most = shown
        .iter()
        .enumerate()
        .max_by_key(|&(_, &c)| c)
        .map_or(0, |(i, _)| i + 1);
    frame.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled("▲mean ", theme.dim()),
            Span::styled(format!("{:.2}", l.mean_experts_per_token), theme.value()),
            Span::styled(" mode ", theme.dim()),
            Span::styled(most.to_string(), theme.value()),
            Span::styled(format!(" range 1-{}", shown.len()), theme.dim()),
        ])),
        Rect { height: 1, ..inner },
    );
    let bars_area = Rect {
        y: inner.y + 1,
        height: inner.height.saturating_sub(1),
        ..inner
    };
    // Bucket i holds i + 1 experts; the mean marks between its neighbours' buckets.
    let mean_bucket = (l.mean_experts_per_token.round() as usize).saturating_sub(1);
    let bars = Bars {
        counts: shown,
        marks: vec![(mean_bucket, "▲")],
    };
    draw_bars(frame.buffer_mut(), bars_area, &bars, theme);
}

/// Draws the three histograms: side by side on narrow screens, stacked on wide ones.
pub fn render(frame: &mut Frame, area: Rect, app: &App) {
    let Some(snap) = app.displayed() else {
        return;
    };
    let h = &snap.epoch.histograms;
    let areas: [Rect; 3] = if frame.area().width >= WIDE_WIDTH {
        area.layout(&Layout::vertical([Constraint::Fill(1); 3]))
    } else {
        area.layout(&Layout::horizontal([Constraint::Fill(1); 3]).spacing(1))
    };
    render_percentiles(frame, areas[0], app, "Latency/token", &h.token_latency_us);
    render_percentiles(frame, areas[1], app, "MoE FLOPs/token", &h.token_moe_flops);
    render_experts(frame, areas[2], app);
}
