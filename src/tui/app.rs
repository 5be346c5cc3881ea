//! The UI's whole state: what is shown, what is focused, and what was asked of the session.
//!
//! Everything drawn comes from the displayed [`Snapshot`] (the latest, or the frozen copy) plus
//! this state; the render functions only read it.

use std::path::PathBuf;

use std::sync::Arc;

use crate::profiling::snapshot::{Snapshot, TokenRoutes, TuneStatus};
use crate::routing::RoutingPolicy;
use crate::session::tune::Budget;
use crate::tui::debounce::Debouncer;
use crate::tui::theme::Theme;

/// Writes a report of the displayed snapshot and returns the paths written. The UI calls it on
/// `e` (on the UI thread) and shows the paths or the error.
pub type Exporter = Box<dyn FnMut(&Snapshot) -> anyhow::Result<Vec<PathBuf>>>;

/// The panel that arrow keys act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Panel {
    /// Up/down choose a slider, left/right change its threshold.
    Sliders,
    /// Up/down choose a layer, left/right move the expert cursor.
    Heatmap,
}

/// A threshold slider: the global one or one MoE layer (by MoE slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// All MoE layers at once.
    Global,
    /// One MoE layer, by MoE slot.
    Layer(usize),
}

/// The column the per-expert table is sorted by (`s` cycles them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableSort {
    /// Expert number, ascending.
    Expert,
    /// Share of tokens, largest first.
    Share,
    /// Gate mass, largest first.
    GateMass,
    /// Load against the mean load, largest first.
    Load,
}

impl TableSort {
    /// The next column in the cycle.
    pub fn next(self) -> Self {
        match self {
            TableSort::Expert => TableSort::Share,
            TableSort::Share => TableSort::GateMass,
            TableSort::GateMass => TableSort::Load,
            TableSort::Load => TableSort::Expert,
        }
    }

    /// The column's name as the table header shows it.
    pub fn name(self) -> &'static str {
        match self {
            TableSort::Expert => "expert",
            TableSort::Share => "share of tokens",
            TableSort::GateMass => "gate mass",
            TableSort::Load => "load / mean",
        }
    }
}

/// Redraw caps `<` and `>` step through, frames per second.
pub const FPS_STEPS: [f64; 8] = [1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0];

/// A line for the status bar: the result of the last action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The text shown.
    pub text: String,
    /// Shown in the error style.
    pub is_error: bool,
}

/// A policy the UI asked for that the snapshots do not show yet.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pending {
    /// The requested policy.
    pub policy: RoutingPolicy,
    /// Sequence number of the latest snapshot when it was requested.
    pub requested_at: u64,
}

/// Snapshots after which an unacknowledged request is dropped (the session refused or
/// adjusted it); about 5 s at the session's 10 snapshots per second.
const PENDING_EXPIRY_SNAPSHOTS: u64 = 50;

/// The UI state.
pub struct App {
    latest: Option<Snapshot>,
    frozen: Option<Snapshot>,
    /// The panel arrow keys act on.
    pub panel: Panel,
    /// The focused slider.
    pub slider: Target,
    /// The selected MoE slot: the highlighted heatmap row and the experts-per-token histogram.
    pub layer: usize,
    /// The expert under the heatmap cursor.
    pub expert: usize,
    /// Heatmap zoomed to one expert per cell around the cursor (else every expert, binned).
    pub heat_zoom: bool,
    /// The help overlay is open.
    pub help_open: bool,
    /// The key bindings in force (defaults with the settings file's `[keys]`).
    pub keymap: crate::tui::keys::KeyMap,
    /// The per-expert table of the selected layer is open.
    pub table_open: bool,
    /// The per-expert table's sort column.
    pub table_sort: TableSort,
    /// Most redraws per second (`<` / `>` change it).
    pub fps: f64,
    /// The A/B view (`a`).
    pub compare: crate::tui::compare::CompareUi,
    /// Slider requests waiting for the keys to settle (see [`crate::tui::debounce`]).
    pub debounce: Debouncer,
    /// Colours and styles.
    pub theme: Theme,
    /// The result of the last action, if worth saying.
    pub message: Option<Message>,
    /// Terminal size (columns, rows), for mouse hit-testing with the same layout as drawing.
    pub size: (u16, u16),
    /// The snapshot channel is closed: the model session has ended.
    pub session_ended: bool,
    /// The user asked to quit.
    pub should_quit: bool,
    /// Ctrl-Z or SIGTSTP: hand the terminal back and stop (taken by the event loop).
    pub suspend_requested: bool,
    /// SIGCONT: take the terminal again and redraw (taken by the event loop).
    pub resume_requested: bool,
    pending: Vec<Option<Pending>>,
    pause_requested: Option<bool>,
    last_threshold: Vec<f32>,
    last_top_k: Vec<usize>,
    capacity_on: f32,
    capacity_requested: Option<(Option<f32>, u64)>,
    exporter: Option<Exporter>,
    /// The budget `T` tunes to.
    pub tune_budget: Budget,
    /// The token view (`o`), when open.
    pub follow: Option<FollowView>,
    /// Set when playing a recording: the timeline and the player (`xmoe-top replay`).
    pub replay: Option<crate::tui::replay::ReplayLink>,
    /// Set while the session is being recorded (`--record`).
    pub recording: Option<Arc<crate::record::RecorderStatus>>,
}

