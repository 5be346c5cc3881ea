//! The UI wired to a model [`Session`]: the UI's control messages go to the session as they are.

use anyhow::Result;

use crate::model::Model;
use crate::session::Control;
use crate::session::{self, Session, SessionConfig, SessionOutcome};
use crate::tui::{TuiOptions, UiChannel, run_tui};
use crate::workload::Workload;

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
    let mut config = config;
    config.device_observer = Some(session::DeviceObserver(std::sync::Arc::new(
        channel.device_sender(),
    )));
    let session = Session::start_with_sink(model, workload, config, move |s| {
        sink.send(s);
    })?;
    let controller = session.controller();
    let ui = run_tui(
        channel,
        |c| {
            let last = c == Control::Stop;
            match controller.send(c) {
                // The UI's last word; the session may already have ended by itself.
                Err(session::ControlError::Ended) if last => Ok(()),
                r => r.map_err(anyhow::Error::from),
            }
        },
        options,
    );
    let outcome = session.stop();
    ui?;
    outcome
}
