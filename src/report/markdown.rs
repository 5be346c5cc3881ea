//! The Markdown report: a readable summary with tables (epoch figures, per layer, the sweep).

use std::fmt::Write;

use super::{ReportData, policies_label, policy_label};
use crate::profiling::snapshot::HistogramSnapshot;
use crate::units::{fixed_or_dash as opt, flops};

/// Text from outside (model, device and file names) as Markdown that renders as that text: no
/// control characters, no HTML, nothing that ends a table cell.
pub fn text(raw: &str) -> String {
    crate::units::printable(raw)
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('|', "\\|")
}

fn hist_row(name: &str, h: &HistogramSnapshot) -> String {
    format!(
        "| {name} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
        h.unit, h.count, h.min, h.mean, h.p50, h.p90, h.p99, h.max
    )
}

/// The report as Markdown.
pub fn render(data: &ReportData) -> String {
    let s = &data.snapshot;
    let e = &s.epoch;
    let c = &e.cumulative;
    let q = &e.quality;
    let mut o = String::new();
    let _ = writeln!(o, "# xmoe-top report: {}\n", text(&s.model.name));
    let _ = writeln!(
        o,
        "Made {} by xmoe-top {} (report schema {}).  \nCommand: `{}`\n",
        data.created_utc,
        data.generator.version,
        data.generator.report_schema_version,
        text(&data.command_line.join(" ")).replace('`', "'")
    );
    if let Some(r) = &data.recording {
        let _ = writeln!(
            o,
            "Figures {}; recorded by `{}`.\n",
            text(&r.describe()),
            text(&r.recorded_command_line.join(" ")).replace('`', "'")
        );
    }

    o.push_str("## Session\n\n| | |\n|---|---|\n");
    let m = &s.model;
    let rows = [
        (
            "Model",
            format!(
                "{} ({} parameters, {} blocks, MoE blocks {:?}, {} experts of width {})",
                text(&m.name),
                m.parameters,
                m.n_layers,
                m.moe_layers,
                m.n_experts,
                m.expert_hidden
            ),
        ),
        ("Device", text(&m.device)),
        ("Workload", text(&s.workload.description)),
        ("Policy", policies_label(s)),
        (
            "Capacity factor",
            s.policy
                .capacity_factor
                .map_or("none".to_string(), |f| f.to_string()),
        ),
        (
            "Epoch",
            format!("{} ({}), {:.2} s running", e.id, e.reason, e.running_s),
        ),
        (
            "Tokens",
            format!("{} in {} forward passes", e.tokens, e.forward_passes),
        ),
        (
            "Throughput",
            format!(
                "{:.0} tokens/s over the epoch{} (tokens / wall time of their forward passes){}",
                e.tokens_per_second_epoch,
                if s.workload.kind == crate::profiling::snapshot::WorkloadKind::Generate {
                    " incl. prompt prefill"
                } else {
                    ""
                },
                e.decode_tokens_per_second
                    .map_or(String::new(), |d| format!("; decode only {d:.1} tokens/s"))
            ),
        ),
        (
            "Experts per token",
            format!("{:.3} (mean over MoE layers)", c.mean_experts_per_token),
        ),
        (
            "MoE FLOPs per token",
            format!(
                "{} (all experts {}, {} {})",
                flops(c.flops.moe_per_token.actual),
                flops(c.flops.moe_per_token.all_experts),
                m.top_k_name(c.flops.top_k),
                flops(c.flops.moe_per_token.top_k)
            ),
        ),
        (
            "MoE compute saved",
            format!(
                "{:.1}% vs all experts, {:.1}% vs {}",
                c.flops.moe_saved_vs_all_experts_pct,
                c.flops.moe_saved_vs_top_k_pct,
                m.top_k_name(c.flops.top_k)
            ),
        ),
        (
            "Model compute saved",
            format!(
                "{:.1}% vs all experts, {:.1}% vs {}",
                c.flops.model_saved_vs_all_experts_pct,
                c.flops.model_saved_vs_top_k_pct,
                m.top_k_name(c.flops.top_k)
            ),
        ),
        (
            "Bits per byte",
            format!(
                "{} over {} scored tokens (perplexity {}); {} vs {} on {} compared batches: delta {}, KL {} bits/token",
                opt(q.bits_per_byte, 4),
                q.scored_tokens,
                opt(q.perplexity, 3),
                opt(q.compared_bits_per_byte, 4),
                policy_label(&q.reference_policy),
                q.reference_batches,
                super::delta_with_sample(q),
                opt(q.mean_kl_bits, 4)
            ),
        ),
        (
            "Device counters",
            s.device.note.clone().unwrap_or_else(|| {
                s.device
                    .gpus
                    .iter()
                    .map(|g| {
                        format!(
                            "GPU {} {}: {}% busy",
                            g.index,
                            text(&g.name),
                            g.utilization_pct.map_or("-".into(), |u| u.to_string())
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            }),
        ),
    ];
    for (k, v) in rows {
        let _ = writeln!(o, "| {k} | {} |", v.replace('|', "\\|"));
    }

    o.push_str("\n## MoE layers (whole epoch)\n\n");
    o.push_str("| layer | policy | experts/token | kept/token | top-1 p | MoE FLOPs vs all | load CV | load entropy | max/mean | unused experts | dropped |\n");
    o.push_str("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for l in &c.layers {
        let _ = writeln!(
            o,
            "| {} | {} | {:.3} | {:.3} | {:.3} | {:.1}% | {:.3} | {:.3} | {:.2} | {} | {} |",
            l.layer,
            policy_label(&l.policy),
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

    o.push_str("\n## Experts per token (tokens that took exactly n experts)\n\n");
    let n_max = c
        .layers
        .iter()
        .filter_map(|l| l.experts_per_token_counts.iter().rposition(|&n| n > 0))
        .max()
        .map_or(0, |i| i + 1);
    if n_max > 0 {
        o.push_str("| layer |");
        for n in 1..=n_max {
            let _ = write!(o, " {n} |");
        }
        o.push_str("\n|---:|");
        o.push_str(&"---:|".repeat(n_max));
        o.push('\n');
        for l in &c.layers {
            let _ = write!(o, "| {} |", l.layer);
            for n in 0..n_max {
                let _ = write!(o, " {} |", l.experts_per_token_counts.get(n).unwrap_or(&0));
            }
            o.push('\n');
        }
    }

    o.push_str("\n## Distributions (whole epoch)\n\n");
    o.push_str("| figure | unit | count | min | mean | p50 | p90 | p99 | max |\n");
    o.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    let h = &e.histograms;
    o.push_str(&hist_row("token latency", &h.token_latency_us));
    o.push_str(&hist_row("forward pass latency", &h.forward_latency_us));
    o.push_str(&hist_row("MoE FLOPs per token", &h.token_moe_flops));

    if let Some(cmp) = &s.compare {
        o.push('\n');
        super::compare::markdown(&mut o, cmp);
    }

    if let Some(sw) = &data.sweep {
        let _ = writeln!(
            o,
            "\n## Threshold sweep\n\n{} tokens per point ({} passes of {} x {}) from {}, on {}; \
             {}; quality reference: {}; top-k baseline k = {}; default policy marked *.\n",
            sw.tokens_per_point,
            sw.batches,
            sw.batch,
            sw.seq_len,
            text(&sw.source),
            text(&sw.device),
            super::text::repeats_note(sw.repeats),
            policy_label(&sw.reference_policy),
            sw.top_k_baseline
        );
        let _ = writeln!(
            o,
            "| policy | experts/token | MoE FLOPs vs all | saved vs top-k | bits/byte | delta vs reference | KL bits | p50 us/token | p99 us/token | tokens/s{} | experts/token per layer |",
            if sw.repeats > 1 { " (min-max)" } else { "" }
        );
        o.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
        for p in &sw.points {
            let layers: Vec<String> = p
                .layer_mean_experts_per_token
                .iter()
                .map(|v| format!("{v:.2}"))
                .collect();
            let _ = writeln!(
                o,
                "| {}{} | {:.3} | {:.1}% | {:.1}% | {} | {} | {} | {:.1} | {:.1} | {} | {} |",
                p.label,
                if p.is_default { " *" } else { "" },
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
    }
    o
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_from_files_cannot_inject_html_or_break_tables() {
        assert_eq!(
            super::text("<script>x</script>|a&b\u{1b}"),
            "&lt;script&gt;x&lt;/script&gt;\\|a&amp;b\\x1b"
        );
    }
}
