//! The one place where terminal events become actions, and actions become state changes and
//! [`Control`] requests to the session.
//!
//! [`map_event`] turns a crossterm event into an [`Action`] (key presses only: some terminals
//! also report releases and repeats, which would make keys fire twice; which key means what is
//! the table in [`crate::tui::keys`]), [`apply`] changes the
//! [`App`] and returns the request for the session, if any.

use crate::tui::compare::CompareAction;
use crossterm::event::{
    Event, KeyEvent, KeyEventKind, KeyModifiers, MouseButton, MouseEvent, MouseEventKind,
};
use ratatui::layout::{Position, Rect};

use crate::profiling::snapshot::TuneStatus;
use crate::routing::RoutingPolicy;
use crate::session::{Control, Layers};
use crate::tui::app::{App, FollowView, Panel, Target};
use crate::tui::keys::Command;
use crate::tui::render::heatmap::HeatGeometry;
use crate::tui::render::{follow, layout, sliders};

/// Small threshold step (arrow keys).
pub const STEP_SMALL: f32 = 0.01;
/// Big threshold step (Shift, PgUp / PgDn).
pub const STEP_BIG: f32 = 0.05;
/// Expert-cursor jump with Shift in the heatmap.
const EXPERT_JUMP: isize = 8;

/// What `[` and `]` divide or multiply the capacity factor by.
pub const CAPACITY_STEP: f32 = 1.25;

/// What the user asked for, independent of how (key or mouse).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Action {
    /// Leave the UI.
    Quit,
    /// Ctrl-Z: suspend to the shell.
    Suspend,
    /// Esc: close the help overlay, or quit when none is open.
    Escape,
    /// Open or close the help overlay.
    ToggleHelp,
    /// Switch between the sliders and the heatmap.
    NextPanel,
    /// Previous slider / layer.
    Up,
    /// Next slider / layer.
    Down,
    /// Change the focused threshold by this much.
    AdjustThreshold(f32),
    /// Renormalised combine weights on / off for the focused slider.
    ToggleRenormalize,
    /// Heatmap zoom on / off.
    ToggleZoom,
    /// Move the heatmap's expert cursor by this many experts.
    MoveExpert(isize),
    /// Apply the focused layer's policy to every layer.
    ApplyToAll,
    /// Threshold → top-k → dense → threshold, for the focused slider.
    CyclePolicy,
    /// Change k of top-k by this much.
    ChangeK(i32),
    /// Capacity factor on / off.
    ToggleCapacity,
    /// Multiply the capacity factor (switching it on when off).
    ScaleCapacity(f32),
    /// Freeze / unfreeze the display.
    ToggleFreeze,
    /// Pause / resume the model.
    TogglePause,
    /// Reset the statistics.
    Reset,
    /// Export a report.
    Export,
    /// Focus a slider and, when the click was on its bar, set its threshold.
    FocusSlider {
        /// The slider.
        target: Target,
        /// Threshold from the click position, if on the bar.
        set_t: Option<f32>,
    },
    /// Select a heatmap cell.
    SelectCell {
        /// MoE slot.
        slot: usize,
        /// Expert.
        expert: usize,
    },
    /// The terminal has a new size.
    Resize(u16, u16),
    /// Open / close the per-expert table.
    ToggleTable,
    /// Next sort column of the per-expert table.
    CycleSort,
    /// Redraw cap up (`true`) or down one step.
    StepFps(bool),
    /// Start a quick tune.
    QuickTune,
    /// Apply the finished quick tune.
    Confirm,
    /// Open / close the token view.
    FollowToken,
    /// Token view: take the latest pass's tokens.
    UpdateTokens,
    /// Token view: move the token cursor by this many tokens.
    MoveToken(isize),
    /// Token view: select this token (a click on the strip).
    SelectToken(usize),
    /// An A/B key.
    Compare(crate::tui::compare::CompareAction),
}

/// Maps one terminal event to an action, or `None` when it means nothing here.
pub fn map_event(app: &App, ev: &Event) -> Option<Action> {
    match ev {
        Event::Key(k) if k.kind == KeyEventKind::Press => map_key(app, k),
        Event::Mouse(m) => map_mouse(app, m),
        Event::Resize(w, h) => Some(Action::Resize(*w, *h)),
        _ => None,
    }
}

