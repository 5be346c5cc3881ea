//! `xmoe-top [MODEL]` and `xmoe-top run [MODEL]`: a session over a workload, shown live in the
//! terminal or, headless, summarised at the end.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};

use super::exit::{Classify, usage};
use clap::{Args, ValueEnum};

use super::policy_args::PolicyArgs;
use crate::atomic_file::AtomicFile;
use crate::model::trace::ForwardTrace;
use crate::model::{DeviceChoice, LoadOptions, Model, ModelSource, MoeDispatch};
use crate::profiling::snapshot::Snapshot;
use crate::report::trace::{TraceOptions, TraceWriter};
use crate::report::{ReportData, ReportFormat, export, write_report};
use crate::routing::RoutingPolicy;
use crate::session::{PassObserver, Session, SessionConfig};
use crate::signals;
use crate::tui::Exporter;
use crate::workload::{EvalSpec, GenerateSpec, Workload, builtin_prompts, prompts_from_file};

/// What the model runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WorkloadArg {
    /// Teacher-forced batches over a text (quality measured as bits per byte).
    Eval,
    /// Autoregressive decoding from prompts with a KV cache.
    Generate,
}

/// Model, workload and session options shared by the live UI and headless runs.
#[derive(Args, Debug, Clone)]
pub struct SessionArgs {
    /// Model: a .safetensors file or a Hugging Face checkpoint (directory, index or shard);
    /// default: the model embedded in xmoe-top.
    pub model: Option<PathBuf>,
    /// Stop after this many tokens, 1..=10^12 (headless default: 20000).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000_000))]
    pub tokens: Option<u64>,
    /// Stop after this many seconds, more than 0 and at most 10^7 (about 115 days).
    #[arg(long)]
    pub seconds: Option<f64>,
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Workload.
    #[arg(long, value_enum, default_value = "eval")]
    pub workload: WorkloadArg,
    /// Text for the eval workload (default: the embedded held-out text).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// A prompt for the generate workload.
    #[arg(long, conflicts_with = "prompts")]
    pub prompt: Option<String>,
    /// A file of prompts, one per line, for the generate workload.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Sequences per pass (eval), 1..=4096.
    #[arg(long, default_value_t = 8, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    pub batch: usize,
    /// Tokens per sequence (eval) or positions per sequence (generate); default: min(128, context).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Sampling temperature for generate, in [0, 100] (0: greedy).
    #[arg(long, default_value_t = 0.8, value_parser = super::values::temperature)]
    pub temperature: f32,
    /// Seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the model runs: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// How MoE layers compute on the CPU: auto, kernel, portable, avx2, avx512, avx512bf16, amx, gemm or candle.
    #[arg(long, default_value = "auto")]
    pub moe_dispatch: MoeDispatch,
    /// Where the CPU kernel keeps a checkpoint's float experts (Hugging Face or GGUF): `in-place` (read from the
    /// memory-mapped files: no copy, ready at once, pages read as experts are chosen), `packed`
    /// (copied into the kernel's layout at load), or `auto` (in place where possible).
    #[arg(long, default_value = "auto", value_name = "auto|packed|in-place")]
    pub expert_weights: crate::model::ExpertStorage,
    /// Re-run every n-th eval batch under the reference routing to measure the quality cost
    /// (0: never).
    #[arg(long, default_value_t = 8)]
    pub reference_every: u32,
    /// Quality reference: `native` (the model's own rule), `dense` (every expert), `topk:K` or
    /// `threshold:T`. Default: native for a model with a native top-k (Hugging Face
    /// checkpoints), dense otherwise.
    #[arg(long, value_name = "POLICY")]
    pub reference: Option<String>,
    /// A/B: run every eval batch under two policies and compare them (`--compare "t=0.9"
    /// "top-2"`): t=T, t=LAYER:T,..., top-K, dense or native. A replaces the routing flags.
    #[arg(long, num_args = 2, value_names = ["A", "B"])]
    pub compare: Option<Vec<String>>,
    /// Load a model even when its weights exceed the available memory.
    #[arg(long)]
    pub allow_large: bool,
    /// Scores a threshold ranks on in a sigmoid router (DeepSeek-V3): `biased` (the router's
    /// choice values, sigmoid + correction bias) or `unbiased` (the sigmoid scores it weights by).
    #[arg(long, default_value = "biased", value_name = "biased|unbiased")]
    pub sigmoid_scores: crate::routing::SigmoidSelection,
}

