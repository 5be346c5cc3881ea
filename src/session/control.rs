//! Orders for a running session: the one control type the UI, scripts and tests send.
//!
//! The UI never touches the model: a key press becomes one [`Control`] message, the session
//! applies it between forward passes, and the change shows up in the next snapshot (a new epoch).

use crate::routing::RoutingPolicy;

/// Which MoE layers a policy change applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layers {
    /// Every MoE layer.
    All,
    /// One MoE layer, by MoE slot (the `i`-th MoE layer, the index of the snapshot's per-layer
    /// vectors), not by block index.
    Slot(usize),
}

/// An order for a running session, applied between forward passes.
#[derive(Clone, Debug, PartialEq)]
pub enum Control {
    /// Route `layers` with `policy` from now on (threshold t, top-k with its k, or dense). The
    /// UI has already clamped t to (0, 1] and k to 1..=E.
    SetPolicy {
        /// The layers to change.
        layers: Layers,
        /// The new policy.
        policy: RoutingPolicy,
    },
    /// Set the inference-time capacity factor of every MoE layer (`Some`, positive) or switch
    /// it off (`None`). The `c` key toggles between off and the factor last in force (or
    /// [`crate::tui::TuiOptions::capacity_factor`]).
    SetCapacityFactor(Option<f32>),
    /// Start comparing the current policy (A) with `Some(policy)` (B, on every MoE layer) on
    /// the same batches, or stop comparing (`None`); eval workload only. Every later change of
    /// A's policy restarts the comparison (a new epoch).
    SetCompare(Option<RoutingPolicy>),
    /// Stop (`true`) or resume (`false`) forward passes; statistics collection stops with them.
    SetPaused(bool),
    /// Clear the statistics and start a new epoch with the same settings.
    ResetStats,
    /// Search per-layer thresholds within `budget` on the eval text (a quick `xmoe-top tune`);
    /// live passes wait for it, and its progress and result come in the snapshots' `tune`.
    QuickTune(crate::session::tune::Budget),
    /// Route with the finished quick tune's thresholds (one new epoch) and clear it.
    ApplyTune,
    /// Cancel a running quick tune, or clear a finished one.
    DismissTune,
    /// Publish (`true`) or stop publishing the routes of recent tokens in the snapshots' `routes`
    /// (the UI's token view).
    FollowTokens(bool),
    /// End the session (the UI sends it last, whichever way it closes).
    Stop,
}
