//! The help overlay (every key), the status bar, and the "terminal too small" screen.

use ratatui::Frame;
use ratatui::layout::{Constraint, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Wrap};

use crate::tui::app::App;
use crate::tui::keys;
use crate::tui::render::layout::{MIN_HEIGHT, MIN_WIDTH};

/// Every key and mouse action, as (keys, what it does), from [`keys::BINDINGS`]; the export
/// line depends on whether an exporter is plugged in.
pub fn help_entries(app: &App) -> Vec<(String, &'static str)> {
    keys::help_lines(&app.keymap, app.can_export())
}

/// Draws the help overlay over the middle of `area`.
pub fn render_help(frame: &mut Frame, area: Rect, app: &App) {
    let theme = &app.theme;
    let entries = help_entries(app);
    // The header's first line (FROZEN, PAUSED, ENDED marks) stays visible; when every entry
    // and both borders do not fit below it, the bottom border goes first.
    let below = Rect {
        y: area.y + 1,
        height: area.height.saturating_sub(1),
        ..area
    };
    let n = entries.len() as u16;
    let (h, borders) = if n + 2 <= below.height {
        (n + 2, Borders::ALL)
    } else {
        (
            (n + 1).min(below.height),
            Borders::TOP | Borders::LEFT | Borders::RIGHT,
        )
    };
    let w = 78.min(area.width);
    let popup = below.centered(Constraint::Length(w), Constraint::Length(h));
    frame.render_widget(Clear, popup);
    let lines: Vec<Line> = entries
        .iter()
        .map(|(k, what)| {
            Line::from(vec![
                Span::styled(format!(" {k:<15} "), theme.value()),
                Span::raw(*what),
            ])
        })
        .collect();
    frame.render_widget(
        Paragraph::new(lines).block(Block::new().borders(borders).title(Line::styled(
            " Help: ? or Esc to close ",
            theme.title_focused(),
        ))),
        popup,
    );
}

/// Draws the status bar: the last message, else key hints; the snapshot counter on the right.
pub fn render_status(frame: &mut Frame, area: Rect, app: &App) {
    let theme = &app.theme;
    // The redraw cap is adjustable (< >), so it is always said; a request held back until the
    // keys settle is said too, since the screen does not show its effect yet.
    let waiting = if app.debounce.is_waiting() {
        "applying when keys settle · "
    } else {
        ""
    };
    let fps = format!("≤{:.0} fps", app.fps);
    let right = match app.displayed() {
        Some(s) if app.session_ended => {
            format!("session ended · snapshot #{} · {fps} ", s.sequence)
        }
        Some(s) => format!("{waiting}{:.1} s · {fps} ", s.session_elapsed_s),
        None if app.session_ended => "session ended ".to_string(),
        None => format!("{fps} "),
    };
    let rw = (right.chars().count() as u16).min(area.width / 2);
    let left_w = area.width.saturating_sub(rw + 1) as usize;
    let left = match &app.message {
        Some(m) => Span::styled(
            format!(" {}", m.text),
            if m.is_error {
                theme.error()
            } else {
                theme.info()
            },
        ),
        None => Span::styled(keys::status_hints_within(&app.keymap, left_w), theme.dim()),
    };
    frame.render_widget(
        Paragraph::new(Line::from(left)),
        Rect {
            width: area.width.saturating_sub(rw + 1),
            ..area
        },
    );
    frame.render_widget(
        Paragraph::new(Line::styled(right, theme.dim())),
        Rect {
            x: area.x + area.width - rw,
            width: rw,
            ..area
        },
    );
}

/// The whole screen when the terminal is below the minimum size.
pub fn render_too_small(frame: &mut Frame, area: Rect, app: &App) {
    let theme = &app.theme;
    let text = vec![
        Line::styled(
            format!("terminal too small: need {MIN_WIDTH} x {MIN_HEIGHT}"),
            theme.error(),
        ),
        Line::raw(format!(
            "now {} x {}; enlarge it or press q to quit",
            area.width, area.height
        )),
    ];
    let h = 2.min(area.height);
    let y = area.y + area.height.saturating_sub(h) / 2;
    frame.render_widget(
        Paragraph::new(text)
            .centered()
            .wrap(Wrap { trim: true })
            .block(Block::new().borders(Borders::NONE)),
        Rect::new(area.x, y, area.width, area.height - (y - area.y)),
    );
}
