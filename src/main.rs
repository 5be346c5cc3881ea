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
        None => {
            eprintln!("xmoe-top: not yet usable");
            ExitCode::FAILURE
        }
    }
}
