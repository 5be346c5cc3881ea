//! The HTML report: one self-contained page (inline CSS and SVG; no scripts, no network) with
//! the routing heatmap, the experts-per-token distributions, the latency and FLOP histograms and,
//! with a sweep, the quality-against-compute curve with the default threshold marked. Readable
//! offline and printable.

use std::fmt::Write;

use super::{ReportData, policies_label, policy_label};
use crate::profiling::snapshot::{BucketScale, HistogramSnapshot, LayerStatsSnapshot};
use crate::routing::RoutingPolicy;
use crate::units::{compact as num, fixed_or_dash as opt, flops};

const CSS: &str = r##"
:root { --fg:#1d2433; --muted:#5b6578; --line:#d5dae3; --accent:#2f6fb3; --bg:#ffffff; --panel:#f6f8fb; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0 auto; padding: 24px 28px 48px; max-width: 1160px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
p.meta { color: var(--muted); margin: 0 0 14px; font-size: 12.5px; }
code { font: 12px/1.3 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: var(--panel); padding: 1px 4px; border-radius: 3px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)); gap: 10px; margin: 12px 0; }
.card { background: var(--panel); border: 1px solid var(--line); border-radius: 6px; padding: 8px 10px; }
.card .k { color: var(--muted); font-size: 11.5px; text-transform: uppercase; letter-spacing: .03em; }
.card .v { font-size: 18px; font-weight: 600; margin-top: 2px; }
.card .s { color: var(--muted); font-size: 12px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 12.5px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 8px; text-align: right; white-space: nowrap; }
th { background: var(--panel); font-weight: 600; }
td.l, th.l { text-align: left; }
tr.default td { font-weight: 600; background: #fff6dd; }
figure { margin: 10px 0 18px; }
figcaption { color: var(--muted); font-size: 12.5px; margin-top: 2px; max-width: 1000px; }
.grid2 { display: grid; grid-template-columns: 1fr 1fr; gap: 8px 18px; }
.grid3 { display: grid; grid-template-columns: repeat(3, 1fr); gap: 8px 14px; }
svg { display: block; max-width: 100%; height: auto; }
svg text { font-family: -apple-system, "Segoe UI", Roboto, Arial, sans-serif; fill: #1d2433; }
.note { color: var(--muted); font-size: 12.5px; }
pre.gen { white-space: pre-wrap; background: var(--panel); border: 1px solid var(--line); border-radius: 4px; padding: 6px 8px; margin: 6px 0; font-size: 12.5px; }
@media print { body { padding: 0; max-width: none; } h2 { break-after: avoid; } figure, table { break-inside: avoid; } }
"##;

/// Escapes text for HTML and SVG.
pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// About `n` round tick values covering [lo, hi].
fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater)
        || !lo.is_finite()
        || !hi.is_finite()
    {
        return vec![lo];
    }
    let raw = (hi - lo) / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * mag);
    let start = (lo / step).ceil() * step;
    let mut out = Vec::new();
    let mut v = start;
    while v <= hi + step * 1e-9 {
        out.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
        v += step;
    }
    out
}

/// Decimals that print every multiple of `step` exactly (0.025 needs 3, 0.5 needs 1), so that
/// evenly spaced ticks never get uneven labels.
fn tick_decimals(step: f64) -> usize {
    (0..=8)
        .find(|&d| {
            let scaled = step * 10f64.powi(d as i32);
            (scaled - scaled.round()).abs() <= scaled.abs() * 1e-9
        })
        .unwrap_or(8)
}

/// Viridis, sampled at 9 stops; `t` in 0..=1.
/// Expert ids under a heatmap whose cells start at `left` and end at `bottom`: every 1, 2, 4, ...
/// experts, whichever keeps labels at least 22 px apart.
pub(super) fn expert_ticks(s: &mut String, left: f64, cell_w: f64, bottom: f64, n_experts: usize) {
    let every = [1usize, 2, 4, 8, 16, 32]
        .into_iter()
        .find(|&k| cell_w * k as f64 >= 22.0)
        .unwrap_or(64);
    for e in (0..n_experts).step_by(every) {
        let x = left + (e as f64 + 0.5) * cell_w;
        let _ = write!(
            s,
            r##"<text x="{x:.1}" y="{:.1}" font-size="10.5" text-anchor="middle" fill="#5b6578">{e}</text>"##,
            bottom + 13.0
        );
    }
}

/// A heatmap legend's colour bar at (`left`, `y`) through `ramp` over 0..=1; returns its width.
pub(super) fn colour_bar(s: &mut String, left: f64, y: f64, ramp: impl Fn(f64) -> String) -> f64 {
    let lw = 260.0;
    for i in 0..52 {
        let f = i as f64 / 51.0;
        let _ = write!(
            s,
            r##"<rect x="{:.1}" y="{y:.1}" width="{:.2}" height="10" fill="{}"/>"##,
            left + f * lw,
            lw / 51.0 + 0.6,
            ramp(f)
        );
    }
    lw
}

