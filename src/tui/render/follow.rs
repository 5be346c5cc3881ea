//! The token view (`o`): the tokens of a recent pass, and the selected token's route through
//! every MoE layer: its router probabilities sorted, their cumulative sum against t, the experts
//! chosen, and how many experts other thresholds would have chosen.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Paragraph};

use crate::profiling::snapshot::{LayerRoute, RoutedToken, TokenOrigin, TokenRoutes};
use crate::routing::{RoutingPolicy, threshold_keeps};
use crate::tui::app::App;

/// The thresholds the "what if" columns ask about.
pub const WHAT_IF: [f32; 6] = [0.5, 0.7, 0.8, 0.9, 0.95, 0.99];

/// Expert indices by descending probability (ties by index), with the running sum: the order
/// the threshold rule reads them in.
pub fn ranked(probs: &[f32]) -> Vec<(usize, f32, f32)> {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    let mut cum = 0.0f32;
    order
        .into_iter()
        .map(|e| {
            cum += probs[e];
            (e, probs[e], cum)
        })
        .collect()
}

/// Experts the threshold rule keeps at `t` for these probabilities.
pub fn experts_at(probs: &[f32], t: f32) -> usize {
    kept_at(&ranked(probs), t)
}

/// Experts the threshold rule keeps at `t`, from [`ranked`] probabilities.
fn kept_at(ranked: &[(usize, f32, f32)], t: f32) -> usize {
    ranked
        .iter()
        .enumerate()
        .take_while(|&(rank, &(_, p, cum))| threshold_keeps(rank, cum, p, t))
        .count()
}

/// A token's text made printable on one line.
pub fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| match c {
            '\n' => '⏎',
            '\t' => '→',
            c if c.is_control() => '·',
            c => c,
        })
        .collect()
}

fn policy_short(p: &RoutingPolicy) -> String {
    match p {
        RoutingPolicy::Threshold { t, .. } => format!("t {t:.2}"),
        RoutingPolicy::TopK { k, .. } => format!("top-{k}"),
        RoutingPolicy::Dense => "dense".into(),
    }
}

/// The tokens of the strip around the cursor that fit `width` columns, in text order: (token
/// index, its text). The cursor sits at about a third of the line, so what follows shows too.
pub fn strip(tokens: &[RoutedToken], cursor: usize, width: usize) -> Vec<(usize, String)> {
    let text = |i: usize| {
        let s = printable(&tokens[i].bytes);
        if s.is_empty() { "∅".to_string() } else { s }
    };
    if cursor >= tokens.len() {
        return Vec::new();
    }
    let selected = text(cursor);
    let room = width.saturating_sub(selected.chars().count());
    let mut used = 0;
    let mut out = Vec::new();
    for i in (0..cursor).rev() {
        let t = text(i);
        if used + t.chars().count() > room / 3 {
            break;
        }
        used += t.chars().count();
        out.push((i, t));
    }
    out.reverse();
    out.push((cursor, selected));
    for i in cursor + 1..tokens.len() {
        let t = text(i);
        if used + t.chars().count() > room {
            break;
        }
        used += t.chars().count();
        out.push((i, t));
    }
    out
}

/// The token under column `x` of a strip drawn from column `x0` (the mouse).
pub fn token_at(strip: &[(usize, String)], x0: u16, x: u16) -> Option<usize> {
    let mut at = x0;
    for (i, t) in strip {
        let w = t.chars().count() as u16;
        if x >= at && x < at + w {
            return Some(*i);
        }
        at += w;
    }
    None
}

/// Where the view's strip is drawn inside `body` (the area [`render`] is given).
pub fn strip_area(body: Rect) -> Rect {
    Rect::new(
        body.x + 1,
        body.y + 2,
        body.width.saturating_sub(2),
        1.min(body.height),
    )
}

fn token_line(t: &RoutedToken, index: usize, n: usize) -> String {
    let mut s = format!(
        "token {} of {n} (position {}) · \"{}\" id {}",
        index + 1,
        t.position,
        printable(&t.bytes),
        t.token
    );
    if let (Some((id, bytes)), Some(loss)) = (&t.target, t.loss_nats) {
        s.push_str(&format!(
            " · next \"{}\" id {id}: loss {loss:.3} nats = {:.3} bits",
            printable(bytes),
            loss / std::f32::consts::LN_2
        ));
    }
    match t.origin {
        Some(TokenOrigin::Prompt) => s.push_str(" · prompt"),
        Some(TokenOrigin::Generated) => s.push_str(" · generated"),
        None => {}
    }
    s
}

