//! The command line: one module per subcommand; `main` parses, sets up threads and reports errors.

mod bench;
mod config;
pub mod exit;
mod import;
mod inspect;
mod metrics;
mod moefy;
mod parity;
pub mod policy_args;
mod replay;
mod report;
mod route;
pub mod run;
pub mod settings;
mod sweep;
mod synth;
pub mod tui;
mod tune;
pub mod values;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use exit::Classify;

/// Watch an XMoE (threshold-routed Mixture-of-Experts) model route tokens, live.
#[derive(Parser, Debug)]
#[command(
    name = "xmoe-top",
    version,
    about,
    args_conflicts_with_subcommands = true,
    after_help = exit::EXIT_STATUS_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: run::RunArgs,
    /// Worker threads for the CPU, 1..=1024 (default: all cores).
    #[arg(long, global = true, value_parser = parse_threads)]
    threads: Option<usize>,
}

#[derive(Subcommand, Debug)]
// Parsed once per process: the size of the largest variant (`run`'s flags) costs nothing.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Whole-model tokens/s per policy (eval and decode) and model load time.
    Bench(bench::BenchArgs),
    /// Compare two engines on the same tokens: the GPU against the CPU, or candle against the kernel.
    Parity(parity::ParityArgs),
    /// Print a model's configuration, parameter counts, FLOPs per token and tensor table.
    Inspect(inspect::InspectArgs),
    /// Run a session over a workload and print a summary (or draw the live UI on a terminal).
    Run(run::RunArgs),
    /// Write a model with random weights (for benchmarks and engine checks; not a trained model).
    Synth(synth::SynthArgs),
    /// Train the embedded byte-level XMoE model (see docs/embedded-model.md).
    Train(crate::train::TrainArgs),
    /// Held-out quality of a trained model under several policies (the trainer's forward pass).
    TrainEval(crate::train::EvalArgs),
    /// Run the same tokens under a range of thresholds (and top-k) with Dense as the quality
    /// reference; print the trade-off table and write a report.
    Sweep(sweep::SweepArgs),
    /// Write a saved JSON report in another format (html, md, csv).
    Report(report::ReportArgs),
    /// Per-layer thresholds that minimise MoE FLOPs within a quality budget (`--budget 1%` or
    /// `--kl 0.01`), verified on tokens the search never saw.
    Tune(tune::TuneArgs),
    /// Summarise routing recorded by SGLang or vLLM: per-layer expert load, imbalance, per-GPU
    /// balance under a placement (`--gpus N` or `--placement`), as text, a report or in the TUI.
    Import(import::ImportArgs),
    /// Turn a dense Llama-family model (GGUF or Hugging Face) into an XMoE model: FFNs split into
    /// experts by co-activation, a trained router per block (docs/dense-to-xmoe.md).
    Moefy(moefy::MoefyArgs),
    /// Show the settings file in force and what it sets; `--init` writes a commented one.
    Config(config::ConfigArgs),
    /// Follow one token of a recorded routing trace (`--trace`) through every MoE layer: the
    /// experts chosen, the probabilities in the order the threshold rule reads them, and the
    /// experts other thresholds would choose.
    Route(route::RouteArgs),
    /// Play a recording (`--record FILE`) back in the UI without the model: pause, step, scrub,
    /// speed; or write a report of one moment of it (`--report out.html --at 12.5`).
    Replay(replay::ReplayArgs),
}

/// Most worker threads `--threads` takes: far above any CPU this runs on, far below what makes
/// thread creation fail.
const MAX_THREADS: usize = 1024;

fn parse_threads(s: &str) -> Result<usize, String> {
    let n: usize = s.trim().parse().map_err(|e| format!("{e}"))?;
    if (1..=MAX_THREADS).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n} is not in 1..={MAX_THREADS}"))
    }
}

/// Thread count chosen by `--threads` or the number of cores.
pub fn thread_count(requested: Option<usize>) -> usize {
    requested
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Parses the command line and runs it; errors are printed and give the exit status of their
/// kind ([`exit::Failure`]).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = thread_count(cli.threads);
    // candle's CPU matmul re-reads /proc/cpuinfo on every call unless this is set, which makes
    // small matmuls 100x slower. Set before any thread exists.
    // SAFETY: no other thread has been started yet.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    match dispatch(cli.command, cli.run, threads) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xmoe-top: error: {e:#}");
            exit::exit_code(&e)
        }
    }
}