fn viridis(t: f64) -> String {
    const STOPS: [(u8, u8, u8); 9] = [
        (68, 1, 84),
        (71, 44, 122),
        (59, 81, 139),
        (44, 113, 142),
        (33, 144, 141),
        (39, 173, 129),
        (92, 200, 99),
        (170, 220, 50),
        (253, 231, 37),
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let x = t * (STOPS.len() - 1) as f64;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let m = |p: u8, q: u8| (p as f64 + f * (q as f64 - p as f64)).round() as u8;
    format!("#{:02x}{:02x}{:02x}", m(a.0, b.0), m(a.1, b.1), m(a.2, b.2))
}

/// The heatmap: one row per MoE layer, one column per expert, colour = share of tokens.
fn heatmap(layers: &[LayerStatsSnapshot], n_experts: usize) -> String {
    let left = 64.0;
    let top = 26.0;
    let avail = 1040.0;
    let cell_w = (avail / n_experts.max(1) as f64).clamp(3.0, 40.0);
    let cell_h = if layers.len() > 12 { 16.0 } else { 26.0 };
    let w = left + cell_w * n_experts as f64 + 20.0;
    let legend_y = top + cell_h * layers.len() as f64 + 34.0;
    let h = legend_y + 40.0;
    let max_share = layers
        .iter()
        .flat_map(|l| l.expert_token_share.iter().copied())
        .fold(0.0f64, f64::max);
    let scale = if max_share > 0.0 { max_share } else { 1.0 };
    let mut s = format!(
        r##"<svg class="heatmap" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w:.0} {h:.0}" width="{w:.0}" height="{h:.0}" role="img" aria-label="Routing heatmap">"##
    );
    let _ = write!(
        s,
        r##"<text x="{left}" y="14" font-size="12" fill="#5b6578">expert id &#8594;</text>"##
    );
    for (slot, l) in layers.iter().enumerate() {
        let y = top + slot as f64 * cell_h;
        let _ = write!(
            s,
            r##"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="end">layer {}</text>"##,
            left - 6.0,
            y + cell_h * 0.5 + 4.0,
            l.layer
        );
        for (e, &share) in l.expert_token_share.iter().enumerate() {
            let x = left + e as f64 * cell_w;
            let _ = write!(
                s,
                r##"<rect x="{x:.1}" y="{y:.1}" width="{:.2}" height="{:.2}" fill="{}"><title>layer {} expert {e}: {:.1}% of tokens, mean gate weight {:.3}</title></rect>"##,
                cell_w - 0.6,
                cell_h - 1.0,
                viridis(share / scale),
                l.layer,
                100.0 * share,
                l.expert_gate_mass.get(e).copied().unwrap_or(0.0)
            );
        }
    }
    expert_ticks(
        &mut s,
        left,
        cell_w,
        top + cell_h * layers.len() as f64,
        n_experts,
    );
    let lw = colour_bar(&mut s, left, legend_y, viridis);
    let _ = write!(
        s,
        r##"<text x="{left}" y="{:.1}" font-size="11">0%</text><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{:.1}% of tokens</text><text x="{:.1}" y="{:.1}" font-size="11" fill="#5b6578">colour: share of the layer's tokens that selected the expert</text></svg>"##,
        legend_y + 24.0,
        left + lw,
        legend_y + 24.0,
        100.0 * scale,
        left + lw + 16.0,
        legend_y + 9.0
    );
    s
}

/// A histogram of `h` as bars, with p50 and p99 marked.
/// The unit in which durations given in microseconds read best, chosen from the largest value:
/// (factor from microseconds, unit name).
fn time_unit(max_us: f64) -> (f64, &'static str) {
    if max_us < 1.0 {
        (1e3, "nanoseconds")
    } else if max_us < 1e3 {
        (1.0, "microseconds")
    } else if max_us < 1e6 {
        (1e-3, "milliseconds")
    } else {
        (1e-6, "seconds")
    }
}

/// A histogram of `h`, its values multiplied by `scale` for display in `fmt_unit`.
fn histogram(h: &HistogramSnapshot, title: &str, fmt_unit: &str, scale: f64) -> String {
    let (w, ht) = (540.0, 230.0);
    let (l, r, t, b) = (52.0, 14.0, 26.0, 44.0);
    let pw = w - l - r;
    let ph = ht - t - b;
    let mut s = format!(
        r##"<svg class="histogram" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {ht}" width="{w}" height="{ht}" role="img" aria-label="{}"><text x="{l}" y="16" font-size="13" font-weight="600">{}</text>"##,
        esc(title),
        esc(title)
    );
    if h.count == 0 || h.counts.is_empty() {
        let _ = write!(
            s,
            r##"<text x="{:.0}" y="{:.0}" font-size="12" text-anchor="middle" fill="#5b6578">nothing recorded</text></svg>"##,
            l + pw / 2.0,
            t + ph / 2.0
        );
        return s;
    }
    let (lo, hi) = (h.edges[0], *h.edges.last().expect("edges"));
    let pos = |v: f64| -> f64 {
        if hi <= lo {
            return 0.5;
        }
        let f = match h.scale {
            BucketScale::Log if lo > 0.0 => (v.max(lo) / lo).ln() / (hi / lo).ln(),
            _ => (v - lo) / (hi - lo),
        };
        f.clamp(0.0, 1.0)
    };
    let max_c = *h.counts.iter().max().expect("counts") as f64;
    let n = h.counts.len();
    // Counts are whole numbers: no fractional ticks.
    let yticks: Vec<f64> = nice_ticks(0.0, max_c, 4)
        .into_iter()
        .filter(|v| v.fract() == 0.0)
        .collect();
    for &v in &yticks {
        let y = t + ph - ph * v / max_c.max(1.0);
        let _ = write!(
            s,
            r##"<line x1="{l}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#e4e8ef"/><text x="{:.1}" y="{:.1}" font-size="10.5" text-anchor="end" fill="#5b6578">{}</text>"##,
            l + pw,
            l - 5.0,
            y + 3.5,
            if v < 1e4 { format!("{v:.0}") } else { num(v) }
        );
    }
    for (i, &c) in h.counts.iter().enumerate() {
        let x0 = l + pw * i as f64 / n as f64;
        let bw = pw / n as f64;
        let bh = ph * c as f64 / max_c.max(1.0);
        let _ = write!(
            s,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.2}" height="{bh:.1}" fill="#4f86c6"><title>[{}, {}) {fmt_unit}: {c}</title></rect>"##,
            x0 + 0.5,
            t + ph - bh,
            (bw - 1.0).max(0.5),
            num(h.edges[i] * scale),
            num(h.edges[i + 1] * scale)
        );
    }
    let _ = write!(
        s,
        r##"<line x1="{l}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#1d2433"/>"##,
        l + pw,
        t + ph,
        t + ph
    );
    for i in [0, n / 4, n / 2, 3 * n / 4, n] {
        let x = l + pw * i as f64 / n as f64;
        let _ = write!(
            s,
            r##"<text x="{x:.1}" y="{:.1}" font-size="10.5" text-anchor="middle" fill="#5b6578">{}</text>"##,
            t + ph + 14.0,
            num(h.edges[i] * scale)
        );
    }
    let scale_note = match h.scale {
        BucketScale::Log => "log-spaced buckets",
        BucketScale::Linear => "linear buckets",
    };
    let _ = write!(
        s,
        r##"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{} ({scale_note}; {} values)</text>"##,
        l + pw / 2.0,
        ht - 8.0,
        esc(fmt_unit),
        h.count
    );
    for (name, v, colour) in [("p50", h.p50, "#d9822b"), ("p99", h.p99, "#c23030")] {
        let x = l + pw * pos(v);
        // Labels near the right edge go to the left of their line.
        let (tx, anchor) = if x > l + pw * 0.8 {
            (x - 3.0, "end")
        } else {
            (x + 3.0, "start")
        };
        let _ = write!(
            s,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{t}" y2="{:.1}" stroke="{colour}" stroke-width="1.5" stroke-dasharray="4 3"/><text x="{tx:.1}" y="{:.1}" font-size="10.5" text-anchor="{anchor}" fill="{colour}">{name} {}</text>"##,
            t + ph,
            if name == "p50" { t + 10.0 } else { t + 22.0 },
            num(v * scale)
        );
    }
    s.push_str("</svg>");
    s
}

