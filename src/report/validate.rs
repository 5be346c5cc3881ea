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
    if let Some(sw) = &data.sweep {
        if sw.n_experts == 0 {
            return Err(invalid("sweep.n_experts", "a sweep needs at least one expert"));
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
        return Err(invalid(
            format!("{at}.edges[{i}]"),
            "not a finite number",
        ));
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
    finite(&format!("{at}.mean_experts_per_token"), r.mean_experts_per_token)?;
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
