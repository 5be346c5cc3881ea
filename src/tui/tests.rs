//! Render, style, input-mapping and event-loop tests of the UI, on snapshots built by the real
//! statistics code (`profiling::fixtures`).

use std::path::PathBuf;
use std::sync::mpsc;

use crossterm::event::{
    Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers, MouseButton, MouseEvent, MouseEventKind,
};
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::style::Color;

use super::app::{App, Panel, Target};
use super::input::{self, Action};
use super::render::heatmap::{self, CellMode, HeatGeometry};
use super::render::{self, layout, sliders};
use super::theme::{ColorMode, Theme};
use super::{UiEvent, event_loop};
use crate::profiling::fixtures::{buffer_text as text, example_snapshot, large_snapshot};
use crate::profiling::snapshot::{Snapshot, WorkloadKind};
use crate::routing::RoutingPolicy;
use crate::session::{Control, Layers};
use crate::units::micros;

const SIZES: [(u16, u16); 3] = [(80, 24), (120, 40), (200, 60)];

fn app_with(snap: Snapshot, mode: ColorMode) -> App {
    let mut app = App::new(Theme::new(mode));
    app.push_snapshot(snap);
    app
}

fn draw(app: &mut App, w: u16, h: u16) -> Buffer {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    let done = t.draw(|f| render::draw(f, app)).unwrap();
    app.size = (done.area.width, done.area.height);
    t.backend().buffer().clone()
}

#[track_caller]
fn has(screen: &str, needle: &str, what: &str) {
    assert!(
        screen.contains(needle),
        "{what}: {needle:?} not on screen:\n{screen}"
    );
}

fn key(code: KeyCode) -> Event {
    Event::Key(KeyEvent::new(code, KeyModifiers::NONE))
}

fn shift(code: KeyCode) -> Event {
    Event::Key(KeyEvent::new(code, KeyModifiers::SHIFT))
}

/// Feeds events and collects the requests sent to the session.
fn press(app: &mut App, events: &[Event]) -> Vec<Control> {
    let mut sent = Vec::new();
    for ev in events {
        input::handle_event(app, ev, &mut |c| {
            sent.push(c);
            Ok(())
        });
    }
    sent
}

fn threshold(slot: Layers, t: f32) -> Control {
    Control::SetPolicy {
        layers: slot,
        policy: RoutingPolicy::threshold(t),
    }
}

// ---------------------------------------------------------------- render

#[test]
fn every_panel_and_its_figures_at_each_size() {
    for kind in [WorkloadKind::Eval, WorkloadKind::Generate] {
        for gpu in [false, true] {
            for mode in [ColorMode::TrueColor, ColorMode::NoColor] {
                for (w, h) in SIZES {
                    let snap = example_snapshot(kind, 16, gpu);
                    let mut app = app_with(snap.clone(), mode);
                    let screen = text(&draw(&mut app, w, h));
                    let ctx = format!("{kind:?} gpu={gpu} {mode:?} {w}x{h}");
                    check_screen(&screen, &snap, &ctx, w);
                }
            }
        }
    }
}

fn check_screen(screen: &str, s: &Snapshot, ctx: &str, width: u16) {
    let e = &s.epoch;
    let f = &e.window.flops;
    // Header.
    has(screen, &s.model.name, ctx);
    has(screen, &format!("{:.0} tok/s", e.tokens_per_second), ctx);
    // Each throughput figure names its span.
    if s.workload.kind == WorkloadKind::Eval || width >= 120 {
        has(screen, &format!("last {} tok", e.window.tokens), ctx);
    }
    if s.workload.kind == WorkloadKind::Generate {
        has(screen, "tok/s incl. prefill", ctx);
        has(screen, "decode tok/s", ctx);
    }
    has(
        screen,
        &format!("{:.1}%", f.moe_saved_vs_all_experts_pct),
        ctx,
    );
    if width >= 120 {
        // Narrower headers leave the top-k comparison out whole (never cut mid-word).
        has(screen, &format!("{:.1}%", f.moe_saved_vs_top_k_pct), ctx);
        has(screen, &format!("vs top-{}", f.top_k), ctx);
    }
    has(screen, &format!("epoch {}", e.id), ctx);
    has(screen, "t 0.70 (all layers)", ctx);
    if s.workload.kind == WorkloadKind::Eval {
        if width >= 120 {
            has(
                screen,
                &format!("{:.3}", e.quality.bits_per_byte.unwrap()),
                ctx,
            );
        }
        // Δ bits/byte with its sample size.
        has(
            screen,
            &format!("{:+.3}", e.quality.delta_bits_per_byte.unwrap()),
            ctx,
        );
        has(
            screen,
            &format!("({} batch", e.quality.reference_batches),
            ctx,
        );
    }
    // Heatmap: every row label and the detail of the cursor cell (layer 0, expert 0).
    has(screen, "Experts: share of window tokens", ctx);
    let l0 = &e.window.layers[0];
    for l in &e.window.layers {
        has(screen, &format!("L{}", l.layer), ctx);
    }
    has(screen, &format!("L{} expert 0: ", l0.layer), ctx);
    has(
        screen,
        &format!("{:.1}% of tokens", 100.0 * l0.expert_token_share[0]),
        ctx,
    );
    has(
        screen,
        &format!("gate mass {:.3}", l0.expert_gate_mass[0]),
        ctx,
    );
    // Sliders: the global one and each layer's figures.
    has(screen, "Thresholds", ctx);
    has(
        screen,
        &format!("{:5.2} exp/tok", e.window.mean_experts_per_token),
        ctx,
    );
    // One framing on the screen: compute saved, as in the header.
    has(
        screen,
        &format!("{:5.1}% saved", f.moe_saved_vs_all_experts_pct),
        ctx,
    );
    assert!(!screen.contains("% FLOPs"), "{ctx}");
    for l in &e.window.layers {
        has(
            screen,
            &format!("{:5.2} exp/tok", l.mean_experts_per_token),
            ctx,
        );
        has(
            screen,
            &format!(
                "{:5.1}% saved",
                100.0 * (1.0 - l.moe_flops_fraction_of_all_experts)
            ),
            ctx,
        );
    }
    // Histograms.
    let hl = &e.histograms.token_latency_us;
    has(screen, "Latency/token", ctx);
    has(screen, "MoE FLOPs/token", ctx);
    has(screen, &format!("p50 {}", micros(hl.p50)), ctx);
    has(screen, &format!("p90 {}", micros(hl.p90)), ctx);
    has(screen, &format!("Experts/token L{}", l0.layer), ctx);
    has(
        screen,
        &format!("mean {:.2}", e.cumulative.layers[0].mean_experts_per_token),
        ctx,
    );
    if width >= 120 {
        has(screen, &format!("p99 {}", micros(hl.p99)), ctx);
        has(screen, &format!("max {}", micros(hl.max)), ctx);
    }
    // Device.
    if let Some(g) = s.device.gpus.first() {
        has(screen, &g.name, ctx);
        has(
            screen,
            &format!("util {}%", g.utilization_pct.unwrap()),
            ctx,
        );
    } else {
        has(screen, "Device: no GPU", ctx);
        has(
            screen,
            &format!("CPU {:.0}%", s.device.process.cpu_pct.unwrap()),
            ctx,
        );
        has(screen, "329 MiB", ctx);
    }
    // Generated text: the newest characters are shown.
    if let Some(g) = &s.generated {
        has(screen, "Generated text", ctx);
        let tail: String = g.tokens[g.tokens.len() - 12..]
            .iter()
            .flat_map(|t| render::generated::token_cells(&t.bytes))
            .collect();
        has(screen, tail.trim(), ctx);
    } else {
        assert!(!screen.contains("Generated text"), "{ctx}");
    }
}

