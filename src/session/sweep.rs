//! The threshold-sweep driver: the same tokens under each policy, with Dense as the quality reference.
//!
//! A batch driver beside the session: batches are cut exactly as the eval workload cuts them
//! ([`for_each_eval_window`]) and every figure goes through the same statistics code.
//!
//! For every batch the Dense pass runs first (it is the Dense point and the reference of every
//! other point), then each policy runs on the same tokens. Every per-point figure is built by a
//! [`RunStats`] of its own, exactly as a live session of that policy would build it, so a sweep
//! point and the TUI agree on what "experts per token" or "compute saved" mean.

use std::ops::ControlFlow;
use std::time::Instant;

use anyhow::{Result, bail};

use crate::model::forward::{Model, RoutingConfig};
use crate::model::trace::ForwardTrace;
use crate::profiling::snapshot::{
    DeviceBackend, DeviceSnapshot, LayerPolicy, PolicyState, ProcessCounters, Snapshot,
    WorkloadInfo, WorkloadKind,
};
use crate::profiling::stats::{
    BatchQuality, PassKind, ReferenceComparison, RunStats, SnapshotInputs, cross_entropy_nats,
    kl_nats,
};
use crate::routing::RoutingPolicy;
use crate::workload::for_each_eval_window;

use crate::profiling::sweep::{SweepPoint, SweepResult, policy_label};

/// Two thresholds closer than this are the same point.
const T_EPS: f64 = 1e-6;

/// Most points a range may expand to.
const MAX_POINTS: usize = 1000;

/// Parses thresholds: a range `start:end:step` (the end is included when the steps reach it
/// within rounding, so `0.5:1.0:0.05` gives 11 values) or a list `0.5,0.7,0.9`. Every value must
/// lie in (0, 1]. The result is sorted ascending without duplicates.
pub fn parse_thresholds(s: &str) -> Result<Vec<f32>> {
    let s = s.trim();
    if s.is_empty() {
        bail!(
            "no thresholds given: use start:end:step (e.g. 0.5:1.0:0.05) or a list (0.5,0.7,0.9)"
        );
    }
    let num = |x: &str| -> Result<f64> {
        x.trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| anyhow::anyhow!("`{}` is not a number (in thresholds `{s}`)", x.trim()))
    };
    let mut values: Vec<f64> = if s.contains(':') {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 3 {
            bail!("threshold range `{s}` must be start:end:step, e.g. 0.5:1.0:0.05");
        }
        let (start, end, step) = (num(parts[0])?, num(parts[1])?, num(parts[2])?);
        if step <= 0.0 {
            bail!("threshold step must be positive, found {step}");
        }
        if start > end {
            bail!("threshold range starts at {start}, after its end {end}");
        }
        // Relative slack so that 0.5 + 10 * 0.05 counts as reaching 1.0.
        let steps = ((end - start) / step + 1e-6).floor();
        if steps as usize + 1 > MAX_POINTS {
            bail!(
                "threshold range `{s}` has {} points, more than {MAX_POINTS}",
                steps as usize + 1
            );
        }
        (0..=steps as usize)
            .map(|i| {
                let v = start + i as f64 * step;
                // Snap to the end when within rounding, and drop float noise (0.15000000000000002).
                let v = if (v - end).abs() <= step * 1e-6 {
                    end
                } else {
                    v
                };
                (v * 1e9).round() / 1e9
            })
            .collect()
    } else {
        s.split(',').map(num).collect::<Result<_>>()?
    };
    for &t in &values {
        if !(t > 0.0 && t <= 1.0) {
            bail!("threshold {t} is outside (0, 1]: a threshold is a probability mass to reach");
        }
    }
    values.sort_by(|a, b| a.total_cmp(b));
    values.dedup_by(|a, b| (*a - *b).abs() < T_EPS);
    Ok(values.into_iter().map(|v| v as f32).collect())
}

