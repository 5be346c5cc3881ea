//! The header: model, device, workload, policy, throughput, compute saved, quality, epoch, and
//! the FROZEN / PAUSED marks.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

use crate::profiling::snapshot::{Snapshot, WorkloadKind};
use crate::routing::RoutingPolicy;
use crate::tui::app::App;
use crate::tui::render::sliders::{common_policy, policy_text};
use crate::units::si;

/// The policy in words: the common one, or a note that layers differ.
pub fn policy_summary(snap: &Snapshot) -> String {
    match common_policy(snap) {
        Some(p) => format!("{} (all layers)", policy_text(&p)),
        None => "per layer (see sliders)".to_string(),
    }
}

/// Draws the header.
pub fn render(frame: &mut Frame, area: Rect, app: &App) {
    let theme = &app.theme;
    let Some(s) = app.displayed() else {
        frame.render_widget(
            Paragraph::new(vec![
                Line::styled(" xmoe-top", theme.title()),
                Line::styled(" waiting for the model's first snapshot…", theme.dim()),
            ]),
            area,
        );
        return;
    };
    let m = &s.model;
    // Below 120 columns the words get shorter so that every figure still fits in 80.
    let narrow = area.width < 120;
    let mut l1 = vec![
        Span::styled(" xmoe-top ", theme.title()),
        Span::styled(m.name.clone(), theme.value()),
        Span::styled(
            if narrow {
                format!(
                    " · {} params · {} MoE × {} experts · ",
                    si(m.parameters as f64),
                    m.moe_layers.len(),
                    m.n_experts
                )
            } else {
                format!(
                    " · {} params · {} MoE layers × {} experts (hidden {}) · ",
                    si(m.parameters as f64),
                    m.moe_layers.len(),
                    m.n_experts,
                    m.expert_hidden
                )
            },
            theme.dim(),
        ),
        Span::styled(m.device.clone(), theme.value()),
    ];
    let mut marks = Vec::new();
    if app.is_frozen() {
        marks.push(Span::styled(" FROZEN ", theme.mark()));
    }
    if s.paused {
        marks.push(Span::styled(" PAUSED ", theme.mark()));
    }
    if s.ended.is_some() {
        marks.push(Span::styled(" ENDED ", theme.mark()));
    }
    let e = &s.epoch;
    let capacity = match s.policy.capacity_factor {
        Some(c) => match dropped_share(&e.window) {
            Some(d) => format!("capacity factor {c} drops {:.1}% of pairs", 100.0 * d),
            None => format!("capacity factor {c}"),
        },
        None => "no capacity limit".to_string(),
    };
    let l2 = Line::from(vec![
        Span::styled(" policy ", theme.dim()),
        Span::styled(policy_summary(s), theme.value()),
        Span::styled(" · ", theme.dim()),
        Span::styled(format!("epoch {}", e.id), theme.value()),
        Span::styled(format!(" ({}) · {capacity} · ", e.reason), theme.dim()),
        Span::styled(s.workload.description.clone(), theme.dim()),
    ]);
    let f = &e.window.flops;
    // An empty epoch (just reset, or paused before any pass) shows dashes, not zeros that look
    // measured.
    let empty = e.window.tokens == 0;
    let dash = |text: String| if empty { "—".to_string() } else { text };
    let mut l3 = vec![
        Span::styled(
            format!(" {}", dash(format!("{:.0}", e.tokens_per_second))),
            theme.value(),
        ),
        Span::styled(
            if narrow {
                " tok/s · MoE saved "
            } else {
                " tok/s · MoE compute saved "
            },
            theme.dim(),
        ),
        Span::styled(
            dash(format!("{:.1}%", f.moe_saved_vs_all_experts_pct)),
            theme.good(),
        ),
        Span::styled(
            if narrow {
                " vs all, "
            } else {
                " vs all experts, "
            },
            theme.dim(),
        ),
        Span::styled(
            dash(format!("{:.1}%", f.moe_saved_vs_top_k_pct)),
            theme.good(),
        ),
        Span::styled(
            format!(" vs {} · ", s.model.top_k_name(f.top_k)),
            theme.dim(),
        ),
    ];
    let q = &e.quality;
    match (s.workload.kind, q.bits_per_byte) {
        (WorkloadKind::Eval, Some(bpb)) => {
            l3.push(Span::styled(format!("{bpb:.3}"), theme.value()));
            l3.push(Span::styled(
                if narrow { " bpb" } else { " bits/byte" },
                theme.dim(),
            ));
            match q.delta_bits_per_byte {
                Some(d) => {
                    l3.push(Span::styled(" Δ ", theme.dim()));
                    l3.push(Span::styled(format!("{d:+.3}"), theme.value()));
                    // The sample behind the figure: a delta resting on one batch must look
                    // like one.
                    let spread = match q.delta_bits_per_byte_stderr {
                        Some(se) => format!(" ±{se:.3}"),
                        None => String::new(),
                    };
                    l3.push(Span::styled(
                        format!("{spread} (n={})", q.reference_batches),
                        theme.dim(),
                    ));
                    l3.push(Span::styled(
                        format!(
                            " vs {}{}",
                            match q.reference_policy {
                                RoutingPolicy::TopK { k, .. }
                                    if s.model.native_top_k == Some(k) =>
                                {
                                    "native "
                                }
                                _ => "",
                            },
                            policy_text(&q.reference_policy)
                        ),
                        theme.dim(),
                    ));
                }
                None => l3.push(Span::styled(" (no reference pass yet)", theme.dim())),
            }
        }
        (WorkloadKind::Eval, None) => {
            l3.push(Span::styled("quality: no scored tokens yet", theme.dim()))
        }
        (WorkloadKind::Generate, _) => {
            if let Some(d) = e.decode_tokens_per_second {
                l3.push(Span::styled(format!("{d:.0}"), theme.value()));
                l3.push(Span::styled(" decode tok/s · ", theme.dim()));
            }
            l3.push(Span::styled(
                if narrow {
                    "quality: eval only"
                } else {
                    "quality: eval mode only"
                },
                theme.dim(),
            ));
        }
    }
    // The marks go first on the line so that a narrow terminal never cuts them off.
    if !marks.is_empty() {
        marks.push(Span::raw(" "));
        marks.append(&mut l1);
        l1 = marks;
    }
    frame.render_widget(
        Paragraph::new(vec![Line::from(l1), l2, Line::from(l3)]),
        area,
    );
}

/// The share of selected (token, expert) pairs the capacity limit dropped over the window; `None`
/// before any token.
pub fn dropped_share(w: &crate::profiling::snapshot::RoutingStats) -> Option<f64> {
    let selected: f64 = w
        .layers
        .iter()
        .map(|l| l.mean_experts_per_token * w.tokens as f64)
        .sum();
    let dropped: u64 = w.layers.iter().map(|l| l.dropped_pairs).sum();
    (selected > 0.0).then(|| dropped as f64 / selected)
}