/// Parses `--reference` against the model's configuration.
pub fn parse_reference(
    spec: &str,
    cfg: &crate::model::config::ModelConfig,
) -> Result<RoutingPolicy> {
    let e = cfg.n_experts;
    let policy = match spec.trim() {
        "native" => cfg.default_policy,
        "dense" => RoutingPolicy::Dense,
        s => match s.split_once(':') {
            Some(("topk", k)) => RoutingPolicy::TopK {
                k: k.trim()
                    .parse()
                    .map_err(|_| usage(format!("--reference topk:K: `{k}` is not a number")))?,
                renormalize: cfg.default_policy.renormalizes(),
            },
            Some(("threshold", t)) => {
                RoutingPolicy::threshold(t.trim().parse().map_err(|_| {
                    usage(format!("--reference threshold:T: `{t}` is not a number"))
                })?)
                .with_renormalize(cfg.default_policy.renormalizes())
            }
            _ => {
                return Err(usage(format!(
                    "--reference: expected native, dense, topk:K or threshold:T, found `{s}`"
                )));
            }
        },
    };
    policy
        .validate(e)
        .map_err(|err| usage(format!("--reference: {err}")))?;
    Ok(policy)
}

/// Flags of `run` and of the main command.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub session: SessionArgs,
    #[command(flatten)]
    pub tui: super::tui::TuiArgs,
    /// Never draw the live UI: run, then print a summary (automatic when stdout is not a terminal).
    #[arg(long)]
    pub headless: bool,
    /// Print the final snapshot as JSON on stdout instead of the text summary.
    #[arg(long)]
    pub json: bool,
    /// Headless: write a report of the session here (.json, .md, .csv or .html, or --format).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Report format: json, md, csv or html (default: from the extension).
    #[arg(long)]
    pub format: Option<ReportFormat>,
    /// Overwrite existing report or trace files.
    #[arg(long)]
    pub force: bool,
    /// Stream a routing trace (JSON Lines, docs/trace-format.md) of every pass to this file.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Record what the UI shows (every snapshot, and the routing trace) to this file for
    /// `xmoe-top replay` (docs/recording-format.md); written as FILE.partial until the session ends.
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// With --record: leave the routing trace out (snapshots only). The trace is most of a
    /// recording (about 120 bytes a token with 4 MoE layers); without it replay shows every
    /// panel but has no trace to export.
    #[arg(long, requires = "record")]
    pub record_no_trace: bool,
    /// With --trace: also record every router probability.
    #[arg(long, requires = "trace")]
    pub trace_probs: bool,
    /// Headless: serve Prometheus metrics of the running session at http://ADDR/metrics
    /// (e.g. 127.0.0.1:9464): tokens/s, experts per token per layer, FLOPs saved, quality.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,
    /// Where the live UI's `e` key writes its reports (HTML and JSON, timestamped names)
    /// [default: the settings file's report_dir, else the current directory]
    #[arg(long)]
    pub report_dir: Option<PathBuf>,
    /// Settings file to read instead of the default one (docs/config.md;
    /// `xmoe-top config` shows which file is in use).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Read no settings file: built-in defaults and the command line only.
    #[arg(long, conflicts_with = "config")]
    pub no_config: bool,
}

impl RunArgs {
    /// Reads the settings file (`--config`, else the default location) and fills what the
    /// command line left open. The routing defaults apply only when the command line gives no
    /// routing flag at all, so that the two sources never mix into a policy nobody wrote.
    fn with_settings(mut self) -> Result<Self> {
        let (settings, origin) =
            crate::cli::settings::Settings::load(self.config.as_deref(), self.no_config)
                .bad_input()?;
        // A file silently changing the defaults would surprise: say which one is in force.
        if matches!(origin, crate::cli::settings::SettingsOrigin::File(_)) {
            eprintln!("xmoe-top: {origin}");
        }
        self.tui = self.tui.with_settings(&settings).bad_input()?;
        if self.report_dir.is_none() {
            self.report_dir = settings.report_dir();
        }
        let p = &mut self.session.policy;
        let cli_routing = p.policy.is_some()
            || p.threshold.is_some()
            || p.k.is_some()
            || p.renormalize.is_some()
            || p.capacity_factor.is_some()
            || self.session.compare.is_some();
        if !cli_routing && settings.has_policy() {
            let d = &settings.defaults;
            p.policy = d
                .policy
                .as_deref()
                .map(crate::cli::settings::parse_value_enum)
                .transpose()
                .bad_input()?;
            p.threshold = d.threshold.as_ref().map(|t| t.as_arg());
            p.k = d.k;
            p.renormalize = d.renormalize;
            p.capacity_factor = d.capacity_factor;
        }
        Ok(self)
    }
}

