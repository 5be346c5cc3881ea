//! The terminal UI: live heatmaps, threshold sliders, histograms and the device panel.
//!
//! Threads: the model session publishes [`Snapshot`]s on a channel and never waits for the UI;
//! a forwarder thread and an input thread put snapshots and terminal events on one channel; the
//! UI thread ([`run_tui`]) blocks on that channel, updates the [`App`] state through
//! [`input`], and redraws only when something changed, at most `fps` times per second.
//!
//! The terminal is restored (raw mode off, main screen, mouse capture off, cursor shown) by a
//! guard's `Drop` on every return path and by a panic hook; Ctrl-C arrives as a key in raw mode
//! and quits like `q`. SIGTERM, SIGINT, SIGHUP and SIGQUIT quit the same way; Ctrl-Z and SIGTSTP
//! restore the terminal and stop the process, and SIGCONT re-enters the UI and redraws
//! ([`crate::signals`]).

pub mod app;
pub mod compare;
pub mod debounce;
pub mod input;
pub mod keys;
pub mod render;
pub mod replay;
pub mod session_link;
pub mod theme;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, Once};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use crossterm::event::{self, DisableMouseCapture, EnableMouseCapture, Event};
use crossterm::terminal::{
    Clear, ClearType, EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode,
};
use crossterm::{cursor, execute};
use ratatui::Terminal;
use ratatui::backend::{Backend, CrosstermBackend};

use crate::profiling::snapshot::Snapshot;
pub use crate::session::{Control, Layers};
pub use app::{App, Exporter};
pub use theme::{ColorChoice, ColorMode, Palette, Theme};

/// Default redraw cap, frames per second.
pub const DEFAULT_FPS: f64 = 10.0;

/// How the UI runs.
pub struct TuiOptions {
    /// Most redraws per second (the UI draws only when something changed).
    pub fps: f64,
    /// Colour mode (see [`ColorMode::detect`]).
    pub color: ColorMode,
    /// Capacity factor the `c` key switches on when none has been in force (the model's
    /// configured factor is a good choice; [`app::DEFAULT_CAPACITY_FACTOR`] otherwise).
    pub capacity_factor: f32,
    /// Writes a report of the displayed snapshot on `e`; `None` disables the key (the help
    /// says so).
    pub exporter: Option<Exporter>,
    /// Key bindings (defaults, or with the settings file's replacements).
    pub keymap: keys::KeyMap,
    /// The heatmap's colour ramp.
    pub palette: Palette,
    /// The budget of the quick tune (`T`).
    pub tune_budget: crate::session::tune::Budget,
    /// Playing a recording instead of watching a session (see [`replay`]).
    pub replay: Option<replay::ReplayLink>,
    /// The session is being recorded (`--record`): the header shows the counters.
    pub recording: Option<std::sync::Arc<crate::record::RecorderStatus>>,
}

impl Default for TuiOptions {
    fn default() -> Self {
        Self {
            fps: DEFAULT_FPS,
            color: ColorMode::detect(ColorChoice::Auto),
            capacity_factor: app::DEFAULT_CAPACITY_FACTOR,
            exporter: None,
            keymap: keys::KeyMap::default(),
            palette: Palette::default(),
            tune_budget: app::DEFAULT_TUNE_BUDGET,
            replay: None,
            recording: None,
        }
    }
}

/// What wakes the UI thread.
#[derive(Debug)]
pub enum UiEvent {
    /// A terminal event (key, mouse, resize).
    Input(Event),
    /// A new snapshot from the session.
    Snapshot(Box<Snapshot>),
    /// New device counters from the sampler, between snapshots.
    Device(Box<crate::profiling::snapshot::DeviceSnapshot>),
    /// The session will publish no more snapshots.
    SessionEnded,
    /// Reading the terminal failed; the UI cannot take keys any more.
    InputError(String),
    /// A signal from outside: a terminating one quits, SIGTSTP suspends, SIGCONT redraws.
    Signal(i32),
}

/// Why [`event_loop`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoopEnd {
    /// The user (or a terminating signal) asked to quit, or every sender is gone.
    Quit,
    /// Ctrl-Z or SIGTSTP: give the terminal back and stop the process, then call again.
    Suspend,
    /// SIGCONT: the terminal may have been reset while stopped; re-enter UI mode, clear and
    /// call again.
    Resume,
}

/// The one channel the UI thread blocks on. Create it first, hand [`UiChannel::sink`] to the
/// session (e.g. `Session::start_with_sink`), then give the channel to [`run_tui`].
pub struct UiChannel {
    tx: Sender<UiEvent>,
    rx: Receiver<UiEvent>,
}