/// One row per MoE layer: policy, experts chosen with their probabilities, their mass, and the
/// count at each threshold of [`WHAT_IF`].
pub fn layer_rows(routes: &TokenRoutes, token: &RoutedToken, width: usize) -> Vec<String> {
    let what_if_w = WHAT_IF.len() * 4;
    let experts_w = width.saturating_sub(6 + 8 + 5 + 1 + 7 + what_if_w).max(10);
    let mut out = vec![format!(
        "{:<6}{:<8}{:>5} {:<experts_w$}{:>7}{}",
        "layer",
        "policy",
        "chose",
        "chosen (probability)",
        "Σ p",
        WHAT_IF
            .iter()
            .map(|t| format!("{:>4}", format!("{t}").trim_start_matches('0')))
            .collect::<String>()
    )];
    for (slot, lr) in token.layers.iter().enumerate() {
        let block = routes.layers.get(slot).copied().unwrap_or(slot);
        let policy = routes
            .policies
            .get(slot)
            .map_or(String::new(), policy_short);
        let prob = |e: u16| lr.probs.get(e as usize).copied().unwrap_or(0.0);
        let mass: f32 = lr.chosen.iter().map(|c| prob(c.0)).sum();
        let mut experts = String::new();
        for &(e, _, kept) in &lr.chosen {
            let p = prob(e);
            let item = format!(
                "e{e} {}{} ",
                format!("{p:.2}").trim_start_matches('0'),
                if kept { "" } else { "✗" }
            );
            if experts.chars().count() + item.chars().count() > experts_w {
                experts.push('…');
                break;
            }
            experts.push_str(&item);
        }
        let order = ranked(&lr.probs);
        let counts: String = WHAT_IF
            .iter()
            .map(|&t| format!("{:>4}", kept_at(&order, t)))
            .collect();
        out.push(format!(
            "{:<6}{:<8}{:>5} {:<experts_w$}{:>7.3}{counts}",
            format!("L{block}"),
            policy,
            lr.chosen.len(),
            experts,
            mass
        ));
    }
    out
}

/// The selected layer's experts in the order the rule reads them: probability, running sum, a
/// bar of the running sum with t marked, and whether the expert was chosen. At most `rows`.
pub fn detail_rows(lr: &LayerRoute, t: Option<f32>, rows: usize, width: usize) -> Vec<String> {
    let ranked = ranked(&lr.probs);
    let bar_w = width.saturating_sub(36).clamp(10, 50);
    let mark = t.map(|t| ((t * bar_w as f32).round() as usize).min(bar_w - 1));
    let mut out = Vec::new();
    let shown = if ranked.len() > rows {
        rows.saturating_sub(1)
    } else {
        rows
    };
    for (rank, &(e, p, cum)) in ranked.iter().enumerate().take(shown) {
        let filled = ((cum * bar_w as f32).round() as usize).min(bar_w);
        let bar: String = (0..bar_w)
            .map(|i| match (i < filled, Some(i) == mark) {
                (_, true) => '┃',
                (true, false) => '█',
                (false, false) => '·',
            })
            .collect();
        let chosen = lr.chosen.iter().find(|c| c.0 as usize == e);
        let state = match chosen {
            Some((_, _, true)) => "chosen",
            Some((_, _, false)) => "dropped (capacity)",
            None => "",
        };
        out.push(
            format!("{:>3} e{e:<4} p {p:.3}  Σ {cum:.3} {bar} {state}", rank + 1)
                .trim_end()
                .to_string(),
        );
    }
    if ranked.len() > shown {
        let rest: f32 = ranked[shown..].iter().map(|r| r.1).sum();
        out.push(format!(
            "    … {} more experts with Σ p {rest:.3}",
            ranked.len() - shown
        ));
    }
    out
}

