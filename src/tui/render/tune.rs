//! The quick tune's dialog (`T`): its progress while the search runs, then the verified result
//! beside the best single threshold, with Enter to apply it.

use ratatui::Frame;
use ratatui::layout::{Constraint, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Paragraph, Wrap};

use crate::profiling::snapshot::{QuickTune, TunePoint, TuneStatus};
use crate::tui::app::App;
use crate::units::trim_float;

/// The dialog's lines for `status`, at most `width` columns of text.
pub fn lines(status: &TuneStatus, width: usize) -> (String, Vec<String>) {
    match status {
        TuneStatus::Running {
            budget,
            line,
            passes,
            elapsed_s,
        } => (
            " Quick tune: running ".into(),
            vec![
                format!("budget: {budget}"),
                fit(line, width),
                format!(
                    "{passes} forward passes, {elapsed_s:.1} s; live passes wait for the search"
                ),
                String::new(),
                "Esc: cancel".into(),
            ],
        ),
        TuneStatus::Failed(why) => (
            " Quick tune: failed ".into(),
            vec![why.clone(), String::new(), "Esc: close".into()],
        ),
        TuneStatus::Done(q) => (" Quick tune: done ".into(), done_lines(q, width)),
    }
}

fn fit(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_string();
    }
    let mut out: String = s.chars().take(width.saturating_sub(1)).collect();
    out.push('…');
    out
}

fn point_line(name: &str, p: &TunePoint, label_width: usize) -> String {
    let kl = p
        .mean_kl_bits
        .map_or(String::new(), |k| format!(", KL {k:.4}"));
    format!(
        "{name:<6} {:<label_width$} {:>5.1}%  {:+.4} ± {:.4} ({:+.2}%){kl}  {:>5.2}  {}",
        fit(&p.label, label_width),
        100.0 * p.moe_flops_fraction,
        p.delta_bits_per_byte,
        p.delta_bits_per_byte_stderr,
        100.0 * p.delta_relative,
        p.mean_experts_per_token,
        if p.within_budget {
            "within"
        } else {
            "OVER budget"
        },
    )
}

fn done_lines(q: &QuickTune, width: usize) -> Vec<String> {
    // The label column takes what the fixed columns leave (≈ 56 of them).
    let label_width = width.saturating_sub(57).clamp(8, 40);
    let mut out = vec![
        fit(&format!("budget: {} ({})", q.budget, q.reference), width),
        fit(
            &format!(
                "verified on {} unseen tokens (search: {} tokens; {} passes, {} s)",
                q.verify_tokens,
                q.search_tokens,
                q.passes,
                trim_float(q.elapsed_s, 1)
            ),
            width,
        ),
        String::new(),
        format!(
            "{:<6} {:<label_width$} {:>6}  {:<27} {:>5}",
            "", "thresholds", "MoE", "Δ bits/byte ± s.e.", "exp/t"
        ),
        point_line("tuned", &q.tuned, label_width),
    ];
    match &q.best_uniform {
        Some(u) => {
            out.push(point_line("single", u, label_width));
            if u.moe_flops_fraction > 0.0 {
                let saved = 1.0 - q.tuned.moe_flops_fraction / u.moe_flops_fraction;
                out.push(format!(
                    "per-layer thresholds spend {:.1}% fewer MoE FLOPs than the best single t",
                    100.0 * saved
                ));
            }
        }
        None => out.push("no single threshold of the grid kept the budget".into()),
    }
    out.push(String::new());
    out.push("Enter: apply the tuned thresholds (new epoch) · Esc: dismiss".into());
    out
}

/// Draws the dialog over the lower middle of `area` when a quick tune is running or finished.
pub fn render(frame: &mut Frame, area: Rect, app: &App) {
    let Some(status) = app.tune_status() else {
        return;
    };
    let w = 96.min(area.width);
    let (title, body) = lines(status, w.saturating_sub(2) as usize);
    let h = (body.len() as u16 + 2).min(area.height);
    let popup = area.centered(Constraint::Length(w), Constraint::Length(h));
    frame.render_widget(Clear, popup);
    let theme = &app.theme;
    let text: Vec<Line> = body
        .into_iter()
        .map(|l| {
            if l.contains("OVER budget") {
                Line::from(Span::styled(l, theme.error()))
            } else {
                Line::raw(l)
            }
        })
        .collect();
    frame.render_widget(
        Paragraph::new(text)
            .wrap(Wrap { trim: false })
            .block(Block::bordered().title(Line::styled(title, theme.title_focused()))),
        popup,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::RoutingPolicy;

    fn point(label: &str, flops: f64, within: bool) -> TunePoint {
        TunePoint {
            label: label.into(),
            moe_flops_fraction: flops,
            delta_bits_per_byte: 0.0109,
            delta_bits_per_byte_stderr: 0.0044,
            delta_relative: 0.0067,
            mean_kl_bits: None,
            mean_experts_per_token: 2.22,
            within_budget: within,
        }
    }

    fn done(best: Option<TunePoint>) -> TuneStatus {
        TuneStatus::Done(Box::new(QuickTune {
            budget: "bits/byte at most 1% above the reference".into(),
            reference: "dense".into(),
            policies: vec![RoutingPolicy::threshold(0.75); 4],
            tuned: point("0:0.75,1:0.65,2:0.75,3:0.75", 0.145, true),
            best_uniform: best,
            search_tokens: 4096,
            verify_tokens: 4096,
            passes: 100,
            elapsed_s: 20.1,
        }))
    }

    #[test]
    fn a_finished_tune_states_its_saving_over_the_best_single_threshold() {
        let (title, l) = lines(&done(Some(point("t=0.75", 0.161, true))), 94);
        assert!(title.contains("done"));
        let all = l.join("\n");
        assert!(all.contains("0:0.75,1:0.65,2:0.75,3:0.75"), "{all}");
        assert!(all.contains(" 14.5%") && all.contains(" 16.1%"), "{all}");
        // 1 - 14.5 / 16.1 = 9.9%.
        assert!(all.contains("9.9% fewer MoE FLOPs"), "{all}");
        assert!(all.contains("Enter: apply"), "{all}");
        assert!(l.iter().all(|x| x.chars().count() <= 94), "{all}");
    }

    #[test]
    fn over_budget_and_no_single_threshold_are_said() {
        let mut s = done(None);
        if let TuneStatus::Done(q) = &mut s {
            q.tuned.within_budget = false;
        }
        let all = lines(&s, 78).1.join("\n");
        assert!(all.contains("OVER budget"), "{all}");
        assert!(
            all.contains("no single threshold of the grid kept the budget"),
            "{all}"
        );
    }
}
