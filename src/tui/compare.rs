//! The A/B view's state and keys: `a` starts comparing the current policy (A) with a second
//! one (B) on the same batches and opens the view, `b` cycles B's kind, `{` `}` step B's k or t.
//! Kept apart from `app.rs` and `input.rs` so that the A/B keys are one small, testable unit.

use crate::profiling::snapshot::{Snapshot, WorkloadKind};
use crate::routing::RoutingPolicy;
use crate::session::Control;
use crate::tui::app::App;

/// B's threshold steps by this much on `{` `}` (the sliders' big step).
const T_STEP: f32 = 0.05;

/// What the A/B keys ask for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CompareAction {
    /// Start comparing and open the view; open it when a comparison runs; stop when open.
    Toggle,
    /// B: top-k → threshold → dense → top-k.
    CycleB,
    /// B's k (top-k) or t (threshold) one step down (`-1`) or up (`1`).
    StepB(i32),
}

/// The A/B view's state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CompareUi {
    /// Shown (`Some(true)`), hidden (`Some(false)`), or `None`: shown whenever the snapshot
    /// carries a comparison (one started by `--compare` opens the view by itself).
    pub open: Option<bool>,
    /// Policy B as last chosen here; `None` until chosen or seen in a snapshot.
    pub b: Option<RoutingPolicy>,
}

impl CompareUi {
    /// Whether the view is drawn for this snapshot.
    pub fn is_open(&self, snap: Option<&Snapshot>) -> bool {
        let running = snap.is_some_and(|s| s.compare.is_some());
        self.open.unwrap_or(running) && snap.is_some()
    }
}

/// The B of the snapshot's comparison when it is one policy on every layer.
fn running_b(snap: &Snapshot) -> Option<RoutingPolicy> {
    let c = snap.compare.as_ref()?;
    let first = *c.b.policies.first()?;
    c.b.policies
        .iter()
        .all(|p| p.same_as(&first))
        .then_some(first)
}

/// The B the keys start from: the one chosen, else the running one, else the compute-matched
/// top-k baseline (the comparison people ask for first), renormalised as A is.
fn current_b(app: &App, snap: &Snapshot) -> RoutingPolicy {
    app.compare
        .b
        .or_else(|| running_b(snap))
        .unwrap_or_else(|| {
            let renormalize = snap
                .policy
                .layers
                .first()
                .is_some_and(|l| l.policy.renormalizes());
            RoutingPolicy::TopK {
                k: snap
                    .model
                    .top_k_baseline
                    .clamp(1, snap.model.n_experts.max(1)),
                renormalize,
            }
        })
}

fn label(p: &RoutingPolicy) -> String {
    crate::profiling::sweep::policy_label(p)
}

/// Applies an A/B key; returns the order for the session, if any.
pub fn apply(app: &mut App, action: CompareAction) -> Option<Control> {
    let Some(snap) = app.latest().cloned() else {
        app.say_error("no snapshot from the model yet");
        return None;
    };
    if snap.workload.kind != WorkloadKind::Eval {
        app.say_error(
            "A/B needs the eval workload: under generate the two policies would choose different tokens",
        );
        return None;
    }
    let running = snap.compare.is_some();
    let e = snap.model.n_experts.max(1);
    match action {
        CompareAction::Toggle => {
            let open = app.compare.is_open(Some(&snap));
            if running && open {
                app.compare.open = Some(false);
                app.say("A/B stopped");
                Some(Control::SetCompare(None))
            } else if running {
                app.compare.open = Some(true);
                None
            } else {
                let b = current_b(app, &snap);
                app.compare.b = Some(b);
                app.compare.open = Some(true);
                app.say(format!(
                    "A/B: every batch runs again under B = {}; a stops, Esc hides",
                    label(&b)
                ));
                Some(Control::SetCompare(Some(b)))
            }
        }
        CompareAction::CycleB | CompareAction::StepB(_) => {
            let b = current_b(app, &snap);
            let next = match (action, b) {
                (CompareAction::CycleB, RoutingPolicy::TopK { renormalize, .. }) => {
                    RoutingPolicy::threshold(0.9).with_renormalize(renormalize)
                }
                (CompareAction::CycleB, RoutingPolicy::Threshold { .. }) => RoutingPolicy::Dense,
                (CompareAction::CycleB, RoutingPolicy::Dense) => RoutingPolicy::TopK {
                    k: snap.model.top_k_baseline.clamp(1, e),
                    renormalize: false,
                },
                (CompareAction::StepB(d), RoutingPolicy::TopK { k, renormalize }) => {
                    RoutingPolicy::TopK {
                        k: (k as i64 + d as i64).clamp(1, e as i64) as usize,
                        renormalize,
                    }
                }
                (CompareAction::StepB(d), RoutingPolicy::Threshold { t, renormalize }) => {
                    let t = ((t + d as f32 * T_STEP) * 100.0).round() / 100.0;
                    RoutingPolicy::threshold(t.clamp(T_STEP, 1.0)).with_renormalize(renormalize)
                }
                (CompareAction::StepB(_), RoutingPolicy::Dense) => {
                    app.say_error("B is dense: press b for a policy with a k or a threshold");
                    return None;
                }
                (CompareAction::Toggle, _) => unreachable!("handled above"),
            };
            app.compare.b = Some(next);
            if running {
                app.compare.open = Some(true);
                app.say(format!("A/B: B = {} (figures start again)", label(&next)));
                Some(Control::SetCompare(Some(next)))
            } else {
                app.say(format!("B = {}: press a to compare", label(&next)));
                None
            }
        }
    }
}