/// The token view's state: the tokens it holds still (until `u`) and the cursor.
#[derive(Clone, Debug, Default)]
pub struct FollowView {
    /// The tokens shown; `None` until a snapshot brings them.
    pub routes: Option<Arc<TokenRoutes>>,
    /// The selected token.
    pub cursor: usize,
}

impl FollowView {
    /// Moves the cursor by `by` tokens, within the tokens held.
    pub fn move_cursor(&mut self, by: isize) {
        let n = self.routes.as_ref().map_or(0, |r| r.tokens.len());
        self.cursor = self
            .cursor
            .saturating_add_signed(by)
            .min(n.saturating_sub(1));
    }
}

/// The budget `T` tunes to when none is given: bits/byte at most 1% above the reference's.
pub const DEFAULT_TUNE_BUDGET: Budget = Budget::RelativeBitsPerByte(0.01);

/// Capacity factor `c` switches on when no other is known: the XMoE language models' setting
/// (capacity per expert = ceil(8 x tokens / E)); with threshold routing a factor must exceed the
/// mean experts per token, or most tokens lose experts.
pub const DEFAULT_CAPACITY_FACTOR: f32 = 8.0;

impl App {
    /// An empty state (no snapshot yet) with `theme`.
    pub fn new(theme: Theme) -> Self {
        Self {
            latest: None,
            frozen: None,
            panel: Panel::Sliders,
            slider: Target::Global,
            layer: 0,
            expert: 0,
            heat_zoom: false,
            help_open: false,
            keymap: Default::default(),
            table_open: false,
            table_sort: TableSort::Share,
            fps: crate::tui::DEFAULT_FPS,
            compare: Default::default(),
            debounce: Debouncer::default(),
            theme,
            message: None,
            size: (0, 0),
            session_ended: false,
            should_quit: false,
            suspend_requested: false,
            resume_requested: false,
            pending: Vec::new(),
            pause_requested: None,
            last_threshold: Vec::new(),
            last_top_k: Vec::new(),
            capacity_on: DEFAULT_CAPACITY_FACTOR,
            capacity_requested: None,
            exporter: None,
            tune_budget: DEFAULT_TUNE_BUDGET,
            follow: None,
            replay: None,
            recording: None,
        }
    }

    /// Plugs in the report exporter that `e` calls; without one, `e` says export is unavailable.
    pub fn with_exporter(mut self, exporter: Option<Exporter>) -> Self {
        self.exporter = exporter;
        self
    }

    /// The capacity factor `c` switches on (until a snapshot shows one in force).
    pub fn with_capacity_factor(mut self, factor: f32) -> Self {
        if factor.is_finite() && factor > 0.0 {
            self.capacity_on = factor;
        }
        self
    }

    /// The capacity factor to ask for when `c` is pressed: off when one is (or is about to be)
    /// in force, else the last one in force.
    pub fn toggled_capacity(&mut self) -> Option<f32> {
        let next = match self.capacity_in_force() {
            Some(_) => None,
            None => Some(self.capacity_on),
        };
        self.request_capacity(next);
        next
    }

    /// The capacity factor to ask for when `[` or `]` is pressed: the one in force (or about to
    /// be, or the last one) times `by`, kept within [0.1, 10^6] and rounded to 3 significant
    /// digits so the header shows what is in force.
    pub fn scaled_capacity(&mut self, by: f32) -> f32 {
        let raw = (self.capacity_in_force().unwrap_or(self.capacity_on) * by).clamp(0.1, 1e6);
        let digits = 10f32.powi(2 - raw.log10().floor() as i32);
        let next = (raw * digits).round() / digits;
        self.request_capacity(Some(next));
        self.capacity_on = next;
        next
    }

