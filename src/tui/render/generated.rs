//! Generate mode: the recent text, each token shaded by how many experts it used (mean over the
//! MoE layers) — hard tokens take more experts.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::{Color, Style};
use ratatui::text::{Line, Span};

use crate::profiling::snapshot::TokenOrigin;
use crate::tui::app::App;
use crate::tui::render::panel_block;
use crate::tui::theme::Theme;

/// How one character of a token's text is drawn in one cell: newline as ⏎; control characters,
/// replacement characters (a token holding part of a UTF-8 character) and the wide scripts from
/// U+2E80 on (two cells each) as ·.
pub fn display_char(c: char) -> char {
    match c {
        '\n' => '⏎',
        c if c.is_control() || c == '\u{fffd}' || c >= '\u{2e80}' => '·',
        c => c,
    }
}

/// The cells of one token: its decoded text, or · when it decodes to nothing.
pub fn token_cells(bytes: &[u8]) -> Vec<char> {
    let text = String::from_utf8_lossy(bytes);
    let cells: Vec<char> = text.chars().map(display_char).collect();
    if cells.is_empty() { vec!['·'] } else { cells }
}

/// Draws the generated-text strip.
pub fn render(frame: &mut Frame, area: Rect, app: &App) {
    let Some(g) = app.displayed().and_then(|s| s.generated.as_ref()) else {
        return;
    };
    let theme = &app.theme;
    let (lo, hi) = g.tokens.iter().fold((f32::MAX, 0.0f32), |(lo, hi), t| {
        (lo.min(t.mean_experts), hi.max(t.mean_experts))
    });
    let mut title = vec![Span::raw(
        " Generated text: shade = experts per token (mean over layers) ",
    )];
    if !g.tokens.is_empty() {
        title.push(Span::styled(format!("{lo:.1} "), theme.dim()));
        for v in [lo / hi, 0.5, 0.75, 1.0] {
            if theme.has_color() {
                title.push(Span::styled("█", Style::new().fg(theme.heat(v as f64))));
            } else {
                title.push(Span::raw(Theme::shade(v as f64)));
            }
        }
        title.push(Span::styled(
            format!(" {hi:.1} · prompt underlined "),
            theme.dim(),
        ));
    }
    frame.render_widget(panel_block(app, Line::from(title), false), area);
    let inner = Rect {
        y: area.y + 1,
        height: area.height.saturating_sub(1),
        ..area
    };
    if inner.width == 0 || inner.height == 0 {
        return;
    }
    // Without colour each text line has a line of shade glyphs under it.
    let per_row = if theme.has_color() { 1 } else { 2 };
    let rows = (inner.height / per_row).max(1) as usize;
    let w = inner.width as usize;
    // Cells: one per token, plus a separator where a new prompt starts.
    let mut cells: Vec<(char, Option<(f32, TokenOrigin)>)> = Vec::with_capacity(g.tokens.len());
    for (i, t) in g.tokens.iter().enumerate() {
        if i > 0 && g.tokens[i - 1].sequence != t.sequence {
            cells.push(('│', None));
        }
        for ch in token_cells(&t.bytes) {
            cells.push((ch, Some((t.mean_experts, t.origin))));
        }
    }
    let start = cells.len().saturating_sub(rows * w);
    let buf = frame.buffer_mut();
    for (i, (ch, info)) in cells[start..].iter().enumerate() {
        let (r, c) = (i / w, i % w);
        let x = inner.x + c as u16;
        let y = inner.y + (r * per_row as usize) as u16;
        if y >= inner.y + inner.height {
            break;
        }
        let Some((mean, origin)) = info else {
            buf[(x, y)].set_char(*ch).set_style(theme.dim());
            continue;
        };
        let v = if hi > 0.0 { (mean / hi) as f64 } else { 0.0 };
        let mut style = if *origin == TokenOrigin::Prompt {
            theme.prompt_text()
        } else {
            Style::new()
        };
        if theme.has_color() {
            let fg = if v > 0.6 { Color::Black } else { Color::White };
            style = style.fg(fg).bg(theme.heat(v));
        } else if y + 1 < inner.y + inner.height {
            buf[(x, y + 1)].set_symbol(Theme::shade(v));
        }
        buf[(x, y)].set_char(*ch).set_style(style);
    }
}