fn map_key(app: &App, k: &KeyEvent) -> Option<Action> {
    let command = app.keymap.command_for(k, app.help_open)?;
    let shift = k.modifiers.contains(KeyModifiers::SHIFT);
    let horizontal = |sign: f32, big: bool| match app.panel {
        _ if app.follow.is_some() => {
            Action::MoveToken(sign as isize * if big { EXPERT_JUMP } else { 1 })
        }
        Panel::Sliders => Action::AdjustThreshold(sign * if big { STEP_BIG } else { STEP_SMALL }),
        Panel::Heatmap => Action::MoveExpert(sign as isize * if big { EXPERT_JUMP } else { 1 }),
    };
    Some(match command {
        Command::Quit => Action::Quit,
        Command::Suspend => Action::Suspend,
        Command::Escape => Action::Escape,
        Command::ToggleHelp => Action::ToggleHelp,
        Command::NextPanel => Action::NextPanel,
        Command::Up => Action::Up,
        Command::Down => Action::Down,
        Command::Left => horizontal(-1.0, shift),
        Command::Right => horizontal(1.0, shift),
        Command::LeftBig => horizontal(-1.0, true),
        Command::RightBig => horizontal(1.0, true),
        Command::ThresholdUpBig => Action::AdjustThreshold(STEP_BIG),
        Command::ThresholdDownBig => Action::AdjustThreshold(-STEP_BIG),
        Command::ApplyToAll => Action::ApplyToAll,
        Command::CyclePolicy => Action::CyclePolicy,
        Command::IncreaseK => Action::ChangeK(1),
        Command::DecreaseK => Action::ChangeK(-1),
        Command::ToggleCapacity => Action::ToggleCapacity,
        Command::CapacityDown => Action::ScaleCapacity(1.0 / CAPACITY_STEP),
        Command::CapacityUp => Action::ScaleCapacity(CAPACITY_STEP),
        Command::ToggleRenormalize => Action::ToggleRenormalize,
        Command::ToggleZoom => Action::ToggleZoom,
        Command::ToggleFreeze => Action::ToggleFreeze,
        Command::TogglePause => Action::TogglePause,
        Command::Reset => Action::Reset,
        Command::Export => Action::Export,
        Command::ToggleTable => Action::ToggleTable,
        Command::CycleSort => Action::CycleSort,
        Command::FpsDown => Action::StepFps(false),
        Command::FpsUp => Action::StepFps(true),
        Command::QuickTune => Action::QuickTune,
        Command::Confirm => Action::Confirm,
        Command::FollowToken => Action::FollowToken,
        Command::UpdateTokens => Action::UpdateTokens,
        Command::ToggleCompare => Action::Compare(CompareAction::Toggle),
        Command::CycleCompareB => Action::Compare(CompareAction::CycleB),
        Command::CompareBDown => Action::Compare(CompareAction::StepB(-1)),
        Command::CompareBUp => Action::Compare(CompareAction::StepB(1)),
    })
}

fn map_mouse(app: &App, m: &MouseEvent) -> Option<Action> {
    if app.help_open {
        return None;
    }
    let snap = app.displayed()?;
    let area = Rect::new(0, 0, app.size.0, app.size.1);
    let l = layout::screen(area, app)?;
    if let Some(view) = &app.follow {
        // The token view covers the panels: a click on its strip picks a token, nothing else.
        let routes = view.routes.as_ref()?;
        let body = Rect::new(
            area.x,
            l.header.y + l.header.height,
            area.width,
            l.status.y.saturating_sub(l.header.y + l.header.height),
        );
        let strip_area = follow::strip_area(body);
        if matches!(m.kind, MouseEventKind::Down(MouseButton::Left)) && m.row == strip_area.y {
            let s = follow::strip(&routes.tokens, view.cursor, strip_area.width as usize);
            return follow::token_at(&s, strip_area.x, m.column).map(Action::SelectToken);
        }
        return None;
    }
    let pos = Position::new(m.column, m.row);
    match m.kind {
        MouseEventKind::Down(MouseButton::Left) | MouseEventKind::Drag(MouseButton::Left) => {
            let drag = matches!(m.kind, MouseEventKind::Drag(_));
            if l.sliders.contains(pos) {
                let row = sliders::geometry(l.sliders, app, snap)
                    .into_iter()
                    .find(|r| r.line.contains(pos))?;
                let on_bar = row.bar.contains(pos);
                // A drag only moves the slider it is on; it never refocuses by passing over labels.
                if drag && !on_bar {
                    return None;
                }
                return Some(Action::FocusSlider {
                    target: row.target,
                    set_t: on_bar.then(|| sliders::t_at(row.bar, m.column)),
                });
            }
            if !drag && l.heatmap.contains(pos) {
                let g = HeatGeometry::new(l.heatmap, app, snap);
                let slot = g.slot_at(m.row)?;
                let expert = g.expert_at(m.column)?;
                return (slot < snap.policy.layers.len())
                    .then_some(Action::SelectCell { slot, expert });
            }
            None
        }
        MouseEventKind::ScrollUp if l.heatmap.contains(pos) || l.sliders.contains(pos) => {
            Some(Action::Up)
        }
        MouseEventKind::ScrollDown if l.heatmap.contains(pos) || l.sliders.contains(pos) => {
            Some(Action::Down)
        }
        MouseEventKind::ScrollLeft if l.heatmap.contains(pos) => Some(Action::MoveExpert(-1)),
        MouseEventKind::ScrollRight if l.heatmap.contains(pos) => Some(Action::MoveExpert(1)),
        _ => None,
    }
}

