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
        match &app.replay {
            // A replay says so first: which file, recorded when (the model's name follows).
            Some(r) => Span::styled(
                format!(
                    " REPLAY {} (recorded {}) · ",
                    r.info.file,
                    r.info.recorded_utc.replace('T', " ").trim_end_matches('Z')
                ),
                theme.mark(),
            ),
            None => Span::styled(" xmoe-top ", theme.title()),
        },
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
    if let Some(r) = &app.recording {
        marks.push(Span::styled(format!(" {} ", r.line()), theme.mark()));
    }
    let e = &s.epoch;
    let capacity = match s.policy.capacity_factor {
        Some(c) => match dropped_share(&e.window) {
            Some(d) => format!("capacity factor {c} drops {:.1}% of pairs", 100.0 * d),
            None => format!("capacity factor {c}"),
        },
        None => "no capacity limit".to_string(),
    };
    let dim = |t: String| Span::styled(t, theme.dim());
    let val = |t: String| Span::styled(t, theme.value());
    // Each line is made of segments with a priority (0 = kept longest); a segment that does
    // not fit is left out whole, so nothing is cut mid-word.
    let l2 = fit(
        vec![
            (0, vec![dim(" policy ".into()), val(policy_summary(s))]),
            (
                1,
                vec![
                    val(format!("epoch {}", e.id)),
                    dim(format!(" ({})", e.reason)),
                ],
            ),
            (2, vec![dim(capacity)]),
            (3, vec![dim(s.workload.description.clone())]),
        ],
        area.width,
    );
    let f = &e.window.flops;
    // An empty epoch (just reset, or paused before any pass) shows dashes, not zeros that look
    // measured.
    let empty = e.window.tokens == 0;
    let dash = |text: String| if empty { "—".to_string() } else { text };
    // tokens/s = tokens / wall time of the forward passes that processed them (statistics
    // included, reference passes excluded), over the window of the last N tokens.
    let span = format!("last {} tok", e.window.tokens);
    // The figures line needs its short words up to 160 columns to keep every figure.
    let compact = area.width < 160;
    let generate = s.workload.kind == WorkloadKind::Generate;
    let rate = val(format!(" {}", dash(format!("{:.0}", e.tokens_per_second))));
    let mut l3: Vec<(u8, Vec<Span>)> = Vec::new();
    if generate {
        // The plain figure includes prompt prefill; the decode figure counts sampled tokens
        // only. Both are over the window.
        if compact {
            l3.push((0, vec![rate, dim(" tok/s incl. prefill".into())]));
        } else {
            l3.push((0, vec![rate, dim(format!(" tok/s incl. prefill ({span})"))]));
        }
        l3.push((
            1,
            vec![
                val(e
                    .decode_tokens_per_second
                    .map_or("—".to_string(), |d| format!("{d:.0}"))),
                dim(" decode tok/s".into()),
            ],
        ));
        if compact {
            l3.push((3, vec![dim(span.clone())]));
        }
    } else if compact {
        l3.push((0, vec![rate, dim(format!(" tok/s, {span}"))]));
    } else {
        l3.push((0, vec![rate, dim(format!(" tok/s ({span})"))]));
    }
    l3.push((
        1,
        vec![
            dim(if compact {
                "saved "
            } else {
                "MoE compute saved "
            }
            .into()),
            Span::styled(
                dash(format!("{:.1}%", f.moe_saved_vs_all_experts_pct)),
                theme.good(),
            ),
            dim(if compact {
                " vs all"
            } else {
                " vs all experts"
            }
            .into()),
        ],
    ));
    l3.push((
        4,
        vec![
            Span::styled(
                dash(format!("{:.1}%", f.moe_saved_vs_top_k_pct)),
                theme.good(),
            ),
            dim(format!(" vs {}", s.model.top_k_name(f.top_k))),
        ],
    ));
    let q = &e.quality;
    match (s.workload.kind, q.bits_per_byte) {
        (WorkloadKind::Eval, Some(bpb)) => {
            // The sample behind each quality figure: a figure resting on one batch must
            // look like one.
            l3.push((
                3,
                vec![
                    val(format!("{bpb:.3}")),
                    dim(format!(
                        " {} ({} tok)",
                        if compact { "bpb" } else { "bits/byte" },
                        crate::units::si(q.scored_tokens as f64)
                    )),
                ],
            ));
            match q.delta_bits_per_byte {
                Some(d) => {
                    let spread = match q.delta_bits_per_byte_stderr {
                        Some(se) => format!("±{se:.3}"),
                        None => String::new(),
                    };
                    let reference = format!(
                        " vs {}{}",
                        match q.reference_policy {
                            RoutingPolicy::TopK { k, .. } if s.model.native_top_k == Some(k) => {
                                "native "
                            }
                            _ => "",
                        },
                        policy_text(&q.reference_policy)
                    );
                    l3.push((
                        2,
                        vec![
                            dim("Δ ".into()),
                            val(format!("{d:+.3}")),
                            dim(format!(
                                "{spread} ({} batch{}){}",
                                q.reference_batches,
                                if q.reference_batches == 1 { "" } else { "es" },
                                if compact { String::new() } else { reference }
                            )),
                        ],
                    ));
                }
                None => l3.push((2, vec![dim("Δ: no reference pass yet".into())])),
            }
        }
        (WorkloadKind::Eval, None) => {
            l3.push((2, vec![dim("quality: no scored tokens yet".into())]))
        }
        (WorkloadKind::Generate, _) => l3.push((
            5,
            vec![dim(if compact {
                "quality: eval only"
            } else {
                "quality: eval mode only"
            }
            .into())],
        )),
    }
    let l3 = fit(l3, area.width);
    // The marks go first on the line so that a narrow terminal never cuts them off.
    if !marks.is_empty() {
        marks.push(Span::raw(" "));
        marks.append(&mut l1);
        l1 = marks;
    }
    frame.render_widget(Paragraph::new(vec![Line::from(l1), l2, l3]), area);
}

/// Joins `segments` (priority, spans) with ` · ` into one line of at most `width` columns,
/// leaving out whole segments, the highest priority number first, until the rest fits.
pub fn fit(segments: Vec<(u8, Vec<Span<'static>>)>, width: u16) -> Line<'static> {
    let len = |spans: &[Span]| {
        spans
            .iter()
            .map(|s| s.content.chars().count())
            .sum::<usize>()
    };
    let mut keep: Vec<bool> = vec![true; segments.len()];
    loop {
        let total: usize = segments
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|((_, sp), _)| len(sp) + 3)
            .sum::<usize>()
            .saturating_sub(3);
        // The last segment stays: cut by the panel edge is better than an empty line.
        if total <= width as usize || keep.iter().filter(|k| **k).count() <= 1 {
            break;
        }
        // Drop the kept segment with the highest priority number (the last of equals).
        let Some(i) = (0..segments.len())
            .filter(|&i| keep[i])
            .max_by_key(|&i| (segments[i].0, i))
        else {
            break;
        };
        keep[i] = false;
    }
    let mut out: Vec<Span<'static>> = Vec::new();
    for ((_, spans), k) in segments.into_iter().zip(keep) {
        if !k {
            continue;
        }
        if !out.is_empty() {
            out.push(Span::raw(" · "));
        }
        out.extend(spans);
    }
    Line::from(out)
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
