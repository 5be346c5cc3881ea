//! The A/B section of every report format: one set of figure rows ([`figures`]) that the text
//! summary, Markdown and HTML all print, so the three never disagree on a figure or its wording,
//! plus each format's own table and difference heatmap.

use std::fmt::Write;

use crate::profiling::compare::{CompareSnapshot, JACCARD_BINS};
use crate::units::{compact, fixed_or_dash};

/// The labels of the Jaccard histogram's bins.
pub fn jaccard_bin_labels() -> Vec<String> {
    (0..JACCARD_BINS)
        .map(|i| {
            if i == JACCARD_BINS - 1 {
                "=1".to_string()
            } else {
                format!("{:.1}-{:.1}", i as f64 / 10.0, (i + 1) as f64 / 10.0)
            }
        })
        .collect()
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

/// "+0.0123 ± 0.0040 (standard error over 12 batches)", or without the error below 2 batches.
fn with_stderr(v: f64, se: Option<f64>, prec: usize, batches: u64, unit: &str) -> String {
    match se {
        Some(se) => {
            format!("{v:+.prec$}{unit} ± {se:.prec$}{unit} (standard error over {batches} batches)")
        }
        None => format!("{v:+.prec$}{unit} ({batches} batch, no standard error below 2)"),
    }
}

/// The figures of a comparison as (name, value) rows, differences always B − A.
pub fn figures(c: &CompareSnapshot) -> Vec<(&'static str, String)> {
    let (a, b) = (&c.a, &c.b);
    let pairs = c.tokens * c.layers.len() as u64;
    let mut rows = vec![
        ("A", a.label.clone()),
        ("B", b.label.clone()),
        (
            "sample",
            format!(
                "{} tokens in {} batches, each batch run under A then B",
                c.tokens, c.batches
            ),
        ),
        (
            "experts/token",
            format!(
                "A {:.2} · B {:.2} · Δ {:+.2}",
                a.mean_experts_per_token,
                b.mean_experts_per_token,
                c.delta_experts_per_token()
            ),
        ),
        (
            "MoE FLOPs/token",
            format!(
                "A {} ({:.1}% of all experts) · B {} ({:.1}%) · Δ {}{} ({:+.1}% of all experts)",
                compact(a.moe_flops_per_token),
                100.0 * a.moe_flops_fraction_of_all_experts,
                compact(b.moe_flops_per_token),
                100.0 * b.moe_flops_fraction_of_all_experts,
                if c.delta_moe_flops_per_token >= 0.0 {
                    "+"
                } else {
                    ""
                },
                compact(c.delta_moe_flops_per_token),
                c.delta_moe_flops_pct_of_all_experts
            ),
        ),
        (
            "pass time",
            format!(
                "A mean {:.2} ms, p50 {:.2}, p90 {:.2} · B mean {:.2} ms, p50 {:.2}, p90 {:.2} · Δ {}",
                a.pass_ms_mean,
                a.pass_ms_p50,
                a.pass_ms_p90,
                b.pass_ms_mean,
                b.pass_ms_p50,
                b.pass_ms_p90,
                with_stderr(
                    c.delta_pass_ms_mean,
                    c.delta_pass_ms_stderr,
                    2,
                    c.batches,
                    " ms"
                )
            ),
        ),
    ];
    rows.push((
        "bits/byte",
        match c.delta_bits_per_byte {
            Some(d) => format!(
                "A {} · B {} · Δ {} on {} predictions",
                fixed_or_dash(a.bits_per_byte, 4),
                fixed_or_dash(b.bits_per_byte, 4),
                with_stderr(d, c.delta_bits_per_byte_stderr, 4, c.batches, ""),
                c.scored_tokens
            ),
            None => "- (no scored predictions yet)".to_string(),
        },
    ));
    rows.push((
        "KL(P_B ‖ P_A)",
        match c.mean_kl_bits {
            Some(k) => format!(
                "{k:.4} bits/token, mean over {} predictions",
                c.scored_tokens
            ),
            None => "-".to_string(),
        },
    ));
    let identical = c.jaccard_histogram.last().copied().unwrap_or(0);
    rows.push((
        "agreement",
        format!(
            "mean Jaccard {:.3} of the two chosen expert sets; identical sets {:.1}% of {} token-layer pairs",
            c.jaccard_mean,
            pct(identical, pairs),
            pairs
        ),
    ));
    rows
}

/// Per-layer rows: layer, experts/token A, B, Δ, mean Jaccard, identical %.
pub fn layer_rows(c: &CompareSnapshot) -> Vec<[String; 6]> {
    c.layers
        .iter()
        .map(|l| {
            let n: u64 = l.jaccard_histogram.iter().sum();
            [
                format!("L{}", l.layer),
                format!("{:.2}", l.experts_per_token_a),
                format!("{:.2}", l.experts_per_token_b),
                format!("{:+.2}", l.delta_experts_per_token()),
                format!("{:.3}", l.jaccard_mean),
                format!(
                    "{:.1}%",
                    pct(l.jaccard_histogram.last().copied().unwrap_or(0), n)
                ),
            ]
        })
        .collect()
}

/// Headers of [`layer_rows`].
pub const LAYER_HEADERS: [&str; 6] = [
    "layer",
    "experts/token A",
    "B",
    "Δ (B − A)",
    "mean Jaccard",
    "identical sets",
];

/// The experts whose share moved most in each layer, largest first:
/// "e3 +12.0 pp, e7 −8.1 pp" (percentage points of tokens, B − A).
pub fn largest_shifts(c: &CompareSnapshot, per_layer: usize) -> Vec<(usize, String)> {
    c.layers
        .iter()
        .map(|l| {
            let mut d: Vec<(usize, f64)> = l.share_delta().into_iter().enumerate().collect();
            d.sort_by(|x, y| y.1.abs().total_cmp(&x.1.abs()));
            let s = d
                .iter()
                .take(per_layer)
                .filter(|(_, v)| *v != 0.0)
                .map(|(e, v)| format!("e{e} {:+.1} pp", 100.0 * v))
                .collect::<Vec<_>>()
                .join(", ");
            (l.layer, if s.is_empty() { "none".into() } else { s })
        })
        .collect()
}

/// The A/B section of the headless summary.
pub fn text(o: &mut String, c: &CompareSnapshot) {
    let w = |o: &mut String, s: String| writeln!(o, "{s}").expect("writing to a String");
    w(o, "A/B comparison (differences are B − A)".to_string());
    for (name, value) in figures(c) {
        w(o, format!("  {name:<16}{value}"));
    }
    w(
        o,
        format!(
            "  {:<7}{:>16}{:>8}{:>11}{:>14}{:>16}",
            LAYER_HEADERS[0],
            LAYER_HEADERS[1],
            LAYER_HEADERS[2],
            LAYER_HEADERS[3],
            LAYER_HEADERS[4],
            LAYER_HEADERS[5]
        ),
    );
    for r in layer_rows(c) {
        w(
            o,
            format!(
                "  {:<7}{:>16}{:>8}{:>11}{:>14}{:>16}",
                r[0], r[1], r[2], r[3], r[4], r[5]
            ),
        );
    }
    let labels = jaccard_bin_labels();
    let total: u64 = c.jaccard_histogram.iter().sum();
    let dist: Vec<String> = labels
        .iter()
        .zip(&c.jaccard_histogram)
        .map(|(l, &n)| format!("{l} {:.1}%", pct(n, total)))
        .collect();
    w(o, format!("  Jaccard distribution: {}", dist.join(" · ")));
    w(
        o,
        "  share of tokens per expert, largest shifts (B − A, percentage points):".to_string(),
    );
    for (layer, s) in largest_shifts(c, 4) {
        w(o, format!("    L{layer}: {s}"));
    }
}

/// The A/B section of the Markdown report.
pub fn markdown(o: &mut String, c: &CompareSnapshot) {
    let w = |o: &mut String, s: String| writeln!(o, "{s}").expect("writing to a String");
    w(o, "## A/B comparison\n".to_string());
    w(
        o,
        "Both policies ran on the same batches; every difference is B − A. KL is \
         KL(P_B ‖ P_A) of the next-token distributions, in bits per token.\n"
            .to_string(),
    );
    w(o, "| figure | value |\n|---|---|".to_string());
    for (name, value) in figures(c) {
        w(o, format!("| {name} | {} |", value.replace('|', "\\|")));
    }
    w(o, String::new());
    w(o, format!("| {} |", LAYER_HEADERS.join(" | ")));
    w(o, format!("|{}", "---|".repeat(LAYER_HEADERS.len())));
    for r in layer_rows(c) {
        w(o, format!("| {} |", r.join(" | ")));
    }
    w(o, String::new());
    let labels = jaccard_bin_labels();
    w(
        o,
        format!(
            "Jaccard index of the two chosen expert sets, (token, layer) pairs per bin:\n\n| {} |\n|{}\n| {} |\n",
            labels.join(" | "),
            "---|".repeat(labels.len()),
            c.jaccard_histogram
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(" | ")
        ),
    );
    w(
        o,
        "Difference heatmap: share of tokens per expert under B minus under A, percentage points.\n"
            .to_string(),
    );
    let n_experts = c.layers.first().map_or(0, |l| l.share_a.len());
    if n_experts <= 32 {
        let head: Vec<String> = (0..n_experts).map(|e| format!("e{e}")).collect();
        w(o, format!("| layer | {} |", head.join(" | ")));
        w(o, format!("|---|{}", "---:|".repeat(n_experts)));
        for l in &c.layers {
            let cells: Vec<String> = l
                .share_delta()
                .iter()
                .map(|d| format!("{:+.1}", 100.0 * d))
                .collect();
            w(o, format!("| L{} | {} |", l.layer, cells.join(" | ")));
        }
    } else {
        // A row of 64+ cells is unreadable in Markdown: the largest shifts say the same.
        for (layer, s) in largest_shifts(c, 8) {
            w(o, format!("- L{layer}: {s}"));
        }
    }
    w(o, String::new());
}

/// A diverging colour for `d` in [-1, 1]: blue below zero (B uses the expert less), white at
/// zero, red above (B uses it more); the two ends are ColorBrewer's RdBu.
pub fn diverging(d: f64) -> String {
    let d = d.clamp(-1.0, 1.0);
    let (end, f) = if d < 0.0 {
        ((33.0, 102.0, 172.0), -d)
    } else {
        ((178.0, 24.0, 43.0), d)
    };
    let mix = |e: f64| (247.0 + (e - 247.0) * f).round() as u8;
    format!("#{:02x}{:02x}{:02x}", mix(end.0), mix(end.1), mix(end.2))
}

/// The difference heatmap as SVG: one row per MoE layer, one column per expert, colour = share
/// of tokens under B minus under A, on a symmetric scale with a legend.
fn diff_heatmap_svg(c: &CompareSnapshot) -> String {
    let n_experts = c.layers.first().map_or(0, |l| l.share_a.len());
    let (left, top) = (64.0, 26.0);
    let cell_w = (1040.0 / n_experts.max(1) as f64).clamp(3.0, 40.0);
    let cell_h = if c.layers.len() > 12 { 16.0 } else { 26.0 };
    // Room for the legend's explanation beside its colour bar.
    let w = (left + cell_w * n_experts as f64 + 20.0).max(920.0);
    let legend_y = top + cell_h * c.layers.len() as f64 + 34.0;
    let h = legend_y + 40.0;
    let max = c.max_abs_share_delta();
    let scale = if max > 0.0 { max } else { 1.0 };
    let mut s = format!(
        r##"<svg class="heatmap" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w:.0} {h:.0}" width="{w:.0}" height="{h:.0}" role="img" aria-label="A/B difference heatmap"><text x="{left}" y="14" font-size="12" fill="#5b6578">expert id &#8594;</text>"##
    );
    for (slot, l) in c.layers.iter().enumerate() {
        let y = top + slot as f64 * cell_h;
        let _ = write!(
            s,
            r##"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="end">layer {}</text>"##,
            left - 6.0,
            y + cell_h * 0.5 + 4.0,
            l.layer
        );
        for (e, d) in l.share_delta().into_iter().enumerate() {
            let x = left + e as f64 * cell_w;
            let _ = write!(
                s,
                r##"<rect x="{x:.1}" y="{y:.1}" width="{:.2}" height="{:.2}" fill="{}" stroke="#d0d4dc" stroke-width="0.4"><title>layer {} expert {e}: {:.1}% of tokens under A, {:.1}% under B ({:+.1} pp)</title></rect>"##,
                cell_w - 0.6,
                cell_h - 1.0,
                diverging(d / scale),
                l.layer,
                100.0 * l.share_a[e],
                100.0 * l.share_b[e],
                100.0 * d
            );
        }
    }
    let bottom = top + cell_h * c.layers.len() as f64;
    super::html::expert_ticks(&mut s, left, cell_w, bottom, n_experts);
    let lw = super::html::colour_bar(&mut s, left, legend_y, |f| diverging(2.0 * f - 1.0));
    let _ = write!(
        s,
        r##"<text x="{left}" y="{:.1}" font-size="11">{:+.1} pp</text><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">0</text><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{:+.1} pp</text><text x="{:.1}" y="{:.1}" font-size="11" fill="#5b6578">colour: share of tokens under B minus under A (blue: B uses the expert less, red: more)</text></svg>"##,
        legend_y + 24.0,
        -100.0 * scale,
        left + lw / 2.0,
        legend_y + 24.0,
        left + lw,
        legend_y + 24.0,
        100.0 * scale,
        left + lw + 16.0,
        legend_y + 9.0
    );
    s
}

/// The Jaccard distribution as SVG bars: share of (token, layer) pairs per bin.
fn jaccard_svg(c: &CompareSnapshot) -> String {
    let labels = jaccard_bin_labels();
    let total: u64 = c.jaccard_histogram.iter().sum();
    let (left, top, bw, ph) = (40.0, 16.0, 52.0, 120.0);
    let w = left + bw * labels.len() as f64 + 10.0;
    let h = top + ph + 40.0;
    let mut s = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w:.0} {h:.0}" width="{w:.0}" height="{h:.0}" role="img" aria-label="Jaccard distribution">"##
    );
    for (i, (l, &n)) in labels.iter().zip(&c.jaccard_histogram).enumerate() {
        let f = pct(n, total) / 100.0;
        let x = left + i as f64 * bw;
        let bh = f * ph;
        let _ = write!(
            s,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="#4a6fa5"><title>Jaccard {l}: {n} pairs ({:.1}%)</title></rect><text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{:.0}%</text><text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle" fill="#5b6578">{l}</text>"##,
            x + 4.0,
            top + ph - bh,
            bw - 8.0,
            100.0 * f,
            x + bw / 2.0,
            top + ph - bh - 3.0,
            100.0 * f,
            x + bw / 2.0,
            top + ph + 14.0
        );
    }
    let _ = write!(
        s,
        r##"<text x="{left}" y="{:.1}" font-size="11" fill="#5b6578">Jaccard index of the two chosen expert sets per (token, layer); {total} pairs</text></svg>"##,
        top + ph + 32.0
    );
    s
}

