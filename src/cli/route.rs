//! `xmoe-top route`: follow one token of a recorded routing trace through every MoE layer, as
//! the live UI's token view (`o`) shows a token of the running model.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;

use super::exit::Classify;
use crate::profiling::snapshot::{LayerRoute, RoutedToken, TokenRoutes};
use crate::report::{TraceReader, TraceRecord};
use crate::tui::render::follow::{detail_rows, layer_rows, printable};

/// Arguments of `route`.
#[derive(Args, Debug)]
pub struct RouteArgs {
    /// A routing trace written with `--trace` (add `--trace-probs` for the full probabilities).
    trace: PathBuf,
    /// Forward pass number in the trace.
    #[arg(long, default_value_t = 0)]
    pass: u64,
    /// Sequence (row of the batch) in the pass.
    #[arg(long, default_value_t = 0)]
    seq: usize,
    /// Position of the token in its sequence (default: the last one recorded).
    #[arg(long)]
    pos: Option<usize>,
    /// Mark this threshold on each layer's running sum.
    #[arg(long, default_value_t = 0.9, value_parser = super::values::threshold)]
    threshold: f32,
    /// Width of the output, columns.
    #[arg(long, default_value_t = 100)]
    width: usize,
}

fn routed(r: TraceRecord, n_experts: usize) -> RoutedToken {
    RoutedToken {
        token: r.token,
        bytes: r.byte.map_or_else(Vec::new, |b| vec![b]),
        position: r.pos,
        target: None,
        loss_nats: None,
        origin: None,
        layers: r
            .layers
            .into_iter()
            .map(|l| LayerRoute {
                probs: l.probs.unwrap_or_else(|| vec![0.0; n_experts]),
                chosen: l
                    .experts
                    .iter()
                    .zip(&l.weights)
                    .map(|(&e, &w)| (e, w, !l.dropped.contains(&e)))
                    .collect(),
            })
            .collect(),
    }
}

/// Prints the route of the chosen token.
pub fn run(a: RouteArgs) -> Result<ExitCode> {
    let mut reader = TraceReader::open(&a.trace).usage()?;
    let header = reader.header().clone();
    let mut tokens = Vec::new();
    for rec in &mut reader {
        let rec = rec
            .with_context(|| format!("in {}", a.trace.display()))
            .bad_input()?;
        if rec.pass > a.pass {
            break;
        }
        if rec.pass == a.pass && rec.seq == a.seq {
            if rec.layers.len() != header.moe_layers.len() {
                return Err(anyhow::anyhow!(
                    "{}: pass {} position {} has {} layers, the header lists {}",
                    a.trace.display(),
                    rec.pass,
                    rec.pos,
                    rec.layers.len(),
                    header.moe_layers.len()
                ))
                .bad_input();
            }
            tokens.push(routed(rec, header.n_experts));
        }
    }
    if tokens.is_empty() {
        return Err(super::exit::usage(format!(
            "{} has no tokens for pass {} sequence {}",
            a.trace.display(),
            a.pass,
            a.seq
        )));
    }
    let index = match a.pos {
        None => tokens.len() - 1,
        Some(p) => tokens.iter().position(|t| t.position == p).ok_or_else(|| {
            super::exit::usage(format!(
                "pass {} sequence {} has positions {}..={}, not {p}",
                a.pass,
                a.seq,
                tokens[0].position,
                tokens[tokens.len() - 1].position
            ))
        })?,
    };
    let routes = TokenRoutes {
        source: format!("{} pass {} sequence {}", a.trace.display(), a.pass, a.seq),
        layers: header.moe_layers.clone(),
        n_experts: header.n_experts,
        // The trace does not record the policy; the mark is the --threshold asked for.
        policies: Vec::new(),
        tokens,
    };
    let token = &routes.tokens[index];
    let mut out = String::new();
    let context: String = routes.tokens[index.saturating_sub(40)..index]
        .iter()
        .map(|t| printable(&t.bytes))
        .collect();
    out.push_str(&format!(
        "{} (model {}): token at position {} = id {}{}\n",
        routes.source,
        header.model,
        token.position,
        token.token,
        if token.bytes.is_empty() {
            String::new()
        } else {
            format!(" \"{}\" after \"{context}\"", printable(&token.bytes))
        }
    ));
    out.push_str("the trace records no loss and no policy; the last columns count the experts the threshold rule would choose at each t\n\n");
    if !header.probs {
        out.push_str("the trace has only the chosen experts and their weights (record with --trace-probs for every probability)\n");
        for (slot, l) in token.layers.iter().enumerate() {
            let chosen: Vec<String> = l
                .chosen
                .iter()
                .map(|&(e, w, kept)| format!("e{e} {w:.3}{}", if kept { "" } else { " dropped" }))
                .collect();
            out.push_str(&format!(
                "L{:<4} {} chosen: {}\n",
                routes.layers[slot],
                l.chosen.len(),
                chosen.join(", ")
            ));
        }
    } else {
        for row in layer_rows(&routes, token, a.width) {
            out.push_str(&row);
            out.push('\n');
        }
        for (slot, l) in token.layers.iter().enumerate() {
            out.push_str(&format!(
                "\nL{}: experts in the order the rule reads them; Σ against t = {:.2} (┃)\n",
                routes.layers[slot], a.threshold
            ));
            for row in detail_rows(l, Some(a.threshold), header.n_experts.min(16), a.width) {
                out.push_str(&row);
                out.push('\n');
            }
        }
    }
    super::print_stdout(&out)?;
    Ok(ExitCode::SUCCESS)
}
