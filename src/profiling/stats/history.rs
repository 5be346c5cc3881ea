//! The time series behind the UI's history panel: one point per second, the last
//! [`HISTORY_POINTS`] of them, kept across epochs so that a change of settings shows as a step.
//!
//! The session calls [`History::sample`] whenever it publishes; a point is taken once at least
//! [`HISTORY_PERIOD_S`] has passed since the previous one. Throughput is computed over the
//! interval since the previous point from running totals that no epoch resets, so a point never
//! mixes two intervals; the routing and quality figures are those of the snapshot's window or
//! epoch at that instant.

use std::collections::VecDeque;

use crate::profiling::snapshot::HistoryPoint;

/// Seconds between two points.
pub const HISTORY_PERIOD_S: f64 = 1.0;
/// Points kept: five minutes at one per second.
pub const HISTORY_POINTS: usize = 300;

/// Totals since the session started, across epochs (reference passes excluded), read at each
/// sample to get the interval's throughput.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Totals {
    /// Tokens processed.
    pub tokens: u64,
    /// Wall time of the forward passes that processed them, nanoseconds.
    pub wall_ns: u64,
}

/// What the current statistics say at the instant of a sample (each `None` when there is no
/// measurement behind it).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Figures {
    /// Epoch in force.
    pub epoch: u64,
    /// Mean experts per token over the window.
    pub experts_per_token: Option<f64>,
    /// MoE compute saved against all experts over the window, percent.
    pub moe_saved_pct: Option<f64>,
    /// Δ bits/byte of the epoch against the reference policy.
    pub delta_bits_per_byte: Option<f64>,
    /// Its standard error.
    pub delta_stderr: Option<f64>,
    /// Compared batches behind it.
    pub compared_batches: u64,
}

/// The ring of points and the totals at the last point.
#[derive(Clone, Debug, Default)]
pub struct History {
    points: VecDeque<HistoryPoint>,
    last: Option<(f64, Totals)>,
}

impl History {
    /// Takes a point at session time `now_s` if [`HISTORY_PERIOD_S`] has passed since the last
    /// one (the first call only records the starting totals); returns whether it did.
    pub fn sample(&mut self, now_s: f64, totals: Totals, figures: Figures) -> bool {
        let Some((t0, before)) = self.last else {
            self.last = Some((now_s, totals));
            return false;
        };
        if now_s - t0 < HISTORY_PERIOD_S {
            return false;
        }
        let tokens = totals.tokens.saturating_sub(before.tokens);
        let wall_ns = totals.wall_ns.saturating_sub(before.wall_ns);
        // No pass in the interval (paused, or one pass longer than a second): no throughput
        // rather than a zero that looks measured.
        let tokens_per_second =
            (tokens > 0 && wall_ns > 0).then(|| tokens as f64 * 1e9 / wall_ns as f64);
        if self.points.len() == HISTORY_POINTS {
            self.points.pop_front();
        }
        self.points.push_back(HistoryPoint {
            t_s: now_s,
            epoch: figures.epoch,
            tokens,
            tokens_per_second,
            experts_per_token: figures.experts_per_token,
            moe_saved_pct: figures.moe_saved_pct,
            delta_bits_per_byte: figures.delta_bits_per_byte,
            delta_stderr: figures.delta_stderr,
            compared_batches: figures.compared_batches,
        });
        self.last = Some((now_s, totals));
        true
    }

    /// The points, oldest first.
    pub fn points(&self) -> Vec<HistoryPoint> {
        self.points.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(tokens: u64, wall_ms: u64) -> Totals {
        Totals {
            tokens,
            wall_ns: wall_ms * 1_000_000,
        }
    }

    fn figures(epoch: u64) -> Figures {
        Figures {
            epoch,
            experts_per_token: Some(2.0),
            ..Figures::default()
        }
    }

    #[test]
    fn one_point_per_period_with_the_interval_throughput() {
        let mut h = History::default();
        assert!(!h.sample(0.0, totals(0, 0), figures(0)));
        // Too early: nothing.
        assert!(!h.sample(0.5, totals(100, 400), figures(0)));
        // 1000 tokens in 800 ms of passes since the start.
        assert!(h.sample(1.0, totals(1000, 800), figures(0)));
        // The next interval: 500 tokens in 1000 ms.
        assert!(h.sample(2.1, totals(1500, 1800), figures(1)));
        let p = h.points();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].tokens, 1000);
        assert!((p[0].tokens_per_second.unwrap() - 1250.0).abs() < 1e-9);
        assert!((p[1].tokens_per_second.unwrap() - 500.0).abs() < 1e-9);
        assert_eq!((p[0].epoch, p[1].epoch), (0, 1));
        assert_eq!(p[1].t_s, 2.1);
    }

    #[test]
    fn an_idle_interval_has_no_throughput() {
        let mut h = History::default();
        h.sample(0.0, totals(10, 10), figures(0));
        assert!(h.sample(1.0, totals(10, 10), figures(0)));
        assert_eq!(h.points()[0].tokens_per_second, None);
        assert_eq!(h.points()[0].tokens, 0);
    }

    #[test]
    fn the_ring_keeps_the_newest_points() {
        let mut h = History::default();
        h.sample(0.0, totals(0, 0), figures(0));
        for i in 1..=(HISTORY_POINTS as u64 + 20) {
            assert!(h.sample(i as f64, totals(i, i), figures(i)));
        }
        let p = h.points();
        assert_eq!(p.len(), HISTORY_POINTS);
        assert_eq!(p[0].epoch, 21);
        assert_eq!(p.last().unwrap().epoch, HISTORY_POINTS as u64 + 20);
    }
}