/// The trace file being written by the session, shared with the pass observer.
type SharedTrace = Arc<Mutex<Option<TraceWriter<AtomicFile>>>>;

/// Opens `--trace` and hooks it into the session; returns the writer to finish after the run.
fn attach_trace(a: &RunArgs, p: &mut Prepared) -> Result<Option<SharedTrace>> {
    let Some(path) = &a.trace else {
        return Ok(None);
    };
    let writer = TraceWriter::create(
        path,
        p.model.config(),
        TraceOptions {
            probs: a.trace_probs,
        },
        a.force,
    )?;
    let shared: SharedTrace = Arc::new(Mutex::new(Some(writer)));
    let sink = shared.clone();
    let shown = path.display().to_string();
    p.config.pass_observer = Some(PassObserver(Arc::new(Mutex::new(
        move |tokens: &[u32], trace: &ForwardTrace| -> Result<()> {
            let mut w = sink.lock().unwrap_or_else(|e| e.into_inner());
            match w.as_mut() {
                Some(w) => w
                    .write_pass(tokens, trace)
                    .with_context(|| format!("cannot write the routing trace {shown}")),
                None => Ok(()),
            }
        },
    ))));
    Ok(Some(shared))
}

fn finish_trace(shared: Option<SharedTrace>) -> Result<()> {
    if let Some(shared) = shared {
        let writer = shared.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = writer {
            let path = w.finish()?;
            eprintln!("xmoe-top: routing trace written to {}", path.display());
        }
    }
    Ok(())
}

/// A model ready to run, with what the session needs to describe it.
pub struct Prepared {
    /// The model.
    pub model: Model,
    /// The workload.
    pub workload: Workload,
    /// Session options.
    pub config: SessionConfig,
}

/// Loads the model and builds the workload and session options these flags ask for.
pub fn prepare(a: &SessionArgs, threads: usize) -> Result<Prepared> {
    let device = a.device.resolve(threads).usage()?;
    if let Some(note) = &device.note {
        eprintln!("xmoe-top: {note}");
    }
    let file = match &a.model {
        Some(p) => ModelSource::open(p).bad_input()?,
        None => crate::embedded::model_file()?.into(),
    };
    for w in file.warnings() {
        eprintln!("xmoe-top: warning: {w}");
    }
    let options = LoadOptions {
        dispatch: a.moe_dispatch,
        experts: a.expert_weights,
        threads,
        sigmoid_selection: a.sigmoid_scores,
    };
    if !a.allow_large
        && let Some(note) = file.check_fits(None, options.experts_in_place(&device.device))?
    {
        eprintln!("xmoe-top: {note}");
    }
    let load_start = std::time::Instant::now();
    let model = Model::from_source(&file, &device.device, options).bad_input()?;
    super::amx_note(&model, &options);
    let load_s = load_start.elapsed().as_secs_f64();
    if load_s >= 1.0 {
        eprintln!(
            "xmoe-top: loaded {} ({}) in {load_s:.1} s",
            file.path().display(),
            crate::units::bytes_one_decimal(model.file_bytes() as u64)
        );
    }
    let cfg = model.config().clone();
    let (routing, compare) = match &a.compare {
        None => (a.policy.routing(&cfg).usage()?, None),
        Some(specs) => compare_routing(a, specs, &cfg)?,
    };
    if a.batch == 0 {
        return Err(usage("--batch must be at least 1"));
    }
    let seq_len = super::seq_len(a.seq_len, &cfg)?;
    let tokenizer = std::sync::Arc::new(super::model_tokenizer(&model)?);
    let workload = match a.workload {
        WorkloadArg::Eval => {
            if a.prompt.is_some() || a.prompts.is_some() {
                return Err(usage("--prompt and --prompts go with --workload generate"));
            }
            let text =
                super::eval_text(a.text.as_deref(), a.model.is_some(), &tokenizer, "evaluate")?;
            Workload::eval_tokenized(
                EvalSpec {
                    text,
                    batch: a.batch,
                    seq_len,
                },
                &cfg,
                &tokenizer,
            )
            .bad_input()?
        }
        WorkloadArg::Generate => {
            if a.text.is_some() {
                return Err(usage("--text goes with --workload eval"));
            }
            let (prompts, source) = match (&a.prompt, &a.prompts) {
                (Some(p), _) => (vec![p.as_bytes().to_vec()], "--prompt".to_string()),
                (None, Some(path)) => (
                    prompts_from_file(path).bad_input()?,
                    path.display().to_string(),
                ),
                (None, None) => (builtin_prompts(), "built-in prompts".to_string()),
            };
            Workload::generate_tokenized(
                GenerateSpec {
                    prompts,
                    source,
                    max_len: seq_len,
                    temperature: a.temperature,
                    seed: a.seed,
                },
                &cfg,
                tokenizer,
            )
            .bad_input()?
        }
    };
    // The variants that round activations change the numbers, so the header and every report
    // name them.
    let description = match model.moe_dispatch() {
        Some(crate::model::MoeDispatch::Kernel(
            v @ (crate::kernel::KernelVariant::Avx512Bf16 | crate::kernel::KernelVariant::Amx),
        )) => format!("{}, bf16 products on {}", device.description, v.name()),
        _ => device.description.clone(),
    };
    let mut config = SessionConfig::new(&model, description);
    config.routing = routing;
    config.compare = compare;
    config.reference_every = a.reference_every;
    if let Some(spec) = &a.reference {
        config.reference_policy = parse_reference(spec, &cfg)?;
    }
    config.token_budget = a.tokens;
    if let Some(s) = a.seconds {
        if !(s.is_finite() && s > 0.0 && s <= 1e7) {
            return Err(usage(format!("--seconds must be in (0, 1e7], found {s:e}")));
        }
        config.time_budget = Some(Duration::from_secs_f64(s));
    }
    Ok(Prepared {
        model,
        workload,
        config,
    })
}

