//! Latency and FLOP histograms: HDR recorders with exact min/max/sum beside them.

use hdrhistogram::Histogram;

use crate::profiling::snapshot::{ExactSummary, HistogramSnapshot};

/// Buckets of each histogram in a snapshot.
pub const HISTOGRAM_BUCKETS: usize = 32;

/// An HDR histogram with the exact min, max and sum beside it.
#[derive(Clone, Debug)]
pub(super) struct Recorder {
    pub(super) hist: Histogram<u64>,
    pub(super) exact: ExactSummary,
}

impl Recorder {
    pub(super) fn new() -> Self {
        // 2 significant figures (1% precision), values up to ~1e13 (3 hours in ns, or FLOPs).
        let hist = Histogram::new_with_bounds(1, 10_000_000_000_000, 2)
            .expect("static histogram bounds are valid");
        Self {
            hist,
            exact: ExactSummary::default(),
        }
    }

    pub(super) fn record_n(&mut self, value: u64, n: u64) {
        if n == 0 {
            return;
        }
        if self.hist.is_empty() {
            self.exact.min = value;
            self.exact.max = value;
        } else {
            self.exact.min = self.exact.min.min(value);
            self.exact.max = self.exact.max.max(value);
        }
        self.exact.sum += value as u128 * n as u128;
        // Zero is below the lowest trackable value (1): it is recorded as 1 in the buckets, while
        // the exact min and sum keep the true 0.
        self.hist.saturating_record_n(value.max(1), n);
    }

    pub(super) fn snapshot(&self, scale: f64, unit: &str) -> HistogramSnapshot {
        HistogramSnapshot::from_hdr(&self.hist, self.exact, HISTOGRAM_BUCKETS, scale, unit)
    }

    pub(super) fn reset(&mut self) {
        self.hist.reset();
        self.exact = ExactSummary::default();
    }
}

/// Per-epoch histograms.
#[derive(Clone, Debug)]
pub(super) struct EpochHistograms {
    pub(super) token_latency_ns: Recorder,
    pub(super) forward_latency_ns: Recorder,
    pub(super) token_moe_flops: Recorder,
    /// Per block: attention, router, ffn.
    pub(super) layer_ns: Vec<[Recorder; 3]>,
}

impl EpochHistograms {
    pub(super) fn new(n_layers: usize) -> Self {
        Self {
            token_latency_ns: Recorder::new(),
            forward_latency_ns: Recorder::new(),
            token_moe_flops: Recorder::new(),
            layer_ns: (0..n_layers)
                .map(|_| [Recorder::new(), Recorder::new(), Recorder::new()])
                .collect(),
        }
    }

    pub(super) fn reset(&mut self) {
        self.token_latency_ns.reset();
        self.forward_latency_ns.reset();
        self.token_moe_flops.reset();
        for l in &mut self.layer_ns {
            l.iter_mut().for_each(Recorder::reset);
        }
    }
}

pub(super) fn quantile_us(r: &Recorder, q: f64) -> f64 {
    if r.hist.is_empty() {
        return 0.0;
    }
    (r.hist.value_at_quantile(q) as f64).clamp(r.exact.min as f64, r.exact.max as f64) * 1e-3
}
