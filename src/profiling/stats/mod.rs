//! Statistics: [`ForwardTrace`]s in, [`Snapshot`]s out.
//!
//! [`RunStats`] ([`run`]) aggregates each pass once, when it is recorded, into
//! - running sums over the whole epoch ([`LayerStats`] per MoE layer, FLOP sums, HDR histograms),
//! - running sums over a sliding window of the last N tokens: a ring of compact per-pass records
//!   whose contributions are added on arrival and subtracted on eviction (evicted by token count).
//!
//! Building a [`Snapshot`] reads only these sums (O(layers x experts) plus the histograms' buckets),
//! never the history. [`history`] keeps one point per second across epochs for the UI. [`histograms`] holds the recorders, [`layers`] the per-layer routing counts,
//! [`quality`] the pure functions on logits and their sums.
//!
//! [`ForwardTrace`]: crate::model::trace::ForwardTrace
//! [`Snapshot`]: crate::profiling::snapshot::Snapshot

pub mod histograms;
pub mod history;
pub mod layers;
pub mod quality;
pub mod run;

pub use histograms::HISTOGRAM_BUCKETS;
pub use layers::{LayerStats, RoutingAggregate, experts_per_layer, load_balance};
pub use quality::{
    BatchQuality, DeltaSums, ReferenceComparison, cross_entropy_nats, kl_nats, log_softmax,
};
pub use run::{PassKind, RunStats, SnapshotInputs};
