//! Rendering of an imported engine dump's [`Summary`]: the text summary `xmoe-top import`
//! prints, and its report as JSON, Markdown or HTML.

use std::fmt::Write as _;

use crate::import::{Summary, WhatIf};

/// Version of the import report's JSON layout (`docs/import-formats.md`).
pub const IMPORT_REPORT_VERSION: u32 = 1;

fn ratio(v: Option<f64>) -> String {
    v.map_or_else(|| "—".to_string(), |r| format!("{r:.2}"))
}

fn load_value(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn header_lines(s: &Summary) -> Vec<String> {
    let mut out = vec![format!("{} ({})", s.file, s.format)];
    let mut shape = format!(
        "{} layers × {} experts · {} {} · {} token-expert assignments",
        s.n_layers, s.n_experts, s.records, s.record_kind, s.total
    );
    if let Some(t) = s.tokens {
        let _ = write!(shape, " · {t} tokens");
    }
    if let Some(k) = s.top_k {
        let _ = write!(shape, " · top-{k}");
    }
    out.push(shape);
    out.extend(s.notes.iter().cloned());
    out
}

fn what_if_line(s: &Summary) -> Option<String> {
    match &s.what_if {
        WhatIf::NotAsked => None,
        WhatIf::Unavailable { threshold, reason } => Some(format!(
            "What-if t={threshold}: cannot be computed. {reason}"
        )),
    }
}

/// The text summary printed by `xmoe-top import`.
pub fn text(s: &Summary) -> String {
    let mut o = String::new();
    for (i, l) in header_lines(s).iter().enumerate() {
        let _ = writeln!(o, "{}{l}", if i == 0 { "" } else { "  " });
    }
    let _ = writeln!(
        o,
        "\nPer-layer expert load (imbalance = busiest expert / mean):"
    );
    let _ = writeln!(
        o,
        "{:>6} {:>10} {:>10} {:>7} {:>10} {:>9}",
        "layer", "total", "max", "expert", "mean", "max/mean"
    );
    for l in &s.layers {
        let _ = writeln!(
            o,
            "{:>6} {:>10} {:>10} {:>7} {:>10.2} {:>9}",
            l.layer,
            l.total,
            l.max,
            if l.total > 0 {
                l.max_expert.to_string()
            } else {
                "—".into()
            },
            l.mean,
            ratio(l.imbalance)
        );
    }
    let _ = writeln!(
        o,
        "overall imbalance (Σ max / Σ mean over layers): {}",
        ratio(s.overall_imbalance)
    );
    match (&s.gpu, &s.gpu_unavailable) {
        (Some(g), _) => {
            let _ = writeln!(o, "\nPer-GPU load under {}:", g.source);
            let mut head = format!("{:>6}", "layer");
            for i in 0..g.gpus {
                let _ = write!(head, " {:>9}", format!("GPU{i}"));
            }
            let _ = writeln!(o, "{head} {:>9}", "max/mean");
            for (l, row) in g.per_layer.iter().enumerate() {
                let mut line = format!("{l:>6}");
                for v in row {
                    let _ = write!(line, " {:>9}", load_value(*v));
                }
                let _ = writeln!(o, "{line} {:>9}", ratio(g.layer_imbalance[l]));
            }
            let mut line = format!("{:>6}", "all");
            for v in &g.total_per_gpu {
                let _ = write!(line, " {:>9}", load_value(*v));
            }
            let _ = writeln!(o, "{line}");
            let _ = writeln!(
                o,
                "overall GPU imbalance (Σ busiest GPU / Σ mean GPU over layers): {}",
                ratio(g.overall)
            );
        }
        (None, Some(why)) => {
            let _ = writeln!(o, "\nPer-GPU load: not computed: {why}.");
        }
        (None, None) => {}
    }
    if let Some(w) = what_if_line(s) {
        let _ = writeln!(o, "\n{w}");
    }
    o
}

/// The JSON report: the summary with a version tag.
pub fn json(s: &Summary) -> String {
    let value = serde_json::json!({
        "import_report_version": IMPORT_REPORT_VERSION,
        "generator": format!("xmoe-top {}", env!("CARGO_PKG_VERSION")),
        "summary": s,
    });
    serde_json::to_string_pretty(&value).expect("a summary always serialises") + "\n"
}

/// The Markdown report: the text summary's tables, and the load of every expert.
pub fn markdown(s: &Summary) -> String {
    let mut o = String::new();
    let head = header_lines(s);
    let _ = writeln!(o, "# Imported routing: {}\n", head[0]);
    for l in &head[1..] {
        let _ = writeln!(o, "- {l}");
    }
    let _ = writeln!(
        o,
        "\n## Per-layer expert load\n\n| layer | total | max | busiest expert | mean | max/mean |\n|---:|---:|---:|---:|---:|---:|"
    );
    for l in &s.layers {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {:.2} | {} |",
            l.layer,
            l.total,
            l.max,
            l.max_expert,
            l.mean,
            ratio(l.imbalance)
        );
    }
    let _ = writeln!(
        o,
        "\nOverall imbalance (Σ max / Σ mean): **{}**",
        ratio(s.overall_imbalance)
    );
    match (&s.gpu, &s.gpu_unavailable) {
        (Some(g), _) => {
            let _ = writeln!(o, "\n## Per-GPU load\n\nPlacement: {}.\n", g.source);
            let mut h = "| layer |".to_string();
            let mut rule = "|---:|".to_string();
            for i in 0..g.gpus {
                let _ = write!(h, " GPU{i} |");
                rule.push_str("---:|");
            }
            let _ = writeln!(o, "{h} max/mean |\n{rule}---:|");
            for (l, row) in g.per_layer.iter().enumerate() {
                let cells: Vec<String> = row.iter().map(|v| load_value(*v)).collect();
                let _ = writeln!(
                    o,
                    "| {l} | {} | {} |",
                    cells.join(" | "),
                    ratio(g.layer_imbalance[l])
                );
            }
            let _ = writeln!(
                o,
                "\nOverall GPU imbalance (Σ busiest GPU / Σ mean GPU): **{}**",
                ratio(g.overall)
            );
        }
        (None, Some(why)) => {
            let _ = writeln!(o, "\n## Per-GPU load\n\nNot computed: {why}.");
        }
        (None, None) => {}
    }
    let _ = writeln!(o, "\n## Load per expert\n");
    let mut h = "| layer |".to_string();
    let mut rule = "|---:|".to_string();
    for e in 0..s.n_experts {
        let _ = write!(h, " {e} |");
        rule.push_str("---:|");
    }
    let _ = writeln!(o, "{h}\n{rule}");
    for (l, row) in s.load.iter().enumerate() {
        let cells: Vec<String> = row.iter().map(u64::to_string).collect();
        let _ = writeln!(o, "| {l} | {} |", cells.join(" | "));
    }
    if let Some(w) = what_if_line(s) {
        let _ = writeln!(o, "\n## What-if\n\n{w}");
    }
    o
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The HTML report: one page, the heatmap as a table of shaded cells.
pub fn html(s: &Summary) -> String {
    let mut o = String::new();
    let head = header_lines(s);
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>xmoe-top import: {}</title>\n<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{padding:2px 6px;text-align:right;border:1px solid #ddd}}td.h{{min-width:1.2em}}</style></head><body>\n<h1>Imported routing</h1>\n<ul>",
        esc(&head[0])
    );
    for l in &head {
        let _ = write!(o, "<li>{}</li>", esc(l));
    }
    let _ = writeln!(
        o,
        "</ul>\n<h2>Per-layer expert load</h2>\n<table><tr><th>layer</th><th>total</th><th>max</th><th>busiest expert</th><th>mean</th><th>max/mean</th></tr>"
    );
    for l in &s.layers {
        let _ = writeln!(
            o,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{}</td></tr>",
            l.layer,
            l.total,
            l.max,
            l.max_expert,
            l.mean,
            ratio(l.imbalance)
        );
    }
    let _ = writeln!(
        o,
        "</table><p>Overall imbalance (Σ max / Σ mean): <b>{}</b></p>",
        ratio(s.overall_imbalance)
    );
    let max = s.load.iter().flatten().copied().max().unwrap_or(0).max(1) as f64;
    let _ = writeln!(
        o,
        "<h2>Load per expert</h2><p>Rows are layers, columns experts; darker is more load (the busiest cell holds {}).</p><table>",
        max as u64
    );
    for (l, row) in s.load.iter().enumerate() {
        let _ = write!(o, "<tr><th>{l}</th>");
        for (e, &v) in row.iter().enumerate() {
            let a = v as f64 / max;
            let _ = write!(
                o,
                "<td class=\"h\" title=\"layer {l} expert {e}: {v}\" style=\"background:rgba(200,60,20,{a:.3})\"></td>"
            );
        }
        let _ = writeln!(o, "</tr>");
    }
    let _ = writeln!(o, "</table>");
    match (&s.gpu, &s.gpu_unavailable) {
        (Some(g), _) => {
            let _ = write!(
                o,
                "<h2>Per-GPU load</h2><p>Placement: {}.</p><table><tr><th>layer</th>",
                esc(&g.source)
            );
            for i in 0..g.gpus {
                let _ = write!(o, "<th>GPU{i}</th>");
            }
            let _ = writeln!(o, "<th>max/mean</th></tr>");
            for (l, row) in g.per_layer.iter().enumerate() {
                let _ = write!(o, "<tr><td>{l}</td>");
                for v in row {
                    let _ = write!(o, "<td>{}</td>", load_value(*v));
                }
                let _ = writeln!(o, "<td>{}</td></tr>", ratio(g.layer_imbalance[l]));
            }
            let _ = writeln!(
                o,
                "</table><p>Overall GPU imbalance (Σ busiest GPU / Σ mean GPU): <b>{}</b></p>",
                ratio(g.overall)
            );
        }
        (None, Some(why)) => {
            let _ = writeln!(o, "<h2>Per-GPU load</h2><p>Not computed: {}.</p>", esc(why));
        }
        (None, None) => {}
    }
    if let Some(w) = what_if_line(s) {
        let _ = writeln!(o, "<h2>What-if</h2><p>{}</p>", esc(&w));
    }
    o.push_str("</body></html>\n");
    o
}
