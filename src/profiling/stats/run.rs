//! Run totals: [`RunStats`] records every pass into the epoch's sums, the sliding window and the
//! histograms, and builds [`Snapshot`]s from them.

use std::collections::VecDeque;

use crate::model::config::ModelConfig;
use crate::model::trace::ForwardTrace;
use crate::profiling::flops::FlopModel;
use crate::profiling::snapshot::{
    DeviceSnapshot, EpochStats, EpochSummary, GeneratedText, Histograms, LayerTimeHistograms,
    ModelInfo, PolicyState, QualityStats, SNAPSHOT_SCHEMA_VERSION, Snapshot, WorkloadInfo,
};

use super::histograms::{EpochHistograms, quantile_us};
use super::history::{Figures, History, Totals};
use super::layers::{LayerPassRecord, PassRecord, RoutingAggregate, ratio};
use super::quality::{BatchQuality, QualityAccum, ReferenceComparison};

/// What a forward pass was for; decides which statistics it enters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassKind {
    /// A teacher-forced eval batch: every statistic.
    Eval,
    /// Generate: the prompt pass. Routing, FLOPs and throughput; not the latency histograms.
    Prefill,
    /// Generate: one decode step. Every statistic; its tokens count as decoded tokens.
    Decode,
}

/// What the session supplies for a snapshot besides the statistics.
#[derive(Clone, Debug)]
pub struct SnapshotInputs {
    /// Snapshot counter.
    pub sequence: u64,
    /// Seconds since the session started.
    pub session_elapsed_s: f64,
    /// The model.
    pub model: ModelInfo,
    /// The workload.
    pub workload: WorkloadInfo,
    /// The model thread is paused.
    pub paused: bool,
    /// Why the session ended, once it has.
    pub ended: Option<String>,
    /// Latest device counters.
    pub device: DeviceSnapshot,
    /// Generate stream, if any.
    pub generated: Option<GeneratedText>,
}

/// Statistics of a session: the current epoch (window and cumulative), the previous epoch's summary.
#[derive(Debug)]
pub struct RunStats {
    flops: FlopModel,
    n_layers: usize,
    n_experts: usize,
    window_target: u64,
    tokens_total: u64,
    epoch_id: u64,
    epoch_reason: String,
    epoch_started_at_s: f64,
    policy: PolicyState,
    window: RoutingAggregate,
    ring: VecDeque<PassRecord>,
    pool: Vec<PassRecord>,
    cumulative: RoutingAggregate,
    hist: EpochHistograms,
    quality: QualityAccum,
    previous: Option<EpochSummary>,
    token_flops: Vec<u64>,
    /// Wall time of every recorded pass since creation, all epochs (the history's throughput).
    wall_ns_total: u64,
    history: History,
}

impl RunStats {
    /// Statistics for a model of configuration `cfg`, the top-k baseline `top_k`, a window of
    /// `window_tokens` tokens, starting epoch 0 under `policy` at session time `now_s`.
    pub fn new(
        cfg: &ModelConfig,
        top_k: usize,
        window_tokens: u64,
        policy: PolicyState,
        now_s: f64,
    ) -> Self {
        let flops = FlopModel::new(cfg).with_top_k(top_k.clamp(1, cfg.n_experts));
        let n_moe = flops.moe_layers().len();
        Self {
            n_layers: cfg.n_layers,
            n_experts: cfg.n_experts,
            window_target: window_tokens.max(1),
            tokens_total: 0,
            epoch_id: 0,
            epoch_reason: "start".to_string(),
            epoch_started_at_s: now_s,
            policy,
            window: RoutingAggregate::new(n_moe, cfg.n_experts),
            ring: VecDeque::new(),
            pool: Vec::new(),
            cumulative: RoutingAggregate::new(n_moe, cfg.n_experts),
            hist: EpochHistograms::new(cfg.n_layers),
            quality: QualityAccum::default(),
            previous: None,
            token_flops: Vec::new(),
            wall_ns_total: 0,
            history: History::default(),
            flops,
        }
    }

    /// The FLOP model in use.
    pub fn flop_model(&self) -> &FlopModel {
        &self.flops
    }

    /// Current epoch number.
    pub fn epoch_id(&self) -> u64 {
        self.epoch_id
    }

    /// Settings of the current epoch.
    pub fn policy(&self) -> &PolicyState {
        &self.policy
    }

    /// Sums over the window.
    pub fn window(&self) -> &RoutingAggregate {
        &self.window
    }