/// Bar chart of one layer's experts-per-token distribution (share of tokens per count).
fn experts_per_token(l: &LayerStatsSnapshot, n_max: usize) -> String {
    let (w, ht) = (360.0, 170.0);
    let (left, r, t, b) = (40.0, 8.0, 24.0, 32.0);
    let pw = w - left - r;
    let ph = ht - t - b;
    let total: u64 = l.experts_per_token_counts.iter().sum();
    let mut s = format!(
        r##"<svg class="ept" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {ht}" width="{w}" height="{ht}" role="img" aria-label="Experts per token, layer {}"><text x="{left}" y="15" font-size="12.5" font-weight="600">layer {} ({}): mean {:.2}</text>"##,
        l.layer,
        l.layer,
        esc(&policy_label(&l.policy)),
        l.mean_experts_per_token
    );
    if total == 0 || n_max == 0 {
        s.push_str(r##"<text x="180" y="90" font-size="12" text-anchor="middle" fill="#5b6578">no tokens</text></svg>"##);
        return s;
    }
    let shares: Vec<f64> = (0..n_max)
        .map(|i| *l.experts_per_token_counts.get(i).unwrap_or(&0) as f64 / total as f64)
        .collect();
    let max_s = shares.iter().cloned().fold(0.0, f64::max).max(1e-9);
    for &v in &nice_ticks(0.0, max_s, 3) {
        let y = t + ph - ph * v / max_s;
        let _ = write!(
            s,
            r##"<line x1="{left}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#e4e8ef"/><text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end" fill="#5b6578">{:.0}%</text>"##,
            left + pw,
            left - 4.0,
            y + 3.5,
            100.0 * v
        );
    }
    let bw = pw / n_max as f64;
    let every = (n_max as f64 / 16.0).ceil().max(1.0) as usize;
    for (i, &v) in shares.iter().enumerate() {
        let bh = ph * v / max_s;
        let x = left + i as f64 * bw;
        let _ = write!(
            s,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.2}" height="{bh:.1}" fill="#2a9d8f"><title>{} experts: {:.1}% of tokens ({})</title></rect>"##,
            x + 0.5,
            t + ph - bh,
            (bw - 1.0).max(0.5),
            i + 1,
            100.0 * v,
            l.experts_per_token_counts.get(i).unwrap_or(&0)
        );
        if i % every == 0 || i + 1 == n_max {
            let _ = write!(
                s,
                r##"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle" fill="#5b6578">{}</text>"##,
                x + bw / 2.0,
                t + ph + 12.0,
                i + 1
            );
        }
    }
    let _ = write!(
        s,
        r##"<line x1="{left}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#1d2433"/><text x="{:.1}" y="{:.1}" font-size="10.5" text-anchor="middle">experts selected per token</text></svg>"##,
        left + pw,
        t + ph,
        t + ph,
        left + pw / 2.0,
        ht - 4.0
    );
    s
}

