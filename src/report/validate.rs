//! Typed checks of a report read back from JSON, before any renderer sees it: the renderers index
//! histogram edges by bucket and lay out one cell per expert, so a hand-edited or truncated
//! report must be refused with a message rather than crash them.

use std::fmt;

use super::ReportData;
use crate::profiling::snapshot::{HistogramSnapshot, LayerStatsSnapshot, RoutingStats};

/// What is wrong with a report, and where (a JSON-pointer-like path such as
/// `snapshot.epoch.histograms.token_latency_us.edges`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidReport {
    /// Where in the report.
    pub field: String,
    /// What is wrong there.
    pub problem: String,
}

impl fmt::Display for InvalidReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

impl std::error::Error for InvalidReport {}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> InvalidReport {
    InvalidReport {
        field: field.into(),
        problem: problem.into(),
    }
}

fn finite(field: &str, v: f64) -> Result<(), InvalidReport> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(invalid(field, format!("{v} is not a finite number")))
    }
}

/// Checks that `data` is internally consistent: every histogram well-formed, per-expert and
/// per-layer lists as long as the model says, and the figures the renderers scale by finite.
pub fn validate(data: &ReportData) -> Result<(), InvalidReport> {
    let s = &data.snapshot;
    let n_experts = s.model.n_experts;
    if n_experts == 0 && !s.model.moe_layers.is_empty() {
        return Err(invalid(
            "snapshot.model.n_experts",
            "0 experts but the model has MoE layers",
        ));
    }
    let h = &s.epoch.histograms;
    let base = "snapshot.epoch.histograms";
    histogram(&format!("{base}.token_latency_us"), &h.token_latency_us)?;
    histogram(&format!("{base}.forward_latency_us"), &h.forward_latency_us)?;
    histogram(&format!("{base}.token_moe_flops"), &h.token_moe_flops)?;
    for (i, l) in h.layer_time_us.iter().enumerate() {
        let at = format!("{base}.layer_time_us[{i}]");
        histogram(&format!("{at}.attention_us"), &l.attention_us)?;
        histogram(&format!("{at}.router_us"), &l.router_us)?;
        histogram(&format!("{at}.ffn_us"), &l.ffn_us)?;
    }
    routing("snapshot.epoch.window", &s.epoch.window, n_experts)?;
    routing("snapshot.epoch.cumulative", &s.epoch.cumulative, n_experts)?;
    if let Some(c) = &s.compare {
        compare("snapshot.compare", c, s.model.moe_layers.len(), n_experts)?;
    }
    if let Some(sw) = &data.sweep {
        if sw.n_experts == 0 {
            return Err(invalid(
                "sweep.n_experts",
                "a sweep needs at least one expert",
            ));
        }
        for (i, p) in sw.points.iter().enumerate() {
            let at = format!("sweep.points[{i}]");
            if p.layer_mean_experts_per_token.len() != sw.moe_layers.len() {
                return Err(invalid(
                    format!("{at}.layer_mean_experts_per_token"),
                    format!(
                        "{} values for {} MoE layers",
                        p.layer_mean_experts_per_token.len(),
                        sw.moe_layers.len()
                    ),
                ));
            }
            for (name, v) in [
                ("mean_experts_per_token", p.mean_experts_per_token),
                (
                    "moe_flops_fraction_of_all_experts",
                    p.moe_flops_fraction_of_all_experts,
                ),
                ("moe_saved_vs_top_k_pct", p.moe_saved_vs_top_k_pct),
                ("token_latency_p50_us", p.token_latency_p50_us),
                ("token_latency_p99_us", p.token_latency_p99_us),
                ("tokens_per_second", p.tokens_per_second),
            ] {
                finite(&format!("{at}.{name}"), v)?;
            }
        }
    }
    Ok(())
}

