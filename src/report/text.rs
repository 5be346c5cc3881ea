//! The headless summary: a [`Snapshot`] as plain text for a terminal or a log (what
//! `xmoe-top run --headless` prints at the end), one function per section.

use std::fmt::Write;

use crate::profiling::snapshot::{
    DeviceBackend, EpochSummary, HistogramSnapshot, LayerTimeHistograms, PolicyState, Snapshot,
    TokenOrigin, WorkloadKind,
};
use crate::profiling::sweep::{SweepResult, policy_label};
use crate::routing::RoutingPolicy;
use crate::units::{bytes, duration_us, fixed_or_dash, flops, params};

macro_rules! line {
    ($o:expr) => {
        $o.push('\n')
    };
    ($o:expr, $($arg:tt)*) => {
        writeln!($o, $($arg)*).expect("writing to a String")
    };
}

/// The summary printed at the end of `xmoe-top run --headless`.
pub fn render(s: &Snapshot) -> String {
    let mut o = String::new();
    header(&mut o, s);
    latency(&mut o, s);
    routing(&mut o, s);
    compute(&mut o, s);
    quality(&mut o, s);
    if let Some(c) = &s.compare {
        super::compare::text(&mut o, c);
    }
    device(&mut o, s);
    generated(&mut o, s);
    o
}

/// Model, workload, policy, epoch and throughput lines.
fn header(o: &mut String, s: &Snapshot) {
    let e = &s.epoch;
    let m = &s.model;
    line!(
        o,
        "xmoe-top: {} ({}, {} MoE layers x {} experts) on {}",
        crate::units::printable(&m.name),
        params(m.parameters),
        m.moe_layers.len(),
        m.n_experts,
        m.device
    );
    line!(
        o,
        "workload    {}",
        crate::units::printable(&s.workload.description)
    );
    line!(o, "policy      {}", format_policy_state(&s.policy));
    line!(
        o,
        "epoch       {} ({}): {} tokens in {} forward passes, {:.2} s running",
        e.id,
        e.reason,
        e.tokens,
        e.forward_passes,
        e.running_s
    );
    if let Some(why) = &s.ended {
        line!(o, "ended       {why}");
    } else if s.paused {
        line!(o, "state       PAUSED");
    }
    let prefill = if s.workload.kind == WorkloadKind::Generate {
        " incl. prompt prefill"
    } else {
        ""
    };
    let mut tput = format!(
        "throughput  {:.0} tokens/s over the epoch, {:.0} over the last {} tokens{prefill}",
        e.tokens_per_second_epoch, e.tokens_per_second, e.window.tokens
    );
    if let Some(d) = e.decode_tokens_per_second {
        write!(tput, "; decode only {d:.1} tokens/s").expect("string");
    }
    line!(o, "{tput}");
    line!(
        o,
        "            (tokens / wall time of the forward passes that ran them, statistics included, reference passes excluded)"
    );
    line!(o);
}

/// Per-token and per-pass latency percentiles, and the MoE blocks' mean split.
fn latency(o: &mut String, s: &Snapshot) {
    let e = &s.epoch;
    line!(
        o,
        "latency (epoch)    {:>10} {:>10} {:>10} {:>10} {:>10} {:>9}",
        "p50",
        "p90",
        "p99",
        "max",
        "mean",
        "samples"
    );
    latency_row(o, "per token", &e.histograms.token_latency_us);
    latency_row(o, "per forward pass", &e.histograms.forward_latency_us);
    let moe_time = |f: &dyn Fn(&LayerTimeHistograms) -> f64| -> f64 {
        e.histograms
            .layer_time_us
            .iter()
            .filter(|l| l.is_moe)
            .map(f)
            .sum()
    };
    let (attn, router, experts) = (
        moe_time(&|l| l.attention_us.mean),
        moe_time(&|l| l.router_us.mean),
        moe_time(&|l| l.ffn_us.mean),
    );
    if e.histograms.forward_latency_us.count > 0 {
        line!(
            o,
            "  MoE blocks per pass (mean): attention {}, router {}, experts {}",
            duration_us(attn),
            duration_us(router),
            duration_us(experts)
        );
    }
    line!(o);
}