#[test]
fn marks_help_and_waiting_screen() {
    let mut app = App::new(Theme::new(ColorMode::NoColor));
    let screen = text(&draw(&mut app, 80, 24));
    has(&screen, "waiting for the first snapshot", "no snapshot");
    let mut snap = example_snapshot(WorkloadKind::Eval, 16, false);
    snap.paused = true;
    app.push_snapshot(snap);
    app.toggle_freeze();
    app.help_open = true;
    let screen = text(&draw(&mut app, 80, 24));
    has(&screen, "FROZEN", "frozen mark");
    has(&screen, "PAUSED", "paused mark");
    has(&screen, "Help", "help overlay");
    // An epoch that has just started shows no per-token figure rather than zeros.
    let mut fresh = example_snapshot(WorkloadKind::Eval, 16, false);
    fresh.epoch.window.tokens = 0;
    let mut other = app_with(fresh, ColorMode::NoColor);
    let s2 = text(&draw(&mut other, 80, 24));
    has(&s2, "no tokens yet in this epoch", "empty window");
    assert!(!s2.contains("exp/tok"), "{s2}");
    // A reset epoch: no throughput, savings, mean or mode that look measured.
    let mut reset = example_snapshot(WorkloadKind::Eval, 16, false);
    reset.epoch.window.tokens = 0;
    for l in &mut reset.epoch.cumulative.layers {
        l.experts_per_token_counts.iter_mut().for_each(|c| *c = 0);
    }
    let mut other = app_with(reset, ColorMode::NoColor);
    let s3 = text(&draw(&mut other, 120, 40));
    has(&s3, " — tok/s, last 0 tok", "dashes in the header");
    assert!(!s3.contains(" 0 tok/s"), "{s3}");
    has(&s3, "saved — vs all", "dashes in the header");
    has(
        &s3,
        "expert 0: no tokens yet in this epoch",
        "heatmap detail",
    );
    assert!(!s3.contains("▲mean"), "no experts-per-token figures: {s3}");
    has(&screen, "export: disabled", "export disabled in help");
    for (keys, what) in render::help::help_entries(&app) {
        has(&screen, keys.trim(), "every key is listed");
        has(&screen, what, "every explanation fits at 80 columns");
    }
}

#[test]
fn too_small_screen_and_resizing_never_panic() {
    let mut app = app_with(large_snapshot(), ColorMode::TrueColor);
    for (w, h) in [(79, 24), (80, 23), (40, 10)] {
        let screen = text(&draw(&mut app, w, h));
        has(
            &screen,
            "terminal too small: need 80 x 24",
            &format!("{w}x{h}"),
        );
    }
    let mut t = Terminal::new(TestBackend::new(80, 24)).unwrap();
    let sizes = [
        (80, 24),
        (1, 1),
        (200, 60),
        (2, 30),
        (80, 24),
        (119, 24),
        (120, 24),
        (121, 33),
        (300, 100),
        (79, 80),
        (80, 200),
        (10, 2),
        (200, 24),
        (81, 25),
        (0, 0),
        (150, 45),
    ];
    for mode in [ColorMode::TrueColor, ColorMode::NoColor] {
        app.theme = Theme::new(mode);
        for (kind, n) in [(WorkloadKind::Generate, 16), (WorkloadKind::Eval, 256)] {
            app.push_snapshot(example_snapshot(kind, n, false));
            for &(w, h) in &sizes {
                t.backend_mut().resize(w, h);
                t.draw(|f| render::draw(f, &app)).unwrap();
            }
        }
        app.push_snapshot(large_snapshot());
        for &(w, h) in &sizes {
            app.layer = (w as usize) % 24;
            app.help_open = w % 2 == 0;
            t.backend_mut().resize(w, h);
            t.draw(|f| render::draw(f, &app)).unwrap();
        }
    }
}

#[test]
fn many_layers_are_binned_to_fit_then_scroll_when_zoomed() {
    // 24 MoE layers on a 24-line screen: three rows of 8 layers each, their mean shares.
    let snap = large_snapshot();
    let mut app = app_with(snap.clone(), ColorMode::NoColor);
    app.panel = Panel::Heatmap;
    let buf = draw(&mut app, 80, 24);
    let screen = text(&buf);
    has(&screen, "1 row = 8 layers", "layer binning note");
    has(&screen, "▶L1-15", "first bin, holding the selection");
    has(&screen, " L17-31", "second bin");
    has(&screen, " L33-47", "third bin");
    let (g, max) = heat_geometry(&app, 80, 24);
    assert_eq!((g.layers_per_row, g.cells.height), (8, 3));
    assert_eq!(
        g.slot_at(g.row_y(1)),
        Some(8),
        "a click selects the bin's first layer"
    );
    let layers = &snap.epoch.window.layers;
    let mean: f64 = layers[8..16]
        .iter()
        .map(|l| l.expert_token_share[0])
        .sum::<f64>()
        / 8.0;
    let x = g.x_of(0);
    assert_eq!(buf[(x, g.row_y(1))].symbol(), Theme::shade(mean / max));
    // Zoomed: one layer per row, scrolling with the selection.
    press(&mut app, &[key(KeyCode::Char('z'))]);
    let screen = text(&draw(&mut app, 80, 24));
    has(&screen, "rows 1-", "scroll note");
    for _ in 0..20 {
        press(&mut app, &[key(KeyCode::Down)]);
    }
    assert_eq!(app.layer, 20);
    let screen = text(&draw(&mut app, 80, 24));
    has(&screen, "▶L41", "selected layer visible after scrolling");
    has(&screen, "L41 expert 0:", "detail follows the selection");
}

// ---------------------------------------------------------------- style

fn heat_geometry(app: &App, w: u16, h: u16) -> (HeatGeometry, f64) {
    let snap = app.displayed().unwrap();
    let l = layout::screen(Rect::new(0, 0, w, h), app).unwrap();
    let g = HeatGeometry::new(l.heatmap, app, snap);
    (g, heatmap::scale_max(snap, &g))
}

