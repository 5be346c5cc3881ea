//! A snapshot as Prometheus metrics (text exposition format 0.0.4), for `--metrics-addr`: what a
//! long headless run is doing, scraped by the monitoring people already run.
//!
//! Window figures (tokens/s, experts per token, FLOPs saved) cover the same recent tokens as the
//! UI's panels; quality figures cover the current epoch. A figure that has no value yet (no
//! quality before the first eval batch) is left out rather than exported as 0.

use std::fmt::Write;

use crate::profiling::snapshot::Snapshot;
use crate::profiling::sweep::policy_label;

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, String)], value: f64) {
        let _ = write!(self.0, "{name}");
        if !labels.is_empty() {
            let parts: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = write!(self.0, "{{{}}}", parts.join(","));
        }
        let _ = writeln!(self.0, " {}", number(value));
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// A label value as the text format wants it: backslash, double quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// The metrics of `s`.
pub fn render(s: &Snapshot) -> String {
    let mut o = Out(String::new());
    let e = &s.epoch;
    let w = &e.window;
    let model = [("model", s.model.name.clone())];
    o.family(
        "xmoe_info",
        "gauge",
        "The model and the xmoe-top version; always 1.",
    );
    o.sample(
        "xmoe_info",
        &[
            ("model", s.model.name.clone()),
            ("version", s.xmoe_top_version.clone()),
            ("device", s.model.device.clone()),
        ],
        1.0,
    );
    o.family(
        "xmoe_tokens_total",
        "counter",
        "Tokens processed since the session started.",
    );
    o.sample("xmoe_tokens_total", &model, s.tokens_processed_total as f64);
    o.one(
        "xmoe_epoch",
        "gauge",
        "The statistics epoch (a new one starts at every policy change or reset).",
        e.id as f64,
    );
    o.one(
        "xmoe_paused",
        "gauge",
        "1 while the model is paused.",
        f64::from(u8::from(s.paused)),
    );
    o.one(
        "xmoe_tokens_per_second",
        "gauge",
        "Tokens per second over the statistics window.",
        e.tokens_per_second,
    );
    o.one(
        "xmoe_window_tokens",
        "gauge",
        "Tokens in the statistics window the window figures are computed over.",
        w.tokens as f64,
    );
    o.family(
        "xmoe_experts_per_token",
        "gauge",
        "Mean experts per token over the window, per MoE block (layer = block index).",
    );
    for l in &w.layers {
        o.sample(
            "xmoe_experts_per_token",
            &[("layer", l.layer.to_string())],
            l.mean_experts_per_token,
        );
    }
    o.one(
        "xmoe_experts_per_token_mean",
        "gauge",
        "Mean experts per token over the window, all MoE blocks.",
        w.mean_experts_per_token,
    );
    o.family(
        "xmoe_threshold",
        "gauge",
        "The threshold t of each MoE block under a threshold policy.",
    );
    for l in &s.policy.layers {
        if let crate::routing::RoutingPolicy::Threshold { t, .. } = l.policy {
            // The f32's shortest decimal (0.9), not its binary value widened (0.899999976...).
            let t = t.to_string().parse().unwrap_or(f64::from(t));
            o.sample("xmoe_threshold", &[("layer", l.layer.to_string())], t);
        }
    }
    o.family(
        "xmoe_policy_info",
        "gauge",
        "The routing policy of each MoE block, as a label; always 1.",
    );
    for l in &s.policy.layers {
        o.sample(
            "xmoe_policy_info",
            &[
                ("layer", l.layer.to_string()),
                ("policy", policy_label(&l.policy)),
            ],
            1.0,
        );
    }
    o.family(
        "xmoe_moe_flops_saved_ratio",
        "gauge",
        "MoE FLOPs saved over the window against a baseline, as a fraction (0.5 = half).",
    );
    o.sample(
        "xmoe_moe_flops_saved_ratio",
        &[("baseline", "all_experts".into())],
        w.flops.moe_saved_vs_all_experts_pct / 100.0,
    );
    o.sample(
        "xmoe_moe_flops_saved_ratio",
        &[("baseline", format!("top_{}", w.flops.top_k))],
        w.flops.moe_saved_vs_top_k_pct / 100.0,
    );
    o.family(
        "xmoe_token_latency_seconds",
        "gauge",
        "Per-token latency percentiles over the window.",
    );
    let lat = &e.histograms.token_latency_us;
    if lat.count > 0 {
        for (q, v) in [("0.5", lat.p50), ("0.9", lat.p90), ("0.99", lat.p99)] {
            o.sample(
                "xmoe_token_latency_seconds",
                &[("quantile", q.into())],
                v * 1e-6,
            );
        }
    }
    let q = &e.quality;
    o.one(
        "xmoe_quality_scored_tokens",
        "gauge",
        "Predictions the epoch's quality figures rest on.",
        q.scored_tokens as f64,
    );
    o.one(
        "xmoe_reference_batches",
        "gauge",
        "Batches re-run under the reference policy in this epoch (the sample of the delta).",
        q.reference_batches as f64,
    );
    if let Some(bpb) = q.bits_per_byte {
        o.one(
            "xmoe_bits_per_byte",
            "gauge",
            "Held-out bits per byte of the text under the current policy, this epoch.",
            bpb,
        );
    }
    if let Some(d) = q.delta_bits_per_byte {
        o.family(
            "xmoe_delta_bits_per_byte",
            "gauge",
            "Bits per byte of the current policy minus the reference's, on the same batches.",
        );
        o.sample(
            "xmoe_delta_bits_per_byte",
            &[("reference", policy_label(&q.reference_policy))],
            d,
        );
    }
    if let Some(kl) = q.mean_kl_bits {
        o.one(
            "xmoe_kl_bits",
            "gauge",
            "Mean KL divergence from the reference's next-token distribution, bits per token.",
            kl,
        );
    }
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_and_specials_spelled_out() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(0.25), "0.25");
    }
}