/// The A/B section of the HTML report.
pub fn html(o: &mut String, c: &CompareSnapshot) {
    use super::html::esc;
    o.push_str(r##"<h2>A/B comparison</h2><table class="layers"><tr><th class="l">figure</th><th class="l">value (differences B − A)</th></tr>"##);
    for (name, value) in figures(c) {
        let _ = write!(
            o,
            r##"<tr><td class="l">{}</td><td class="l">{}</td></tr>"##,
            esc(name),
            esc(&value)
        );
    }
    o.push_str("</table>");
    let _ = write!(
        o,
        r##"<figure id="fig-compare-heatmap">{}<figcaption>Difference heatmap over the same {} tokens: share of each MoE layer's tokens whose chosen set includes the expert, under B ({}) minus under A ({}). Hover a cell for both shares.</figcaption></figure>"##,
        diff_heatmap_svg(c),
        c.tokens,
        esc(&c.b.label),
        esc(&c.a.label)
    );
    o.push_str(r##"<table class="layers"><tr>"##);
    for h in LAYER_HEADERS {
        let _ = write!(o, "<th>{}</th>", esc(h));
    }
    o.push_str("</tr>");
    for r in layer_rows(c) {
        o.push_str("<tr>");
        for cell in r {
            let _ = write!(o, "<td>{}</td>", esc(&cell));
        }
        o.push_str("</tr>");
    }
    o.push_str("</table>");
    let _ = write!(
        o,
        r##"<figure id="fig-compare-jaccard">{}<figcaption>Agreement of the chosen expert sets: 1 means both policies chose exactly the same experts for that token in that layer, 0 that they share none. KL is KL(P_B ‖ P_A) of the next-token distributions, bits per token.</figcaption></figure>"##,
        jaccard_svg(c)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profiling::compare::{CompareLayer, CompareSide};
    use crate::routing::RoutingPolicy;

    pub(crate) fn example() -> CompareSnapshot {
        let side = |label: &str, e: f64, f: f64| CompareSide {
            label: label.into(),
            policies: vec![RoutingPolicy::threshold(0.9); 2],
            mean_experts_per_token: e,
            moe_flops_per_token: f,
            moe_flops_fraction_of_all_experts: f / 1e6,
            pass_ms_mean: 10.0,
            pass_ms_p50: 9.5,
            pass_ms_p90: 12.0,
            bits_per_byte: Some(1.7),
        };
        let layer = |l| CompareLayer {
            layer: l,
            share_a: vec![0.5, 0.25, 0.25, 0.0],
            share_b: vec![0.25, 0.5, 0.25, 0.1],
            experts_per_token_a: 1.0,
            experts_per_token_b: 1.1,
            jaccard_mean: 0.6,
            jaccard_histogram: vec![1, 0, 0, 0, 0, 2, 0, 0, 0, 0, 5],
        };
        CompareSnapshot {
            a: side("t=0.9", 3.0, 300_000.0),
            b: side("top-2", 2.0, 200_000.0),
            batches: 4,
            tokens: 8,
            layers: vec![layer(0), layer(1)],
            moe_flops_all_experts_per_token: 1e6,
            delta_moe_flops_per_token: -100_000.0,
            delta_moe_flops_pct_of_all_experts: -10.0,
            delta_pass_ms_mean: -1.25,
            delta_pass_ms_stderr: Some(0.5),
            scored_tokens: 8,
            delta_bits_per_byte: Some(0.0123),
            delta_bits_per_byte_stderr: Some(0.004),
            mean_kl_bits: Some(0.05),
            jaccard_mean: 0.6,
            jaccard_histogram: vec![2, 0, 0, 0, 0, 4, 0, 0, 0, 0, 10],
        }
    }

    #[test]
    fn every_format_shows_every_figure() {
        let c = example();
        let mut t = String::new();
        text(&mut t, &c);
        let mut m = String::new();
        markdown(&mut m, &c);
        for out in [&t, &m] {
            for needle in [
                "t=0.9",
                "top-2",
                "8 tokens in 4 batches",
                "Δ -1.00",
                "-10.0% of all experts",
                "Δ -1.25 ms ± 0.50 ms",
                "+0.0123 ± 0.0040 (standard error over 4 batches)",
                "0.0500 bits/token",
                "mean Jaccard 0.600",
                "identical sets 62.5% of 16 token-layer pairs",
            ] {
                assert!(out.contains(needle), "{needle} missing in\n{out}");
            }
        }
        assert!(m.contains("| L0 | -25.0 | +25.0 | +0.0 | +10.0 |"), "{m}");
        assert!(t.contains("=1 62.5%"), "{t}");
        assert!(
            t.contains("L0: e0 -25.0 pp, e1 +25.0 pp, e3 +10.0 pp"),
            "{t}"
        );
        let mut h = String::new();
        html(&mut h, &c);
        assert!(h.contains("fig-compare-heatmap") && h.contains("0.0500 bits/token"));
        // Zero is white, the ends are the palette's ends, and the legend spans both signs.
        assert_eq!(diverging(0.0), "#f7f7f7");
        assert_eq!(diverging(-1.0), "#2166ac");
        assert_eq!(diverging(1.0), "#b2182b");
        assert!(h.contains("-25.0 pp") && h.contains("+25.0 pp"), "legend");
    }
}