    /// The factor requested and not yet confirmed, else the one the latest snapshot shows.
    fn capacity_in_force(&self) -> Option<f32> {
        match self.capacity_requested {
            Some((c, _)) => c,
            None => self.latest.as_ref().and_then(|s| s.policy.capacity_factor),
        }
    }

    fn request_capacity(&mut self, factor: Option<f32>) {
        let at = self.latest.as_ref().map_or(0, |s| s.sequence);
        self.capacity_requested = Some((factor, at));
    }

    /// The next redraw cap up (`up`) or down the ladder [`FPS_STEPS`] from the current one.
    pub fn step_fps(&mut self, up: bool) -> f64 {
        let cur = self.fps;
        let next = if up {
            FPS_STEPS.iter().copied().find(|&f| f > cur + 1e-9)
        } else {
            FPS_STEPS.iter().rev().copied().find(|&f| f < cur - 1e-9)
        };
        self.fps = next.unwrap_or(cur);
        self.fps
    }

    /// The quick tune the session reports (running, done or failed), from the latest snapshot
    /// (a frozen display still shows its progress).
    pub fn tune_status(&self) -> Option<&TuneStatus> {
        self.latest.as_ref()?.tune.as_ref()
    }

    /// True when an exporter is plugged in.
    pub fn can_export(&self) -> bool {
        self.exporter.is_some()
    }

    /// Newer device counters than the latest snapshot's (the sampler runs while a pass keeps
    /// the session from publishing): they replace that snapshot's. Returns whether the screen
    /// changes (not while frozen, nor before the first snapshot, nor for an older sample).
    pub fn update_device(&mut self, device: crate::profiling::snapshot::DeviceSnapshot) -> bool {
        let Some(latest) = self.latest.as_mut() else {
            return false;
        };
        let at = |d: &crate::profiling::snapshot::DeviceSnapshot| d.history.last().map(|p| p.t_s);
        if at(&device) <= at(&latest.device) {
            return false;
        }
        latest.device = device;
        !self.is_frozen()
    }

    /// Takes a new snapshot from the session: it becomes the latest (the display keeps the frozen
    /// copy while frozen), acknowledged requests are cleared and selections are kept in range.
    pub fn push_snapshot(&mut self, snap: Snapshot) {
        let n = snap.policy.layers.len();
        self.pending.resize(n, None);
        self.last_threshold.resize(n, 0.9);
        self.last_top_k.resize(n, snap.model.top_k_baseline.max(1));
        for (slot, lp) in snap.policy.layers.iter().enumerate() {
            match lp.policy {
                RoutingPolicy::Threshold { t, .. } => self.last_threshold[slot] = t,
                RoutingPolicy::TopK { k, .. } => self.last_top_k[slot] = k,
                RoutingPolicy::Dense => {}
            }
            if let Some(p) = self.pending[slot]
                && (p.policy.same_as(&lp.policy)
                    || snap.sequence >= p.requested_at + PENDING_EXPIRY_SNAPSHOTS)
            {
                self.pending[slot] = None;
            }
        }
        if let Some(c) = snap.policy.capacity_factor {
            self.capacity_on = c;
        }
        if let Some((c, at)) = self.capacity_requested
            && (c == snap.policy.capacity_factor || snap.sequence >= at + PENDING_EXPIRY_SNAPSHOTS)
        {
            self.capacity_requested = None;
        }
        if self.pause_requested == Some(snap.paused) {
            self.pause_requested = None;
        }
        self.latest = Some(snap);
        self.take_routes();
        self.clamp_selection();
    }

    /// Fills an open token view that waits for tokens from the latest snapshot (cursor on the
    /// last token, the one with the longest context).
    pub fn take_routes(&mut self) {
        let Some(f) = self.follow.as_mut() else {
            return;
        };
        if f.routes.is_some() {
            return;
        }
        if let Some(r) = self.latest.as_ref().and_then(|s| s.routes.clone()) {
            f.cursor = r.tokens.len().saturating_sub(1);
            f.routes = Some(r);
        }
    }

    fn clamp_selection(&mut self) {
        let (n, e) = (self.n_slots(), self.n_experts());
        self.layer = self.layer.min(n.saturating_sub(1));
        self.expert = self.expert.min(e.saturating_sub(1));
        if let Target::Layer(s) = self.slider
            && s >= n
        {
            self.slider = if n == 0 {
                Target::Global
            } else {
                Target::Layer(n - 1)
            };
        }
    }

    /// The snapshot on screen: the frozen copy while frozen, else the latest.
    pub fn displayed(&self) -> Option<&Snapshot> {
        self.frozen.as_ref().or(self.latest.as_ref())
    }