/// Per-layer routing figures and experts-per-token distributions.
fn routing(o: &mut String, s: &Snapshot) {
    let e = &s.epoch;
    let m = &s.model;
    let c = &e.cumulative;
    line!(
        o,
        "routing (epoch)  {:>7} {:>11} {:>8} {:>7} {:>6} {:>8} {:>9} {:>8} {:>10}",
        "policy",
        "experts/tok",
        "top-1 p",
        "unused",
        "CV",
        "entropy",
        "max/mean",
        "dropped",
        "FLOPs/all"
    );
    for l in &c.layers {
        line!(
            o,
            "  layer {:<8} {:>7} {:>11.2} {:>8.3} {:>7} {:>6.2} {:>8.3} {:>9.2} {:>8} {:>9.1}%",
            l.layer,
            format_policy(&l.policy),
            l.mean_experts_per_token,
            l.mean_top1_prob,
            format!("{}/{}", l.unused_experts.len(), m.n_experts),
            l.load_balance.coefficient_of_variation,
            l.load_balance.normalized_entropy,
            l.load_balance.max_over_mean,
            l.dropped_pairs,
            100.0 * l.moe_flops_fraction_of_all_experts
        );
    }
    line!(
        o,
        "  all MoE layers  {:>19.2} experts per token",
        c.mean_experts_per_token
    );
    for l in &c.layers {
        let total: u64 = l.experts_per_token_counts.iter().sum();
        if total == 0 {
            continue;
        }
        let shown = l.experts_per_token_counts.len().min(8);
        let mut parts: Vec<String> = l.experts_per_token_counts[..shown]
            .iter()
            .enumerate()
            .map(|(i, &n)| format!("{}:{:.0}%", i + 1, 100.0 * n as f64 / total as f64))
            .collect();
        let rest: u64 = l.experts_per_token_counts[shown..].iter().sum();
        if rest > 0 || l.experts_per_token_counts.len() > shown {
            parts.push(format!(
                ">{}:{:.0}%",
                shown,
                100.0 * rest as f64 / total as f64
            ));
        }
        line!(
            o,
            "  layer {} experts/token distribution  {}",
            l.layer,
            parts.join(" ")
        );
    }
    line!(o);
}

/// FLOPs per token against the all-experts and top-k baselines.
fn compute(o: &mut String, s: &Snapshot) {
    let e = &s.epoch;
    let c = &e.cumulative;
    let f = &c.flops;
    line!(
        o,
        "compute per token (epoch) {:>12} {:>14} {:>14}",
        "actual",
        "all experts",
        s.model.top_k_name(f.top_k)
    );
    line!(
        o,
        "  MoE layers              {:>12} {:>14} {:>14}",
        flops(f.moe_per_token.actual),
        flops(f.moe_per_token.all_experts),
        flops(f.moe_per_token.top_k)
    );
    line!(
        o,
        "  whole model             {:>12} {:>14} {:>14}",
        flops(f.model_per_token.actual),
        flops(f.model_per_token.all_experts),
        flops(f.model_per_token.top_k)
    );
    line!(
        o,
        "  compute saved: MoE layers {:.1}% vs all experts, {:.1}% vs {}; whole model {:.1}% vs all experts, {:.1}% vs {}{}",
        f.moe_saved_vs_all_experts_pct,
        f.moe_saved_vs_top_k_pct,
        s.model.top_k_name(f.top_k),
        f.model_saved_vs_all_experts_pct,
        f.model_saved_vs_top_k_pct,
        s.model.top_k_name(f.top_k),
        if f.moe_saved_vs_top_k_pct < 0.0 {
            " (negative: more compute than the baseline)"
        } else {
            ""
        }
    );
    if s.model.shared_experts > 0 {
        line!(
            o,
            "  shared experts ({} per MoE layer, every token): {} per token, in the whole model under every policy",
            s.model.shared_experts,
            flops(s.model.shared_expert_flops)
        );
    }
    let h = &e.histograms.token_moe_flops;
    if h.count > 0 {
        line!(
            o,
            "  MoE FLOPs per token: p50 {}, p90 {}, p99 {}, max {}",
            flops(h.p50),
            flops(h.p90),
            flops(h.p99),
            flops(h.max)
        );
    }
    line!(o);
}

