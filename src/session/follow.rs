//! The routes behind the UI's "follow one token" view: captured from the pass just run, only
//! while the view asks for them (a route is every expert's probability in every MoE layer).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use super::Runner;
use crate::model::trace::ForwardTrace;
use crate::profiling::snapshot::{LayerRoute, RoutedToken, TokenRoutes};
use crate::workload::PassOutcome;

/// Generated tokens kept with their routes (the newest; the stream view shows about as many).
pub(super) const GENERATED_ROUTES: usize = 256;

/// Token `row`'s route in every MoE layer of `trace`.
fn layer_routes(trace: &ForwardTrace, row: usize) -> Vec<LayerRoute> {
    trace
        .moe
        .iter()
        .map(|m| {
            let e = m.routing.n_experts;
            LayerRoute {
                probs: m.routing.probs[row * e..(row + 1) * e].to_vec(),
                chosen: m
                    .routing
                    .choices(row)
                    .map(|(x, w, kept)| (x as u16, w, kept))
                    .collect(),
            }
        })
        .collect()
}

/// Routes of the generate stream, oldest first.
#[derive(Debug, Default)]
pub(super) struct GeneratedRoutes {
    tokens: VecDeque<RoutedToken>,
}

impl Runner {
    /// Switches route capture on or off (off drops what was kept).
    pub(super) fn set_follow(&mut self, on: bool) {
        self.follow = on;
        if !on {
            self.routes = None;
            self.generated_routes.tokens.clear();
        }
    }

    /// Captures the routes of the pass just run, when the view asks for them: every generated
    /// token, and for eval the first sequence of the batch when a snapshot is about to go out.
    pub(super) fn capture_routes(
        &mut self,
        trace: &ForwardTrace,
        outcome: &PassOutcome,
        interval: Duration,
    ) {
        if !self.follow {
            return;
        }
        let due = self.publish_due(interval);
        let tokens: Vec<RoutedToken> = if outcome.stream.is_empty() {
            if !due {
                return;
            }
            let Some(seq) = self.workload.last_eval_sequence(0) else {
                return;
            };
            seq.into_iter()
                .map(|t| RoutedToken {
                    token: t.token,
                    bytes: t.bytes,
                    position: t.position,
                    target: Some((t.target, t.target_bytes)),
                    loss_nats: Some(t.loss_nats),
                    origin: None,
                    layers: layer_routes(trace, t.row),
                })
                .collect()
        } else {
            let kept = &mut self.generated_routes.tokens;
            for s in &outcome.stream {
                kept.push_back(RoutedToken {
                    token: s.token,
                    bytes: s.bytes.clone(),
                    position: trace.start_pos + s.row,
                    target: None,
                    loss_nats: None,
                    origin: Some(s.origin),
                    layers: layer_routes(trace, s.row),
                });
            }
            while kept.len() > GENERATED_ROUTES {
                kept.pop_front();
            }
            if !due {
                return;
            }
            kept.iter().cloned().collect()
        };
        let info = self.workload.info();
        let source = if outcome.stream.is_empty() {
            format!(
                "eval batch {}, sequence 1 of {}",
                self.eval_batches, info.batch
            )
        } else {
            format!("generate stream, last {} tokens", tokens.len())
        };
        self.routes = Some(Arc::new(TokenRoutes {
            source,
            layers: self.model.moe_layers().to_vec(),
            n_experts: self.model.config().n_experts,
            policies: self.routing.policies().collect(),
            tokens,
        }));
    }
}
