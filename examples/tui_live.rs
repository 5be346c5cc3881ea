//! The live UI on a model file, before the main command opens it itself: generate mode with the
//! built-in prompts, or eval over a text file. For trying the UI in a real terminal (tmux).
//!
//! `cargo run --release --example tui_live -- MODEL.safetensors [TEXT_FILE] [--no-color]`

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use xmoe_top::model::Model;
use xmoe_top::session::SessionConfig;
use xmoe_top::tui::session_link::run_session_tui;
use xmoe_top::tui::{ColorMode, TuiOptions};
use xmoe_top::workload::{EvalSpec, GenerateSpec, TextSource, Workload, builtin_prompts};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let no_color = args.iter().any(|a| a == "--no-color");
    let paths: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let model_path = PathBuf::from(paths.first().context("usage: tui_live MODEL [TEXT]")?);
    let model = Model::load(&model_path, &Device::Cpu)?;
    let workload = match paths.get(1) {
        Some(text) => Workload::eval(
            EvalSpec {
                text: TextSource {
                    name: text.to_string(),
                    bytes: std::fs::read(text)?,
                },
                batch: 4,
                seq_len: 128.min(model.config().max_seq_len - 1),
            },
            model.config(),
        )?,
        None => Workload::generate(
            GenerateSpec {
                prompts: builtin_prompts(),
                source: "built-in prompts".into(),
                max_len: 160.min(model.config().max_seq_len),
                temperature: 0.8,
                seed: 0,
            },
            model.config(),
        )?,
    };
    let config = SessionConfig::new(&model, "CPU");
    let options = TuiOptions {
        color: ColorMode::detect(no_color),
        ..TuiOptions::default()
    };
    let outcome = run_session_tui(model, workload, config, options)?;
    println!(
        "session ended after {} tokens",
        outcome.final_snapshot.tokens_processed_total
    );
    Ok(())
}
