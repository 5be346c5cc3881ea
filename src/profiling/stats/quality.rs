//! Quality: next-token cross-entropy and KL divergence on logits, and their per-epoch sums.

/// Next-token cross-entropy of one batch: the figures quality statistics are built from.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BatchQuality {
    /// Predictions scored.
    pub scored_tokens: u64,
    /// Bytes of text those predictions cover (= tokens for a byte tokenizer).
    pub bytes: u64,
    /// Sum of cross-entropies, nats.
    pub nats: f64,
}

impl BatchQuality {
    pub(super) fn add(&mut self, o: &BatchQuality) {
        self.scored_tokens += o.scored_tokens;
        self.bytes += o.bytes;
        self.nats += o.nats;
    }

    /// Bits per byte, `None` without bytes.
    pub fn bits_per_byte(&self) -> Option<f64> {
        (self.bytes > 0).then(|| self.nats / std::f64::consts::LN_2 / self.bytes as f64)
    }

    /// Per-token perplexity, `None` without tokens.
    pub fn perplexity(&self) -> Option<f64> {
        (self.scored_tokens > 0).then(|| (self.nats / self.scored_tokens as f64).exp())
    }
}

/// One batch run under both the current and the reference policy.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ReferenceComparison {
    /// The current policy on the batch.
    pub current: BatchQuality,
    /// The reference policy on the same batch.
    pub reference: BatchQuality,
    /// Sum over tokens of KL(reference || current), nats.
    pub kl_nats: f64,
    /// Tokens the KL was summed over.
    pub kl_tokens: u64,
    /// Wall time of the reference pass, ns.
    pub reference_ns: u64,
}