impl Default for UiChannel {
    fn default() -> Self {
        Self::new()
    }
}

impl UiChannel {
    /// A new, empty channel.
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel();
        Self { tx, rx }
    }

    /// Where the session puts its snapshots. Sending never blocks (the channel is unbounded and
    /// the UI takes everything queued before each frame); dropping the sink tells the UI that
    /// the session has ended.
    pub fn sink(&self) -> SnapshotSink {
        SnapshotSink {
            tx: self.tx.clone(),
        }
    }
}

impl UiChannel {
    /// Where the device sampler puts its counters (`SessionConfig::device_observer`), so that
    /// the device panel moves while a long pass keeps the session from publishing snapshots.
    pub fn device_sender(
        &self,
    ) -> impl Fn(&crate::profiling::snapshot::DeviceSnapshot) + Send + Sync + 'static {
        let tx = self.tx.clone();
        move |d| {
            let _ = tx.send(UiEvent::Device(Box::new(d.clone())));
        }
    }
}

/// The session's end of the [`UiChannel`].
pub struct SnapshotSink {
    tx: Sender<UiEvent>,
}

impl SnapshotSink {
    /// Hands a snapshot to the UI without waiting; false once the UI has gone.
    pub fn send(&mut self, snapshot: Snapshot) -> bool {
        self.tx.send(UiEvent::Snapshot(Box::new(snapshot))).is_ok()
    }
}

impl Drop for SnapshotSink {
    fn drop(&mut self) {
        let _ = self.tx.send(UiEvent::SessionEnded);
    }
}

/// Runs the UI until the user quits: draws the snapshots arriving on `channel`, sends the
/// user's requests to `control`, and always restores the terminal before returning (also on
/// error or panic). `control` receives [`Control::Stop`] last, whichever way the UI ends.
/// Requires stdout to be a terminal; check with [`std::io::IsTerminal`] and use the headless
/// summary otherwise. See [`session_link::run_session_tui`] for the whole thing wired to a
/// [`crate::session::Session`].
pub fn run_tui(
    channel: UiChannel,
    mut control: impl FnMut(Control) -> Result<()>,
    options: TuiOptions,
) -> Result<()> {
    let UiChannel { tx, rx } = channel;
    let mut app = App::new(Theme::new(options.color).with_palette(options.palette))
        .with_exporter(options.exporter)
        .with_capacity_factor(options.capacity_factor);
    app.keymap = options.keymap;
    app.tune_budget = options.tune_budget;
    app.replay = options.replay;
    app.recording = options.recording;
    let result = (|| -> Result<()> {
        let mut guard = TerminalGuard::enter()?;
        let stop = Arc::new(AtomicBool::new(false));
        let signal_tx = tx.clone();
        let forwarder = crate::signals::Forwarder::start(move |signal| {
            signal_tx.send(UiEvent::Signal(signal)).is_ok()
        })
        .context("cannot watch for signals")?;
        let input = spawn_input(tx, stop.clone())?;
        let mut terminal = fresh_terminal()?;
        app.fps = options.fps;
        let r = loop {
            // The user may have changed the redraw cap (< >) before a suspend.
            let fps = app.fps;
            match event_loop(&mut terminal, &rx, &mut app, &mut control, fps) {
                Ok(LoopEnd::Quit) => break Ok(()),
                Ok(LoopEnd::Suspend) => {
                    drop(guard);
                    crate::signals::stop_process();
                    guard = TerminalGuard::enter()?;
                }
                Ok(LoopEnd::Resume) => guard.reenter()?,
                Err(e) => break Err(e),
            }
            // Terminal::clear would ask the terminal for the cursor position; a new Terminal
            // over a cleared screen draws every cell instead.
            execute!(io::stdout(), Clear(ClearType::All)).context("cannot clear the terminal")?;
            terminal = fresh_terminal()?;
        };
        stop.store(true, Ordering::SeqCst);
        // After a hangup (the terminal window closed, ssh dropped) crossterm's poll can spin on
        // the dead descriptor without returning, so the thread never sees `stop`: wait a little,
        // then leave it to die with the process rather than hang here.
        let deadline = Instant::now() + Duration::from_millis(500);
        while !input.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        if input.is_finished() {
            let _ = input.join();
        }
        drop(forwarder);
        drop(terminal);
        drop(guard);
        r
    })();
    let _ = control(Control::Stop);
    // Panics of other threads were held back while the screen was in use.
    for msg in take_other_panics() {
        eprintln!("{msg}");
    }
    result
}