/// Thresholds move on a 0.01 grid within (0, 1].
fn clamp_t(t: f32) -> f32 {
    ((t * 100.0).round() / 100.0).clamp(STEP_SMALL, 1.0)
}

/// The slots a target covers.
fn slots(app: &App, target: Target) -> Vec<usize> {
    match target {
        Target::Global => (0..app.n_slots()).collect(),
        Target::Layer(s) => vec![s],
    }
}

/// The threshold a target currently stands at (its pending request first): the layer's t, or
/// for the global slider the mean over layers (their last t where they route otherwise).
fn target_threshold(app: &App, target: Target) -> f32 {
    let s = slots(app, target);
    s.iter().map(|&i| app.last_threshold(i)).sum::<f32>() / s.len().max(1) as f32
}

fn layers_of(target: Target) -> Layers {
    match target {
        Target::Global => Layers::All,
        Target::Layer(s) => Layers::Slot(s),
    }
}

/// Asks for `policy` on `target` unless every covered layer already has (or awaits) it.
fn request(app: &mut App, target: Target, policy: RoutingPolicy) -> Option<Control> {
    let covered = slots(app, target);
    if covered
        .iter()
        .all(|&s| app.effective_policy(s).is_some_and(|p| p.same_as(&policy)))
    {
        return None;
    }
    app.set_pending(covered, policy);
    Some(Control::SetPolicy {
        layers: layers_of(target),
        policy,
    })
}

/// Threshold `t` on `target`, keeping whether the layer's weights are renormalised (a model whose
/// native top-k renormalises keeps doing so under a threshold until the user says otherwise).
fn set_threshold(app: &mut App, target: Target, t: f32) -> Option<Control> {
    let s = match target {
        Target::Layer(s) => s,
        Target::Global => app.layer,
    };
    let renormalize = app.effective_policy(s).is_some_and(|p| p.renormalizes());
    request(
        app,
        target,
        RoutingPolicy::threshold(clamp_t(t)).with_renormalize(renormalize),
    )
}

fn move_selection(app: &mut App, down: bool) {
    let n = app.n_slots();
    if n == 0 {
        return;
    }
    match app.panel {
        Panel::Sliders => {
            app.slider = match (app.slider, down) {
                (Target::Global, true) => Target::Layer(0),
                (Target::Global, false) => Target::Global,
                (Target::Layer(0), false) => Target::Global,
                (Target::Layer(s), false) => Target::Layer(s - 1),
                (Target::Layer(s), true) => Target::Layer((s + 1).min(n - 1)),
            };
            if let Target::Layer(s) = app.slider {
                app.layer = s;
            }
        }
        Panel::Heatmap => {
            app.layer = if down {
                (app.layer + 1).min(n - 1)
            } else {
                app.layer.saturating_sub(1)
            };
            app.slider = Target::Layer(app.layer);
        }
    }
}

