//! Holds slider requests back until the keys settle, so that ten quick presses make one new
//! epoch (and one Δ bits/byte that rests on more than one compared batch), not ten.
//!
//! Policy and capacity requests wait here; each new one for the same layers replaces the one
//! waiting. They go to the session together once [`DEBOUNCE`] has passed since the last of
//! them. The sliders show the requested value meanwhile (the app's pending requests).

use std::time::{Duration, Instant};

use crate::session::{Control, Layers};

/// How long the keys must rest before the requests go out.
pub const DEBOUNCE: Duration = Duration::from_millis(500);

/// Requests waiting for the keys to settle.
#[derive(Clone, Debug, Default)]
pub struct Debouncer {
    waiting: Vec<Control>,
    last_push: Option<Instant>,
}

/// Whether `control` waits for the keys to settle (it starts an epoch and comes in bursts).
pub fn is_debounced(control: &Control) -> bool {
    matches!(
        control,
        Control::SetPolicy { .. } | Control::SetCapacityFactor(_)
    )
}

/// Whether `b` makes `a` obsolete: the same kind of request for the same layers, or a request
/// for every layer over one for a single layer (it overwrites it).
fn supersedes(b: &Control, a: &Control) -> bool {
    match (a, b) {
        (Control::SetPolicy { layers: la, .. }, Control::SetPolicy { layers: lb, .. }) => {
            la == lb || *lb == Layers::All
        }
        (Control::SetCapacityFactor(_), Control::SetCapacityFactor(_)) => true,
        _ => false,
    }
}

impl Debouncer {
    /// Queues `control` at time `now`, replacing what it makes obsolete; the wait restarts.
    pub fn push(&mut self, control: Control, now: Instant) {
        self.waiting.retain(|a| !supersedes(&control, a));
        self.waiting.push(control);
        self.last_push = Some(now);
    }

    /// When the waiting requests become due, if any wait.
    pub fn deadline(&self) -> Option<Instant> {
        if self.waiting.is_empty() {
            None
        } else {
            self.last_push.map(|t| t + DEBOUNCE)
        }
    }

    /// True while requests wait.
    pub fn is_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// The requests due at `now` (all of them once the keys have rested long enough), in the
    /// order they were made.
    pub fn due(&mut self, now: Instant) -> Vec<Control> {
        match self.deadline() {
            Some(d) if now >= d => self.take_all(),
            _ => Vec::new(),
        }
    }

    /// Every waiting request, due or not (before an order that must not overtake them, and on
    /// quitting).
    pub fn take_all(&mut self) -> Vec<Control> {
        self.last_push = None;
        std::mem::take(&mut self.waiting)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::RoutingPolicy;

    fn t(layers: Layers, t: f32) -> Control {
        Control::SetPolicy {
            layers,
            policy: RoutingPolicy::threshold(t),
        }
    }

    #[test]
    fn ten_quick_presses_make_one_request() {
        let mut d = Debouncer::default();
        let start = Instant::now();
        let step = Duration::from_millis(100);
        for i in 0..10u32 {
            let now = start + step * i;
            d.push(t(Layers::All, 0.9 - 0.01 * (i + 1) as f32), now);
            // Never due while the keys keep coming.
            assert!(d.due(now + step / 2).is_empty());
        }
        let last = start + step * 9;
        assert_eq!(d.deadline(), Some(last + DEBOUNCE));
        assert!(d.due(last + DEBOUNCE - Duration::from_millis(1)).is_empty());
        assert_eq!(
            d.due(last + DEBOUNCE),
            vec![t(Layers::All, 0.9 - 0.01 * 10.0)]
        );
        assert!(!d.is_waiting());
        assert_eq!(d.deadline(), None);
    }

    #[test]
    fn different_layers_wait_together_and_all_overrides_one() {
        let mut d = Debouncer::default();
        let now = Instant::now();
        d.push(t(Layers::Slot(0), 0.5), now);
        d.push(t(Layers::Slot(1), 0.6), now);
        d.push(Control::SetCapacityFactor(Some(2.0)), now);
        d.push(t(Layers::Slot(0), 0.4), now);
        assert_eq!(
            d.take_all(),
            vec![
                t(Layers::Slot(1), 0.6),
                Control::SetCapacityFactor(Some(2.0)),
                t(Layers::Slot(0), 0.4)
            ]
        );
        d.push(t(Layers::Slot(0), 0.5), now);
        d.push(t(Layers::All, 0.7), now);
        assert_eq!(d.take_all(), vec![t(Layers::All, 0.7)]);
        assert!(is_debounced(&t(Layers::All, 0.7)));
        assert!(!is_debounced(&Control::ResetStats));
        assert!(!is_debounced(&Control::SetPaused(true)));
    }
}