    /// Sums over the current epoch.
    pub fn cumulative(&self) -> &RoutingAggregate {
        &self.cumulative
    }

    /// Summary of the previous epoch, if any.
    pub fn previous_epoch(&self) -> Option<&EpochSummary> {
        self.previous.as_ref()
    }

    /// Tokens recorded since creation, all epochs.
    pub fn tokens_total(&self) -> u64 {
        self.tokens_total
    }

    /// Records one forward pass. `wall_ns` is the wall time attributed to it (forward plus the
    /// session's own work since the previous pass; used for tokens per second), latency
    /// histograms use `trace.total_ns`.
    pub fn record_pass(&mut self, trace: &ForwardTrace, kind: PassKind, wall_ns: u64) {
        let tokens = trace.tokens();
        if tokens == 0 {
            return;
        }
        let mut rec = self.pool.pop().unwrap_or_default();
        rec.tokens = tokens as u64;
        rec.wall_ns = wall_ns;
        let decode = kind == PassKind::Decode;
        rec.decode_tokens = if decode { tokens as u64 } else { 0 };
        rec.decode_wall_ns = if decode { wall_ns } else { 0 };
        rec.non_moe_flops = (0..tokens)
            .map(|i| self.flops.non_moe(trace.context_of(i)))
            .sum();
        let n_moe = self.flops.moe_layers().len();
        rec.layers.resize_with(n_moe, LayerPassRecord::default);
        self.token_flops.clear();
        self.token_flops.resize(tokens, 0);
        for (slot, lr) in rec.layers.iter_mut().enumerate() {
            match trace.moe.get(slot) {
                Some(m) if m.routing.tokens() == tokens => {
                    lr.fill(&m.routing);
                    for (f, &k) in self.token_flops.iter_mut().zip(&lr.kept) {
                        *f += self.flops.moe_layer(k as usize);
                    }
                }
                _ => *lr = LayerPassRecord::default(),
            }
        }
        self.cumulative.apply(&rec, true);
        self.window.apply(&rec, true);
        self.tokens_total += rec.tokens;
        self.wall_ns_total += rec.wall_ns;
        self.ring.push_back(rec);
        while let Some(front) = self.ring.front() {
            if self.window.tokens - front.tokens < self.window_target {
                break;
            }
            let old = self.ring.pop_front().expect("front exists");
            self.window.apply(&old, false);
            self.pool.push(old);
        }

        for &f in &self.token_flops {
            self.hist.token_moe_flops.record_n(f, 1);
        }
        if kind != PassKind::Prefill {
            self.hist.forward_latency_ns.record_n(trace.total_ns, 1);
            let per_token = trace.total_ns / tokens as u64;
            self.hist
                .token_latency_ns
                .record_n(per_token, tokens as u64);
            for (b, t) in trace.blocks.iter().enumerate().take(self.n_layers) {
                let h = &mut self.hist.layer_ns[b];
                h[0].record_n(t.attention_ns, 1);
                h[2].record_n(t.ffn_ns, 1);
                if self.flops.moe_layers().contains(&b) {
                    h[1].record_n(t.router_ns, 1);
                }
            }
        }
    }

    /// Takes a history point at session time `now_s` if one is due (one per second; see
    /// [`History::sample`]). The history is not part of any epoch: resets keep it.
    pub fn sample_history(&mut self, now_s: f64) {
        let empty = self.window.tokens == 0;
        let w = (!empty).then(|| self.window.snapshot(&self.policy, &self.flops));
        let q = self.quality_stats();
        let figures = Figures {
            epoch: self.epoch_id,
            experts_per_token: w.as_ref().map(|w| w.mean_experts_per_token),
            moe_saved_pct: w.as_ref().map(|w| w.flops.moe_saved_vs_all_experts_pct),
            delta_bits_per_byte: q.delta_bits_per_byte,
            delta_stderr: q.delta_bits_per_byte_stderr,
            compared_batches: q.reference_batches,
        };
        let totals = Totals {
            tokens: self.tokens_total,
            wall_ns: self.wall_ns_total,
        };
        self.history.sample(now_s, totals, figures);
    }

    /// Adds the cross-entropy of a batch run under the current policy.
    pub fn record_quality(&mut self, q: &BatchQuality) {
        self.quality.current.add(q);
    }