#[test]
fn heatmap_cells_carry_the_expected_colour_and_glyphs() {
    let snap = example_snapshot(WorkloadKind::Eval, 16, false);
    let rows = &snap.epoch.window.layers;
    // Colour: every cell is a full block in the ramp colour of its share.
    let mut app = app_with(snap.clone(), ColorMode::TrueColor);
    let buf = draw(&mut app, 120, 40);
    let (g, max) = heat_geometry(&app, 120, 40);
    assert!(matches!(g.mode, CellMode::Wide(_)));
    let mut saw_top = false;
    for (slot, l) in rows.iter().enumerate() {
        for (e, &share) in l.expert_token_share.iter().enumerate() {
            let cell = &buf[(g.x_of(e), g.row_y(slot as u16))];
            assert_eq!(cell.symbol(), "█");
            assert_eq!(
                cell.fg,
                app.theme.heat(share / max),
                "slot {slot} expert {e}"
            );
            if share == max {
                assert_eq!(cell.fg, Color::Rgb(253, 231, 37));
                saw_top = true;
            }
        }
    }
    assert!(saw_top);
    // 256 colours: palette indices.
    let mut app = app_with(snap.clone(), ColorMode::Ansi256);
    let buf = draw(&mut app, 120, 40);
    let cell = &buf[(g.x_of(0), g.cells.y)];
    assert!(matches!(cell.fg, Color::Indexed(_)));
    // No colour: shade glyphs matching the share, no colour at all.
    let mut app = app_with(snap.clone(), ColorMode::NoColor);
    let buf = draw(&mut app, 120, 40);
    let (g, max) = heat_geometry(&app, 120, 40);
    for (slot, l) in rows.iter().enumerate() {
        for (e, &share) in l.expert_token_share.iter().enumerate() {
            let cell = &buf[(g.x_of(e), g.row_y(slot as u16))];
            assert_eq!(cell.symbol(), Theme::shade(share / max));
            assert_eq!((cell.fg, cell.bg), (Color::Reset, Color::Reset));
        }
    }
    assert!(
        (0..buf.area.height)
            .flat_map(|y| (0..buf.area.width).map(move |x| (x, y)))
            .all(|p| buf[p].fg == Color::Reset && buf[p].bg == Color::Reset),
        "no-colour mode uses no colour anywhere"
    );
}

#[test]
fn dense_heatmaps_use_half_blocks_or_bins() {
    // 128 experts in 80 columns: two experts per character, left as fg, right as bg.
    let snap = example_snapshot(WorkloadKind::Eval, 128, false);
    let mut app = app_with(snap.clone(), ColorMode::TrueColor);
    let buf = draw(&mut app, 80, 24);
    let (g, max) = heat_geometry(&app, 80, 24);
    assert_eq!(g.mode, CellMode::Half);
    let l = &snap.epoch.window.layers[1];
    for e in (0..128).step_by(2) {
        let cell = &buf[(g.x_of(e), g.row_y(1))];
        assert_eq!(cell.symbol(), "▌");
        assert_eq!(cell.fg, app.theme.heat(l.expert_token_share[e] / max));
        assert_eq!(cell.bg, app.theme.heat(l.expert_token_share[e + 1] / max));
    }
    has(
        &text(&buf),
        "1 cell = 2 experts (z: zoom)",
        "half-block note",
    );
    // Without colour the same model is binned, and says so.
    let mut app = app_with(snap.clone(), ColorMode::NoColor);
    let screen = text(&draw(&mut app, 80, 24));
    let (g, _) = heat_geometry(&app, 80, 24);
    assert_eq!(g.mode, CellMode::Binned(2));
    has(&screen, "1 cell = 2 experts (z: zoom)", "binning note");
}

#[test]
fn shared_experts_get_their_own_column() {
    let mut snap = example_snapshot(WorkloadKind::Eval, 16, false);
    snap.model.shared_experts = 1;
    let mut app = app_with(snap.clone(), ColorMode::NoColor);
    let buf = draw(&mut app, 100, 30);
    let (g, _) = heat_geometry(&app, 100, 30);
    let sx = g.shared_x.expect("a shared column");
    assert!(
        sx > g.cells.x + g.cells.width,
        "right of the routed experts"
    );
    for row in 0..g.cells.height {
        let y = g.cells.y + row;
        assert_eq!(buf[(sx - 1, y)].symbol(), "│");
        assert_eq!(buf[(sx, y)].symbol(), Theme::shade(1.0));
    }
    assert_eq!(buf[(sx, g.axis_y.unwrap())].symbol(), "S");
    has(&text(&buf), "S: shared, every token", "legend");
    // Without shared experts there is no such column.
    let mut app = app_with(
        example_snapshot(WorkloadKind::Eval, 16, false),
        ColorMode::NoColor,
    );
    draw(&mut app, 100, 30);
    assert!(heat_geometry(&app, 100, 30).0.shared_x.is_none());
}

#[test]
fn zoom_shows_one_expert_per_cell_around_the_cursor() {
    // 128 experts in 80 columns, zoomed: a window of single experts that follows the cursor.
    let snap = example_snapshot(WorkloadKind::Eval, 128, false);
    let mut app = app_with(snap.clone(), ColorMode::NoColor);
    app.panel = Panel::Heatmap;
    press(&mut app, &[key(KeyCode::Char('z'))]);
    assert!(app.heat_zoom);
    let buf = draw(&mut app, 80, 24);
    let (g, max) = heat_geometry(&app, 80, 24);
    assert_eq!(g.mode, CellMode::Wide(1));
    assert!(g.is_zoomed() && g.first_expert == 0);
    let shown = g.visible_experts;
    assert!(shown < 128 && shown == g.cells.width as usize, "{shown}");
    has(
        &text(&buf),
        &format!("zoom: experts 0-{} of 128 (z: fit)", shown - 1),
        "zoom note",
    );
    // Each cell is one expert's own share.
    let l = &snap.epoch.window.layers[1];
    for e in 0..shown {
        let cell = &buf[(g.x_of(e), g.row_y(1))];
        assert_eq!(
            cell.symbol(),
            Theme::shade(l.expert_token_share[e] / max),
            "expert {e}"
        );
        assert_eq!(g.expert_at(g.x_of(e)), Some(e));
    }
    // Moving the cursor past the right edge scrolls the window with it.
    for _ in 0..100 {
        press(&mut app, &[key(KeyCode::Right)]);
    }
    assert_eq!(app.expert, 100);
    let buf = draw(&mut app, 80, 24);
    let (g, _) = heat_geometry(&app, 80, 24);
    assert!(g.first_expert > 0 && g.first_expert <= 100);
    assert!(100 < g.first_expert + g.visible_experts);
    assert_eq!(g.expert_at(g.x_of(100)), Some(100));
    let last = g.first_expert + g.visible_experts - 1;
    has(
        &text(&buf),
        &format!("zoom: experts {}-{last} of 128", g.first_expert),
        "scrolled",
    );
    // z again: every expert, binned.
    press(&mut app, &[key(KeyCode::Char('z'))]);
    draw(&mut app, 80, 24);
    let (g, _) = heat_geometry(&app, 80, 24);
    assert!(!g.is_zoomed() && g.mode == CellMode::Binned(2));
}

