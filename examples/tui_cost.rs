//! What drawing the UI costs (the figures in docs/tui.md, "Cost"): the frame time at 200x60 with
//! 24 MoE layers x 64 experts through ratatui's `TestBackend`, and the UI thread's CPU use at the
//! default 10 fps with a new snapshot every 100 ms through the real crossterm backend writing to
//! a sink, over 5 s (CPU time from `/proc/thread-self/schedstat`, so Linux only).
//!
//! `cargo run --release --example tui_cost`

#[path = "../tests/common/fixtures.rs"]
#[allow(dead_code)]
mod fixtures;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use crossterm::event::{Event, KeyCode, KeyEvent, KeyModifiers};
use ratatui::Terminal;
use ratatui::backend::{CrosstermBackend, TestBackend};
use ratatui::layout::Rect;

use fixtures::large_snapshot;
use xmoe_top::profiling::snapshot::Snapshot;
use xmoe_top::tui::{App, ColorMode, DEFAULT_FPS, Theme, UiEvent, event_loop, render};

/// Frames per measurement of the frame time.
const FRAMES: u32 = 500;

fn frame_time() -> anyhow::Result<()> {
    for mode in [ColorMode::TrueColor, ColorMode::NoColor] {
        let mut app = App::new(Theme::new(mode));
        app.push_snapshot(large_snapshot());
        let mut t = Terminal::new(TestBackend::new(200, 60))?;
        for _ in 0..20 {
            t.draw(|f| render::draw(f, &app))?;
        }
        let start = Instant::now();
        for i in 0..FRAMES {
            // A new selection each frame, so that the heatmap and sliders repaint.
            app.layer = i as usize % 24;
            t.draw(|f| render::draw(f, &app))?;
        }
        let per = start.elapsed() / FRAMES;
        // The terminal's own share: diffing and copying an unchanged 200x60 buffer.
        let start = Instant::now();
        for _ in 0..FRAMES {
            t.draw(|_| {})?;
        }
        let empty = start.elapsed() / FRAMES;
        println!(
            "empty frame (ratatui diff only): {:.3} ms",
            empty.as_secs_f64() * 1e3
        );
        println!(
            "{mode:?}: {:.3} ms per frame at 200x60, 24 x 64; {:.2}% of one core at 10 fps",
            per.as_secs_f64() * 1e3,
            per.as_secs_f64() * 10.0 * 100.0
        );
    }
    Ok(())
}

/// CPU time of the calling thread in nanoseconds (Linux: /proc/thread-self/schedstat).
fn thread_cpu_ns() -> anyhow::Result<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat")
        .context("reading /proc/thread-self/schedstat (Linux only)")?;
    let first = s.split_whitespace().next().context("empty schedstat")?;
    Ok(first.parse()?)
}

fn ui_cpu_use() -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel();
    let a = large_snapshot();
    let mut b: Snapshot = a.clone();
    // A second picture with every heatmap cell changed, so every frame repaints the heatmap.
    for l in &mut b.epoch.window.layers {
        l.expert_token_share.reverse();
    }
    let feeder = std::thread::spawn(move || {
        let start = Instant::now();
        let mut i = 0u64;
        while start.elapsed() < Duration::from_secs(5) {
            let mut s = if i.is_multiple_of(2) {
                a.clone()
            } else {
                b.clone()
            };
            s.sequence = i;
            if tx.send(UiEvent::Snapshot(Box::new(s))).is_err() {
                return;
            }
            i += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        let quit = KeyEvent::new(KeyCode::Char('q'), KeyModifiers::NONE);
        let _ = tx.send(UiEvent::Input(Event::Key(quit)));
    });
    let backend = CrosstermBackend::new(std::io::sink());
    let mut term = Terminal::with_options(
        backend,
        ratatui::TerminalOptions {
            viewport: ratatui::Viewport::Fixed(Rect::new(0, 0, 200, 60)),
        },
    )?;
    let mut app = App::new(Theme::new(ColorMode::TrueColor));
    let (cpu0, t0) = (thread_cpu_ns()?, Instant::now());
    event_loop(&mut term, &rx, &mut app, &mut |_| Ok(()), DEFAULT_FPS)?;
    let (cpu, wall) = (thread_cpu_ns()? - cpu0, t0.elapsed());
    feeder.join().expect("the snapshot feeder panicked");
    let frames = term.draw(|_| {})?.count;
    println!(
        "UI thread: {:.1} ms CPU over {:.2} s wall, {frames} frames: {:.2}% of one core, {:.3} ms per frame",
        cpu as f64 / 1e6,
        wall.as_secs_f64(),
        100.0 * cpu as f64 / wall.as_nanos() as f64,
        cpu as f64 / 1e6 / frames as f64
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    frame_time()?;
    ui_cpu_use()
}
