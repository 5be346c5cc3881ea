//! The CSV report: ONE file whose first column, `table`, says what a row is (see
//! `docs/report-format.md`):
//!
//! - `expert`: one row per (MoE layer, expert) over the whole epoch: token share and gate mass;
//! - `layer`: one row per MoE layer: experts per token, FLOPs fraction, load balance, drops;
//! - `sweep`: one row per sweep point (only with a sweep);
//! - `sweep_layer`: one row per (sweep point, MoE layer): experts per token.
//!
//! Every row has every column ([`HEADER`]); a cell that does not apply to its table is empty.
//! Numbers are plain decimals (no units, no thousands separators); shares and fractions are 0..=1.

use std::fmt::Write;

use super::{ReportData, policy_label};

/// The header row, in order.
pub const HEADER: [&str; 25] = [
    "table",
    "layer",
    "moe_slot",
    "expert",
    "policy",
    "tokens",
    "token_share",
    "gate_mass",
    "mean_experts_per_token",
    "mean_kept_experts_per_token",
    "mean_top1_prob",
    "moe_flops_fraction_of_all_experts",
    "load_cv",
    "load_normalized_entropy",
    "load_max_over_mean",
    "unused_experts",
    "dropped_pairs",
    "bits_per_byte",
    "delta_bits_per_byte_vs_reference",
    "moe_saved_vs_top_k_pct",
    "token_latency_p50_us",
    "token_latency_p99_us",
    "tokens_per_second",
    "tokens_per_second_min",
    "tokens_per_second_max",
];

/// Quotes a field when it holds a comma, a quote or a line break (RFC 4180).
fn field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

struct Row([String; 25]);

impl Row {
    fn new(table: &str) -> Self {
        let mut r = Row(Default::default());
        r.0[0] = table.to_string();
        r
    }
    fn set(&mut self, col: &str, v: impl ToString) -> &mut Self {
        let i = HEADER
            .iter()
            .position(|&h| h == col)
            .expect("column exists");
        self.0[i] = v.to_string();
        self
    }
    fn opt(&mut self, col: &str, v: Option<f64>) -> &mut Self {
        if let Some(x) = v {
            self.set(col, x);
        }
        self
    }
    fn write(&self, out: &mut String) {
        let cells: Vec<String> = self.0.iter().map(|c| field(c)).collect();
        let _ = writeln!(out, "{}", cells.join(","));
    }
}

/// The report as CSV.
pub fn render(data: &ReportData) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{}", HEADER.join(","));
    let c = &data.snapshot.epoch.cumulative;
    for (slot, l) in c.layers.iter().enumerate() {
        let p = policy_label(&l.policy);
        for (e, (&share, &mass)) in l
            .expert_token_share
            .iter()
            .zip(&l.expert_gate_mass)
            .enumerate()
        {
            Row::new("expert")
                .set("layer", l.layer)
                .set("moe_slot", slot)
                .set("expert", e)
                .set("policy", &p)
                .set("tokens", c.tokens)
                .set("token_share", share)
                .set("gate_mass", mass)
                .write(&mut o);
        }
    }
    for (slot, l) in c.layers.iter().enumerate() {
        Row::new("layer")
            .set("layer", l.layer)
            .set("moe_slot", slot)
            .set("policy", policy_label(&l.policy))
            .set("tokens", c.tokens)
            .set("mean_experts_per_token", l.mean_experts_per_token)
            .set("mean_kept_experts_per_token", l.mean_kept_experts_per_token)
            .set("mean_top1_prob", l.mean_top1_prob)
            .set(
                "moe_flops_fraction_of_all_experts",
                l.moe_flops_fraction_of_all_experts,
            )
            .set("load_cv", l.load_balance.coefficient_of_variation)
            .set("load_normalized_entropy", l.load_balance.normalized_entropy)
            .set("load_max_over_mean", l.load_balance.max_over_mean)
            .set("unused_experts", l.unused_experts.len())
            .set("dropped_pairs", l.dropped_pairs)
            .write(&mut o);
    }
    if let Some(sw) = &data.sweep {
        for p in &sw.points {
            Row::new("sweep")
                .set("policy", &p.label)
                .set("tokens", p.tokens)
                .set("mean_experts_per_token", p.mean_experts_per_token)
                .set(
                    "moe_flops_fraction_of_all_experts",
                    p.moe_flops_fraction_of_all_experts,
                )
                .opt("bits_per_byte", p.bits_per_byte)
                .opt(
                    "delta_bits_per_byte_vs_reference",
                    p.delta_bits_per_byte_vs_reference,
                )
                .set("moe_saved_vs_top_k_pct", p.moe_saved_vs_top_k_pct)
                .set("token_latency_p50_us", p.token_latency_p50_us)
                .set("token_latency_p99_us", p.token_latency_p99_us)
                .set("tokens_per_second", p.tokens_per_second)
                .set("tokens_per_second_min", p.tokens_per_second_range().0)
                .set("tokens_per_second_max", p.tokens_per_second_range().1)
                .write(&mut o);
        }
        for p in &sw.points {
            for (slot, (&layer, &m)) in sw
                .moe_layers
                .iter()
                .zip(&p.layer_mean_experts_per_token)
                .enumerate()
            {
                Row::new("sweep_layer")
                    .set("layer", layer)
                    .set("moe_slot", slot)
                    .set("policy", &p.label)
                    .set("tokens", p.tokens)
                    .set("mean_experts_per_token", m)
                    .write(&mut o);
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::field;

    #[test]
    fn quoting() {
        assert_eq!(field("t=0.9"), "t=0.9");
        assert_eq!(field("L1: a, L3: b"), "\"L1: a, L3: b\"");
        assert_eq!(field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
