//! Histograms of the epoch: per-token latency and per-token MoE FLOPs (with p50 / p90 / p99 /
//! max marked by distinct glyphs and the bucket edges on an x axis), and experts per token of
//! the selected layer (bars labelled by their number of experts).

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

/// The percentile markers: a glyph each, so that they can be told apart under the bars.
const MARKS: [(&str, &str); 4] = [("◆", "p50"), ("▲", "p90"), ("●", "p99"), ("▼", "max")];

/// Writes bucket-edge labels on the axis line `y` under bars of `n` buckets in `area`: the
/// edges at the left, the middle and the right end (as many as fit without touching).
fn draw_edges(
    buf: &mut Buffer,
    area: Rect,
    y: u16,
    edges: &[f64],
    fmt: &dyn Fn(f64) -> String,
    theme: &Theme,
) {
    let n = edges.len().saturating_sub(1);
    if n == 0 || area.width == 0 {
        return;
    }
    let width = area.width as usize;
    let cols = n.min(width);
    let span = if n <= width { width / n } else { 1 };
    let used = (cols * span).min(width);
    let left = fmt(edges[0]);
    let right = fmt(edges[n]);
    let lw = left.chars().count();
    let rw = right.chars().count();
    buf.set_stringn(area.x, y, &left, width, theme.dim());
    if lw + 1 + rw <= used {
        buf.set_string(area.x + (used - rw) as u16, y, &right, theme.dim());
    }
    let mid = fmt(edges[n / 2]);
    let mw = mid.chars().count();
    let mx = (used / 2).saturating_sub(mw / 2);
    if n >= 2 && mx > lw + 1 && mx + mw + 1 < used.saturating_sub(rw) {
        buf.set_string(area.x + mx as u16, y, &mid, theme.dim());
    }
}

/// One histogram with percentiles: title, figures line(s), bars, markers, the x axis.
fn render_percentiles(frame: &mut Frame, area: Rect, app: &App, name: &str, h: &HistogramSnapshot) {
    let theme = &app.theme;
    let scale = match h.scale {
        // Said in the title so that unequal bucket widths are not read as a linear axis.
        BucketScale::Log => "log x (max/min ≥ 20) ",
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
    // Units come from the data: each value picks its own (µs, ms, s; k, M, G).
    let f = |v: f64| {
        if h.unit == "us" {
            in_unit(v, "us")
        } else {
            in_unit(v, "")
        }
    };
    let values = [h.p50, h.p90, h.p99, h.max];
    let parts: Vec<(String, String)> = MARKS
        .iter()
        .zip(values)
        .enumerate()
        .map(|(i, ((glyph, label), v))| {
            let sep = if i == 0 { "" } else { " " };
            (format!("{sep}{glyph}{label} "), f(v))
        })
        .collect();
    let total: usize = parts
        .iter()
        .map(|(a, b)| a.chars().count() + b.chars().count())
        .sum();
    let spans = |ps: &[(String, String)]| -> Line<'static> {
        Line::from(
            ps.iter()
                .flat_map(|(a, b)| {
                    [
                        Span::styled(a.clone(), theme.dim()),
                        Span::styled(b.clone(), theme.value()),
                    ]
                })
                .collect::<Vec<_>>(),
        )
    };
    let lines: Vec<Line> = if total <= inner.width as usize {
        vec![spans(&parts)]
    } else if inner.height >= 5 {
        vec![spans(&parts[..2]), spans(&parts[2..])]
    } else {
        // One line and no room for all four: the whole figures that fit, never half of one.
        let mut used = 0;
        let n = parts
            .iter()
            .take_while(|(a, b)| {
                used += a.chars().count() + b.chars().count();
                used <= inner.width as usize
            })
            .count()
            .max(1);
        vec![spans(&parts[..n])]
    };
    let fig_h = lines.len() as u16;
    frame.render_widget(
        Paragraph::new(lines),
        Rect {
            height: fig_h.min(inner.height),
            ..inner
        },
    );
    // Bars, their marker line, then the x axis when there is a line for it.
    let rest = inner.height.saturating_sub(fig_h);
    let axis = rest >= 4;
    let bars_area = Rect {
        y: inner.y + fig_h,
        height: rest - u16::from(axis),
        ..inner
    };
    let bars = Bars {
        counts: &h.counts,
        marks: MARKS
            .iter()
            .zip(values)
            .map(|((glyph, _), v)| (bucket_of(h, v), *glyph))
            .collect(),
    };
    draw_bars(frame.buffer_mut(), bars_area, &bars, theme);
    if axis {
        let y = bars_area.y + bars_area.height;
        draw_edges(frame.buffer_mut(), bars_area, y, &h.edges, &f, theme);
    }
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
        Paragraph::new(crate::tui::render::header::fit(
            vec![
                (
                    0,
                    vec![
                        Span::styled("▲mean ", theme.dim()),
                        Span::styled(format!("{:.2}", l.mean_experts_per_token), theme.value()),
                    ],
                ),
                (
                    1,
                    vec![
                        Span::styled("mode ", theme.dim()),
                        Span::styled(most.to_string(), theme.value()),
                    ],
                ),
                (
                    2,
                    vec![Span::styled(
                        format!("range 1-{}", shown.len()),
                        theme.dim(),
                    )],
                ),
            ],
            inner.width,
        )),
        Rect { height: 1, ..inner },
    );
    let rest = inner.height.saturating_sub(1);
    let axis = rest >= 4;
    let bars_area = Rect {
        y: inner.y + 1,
        height: rest - u16::from(axis),
        ..inner
    };
    // Bucket i holds i + 1 experts; the mean marks between its neighbours' buckets.
    let mean_bucket = (l.mean_experts_per_token.round() as usize).saturating_sub(1);
    let bars = Bars {
        counts: shown,
        marks: vec![(mean_bucket, "▲")],
    };
    draw_bars(frame.buffer_mut(), bars_area, &bars, theme);
    if axis {
        // The bars are labelled by their number of experts, 1..E, as many as fit.
        let y = bars_area.y + bars_area.height;
        let n = shown.len();
        let width = bars_area.width as usize;
        let buf = frame.buffer_mut();
        let mut next_free = 0usize;
        for i in 0..n.min(width) {
            let (x, w) = bucket_columns(i, n, width);
            let label = (i + 1).to_string();
            let lx = x + w.saturating_sub(label.len()) / 2;
            if lx >= next_free && lx + label.len() <= width {
                buf.set_string(bars_area.x + lx as u16, y, &label, theme.dim());
                next_free = lx + label.len() + 1;
            }
        }
    }
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