#[test]
fn generated_text_is_shaded_by_experts() {
    let snap = example_snapshot(WorkloadKind::Generate, 16, false);
    let g = snap.generated.as_ref().unwrap();
    let hi = g
        .tokens
        .iter()
        .map(|t| t.mean_experts)
        .fold(0.0f32, f32::max);
    let last = g.tokens.last().unwrap();
    for mode in [ColorMode::TrueColor, ColorMode::NoColor] {
        let mut app = app_with(snap.clone(), mode);
        let buf = draw(&mut app, 80, 24);
        let area = layout::screen(Rect::new(0, 0, 80, 24), &app)
            .unwrap()
            .generated
            .unwrap();
        // Find the last token: the last filled cell of the first text line(s).
        let v = (last.mean_experts / hi) as f64;
        let found = (area.y + 1..area.y + area.height).any(|y| {
            (area.x..area.x + area.width).any(|x| {
                let c = &buf[(x, y)];
                c.symbol() == render::generated::token_cells(&last.bytes)[0].to_string()
                    && match mode {
                        ColorMode::NoColor => buf[(x, y + 1)].symbol() == Theme::shade(v),
                        _ => c.bg == app.theme.heat(v),
                    }
            })
        });
        assert!(found, "{mode:?}: newest token with its shade");
    }
}

// ---------------------------------------------------------------- input

fn eval_app() -> App {
    // Every layer at t = 0.70 in the fixture; E = 16, top-k baseline k = 4.
    let mut app = app_with(
        example_snapshot(WorkloadKind::Eval, 16, false),
        ColorMode::TrueColor,
    );
    app.size = (120, 40);
    app
}

#[test]
fn arrows_change_the_focused_threshold() {
    let mut app = eval_app();
    assert_eq!(app.slider, Target::Global);
    assert_eq!(
        press(&mut app, &[key(KeyCode::Right)]),
        [threshold(Layers::All, 0.71)]
    );
    press(&mut app, &[key(KeyCode::Down)]);
    assert_eq!(app.slider, Target::Layer(0));
    // Requests build on the pending value, not on the stale snapshot.
    let s0 = Layers::Slot(0);
    assert_eq!(
        press(&mut app, &[key(KeyCode::Left), key(KeyCode::Char('h'))]),
        [threshold(s0, 0.70), threshold(s0, 0.69)]
    );
    assert_eq!(
        press(&mut app, &[shift(KeyCode::Left)]),
        [threshold(s0, 0.64)]
    );
    assert_eq!(
        press(&mut app, &[key(KeyCode::Char('L'))]),
        [threshold(s0, 0.69)]
    );
    assert_eq!(
        press(&mut app, &[key(KeyCode::PageUp)]),
        [threshold(s0, 0.74)]
    );
    assert_eq!(
        press(&mut app, &[key(KeyCode::PageDown)]),
        [threshold(s0, 0.69)]
    );
    // Clamped to (0, 1]: no request once at the bound.
    let up = vec![key(KeyCode::PageUp); 10];
    let sent = press(&mut app, &up);
    assert_eq!(sent.last(), Some(&threshold(s0, 1.0)));
    assert_eq!(sent.len(), 7);
    assert!(press(&mut app, &[key(KeyCode::Right)]).is_empty());
    let down = vec![key(KeyCode::PageDown); 30];
    let sent = press(&mut app, &down);
    assert_eq!(sent.last(), Some(&threshold(s0, 0.01)));
    assert!(press(&mut app, &[key(KeyCode::Left)]).is_empty());
    // A snapshot showing the request clears it; the slider then shows the snapshot's value.
    assert!(app.pending(0).is_some());
    let mut snap = app.latest().unwrap().clone();
    snap.policy.layers[0].policy = RoutingPolicy::threshold(0.01);
    snap.sequence += 1;
    app.push_snapshot(snap);
    assert!(app.pending(0).is_none());
}

#[test]
fn g_applies_to_all_and_p_cycles_the_policy() {
    let mut app = eval_app();
    press(&mut app, &[key(KeyCode::Down), key(KeyCode::Down)]);
    assert_eq!(app.slider, Target::Layer(1));
    press(&mut app, &[key(KeyCode::Right)]);
    assert_eq!(
        press(&mut app, &[key(KeyCode::Char('g'))]),
        [threshold(Layers::All, 0.71)]
    );
    let s1 = Layers::Slot(1);
    let set = |policy| Control::SetPolicy { layers: s1, policy };
    assert_eq!(
        press(&mut app, &[key(KeyCode::Char('p'))]),
        [set(RoutingPolicy::TopK {
            k: 4,
            renormalize: false
        })]
    );
    assert_eq!(
        press(
            &mut app,
            &[
                key(KeyCode::Char('+')),
                key(KeyCode::Char('-')),
                key(KeyCode::Char('-'))
            ]
        ),
        [
            set(RoutingPolicy::TopK {
                k: 5,
                renormalize: false
            }),
            set(RoutingPolicy::TopK {
                k: 4,
                renormalize: false
            }),
            set(RoutingPolicy::TopK {
                k: 3,
                renormalize: false
            }),
        ]
    );
    // k stays within 1..=E.
    let minus = vec![key(KeyCode::Char('-')); 5];
    let sent = press(&mut app, &minus);
    assert_eq!(sent.len(), 2);
    assert!(app.message.as_ref().unwrap().text.contains("1..=16"));
    let plus = vec![key(KeyCode::Char('+')); 20];
    let sent = press(&mut app, &plus);
    assert_eq!(
        sent.last(),
        Some(&set(RoutingPolicy::TopK {
            k: 16,
            renormalize: false
        }))
    );
    assert_eq!(sent.len(), 15);
    assert_eq!(
        press(&mut app, &[key(KeyCode::Char('p'))]),
        [set(RoutingPolicy::Dense)]
    );
    // Back to threshold at the layer's last t.
    assert_eq!(
        press(&mut app, &[key(KeyCode::Char('p'))]),
        [set(RoutingPolicy::threshold(0.71))]
    );
    // +/- outside top-k explain instead of sending.
    assert!(press(&mut app, &[key(KeyCode::Char('+'))]).is_empty());
    assert!(app.message.as_ref().unwrap().is_error);
}