/// Bits per byte, the reference comparison, and the previous epoch.
fn quality(o: &mut String, s: &Snapshot) {
    let e = &s.epoch;
    let q = &e.quality;
    match q.bits_per_byte {
        Some(bpb) => {
            line!(
                o,
                "quality     {bpb:.4} bits per byte (perplexity {} per token) over {} predictions",
                q.perplexity.map_or("-".to_string(), |p| if p < 1e4 {
                    format!("{p:.3}")
                } else {
                    format!("{p:.3e}")
                }),
                q.scored_tokens
            );
            match (q.reference_bits_per_byte, q.delta_bits_per_byte) {
                (Some(r), Some(d)) => line!(
                    o,
                    "            reference ({}) on {} batches: {r:.4} bits/byte; current on the same batches {:.4} (difference {d:+.4}{}); mean KL {} bits/token; reference cost {} ({:.1}% of forward time, not in latency)",
                    format_policy(&q.reference_policy),
                    q.reference_batches,
                    q.compared_bits_per_byte.unwrap_or(f64::NAN),
                    q.delta_bits_per_byte_stderr
                        .map_or(String::new(), |se| format!(" ± {se:.4} standard error")),
                    fixed_or_dash(q.mean_kl_bits, 5),
                    duration_us(q.reference_time_s * 1e6),
                    100.0 * q.reference_time_fraction
                ),
                _ => line!(
                    o,
                    "            no reference ({}) pass yet",
                    format_policy(&q.reference_policy)
                ),
            }
        }
        None => line!(
            o,
            "quality     not measured (the generate workload has no reference text)"
        ),
    }
    if let Some(p) = &s.previous_epoch {
        line!(o, "{}", previous_line(p));
    }
}

/// GPU or process counters.
fn device(o: &mut String, s: &Snapshot) {
    let d = &s.device;
    let mut dev = String::from("device      ");
    match d.backend {
        DeviceBackend::Nvml => {
            for g in &d.gpus {
                write!(
                    dev,
                    "GPU {} {}: {}% busy, {} / {}, {}, {}, {}; ",
                    g.index,
                    g.name,
                    g.utilization_pct.map_or("-".into(), |u| u.to_string()),
                    g.memory_used_bytes.map_or("-".into(), bytes),
                    g.memory_total_bytes.map_or("-".into(), bytes),
                    g.power_watts.map_or("- W".into(), |w| format!("{w:.0} W")),
                    g.temperature_c.map_or("- C".into(), |t| format!("{t} C")),
                    g.sm_clock_mhz
                        .map_or("- MHz".into(), |c| format!("{c} MHz")),
                )
                .expect("string");
            }
        }
        DeviceBackend::ProcessOnly => {
            if let Some(n) = &d.note {
                write!(dev, "{n}; ").expect("string");
            }
        }
    }
    write!(
        dev,
        "process CPU {}, memory {}",
        d.process
            .cpu_pct
            .map_or("-".into(), |c| format!("{c:.0}% of one core")),
        match (d.process.rss_bytes, d.process.rss_file_bytes) {
            (Some(r), Some(f)) if f >= 64 << 20 =>
                format!("{} ({} mapped files)", bytes(r), bytes(f)),
            (r, _) => r.map_or("-".into(), bytes),
        }
    )
    .expect("string");
    line!(o, "{dev}");
}

/// The last generated sequence (generate workload only).
fn generated(o: &mut String, s: &Snapshot) {
    if let Some(g) = &s.generated
        && let Some(last) = g.tokens.last()
    {
        let seq: Vec<_> = g
            .tokens
            .iter()
            .filter(|t| t.sequence == last.sequence)
            .collect();
        let prompt: Vec<u8> = seq
            .iter()
            .filter(|t| t.origin == TokenOrigin::Prompt)
            .flat_map(|t| t.bytes.iter().copied())
            .collect();
        let generated: Vec<u8> = seq
            .iter()
            .filter(|t| t.origin == TokenOrigin::Generated)
            .flat_map(|t| t.bytes.iter().copied())
            .collect();
        let mean = |o: TokenOrigin| {
            let v: Vec<f32> = seq
                .iter()
                .filter(|t| t.origin == o)
                .map(|t| t.mean_experts)
                .collect();
            if v.is_empty() {
                0.0
            } else {
                v.iter().sum::<f32>() / v.len() as f32
            }
        };
        line!(o);
        line!(
            o,
            "last sequence  prompt \"{}\" ({:.2} experts/token)",
            printable(&prompt),
            mean(TokenOrigin::Prompt)
        );
        line!(
            o,
            "               generated \"{}\" ({:.2} experts/token)",
            printable(&generated),
            mean(TokenOrigin::Generated)
        );
    }
}