/// Quality (bits per byte) against compute (MoE FLOPs as % of all experts), default marked.
fn sweep_curve(sw: &super::SweepResult) -> String {
    let (w, ht) = (760.0, 400.0);
    let (l, r, t, b) = (64.0, 150.0, 30.0, 48.0);
    let pw = w - l - r;
    let ph = ht - t - b;
    let pts: Vec<(&super::SweepPoint, f64, f64)> = sw
        .points
        .iter()
        .filter_map(|p| {
            p.bits_per_byte
                .map(|q| (p, 100.0 * p.moe_flops_fraction_of_all_experts, q))
        })
        .collect();
    let mut s = format!(
        r##"<svg class="sweep" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {ht}" width="{w}" height="{ht}" role="img" aria-label="Quality against compute"><text x="{l}" y="18" font-size="13" font-weight="600">Quality against compute ({} tokens per point)</text>"##,
        sw.tokens_per_point
    );
    if pts.is_empty() {
        s.push_str(r##"<text x="300" y="200" font-size="12" text-anchor="middle" fill="#5b6578">no quality figures</text></svg>"##);
        return s;
    }
    let xs: Vec<f64> = pts.iter().map(|p| p.1).collect();
    let ys: Vec<f64> = pts.iter().map(|p| p.2).collect();
    let (x0, x1) = (0.0f64, 100.0f64.max(xs.iter().cloned().fold(0.0, f64::max)));
    let (mut y0, mut y1) = (
        ys.iter().cloned().fold(f64::INFINITY, f64::min),
        ys.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
    );
    let pad = ((y1 - y0) * 0.08).max(y1.abs() * 1e-3).max(1e-6);
    y0 -= pad;
    y1 += pad;
    let px = |x: f64| l + pw * (x - x0) / (x1 - x0);
    let py = |y: f64| t + ph - ph * (y - y0) / (y1 - y0);
    for v in nice_ticks(x0, x1, 5) {
        let x = px(v);
        let _ = write!(
            s,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{t}" y2="{:.1}" stroke="#e4e8ef"/><text x="{x:.1}" y="{:.1}" font-size="10.5" text-anchor="middle" fill="#5b6578">{v:.0}%</text>"##,
            t + ph,
            t + ph + 14.0
        );
    }
    let yt = nice_ticks(y0, y1, 5);
    let ydec = if yt.len() > 1 {
        tick_decimals(yt[1] - yt[0])
    } else {
        3
    };
    for v in yt {
        let y = py(v);
        let _ = write!(
            s,
            r##"<line x1="{l}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#e4e8ef"/><text x="{:.1}" y="{:.1}" font-size="10.5" text-anchor="end" fill="#5b6578">{v:.ydec$}</text>"##,
            l + pw,
            l - 5.0,
            y + 3.5
        );
    }
    let _ = write!(
        s,
        r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#1d2433"/><text x="{:.1}" y="{:.1}" font-size="11.5" text-anchor="middle">MoE FLOPs per token, % of all experts</text><text transform="translate(16 {:.1}) rotate(-90)" font-size="11.5" text-anchor="middle">bits per byte (lower is better)</text>"##,
        l + pw / 2.0,
        ht - 10.0,
        t + ph / 2.0
    );
    // Threshold points joined in order of t.
    let thr: Vec<&(&super::SweepPoint, f64, f64)> = pts
        .iter()
        .filter(|p| matches!(p.0.policy, RoutingPolicy::Threshold { .. }))
        .collect();
    if thr.len() > 1 {
        let d: Vec<String> = thr
            .iter()
            .map(|p| format!("{:.1},{:.1}", px(p.1), py(p.2)))
            .collect();
        let _ = write!(
            s,
            r##"<polyline points="{}" fill="none" stroke="#2f6fb3" stroke-width="2"/>"##,
            d.join(" ")
        );
    }
    let n_thr = thr.len();
    for (i, (p, x, y)) in pts.iter().enumerate() {
        let (cx, cy) = (px(*x), py(*y));
        let tip = format!(
            "{}: {:.1}% of all-experts MoE FLOPs, {:.4} bits/byte ({} vs reference), {:.2} experts/token",
            p.label,
            x,
            y,
            opt(p.delta_bits_per_byte_vs_reference, 4),
            p.mean_experts_per_token
        );
        match p.policy {
            RoutingPolicy::Threshold { .. } => {
                let _ = write!(
                    s,
                    r##"<circle cx="{cx:.1}" cy="{cy:.1}" r="4" fill="#2f6fb3"><title>{}</title></circle>"##,
                    esc(&tip)
                );
                // Label every other threshold to avoid clutter, always the ends.
                if n_thr <= 8 || i % 2 == 0 || i + 1 == n_thr {
                    // Near the right edge the label goes below-left, inside the plot.
                    let (tx, ty, anchor) = if cx > l + pw * 0.9 {
                        (cx - 6.0, cy + 16.0, "end")
                    } else {
                        (cx + 6.0, cy - 6.0, "start")
                    };
                    let _ = write!(
                        s,
                        r##"<text x="{tx:.1}" y="{ty:.1}" font-size="10" text-anchor="{anchor}" fill="#2f6fb3">{}</text>"##,
                        esc(&p.label)
                    );
                }
            }
            RoutingPolicy::TopK { .. } => {
                let _ = write!(
                    s,
                    r##"<rect x="{:.1}" y="{:.1}" width="9" height="9" fill="#d9822b"><title>{}</title></rect><text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end" fill="#b0651c">{}</text>"##,
                    cx - 4.5,
                    cy - 4.5,
                    esc(&tip),
                    // Below-left: the threshold curve's labels sit above-right of its points.
                    cx - 6.0,
                    cy + 14.0,
                    esc(&p.label)
                );
            }
            RoutingPolicy::Dense => {
                let _ = write!(
                    s,
                    r##"<path d="M {cx:.1} {:.1} L {:.1} {cy:.1} L {cx:.1} {:.1} L {:.1} {cy:.1} Z" fill="#1d2433"><title>{}</title></path><text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">dense{}</text>"##,
                    cy - 6.0,
                    cx + 6.0,
                    cy + 6.0,
                    cx - 6.0,
                    esc(&tip),
                    cx - 8.0,
                    cy - 8.0,
                    if p.is_reference { " (reference)" } else { "" }
                );
            }
        }
        if p.is_default {
            // A ring on the point and a dashed line up to a label at the top of the plot, clear
            // of the point labels.
            let _ = write!(
                s,
                r##"<line x1="{cx:.1}" x2="{cx:.1}" y1="{t}" y2="{:.1}" stroke="#c23030" stroke-width="1" stroke-dasharray="3 3"/><circle class="default-marker" cx="{cx:.1}" cy="{cy:.1}" r="9" fill="none" stroke="#c23030" stroke-width="2"/><text x="{:.1}" y="{:.1}" font-size="11" font-weight="600" fill="#c23030">default {}</text>"##,
                cy - 9.0,
                cx + 5.0,
                t + 14.0,
                esc(&p.label)
            );
        }
    }
    // Legend.
    let lx = l + pw + 16.0;
    let _ = write!(
        s,
        r##"<circle cx="{lx}" cy="{:.0}" r="4" fill="#2f6fb3"/><text x="{:.0}" y="{:.0}" font-size="11">threshold t</text><rect x="{:.1}" y="{:.0}" width="9" height="9" fill="#d9822b"/><text x="{:.0}" y="{:.0}" font-size="11">top-k</text><path d="M {lx} {:.0} l 6 6 l -6 6 l -6 -6 Z" fill="#1d2433"/><text x="{:.0}" y="{:.0}" font-size="11">dense</text><circle cx="{lx}" cy="{:.0}" r="7" fill="none" stroke="#c23030" stroke-width="2"/><text x="{:.0}" y="{:.0}" font-size="11">default policy</text></svg>"##,
        t + 10.0,
        lx + 12.0,
        t + 14.0,
        lx - 4.5,
        t + 25.5,
        lx + 12.0,
        t + 34.0,
        t + 44.0,
        lx + 12.0,
        t + 54.0,
        t + 76.0,
        lx + 12.0,
        t + 80.0
    );
    s
}

/// Tokens/s against the threshold: the median of the repeats with a bar from the slowest to
/// the fastest repeat; top-k and Dense (no threshold) as labelled horizontal lines.
fn sweep_throughput(sw: &super::SweepResult) -> String {
    let (w, ht) = (760.0, 320.0);
    let (l, r, t, b) = (64.0, 150.0, 30.0, 48.0);
    let pw = w - l - r;
    let ph = ht - t - b;
    let mut s = format!(
        r##"<svg class="sweep-throughput" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {ht}" width="{w}" height="{ht}" role="img" aria-label="Tokens per second against the threshold"><text x="{l}" y="18" font-size="13" font-weight="600">Tokens per second against the threshold ({})</text>"##,
        esc(&super::text::repeats_note(sw.repeats))
    );
    let thr: Vec<(&super::SweepPoint, f64)> = sw
        .points
        .iter()
        .filter_map(|p| match p.policy {
            RoutingPolicy::Threshold { t, .. } => Some((p, t as f64)),
            _ => None,
        })
        .collect();
    let others: Vec<&super::SweepPoint> = sw
        .points
        .iter()
        .filter(|p| !matches!(p.policy, RoutingPolicy::Threshold { .. }))
        .collect();
    let top = sw
        .points
        .iter()
        .map(|p| p.tokens_per_second_range().1)
        .fold(0.0, f64::max);
    if thr.is_empty() || top <= 0.0 || !top.is_finite() {
        s.push_str(r##"<text x="300" y="160" font-size="12" text-anchor="middle" fill="#5b6578">no timed threshold points</text></svg>"##);
        return s;
    }
    let (mut x0, mut x1) = (
        thr.iter().map(|p| p.1).fold(f64::INFINITY, f64::min),
        thr.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max),
    );
    if x1 - x0 < 1e-9 {
        x0 -= 0.05;
        x1 += 0.05;
    }
    let pad = (x1 - x0) * 0.04;
    let (x0, x1) = (x0 - pad, x1 + pad);
    // From zero, so that bar heights compare as ratios.
    let yt = nice_ticks(0.0, top * 1.08, 5);
    let y1 = yt.last().copied().unwrap_or(top).max(top * 1.08);
    let px = |x: f64| l + pw * (x - x0) / (x1 - x0);
    let py = |y: f64| t + ph - ph * y / y1;
    let xt = nice_ticks(x0, x1, 6);
    let xdec = if xt.len() > 1 {
        tick_decimals(xt[1] - xt[0])
    } else {
        2
    };
    for v in xt {
        let x = px(v);
        let _ = write!(
            s,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{t}" y2="{:.1}" stroke="#e4e8ef"/><text x="{x:.1}" y="{:.1}" font-size="10.5" text-anchor="middle" fill="#5b6578">{v:.xdec$}</text>"##,
            t + ph,
            t + ph + 14.0
        );
    }
    for v in yt {
        let y = py(v);
        let _ = write!(
            s,
            r##"<line x1="{l}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#e4e8ef"/><text x="{:.1}" y="{:.1}" font-size="10.5" text-anchor="end" fill="#5b6578">{}</text>"##,
            l + pw,
            l - 5.0,
            y + 3.5,
            num(v)
        );
    }
    let _ = write!(
        s,
        r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#1d2433"/><text x="{:.1}" y="{:.1}" font-size="11.5" text-anchor="middle">threshold t</text><text transform="translate(16 {:.1}) rotate(-90)" font-size="11.5" text-anchor="middle">tokens per second</text>"##,
        l + pw / 2.0,
        ht - 10.0,
        t + ph / 2.0
    );
    for (i, p) in others.iter().enumerate() {
        let y = py(p.tokens_per_second);
        let colour = if matches!(p.policy, RoutingPolicy::Dense) {
            "#1d2433"
        } else {
            "#d9822b"
        };
        let (lo, hi) = p.tokens_per_second_range();
        let _ = write!(
            s,
            r##"<line x1="{l}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="{colour}" stroke-width="1.2" stroke-dasharray="6 4"><title>{}: {:.0} tokens/s (repeats {:.0} to {:.0})</title></line><text x="{:.1}" y="{:.1}" font-size="10.5" fill="{colour}">{} {}</text>"##,
            l + pw,
            esc(&p.label),
            p.tokens_per_second,
            lo,
            hi,
            l + pw + 6.0,
            // Stagger the labels in case two lines nearly coincide.
            y + 3.5 + if i % 2 == 1 { 11.0 } else { 0.0 },
            esc(&p.label),
            num(p.tokens_per_second)
        );
    }
    let path: Vec<String> = thr
        .iter()
        .map(|(p, x)| format!("{:.1},{:.1}", px(*x), py(p.tokens_per_second)))
        .collect();
    if path.len() > 1 {
        let _ = write!(
            s,
            r##"<polyline points="{}" fill="none" stroke="#2f6fb3" stroke-width="2"/>"##,
            path.join(" ")
        );
    }
    for (p, x) in &thr {
        let (lo, hi) = p.tokens_per_second_range();
        let cx = px(*x);
        let _ = write!(
            s,
            r##"<line x1="{cx:.1}" x2="{cx:.1}" y1="{:.1}" y2="{:.1}" stroke="#2f6fb3" stroke-width="1.2"/><circle cx="{cx:.1}" cy="{:.1}" r="4" fill="#2f6fb3"{}><title>{}: {:.0} tokens/s, median of {} (slowest {:.0}, fastest {:.0})</title></circle>"##,
            py(lo),
            py(hi),
            py(p.tokens_per_second),
            if p.is_default {
                r##" stroke="#c23030" stroke-width="2""##
            } else {
                ""
            },
            esc(&p.label),
            p.tokens_per_second,
            p.tokens_per_second_repeats.len().max(1),
            lo,
            hi
        );
    }
    s.push_str("</svg>");
    s
}

fn card(o: &mut String, k: &str, v: &str, sub: &str) {
    let _ = write!(
        o,
        r##"<div class="card"><div class="k">{}</div><div class="v">{}</div><div class="s">{}</div></div>"##,
        esc(k),
        esc(v),
        esc(sub)
    );
}

/// The report as one HTML page.
pub fn render(data: &ReportData) -> String {
    let mut o = String::with_capacity(64 * 1024);
    page_head(&mut o, data);
    cards(&mut o, data);
    device_notes(&mut o, data);
    sweep_section(&mut o, data);
    if let Some(c) = &data.snapshot.compare {
        super::compare::html(&mut o, c);
    }
    heatmap_section(&mut o, data);
    experts_per_token_section(&mut o, data);
    histograms_section(&mut o, data);
    generated_section(&mut o, data);
    layers_section(&mut o, data);
    o.push_str("</body></html>\n");
    o
}

/// The document head, title and the model line.
fn page_head(o: &mut String, data: &ReportData) {
    let s = &data.snapshot;
    let m = &s.model;
    let title = format!("xmoe-top report: {}", m.name);
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{}</title><style>{CSS}</style></head><body>\n",
        esc(&title)
    );
    let _ = write!(
        o,
        r##"<h1>{}</h1><p class="meta">{} · xmoe-top {} · report schema {} · <code>{}</code></p>"##,
        esc(&title),
        esc(&data.created_utc),
        esc(&data.generator.version),
        data.generator.report_schema_version,
        esc(&data.command_line.join(" "))
    );
    if let Some(r) = &data.recording {
        let _ = write!(
            o,
            r##"<p class="meta">Figures {}; recorded by <code>{}</code></p>"##,
            esc(&r.describe()),
            esc(&r.recorded_command_line.join(" "))
        );
    }
    let _ = write!(
        o,
        r##"<p class="meta">{} parameters · {} blocks · MoE blocks {} · {} experts of width {} · d_model {} · {} · {}</p>"##,
        m.parameters,
        m.n_layers,
        esc(&format!("{:?}", m.moe_layers)),
        m.n_experts,
        m.expert_hidden,
        m.d_model,
        esc(&m.device),
        esc(&s.workload.description)
    );
}