/// Parses a list of k for top-k points (`1,2,4`); each must be in 1..=`n_experts`. Sorted, no duplicates.
pub fn parse_top_k(s: &str, n_experts: usize) -> Result<Vec<usize>> {
    let mut ks = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let k: usize = part
            .parse()
            .map_err(|_| anyhow::anyhow!("`{part}` is not a whole number (in top-k list `{s}`)"))?;
        if k == 0 || k > n_experts {
            bail!("top-k needs k in 1..={n_experts} (the model's experts per layer), found {k}");
        }
        ks.push(k);
    }
    if ks.is_empty() {
        bail!("empty top-k list: give values such as 1,2,4");
    }
    ks.sort_unstable();
    ks.dedup();
    Ok(ks)
}

/// Cuts `text` into eval batches for a byte model, as the eval workload does: each batch holds
/// `batch` windows of `seq_len + 1` bytes, read consecutively (stride `seq_len`) and wrapping to the
/// start of the text; enough batches to cover at least `tokens` input tokens (at least one).
/// Each returned vector is `batch * (seq_len + 1)` token ids, window after window.
pub fn text_batches(
    text: &[u8],
    batch: usize,
    seq_len: usize,
    tokens: usize,
) -> Result<Vec<Vec<u32>>> {
    let encoded = crate::workload::tokenizer::TextTokenizer::Byte.encode(text)?;
    Ok(token_batches(&encoded, batch, seq_len, tokens)?.0)
}

/// Cuts a tokenized text into eval batches (see [`text_batches`]), and returns with them the
/// bytes of the text each batch's targets cover (for bits per byte).
pub fn token_batches(
    encoded: &crate::workload::tokenizer::Encoded,
    batch: usize,
    seq_len: usize,
    tokens: usize,
) -> Result<(Vec<Vec<u32>>, Vec<u64>)> {
    if batch == 0 || seq_len == 0 {
        bail!("--batch and --seq-len must be at least 1");
    }
    let ids = &encoded.ids;
    if ids.len() < seq_len + 1 {
        bail!(
            "the text has {} tokens; a sequence of {seq_len} tokens needs at least {}",
            ids.len(),
            seq_len + 1
        );
    }
    let n_batches = tokens.div_ceil(batch * seq_len).max(1);
    let mut cursor = 0;
    let (mut out, mut covered) = (Vec::with_capacity(n_batches), Vec::with_capacity(n_batches));
    for _ in 0..n_batches {
        let mut b = Vec::with_capacity(batch * (seq_len + 1));
        let mut bytes = 0u64;
        for_each_eval_window(ids, batch, seq_len, &mut cursor, |start, w| {
            b.extend_from_slice(w);
            bytes += encoded.target_bytes(start, seq_len);
        });
        out.push(b);
        covered.push(bytes);
    }
    Ok((out, covered))
}

/// What to sweep and how to describe it.
#[derive(Clone, Debug)]
pub struct SweepSpec {
    /// Threshold points, each applied to every MoE layer.
    pub thresholds: Vec<f32>,
    /// Top-k points (k values).
    pub top_k: Vec<usize>,
    /// The quality reference every point is compared with (None: the model's native top-k when
    /// it has one, as a Hugging Face checkpoint does, else Dense).
    pub reference: Option<RoutingPolicy>,
    /// Bytes of the text the targets of each batch cover (None: one byte per token, a byte model).
    pub batch_bytes: Option<Vec<u64>>,
    /// Renormalise the weights of the threshold and top-k points (None: as the model's native
    /// rule does; the XMoE rule itself does not).
    pub renormalize: Option<bool>,
    /// k of the compute-matched top-k baseline for "compute saved vs top-k" (None: the model's).
    pub top_k_baseline: Option<usize>,
    /// Inference-time capacity factor for every point (None: the model's own setting).
    pub capacity_factor: Option<f32>,
    /// Where the tokens come from, for display (e.g. a file path).
    pub source: String,
    /// Bytes of that source.
    pub source_size: usize,
    /// Where the model runs, in words.
    pub device: String,
    /// Times each pass of each point runs (>= 1): timings are medians over the repeats.
    pub repeats: usize,
}

/// The median (the mean of the middle two for an even count).
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => s[n / 2],
        _ => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// A sweep and the full session snapshot of its default point (or its first point when the