/// A policy in a few characters ("t=0.90", "top-2", "dense").
pub fn format_policy(p: &RoutingPolicy) -> String {
    let renorm = if p.renormalizes() { " renorm" } else { "" };
    match p {
        RoutingPolicy::Threshold { t, .. } => format!("t={t:.2}{renorm}"),
        RoutingPolicy::TopK { k, .. } => format!("top-{k}{renorm}"),
        RoutingPolicy::Dense => "dense".to_string(),
    }
}

/// The routing settings in one line.
pub fn format_policy_state(p: &PolicyState) -> String {
    let mut s = match p.layers.first() {
        None => "no MoE layers".to_string(),
        Some(first) if p.layers.iter().all(|l| l.policy == first.policy) => format!(
            "{} on all {} MoE layers",
            format_policy(&first.policy),
            p.layers.len()
        ),
        Some(_) => p
            .layers
            .iter()
            .map(|l| format!("layer {} {}", l.layer, format_policy(&l.policy)))
            .collect::<Vec<_>>()
            .join(", "),
    };
    match p.capacity_factor {
        Some(c) => write!(s, "; capacity factor {c:.2}").expect("string"),
        None => s.push_str("; no capacity limit"),
    }
    s
}

fn latency_row(out: &mut String, name: &str, h: &HistogramSnapshot) {
    if h.count == 0 {
        writeln!(out, "  {name:<18} no samples").expect("string");
        return;
    }
    writeln!(
        out,
        "  {name:<18} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9}",
        duration_us(h.p50),
        duration_us(h.p90),
        duration_us(h.p99),
        duration_us(h.max),
        duration_us(h.mean),
        h.count
    )
    .expect("string");
}

fn previous_line(p: &EpochSummary) -> String {
    format!(
        "previous epoch {} ({}): {}; {:.2} experts/token; MoE compute saved {:.1}% vs all experts, {:.1}% vs top-{}; {:.0} tokens/s; p50 {} per token; bits/byte {}",
        p.id,
        p.reason,
        format_policy_state(&p.policy),
        p.mean_experts_per_token,
        p.flops.moe_saved_vs_all_experts_pct,
        p.flops.moe_saved_vs_top_k_pct,
        p.flops.top_k,
        p.tokens_per_second,
        duration_us(p.token_latency_p50_us),
        fixed_or_dash(p.bits_per_byte, 3),
    )
}

/// Printable form of generated bytes: control characters escaped, newlines as `\n`.
fn printable(bytes: &[u8]) -> String {
    crate::units::printable(&String::from_utf8_lossy(bytes))
}

/// A sweep as a plain-text table (what `xmoe-top sweep` prints).
pub fn sweep_table(r: &SweepResult) -> String {
    let mut s = format!(
        "{} | {} tokens per point ({} x {} x {}) | {} | {} | top-k baseline k={} | quality reference {}\n",
        r.model,
        r.tokens_per_point,
        r.batches,
        r.batch,
        r.seq_len,
        r.device,
        repeats_note(r.repeats),
        r.top_k_baseline,
        policy_label(&r.reference_policy)
    );
    let w = (r.points.iter())
        .map(|p| p.label.chars().count() + if p.is_default { 2 } else { 0 })
        .max()
        .unwrap_or(0)
        .max(12);
    s.push_str(&format!(
        "{:<w$} {:>9} {:>9} {:>10} {:>9} {:>10} {:>10} {:>10} {:>22}  {}\n",
        "policy",
        "exp/tok",
        "MoE FLOPs",
        "saved/topk",
        "bits/B",
        "d vs ref",
        "p50 us/tok",
        "p99 us/tok",
        if r.repeats > 1 {
            "tok/s (min-max)"
        } else {
            "tok/s"
        },
        "experts/token per layer"
    ));
    for p in &r.points {
        let mark = if p.is_default { " *" } else { "" };
        let layers: Vec<String> = p
            .layer_mean_experts_per_token
            .iter()
            .map(|v| format!("{v:.2}"))
            .collect();
        s.push_str(&format!(
            "{:<w$} {:>9.2} {:>8.1}% {:>9.1}% {:>9} {:>10} {:>10.1} {:>10.1} {:>22}  {}\n",
            format!("{}{mark}", p.label),
            p.mean_experts_per_token,
            100.0 * p.moe_flops_fraction_of_all_experts,
            p.moe_saved_vs_top_k_pct,
            fixed_or_dash(p.bits_per_byte, 4),
            fixed_or_dash(p.delta_bits_per_byte_vs_reference, 4),
            p.token_latency_p50_us,
            p.token_latency_p99_us,
            rate_with_spread(p),
            layers.join(" ")
        ));
    }
    s.push_str("* the model's default policy\n");
    s
}

