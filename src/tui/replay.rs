//! Playing a recording (`xmoe-top replay FILE`) in the live UI's panels.
//!
//! A player thread owns the [`Recording`] and hands decoded snapshots to the same [`UiChannel`]
//! a session would, at the recorded pace times the chosen speed; the UI draws them with the
//! same panels. The replay keys (play/pause, step, jump, speed, the timeline under the mouse) are
//! taken by [`intercept`] before the live key handling; keys that would change the model say
//! "replay: read-only" instead of acting. The timeline bar is drawn by [`render_timeline`].

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use crossterm::event::{
    Event, KeyCode, KeyEventKind, KeyModifiers, MouseButton, MouseEvent, MouseEventKind,
};
use ratatui::Frame;
use ratatui::layout::{Position, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

use crate::record::Recording;
use crate::tui::app::{App, Panel};
use crate::tui::input::{Action, map_event};
use crate::tui::render::layout;
use crate::tui::{SnapshotSink, TuiOptions, UiChannel, run_tui};

/// Playback speeds `-` and `+` step through.
pub const SPEEDS: [f64; 6] = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0];

/// Rows the timeline takes at the bottom of the screen: the bar, then the keys (or a note).
pub const TIMELINE_ROWS: u16 = 2;

/// What the UI knows of the recording without decoding it.
#[derive(Clone, Debug)]
pub struct ReplayInfo {
    /// The file as given.
    pub file: String,
    /// When it was recorded, ISO 8601 UTC.
    pub recorded_utc: String,
    /// The model recorded.
    pub model: String,
    /// Session time of each frame, seconds.
    pub times: Vec<f64>,
    /// Snapshot sequence number of each frame (increasing).
    pub sequences: Vec<u64>,
    /// Damage and drops, in words (empty for a clean recording).
    pub notes: Vec<String>,
}

impl ReplayInfo {
    /// What the UI shows of `rec`.
    pub fn of(rec: &Recording) -> Self {
        Self {
            file: rec.label().to_string(),
            recorded_utc: rec.header().created_utc.clone(),
            model: rec.header().model.clone(),
            times: rec.frames().iter().map(|f| f.t_s).collect(),
            sequences: rec.frames().iter().map(|f| f.sequence).collect(),
            notes: rec.notes(),
        }
    }

    /// The frame whose snapshot has sequence number `seq`.
    pub fn index_of(&self, seq: u64) -> usize {
        self.sequences
            .partition_point(|&s| s < seq)
            .min(self.sequences.len().saturating_sub(1))
    }
}

/// Play state, set by the UI thread and followed by the player.
#[derive(Clone, Debug, PartialEq)]
pub struct PlayState {
    /// Playing (else paused).
    pub playing: bool,
    /// Playback speed (one of [`SPEEDS`]).
    pub speed: f64,
    /// The player could not decode a frame: why (the display stays on the last good one).
    pub error: Option<String>,
}

enum PlayerCmd {
    /// Show frame `i` (and keep playing from there if playing).
    Seek(usize),
    /// The play state changed.
    Wake,
    /// The UI has gone.
    Stop,
}

/// The UI's handle on the player.
#[derive(Clone)]
pub struct ReplayLink {
    /// The recording, as shown.
    pub info: Arc<ReplayInfo>,
    /// Play state.
    pub state: Arc<Mutex<PlayState>>,
    tx: Sender<PlayerCmd>,
}

impl ReplayLink {
    fn lock(&self) -> std::sync::MutexGuard<'_, PlayState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, c: PlayerCmd) {
        // The player only ends after the UI: a failed send has nobody to tell.
        let _ = self.tx.send(c);
    }
}

/// The frame on screen (0 before the first snapshot arrives).
pub fn position(app: &App) -> usize {
    match (&app.replay, app.displayed()) {
        (Some(r), Some(s)) => r.info.index_of(s.sequence),
        _ => 0,
    }
}