#[test]
fn other_keys_and_releases() {
    let mut app = eval_app();
    let release = Event::Key(KeyEvent::new_with_kind(
        KeyCode::Right,
        KeyModifiers::NONE,
        KeyEventKind::Release,
    ));
    assert_eq!(input::map_event(&app, &release), None);
    assert!(press(&mut app, std::slice::from_ref(&release)).is_empty());
    // Capacity: on at the default factor, off again before any snapshot confirms it.
    assert_eq!(
        press(
            &mut app,
            &[key(KeyCode::Char('c')), key(KeyCode::Char('c'))]
        ),
        [
            Control::SetCapacityFactor(Some(8.0)),
            Control::SetCapacityFactor(None)
        ]
    );
    // A factor seen in force is the one switched back on.
    let mut other = eval_app();
    let mut s = other.latest().unwrap().clone();
    s.policy.capacity_factor = Some(2.0);
    other.push_snapshot(s.clone());
    assert_eq!(
        press(&mut other, &[key(KeyCode::Char('c'))]),
        [Control::SetCapacityFactor(None)]
    );
    s.policy.capacity_factor = None;
    s.sequence += 1;
    other.push_snapshot(s.clone());
    assert_eq!(
        press(&mut other, &[key(KeyCode::Char('c'))]),
        [Control::SetCapacityFactor(Some(2.0))]
    );
    // [ and ] scale the factor in force (or requested) by 1.25, 3 significant digits.
    assert_eq!(
        press(
            &mut other,
            &[
                key(KeyCode::Char(']')),
                key(KeyCode::Char(']')),
                key(KeyCode::Char('['))
            ]
        ),
        [
            Control::SetCapacityFactor(Some(2.5)),
            Control::SetCapacityFactor(Some(3.13)),
            Control::SetCapacityFactor(Some(2.5))
        ]
    );
    // With a limit in force the header says what share of pairs it drops.
    s.policy.capacity_factor = Some(2.5);
    s.sequence += 1;
    let w = &mut s.epoch.window;
    let selected: f64 = w
        .layers
        .iter()
        .map(|l| l.mean_experts_per_token * w.tokens as f64)
        .sum();
    w.layers[0].dropped_pairs = (selected * 0.05).round() as u64;
    other.push_snapshot(s);
    let screen = text(&draw(&mut other, 160, 48));
    has(
        &screen,
        "capacity factor 2.5 drops 5.0% of pairs",
        "dropped share",
    );
    assert_eq!(
        press(&mut app, &[key(KeyCode::Char('r'))]),
        [Control::ResetStats]
    );
    // Pause toggles from the requested state until a snapshot confirms it.
    assert_eq!(
        press(
            &mut app,
            &[key(KeyCode::Char('P')), key(KeyCode::Char('P'))]
        ),
        [Control::SetPaused(true), Control::SetPaused(false)]
    );
    // Freeze keeps the picture while snapshots keep coming.
    let shown = app.displayed().unwrap().sequence;
    press(&mut app, &[key(KeyCode::Char(' '))]);
    let mut next = app.latest().unwrap().clone();
    next.sequence += 1;
    app.push_snapshot(next);
    assert_eq!(app.displayed().unwrap().sequence, shown);
    press(&mut app, &[key(KeyCode::Char('f'))]);
    assert_eq!(app.displayed().unwrap().sequence, shown + 1);
    // Help: Esc closes it; outside it Esc does not quit.
    press(&mut app, &[key(KeyCode::Char('?'))]);
    assert!(app.help_open);
    assert!(
        press(&mut app, &[key(KeyCode::Right)]).is_empty(),
        "keys wait while help is open"
    );
    press(&mut app, &[key(KeyCode::Esc)]);
    assert!(!app.help_open && !app.should_quit);
    press(&mut app, &[key(KeyCode::Esc)]);
    assert!(!app.should_quit, "Esc never quits");
    for quit in [
        key(KeyCode::Char('q')),
        Event::Key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
    ] {
        let mut app = eval_app();
        press(&mut app, &[quit]);
        assert!(app.should_quit);
    }
    // Tab: the heatmap takes left/right for its cursor.
    let mut app = eval_app();
    press(&mut app, &[key(KeyCode::Tab), key(KeyCode::Down)]);
    assert_eq!(
        (app.panel, app.layer, app.slider),
        (Panel::Heatmap, 1, Target::Layer(1))
    );
    assert!(press(&mut app, &[key(KeyCode::Right), shift(KeyCode::Right)]).is_empty());
    assert_eq!(app.expert, 9);
    press(&mut app, &[key(KeyCode::Char('L'))]);
    assert_eq!(app.expert, 15, "clamped to E - 1");
}

#[test]
fn export_reports_paths_errors_or_absence() {
    let mut app = eval_app();
    press(&mut app, &[key(KeyCode::Char('e'))]);
    let m = app.message.clone().unwrap();
    assert!(m.is_error && m.text.contains("not available"), "{m:?}");
    let mut app = eval_app().with_exporter(Some(Box::new(|s: &Snapshot| {
        Ok(vec![PathBuf::from(format!("report-{}.json", s.sequence))])
    })));
    press(&mut app, &[key(KeyCode::Char('e'))]);
    assert_eq!(
        app.message.clone().unwrap().text,
        "report written: report-42.json"
    );
    let mut app =
        eval_app().with_exporter(Some(Box::new(|_: &Snapshot| anyhow::bail!("disk full"))));
    press(&mut app, &[key(KeyCode::Char('e'))]);
    let m = app.message.clone().unwrap();
    assert!(m.is_error && m.text.contains("disk full"));
}

#[test]
fn mouse_focuses_sliders_sets_t_and_selects_cells() {
    let mut app = eval_app();
    draw(&mut app, 120, 40);
    let snap = app.displayed().unwrap().clone();
    let l = layout::screen(Rect::new(0, 0, 120, 40), &app).unwrap();
    let rows = sliders::geometry(l.sliders, &app, &snap);
    let row = rows.iter().find(|r| r.target == Target::Layer(2)).unwrap();
    let click = |kind, x, y| {
        Event::Mouse(MouseEvent {
            kind,
            column: x,
            row: y,
            modifiers: KeyModifiers::NONE,
        })
    };
    // A click on the label focuses without a request.
    let down = MouseEventKind::Down(MouseButton::Left);
    assert!(press(&mut app, &[click(down, row.line.x + 3, row.line.y)]).is_empty());
    assert_eq!(app.slider, Target::Layer(2));
    // A click on the bar sets t from the position; a drag moves it further.
    let x = row.bar.x + row.bar.width / 2;
    let t = sliders::t_at(row.bar, x);
    let xe = row.bar.x + row.bar.width - 1;
    let drag = MouseEventKind::Drag(MouseButton::Left);
    assert_eq!(
        press(
            &mut app,
            &[click(down, x, row.line.y), click(drag, xe, row.line.y)]
        ),
        [
            threshold(Layers::Slot(2), t),
            threshold(Layers::Slot(2), 1.0)
        ]
    );
    // A release is not a click.
    let up = MouseEventKind::Up(MouseButton::Left);
    assert!(press(&mut app, &[click(up, x, row.line.y)]).is_empty());
    // Heatmap: a click selects the cell; the wheel moves between layers.
    let g = HeatGeometry::new(l.heatmap, &app, &snap);
    press(&mut app, &[click(down, g.x_of(5), g.cells.y)]);
    assert_eq!((app.panel, app.layer, app.expert), (Panel::Heatmap, 0, 5));
    press(
        &mut app,
        &[click(MouseEventKind::ScrollDown, g.x_of(5), g.cells.y)],
    );
    assert_eq!(app.layer, 1);
    assert_eq!(
        input::map_event(&app, &click(MouseEventKind::ScrollUp, g.x_of(1), g.cells.y)),
        Some(Action::Up)
    );
}