/// Draws the view over `area` (the body between header and status bar).
pub fn render(frame: &mut Frame, area: Rect, app: &App) {
    let Some(view) = app.follow.as_ref() else {
        return;
    };
    let theme = &app.theme;
    frame.render_widget(Clear, area);
    let block = Block::bordered().title(Line::styled(
        " Follow one token · ←→ token · ↑↓ layer · u latest pass · Esc close ",
        theme.title_focused(),
    ));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let width = inner.width as usize;
    let Some(routes) = view.routes.as_ref() else {
        frame.render_widget(
            Paragraph::new(Line::styled(
                "waiting for the next pass's tokens (the model may be paused or tuning)…",
                theme.dim(),
            )),
            inner,
        );
        return;
    };
    let Some(token) = routes.tokens.get(view.cursor) else {
        frame.render_widget(Paragraph::new("no tokens in this pass"), inner);
        return;
    };
    let strip_spans: Vec<Span> = strip(&routes.tokens, view.cursor, width)
        .into_iter()
        .map(|(i, t)| {
            if i == view.cursor {
                Span::styled(t, theme.title_focused().reversed())
            } else {
                Span::raw(t)
            }
        })
        .collect();
    let mut lines = vec![
        Line::styled(
            format!(
                "{} · {} MoE layers · .5 … .99: experts chosen at that t",
                routes.source,
                routes.layers.len()
            ),
            theme.dim(),
        ),
        Line::from(strip_spans),
        Line::raw(token_line(token, view.cursor, routes.tokens.len())),
        Line::raw(""),
    ];
    // One column goes to the ▶ marking the layer shown in detail.
    let rows = layer_rows(routes, token, width.saturating_sub(1));
    lines.push(Line::styled(format!(" {}", rows[0]), theme.dim()));
    let slot = app.layer.min(token.layers.len().saturating_sub(1));
    for (i, r) in rows[1..].iter().enumerate() {
        let style = if i == slot {
            theme.value()
        } else {
            Style::default()
        };
        lines.push(Line::styled(
            format!("{}{r}", if i == slot { "▶" } else { " " }),
            style,
        ));
    }
    if let Some(lr) = token.layers.get(slot) {
        let t = match routes.policies.get(slot) {
            Some(RoutingPolicy::Threshold { t, .. }) => Some(*t),
            _ => None,
        };
        let block = routes.layers.get(slot).copied().unwrap_or(slot);
        lines.push(Line::raw(""));
        lines.push(Line::styled(
            match t {
                Some(t) => format!(
                    "L{block}: experts in the order the rule reads them; Σ against t = {t:.2} (┃)"
                ),
                None => format!("L{block}: experts by probability with the running sum"),
            },
            theme.dim(),
        ));
        let room = (inner.height as usize).saturating_sub(lines.len());
        for r in detail_rows(lr, t, room, width) {
            lines.push(Line::raw(r));
        }
    }
    frame.render_widget(Paragraph::new(lines), inner);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_if_counts_follow_the_threshold_rule() {
        let probs = [0.1, 0.5, 0.3, 0.1];
        assert_eq!(
            ranked(&probs).iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![1, 2, 0, 3],
            "descending, ties by index"
        );
        // 0.5 reaches t = 0.5 alone; 0.8 needs the second; 0.9 the third; 0.95 all four.
        assert_eq!(experts_at(&probs, 0.5), 1);
        assert_eq!(experts_at(&probs, 0.8), 2);
        assert_eq!(experts_at(&probs, 0.9), 3);
        assert_eq!(experts_at(&probs, 0.95), 4);
        assert_eq!(experts_at(&probs, 1.0), 4);
        // A single expert is always chosen.
        assert_eq!(experts_at(&[1.0], 0.99), 1);
    }

    #[test]
    fn rows_fit_and_mark_the_chosen_experts() {
        let lr = LayerRoute {
            probs: vec![0.1, 0.5, 0.3, 0.1],
            chosen: vec![(1, 0.5, true), (2, 0.3, true), (0, 0.1, false)],
        };
        let token = RoutedToken {
            token: 65,
            bytes: b"A".to_vec(),
            position: 3,
            target: Some((10, b"\n".to_vec())),
            loss_nats: Some(0.7),
            origin: None,
            layers: vec![lr.clone()],
        };
        let routes = TokenRoutes {
            source: "eval batch 1, sequence 1 of 1".into(),
            layers: vec![2],
            n_experts: 4,
            policies: vec![RoutingPolicy::threshold(0.9)],
            tokens: vec![token.clone()],
        };
        let rows = layer_rows(&routes, &token, 78);
        assert!(rows.iter().all(|r| r.chars().count() <= 78), "{rows:#?}");
        assert!(
            rows[1].starts_with("L2    t 0.90      3 e1 .50 e2 .30 e0 .10✗"),
            "{}",
            rows[1]
        );
        assert!(rows[1].ends_with("   1   2   2   3   4   4"), "{}", rows[1]);
        assert!(rows[0].ends_with("  .5  .7  .8  .9 .95 .99"), "{}", rows[0]);
        // A list cut to fit still sums every chosen expert.
        let narrow = layer_rows(&routes, &token, 62);
        assert!(
            narrow[1].contains('…') && narrow[1].contains("0.900"),
            "{}",
            narrow[1]
        );
        let d = detail_rows(&lr, Some(0.9), 10, 78);
        assert_eq!(d.len(), 4);
        assert!(d[0].contains("e1") && d[0].ends_with("chosen"), "{}", d[0]);
        assert!(d[2].ends_with("dropped (capacity)"), "{}", d[2]);
        assert!(!d[3].contains("chosen"), "{}", d[3]);
        // Fewer rows than experts: the rest is summed.
        let d = detail_rows(&lr, Some(0.9), 2, 78);
        assert_eq!(d.len(), 2);
        assert!(d[1].contains("3 more experts with Σ p 0.500"), "{}", d[1]);
        let s = strip(&[token.clone(), token.clone(), token.clone()], 1, 20);
        assert_eq!(s.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(
            (token_at(&s, 5, 5), token_at(&s, 5, 6), token_at(&s, 5, 8)),
            (Some(0), Some(1), None)
        );
        let line = token_line(&token, 0, 1);
        assert!(
            line.contains("next \"⏎\" id 10: loss 0.700 nats = 1.010 bits"),
            "{line}"
        );
    }
}
