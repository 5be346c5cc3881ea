//! Prints the UI's screens at 80x24, 120x40 and 200x60 for an eval and a generate session
//! (synthetic snapshots from `tests/common/fixtures.rs`, no colour): a look at the layout without
//! a terminal.
//!
//! `cargo run --release --example tui_screens`

#[path = "../tests/common/fixtures.rs"]
#[allow(dead_code)]
mod fixtures;

use ratatui::Terminal;
use ratatui::backend::TestBackend;

use fixtures::{buffer_text as text, example_snapshot};
use xmoe_top::profiling::snapshot::WorkloadKind;
use xmoe_top::tui::{App, ColorMode, Theme, render};

fn main() -> anyhow::Result<()> {
    for (kind, gpu, n_experts) in [
        (WorkloadKind::Eval, false, 16),
        (WorkloadKind::Generate, true, 64),
    ] {
        for (w, h) in [(80, 24), (120, 40), (200, 60)] {
            let mut app = App::new(Theme::new(ColorMode::NoColor));
            app.push_snapshot(example_snapshot(kind, n_experts, gpu));
            app.size = (w, h);
            let mut terminal = Terminal::new(TestBackend::new(w, h))?;
            terminal.draw(|f| render::draw(f, &app))?;
            println!("{kind:?} {w}x{h}\n{}", text(terminal.backend().buffer()));
        }
    }
    Ok(())
}