#[test]
fn failed_delivery_is_shown() {
    let mut app = eval_app();
    input::handle_event(&mut app, &key(KeyCode::Char('r')), &mut |_| {
        anyhow::bail!("session gone")
    });
    let m = app.message.clone().unwrap();
    assert!(m.is_error && m.text.contains("session gone"));
}

// ---------------------------------------------------------------- event loop

#[test]
fn event_loop_coalesces_bursts_and_quits() {
    let (tx, rx) = mpsc::channel();
    let snap = example_snapshot(WorkloadKind::Eval, 16, false);
    for i in 0..200 {
        let mut s = snap.clone();
        s.sequence = i;
        tx.send(UiEvent::Snapshot(Box::new(s))).unwrap();
    }
    tx.send(UiEvent::Input(key(KeyCode::Right))).unwrap();
    tx.send(UiEvent::Input(key(KeyCode::Char('q')))).unwrap();
    let mut term = Terminal::new(TestBackend::new(120, 40)).unwrap();
    let mut app = App::new(Theme::new(ColorMode::NoColor));
    let mut sent = Vec::new();
    event_loop(
        &mut term,
        &rx,
        &mut app,
        &mut |c| {
            sent.push(c);
            Ok(())
        },
        10.0,
    )
    .unwrap();
    assert!(app.should_quit);
    assert_eq!(app.latest().unwrap().sequence, 199);
    assert_eq!(sent, [threshold(Layers::All, 0.71)]);
    // One frame before the burst; the whole burst was taken before the next draw.
    let frames = term.draw(|_| {}).unwrap().count;
    assert!(frames <= 2, "{frames} frames drawn for one burst");
}

#[test]
fn event_loop_ends_when_the_channel_closes_and_reports_session_end() {
    let (tx, rx) = mpsc::channel();
    tx.send(UiEvent::Snapshot(Box::new(example_snapshot(
        WorkloadKind::Generate,
        16,
        true,
    ))))
    .unwrap();
    tx.send(UiEvent::SessionEnded).unwrap();
    drop(tx);
    let mut term = Terminal::new(TestBackend::new(80, 24)).unwrap();
    let mut app = App::new(Theme::new(ColorMode::TrueColor));
    event_loop(&mut term, &rx, &mut app, &mut |_| Ok(()), 1000.0).unwrap();
    assert!(app.session_ended);
    let screen = text(&draw(&mut app, 80, 24));
    has(&screen, "session has ended", "status message");
    // A broken terminal input ends the loop with an error.
    let (tx, rx) = mpsc::channel();
    tx.send(UiEvent::InputError("gone".into())).unwrap();
    let r = event_loop(&mut term, &rx, &mut app, &mut |_| Ok(()), 10.0);
    assert!(r.unwrap_err().to_string().contains("gone"));
}

#[test]
fn n_toggles_renormalisation_and_threshold_steps_keep_it() {
    let mut app = eval_app();
    press(&mut app, &[key(KeyCode::Down), key(KeyCode::Down)]);
    assert_eq!(app.slider, Target::Layer(1));
    let s1 = Layers::Slot(1);
    let set = |policy| Control::SetPolicy { layers: s1, policy };
    let t = app.effective_policy(1).unwrap();
    let RoutingPolicy::Threshold {
        t,
        renormalize: false,
    } = t
    else {
        panic!("{t:?}");
    };
    let renormed = RoutingPolicy::threshold(t).with_renormalize(true);
    assert_eq!(press(&mut app, &[key(KeyCode::Char('n'))]), [set(renormed)]);
    // A threshold step keeps the layer renormalising.
    assert_eq!(
        press(&mut app, &[key(KeyCode::Right)]),
        [set(
            RoutingPolicy::threshold(t + 0.01).with_renormalize(true)
        )]
    );
    // Dense has nothing to renormalise: no control, an error line instead.
    press(
        &mut app,
        &[key(KeyCode::Char('p')), key(KeyCode::Char('p'))],
    );
    assert_eq!(app.effective_policy(1), Some(RoutingPolicy::Dense));
    assert!(press(&mut app, &[key(KeyCode::Char('n'))]).is_empty());
}

// ---------------------------------------------------------------- issue 17: what a user sees

#[test]
fn expert_table_opens_sorts_and_closes() {
    let mut app = eval_app();
    let snap = app.displayed().unwrap().clone();
    let l = &snap.epoch.window.layers[0];
    press(&mut app, &[key(KeyCode::Char('x'))]);
    assert!(app.table_open);
    let screen = text(&draw(&mut app, 120, 40));
    has(&screen, &format!("L{} experts", l.layer), "table title");
    has(&screen, "sort: share of tokens", "default sort");
    // Sorted by share: the first row is the expert with the largest share.
    let rows = render::table::rows(l, super::app::TableSort::Share);
    assert!(rows.windows(2).all(|w| w[0].share >= w[1].share));
    let top = rows[0];
    let first_row = screen
        .lines()
        .find(|line| line.contains(&format!("{:.1}% ", 100.0 * top.share)))
        .unwrap_or_else(|| panic!("top row missing:\n{screen}"));
    assert!(
        first_row.contains(&format!(" {}  ", top.expert)),
        "{first_row}"
    );
    // Load against the mean: share / mean share, as the table prints it.
    let mean = l.expert_token_share.iter().sum::<f64>() / l.expert_token_share.len() as f64;
    assert!((top.load_vs_mean.unwrap() - top.share / mean).abs() < 1e-12);
    has(
        &screen,
        &format!("{:.2}×", top.share / mean),
        "load vs mean",
    );
    // s cycles the sort column.
    press(&mut app, &[key(KeyCode::Char('s'))]);
    assert_eq!(app.table_sort, super::app::TableSort::GateMass);
    let screen = text(&draw(&mut app, 120, 40));
    has(&screen, "sort: gate mass", "sort column changed");
    let rows = render::table::rows(l, super::app::TableSort::GateMass);
    assert!(rows.windows(2).all(|w| w[0].gate_mass >= w[1].gate_mass));
    let rows = render::table::rows(l, super::app::TableSort::Expert);
    assert!(rows.iter().enumerate().all(|(i, r)| r.expert == i));
    // At 80x24 too, and Esc closes it without quitting.
    text(&draw(&mut app, 80, 24));
    press(&mut app, &[key(KeyCode::Esc)]);
    assert!(!app.table_open && !app.should_quit);
    let screen = text(&draw(&mut app, 120, 40));
    assert!(!screen.contains("sort: gate mass"), "{screen}");
    // An empty window: no figures that look measured.
    let mut empty = example_snapshot(WorkloadKind::Eval, 16, false);
    empty.epoch.window.tokens = 0;
    let mut app = app_with(empty, ColorMode::NoColor);
    press(&mut app, &[key(KeyCode::Char('x'))]);
    let screen = text(&draw(&mut app, 120, 40));
    has(&screen, "no tokens yet in this epoch", "empty table");
    assert!(!screen.contains("load/mean"), "{screen}");
}