    /// Adds a batch also run under the reference policy (its cost stays out of the latency figures).
    pub fn record_reference(&mut self, c: &ReferenceComparison) {
        let q = &mut self.quality;
        q.compared_current.add(&c.current);
        q.compared_reference.add(&c.reference);
        q.kl_nats += c.kl_nats;
        q.kl_tokens += c.kl_tokens;
        q.reference_batches += 1;
        q.reference_ns += c.reference_ns;
        q.delta_sums.add(
            (c.current.nats - c.reference.nats) / std::f64::consts::LN_2,
            c.current.bytes as f64,
        );
    }

    /// Ends the current epoch (its summary becomes the previous epoch, unless it saw no tokens)
    /// and starts a new one under `policy`.
    pub fn begin_epoch(&mut self, reason: impl Into<String>, policy: PolicyState, now_s: f64) {
        if self.cumulative.tokens > 0 {
            self.previous = Some(self.summary());
        }
        self.clear_epoch(reason.into(), policy, now_s);
    }

    /// Starts a new epoch under the same settings and forgets the previous epoch's summary.
    pub fn reset(&mut self, now_s: f64) {
        self.previous = None;
        let policy = self.policy.clone();
        self.clear_epoch("statistics reset".to_string(), policy, now_s);
    }

    fn clear_epoch(&mut self, reason: String, policy: PolicyState, now_s: f64) {
        self.epoch_id += 1;
        self.epoch_reason = reason;
        self.epoch_started_at_s = now_s;
        self.policy = policy;
        let n_moe = self.flops.moe_layers().len();
        self.window = RoutingAggregate::new(n_moe, self.n_experts);
        self.cumulative = RoutingAggregate::new(n_moe, self.n_experts);
        self.pool.extend(self.ring.drain(..));
        self.hist.reset();
        self.quality = QualityAccum::default();
    }

    /// The current epoch in brief.
    pub fn summary(&self) -> EpochSummary {
        let c = self.cumulative.snapshot(&self.policy, &self.flops);
        let tl = &self.hist.token_latency_ns;
        let q = self.quality_stats();
        EpochSummary {
            id: self.epoch_id,
            reason: self.epoch_reason.clone(),
            policy: self.policy.clone(),
            tokens: self.cumulative.tokens,
            running_s: self.cumulative.wall_ns as f64 * 1e-9,
            tokens_per_second: self.cumulative.tokens_per_second(),
            mean_experts_per_token: c.mean_experts_per_token,
            layer_mean_experts_per_token: c.layer_mean_experts_per_token(),
            flops: c.flops,
            token_latency_p50_us: quantile_us(tl, 0.5),
            token_latency_p99_us: quantile_us(tl, 0.99),
            bits_per_byte: q.bits_per_byte,
            delta_bits_per_byte: q.delta_bits_per_byte,
        }
    }

    fn quality_stats(&self) -> QualityStats {
        let q = &self.quality;
        let reference_bpb = q.compared_reference.bits_per_byte();
        let compared_bpb = q.compared_current.bits_per_byte();
        let ref_s = q.reference_ns as f64 * 1e-9;
        let run_s = self.cumulative.wall_ns as f64 * 1e-9;
        QualityStats {
            scored_tokens: q.current.scored_tokens,
            bits_per_byte: q.current.bits_per_byte(),
            perplexity: q.current.perplexity(),
            reference_policy: self.policy.reference,
            reference_batches: q.reference_batches,
            reference_scored_tokens: q.compared_reference.scored_tokens,
            reference_bits_per_byte: reference_bpb,
            compared_bits_per_byte: compared_bpb,
            delta_bits_per_byte: compared_bpb.zip(reference_bpb).map(|(c, r)| c - r),
            delta_bits_per_byte_stderr: q.delta_sums.stderr(),
            mean_kl_bits: (q.kl_tokens > 0)
                .then(|| q.kl_nats / std::f64::consts::LN_2 / q.kl_tokens as f64),
            reference_time_s: ref_s,
            reference_time_fraction: ratio(ref_s, ref_s + run_s),
        }
    }