/// The routings of `--compare A B`: A for the session, B for the comparison, under the
/// capacity factor of the flags (or the model's).
fn compare_routing(
    a: &SessionArgs,
    specs: &[String],
    cfg: &crate::model::config::ModelConfig,
) -> Result<(
    crate::model::RoutingConfig,
    Option<crate::model::RoutingConfig>,
)> {
    let p = &a.policy;
    if p.policy.is_some() || p.threshold.is_some() || p.k.is_some() {
        return Err(usage(
            "--compare names both policies: drop --policy, --threshold and --k",
        ));
    }
    if a.workload != WorkloadArg::Eval {
        return Err(usage(
            "--compare needs --workload eval: under generate the two policies would choose different tokens",
        ));
    }
    let [spec_a, spec_b] = specs else {
        return Err(usage("--compare takes two policies, A and B"));
    };
    let side = |spec: &str| -> Result<crate::model::RoutingConfig> {
        let policies = super::policy_args::parse_policy_spec(spec, cfg, p.renormalize).usage()?;
        crate::model::RoutingConfig::new(
            &policies,
            p.capacity_factor.or(cfg.capacity_factor),
            cfg.n_experts,
        )
        .map_err(|e| usage(format!("--compare `{spec}`: {e}")))
    };
    Ok((side(spec_a)?, Some(side(spec_b)?)))
}

/// Runs a session to its budget and prints the summary (or JSON) to stdout; progress goes to
/// stderr when stderr is a terminal.
pub fn run_headless(a: &RunArgs, threads: usize) -> Result<ExitCode> {
    // Refuse an existing report before spending time on the run.
    check_outputs(a)?;
    let metrics = match &a.metrics_addr {
        Some(addr) => {
            let server = super::metrics::MetricsServer::start(addr).usage()?;
            eprintln!("xmoe-top: metrics at http://{}/metrics", server.addr());
            Some(server)
        }
        None => None,
    };
    let mut p = prepare(&a.session, threads)?;
    if let Some(signal) = signals::received() {
        return Ok(interrupted(signal, "while loading the model"));
    }
    let trace = attach_trace(a, &mut p)?;
    let recorder =
        super::replay::attach_recorder(a.record.as_deref(), &mut p, a.force, !a.record_no_trace)?;
    if p.config.token_budget.is_none() && p.config.time_budget.is_none() {
        p.config.token_budget = Some(20_000);
    }
    let session = Session::start(p.model, p.workload, p.config)?;
    let progress = std::io::stderr().is_terminal();
    while !session.is_finished() && signals::received().is_none() {
        if let Ok(s) = session.snapshots().recv_timeout(Duration::from_millis(100)) {
            if let Some(m) = &metrics {
                m.publish(&s);
            }
            if progress {
                eprint!("\r{}", progress_line(&s));
                let _ = std::io::stderr().flush();
            }
        }
    }
    if progress {
        eprintln!();
    }
    // The last snapshot the session published: when a pass fails (a trace on a full disk,
    // non-finite logits) it says why, and what ran until then is still summarised.
    let published = session.latest();
    // A terminating signal ends the run early; what ran so far is summarised and written.
    let ended = match signals::received() {
        Some(_) => session.stop(),
        None => session.join(),
    };
    let trace_done = finish_trace(trace).and(super::replay::finish_recorder(recorder));
    let (last, failure) = match ended {
        Ok(outcome) => (outcome.final_snapshot, trace_done.err()),
        Err(e) => match published {
            Some(s) => (s, Some(e)),
            None => return Err(e),
        },
    };
    if let Some(path) = &a.report {
        let written = write_report(
            &ReportData::new(last.clone(), None),
            path,
            a.format,
            a.force,
        )?;
        eprintln!("xmoe-top: report written to {}", written.display());
    }
    if a.json {
        super::print_stdout(&(last.to_json_pretty() + "\n"))?;
    } else {
        super::print_stdout(&crate::report::text::render(&last))?;
    }
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(match signals::received() {
        Some(signal) => interrupted(
            signal,
            &format!("after {} tokens", last.tokens_processed_total),
        ),
        None => ExitCode::SUCCESS,
    })
}