fn fresh_terminal() -> Result<Terminal<CrosstermBackend<io::Stdout>>> {
    Terminal::new(CrosstermBackend::new(io::stdout())).context("cannot set up the terminal")
}

fn spawn_input(tx: Sender<UiEvent>, stop: Arc<AtomicBool>) -> Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("tui-input".into())
        .spawn(move || {
            // Polling with a timeout lets the thread notice `stop`, so that it never eats a key
            // meant for whatever runs after the UI.
            while !stop.load(Ordering::SeqCst) {
                let ev = match event::poll(Duration::from_millis(100)) {
                    Ok(false) => continue,
                    Ok(true) => event::read().map(UiEvent::Input),
                    Err(e) => Err(e),
                };
                let ev = ev.unwrap_or_else(|e| UiEvent::InputError(e.to_string()));
                let fatal = matches!(ev, UiEvent::InputError(_));
                if tx.send(ev).is_err() || fatal {
                    return;
                }
            }
        })
        .context("cannot start the input thread")
}

/// Sends one request to the session; a failure shows in the status bar.
fn deliver(app: &mut App, c: Control, control: &mut dyn FnMut(Control) -> Result<()>) {
    if let Err(e) = control(c) {
        app.say_error(format!("the model session did not take the request: {e:#}"));
    }
}

/// Sends the slider requests whose keys have settled by `now` (all of them with `all`);
/// returns whether any went out.
fn flush_debounced(
    app: &mut App,
    now: Instant,
    all: bool,
    control: &mut dyn FnMut(Control) -> Result<()>,
) -> bool {
    let due = if all {
        app.debounce.take_all()
    } else {
        app.debounce.due(now)
    };
    let any = !due.is_empty();
    for c in due {
        deliver(app, c, control);
    }
    any
}

/// Handles one event; returns whether the screen needs a redraw.
fn process(
    app: &mut App,
    ev: UiEvent,
    control: &mut dyn FnMut(Control) -> Result<()>,
) -> Result<bool> {
    Ok(match ev {
        UiEvent::Input(e) => {
            let mut requests = Vec::new();
            input::handle_event(app, &e, &mut |c| {
                requests.push(c);
                Ok(())
            });
            for c in requests {
                if debounce::is_debounced(&c) {
                    app.debounce.push(c, Instant::now());
                } else {
                    // Nothing overtakes a request still waiting (a reset after a slider move
                    // resets the new epoch, not the old one).
                    for w in app.debounce.take_all() {
                        deliver(app, w, control);
                    }
                    deliver(app, c, control);
                }
            }
            true
        }
        UiEvent::Snapshot(s) => {
            app.push_snapshot(*s);
            // While frozen the picture does not change.
            !app.is_frozen()
        }
        UiEvent::Device(d) => app.update_device(*d),
        UiEvent::SessionEnded => {
            app.session_ended = true;
            let why =
                other_panics_first_line().or_else(|| app.latest().and_then(|s| s.ended.clone()));
            app.say_error(match why {
                Some(p) => format!("the model session has ended: {p}; press q to quit"),
                None => "the model session has ended; press q to quit".to_string(),
            });
            true
        }
        UiEvent::InputError(e) => anyhow::bail!("cannot read the terminal: {e}"),
        UiEvent::Signal(signal) => {
            match signal {
                crate::signals::SIGTSTP => app.suspend_requested = true,
                crate::signals::SIGCONT => app.resume_requested = true,
                _ => app.should_quit = true,
            }
            false
        }
    })
}

