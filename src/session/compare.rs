//! A/B on the model thread: every eval batch the session runs under its own policy (A) runs
//! again under policy B, and both passes go into one [`CompareStats`].
//!
//! B reuses the reference-pass path of the workload ([`Workload::run_reference`]), so both
//! policies see exactly the same tokens, and the KL between them comes from the same code as
//! the live quality figures. A always runs first: B's pass finds the batch's activations and
//! weights warmer in the caches, which can favour B's time by a little (docs/tui.md says so).

use anyhow::{Context, Result};

use crate::model::trace::ForwardTrace;
use crate::model::{Model, RoutingConfig};
use crate::profiling::compare::{CompareSnapshot, CompareStats, PairQuality};
use crate::workload::Workload;

/// A running comparison: B's routing, the statistics, and B's trace buffer.
pub(crate) struct Comparison {
    routing_b: RoutingConfig,
    stats: CompareStats,
    trace_b: ForwardTrace,
}

impl Comparison {
    /// A new comparison of `a` (the session's routing) with `b` on `model`. B runs under A's
    /// capacity factor, so that the two differ only in their policies.
    pub(crate) fn new(model: &Model, a: &RoutingConfig, mut b: RoutingConfig) -> Result<Self> {
        b.set_capacity_factor(a.checked_capacity());
        let stats = CompareStats::new(
            model.config(),
            a.policies().collect(),
            b.policies().collect(),
        )?;
        Ok(Self {
            routing_b: b,
            stats,
            trace_b: ForwardTrace::default(),
        })
    }

    /// Starts the statistics again with `a` as policy A (after A changed, or a reset).
    pub(crate) fn restart(&mut self, model: &Model, a: &RoutingConfig) -> Result<()> {
        self.routing_b.set_capacity_factor(a.checked_capacity());
        self.stats = CompareStats::new(
            model.config(),
            a.policies().collect(),
            self.routing_b.policies().collect(),
        )?;
        Ok(())
    }

    /// Runs the batch of A's last pass (whose trace is `trace_a`) under B and records the pair.
    /// Does nothing on a workload without reference passes (generate).
    pub(crate) fn run_b(
        &mut self,
        model: &Model,
        workload: &mut Workload,
        trace_a: &ForwardTrace,
    ) -> Result<()> {
        let Some(c) = workload
            .run_reference(model, &self.routing_b, &mut self.trace_b)
            .context("A/B: the pass under policy B failed")?
        else {
            return Ok(());
        };
        let quality = PairQuality {
            nats_a: c.current.nats,
            nats_b: c.reference.nats,
            scored_tokens: c.current.scored_tokens,
            bytes: c.current.bytes,
            kl_nats: c.kl_nats,
        };
        // Both times are the model's own forward timing, so they measure the same span.
        self.stats.record(
            trace_a,
            &self.trace_b,
            trace_a.total_ns,
            self.trace_b.total_ns,
            Some(quality),
        )
    }

    /// The figures so far.
    pub(crate) fn snapshot(&self) -> CompareSnapshot {
        self.stats.snapshot()
    }
}