/// default was not swept), ready to become a report.
#[derive(Clone, Debug)]
pub struct SweepRun {
    /// Per-point figures.
    pub result: SweepResult,
    /// Every statistic of the default point, as a live session of that policy would show it.
    pub snapshot: Snapshot,
}

fn policy_state(
    policy: RoutingPolicy,
    layers: &[usize],
    capacity: Option<f32>,
    reference: RoutingPolicy,
) -> PolicyState {
    PolicyState {
        layers: layers
            .iter()
            .map(|&layer| LayerPolicy { layer, policy })
            .collect(),
        capacity_factor: capacity,
        reference,
    }
}

struct PointRun {
    policy: RoutingPolicy,
    routing: RoutingConfig,
    stats: RunStats,
}

/// Runs the sweep: every batch of `batches` (each `batch` windows of `seq_len + 1` tokens, as
/// [`text_batches`] makes them) under Dense first, then under each threshold of `spec` (plus
/// the model's default policy when it is a threshold not in the list) and each top-k. Figures of
/// each point come from its own [`RunStats`]. `progress` is told `(done, total)` passes.
pub fn run_sweep(
    model: &Model,
    batches: &[Vec<u32>],
    batch: usize,
    spec: &SweepSpec,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SweepRun> {
    run_sweep_until(model, batches, batch, spec, &mut |done, total| {
        progress(done, total);
        ControlFlow::Continue(())
    })?
    .ok_or_else(|| anyhow::anyhow!("the sweep was stopped"))
}

/// [`run_sweep`], stopped early (returning `None`) when `progress` says
/// [`ControlFlow::Break`], e.g. on a terminating signal: a sweep with points missing is not a
/// sweep, so nothing partial is returned.
pub fn run_sweep_until(
    model: &Model,
    batches: &[Vec<u32>],
    batch: usize,
    spec: &SweepSpec,
    progress: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
) -> Result<Option<SweepRun>> {
    let started = Instant::now();
    let cfg = model.config();
    let moe_layers = model.moe_layers().to_vec();
    if moe_layers.is_empty() {
        bail!("the model has no MoE layers: there is no routing to sweep");
    }
    if batches.is_empty() {
        bail!("no tokens to sweep over");
    }
    if spec
        .batch_bytes
        .as_ref()
        .is_some_and(|v| v.len() != batches.len())
    {
        bail!("batch_bytes must give one byte count per batch");
    }
    if batch == 0 || !batches[0].len().is_multiple_of(batch) || batches[0].len() / batch < 2 {
        bail!("each batch must hold {batch} windows of at least 2 tokens");
    }
    let window = batches[0].len() / batch;
    if let Some(bad) = batches.iter().position(|b| b.len() != batch * window) {
        bail!(
            "batch {bad} holds {} tokens, not {}",
            batches[bad].len(),
            batch * window
        );
    }
    let seq_len = window - 1;
    let vocab = cfg.vocab_size;
    let top_k_baseline = spec
        .top_k_baseline
        .unwrap_or_else(|| cfg.top_k_baseline())
        .clamp(1, cfg.n_experts);
    let capacity = spec.capacity_factor.or(cfg.capacity_factor);
    for &t in &spec.thresholds {
        if !(t > 0.0 && t <= 1.0) {
            bail!("threshold {t} is outside (0, 1]");
        }
    }
    for &k in &spec.top_k {
        if k == 0 || k > cfg.n_experts {
            bail!("top-k needs k in 1..={}, found {k}", cfg.n_experts);
        }
    }

    // Points: thresholds (with the default threshold added), top-k, and Dense last.
    let default_policy = cfg.default_policy;
    let renormalize = spec.renormalize.unwrap_or(default_policy.renormalizes());
    let mut policies: Vec<RoutingPolicy> = spec
        .thresholds
        .iter()
        .map(|&t| RoutingPolicy::threshold(t).with_renormalize(renormalize))
        .collect();
    if matches!(default_policy, RoutingPolicy::Threshold { .. })
        && !policies.iter().any(|p| p.same_as(&default_policy))
    {
        policies.push(default_policy);
    }
    policies.sort_by(|a, b| match (a, b) {
        (RoutingPolicy::Threshold { t: x, .. }, RoutingPolicy::Threshold { t: y, .. }) => {
            x.total_cmp(y)
        }
        _ => std::cmp::Ordering::Equal,
    });
    policies.extend(
        spec.top_k
            .iter()
            .map(|&k| RoutingPolicy::TopK { k, renormalize }),
    );
    // A model whose own rule is a top-k (Hugging Face checkpoints) always gets that point.
    if matches!(default_policy, RoutingPolicy::TopK { .. })
        && !policies.iter().any(|p| p.same_as(&default_policy))
    {
        policies.push(default_policy);
    }
    // The reference runs first on every batch and is reported last; Dense is always a point.
    let reference_policy = spec
        .reference
        .unwrap_or(super::native_reference(default_policy));
    if reference_policy != RoutingPolicy::Dense {
        policies.push(RoutingPolicy::Dense);
    }
    policies.retain(|p| !p.same_as(&reference_policy));
    let n_moe = moe_layers.len();
    let make = |policy: RoutingPolicy| -> Result<PointRun> {
        Ok(PointRun {
            policy,
            routing: RoutingConfig::new(&vec![policy; n_moe], capacity, cfg.n_experts)?,
            stats: RunStats::new(
                cfg,
                top_k_baseline,
                u64::MAX,
                policy_state(policy, &moe_layers, capacity, reference_policy),
                0.0,
            ),
        })
    };
    let mut reference = make(reference_policy)?;
    let mut points: Vec<PointRun> = policies.into_iter().map(make).collect::<Result<_>>()?;

    let repeats = spec.repeats.max(1);
    let total = batches.len() * (points.len() + 1) * repeats;
    let mut done = 0;
    let mut trace = ForwardTrace::default();
    let mut inputs = Vec::with_capacity(batch * seq_len);
    let mut targets = Vec::with_capacity(batch * seq_len);
    let split = |tokens: &[u32], inputs: &mut Vec<u32>, targets: &mut Vec<u32>| {
        inputs.clear();
        targets.clear();
        for w in tokens.chunks_exact(window) {
            inputs.extend_from_slice(&w[..seq_len]);
            targets.extend_from_slice(&w[1..]);
        }
    };
    // One untimed, unrecorded pass first, so that start-up costs (allocations, thread pools)
    // do not land in the first point's latency.
    split(&batches[0], &mut inputs, &mut targets);
    model.forward(&inputs, batch, &reference.routing, None, &mut trace)?;
    // Forward nanoseconds of every run: [run][repeat] for this batch, and the total per repeat.
    // Run 0 is the reference, then the points in order.
    let n_runs = points.len() + 1;
    let mut batch_ns = vec![vec![0u64; repeats]; n_runs];
    let mut repeat_ns = vec![vec![0u64; repeats]; n_runs];
    for (b, tokens) in batches.iter().enumerate() {
        split(tokens, &mut inputs, &mut targets);
        let bytes = match &spec.batch_bytes {
            Some(v) => v[b],
            None => targets.len() as u64,
        };
        let quality = |nats: f64| BatchQuality {
            scored_tokens: targets.len() as u64,
            bytes,
            nats,
        };
        let mut ref_logits = Vec::new();
        let mut ref_q = quality(0.0);
        // Repeats go round all points, so that a slow moment of a shared machine lands on one
        // repeat of several points rather than on every repeat of one point.
        for r in 0..repeats {
            for run in 0..n_runs {
                let p = if run == 0 {
                    &mut reference
                } else {
                    &mut points[run - 1]
                };
                let t0 = Instant::now();
                let logits = model.forward(&inputs, batch, &p.routing, None, &mut trace)?;
                let ns = t0.elapsed().as_nanos() as u64;
                batch_ns[run][r] = ns;
                repeat_ns[run][r] += ns;
                // Quality and routing are the same in every repeat: taken from the first.
                if r == 0 {
                    let q = quality(cross_entropy_nats(&logits, vocab, &targets));
                    p.stats.record_quality(&q);
                    if run == 0 {
                        p.stats
                            .record_reference(&ReferenceComparison::with_itself(q));
                        ref_q = q;
                        ref_logits = logits;
                    } else {
                        p.stats.record_reference(&ReferenceComparison {
                            current: q,
                            reference: ref_q,
                            kl_nats: kl_nats(&ref_logits, &logits, vocab),
                            kl_tokens: q.scored_tokens,
                            reference_ns: batch_ns[0][0],
                        });
                    }
                }
                if r + 1 == repeats {
                    p.stats.record_pass(
                        &trace,
                        PassKind::Eval,
                        median(
                            &batch_ns[run]
                                .iter()
                                .map(|&ns| ns as f64)
                                .collect::<Vec<_>>(),
                        ) as u64,
                    );
                }
                done += 1;
                if progress(done, total).is_break() {
                    return Ok(None);
                }
            }
        }
    }
    let tokens_per_point = (batches.len() * batch * seq_len) as f64;
    let rates: Vec<Vec<f64>> = repeat_ns
        .iter()
        .map(|v| {
            v.iter()
                .map(|&ns| {
                    if ns == 0 {
                        0.0
                    } else {
                        tokens_per_point * 1e9 / ns as f64
                    }
                })
                .collect()
        })
        .collect();
    points.push(reference);
    // Same order as `points` now: the points, then the reference.
    let mut rates = rates;
    rates.rotate_left(1);

    let model_info = super::describe::model_info(cfg, spec.device.clone(), top_k_baseline);
    let workload = WorkloadInfo {
        kind: WorkloadKind::Eval,
        source: spec.source.clone(),
        source_size: spec.source_size,
        batch,
        seq_len,
        temperature: None,
        seed: 0,
        description: format!(
            "sweep: {} passes of {batch} x {seq_len} tokens over {}",
            batches.len(),
            spec.source
        ),
    };
    let device = DeviceSnapshot {
        backend: DeviceBackend::ProcessOnly,
        note: Some("device counters are not sampled during a sweep".to_string()),
        driver_version: None,
        gpus: Vec::new(),
        process: ProcessCounters {
            cpu_pct: None,
            rss_bytes: None,
            rss_file_bytes: None,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        },
        sample_period_s: 0.0,
        history: Vec::new(),
    };
    let elapsed_s = started.elapsed().as_secs_f64();
    let mut snapshots: Vec<Snapshot> = points
        .iter()
        .map(|p| {
            p.stats.snapshot(SnapshotInputs {
                sequence: 0,
                session_elapsed_s: elapsed_s,
                model: model_info.clone(),
                workload: workload.clone(),
                paused: false,
                device: device.clone(),
                generated: None,
                ended: Some("sweep finished".to_string()),
            })
        })
        .collect();
    let sweep_points: Vec<SweepPoint> = points
        .iter()
        .zip(&snapshots)
        .enumerate()
        .map(|(i, (p, s))| {
            let c = &s.epoch.cumulative;
            let q = &s.epoch.quality;
            let h = &s.epoch.histograms;
            let moe = c.flops.moe_per_token;
            SweepPoint {
                label: policy_label(&p.policy),
                policy: p.policy,
                is_default: p.policy.same_as(&default_policy),
                is_reference: p.policy.same_as(&reference_policy),
                tokens: s.epoch.tokens,
                mean_experts_per_token: c.mean_experts_per_token,
                layer_mean_experts_per_token: c.layer_mean_experts_per_token(),
                moe_flops_per_token: moe.actual,
                moe_flops_fraction_of_all_experts: if moe.all_experts > 0.0 {
                    moe.actual / moe.all_experts
                } else {
                    0.0
                },
                moe_saved_vs_all_experts_pct: c.flops.moe_saved_vs_all_experts_pct,
                moe_saved_vs_top_k_pct: c.flops.moe_saved_vs_top_k_pct,
                model_flops_per_token: c.flops.model_per_token.actual,
                model_saved_vs_top_k_pct: c.flops.model_saved_vs_top_k_pct,
                bits_per_byte: q.bits_per_byte,
                delta_bits_per_byte_vs_reference: q.delta_bits_per_byte,
                perplexity: q.perplexity,
                mean_kl_bits: q.mean_kl_bits,
                token_latency_p50_us: h.token_latency_us.p50,
                token_latency_p99_us: h.token_latency_us.p99,
                forward_latency_p50_us: h.forward_latency_us.p50,
                tokens_per_second: median(&rates[i]),
                tokens_per_second_repeats: rates[i].clone(),
            }
        })
        .collect();
    let chosen = sweep_points.iter().position(|p| p.is_default).unwrap_or(0);
    let snapshot = snapshots.swap_remove(chosen);
    let result = SweepResult {
        model: cfg.name.clone(),
        moe_layers,
        n_experts: cfg.n_experts,
        default_policy,
        reference_policy,
        top_k_baseline,
        capacity_factor: capacity,
        source: spec.source.clone(),
        batch,
        seq_len,
        batches: batches.len(),
        repeats,
        tokens_per_point: (batches.len() * batch * seq_len) as u64,
        device: spec.device.clone(),
        elapsed_s,
        points: sweep_points,
    };
    Ok(Some(SweepRun { result, snapshot }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_include_their_end() {
        let v = parse_thresholds("0.5:1.0:0.05").unwrap();
        assert_eq!(v.len(), 11);
        assert_eq!(v[0], 0.5);
        assert_eq!(*v.last().unwrap(), 1.0);
        assert!((v[1] - 0.55).abs() < 1e-7);
        assert_eq!(
            parse_thresholds("0.1:0.3:0.1").unwrap(),
            vec![0.1, 0.2, 0.3]
        );
        // A step that does not land on the end stops before it.
        assert_eq!(parse_thresholds("0.5:0.9:0.3").unwrap(), vec![0.5, 0.8]);
        assert_eq!(parse_thresholds("0.7:0.7:0.1").unwrap(), vec![0.7]);
    }

    #[test]
    fn lists_are_sorted_and_deduplicated() {
        assert_eq!(
            parse_thresholds(" 0.9, 0.5,0.7,0.9 ").unwrap(),
            vec![0.5, 0.7, 0.9]
        );
        assert_eq!(parse_thresholds("1").unwrap(), vec![1.0]);
    }

    #[test]
    fn bad_thresholds_are_explained() {
        for (s, needle) in [
            ("0:1:0.1", "outside (0, 1]"),
            ("0.5,1.2", "outside (0, 1]"),
            ("-0.5", "outside (0, 1]"),
            ("0.5:1.0:0", "step must be positive"),
            ("0.9:0.5:0.1", "after its end"),
            ("0.5:1.0", "start:end:step"),
            ("0.5,abc", "not a number"),
            ("nan", "not a number"),
            ("", "no thresholds"),
            ("0.000001:1:0.000001", "more than"),
        ] {
            let e = parse_thresholds(s).unwrap_err().to_string();
            assert!(e.contains(needle), "{s}: {e}");
        }
    }

    #[test]
    fn top_k_lists() {
        assert_eq!(parse_top_k("4,1,2,2", 8).unwrap(), vec![1, 2, 4]);
        assert!(
            parse_top_k("0", 8)
                .unwrap_err()
                .to_string()
                .contains("1..=8")
        );
        assert!(
            parse_top_k("9", 8)
                .unwrap_err()
                .to_string()
                .contains("1..=8")
        );
        assert!(parse_top_k("x", 8).is_err());
        assert!(parse_top_k("", 8).is_err());
    }

    #[test]
    fn text_batches_follow_the_eval_windows() {
        let text: Vec<u8> = (0u8..20).collect();
        let b = text_batches(&text, 2, 4, 10).unwrap();
        // 10 tokens at 8 per batch: 2 batches.
        assert_eq!(b.len(), 2);
        assert_eq!(b[0], vec![0, 1, 2, 3, 4, 4, 5, 6, 7, 8]);
        assert_eq!(b[1], vec![8, 9, 10, 11, 12, 12, 13, 14, 15, 16]);
        // Wraps to the start when the text runs out.
        let b = text_batches(&text, 1, 8, 40).unwrap();
        assert_eq!(b[2][0], 16 - 16);
        assert!(text_batches(&text[..4], 1, 4, 4).is_err());
    }
}