/// How the sweep's timings were taken, for its header.
pub(crate) fn repeats_note(repeats: usize) -> String {
    if repeats > 1 {
        format!("timings: median of {repeats} repeats")
    } else {
        "timings: one run per pass".to_string()
    }
}

/// A point's tokens/s with the slowest and fastest repeat when there were several.
pub(crate) fn rate_with_spread(p: &crate::profiling::sweep::SweepPoint) -> String {
    if p.tokens_per_second_repeats.len() > 1 {
        let (lo, hi) = p.tokens_per_second_range();
        format!("{:.0} ({lo:.0}-{hi:.0})", p.tokens_per_second)
    } else {
        format!("{:.0}", p.tokens_per_second)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profiling::fixtures::example_snapshot;
    use crate::profiling::snapshot::WorkloadKind;

    #[test]
    fn eval_summary_shows_every_headline_figure() {
        let s = example_snapshot(WorkloadKind::Eval, 16, false);
        let text = render(&s);
        let e = &s.epoch;
        let f = &e.cumulative.flops;
        for needle in [
            "example-xmoe (1.23 M parameters, 3 MoE layers x 16 experts) on CPU, 8 threads",
            "t=0.70 on all 3 MoE layers; no capacity limit",
            "epoch       1 (threshold of all layers set to 0.70)",
            &format!("{:.0} tokens/s over the epoch", e.tokens_per_second_epoch),
            &duration_us(e.histograms.token_latency_us.p99),
            &format!(
                "MoE layers {:.1}% vs all experts, {:.1}% vs top-4",
                f.moe_saved_vs_all_experts_pct, f.moe_saved_vs_top_k_pct
            ),
            &format!("{:.4} bits per byte", e.quality.bits_per_byte.unwrap()),
            &format!("difference {:+.4}", e.quality.delta_bits_per_byte.unwrap()),
            "previous epoch 0 (start): t=0.90 on all 3 MoE layers",
            "no NVIDIA driver found",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        for l in &e.cumulative.layers {
            assert!(text.contains(&format!("  layer {:<8}", l.layer)), "{text}");
            assert!(text.contains(&format!("{:.2}", l.mean_experts_per_token)));
        }
    }

    #[test]
    fn generate_summary_shows_decoding_and_text() {
        let s = example_snapshot(WorkloadKind::Generate, 16, true);
        let text = render(&s);
        assert!(text.contains("incl. prompt prefill; decode only"), "{text}");
        assert!(
            text.contains("prompt \"The experts of a small model \""),
            "{text}"
        );
        assert!(text.contains("generated \"routing is adaptive"), "{text}");
        assert!(text.contains("quality     not measured"), "{text}");
        assert!(
            text.contains("GPU 0 NVIDIA Example GPU: 61% busy"),
            "{text}"
        );
    }

    #[test]
    fn generated_text_comes_from_the_tokens_bytes_not_their_ids() {
        // A BPE tokenizer: ids are not bytes, and one token can stand for several.
        let mut s = example_snapshot(WorkloadKind::Generate, 16, false);
        let g = s.generated.as_mut().unwrap();
        let last = g.tokens.last().unwrap().sequence;
        let mut first_generated = true;
        for t in g.tokens.iter_mut().filter(|t| t.sequence == last) {
            t.token += 1000;
            if t.origin == TokenOrigin::Generated && first_generated {
                t.bytes = b"<two words>".to_vec();
                first_generated = false;
            }
        }
        let text = render(&s);
        assert!(
            text.contains("prompt \"The experts of a small model \""),
            "{text}"
        );
        assert!(text.contains("generated \"<two words>"), "{text}");
    }

    #[test]
    fn escapes_generated_bytes_and_prints_large_perplexities_in_scientific_notation() {
        assert_eq!(printable(b"a\nb\x01"), "a\\nb\\x01");
        let mut s = example_snapshot(WorkloadKind::Eval, 8, false);
        s.epoch.quality.perplexity = Some(59_217_959.8);
        assert!(render(&s).contains("perplexity 5.922e7 per token"));
    }
}