#[test]
fn refresh_rate_keys_step_along_the_ladder_and_show_in_the_status_bar() {
    let mut app = eval_app();
    assert_eq!(app.fps, super::DEFAULT_FPS);
    press(&mut app, &[key(KeyCode::Char('>'))]);
    assert_eq!(app.fps, 15.0);
    press(
        &mut app,
        &[key(KeyCode::Char('<')), key(KeyCode::Char('<'))],
    );
    assert_eq!(app.fps, 5.0);
    for _ in 0..10 {
        press(&mut app, &[key(KeyCode::Char('<'))]);
    }
    assert_eq!(app.fps, 1.0);
    let screen = text(&draw(&mut app, 80, 24));
    has(&screen, "≤1 fps", "status bar");
    for _ in 0..10 {
        press(&mut app, &[key(KeyCode::Char('>'))]);
    }
    assert_eq!(app.fps, 60.0);
}

#[test]
fn event_loop_sends_one_request_once_the_keys_settle() {
    let (tx, rx) = mpsc::channel();
    tx.send(UiEvent::Snapshot(Box::new(example_snapshot(
        WorkloadKind::Eval,
        16,
        false,
    ))))
    .unwrap();
    let sender = std::thread::spawn(move || {
        for _ in 0..10 {
            tx.send(UiEvent::Input(key(KeyCode::Left))).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // Longer than the debounce: the request goes out while the UI waits for keys.
        std::thread::sleep(super::debounce::DEBOUNCE * 3);
        let quit_at = std::time::Instant::now();
        tx.send(UiEvent::Input(key(KeyCode::Char('q')))).unwrap();
        quit_at
    });
    let mut term = Terminal::new(TestBackend::new(120, 40)).unwrap();
    let mut app = App::new(Theme::new(ColorMode::NoColor));
    let mut sent = Vec::new();
    event_loop(
        &mut term,
        &rx,
        &mut app,
        &mut |c| {
            sent.push((c, std::time::Instant::now()));
            Ok(())
        },
        10.0,
    )
    .unwrap();
    let quit_at = sender.join().unwrap();
    // Ten presses from t = 0.70: one request for 0.60, sent when the keys settled (not on q).
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].0, threshold(Layers::All, 0.60));
    assert!(sent[0].1 < quit_at);
}

fn history_points() -> Vec<crate::profiling::snapshot::HistoryPoint> {
    (0..40u64)
        .map(|i| crate::profiling::snapshot::HistoryPoint {
            t_s: i as f64 + 1.0,
            epoch: if i < 25 { 0 } else { 1 },
            tokens: 1000,
            tokens_per_second: (i != 10).then_some(if i < 25 { 12000.0 } else { 16000.0 }),
            experts_per_token: Some(if i < 25 { 5.0 } else { 3.0 }),
            moe_saved_pct: Some(if i < 25 { 66.0 } else { 80.0 }),
            delta_bits_per_byte: (i > 3).then_some(0.01 * i as f64),
            delta_stderr: (i > 5).then_some(0.002),
            compared_batches: i,
        })
        .collect()
}

#[test]
fn history_and_timing_panels_show_measured_figures() {
    let mut snap = example_snapshot(WorkloadKind::Eval, 16, false);
    snap.history = history_points();
    for (w, h) in [(120, 40), (160, 48), (200, 60)] {
        let mut app = app_with(snap.clone(), ColorMode::NoColor);
        let buf = draw(&mut app, w, h);
        let screen = text(&buf);
        let ctx = format!("{w}x{h}");
        has(&screen, "History", &ctx);
        has(&screen, "16000 (1000 tok in 1 s)", &ctx);
        has(&screen, "3.00", &ctx);
        has(&screen, "80.0%", &ctx);
        has(&screen, "+0.390±0.002 (39 b)", &ctx);
        // The change of settings is marked on the time axis.
        let l = layout::screen(Rect::new(0, 0, w, h), &app).unwrap();
        let axis_y = l.history.y + l.history.height - 1;
        let axis: String = (l.history.x..l.history.x + l.history.width)
            .map(|x| buf[(x, axis_y)].symbol().to_string())
            .collect();
        assert_eq!(axis.matches('▲').count(), 1, "{ctx}: {axis}");
        // Where the time goes.
        let t = render::timing::breakdown(&snap.epoch.histograms).unwrap();
        // The title is shortened whole to fit the column, never cut mid-word.
        has(&screen, "Time per", &ctx);
        assert!(
            screen.contains("passes, epoch") || screen.contains("passes ─"),
            "{ctx}: timing title cut"
        );
        has(&screen, &format!("attention {}", micros(t[0])), &ctx);
        has(&screen, &format!("pass {}", micros(t[4])), &ctx);
        assert!(t.iter().all(|&x| x >= 0.0), "{t:?}");
    }
    // Before the first point: a plain note, no bars.
    let mut app = app_with(
        example_snapshot(WorkloadKind::Eval, 16, false),
        ColorMode::NoColor,
    );
    let screen = text(&draw(&mut app, 120, 40));
    has(&screen, "collecting: the first point", "empty history");
}

#[test]
fn histograms_mark_percentiles_apart_and_label_their_axes() {
    let snap = example_snapshot(WorkloadKind::Eval, 16, false);
    let mut app = app_with(snap.clone(), ColorMode::NoColor);
    let screen = text(&draw(&mut app, 160, 48));
    let hl = &snap.epoch.histograms.token_latency_us;
    for (glyph, v) in [
        ("◆p50 ", hl.p50),
        ("▲p90 ", hl.p90),
        ("●p99 ", hl.p99),
        ("▼max ", hl.max),
    ] {
        has(
            &screen,
            &format!("{glyph}{}", micros(v)),
            "percentile legend",
        );
    }
    // The lowest bucket edge starts the x axis.
    has(&screen, &micros(hl.edges[0]), "x axis");
    if hl.scale == crate::profiling::snapshot::BucketScale::Log {
        has(&screen, "log x (max/min ≥ 20)", "log scale explained");
    }
    // Experts per token: the bars are numbered from 1.
    let l = layout::screen(Rect::new(0, 0, 160, 48), &app).unwrap();
    let bottom = l.histograms.y + l.histograms.height - 1;
    let line: String = screen.lines().nth(bottom as usize).unwrap().to_string();
    assert!(line.contains(" 1 ") || line.contains("1 2"), "{line}");
}

// ---------------------------------------------------------------- A/B view

fn compare_app(snap: Snapshot, mode: ColorMode) -> App {
    let mut snap = snap;
    snap.compare = Some(crate::profiling::compare::example(
        &snap.model.moe_layers,
        snap.model.n_experts,
    ));
    app_with(snap, mode)
}