    /// Builds the snapshot: reads the running sums only.
    pub fn snapshot(&self, inputs: SnapshotInputs) -> Snapshot {
        let window = self.window.snapshot(&self.policy, &self.flops);
        let cumulative = self.cumulative.snapshot(&self.policy, &self.flops);
        let moe = self.flops.moe_layers();
        let layer_time_us = self
            .hist
            .layer_ns
            .iter()
            .enumerate()
            .map(|(b, [a, r, f])| LayerTimeHistograms {
                layer: b,
                is_moe: moe.contains(&b),
                attention_us: a.snapshot(1e-3, "us"),
                router_us: r.snapshot(1e-3, "us"),
                ffn_us: f.snapshot(1e-3, "us"),
            })
            .collect();
        let created_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Snapshot {
            schema_version: SNAPSHOT_SCHEMA_VERSION,
            xmoe_top_version: env!("CARGO_PKG_VERSION").to_string(),
            sequence: inputs.sequence,
            session_elapsed_s: inputs.session_elapsed_s,
            created_unix_ms,
            model: inputs.model,
            workload: inputs.workload,
            policy: self.policy.clone(),
            paused: inputs.paused,
            ended: inputs.ended,
            tokens_processed_total: self.tokens_total,
            compare: None,
            window_tokens_target: self.window_target,
            epoch: EpochStats {
                id: self.epoch_id,
                reason: self.epoch_reason.clone(),
                started_at_s: self.epoch_started_at_s,
                running_s: self.cumulative.wall_ns as f64 * 1e-9,
                tokens: self.cumulative.tokens,
                forward_passes: self.cumulative.passes,
                tokens_per_second: self.window.tokens_per_second(),
                tokens_per_second_epoch: self.cumulative.tokens_per_second(),
                decode_tokens_per_second: (self.window.decode_tokens > 0).then(|| {
                    ratio(
                        self.window.decode_tokens as f64 * 1e9,
                        self.window.decode_wall_ns as f64,
                    )
                }),
                window,
                cumulative,
                histograms: Histograms {
                    token_latency_us: self.hist.token_latency_ns.snapshot(1e-3, "us"),
                    forward_latency_us: self.hist.forward_latency_ns.snapshot(1e-3, "us"),
                    token_moe_flops: self.hist.token_moe_flops.snapshot(1.0, "FLOPs"),
                    layer_time_us,
                },
                quality: self.quality_stats(),
            },
            previous_epoch: self.previous.clone(),
            device: inputs.device,
            generated: inputs.generated,
            history: self.history.points(),
            tune: None,
            routes: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::tests::small;
    use crate::profiling::snapshot::LayerPolicy;
    use crate::profiling::stats::{BatchQuality, ReferenceComparison};
    use crate::routing::CapacityFactor;
    use crate::routing::RoutingPolicy;
    use crate::routing::route;

    const E: usize = 8;

    /// Logits under which threshold 0.9 selects exactly `experts` (equal probabilities among them).
    fn logits_selecting(experts: &[usize]) -> Vec<f32> {
        let mut l = vec![0.0f32; E];
        for &e in experts {
            l[e] = 12.0;
        }
        l
    }

    /// A trace of one sequence of `sel[slot].len()` tokens; `sel[slot][token]` = selected experts.
    fn trace(sel: &[Vec<Vec<usize>>], total_ns: u64) -> ForwardTrace {
        let tokens = sel[0].len();
        let mut t = ForwardTrace::default();
        t.begin(1, tokens, 0, 2);
        for (slot, layer_sel) in sel.iter().enumerate() {
            let logits: Vec<f32> = layer_sel.iter().flat_map(|s| logits_selecting(s)).collect();
            let m = t.moe_slot(slot, slot);
            let policy = RoutingPolicy::threshold(0.9).check(E).unwrap();
            route(&logits, policy, None, &mut m.routing).unwrap();
            for (i, s) in layer_sel.iter().enumerate() {
                assert_eq!(m.routing.selected(i), s.len(), "test logits select {s:?}");
            }
        }
        t.total_ns = total_ns;
        for b in &mut t.blocks {
            b.attention_ns = total_ns / 4;
            b.router_ns = total_ns / 10;
            b.ffn_ns = total_ns / 4;
        }
        t
    }

    fn policy(t: f32) -> PolicyState {
        PolicyState {
            layers: (0..2)
                .map(|l| LayerPolicy {
                    layer: l,
                    policy: RoutingPolicy::threshold(t),
                })
                .collect(),
            capacity_factor: None,
            reference: RoutingPolicy::Dense,
        }
    }

    fn stats(window: u64) -> RunStats {
        RunStats::new(&small(), 4, window, policy(0.9), 0.0)
    }

    fn inputs() -> SnapshotInputs {
        SnapshotInputs {
            sequence: 0,
            session_elapsed_s: 1.0,
            model: ModelInfo {
                name: "test".into(),
                parameters: 1000,
                device: "CPU".into(),
                n_layers: 2,
                moe_layers: vec![0, 1],
                n_experts: E,
                expert_hidden: 16,
                d_model: 16,
                vocab_size: 256,
                max_seq_len: 32,
                top_k_baseline: 4,
                shared_experts: 0,
                shared_expert_flops: 0.0,
                native_top_k: None,
            },
            workload: WorkloadInfo {
                kind: crate::profiling::snapshot::WorkloadKind::Eval,
                source: "test".into(),
                source_size: 0,
                batch: 1,
                seq_len: 4,
                temperature: None,
                seed: 0,
                description: "test".into(),
            },
            paused: false,
            ended: None,
            device: DeviceSnapshot::not_sampled(),
            generated: None,
        }
    }

    fn v(x: &[usize]) -> Vec<usize> {
        x.to_vec()
    }

    #[test]
    fn known_heatmap_distribution_and_flops() {
        let mut s = stats(1000);
        let l0 = vec![v(&[0]), v(&[0]), v(&[1]), v(&[2, 3])];
        let l1 = vec![v(&[5]); 4];
        s.record_pass(&trace(&[l0, l1], 4000), PassKind::Eval, 5000);
        let snap = s.snapshot(inputs());
        let w = &snap.epoch.window;
        let a = &w.layers[0];
        assert_eq!(
            a.expert_token_share,
            vec![0.5, 0.25, 0.25, 0.25, 0.0, 0.0, 0.0, 0.0]
        );
        assert_eq!(a.experts_per_token_counts, vec![3, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(a.mean_experts_per_token, 1.25);
        assert_eq!(a.unused_experts, vec![4, 5, 6, 7]);
        assert!((a.expert_gate_mass[0] - 0.5).abs() < 1e-3);
        assert!((a.expert_gate_mass[2] - 0.125).abs() < 1e-3);
        assert!(a.mean_top1_prob > 0.49 && a.mean_top1_prob < 0.876);
        // Loads [2,1,1,1,0,0,0,0]: mean 0.625, max/mean 3.2.
        assert!((a.load_balance.max_over_mean - 3.2).abs() < 1e-12);
        let b = &w.layers[1];
        assert_eq!(b.expert_token_share[5], 1.0);
        assert_eq!(b.load_balance.normalized_entropy, 0.0);
        assert_eq!(w.mean_experts_per_token, (5.0 + 4.0) / 8.0);

        let f = s.flop_model();
        let (router, expert) = (f.router() as f64, f.expert() as f64);
        let moe = &w.flops.moe_per_token;
        assert!((moe.actual - (2.0 * router + 9.0 / 4.0 * expert)).abs() < 1e-9);
        assert_eq!(moe.all_experts, 2.0 * (router + 8.0 * expert));
        assert_eq!(moe.top_k, 2.0 * (router + 4.0 * expert));
        assert!(w.flops.moe_saved_vs_all_experts_pct > 70.0);
        assert!(w.flops.moe_saved_vs_top_k_pct > 40.0);
        // Whole model adds attention over contexts 1..=4 and the LM head.
        let rest: u64 = (1..=4).map(|c| f.non_moe(c)).sum();
        let model = &w.flops.model_per_token;
        assert!((model.actual - moe.actual - rest as f64 / 4.0).abs() < 1e-6);
        assert!(w.flops.model_saved_vs_all_experts_pct < w.flops.moe_saved_vs_all_experts_pct);
        let frac = a.moe_flops_fraction_of_all_experts;
        assert!((frac - (router + 1.25 * expert) / (router + 8.0 * expert)).abs() < 1e-12);
        // Per-token MoE FLOPs histogram: tokens used 2, 2, 2, 3 experts in total.
        let h = &snap.epoch.histograms.token_moe_flops;
        assert_eq!(h.count, 4);
        assert_eq!(h.min, 2.0 * router + 2.0 * expert);
        assert_eq!(h.max, 2.0 * router + 3.0 * expert);
        // Tokens per second from the attributed wall time: 4 tokens in 5 us.
        assert!((snap.epoch.tokens_per_second - 4.0 / 5e-6).abs() < 1e-3);
    }

    #[test]
    fn known_percentiles() {
        let mut s = stats(1_000_000);
        for i in 1..=100u64 {
            s.record_pass(
                &trace(&[vec![v(&[0])], vec![v(&[1])]], i * 1000),
                PassKind::Decode,
                i * 1000,
            );
        }
        let h = s.snapshot(inputs()).epoch.histograms;
        let f = &h.forward_latency_us;
        assert_eq!(f.count, 100);
        assert_eq!((f.min, f.max), (1.0, 100.0));
        for (got, want) in [(f.p50, 50.0), (f.p90, 90.0), (f.p99, 99.0)] {
            assert!((got - want).abs() <= want * 0.01, "{got} vs {want}");
        }
        assert!((f.mean - 50.5).abs() < 1e-9);
        assert_eq!(h.token_latency_us.count, 100);
        assert_eq!(h.token_latency_us.max, 100.0);
        assert_eq!(f.counts.iter().sum::<u64>(), 100);
        let l0 = &h.layer_time_us[0];
        assert!(l0.is_moe);
        assert_eq!(l0.attention_us.max, 25.0);
        assert_eq!(l0.router_us.max, 10.0);
    }

    #[test]
    fn eval_tokens_share_the_pass_time_and_prefill_is_not_latency() {
        let mut s = stats(1000);
        let four = vec![v(&[0]); 4];
        s.record_pass(
            &trace(&[four.clone(), four.clone()], 8000),
            PassKind::Eval,
            8000,
        );
        s.record_pass(
            &trace(&[four.clone(), four], 999_000),
            PassKind::Prefill,
            999_000,
        );
        let snap = s.snapshot(inputs());
        let h = &snap.epoch.histograms;
        assert_eq!(h.token_latency_us.count, 4);
        assert_eq!(h.token_latency_us.max, 2.0);
        assert_eq!(h.forward_latency_us.count, 1);
        // Prefill tokens still count for routing and throughput.
        assert_eq!(snap.epoch.tokens, 8);
        assert_eq!(snap.epoch.decode_tokens_per_second, None);
    }

    #[test]
    fn epochs_are_separate_and_the_previous_is_summarised() {
        let mut s = stats(1000);
        let two = |e: &[usize]| vec![v(e); 2];
        s.record_pass(
            &trace(&[two(&[0, 1]), two(&[2, 3])], 1000),
            PassKind::Eval,
            1000,
        );
        s.begin_epoch("threshold of layer 0 set to 0.50", policy(0.5), 2.0);
        s.record_pass(&trace(&[two(&[4]), two(&[5])], 1000), PassKind::Eval, 1000);
        let snap = s.snapshot(inputs());
        assert_eq!(snap.epoch.id, 1);
        assert_eq!(snap.epoch.reason, "threshold of layer 0 set to 0.50");
        assert_eq!(snap.epoch.started_at_s, 2.0);
        assert_eq!(snap.epoch.tokens, 2);
        assert_eq!(snap.tokens_processed_total, 4);
        let c = &snap.epoch.cumulative;
        assert_eq!(c.layers[0].expert_token_share[0], 0.0);
        assert_eq!(c.layers[0].expert_token_share[4], 1.0);
        assert_eq!(c.mean_experts_per_token, 1.0);
        assert_eq!(c.layers[0].policy, RoutingPolicy::threshold(0.5));
        let p = snap.previous_epoch.as_ref().unwrap();
        assert_eq!(p.id, 0);
        assert_eq!(p.mean_experts_per_token, 2.0);
        assert_eq!(p.layer_mean_experts_per_token, vec![2.0, 2.0]);
        assert_eq!(p.policy.layers[0].policy, RoutingPolicy::threshold(0.9));
        assert_eq!(snap.epoch.histograms.forward_latency_us.count, 1);
        // An epoch without tokens does not replace the previous summary.
        s.begin_epoch("a", policy(0.6), 3.0);
        s.begin_epoch("b", policy(0.7), 3.0);
        assert_eq!(s.previous_epoch().unwrap().id, 1);
        assert_eq!(s.epoch_id(), 3);
        // Reset forgets everything but the running total.
        s.record_pass(&trace(&[two(&[4]), two(&[5])], 1000), PassKind::Eval, 1000);
        s.reset(4.0);
        let snap = s.snapshot(inputs());
        assert_eq!(snap.epoch.tokens, 0);
        assert!(snap.previous_epoch.is_none());
        assert_eq!(snap.epoch.window.layers[0].expert_token_share, vec![0.0; E]);
        assert_eq!(snap.epoch.histograms.token_latency_us.count, 0);
        assert_eq!(snap.tokens_processed_total, 6);
        assert_eq!(snap.policy.layers[0].policy, RoutingPolicy::threshold(0.7));
    }

    #[test]
    fn history_survives_epochs_and_marks_them() {
        let mut s = stats(1000);
        let two = |e: &[usize]| vec![v(e); 2];
        s.sample_history(0.0);
        // 2 tokens in 1 ms of passes, then a change of threshold and 2 more in 4 ms.
        s.record_pass(
            &trace(&[two(&[0, 1]), two(&[2])], 1000),
            PassKind::Eval,
            1_000_000,
        );
        s.sample_history(1.0);
        s.begin_epoch("threshold of layer 0 set to 0.50", policy(0.5), 1.5);
        s.sample_history(1.6);
        s.record_pass(
            &trace(&[two(&[4]), two(&[5])], 1000),
            PassKind::Eval,
            4_000_000,
        );
        s.sample_history(2.0);
        s.reset(2.5);
        s.sample_history(3.0);
        let h = s.snapshot(inputs()).history;
        assert_eq!(h.len(), 3);
        assert_eq!(h.iter().map(|p| p.epoch).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert!((h[0].tokens_per_second.unwrap() - 2000.0).abs() < 1e-6);
        assert_eq!(h[0].experts_per_token, Some(1.5));
        assert!((h[1].tokens_per_second.unwrap() - 500.0).abs() < 1e-6);
        assert_eq!(h[1].experts_per_token, Some(1.0));
        // After the reset: no pass, an empty window: nothing that looks measured.
        assert_eq!(h[2].tokens_per_second, None);
        assert_eq!(h[2].experts_per_token, None);
        assert_eq!(h[2].moe_saved_pct, None);
    }

    #[test]
    fn window_evicts_by_token_count() {
        let mut s = stats(8);
        let four = |e: usize| vec![v(&[e]); 4];
        for e in 0..3 {
            s.record_pass(&trace(&[four(e), four(7)], 1000), PassKind::Eval, 1000);
        }
        let snap = s.snapshot(inputs());
        assert_eq!(snap.epoch.window.tokens, 8);
        assert_eq!(snap.epoch.window.forward_passes, 2);
        assert_eq!(
            &snap.epoch.window.layers[0].expert_token_share[..3],
            &[0.0, 0.5, 0.5]
        );
        assert_eq!(
            snap.epoch.window.layers[0].unused_experts,
            vec![0, 3, 4, 5, 6, 7]
        );
        assert_eq!(snap.epoch.cumulative.tokens, 12);
        let third = 1.0 / 3.0;
        assert_eq!(
            &snap.epoch.cumulative.layers[0].expert_token_share[..3],
            &[third, third, third]
        );
        // A single pass larger than the window is kept whole.
        let big: Vec<Vec<usize>> = vec![v(&[6]); 20];
        s.record_pass(&trace(&[big.clone(), big], 1000), PassKind::Eval, 1000);
        assert_eq!(s.window().tokens, 20);
        assert_eq!(s.window().layers[0].expert_selected[6], 20);
        assert_eq!(s.window().layers[0].expert_selected[2], 0);
    }

    #[test]
    fn window_sums_equal_a_fresh_aggregate_of_the_passes_it_holds() {
        // Pseudo-random passes of 1..6 tokens, 1..3 experts each; compare against recomputation.
        let mut s = stats(10);
        let mut seed = 12345u64;
        let mut next = |m: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % m
        };
        let mut passes = Vec::new();
        for _ in 0..200 {
            let n = 1 + next(6) as usize;
            let layer = |next: &mut dyn FnMut(u64) -> u64| -> Vec<Vec<usize>> {
                (0..n)
                    .map(|_| {
                        let k = 1 + next(3) as usize;
                        let first = next(E as u64 - 3) as usize;
                        (first..first + k).collect()
                    })
                    .collect()
            };
            let sel = [layer(&mut next), layer(&mut next)];
            s.record_pass(&trace(&sel, 1000), PassKind::Eval, 1000);
            passes.push(sel);
        }
        let w = s.window().clone();
        let mut fresh = stats(1_000_000);
        let held = w.passes as usize;
        for sel in &passes[passes.len() - held..] {
            fresh.record_pass(&trace(sel, 1000), PassKind::Eval, 1000);
        }
        let f = fresh.cumulative();
        assert_eq!(w.tokens, f.tokens);
        assert!(w.tokens >= 10 && w.tokens - 10 < 6 + 6);
        for (a, b) in w.layers.iter().zip(&f.layers) {
            assert_eq!(a.expert_selected, b.expert_selected);
            assert_eq!(a.experts_per_token, b.experts_per_token);
            assert_eq!(a.kept_pairs, b.kept_pairs);
            for (x, y) in a.expert_gate_mass.iter().zip(&b.expert_gate_mass) {
                assert!((x - y).abs() < 1e-9);
            }
            assert!((a.top1_sum - b.top1_sum).abs() < 1e-9);
        }
        assert_eq!(w.non_moe_flops, f.non_moe_flops);
    }

    #[test]
    fn capacity_drops_are_counted() {
        let mut s = stats(1000);
        let mut t = ForwardTrace::default();
        t.begin(1, 10, 0, 2);
        // 10 tokens all pick expert 0 under top-1; capacity max(4, ceil(0.1*10/8)) = 4 keeps 4.
        let logits: Vec<f32> = (0..10).flat_map(|_| logits_selecting(&[0])).collect();
        for slot in 0..2 {
            let m = t.moe_slot(slot, slot);
            let top1 = RoutingPolicy::TopK {
                k: 1,
                renormalize: false,
            };
            let cf = CapacityFactor::new(0.1).unwrap();
            route(&logits, top1.check(E).unwrap(), Some(cf), &mut m.routing).unwrap();
        }
        s.record_pass(&t, PassKind::Eval, 1);
        let snap = s.snapshot(inputs());
        let l = &snap.epoch.window.layers[0];
        assert_eq!(l.dropped_pairs, 6);
        assert_eq!(l.tokens_fully_dropped, 6);
        assert!((l.dropped_fraction - 0.6).abs() < 1e-12);
        assert!((l.mean_kept_experts_per_token - 0.4).abs() < 1e-12);
        assert_eq!(l.mean_experts_per_token, 1.0);
    }

    #[test]
    fn quality_and_reference_accounting() {
        let mut s = stats(1000);
        s.record_pass(
            &trace(&[vec![v(&[0])], vec![v(&[0])]], 3_000_000),
            PassKind::Eval,
            3_000_000,
        );
        let ln2 = std::f64::consts::LN_2;
        s.record_quality(&BatchQuality {
            scored_tokens: 100,
            bytes: 100,
            nats: 200.0 * ln2,
        });
        s.record_reference(&ReferenceComparison {
            current: BatchQuality {
                scored_tokens: 50,
                bytes: 50,
                nats: 110.0 * ln2,
            },
            reference: BatchQuality {
                scored_tokens: 50,
                bytes: 50,
                nats: 100.0 * ln2,
            },
            kl_nats: 5.0 * ln2,
            kl_tokens: 50,
            reference_ns: 1_000_000,
        });
        let q = s.snapshot(inputs()).epoch.quality;
        assert!((q.bits_per_byte.unwrap() - 2.0).abs() < 1e-12);
        assert!((q.reference_bits_per_byte.unwrap() - 2.0).abs() < 1e-12);
        assert!((q.compared_bits_per_byte.unwrap() - 2.2).abs() < 1e-12);
        assert!((q.delta_bits_per_byte.unwrap() - 0.2).abs() < 1e-12);
        assert!((q.mean_kl_bits.unwrap() - 0.1).abs() < 1e-12);
        assert_eq!(q.reference_batches, 1);
        assert!((q.reference_time_fraction - 0.25).abs() < 1e-12);
        assert_eq!(q.reference_policy, RoutingPolicy::Dense);
    }

    #[test]
    fn snapshot_json_round_trips() {
        let mut s = stats(1000);
        s.record_pass(
            &trace(&[vec![v(&[0, 1])], vec![v(&[3])]], 1000),
            PassKind::Eval,
            1000,
        );
        let snap = s.snapshot(inputs());
        let json = serde_json::to_string(&snap).unwrap();
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        // serde_json parses floats to within one ulp; everything else is exact.
        fn close(a: &serde_json::Value, b: &serde_json::Value) -> bool {
            use serde_json::Value::*;
            match (a, b) {
                (Number(x), Number(y)) => {
                    let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                    (x - y).abs() <= 1e-14 * x.abs().max(y.abs())
                }
                (Array(x), Array(y)) => {
                    x.len() == y.len() && x.iter().zip(y).all(|(a, b)| close(a, b))
                }
                (Object(x), Object(y)) => {
                    x.len() == y.len()
                        && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| close(v, w)))
                }
                _ => a == b,
            }
        }
        let a: serde_json::Value = serde_json::from_str(&json).unwrap();
        let b: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&back).unwrap()).unwrap();
        assert!(close(&a, &b));
        assert_eq!(back.epoch.window.layers[1].expert_token_share[3], 1.0);
        assert!(!json.contains("-0.0"));
    }
}
