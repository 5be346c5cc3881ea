//! Where each panel goes, for a terminal size and the displayed snapshot.
//!
//! Drawing and mouse hit-testing both call [`screen`], so a click lands on what was drawn.

use ratatui::layout::{Constraint, Layout, Rect};

use crate::tui::app::App;

/// Smallest terminal the full screen fits in.
pub const MIN_WIDTH: u16 = 80;
/// Smallest terminal height the full screen fits in.
pub const MIN_HEIGHT: u16 = 24;
/// From this width on, panels go in two columns.
pub const WIDE_WIDTH: u16 = 120;

/// The area of every panel. Panels never overlap; a panel may be empty (height 0) when the
/// terminal has no room for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScreenLayout {
    /// Model, workload, policy, throughput, compute saved, quality.
    pub header: Rect,
    /// Expert heatmap.
    pub heatmap: Rect,
    /// Threshold sliders.
    pub sliders: Rect,
    /// Latency, FLOPs and experts-per-token histograms.
    pub histograms: Rect,
    /// Time series of the last minutes (tokens/s, experts per token, compute saved, Δ bits/byte).
    pub history: Rect,
    /// Where the time of a forward pass goes (attention, router, experts, the rest).
    pub timing: Rect,
    /// GPU counters or process CPU and memory.
    pub device: Rect,
    /// Generated text (generate workload only).
    pub generated: Option<Rect>,
    /// Replay only: the timeline (position, wall time, the bar to scrub); empty otherwise.
    pub timeline: Rect,
    /// Messages and key hints.
    pub status: Rect,
}

impl ScreenLayout {
    /// Every panel's area with its name (empty ones included), for checks and tests.
    pub fn panels(&self) -> Vec<(&'static str, Rect)> {
        let mut v = vec![
            ("header", self.header),
            ("heatmap", self.heatmap),
            ("sliders", self.sliders),
            ("histograms", self.histograms),
            ("history", self.history),
            ("timing", self.timing),
            ("device", self.device),
            ("timeline", self.timeline),
            ("status", self.status),
        ];
        if let Some(g) = self.generated {
            v.push(("generated", g));
        }
        v
    }
}

/// Lines of the timing panel: its title and up to three lines of figures.
const TIMING_H: u16 = 4;

/// The layout for `area`, or `None` when the terminal is below [`MIN_WIDTH`] x [`MIN_HEIGHT`].
pub fn screen(area: Rect, app: &App) -> Option<ScreenLayout> {
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        return None;
    }
    let snap = app.displayed();
    let n = snap.map_or(0, |s| s.policy.layers.len()) as u16;
    let gpus = snap.map_or(0, |s| s.device.gpus.len()) as u16;
    let has_text = snap.is_some_and(|s| s.generated.is_some());
    let gen_h = if !has_text {
        0
    } else if app.theme.has_color() {
        // Title and two lines of text (shaded by background colour).
        if area.height >= 40 { 4 } else { 3 }
    } else {
        // Each line of text has a line of shade glyphs under it.
        if area.height >= 40 { 5 } else { 3 }
    };
    let timeline_h = if app.replay.is_some() {
        crate::tui::replay::TIMELINE_ROWS
    } else {
        0
    };
    let [header, body, generated, timeline, status] = area.layout(&Layout::vertical([
        Constraint::Length(3),
        Constraint::Fill(1),
        Constraint::Length(gen_h),
        Constraint::Length(timeline_h),
        Constraint::Length(1),
    ]));
    // The heatmap wants its title, axis and detail lines and up to 3 lines per layer (2 on
    // narrow screens), never more than about half the column.
    let heat_want = |lines_per_layer: u16, column: u16| {
        (3 + lines_per_layer * n).min((column * 11 / 20).max(n + 3))
    };
    let (heatmap, sliders, histograms, history, timing, device);
    if area.width >= WIDE_WIDTH {
        // A one-column gap between the two columns: no panel draws against another.
        let [left, right] = body.layout(
            &Layout::horizontal([Constraint::Percentage(58), Constraint::Fill(1)]).spacing(1),
        );
        // Left: what the user acts on, its history and its device cost; right: the
        // distributions and where the time goes.
        let device_want = if gpus > 0 { 1 + 3 * gpus + 1 } else { 4 };
        // The sliders scroll, so a big model's heatmap keeps up to half the column.
        let heat_min = (n + 3).clamp(4, (left.height / 2).max(4));
        let [h, s, hist, d] = stack(
            left,
            [
                (heat_min, heat_want(3, left.height)),
                // The sliders scroll: a big model's keep a third of the column.
                (3, (n + 2).min((left.height / 3).max(6))),
                (0, 6),
                (2, device_want),
            ],
            [1, 0, 3, 2],
            2,
        );
        let [hi, t] = stack(right, [(9, u16::MAX), (0, TIMING_H)], [1, 0], 0);
        (heatmap, sliders, histograms, history, timing, device) = (h, s, hi, hist, t, d);
    } else {
        let device_want = if gpus > 0 { 1 + 2 * gpus } else { 3 };
        // Sliders first: they are what the user acts on; then the heatmap, the histograms,
        // the device; history and timing take what is left.
        let heat_min = (n + 3).clamp(4, (body.height / 4).max(4));
        let [h, s, hi, d, t, hist] = stack(
            body,
            [
                (heat_min, heat_want(2, body.height)),
                (3, n + 2),
                (5, 10),
                (2, device_want),
                (0, TIMING_H),
                (0, 8),
            ],
            [1, 0, 2, 3, 4, 5],
            5,
        );
        (heatmap, sliders, histograms, history, timing, device) = (h, s, hi, hist, t, d);
    }
    Some(ScreenLayout {
        header,
        heatmap,
        sliders,
        histograms,
        history,
        timing,
        device,
        generated: has_text.then_some(generated),
        timeline,
        status,
    })
}