fn dispatch(command: Option<Command>, main: run::RunArgs, threads: usize) -> Result<ExitCode> {
    // The commands that run the model on this thread run it on the pool (see `on_pool`); `run`
    // does so on its session thread.
    use crate::model::on_pool;
    match command {
        Some(Command::Bench(a)) => on_pool(move || bench::run(a, threads)),
        Some(Command::Inspect(a)) => inspect::run(a),
        Some(Command::Parity(a)) => on_pool(move || parity::run(a, threads)),
        Some(Command::Run(a)) => run::run(a, threads),
        Some(Command::Synth(a)) => synth::run(a),
        Some(Command::Train(a)) => {
            a.check().usage()?;
            crate::train::run(&a).map(|()| ExitCode::SUCCESS)
        }
        Some(Command::TrainEval(a)) => crate::train::run_eval(&a).map(|()| ExitCode::SUCCESS),
        Some(Command::Sweep(a)) => on_pool(move || sweep::run(a, threads)),
        Some(Command::Report(a)) => report::run(a),
        Some(Command::Config(a)) => config::run(a),
        Some(Command::Tune(a)) => on_pool(move || tune::run(a, threads)),
        Some(Command::Route(a)) => route::run(a),
        Some(Command::Import(a)) => import::run(a),
        Some(Command::Moefy(a)) => moefy::run(a),
        Some(Command::Replay(a)) => replay::run(a),
        None => run::run(main, threads),
    }
}

/// Writes `text` to standard output. A reader that went away (`xmoe-top inspect M | head`) is not
/// an error: the output was simply not wanted any more.
pub(crate) fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// Resolves `device` (printing its note), opens `path` (the embedded model when `None`), checks it
/// fits in memory unless `allow_large`, and loads it: the start of every batch command. Returns
/// the model and where it runs, in words.
pub(crate) fn load_model(
    path: Option<&std::path::Path>,
    device: &crate::model::device::DeviceChoice,
    threads: usize,
    allow_large: bool,
    options: crate::model::LoadOptions,
) -> anyhow::Result<(crate::model::Model, String)> {
    let dev = device.resolve(threads).usage()?;
    if let Some(note) = &dev.note {
        eprintln!("{note}");
    }
    let file = match path {
        Some(p) => crate::model::ModelSource::open(p).bad_input()?,
        None => crate::embedded::model_file()?.into(),
    };
    if !allow_large
        && let Some(note) = file.check_fits(None, options.experts_in_place(&dev.device))?
    {
        eprintln!("xmoe-top: {note}");
    }
    let model = crate::model::Model::from_source(&file, &dev.device, options).bad_input()?;
    amx_note(&model, &options);
    Ok((model, dev.description))
}

/// Tells the user of a bf16 model on the default kernels that this CPU has AMX, which the
/// default does not use because it rounds activations.
pub(crate) fn amx_note(model: &crate::model::Model, options: &crate::model::LoadOptions) {
    if options.dispatch == crate::model::MoeDispatch::Auto
        && model.has_bf16_kernel_experts()
        && crate::kernel::KernelVariant::Amx.is_supported()
    {
        eprintln!(
            "xmoe-top: note: this CPU has AMX; `--moe-dispatch amx` computes this model's bf16 \
             products on it, with activations rounded to bf16 (speed and effect measured in \
             docs/benchmarks.md, \"AVX-512 BF16 and AMX\")"
        );
    }
}

/// `--seq-len`, or 128 (the model's context if shorter), checked against the model's context.
pub(crate) fn seq_len(
    requested: Option<usize>,
    cfg: &crate::model::config::ModelConfig,
) -> anyhow::Result<usize> {
    let seq_len = requested.unwrap_or(128.min(cfg.max_seq_len));
    if seq_len == 0 || seq_len > cfg.max_seq_len {
        return Err(exit::usage(format!(
            "--seq-len must be in 1..={} (the model's context), found {seq_len}",
            cfg.max_seq_len
        )));
    }
    Ok(seq_len)
}

/// The tokenizer of `model`: its `tokenizer.json`, or bytes.
pub(crate) fn model_tokenizer(
    model: &crate::model::Model,
) -> anyhow::Result<crate::workload::tokenizer::TextTokenizer> {
    use crate::workload::tokenizer::TextTokenizer;
    Ok(match model.tokenizer_path() {
        Some(path) => TextTokenizer::from_file(path, model.config().vocab_size).bad_input()?,
        None => TextTokenizer::Byte,
    })
}

/// The text to evaluate on: `--text`, else the embedded held-out text for the embedded model
/// (`own_model` false) or for a model with a real tokenizer (the KJV text is not a checkpoint's
/// training split, but it is plain English any tokenizer reads). A byte model of one's own needs
/// `--text`: the embedded text belongs to the embedded model. `what` names the command.
pub(crate) fn eval_text(
    text: Option<&std::path::Path>,
    own_model: bool,
    tokenizer: &crate::workload::tokenizer::TextTokenizer,
    what: &str,
) -> anyhow::Result<crate::workload::TextSource> {
    Ok(match text {
        Some(p) => crate::workload::TextSource::from_file(p).bad_input()?,
        None if !own_model => crate::embedded::heldout_text(),
        None if !tokenizer.is_byte() => crate::workload::TextSource {
            name: "embedded KJV text (pass --text for your own)".into(),
            ..crate::embedded::heldout_text()
        },
        None => {
            return Err(exit::usage(format!(
                "--text FILE is needed to {what} a model of your own (the embedded held-out text belongs to the embedded model)"
            )));
        }
    })
}