#[test]
fn compare_view_parts_never_overlap_and_stay_in_the_body() {
    let sizes = [
        (80, 24),
        (100, 30),
        (119, 24),
        (120, 40),
        (160, 48),
        (200, 60),
    ];
    for snap in [
        example_snapshot(WorkloadKind::Eval, 16, false),
        large_snapshot(),
    ] {
        let app = compare_app(snap.clone(), ColorMode::NoColor);
        let n = snap.policy.layers.len() as u16;
        for (w, h) in sizes {
            let area = Rect::new(0, 0, w, h);
            let l = layout::screen(area, &app).unwrap();
            let body = Rect::new(0, l.header.bottom(), w, l.status.y - l.header.bottom());
            let c = render::compare::layout(body, n);
            let parts = c.parts();
            for (i, (a, ra)) in parts.iter().enumerate() {
                assert!(
                    body.union(*ra) == body,
                    "{a} outside the body at {w}x{h}: {ra:?}"
                );
                for (b, rb) in &parts[i + 1..] {
                    assert!(
                        ra.is_empty() || rb.is_empty() || !ra.intersects(*rb),
                        "{a} {ra:?} overlaps {b} {rb:?} at {w}x{h}"
                    );
                }
            }
            // The figures and at least one heatmap row always get room.
            assert!(
                c.figures.height >= 3 && c.heatmap.height >= 3,
                "{w}x{h}: {c:?}"
            );
            if n <= 8 {
                assert_eq!(c.figures.height, 6, "every figure at {w}x{h}");
                assert!(c.heatmap.height >= 2 + n, "every layer at {w}x{h}");
            }
        }
    }
}

#[test]
fn compare_view_shows_every_figure_at_80x24_and_120x40() {
    for mode in [ColorMode::NoColor, ColorMode::TrueColor] {
        let mut app = compare_app(example_snapshot(WorkloadKind::Eval, 16, false), mode);
        let c = app.displayed().unwrap().compare.clone().unwrap();
        for (w, h) in [(80, 24), (120, 40)] {
            let screen = text(&draw(&mut app, w, h));
            let ctx = format!("{w}x{h} {mode:?}");
            for needle in [
                "A/B  A t=0.9  vs  B top-2",
                "experts/tok",
                format!("Δ {:+.2}", c.delta_experts_per_token()).as_str(),
                "MoE FLOPs",
                "pass ms",
                "bits/byte",
                "KL(B‖A)",
                format!("Jaccard {:.3}", c.jaccard_mean).as_str(),
                "Δ share of tokens B − A",
                "largest shifts",
                "exp/tok A",
                "Jaccard 0",
            ] {
                has(&screen, needle, &ctx);
            }
            // Every layer's row is in the heatmap and in the table.
            for l in &c.layers {
                has(&screen, &format!("L{:<3}", l.layer), &ctx);
            }
        }
    }
    // Without colour the sign glyphs carry the direction.
    assert_eq!(render::compare::cell_text(0.6, 3), "+▓ ");
    assert_eq!(render::compare::cell_text(0.2, 3), "+░ ");
    assert_eq!(render::compare::cell_text(-1.0, 2), "-█");
    assert_eq!(render::compare::cell_text(0.0, 3), "·  ");
}

#[test]
fn a_starts_and_stops_comparing_and_b_keys_edit_policy_b() {
    let mut app = app_with(
        example_snapshot(WorkloadKind::Eval, 16, false),
        ColorMode::NoColor,
    );
    let k = app.displayed().unwrap().model.top_k_baseline;
    let top_k = |k| RoutingPolicy::TopK {
        k,
        renormalize: false,
    };
    assert_eq!(
        press(&mut app, &[key(KeyCode::Char('a'))]),
        vec![Control::SetCompare(Some(top_k(k)))]
    );
    assert!(app.compare.is_open(app.displayed()));
    // Not comparing yet in the snapshot: b edits B without a request.
    assert!(press(&mut app, &[key(KeyCode::Char('}'))]).is_empty());
    // Once the snapshot shows the comparison, B's edits go to the session.
    let mut snap = app.latest().unwrap().clone();
    snap.compare = Some(crate::profiling::compare::example(
        &snap.model.moe_layers,
        snap.model.n_experts,
    ));
    snap.sequence += 1;
    app.push_snapshot(snap.clone());
    assert_eq!(
        press(&mut app, &[key(KeyCode::Char('{'))]),
        vec![Control::SetCompare(Some(top_k(k)))]
    );
    assert_eq!(
        press(&mut app, &[key(KeyCode::Char('b'))]),
        vec![Control::SetCompare(Some(RoutingPolicy::threshold(0.9)))]
    );
    // Esc hides the view, a shows it again, a once more stops the comparison.
    assert!(press(&mut app, &[key(KeyCode::Esc)]).is_empty());
    assert!(!app.compare.is_open(app.displayed()));
    assert!(press(&mut app, &[key(KeyCode::Char('a'))]).is_empty());
    assert!(app.compare.is_open(app.displayed()));
    assert_eq!(
        press(&mut app, &[key(KeyCode::Char('a'))]),
        vec![Control::SetCompare(None)]
    );
    // Generate has no same tokens to compare on: refused with a message, nothing sent.
    let mut app = app_with(
        example_snapshot(WorkloadKind::Generate, 16, false),
        ColorMode::NoColor,
    );
    assert!(press(&mut app, &[key(KeyCode::Char('a'))]).is_empty());
    assert!(app.message.as_ref().unwrap().text.contains("eval workload"));
}

#[test]
fn device_counters_between_snapshots_update_the_panel_unless_frozen_or_older() {
    let snap = example_snapshot(WorkloadKind::Eval, 16, false);
    let mut app = App::new(Theme::new(ColorMode::NoColor));
    // Before the first snapshot there is nothing to update.
    assert!(!app.update_device(snap.device.clone()));
    app.push_snapshot(snap.clone());
    let screen = |app: &mut App| text(&draw(app, 120, 40));
    let before = screen(&mut app);
    has(&before, "RSS 329 MiB", "the snapshot's own counters");
    // A newer sample (a later history point) replaces the snapshot's counters.
    let mut newer = snap.device.clone();
    let last = newer.history.last().cloned().unwrap();
    newer
        .history
        .push(crate::profiling::snapshot::DeviceHistoryPoint {
            t_s: last.t_s + 1.0,
            ..last.clone()
        });
    newer.process.rss_bytes = Some(13 << 30);
    newer.process.rss_file_bytes = Some(12 << 30);
    assert!(app.update_device(newer.clone()));
    has(
        &screen(&mut app),
        "RSS 13.00 GiB (12.00 GiB mapped)",
        "the newer sample",
    );
    // The same sample again, or an older one, changes nothing.
    assert!(!app.update_device(newer.clone()));
    assert!(!app.update_device(snap.device.clone()));
    // While frozen the screen keeps its counters (the latest snapshot still takes the sample).
    app.toggle_freeze();
    let mut later = newer.clone();
    later
        .history
        .push(crate::profiling::snapshot::DeviceHistoryPoint {
            t_s: last.t_s + 2.0,
            ..last
        });
    later.process.rss_bytes = Some(14 << 30);
    assert!(!app.update_device(later));
    has(&screen(&mut app), "RSS 13.00 GiB", "frozen");
}
