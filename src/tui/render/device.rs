//! The device panel: NVML counters of each GPU with history sparklines, or this process's CPU
//! use and memory, saying plainly when no GPU is present.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, Sparkline};

use crate::profiling::snapshot::{DeviceBackend, DeviceSnapshot};
use crate::tui::app::App;
use crate::tui::render::panel_block;
use crate::tui::theme::Theme;
use crate::units::bytes_rounded as bytes;

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map_or("n/a".to_string(), f)
}

/// A labelled sparkline on one line: the newest samples that fit.
fn spark(
    frame: &mut Frame,
    area: Rect,
    theme: &Theme,
    label: &str,
    data: &[u64],
    max: Option<u64>,
) {
    if area.height == 0 || area.width <= 12 {
        return;
    }
    frame.render_widget(
        Paragraph::new(Span::styled(format!("{label:<11}"), theme.dim())),
        Rect { width: 11, ..area },
    );
    let w = (area.width - 12) as usize;
    let tail = &data[data.len().saturating_sub(w)..];
    let mut s = Sparkline::default().data(tail).style(theme.bar());
    if let Some(m) = max {
        s = s.max(m);
    }
    frame.render_widget(
        s,
        Rect {
            x: area.x + 12,
            width: area.width - 12,
            height: 1,
            ..area
        },
    );
}

/// This process's CPU and memory in `width` columns. Experts read in place count in the resident
/// set as file pages the kernel may drop and reread: their share is said ("mapped"), so that a
/// 13 GiB figure is not read as 13 GiB taken; to make room for it on a narrow panel the CPU count
/// goes first.
fn process_line<'a>(d: &DeviceSnapshot, theme: &Theme, width: usize) -> Line<'a> {
    let cpu = opt(d.process.cpu_pct, |c| format!("{c:.0}%"));
    let rss = opt(d.process.rss_bytes, bytes);
    let mapped = match d.process.rss_file_bytes {
        Some(f) if f >= 64 << 20 => format!(" ({} mapped)", bytes(f)),
        _ => String::new(),
    };
    let cpus = format!(" ({} CPUs)", d.process.cpus);
    let len = |cpus: &str, mapped: &str| {
        " process CPU ".len()
            + cpu.chars().count()
            + " of one core".len()
            + cpus.len()
            + "  RSS ".len()
            + rss.chars().count()
            + mapped.len()
    };
    let (cpus, mapped) = if len(&cpus, &mapped) <= width {
        (cpus, mapped)
    } else if len("", &mapped) <= width {
        (String::new(), mapped)
    } else {
        (cpus, String::new())
    };
    Line::from(vec![
        Span::styled(" process CPU ", theme.dim()),
        Span::styled(cpu, theme.value()),
        Span::styled(format!(" of one core{cpus}  RSS "), theme.dim()),
        Span::styled(rss, theme.value()),
        Span::styled(mapped, theme.dim()),
    ])
}

/// Draws the device panel.
pub fn render(frame: &mut Frame, area: Rect, app: &App) {
    let Some(snap) = app.displayed() else {
        return;
    };
    let theme = &app.theme;
    let d = &snap.device;
    let title = match d.backend {
        DeviceBackend::Nvml => format!(
            " Device: NVML, driver {} ",
            d.driver_version.as_deref().unwrap_or("?")
        ),
        DeviceBackend::ProcessOnly => " Device: no GPU ".to_string(),
    };
    frame.render_widget(panel_block(app, Line::raw(title), false), area);
    let inner = Rect {
        y: area.y + 1,
        height: area.height.saturating_sub(1),
        ..area
    };
    let mut y = inner.y;
    let end = inner.y + inner.height;
    let line_at = |y: u16| Rect::new(inner.x, y, inner.width, 1);
    if d.gpus.is_empty() {
        let note = d
            .note
            .clone()
            .unwrap_or_else(|| "no GPU found: showing this process's CPU and memory".into());
        let mut lines = vec![process_line(d, theme, inner.width as usize)];
        // The note only when it fits whole.
        let used: usize = lines[0]
            .spans
            .iter()
            .map(|s| s.content.chars().count())
            .sum();
        let note = format!("  · {note}");
        if used + note.chars().count() <= inner.width as usize {
            lines[0].spans.push(Span::styled(note, theme.dim()));
        }
        if y < end {
            frame.render_widget(Paragraph::new(lines), line_at(y));
            y += 1;
        }
        let cpu: Vec<u64> = d
            .history
            .iter()
            .map(|p| p.process_cpu_pct.map_or(0, |c| c.round() as u64))
            .collect();
        let rss: Vec<u64> = d
            .history
            .iter()
            .map(|p| p.process_rss_bytes.unwrap_or(0) >> 20)
            .collect();
        if y < end {
            spark(frame, line_at(y), theme, " CPU %", &cpu, None);
            y += 1;
        }
        if y < end {
            spark(frame, line_at(y), theme, " RSS", &rss, None);
        }
        return;
    }
    for (gi, g) in d.gpus.iter().enumerate() {
        if y >= end {
            break;
        }
        let line = Line::from(vec![
            Span::styled(format!(" GPU{} {} ", g.index, g.name), theme.value()),
            Span::styled("util ", theme.dim()),
            Span::styled(opt(g.utilization_pct, |u| format!("{u}%")), theme.value()),
            Span::styled(" mem ", theme.dim()),
            Span::styled(
                format!(
                    "{}/{}",
                    opt(g.memory_used_bytes, bytes),
                    opt(g.memory_total_bytes, bytes)
                ),
                theme.value(),
            ),
            Span::styled(" ", theme.dim()),
            Span::styled(opt(g.power_watts, |w| format!("{w:.0} W")), theme.value()),
            Span::styled(" ", theme.dim()),
            Span::styled(opt(g.temperature_c, |t| format!("{t}°C")), theme.value()),
            Span::styled(" ", theme.dim()),
            Span::styled(opt(g.sm_clock_mhz, |c| format!("{c} MHz")), theme.value()),
        ]);
        frame.render_widget(Paragraph::new(line), line_at(y));
        y += 1;
        let util: Vec<u64> = d
            .history
            .iter()
            .map(|p| {
                p.gpu_utilization_pct
                    .get(gi)
                    .copied()
                    .flatten()
                    .unwrap_or(0) as u64
            })
            .collect();
        if y < end {
            spark(frame, line_at(y), theme, " util %", &util, Some(100));
            y += 1;
        }
        let mem: Vec<u64> = d
            .history
            .iter()
            .map(|p| {
                p.gpu_memory_used_bytes
                    .get(gi)
                    .copied()
                    .flatten()
                    .unwrap_or(0)
                    >> 20
            })
            .collect();
        if y < end && inner.height as usize > 2 * d.gpus.len() + 1 {
            spark(
                frame,
                line_at(y),
                theme,
                " mem MiB",
                &mem,
                g.memory_total_bytes.map(|b| b >> 20),
            );
            y += 1;
        }
    }
    if y < end {
        frame.render_widget(
            Paragraph::new(process_line(d, theme, inner.width as usize)),
            line_at(y),
        );
    }
}