/// The headline figures as cards.
fn cards(o: &mut String, data: &ReportData) {
    let s = &data.snapshot;
    let e = &s.epoch;
    let c = &e.cumulative;
    let q = &e.quality;
    let m = &s.model;
    o.push_str(r##"<div class="cards">"##);
    card(
        o,
        "policy",
        &policies_label(s),
        &format!(
            "capacity {}; epoch {} ({})",
            s.policy
                .capacity_factor
                .map_or("none".to_string(), |f| f.to_string()),
            e.id,
            e.reason
        ),
    );
    card(
        o,
        "experts / token",
        &format!("{:.2}", c.mean_experts_per_token),
        &format!("of {} per MoE layer", m.n_experts),
    );
    card(
        o,
        "MoE compute saved",
        &format!("{:.1}%", c.flops.moe_saved_vs_all_experts_pct),
        &format!(
            "vs all experts; {:+.1}% vs {}",
            c.flops.moe_saved_vs_top_k_pct,
            m.top_k_name(c.flops.top_k)
        ),
    );
    card(
        o,
        "MoE FLOPs / token",
        &flops(c.flops.moe_per_token.actual),
        &format!("model {}", flops(c.flops.model_per_token.actual)),
    );
    let quality_sub = if q.bits_per_byte.is_some() {
        format!(
            "{} vs {}; KL {} bits",
            super::delta_with_sample(q),
            policy_label(&q.reference_policy),
            opt(q.mean_kl_bits, 4)
        )
    } else {
        "measured by the eval workload only".to_string()
    };
    card(o, "bits / byte", &opt(q.bits_per_byte, 4), &quality_sub);
    card(
        o,
        "token latency",
        &format!("{} us", num(e.histograms.token_latency_us.p50)),
        &format!("p50; p99 {} us", num(e.histograms.token_latency_us.p99)),
    );
    card(
        o,
        "throughput (epoch)",
        &format!("{:.0} tok/s", e.tokens_per_second_epoch),
        &match e.decode_tokens_per_second {
            Some(d) => format!(
                "incl. prompt prefill; decode only {d:.0} tok/s; {} tokens, {} passes",
                e.tokens, e.forward_passes
            ),
            None => format!(
                "tokens / forward time; {} tokens, {} passes",
                e.tokens, e.forward_passes
            ),
        },
    );
    o.push_str("</div>");
}

/// The device note and one line per GPU.
fn device_notes(o: &mut String, data: &ReportData) {
    let s = &data.snapshot;
    if let Some(note) = &s.device.note {
        let _ = write!(o, r##"<p class="note">Device: {}</p>"##, esc(note));
    }
    for g in &s.device.gpus {
        let gib = |b: Option<u64>| {
            b.map_or("-".to_string(), |b| {
                format!("{:.1}", b as f64 / (1u64 << 30) as f64)
            })
        };
        let _ = write!(
            o,
            r##"<p class="note">GPU {} {}: {}% busy, {} / {} GiB, {} W, {} &#176;C, SM {} MHz (driver {})</p>"##,
            g.index,
            esc(&g.name),
            g.utilization_pct.map_or("-".into(), |v| v.to_string()),
            gib(g.memory_used_bytes),
            gib(g.memory_total_bytes),
            g.power_watts.map_or("-".into(), |v| format!("{v:.0}")),
            g.temperature_c.map_or("-".into(), |v| v.to_string()),
            g.sm_clock_mhz.map_or("-".into(), |v| v.to_string()),
            esc(s.device.driver_version.as_deref().unwrap_or("-"))
        );
    }
}

/// The sweep curve and table (reports of `xmoe-top sweep` only).
fn sweep_section(o: &mut String, data: &ReportData) {
    let s = &data.snapshot;
    if let Some(sw) = &data.sweep {
        let _ = write!(
            o,
            r##"<h2>Threshold sweep</h2><figure id="fig-sweep">{}<figcaption>The same {} tokens ({} passes of {} x {} from {}) under each policy; {}. Quality is next-token bits per byte; compute is the MoE layers' FLOPs per token (routers and selected experts) as a share of running all {} experts. The quality reference is {}; the ringed point is the model's default policy ({}).</figcaption></figure>"##,
            sweep_curve(sw),
            sw.tokens_per_point,
            sw.batches,
            sw.batch,
            sw.seq_len,
            esc(&sw.source),
            super::text::repeats_note(sw.repeats),
            sw.n_experts,
            esc(&policy_label(&sw.reference_policy)),
            esc(&policy_label(&sw.default_policy))
        );
        let _ = write!(
            o,
            r##"<figure id="fig-sweep-throughput">{}<figcaption>Tokens per second of each threshold point (tokens / forward time of all its passes), the median of the repeats with a bar from the slowest to the fastest; dashed lines: the top-k and Dense points. Throughput follows the FLOPs only as far as the MoE layers dominate the time (see the time split per pass in the summary).</figcaption></figure>"##,
            sweep_throughput(sw)
        );
        let _ = write!(
            o,
            r##"<table class="sweep-table"><tr><th class="l">policy</th><th>experts/token</th><th>MoE FLOPs vs all</th><th>saved vs top-k</th><th>bits/byte</th><th>&#916; vs reference</th><th>KL bits</th><th>p50 us/token</th><th>p99 us/token</th><th>tokens/s{}</th><th class="l">experts/token per layer</th></tr>"##,
            if sw.repeats > 1 { " (min-max)" } else { "" }
        );
        for p in &sw.points {
            let layers: Vec<String> = p
                .layer_mean_experts_per_token
                .iter()
                .map(|v| format!("{v:.2}"))
                .collect();
            let _ = write!(
                o,
                r##"<tr{}><td class="l">{}{}</td><td>{:.3}</td><td>{:.1}%</td><td>{:+.1}%</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{:.1}</td><td>{}</td><td class="l">{}</td></tr>"##,
                if p.is_default {
                    r##" class="default""##
                } else {
                    ""
                },
                esc(&p.label),
                if p.is_default { " (default)" } else { "" },
                p.mean_experts_per_token,
                100.0 * p.moe_flops_fraction_of_all_experts,
                p.moe_saved_vs_top_k_pct,
                opt(p.bits_per_byte, 4),
                opt(p.delta_bits_per_byte_vs_reference, 4),
                opt(p.mean_kl_bits, 4),
                p.token_latency_p50_us,
                p.token_latency_p99_us,
                super::text::rate_with_spread(p),
                layers.join(" ")
            );
        }
        o.push_str("</table>");
        let _ = write!(
            o,
            r##"<p class="note">The figures below are those of the {} point, as a live session of that policy shows them.</p>"##,
            esc(&policies_label(s))
        );
    }
}

/// The routing heatmap.
fn heatmap_section(o: &mut String, data: &ReportData) {
    let s = &data.snapshot;
    let e = &s.epoch;
    let c = &e.cumulative;
    let m = &s.model;
    let _ = write!(
        o,
        r##"<h2>Routing heatmap</h2><figure id="fig-heatmap">{}<figcaption>Share of each MoE layer's {} tokens whose selection includes each expert (whole epoch). Hover a cell for its figures.</figcaption></figure>"##,
        heatmap(&c.layers, m.n_experts),
        c.tokens
    );
}

/// One experts-per-token bar chart per MoE layer.
fn experts_per_token_section(o: &mut String, data: &ReportData) {
    let s = &data.snapshot;
    let e = &s.epoch;
    let c = &e.cumulative;
    let n_max = c
        .layers
        .iter()
        .filter_map(|l| l.experts_per_token_counts.iter().rposition(|&n| n > 0))
        .max()
        .map_or(1, |i| i + 1);
    o.push_str(
        r##"<h2>Experts per token</h2><figure id="fig-experts-per-token"><div class="grid3">"##,
    );
    for l in &c.layers {
        o.push_str(&experts_per_token(l, n_max));
    }
    o.push_str("</div><figcaption>Share of tokens that selected exactly n experts, per MoE layer (before any capacity dropping).</figcaption></figure>");
}

/// Latency and FLOP histograms.
fn histograms_section(o: &mut String, data: &ReportData) {
    let s = &data.snapshot;
    let e = &s.epoch;
    let h = &e.histograms;
    let _ = write!(
        o,
        r##"<h2>Latency and FLOPs</h2><figure id="fig-histograms"><div class="grid2">{}{}{}</div><figcaption>Whole epoch. Token latency is the pass time divided by its tokens; dashed lines mark the median and the 99th percentile.</figcaption></figure>"##,
        {
            let (f, unit) = time_unit(h.token_latency_us.max);
            // Each pass gives all its tokens the same latency: as many distinct values as passes.
            let title = format!(
                "Per-token latency (pass time / tokens, {} passes)",
                e.forward_passes
            );
            histogram(&h.token_latency_us, &title, unit, f)
        },
        {
            let (f, unit) = time_unit(h.forward_latency_us.max);
            histogram(&h.forward_latency_us, "Forward pass latency", unit, f)
        },
        histogram(&h.token_moe_flops, "MoE FLOPs per token", "FLOPs", 1.0)
    );
}

/// The recent generated text (generate workload only).
fn generated_section(o: &mut String, data: &ReportData) {
    let s = &data.snapshot;
    if let Some(g) = &s.generated {
        o.push_str(r##"<h2>Generated text</h2><figure id="generated">"##);
        for (seq, text) in g.text_by_sequence() {
            let _ = write!(
                o,
                r##"<pre class="gen"><span class="note">sequence {seq}: </span>{}</pre>"##,
                esc(&text)
            );
        }
        let _ = write!(
            o,
            r##"<figcaption>The recent stream, prompt and generated bytes together{}.</figcaption></figure>"##,
            if g.dropped_tokens > 0 {
                format!("; {} older tokens not shown", g.dropped_tokens)
            } else {
                String::new()
            }
        );
    }
}

/// The per-layer table and the previous epoch's line.
fn layers_section(o: &mut String, data: &ReportData) {
    let s = &data.snapshot;
    let e = &s.epoch;
    let c = &e.cumulative;
    o.push_str(r##"<h2>MoE layers</h2><table class="layers"><tr><th>layer</th><th class="l">policy</th><th>experts/token</th><th>kept/token</th><th>top-1 p</th><th>MoE FLOPs vs all</th><th>load CV</th><th>load entropy</th><th>max/mean</th><th>unused experts</th><th>dropped pairs</th></tr>"##);
    for l in &c.layers {
        let _ = write!(
            o,
            r##"<tr><td>{}</td><td class="l">{}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.1}%</td><td>{:.3}</td><td>{:.3}</td><td>{:.2}</td><td>{}</td><td>{}</td></tr>"##,
            l.layer,
            esc(&policy_label(&l.policy)),
            l.mean_experts_per_token,
            l.mean_kept_experts_per_token,
            l.mean_top1_prob,
            100.0 * l.moe_flops_fraction_of_all_experts,
            l.load_balance.coefficient_of_variation,
            l.load_balance.normalized_entropy,
            l.load_balance.max_over_mean,
            l.unused_experts.len(),
            l.dropped_pairs
        );
    }
    o.push_str("</table>");
    if let Some(p) = &s.previous_epoch {
        let _ = write!(
            o,
            r##"<p class="note">Previous epoch {} ({}): {} tokens, {:.2} experts/token, {:.1}% MoE compute saved vs all experts, bits/byte {}.</p>"##,
            p.id,
            esc(&p.reason),
            p.tokens,
            p.mean_experts_per_token,
            p.flops.moe_saved_vs_all_experts_pct,
            opt(p.bits_per_byte, 4)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(
            nice_ticks(0.0, 100.0, 5),
            vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]
        );
        let t = nice_ticks(1.2, 1.37, 4);
        assert!(t.len() >= 3 && t[0] >= 1.2 && *t.last().unwrap() <= 1.37 + 1e-12);
        assert_eq!(nice_ticks(1.0, 1.0, 4), vec![1.0]);
    }

    #[test]
    fn tick_labels_are_exact_and_distinct() {
        // The sweep's bits/byte axis once read 2.93 / 2.95 / 2.98 / 3.00 for steps of 0.025.
        for (lo, hi, n) in [
            (2.92, 3.03, 5),
            (0.0, 1.0, 4),
            (1.2, 1.37, 4),
            (0.0013, 0.0021, 5),
            (150.0, 260.0, 5),
            (0.0, 26_000.0, 5),
        ] {
            let t = nice_ticks(lo, hi, n);
            let d = tick_decimals(t[1] - t[0]);
            let labels: Vec<String> = t.iter().map(|v| format!("{v:.d$}")).collect();
            for (v, label) in t.iter().zip(&labels) {
                let back: f64 = label.parse().unwrap();
                assert!((back - v).abs() <= (t[1] - t[0]) * 1e-6, "{label} for {v}");
            }
            let mut unique = labels.clone();
            unique.dedup();
            assert_eq!(unique.len(), labels.len(), "{labels:?}");
        }
        assert_eq!(tick_decimals(0.025), 3);
        assert_eq!(tick_decimals(0.5), 1);
        assert_eq!(tick_decimals(20.0), 0);
    }

    #[test]
    fn durations_get_a_unit_that_fits_them() {
        assert_eq!(time_unit(30_900.0), (1e-3, "milliseconds"));
        assert_eq!(time_unit(850.0), (1.0, "microseconds"));
        assert_eq!(time_unit(0.4), (1e3, "nanoseconds"));
        assert_eq!(time_unit(2.5e6), (1e-6, "seconds"));
    }

    #[test]
    fn numbers_and_escaping() {
        assert_eq!(num(0.0), "0");
        assert_eq!(num(12_345.0), "12.3k");
        assert_eq!(num(2_500_000.0), "2.50M");
        assert_eq!(esc("<a & \"b\">"), "&lt;a &amp; &quot;b&quot;&gt;");
        assert_eq!(viridis(0.0), "#440154");
        assert_eq!(viridis(1.0), "#fde725");
    }
}