/// An A/B comparison: one entry per MoE layer and expert, histograms of the right length,
/// finite figures (the renderers scale the difference heatmap by them).
fn compare(
    at: &str,
    c: &crate::profiling::compare::CompareSnapshot,
    n_moe: usize,
    n_experts: usize,
) -> Result<(), InvalidReport> {
    use crate::profiling::compare::JACCARD_BINS;
    if c.layers.len() != n_moe {
        return Err(invalid(
            format!("{at}.layers"),
            format!("{} layers for {n_moe} MoE layers", c.layers.len()),
        ));
    }
    for (name, side) in [("a", &c.a), ("b", &c.b)] {
        if side.policies.len() != n_moe {
            return Err(invalid(
                format!("{at}.{name}.policies"),
                format!("{} policies for {n_moe} MoE layers", side.policies.len()),
            ));
        }
        for (f, v) in [
            ("mean_experts_per_token", side.mean_experts_per_token),
            ("moe_flops_per_token", side.moe_flops_per_token),
            ("pass_ms_mean", side.pass_ms_mean),
            ("pass_ms_p50", side.pass_ms_p50),
            ("pass_ms_p90", side.pass_ms_p90),
        ] {
            finite(&format!("{at}.{name}.{f}"), v)?;
        }
    }
    if c.jaccard_histogram.len() != JACCARD_BINS {
        return Err(invalid(
            format!("{at}.jaccard_histogram"),
            format!(
                "{} bins, expected {JACCARD_BINS}",
                c.jaccard_histogram.len()
            ),
        ));
    }
    for (name, v) in [
        ("jaccard_mean", c.jaccard_mean),
        ("delta_moe_flops_per_token", c.delta_moe_flops_per_token),
        ("delta_pass_ms_mean", c.delta_pass_ms_mean),
    ] {
        finite(&format!("{at}.{name}"), v)?;
    }
    for (i, l) in c.layers.iter().enumerate() {
        let lat = format!("{at}.layers[{i}]");
        for (name, v) in [("share_a", &l.share_a), ("share_b", &l.share_b)] {
            if v.len() != n_experts {
                return Err(invalid(
                    format!("{lat}.{name}"),
                    format!("{} values for {n_experts} experts", v.len()),
                ));
            }
            for (e, &x) in v.iter().enumerate() {
                if !(x.is_finite() && (0.0..=1.0).contains(&x)) {
                    return Err(invalid(
                        format!("{lat}.{name}[{e}]"),
                        format!("{x} is not a share in [0, 1]"),
                    ));
                }
            }
        }
        if l.jaccard_histogram.len() != JACCARD_BINS {
            return Err(invalid(
                format!("{lat}.jaccard_histogram"),
                format!(
                    "{} bins, expected {JACCARD_BINS}",
                    l.jaccard_histogram.len()
                ),
            ));
        }
    }
    Ok(())
}

/// Edges and counts agree, the edges ascend, the counts add up to `count`, figures are finite.
fn histogram(at: &str, h: &HistogramSnapshot) -> Result<(), InvalidReport> {
    for (name, v) in [
        ("min", h.min),
        ("mean", h.mean),
        ("p50", h.p50),
        ("p90", h.p90),
        ("p99", h.p99),
        ("max", h.max),
    ] {
        finite(&format!("{at}.{name}"), v)?;
    }
    if h.counts.is_empty() {
        if !h.edges.is_empty() {
            return Err(invalid(
                format!("{at}.edges"),
                format!("{} edges but no buckets", h.edges.len()),
            ));
        }
        if h.count > 0 {
            return Err(invalid(
                format!("{at}.counts"),
                format!("empty, but count says {} values were recorded", h.count),
            ));
        }
        return Ok(());
    }
    if h.edges.len() != h.counts.len() + 1 {
        return Err(invalid(
            format!("{at}.edges"),
            format!(
                "{} edges for {} buckets (expected {})",
                h.edges.len(),
                h.counts.len(),
                h.counts.len() + 1
            ),
        ));
    }
    if let Some(i) = h.edges.iter().position(|e| !e.is_finite()) {
        return Err(invalid(format!("{at}.edges[{i}]"), "not a finite number"));
    }
    if let Some(i) = h.edges.windows(2).position(|w| w[1] < w[0]) {
        return Err(invalid(
            format!("{at}.edges[{}]", i + 1),
            "edges must ascend",
        ));
    }
    let total: u128 = h.counts.iter().map(|&c| u128::from(c)).sum();
    if total != u128::from(h.count) {
        return Err(invalid(
            format!("{at}.counts"),
            format!("they add up to {total}, but count is {}", h.count),
        ));
    }
    Ok(())
}

fn routing(at: &str, r: &RoutingStats, n_experts: usize) -> Result<(), InvalidReport> {
    finite(
        &format!("{at}.mean_experts_per_token"),
        r.mean_experts_per_token,
    )?;
    for (i, l) in r.layers.iter().enumerate() {
        layer(&format!("{at}.layers[{i}]"), l, n_experts)?;
    }
    Ok(())
}