    /// The latest snapshot from the session (also while frozen).
    pub fn latest(&self) -> Option<&Snapshot> {
        self.latest.as_ref()
    }

    /// True while the display is frozen.
    pub fn is_frozen(&self) -> bool {
        self.frozen.is_some()
    }

    /// Freezes the display on the latest snapshot, or unfreezes it.
    pub fn toggle_freeze(&mut self) {
        self.frozen = match self.frozen {
            Some(_) => None,
            None => self.latest.clone(),
        };
    }

    /// MoE layers of the model (0 before the first snapshot).
    pub fn n_slots(&self) -> usize {
        self.latest.as_ref().map_or(0, |s| s.policy.layers.len())
    }

    /// Experts per MoE layer (0 before the first snapshot).
    pub fn n_experts(&self) -> usize {
        self.latest.as_ref().map_or(0, |s| s.model.n_experts)
    }

    /// The request for `slot` not yet shown by a snapshot.
    pub fn pending(&self, slot: usize) -> Option<Pending> {
        self.pending.get(slot).copied().flatten()
    }

    /// The policy `slot` will have once the session has applied every request: the pending
    /// request, else the latest snapshot's policy.
    pub fn effective_policy(&self, slot: usize) -> Option<RoutingPolicy> {
        self.pending(slot).map(|p| p.policy).or_else(|| {
            self.latest
                .as_ref()
                .and_then(|s| s.policy.layers.get(slot).map(|l| l.policy))
        })
    }

    /// The last threshold `slot` used (its current t when it routes by threshold).
    pub fn last_threshold(&self, slot: usize) -> f32 {
        match self.effective_policy(slot) {
            Some(RoutingPolicy::Threshold { t, .. }) => t,
            _ => self.last_threshold.get(slot).copied().unwrap_or(0.9),
        }
    }

    /// The last k `slot` used in top-k (the compute-matched baseline k before any).
    pub fn last_top_k(&self, slot: usize) -> usize {
        match self.effective_policy(slot) {
            Some(RoutingPolicy::TopK { k, .. }) => k,
            _ => self.last_top_k.get(slot).copied().unwrap_or(1),
        }
    }

    /// Records a request for `slots` so that further key presses build on it.
    pub fn set_pending(&mut self, slots: impl IntoIterator<Item = usize>, policy: RoutingPolicy) {
        let at = self.latest.as_ref().map_or(0, |s| s.sequence);
        for slot in slots {
            match policy {
                RoutingPolicy::Threshold { t, .. } => {
                    if let Some(x) = self.last_threshold.get_mut(slot) {
                        *x = t;
                    }
                }
                RoutingPolicy::TopK { k, .. } => {
                    if let Some(x) = self.last_top_k.get_mut(slot) {
                        *x = k;
                    }
                }
                RoutingPolicy::Dense => {}
            }
            if let Some(p) = self.pending.get_mut(slot) {
                *p = Some(Pending {
                    policy,
                    requested_at: at,
                });
            }
        }
    }

    /// Whether the model is (or has been asked to be) paused.
    pub fn paused_effective(&self) -> bool {
        self.pause_requested
            .or_else(|| self.latest.as_ref().map(|s| s.paused))
            .unwrap_or(false)
    }

    /// Records a pause or resume request.
    pub fn request_pause(&mut self, paused: bool) {
        self.pause_requested = Some(paused);
    }

    /// Runs the exporter on the displayed snapshot and reports the outcome in the status bar.
    pub fn export(&mut self) {
        let Some(exporter) = self.exporter.as_mut() else {
            self.say_error("export is not available: no report exporter is plugged in");
            return;
        };
        let Some(snap) = self.frozen.as_ref().or(self.latest.as_ref()) else {
            self.say_error("nothing to export yet: no snapshot has arrived");
            return;
        };
        match exporter(snap) {
            Ok(paths) if paths.is_empty() => self.say("export finished; no files written"),
            Ok(paths) => {
                let list: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
                self.say(format!("report written: {}", list.join(", ")));
            }
            Err(e) => self.say_error(format!("export failed: {e:#}")),
        }
    }

    /// Shows an informational message.
    pub fn say(&mut self, text: impl Into<String>) {
        self.message = Some(Message {
            text: text.into(),
            is_error: false,
        });
    }

    /// Shows an error message.
    pub fn say_error(&mut self, text: impl Into<String>) {
        self.message = Some(Message {
            text: text.into(),
            is_error: true,
        });
    }
}
