//! Drawing: one pure function per panel, `render(frame, area, &App)`, and [`draw`] which lays
//! the screen out and calls them. Nothing here touches the model or changes the state.

pub mod compare;
pub mod device;
pub mod follow;
pub mod generated;
pub mod header;
pub mod heatmap;
pub mod help;
pub mod histograms;
pub mod history;
pub mod import;
pub mod layout;
pub mod sliders;
pub mod table;
pub mod timing;
pub mod tune;

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph};

use crate::tui::app::App;

/// A panel frame: a top rule carrying the title, highlighted when the panel has the focus.
pub fn panel_block<'a>(app: &App, title: Line<'a>, focused: bool) -> Block<'a> {
    let theme = &app.theme;
    let mut title = title;
    if let Some(first) = title.spans.first_mut() {
        first.style = if focused {
            theme.title_focused()
        } else {
            theme.title()
        };
        if focused {
            title
                .spans
                .insert(0, Span::styled("▶", theme.title_focused()));
        }
    }
    Block::new().borders(Borders::TOP).title(title)
}

/// Draws the whole screen for the current state.
pub fn draw(frame: &mut Frame, app: &App) {
    let area = frame.area();
    let Some(l) = layout::screen(area, app) else {
        help::render_too_small(frame, area, app);
        return;
    };
    header::render(frame, l.header, app);
    if app.displayed().is_some() {
        heatmap::render(frame, l.heatmap, app);
        sliders::render(frame, l.sliders, app);
        histograms::render(frame, l.histograms, app);
        history::render(frame, l.history, app);
        timing::render(frame, l.timing, app);
        device::render(frame, l.device, app);
        if let Some(g) = l.generated {
            generated::render(frame, g, app);
        }
    } else {
        let body = Rect::new(
            area.x,
            l.heatmap.y,
            area.width,
            l.status.y.saturating_sub(l.heatmap.y),
        );
        frame.render_widget(
            Paragraph::new(Line::styled(
                "waiting for the first snapshot from the model…",
                app.theme.dim(),
            ))
            .centered(),
            Rect {
                y: body.y + body.height / 2,
                height: 1,
                ..body
            },
        );
    }
    crate::tui::replay::render_timeline(frame, l.timeline, app);
    help::render_status(frame, l.status, app);
    if app.compare.is_open(app.displayed()) && !app.table_open {
        let body = Rect::new(
            area.x,
            l.header.y + l.header.height,
            area.width,
            l.status.y.saturating_sub(l.header.y + l.header.height),
        );
        compare::render(frame, body, app);
    }
    if app.table_open && app.displayed().is_some() {
        let body = Rect::new(
            area.x,
            l.header.y + l.header.height,
            area.width,
            l.status.y.saturating_sub(l.header.y + l.header.height),
        );
        table::render(frame, body, app);
    }
    if app.follow.is_some() {
        let body = Rect::new(
            area.x,
            l.header.y + l.header.height,
            area.width,
            l.status.y.saturating_sub(l.header.y + l.header.height),
        );
        follow::render(frame, body, app);
    }
    tune::render(frame, area, app);
    if app.help_open {
        help::render_help(frame, area, app);
    }
}