impl ReferenceComparison {
    /// A batch compared with itself: for when the current routing is the reference routing
    /// (identical logits, so zero difference and zero KL, and no reference pass to time).
    pub fn with_itself(q: BatchQuality) -> Self {
        Self {
            current: q,
            reference: q,
            kl_nats: 0.0,
            kl_tokens: q.scored_tokens,
            reference_ns: 0,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub(super) struct QualityAccum {
    pub(super) current: BatchQuality,
    pub(super) compared_current: BatchQuality,
    pub(super) compared_reference: BatchQuality,
    pub(super) kl_nats: f64,
    pub(super) kl_tokens: u64,
    pub(super) reference_batches: u64,
    pub(super) reference_ns: u64,
    /// Per compared batch: x = bits(current) - bits(reference), y = bytes; the sums the
    /// standard error of the ratio sum(x) / sum(y) needs.
    pub(super) delta_sums: DeltaSums,
}

/// Running sums for the standard error of Δ bits/byte over compared batches.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeltaSums {
    n: u64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
    yy: f64,
}

impl DeltaSums {
    /// Adds one batch: `x_bits` = bits(current) - bits(reference), `y_bytes` = its bytes.
    pub fn add(&mut self, x_bits: f64, y_bytes: f64) {
        self.n += 1;
        self.x += x_bits;
        self.y += y_bytes;
        self.xx += x_bits * x_bits;
        self.xy += x_bits * y_bytes;
        self.yy += y_bytes * y_bytes;
    }

    /// Standard error of R = sum(x) / sum(y), batches taken as the sampled units (the usual
    /// ratio-estimator formula: sqrt(n / (n - 1) * sum((x - R y)^2)) / sum(y)); `None` below two
    /// batches.
    pub fn stderr(&self) -> Option<f64> {
        if self.n < 2 || self.y <= 0.0 {
            return None;
        }
        let r = self.x / self.y;
        let ss = (self.xx - 2.0 * r * self.xy + r * r * self.yy).max(0.0);
        let n = self.n as f64;
        Some((n / (n - 1.0) * ss).sqrt() / self.y)
    }
}

/// Log-softmax of one row, in f64.
pub fn log_softmax(row: &[f32], out: &mut Vec<f64>) {
    out.clear();
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &z| m.max(z as f64));
    let sum: f64 = row.iter().map(|&z| (z as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    out.extend(row.iter().map(|&z| z as f64 - lse));
}

/// Sum of next-token cross-entropies in nats: row `i` of `logits` (`rows x vocab`) scored against
/// `targets[i]`, as `logsumexp(row) - row[target]` (the negative log-softmax of the target).
/// Exponentials are taken in f32 on max-shifted logits (at most 1, so no overflow); sums and
/// logarithms are accumulated in f64.
///
/// # Panics
/// If `logits.len() != targets.len() * vocab` or a target is out of the vocabulary.
pub fn cross_entropy_nats(logits: &[f32], vocab: usize, targets: &[u32]) -> f64 {
    assert_eq!(
        logits.len(),
        targets.len() * vocab,
        "logits vs targets shape"
    );
    logits
        .chunks_exact(vocab)
        .zip(targets)
        .map(|(row, &t)| {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &z| m.max(z));
            let sum: f64 = row.iter().map(|&z| (z - max).exp() as f64).sum();
            let lse = max as f64 + sum.ln();
            lse - row[t as usize] as f64
        })
        .sum()
}

/// Sum over rows of KL(reference || current) in nats, both `rows x vocab` logits.
///
/// # Panics
/// If the two buffers differ in length or are not a multiple of `vocab`.
pub fn kl_nats(reference: &[f32], current: &[f32], vocab: usize) -> f64 {
    assert_eq!(reference.len(), current.len(), "logit buffers differ");
    assert_eq!(reference.len() % vocab, 0, "not a multiple of vocab");
    let (mut lr, mut lc) = (Vec::with_capacity(vocab), Vec::with_capacity(vocab));
    reference
        .chunks_exact(vocab)
        .zip(current.chunks_exact(vocab))
        .map(|(r, c)| {
            log_softmax(r, &mut lr);
            log_softmax(c, &mut lc);
            lr.iter()
                .zip(&lc)
                .map(|(&a, &b)| a.exp() * (a - b))
                .sum::<f64>()
                .max(0.0)
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_entropy_and_kl_by_hand() {
        // Uniform logits over 256 bytes: ln 256 nats = 8 bits per byte.
        let logits = vec![0.5f32; 256 * 3];
        let nats = cross_entropy_nats(&logits, 256, &[1, 2, 3]);
        assert!((nats - 3.0 * 256f64.ln()).abs() < 1e-9);
        let q = BatchQuality {
            scored_tokens: 3,
            bytes: 3,
            nats,
        };
        assert!((q.bits_per_byte().unwrap() - 8.0).abs() < 1e-9);
        assert!((q.perplexity().unwrap() - 256.0).abs() < 1e-6);
        // Two classes: p = (0.75, 0.25) vs q = (0.5, 0.5).
        let r = [3f32.ln(), 0.0];
        let c = [0.0f32, 0.0];
        let want = 0.75 * (1.5f64).ln() + 0.25 * (0.5f64).ln();
        assert!((kl_nats(&r, &c, 2) - want).abs() < 1e-6);
        assert_eq!(kl_nats(&r, &r, 2), 0.0);
        // Cross-entropy picks the target's log-probability.
        assert!((cross_entropy_nats(&r, 2, &[1]) - 4f64.ln()).abs() < 1e-6);
    }
}

#[cfg(test)]
mod delta_tests {
    use super::DeltaSums;

    #[test]
    fn stderr_of_the_ratio_matches_a_direct_computation() {
        let batches = [(0.8, 1000.0), (-0.2, 1010.0), (1.5, 990.0), (0.1, 1000.0)];
        let mut s = DeltaSums::default();
        assert_eq!(s.stderr(), None);
        s.add(batches[0].0, batches[0].1);
        assert_eq!(s.stderr(), None, "one batch has no spread");
        for &(x, y) in &batches[1..] {
            s.add(x, y);
        }
        let (sx, sy): (f64, f64) = batches
            .iter()
            .fold((0.0, 0.0), |(a, b), &(x, y)| (a + x, b + y));
        let r = sx / sy;
        let n = batches.len() as f64;
        let ss: f64 = batches.iter().map(|&(x, y)| (x - r * y).powi(2)).sum();
        let direct = (n / (n - 1.0) * ss).sqrt() / sy;
        assert!((s.stderr().unwrap() - direct).abs() < 1e-15, "{direct}");
        // Identical per-byte deltas have no spread.
        let mut same = DeltaSums::default();
        same.add(1.0, 100.0);
        same.add(2.0, 200.0);
        assert!(same.stderr().unwrap() < 1e-12);
    }
}