fn layer(at: &str, l: &LayerStatsSnapshot, n_experts: usize) -> Result<(), InvalidReport> {
    for (name, len) in [
        ("expert_token_share", l.expert_token_share.len()),
        ("expert_gate_mass", l.expert_gate_mass.len()),
    ] {
        if len != n_experts {
            return Err(invalid(
                format!("{at}.{name}"),
                format!("{len} values for {n_experts} experts"),
            ));
        }
    }
    if let Some(i) = l.expert_token_share.iter().position(|v| !v.is_finite()) {
        return Err(invalid(
            format!("{at}.expert_token_share[{i}]"),
            "not a finite number",
        ));
    }
    if let Some(&e) = l.unused_experts.iter().find(|&&e| e >= n_experts) {
        return Err(invalid(
            format!("{at}.unused_experts"),
            format!("expert {e} does not exist (the model has {n_experts})"),
        ));
    }
    for (name, v) in [
        ("mean_experts_per_token", l.mean_experts_per_token),
        ("mean_top1_prob", l.mean_top1_prob),
        (
            "moe_flops_fraction_of_all_experts",
            l.moe_flops_fraction_of_all_experts,
        ),
    ] {
        finite(&format!("{at}.{name}"), v)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profiling::fixtures::example_snapshot;
    use crate::profiling::snapshot::WorkloadKind;
    use crate::report::ReportFormat;

    fn report() -> ReportData {
        ReportData::new(example_snapshot(WorkloadKind::Eval, 8, false), None)
    }

    fn error_of(data: &ReportData) -> String {
        validate(data).unwrap_err().to_string()
    }

    #[test]
    fn a_real_report_is_valid() {
        validate(&report()).unwrap();
    }

    #[test]
    fn a_histogram_without_edges_is_refused() {
        let mut d = report();
        d.snapshot.epoch.histograms.token_latency_us.edges.clear();
        let n = d.snapshot.epoch.histograms.token_latency_us.counts.len();
        assert_eq!(
            error_of(&d),
            format!(
                "snapshot.epoch.histograms.token_latency_us.edges: 0 edges for {n} buckets (expected {})",
                n + 1
            )
        );
    }

    #[test]
    fn inconsistent_histograms_are_refused() {
        let mut d = report();
        d.snapshot
            .epoch
            .histograms
            .forward_latency_us
            .counts
            .clear();
        d.snapshot.epoch.histograms.forward_latency_us.edges.clear();
        assert!(
            error_of(&d).contains("forward_latency_us.counts: empty, but count says"),
            "{}",
            error_of(&d)
        );

        let mut d = report();
        d.snapshot.epoch.histograms.token_moe_flops.counts[0] += 1;
        assert!(error_of(&d).contains("token_moe_flops.counts: they add up to"));

        let mut d = report();
        let edges = &mut d.snapshot.epoch.histograms.token_latency_us.edges;
        edges.swap(0, 1);
        assert!(error_of(&d).contains("token_latency_us.edges[1]: edges must ascend"));

        let mut d = report();
        d.snapshot.epoch.histograms.layer_time_us[0].ffn_us.p99 = f64::NAN;
        assert!(error_of(&d).contains("layer_time_us[0].ffn_us.p99: NaN is not a finite number"));
    }

    #[test]
    fn per_expert_lists_must_match_the_model() {
        let mut d = report();
        d.snapshot.epoch.cumulative.layers[1]
            .expert_token_share
            .pop();
        assert_eq!(
            error_of(&d),
            "snapshot.epoch.cumulative.layers[1].expert_token_share: 7 values for 8 experts"
        );

        let mut d = report();
        d.snapshot.epoch.window.layers[0].unused_experts.push(8);
        assert!(error_of(&d).contains("expert 8 does not exist"));
    }

    #[test]
    fn every_format_renders_a_report_with_empty_histograms() {
        // A run that recorded nothing (zero tokens) has empty histograms: legitimate, and valid.
        let mut d = report();
        let h = &mut d.snapshot.epoch.histograms;
        h.token_latency_us = HistogramSnapshot::empty("us");
        h.forward_latency_us = HistogramSnapshot::empty("us");
        h.token_moe_flops = HistogramSnapshot::empty("FLOPs");
        for l in &mut h.layer_time_us {
            l.attention_us = HistogramSnapshot::empty("us");
            l.router_us = HistogramSnapshot::empty("us");
            l.ffn_us = HistogramSnapshot::empty("us");
        }
        validate(&d).unwrap();
        for f in ReportFormat::ALL {
            assert!(!f.render(&d).is_empty(), "{f}");
        }
        assert!(ReportFormat::Html.render(&d).contains("nothing recorded"));
        assert!(crate::report::text::render(&d.snapshot).contains("no samples"));
    }
}