/// Checks every output path before anything runs: a report or trace that cannot be written is
/// found now, not after the run (whose summary would be lost with it).
fn check_outputs(a: &RunArgs) -> Result<()> {
    if let Some(path) = &a.report {
        ReportFormat::resolve(path, a.format).usage()?;
        crate::atomic_file::check_target(path, a.force).usage()?;
    }
    if let Some(path) = &a.trace {
        crate::atomic_file::check_target(path, a.force).usage()?;
    }
    if let (Some(report), Some(trace)) = (&a.report, &a.trace)
        && crate::atomic_file::same_target(report, trace)
    {
        return Err(usage(format!(
            "--report and --trace name the same file ({})",
            report.display()
        )));
    }
    Ok(())
}

/// Says that `signal` ended the run and gives the exit status that reports it.
fn interrupted(signal: i32, when: &str) -> ExitCode {
    eprintln!("xmoe-top: stopped by {} {when}", signals::name(signal));
    ExitCode::from(signals::exit_status(signal))
}

fn progress_line(s: &Snapshot) -> String {
    let e = &s.epoch;
    format!(
        "{} tokens  {:.0} tok/s (last {} tokens)  {:.2} experts/token  {:.1}% MoE compute saved vs all experts   ",
        s.tokens_processed_total,
        e.tokens_per_second,
        e.window.tokens,
        e.window.mean_experts_per_token,
        e.window.flops.moe_saved_vs_all_experts_pct
    )
}

/// `xmoe-top [MODEL]` and `xmoe-top run`: the live UI on a terminal, else headless.
pub fn run(a: RunArgs, threads: usize) -> Result<ExitCode> {
    // Caught for the whole command, so a signal during loading or writing is noticed too.
    let _signals =
        signals::TerminationGuard::install().context("cannot install signal handlers")?;
    let a = a.with_settings()?;
    if a.headless || a.json || !super::tui::can_draw() {
        return run_headless(&a, threads).context("headless run");
    }
    if a.report.is_some() {
        return Err(usage(
            "--report goes with --headless; in the live UI press `e` (reports go to --report-dir)",
        ));
    }
    if a.metrics_addr.is_some() {
        return Err(usage("--metrics-addr goes with --headless"));
    }
    check_outputs(&a)?;
    let report_dir = a.report_dir.clone().unwrap_or_else(|| PathBuf::from("."));
    crate::atomic_file::check_dir(&report_dir)
        .context("--report-dir (where `e` writes reports)")
        .usage()?;
    let mut p = prepare(&a.session, threads)?;
    if let Some(signal) = signals::received() {
        return Ok(interrupted(signal, "while loading the model"));
    }
    let trace = attach_trace(&a, &mut p)?;
    let recorder =
        super::replay::attach_recorder(a.record.as_deref(), &mut p, a.force, !a.record_no_trace)?;
    let mut a = a;
    a.tui.recording = recorder.as_ref().map(crate::record::Recorder::status);
    let dir = report_dir;
    let exporter: Exporter = Box::new(move |snapshot: &Snapshot| {
        export(
            snapshot,
            &dir,
            &[ReportFormat::Html, ReportFormat::Json],
            false,
        )
    });
    let result = super::tui::run(&a.tui, p.model, p.workload, p.config, Some(exporter));
    finish_trace(trace)?;
    super::replay::finish_recorder(recorder)?;
    result?;
    Ok(match signals::received() {
        Some(signal) => interrupted(signal, "in the live UI"),
        None => ExitCode::SUCCESS,
    })
}