/// The UI loop over any ratatui backend (the real terminal, or a `TestBackend` in tests):
/// blocks on `rx`, applies events, redraws when something changed but at most `fps` times per
/// second (the starting cap; `<` and `>` change it), sends slider requests once the keys settle, and returns when the user quits, every sender is gone, or the terminal must be handed
/// back or taken again ([`LoopEnd`]; the caller does that and calls again).
pub fn event_loop<B: Backend>(
    terminal: &mut Terminal<B>,
    rx: &Receiver<UiEvent>,
    app: &mut App,
    control: &mut dyn FnMut(Control) -> Result<()>,
    fps: f64,
) -> Result<LoopEnd>
where
    B::Error: Send + Sync + 'static,
{
    app.fps = fps.clamp(0.5, 120.0);
    let mut dirty = true;
    let mut last_draw: Option<Instant> = None;
    loop {
        // Read each time round: `<` and `>` change it.
        let interval = Duration::from_secs_f64(1.0 / app.fps.clamp(0.5, 120.0));
        let now = Instant::now();
        // Slider requests go out once the keys have rested (see `debounce`).
        dirty |= flush_debounced(app, now, false, control);
        let due = last_draw.map_or(now, |t| t + interval);
        if dirty && now >= due {
            let done = terminal.draw(|f| render::draw(f, app))?;
            app.size = (done.area.width, done.area.height);
            last_draw = Some(now);
            dirty = false;
        }
        // Wake for the next frame (if one is owed) or for waiting slider requests.
        let wake = [dirty.then_some(due), app.debounce.deadline()]
            .into_iter()
            .flatten()
            .min();
        let ev = match wake {
            Some(w) => match rx.recv_timeout(w.saturating_duration_since(Instant::now())) {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    flush_debounced(app, now, true, control);
                    return Ok(LoopEnd::Quit);
                }
            },
            None => match rx.recv() {
                Ok(ev) => ev,
                Err(_) => return Ok(LoopEnd::Quit),
            },
        };
        dirty |= process(app, ev, control)?;
        // Take everything already queued before drawing once.
        while let Ok(ev) = rx.try_recv() {
            dirty |= process(app, ev, control)?;
        }
        if app.should_quit {
            // The last setting asked for is the one the session ends with (its final snapshot
            // may become a report).
            flush_debounced(app, now, true, control);
            return Ok(LoopEnd::Quit);
        }
        if std::mem::take(&mut app.suspend_requested) {
            flush_debounced(app, now, true, control);
            return Ok(LoopEnd::Suspend);
        }
        if std::mem::take(&mut app.resume_requested) {
            return Ok(LoopEnd::Resume);
        }
    }
}

static TERMINAL_ACTIVE: AtomicBool = AtomicBool::new(false);
static HOOK: Once = Once::new();
static UI_THREAD: Mutex<Option<ThreadId>> = Mutex::new(None);
static OTHER_PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn take_other_panics() -> Vec<String> {
    OTHER_PANICS
        .lock()
        .map(|mut v| std::mem::take(&mut *v))
        .unwrap_or_default()
}

fn other_panics_first_line() -> Option<String> {
    let v = OTHER_PANICS.lock().ok()?;
    v.first()
        .map(|m| m.lines().next().unwrap_or_default().to_string())
}

/// Puts the terminal back: raw mode off, main screen, mouse capture off, cursor visible. Does
/// nothing when the UI does not hold the terminal, so it is safe to call twice.
pub fn restore_terminal() {
    if TERMINAL_ACTIVE.swap(false, Ordering::SeqCst) {
        let _ = disable_raw_mode();
        let _ = execute!(
            io::stdout(),
            DisableMouseCapture,
            LeaveAlternateScreen,
            cursor::Show
        );
    }
}

fn install_panic_hook() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !TERMINAL_ACTIVE.load(Ordering::SeqCst) {
                return previous(info);
            }
            let on_ui = UI_THREAD
                .lock()
                .map(|t| *t == Some(thread::current().id()))
                .unwrap_or(true);
            if on_ui {
                restore_terminal();
                previous(info);
            } else if let Ok(mut v) = OTHER_PANICS.lock() {
                // Printing now would scribble over the UI; the message is shown in the status
                // bar and printed once the terminal is restored.
                let name = thread::current().name().unwrap_or("unnamed").to_string();
                v.push(format!("thread '{name}' panicked: {info}"));
            }
        }));
    });
}

/// Holds the terminal in raw mode on the alternate screen with mouse capture; restores it when
/// dropped.
pub struct TerminalGuard(());

/// Raw mode, the alternate screen, mouse reporting, no cursor.
fn ui_mode() -> Result<()> {
    enable_raw_mode().context("cannot switch the terminal to raw mode")?;
    execute!(
        io::stdout(),
        EnterAlternateScreen,
        EnableMouseCapture,
        cursor::Hide
    )
    .context("cannot switch to the alternate screen")
}

impl TerminalGuard {
    /// Switches the terminal to UI mode (and installs the panic hook that restores it).
    pub fn enter() -> Result<Self> {
        install_panic_hook();
        if let Ok(mut t) = UI_THREAD.lock() {
            *t = Some(thread::current().id());
        }
        TERMINAL_ACTIVE.store(true, Ordering::SeqCst);
        // From here on, any failure is undone by the guard's Drop.
        let guard = TerminalGuard(());
        ui_mode()?;
        Ok(guard)
    }

    /// Switches UI mode on again after the process was stopped and continued (SIGSTOP and `fg`):
    /// the shell may have reset the terminal meanwhile.
    pub fn reenter(&mut self) -> Result<()> {
        // crossterm skips enable_raw_mode when it believes raw mode is on; what it saved as the
        // mode to restore is still right.
        let _ = disable_raw_mode();
        ui_mode()
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

#[cfg(test)]
mod tests;