/// Splits `area` vertically into parts given as (minimum, wish): every part gets its minimum
/// (the last ones shrink first when even that does not fit), then up to its wish in the
/// priority `order`, and the part `flex` takes what is left.
pub fn stack<const N: usize>(
    area: Rect,
    parts: [(u16, u16); N],
    order: [usize; N],
    flex: usize,
) -> [Rect; N] {
    let mut h: [u16; N] = parts.map(|p| p.0);
    let mut over = h.iter().map(|&x| x as u32).sum::<u32>() as i64 - area.height as i64;
    for x in h.iter_mut().rev() {
        if over <= 0 {
            break;
        }
        let cut = (*x as i64).min(over);
        *x -= cut as u16;
        over -= cut;
    }
    let mut left = area.height.saturating_sub(h.iter().sum());
    for i in order {
        let add = left.min(parts[i].1.saturating_sub(h[i]));
        h[i] += add;
        left -= add;
    }
    h[flex] += left;
    let mut y = area.y;
    let mut out = [Rect::default(); N];
    for i in 0..N {
        out[i] = Rect::new(area.x, y, area.width, h[i]);
        y += h[i];
    }
    out
}

/// The first of `n` items to show in `rows` rows so that `selected` is visible: the selection
/// stays centred while scrolling, which needs no scroll state.
pub fn first_visible(selected: usize, rows: usize, n: usize) -> usize {
    if rows == 0 || n <= rows {
        return 0;
    }
    selected.saturating_sub(rows / 2).min(n - rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_gives_minimums_then_wishes() {
        let a = Rect::new(0, 0, 10, 20);
        let [x, y, z] = stack(a, [(2, 5), (2, 4), (3, 3)], [0, 1, 2], 1);
        assert_eq!((x.height, y.height, z.height), (5, 12, 3));
        assert_eq!((x.y, y.y, z.y), (0, 5, 17));
        let small = Rect::new(0, 0, 10, 5);
        let [x, y, z] = stack(small, [(2, 5), (2, 4), (3, 3)], [0, 1, 2], 0);
        assert_eq!((x.height, y.height, z.height), (2, 2, 1));
        let [x, y, z] = stack(a, [(2, 5), (2, 30), (3, 3)], [1, 0, 2], 0);
        assert_eq!((x.height, y.height, z.height), (2, 15, 3));
        let [x, y, z] = stack(small, [(2, 5), (2, 4), (3, 3)], [0, 1, 2], 0);
        assert_eq!((x.height, y.height, z.height), (2, 2, 1));
    }

    #[test]
    fn panels_never_overlap_and_stay_on_screen() {
        use crate::profiling::fixtures::{example_snapshot, large_snapshot};
        use crate::profiling::snapshot::WorkloadKind;
        use crate::tui::theme::{ColorMode, Theme};
        let sizes = [
            (80, 24),
            (100, 30),
            (120, 40),
            (160, 48),
            (200, 60),
            (119, 24),
        ];
        let snaps = [
            example_snapshot(WorkloadKind::Eval, 16, false),
            example_snapshot(WorkloadKind::Generate, 64, true),
            large_snapshot(),
        ];
        for snap in snaps {
            for mode in [ColorMode::NoColor, ColorMode::TrueColor] {
                let mut app = App::new(Theme::new(mode));
                app.push_snapshot(snap.clone());
                for (w, h) in sizes {
                    let area = Rect::new(0, 0, w, h);
                    let l = screen(area, &app).unwrap();
                    let panels = l.panels();
                    for (i, (a, ra)) in panels.iter().enumerate() {
                        assert!(area.union(*ra) == area, "{a} off screen at {w}x{h}: {ra:?}");
                        for (b, rb) in &panels[i + 1..] {
                            assert!(
                                ra.is_empty() || rb.is_empty() || !ra.intersects(*rb),
                                "{a} {ra:?} overlaps {b} {rb:?} at {w}x{h}"
                            );
                        }
                    }
                    // The figures the user acts on always get room.
                    assert!(l.sliders.height >= 3 && l.heatmap.height >= 4, "{w}x{h}");
                    assert!(l.histograms.height >= 5, "{w}x{h}");
                    if w >= WIDE_WIDTH {
                        // The columns are a gap apart.
                        assert!(l.histograms.x > l.heatmap.x + l.heatmap.width, "{w}x{h}");
                    }
                    if h >= 40 && snap.policy.layers.len() <= 8 {
                        assert!(l.history.height >= 5, "history at {w}x{h}: {l:?}");
                        assert!(l.timing.height >= TIMING_H, "timing at {w}x{h}");
                    }
                }
            }
        }
    }

    #[test]
    fn scrolling_keeps_selection_visible() {
        assert_eq!(first_visible(0, 5, 24), 0);
        assert_eq!(first_visible(10, 5, 24), 8);
        assert_eq!(first_visible(23, 5, 24), 19);
        assert_eq!(first_visible(3, 5, 4), 0);
        for sel in 0..24 {
            let f = first_visible(sel, 5, 24);
            assert!(f <= sel && sel < f + 5);
        }
    }
}
