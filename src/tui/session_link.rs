//! The UI wired to a model [`Session`]: UI requests become session control messages.

use anyhow::{Context, Result};

use crate::model::Model;
use crate::routing::RoutingPolicy;
use crate::session::{self, Session, SessionConfig, SessionOutcome};
use crate::tui::control::{Control, Layers};
use crate::tui::{TuiOptions, UiChannel, run_tui};
use crate::workload::Workload;

/// The session message for a UI request. The UI names layers by MoE slot, the session by block
/// index (`moe_layers[slot]`); thresholds for every layer go as `SetThreshold`, anything else
/// as `SetPolicy`.
pub fn to_session_control(c: &Control, moe_layers: &[usize]) -> Result<session::Control> {
    Ok(match c {
        Control::SetPolicy { layers, policy } => {
            let layer = match layers {
                Layers::All => None,
                Layers::Slot(s) => Some(
                    *moe_layers
                        .get(*s)
                        .with_context(|| format!("the model has no MoE layer number {s}"))?,
                ),
            };
            match *policy {
                RoutingPolicy::Threshold { t } => session::Control::SetThreshold { layer, t },
                policy => session::Control::SetPolicy { layer, policy },
            }
        }
        Control::SetCapacityFactor(f) => session::Control::SetCapacityFactor(*f),
        Control::SetPaused(true) => session::Control::Pause,
        Control::SetPaused(false) => session::Control::Resume,
        Control::ResetStats => session::Control::ResetStats,
        Control::Quit => session::Control::Stop,
    })
}

/// Starts a session of `model` over `workload` and shows it in the UI until the user quits;
/// then stops the session and returns its outcome (the model and the last snapshot). The
/// terminal is restored before this returns, whatever happened.
pub fn run_session_tui(
    model: Model,
    workload: Workload,
    config: SessionConfig,
    options: TuiOptions,
) -> Result<SessionOutcome> {
    let channel = UiChannel::new();
    let mut sink = channel.sink();
    let session = Session::start_with_sink(model, workload, config, move |s| {
        sink.send(s);
    })?;
    let controller = session.controller();
    let layers = controller.moe_layers().to_vec();
    let ui = run_tui(
        channel,
        |c| {
            let sc = to_session_control(&c, &layers)?;
            match controller.send(sc) {
                // The UI's last word; the session may already have ended by itself.
                Err(session::ControlError::Ended) if c == Control::Quit => Ok(()),
                r => r.map_err(anyhow::Error::from),
            }
        },
        options,
    );
    let outcome = session.stop();
    ui?;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::RoutingPolicy;

    #[test]
    fn ui_requests_map_onto_session_messages() {
        let moe = [1, 3, 5];
        let map = |c: Control| format!("{:?}", to_session_control(&c, &moe).unwrap());
        let set = |layers, policy| Control::SetPolicy { layers, policy };
        assert_eq!(
            map(set(Layers::Slot(1), RoutingPolicy::Threshold { t: 0.5 })),
            "SetThreshold(Some(3), 0.5)"
        );
        assert_eq!(
            map(set(Layers::All, RoutingPolicy::Threshold { t: 0.8 })),
            "SetThreshold(None, 0.8)"
        );
        let top = map(set(
            Layers::Slot(2),
            RoutingPolicy::TopK {
                k: 4,
                renormalize: false,
            },
        ));
        assert!(top.starts_with("SetPolicy(Some(5), "), "{top}");
        assert!(map(set(Layers::All, RoutingPolicy::Dense)).starts_with("SetPolicy(None, "));
        assert_eq!(
            map(Control::SetCapacityFactor(Some(2.0))),
            "SetCapacityFactor(Some(2.0))"
        );
        assert_eq!(map(Control::SetPaused(true)), "Pause");
        assert_eq!(map(Control::SetPaused(false)), "Resume");
        assert_eq!(map(Control::ResetStats), "ResetStats");
        assert_eq!(map(Control::Quit), "Stop");
        assert!(to_session_control(&set(Layers::Slot(3), RoutingPolicy::Dense), &moe).is_err());
    }
}
