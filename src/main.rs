//! The `xmoe-top` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xmoe-top",
    about = "XMoE model runner and live routing profiler"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Train the embedded byte-level XMoE model (see docs/embedded-model.md).
    Train(xmoe_top::train::TrainArgs),
    /// Held-out quality of a trained model under several routing policies (trainer's forward pass).
    TrainEval(xmoe_top::train::EvalArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Some(Command::Train(args)) => match xmoe_top::train::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("xmoe-top train: {e:#}");
                ExitCode::FAILURE
            }
        },
        Some(Command::TrainEval(args)) => match xmoe_top::train::run_eval(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("xmoe-top train-eval: {e:#}");
                ExitCode::FAILURE
            }
        },
        None => {
            eprintln!("xmoe-top: not yet usable");
            ExitCode::FAILURE
        }
    }
}