/// Plays `rec` in the UI until the user quits. `options.replay` is filled here.
pub fn run_replay(rec: Recording, mut options: TuiOptions) -> Result<()> {
    let info = Arc::new(ReplayInfo::of(&rec));
    let state = Arc::new(Mutex::new(PlayState {
        playing: false,
        speed: 1.0,
        error: None,
    }));
    let (tx, rx) = mpsc::channel();
    let channel = UiChannel::new();
    let sink = channel.sink();
    let st = state.clone();
    let player = std::thread::Builder::new()
        .name("xmoe-replay".into())
        .spawn(move || play(rec, st, rx, sink))
        .context("cannot start the replay thread")?;
    options.replay = Some(ReplayLink {
        info,
        state,
        tx: tx.clone(),
    });
    let r = run_tui(
        channel,
        |c| {
            // Keys that would change the model never get here (`intercept` answers them); the
            // last word of the UI stops the player.
            if c == crate::tui::Control::Stop {
                let _ = tx.send(PlayerCmd::Stop);
            }
            Ok(())
        },
        options,
    );
    let _ = tx.send(PlayerCmd::Stop);
    let _ = player.join();
    r
}

/// The player thread: shows frame 0, then follows seeks and plays at the recorded pace.
fn play(
    mut rec: Recording,
    state: Arc<Mutex<PlayState>>,
    rx: Receiver<PlayerCmd>,
    mut sink: SnapshotSink,
) {
    let times: Vec<f64> = rec.frames().iter().map(|f| f.t_s).collect();
    let n = times.len();
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    let mut pos = 0usize;
    let mut last_good = None;
    // Decodes frame `i` and hands it to the UI; a frame that cannot be decoded stops playback
    // and is said in the timeline (the last good frame is sent again so the UI redraws).
    let mut show = |i: usize, sink: &mut SnapshotSink| -> bool {
        match rec.frame(i) {
            Ok(s) => {
                lock().error = None;
                last_good = Some(s.clone());
                sink.send(s)
            }
            Err(e) => {
                let mut st = lock();
                st.error = Some(format!("{e:#}"));
                st.playing = false;
                drop(st);
                match &last_good {
                    Some(s) => sink.send(s.clone()),
                    None => true,
                }
            }
        }
    };
    if !show(0, &mut sink) {
        return;
    }
    // Playback runs against the wall clock from an anchor: (when, session time shown then).
    let mut anchor = (Instant::now(), times[0]);
    loop {
        let (playing, speed) = {
            let st = lock();
            (st.playing, st.speed)
        };
        let timeout = if playing && pos + 1 < n {
            let due =
                anchor.0 + Duration::from_secs_f64(((times[pos + 1] - anchor.1) / speed).max(0.0));
            due.saturating_duration_since(Instant::now())
        } else {
            Duration::from_secs(3600)
        };
        match rx.recv_timeout(timeout) {
            Ok(PlayerCmd::Seek(i)) => {
                pos = i.min(n - 1);
                anchor = (Instant::now(), times[pos]);
                if !show(pos, &mut sink) {
                    return;
                }
            }
            Ok(PlayerCmd::Wake) => anchor = (Instant::now(), times[pos]),
            Ok(PlayerCmd::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {
                if !playing {
                    continue;
                }
                // The latest frame due by now (frames are skipped when decoding falls behind).
                let t = anchor.1 + anchor.0.elapsed().as_secs_f64() * speed;
                let next = (times.partition_point(|&x| x <= t).saturating_sub(1)).max(pos + 1);
                pos = next.min(n - 1);
                if pos + 1 >= n {
                    lock().playing = false;
                }
                if !show(pos, &mut sink) {
                    return;
                }
            }
        }
    }
}

/// What a replay says to a key that would change the model.
pub const READ_ONLY: &str =
    "replay: read-only (this would change the model; the recording only shows what it did)";

/// Takes the replay keys and mouse actions before the live handling; returns true when the event
/// was taken (the live handling then ignores it).
pub fn intercept(app: &mut App, ev: &Event) -> bool {
    let Some(link) = app.replay.clone() else {
        return false;
    };
    let n = link.info.times.len();
    let pos = position(app);
    let seek = |i: usize, stop: bool| {
        if stop {
            link.lock().playing = false;
        }
        link.send(PlayerCmd::Seek(i.min(n.saturating_sub(1))));
    };
    match ev {
        Event::Key(k) if k.kind == KeyEventKind::Press && !app.help_open => {
            let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
            let arrows_free = app.panel == Panel::Sliders
                && app.follow.is_none()
                && !app.table_open
                && !app.compare.is_open(app.displayed());
            match k.code {
                KeyCode::Char(' ') | KeyCode::Char('f') if !ctrl => {
                    let at_end = pos + 1 >= n;
                    let mut st = link.lock();
                    st.playing = !st.playing;
                    let playing = st.playing;
                    drop(st);
                    app.message = None;
                    if playing && at_end {
                        seek(0, false);
                    } else {
                        link.send(PlayerCmd::Wake);
                    }
                    true
                }
                KeyCode::Char(',') => {
                    seek(pos.saturating_sub(1), true);
                    true
                }
                KeyCode::Char('.') => {
                    seek(pos + 1, true);
                    true
                }
                KeyCode::Left if arrows_free && !k.modifiers.contains(KeyModifiers::SHIFT) => {
                    seek(pos.saturating_sub(1), true);
                    true
                }
                KeyCode::Right if arrows_free && !k.modifiers.contains(KeyModifiers::SHIFT) => {
                    seek(pos + 1, true);
                    true
                }
                KeyCode::Home => {
                    seek(0, false);
                    true
                }
                KeyCode::End => {
                    seek(n.saturating_sub(1), true);
                    true
                }
                KeyCode::Char(c @ ('-' | '_' | '+' | '=')) => {
                    let up = matches!(c, '+' | '=');
                    let mut st = link.lock();
                    let i = SPEEDS.iter().position(|&s| s == st.speed).unwrap_or(2);
                    st.speed = SPEEDS[if up {
                        (i + 1).min(SPEEDS.len() - 1)
                    } else {
                        i.saturating_sub(1)
                    }];
                    let speed = st.speed;
                    drop(st);
                    link.send(PlayerCmd::Wake);
                    app.say(format!("replay speed {}", speed_text(speed)));
                    true
                }
                // `r` resets the statistics in the live UI; a recording has nothing to reset, so
                // it exports the report at this position, like `e`.
                KeyCode::Char('r') if !ctrl => {
                    app.export();
                    true
                }
                _ => read_only(app, ev),
            }
        }
        Event::Mouse(m) if on_timeline(app, m).is_some() => {
            if let Some(f) = on_timeline(app, m)
                && matches!(
                    m.kind,
                    MouseEventKind::Down(MouseButton::Left)
                        | MouseEventKind::Drag(MouseButton::Left)
                )
            {
                let i = (f * n.saturating_sub(1) as f64).round() as usize;
                seek(i, false);
            }
            true
        }
        Event::Mouse(_) => read_only(app, ev),
        _ => false,
    }
}

/// Answers an action that would change the model; false for everything else.
fn read_only(app: &mut App, ev: &Event) -> bool {
    let Some(action) = map_event(app, ev) else {
        return false;
    };
    let what = match action {
        Action::AdjustThreshold(_)
        | Action::ApplyToAll
        | Action::CyclePolicy
        | Action::ChangeK(_)
        | Action::ToggleCapacity
        | Action::ScaleCapacity(_)
        | Action::ToggleRenormalize
        | Action::TogglePause
        | Action::Reset
        | Action::QuickTune
        | Action::Confirm
        | Action::Compare(_)
        | Action::FocusSlider { set_t: Some(_), .. } => READ_ONLY,
        Action::FollowToken | Action::UpdateTokens => {
            "replay: read-only (the token view needs the live model: token routes are not recorded; `replay --trace` writes the routing trace)"
        }
        _ => return false,
    };
    app.say_error(what);
    true
}

/// The bar's rectangle in the timeline area: the first row, right of the text.
fn bar_area(area: Rect) -> Rect {
    let text_w = if area.width >= 120 { 76 } else { 50 };
    Rect::new(
        area.x + text_w.min(area.width),
        area.y,
        area.width.saturating_sub(text_w + 1),
        1.min(area.height),
    )
}

/// Where on the bar `m` is, as a fraction 0..=1; `None` off the bar.
fn on_timeline(app: &App, m: &MouseEvent) -> Option<f64> {
    let area = Rect::new(0, 0, app.size.0, app.size.1);
    let l = layout::screen(area, app)?;
    let bar = bar_area(l.timeline);
    if bar.width < 2 || !bar.contains(Position::new(m.column, m.row)) {
        return None;
    }
    Some((m.column - bar.x) as f64 / (bar.width - 1) as f64)
}

fn speed_text(s: f64) -> String {
    if s < 1.0 {
        format!("{s}x")
    } else {
        format!("{s:.0}x")
    }
}

/// Draws the timeline: play state, speed, position, wall time and the bar; below it the replay
/// keys, or what was lost from the recording, or the player's error.
pub fn render_timeline(frame: &mut Frame, area: Rect, app: &App) {
    let Some(link) = &app.replay else {
        return;
    };
    if area.height == 0 {
        return;
    }
    let theme = &app.theme;
    let st = link.lock().clone();
    let info = &link.info;
    let n = info.times.len();
    let pos = position(app);
    let t = info.times.get(pos).copied().unwrap_or(0.0);
    let total = info.times.last().copied().unwrap_or(0.0);
    let wall = app
        .displayed()
        .map(|s| clock(s.created_unix_ms))
        .unwrap_or_default();
    let wide = area.width >= 120;
    let text = if wide {
        format!(
            " {} {:>5} │ {:>7.1} s of {:.1} s │ frame {}/{} │ {wall} UTC",
            if st.playing {
                "▶ playing"
            } else {
                "⏸ paused "
            },
            speed_text(st.speed),
            t,
            total,
            pos + 1,
            n
        )
    } else {
        format!(
            " {} {:>5} {:>6.1}/{:.1} s frame {}/{} {wall}",
            if st.playing { "▶" } else { "⏸" },
            speed_text(st.speed),
            t,
            total,
            pos + 1,
            n
        )
    };
    let bar = bar_area(area);
    let row = Rect::new(area.x, area.y, area.width, 1);
    frame.render_widget(Paragraph::new(Line::styled(text, theme.value())), row);
    if bar.width >= 2 {
        let at = if n > 1 {
            (pos as f64 / (n - 1) as f64 * (bar.width - 1) as f64).round() as usize
        } else {
            0
        };
        let line: String = (0..bar.width as usize)
            .map(|i| match i.cmp(&at) {
                std::cmp::Ordering::Less => '━',
                std::cmp::Ordering::Equal => '●',
                std::cmp::Ordering::Greater => '─',
            })
            .collect();
        frame.render_widget(Paragraph::new(Line::styled(line, theme.title())), bar);
    }
    if area.height < 2 {
        return;
    }
    let second = Rect::new(area.x, area.y + 1, area.width, 1);
    let line = if let Some(e) = &st.error {
        Line::styled(format!(" {e}"), theme.error())
    } else if let Some(note) = info.notes.first() {
        Line::styled(format!(" {note}"), theme.error())
    } else {
        Line::from(vec![Span::styled(
            if wide {
                " replay: Space play/pause · , . (← → on the sliders) step · Home End · - + speed 0.25x-8x · click or drag the bar · e r report"
            } else {
                " Space play · , . step · Home End · - + speed · click bar · e r report"
            },
            theme.dim(),
        )])
    };
    frame.render_widget(Paragraph::new(line), second);
}

/// `HH:MM:SS` (UTC) of a Unix time in milliseconds.
fn clock(unix_ms: u64) -> String {
    let s = unix_ms / 1000;
    format!("{:02}:{:02}:{:02}", s / 3600 % 24, s / 60 % 60, s % 60)
}