/// Applies `action` to the state; returns the request for the session, if the action makes one.
pub fn apply(app: &mut App, action: Action) -> Option<Control> {
    // Settings actions need to know the model; before the first snapshot they only explain.
    let needs_model = matches!(
        action,
        Action::AdjustThreshold(_)
            | Action::ApplyToAll
            | Action::CyclePolicy
            | Action::ChangeK(_)
            | Action::ToggleCapacity
            | Action::ScaleCapacity(_)
            | Action::TogglePause
            | Action::Reset
            | Action::FocusSlider { .. }
            | Action::QuickTune
    );
    if needs_model && app.latest().is_none() {
        app.say_error("no snapshot from the model yet");
        return None;
    }
    match action {
        Action::Quit => {
            app.should_quit = true;
            None
        }
        Action::Suspend => {
            app.suspend_requested = true;
            None
        }
        Action::Escape => {
            // Esc only closes things: quitting stays on q and Ctrl-C, so a stray Esc (or the
            // start of an escape sequence) never ends a session.
            if app.help_open {
                app.help_open = false;
            } else if app.follow.is_some() {
                app.follow = None;
                return Some(Control::FollowTokens(false));
            } else if app.tune_status().is_some() {
                let running = matches!(app.tune_status(), Some(TuneStatus::Running { .. }));
                app.say(if running {
                    "quick tune cancelled"
                } else {
                    "quick tune dismissed"
                });
                return Some(Control::DismissTune);
            } else if app.table_open {
                app.table_open = false;
            } else if app.compare.is_open(app.displayed()) {
                app.compare.open = Some(false);
            } else {
                app.say("Esc closes the help, the quick tune, the token view or the expert table; q quits");
            }
            None
        }
        Action::ToggleHelp => {
            app.help_open = !app.help_open;
            None
        }
        Action::NextPanel => {
            app.panel = match app.panel {
                Panel::Sliders => Panel::Heatmap,
                Panel::Heatmap => Panel::Sliders,
            };
            if app.panel == Panel::Heatmap {
                app.slider = Target::Layer(app.layer);
            }
            None
        }
        Action::Up if app.follow.is_some() => {
            app.layer = app.layer.saturating_sub(1);
            None
        }
        Action::Down if app.follow.is_some() => {
            app.layer = (app.layer + 1).min(app.n_slots().saturating_sub(1));
            None
        }
        Action::Up => {
            move_selection(app, false);
            None
        }
        Action::Down => {
            move_selection(app, true);
            None
        }
        Action::MoveExpert(d) => {
            let e = app.n_experts();
            app.expert = (app.expert as isize + d).clamp(0, e.saturating_sub(1) as isize) as usize;
            None
        }
        Action::AdjustThreshold(delta) => {
            let target = app.slider;
            let t = clamp_t(target_threshold(app, target) + delta);
            set_threshold(app, target, t)
        }
        Action::FocusSlider { target, set_t } => {
            app.panel = Panel::Sliders;
            app.slider = target;
            if let Target::Layer(s) = target {
                app.layer = s;
            }
            set_t.and_then(|t| set_threshold(app, target, t))
        }
        Action::SelectCell { slot, expert } => {
            app.panel = Panel::Heatmap;
            app.layer = slot;
            app.slider = Target::Layer(slot);
            app.expert = expert;
            None
        }
        Action::ApplyToAll => {
            let Target::Layer(s) = app.slider else {
                app.say("the global slider already sets every layer");
                return None;
            };
            let policy = app.effective_policy(s)?;
            let c = request(app, Target::Global, policy);
            if c.is_none() {
                app.say("every layer already has this policy");
            }
            c
        }
        Action::CyclePolicy => {
            let target = app.slider;
            let s = match target {
                Target::Layer(s) => s,
                Target::Global => app.layer,
            };
            let next = match app.effective_policy(s)? {
                RoutingPolicy::Threshold { renormalize, .. } => RoutingPolicy::TopK {
                    k: app.last_top_k(s).clamp(1, app.n_experts().max(1)),
                    renormalize,
                },
                RoutingPolicy::TopK { .. } => RoutingPolicy::Dense,
                RoutingPolicy::Dense => RoutingPolicy::threshold(clamp_t(app.last_threshold(s))),
            };
            request(app, target, next)
        }
        Action::ChangeK(d) => {
            let target = app.slider;
            let s = match target {
                Target::Layer(s) => s,
                Target::Global => app.layer,
            };
            let Some(RoutingPolicy::TopK { k, renormalize }) = app.effective_policy(s) else {
                app.say_error("+/- change k of top-k routing: press p to switch to top-k");
                return None;
            };
            let e = app.n_experts().max(1) as i64;
            let k2 = (k as i64 + d as i64).clamp(1, e) as usize;
            let c = request(app, target, RoutingPolicy::TopK { k: k2, renormalize });
            if c.is_none() {
                app.say(format!("k stays within 1..={e}"));
            }
            c
        }
        Action::ToggleCapacity => Some(Control::SetCapacityFactor(app.toggled_capacity())),
        Action::ScaleCapacity(by) => {
            Some(Control::SetCapacityFactor(Some(app.scaled_capacity(by))))
        }
        Action::ToggleFreeze => {
            app.toggle_freeze();
            None
        }
        Action::ToggleZoom => {
            app.heat_zoom = !app.heat_zoom;
            None
        }
        Action::ToggleRenormalize => {
            let target = app.slider;
            let s = match target {
                Target::Layer(s) => s,
                Target::Global => app.layer,
            };
            let current = app.effective_policy(s)?;
            if current == RoutingPolicy::Dense {
                app.say_error("n: dense routing weights every expert by its probability; nothing to renormalise");
                return None;
            }
            request(
                app,
                target,
                current.with_renormalize(!current.renormalizes()),
            )
        }
        Action::TogglePause => {
            let paused = !app.paused_effective();
            app.request_pause(paused);
            Some(Control::SetPaused(paused))
        }
        Action::Reset => Some(Control::ResetStats),
        Action::Export => {
            app.export();
            None
        }
        Action::Resize(w, h) => {
            app.size = (w, h);
            None
        }
        Action::ToggleTable => {
            app.table_open = !app.table_open;
            None
        }
        Action::CycleSort => {
            if !app.table_open {
                app.table_open = true;
            } else {
                app.table_sort = app.table_sort.next();
            }
            app.say(format!("expert table sorted by {}", app.table_sort.name()));
            None
        }
        Action::StepFps(up) => {
            let fps = app.step_fps(up);
            app.say(format!("redraw at most {fps:.0} times per second"));
            None
        }
        Action::FollowToken => {
            if app.follow.take().is_some() {
                return Some(Control::FollowTokens(false));
            }
            app.follow = Some(FollowView::default());
            app.say("following tokens: waiting for the next pass");
            Some(Control::FollowTokens(true))
        }
        Action::UpdateTokens => {
            match app.follow.as_mut() {
                Some(f) => {
                    f.routes = None;
                    app.say("taking the latest pass's tokens");
                }
                None => app.say("u updates the token view; o opens it"),
            }
            app.take_routes();
            None
        }
        Action::SelectToken(i) => {
            if let Some(f) = app.follow.as_mut() {
                f.cursor = i;
                f.move_cursor(0);
            }
            None
        }
        Action::MoveToken(by) => {
            if let Some(f) = app.follow.as_mut() {
                f.move_cursor(by);
            }
            None
        }
        Action::QuickTune => match app.tune_status() {
            Some(TuneStatus::Running { .. }) => {
                app.say("a quick tune is running (Esc cancels it)");
                None
            }
            _ => {
                app.say(format!(
                    "quick tune: {}; live passes wait for it",
                    app.tune_budget.describe()
                ));
                Some(Control::QuickTune(app.tune_budget))
            }
        },
        Action::Confirm => match app.tune_status() {
            Some(TuneStatus::Done(q)) => {
                let label = q.tuned.label.clone();
                app.say(format!("applying the tuned thresholds {label}"));
                Some(Control::ApplyTune)
            }
            Some(TuneStatus::Running { .. }) => {
                app.say("the quick tune is still running");
                None
            }
            _ => None,
        },
        Action::Compare(a) => crate::tui::compare::apply(app, a),
    }
}

/// Maps and applies one event; a request for the session goes to `send`, and a failure to
/// deliver it is shown in the status bar.
pub fn handle_event(
    app: &mut App,
    ev: &Event,
    send: &mut dyn FnMut(Control) -> anyhow::Result<()>,
) {
    if crate::tui::replay::intercept(app, ev) {
        return;
    }
    let Some(action) = map_event(app, ev) else {
        return;
    };
    let clears_message = !matches!(action, Action::Resize(..));
    if clears_message {
        app.message = None;
    }
    if let Some(c) = apply(app, action)
        && let Err(e) = send(c)
    {
        app.say_error(format!("the model session did not take the request: {e:#}"));
    }
}
