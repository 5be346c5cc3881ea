//! `xmoe-top import`: routing recorded by a serving engine (SGLang, vLLM), summarised as text,
//! written as a report, or shown in the TUI. No model runs; `--model` only supplies and checks
//! the shape.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use super::exit::{Classify, usage};
use crate::import::analysis::{PlacementChoice, summarize};
use crate::import::{Dump, Format, Hints};

/// Arguments of `import`.
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The engine's file: SGLang `/generate` responses (JSON) or recorder dump (.pt), or a vLLM
    /// EPLB dump (.pt); see docs/import-formats.md.
    file: PathBuf,
    /// Format of FILE (auto: decided from its contents).
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// A model (xmoe file or Hugging Face directory): its layer and expert counts check the
    /// dump's, and give routed_experts its layers and top-k.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Layers on routed_experts' layer axis (SGLang: num_hidden_layers), without --model.
    #[arg(long)]
    layers: Option<usize>,
    /// Experts per token in routed_experts (num_experts_per_tok), without --model.
    #[arg(long)]
    top_k: Option<usize>,
    /// Logical experts per layer, where the dump holds only ids (else inferred from the largest).
    #[arg(long)]
    experts: Option<usize>,
    /// Experts on GPUs: GPUs separated by `;`, each a list of expert ids or ranges, e.g.
    /// "0-3;4-7". A replicated expert's load is split evenly over its GPUs.
    #[arg(long, conflicts_with = "gpus")]
    placement: Option<String>,
    /// Expert-parallel GPUs: the dump's physical experts (or the logical ones) in contiguous
    /// blocks, as the engines place them.
    #[arg(long)]
    gpus: Option<usize>,
    /// Threshold for the what-if (0 < t <= 1): what routing under it would have saved.
    #[arg(long)]
    threshold: Option<f32>,
    /// Write a report (.json, .md or .html, by extension).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Overwrite an existing report.
    #[arg(long)]
    force: bool,
    /// Show the heatmap and per-GPU balance in the terminal UI instead of printing.
    #[arg(long)]
    tui: bool,
}

/// `--format`: auto or one of the engine formats.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum FormatArg {
    Auto,
    SglangRouted,
    SglangStat,
    SglangPerPass,
    SglangPerToken,
    VllmEplb,
}

impl FormatArg {
    fn format(self) -> Option<Format> {
        match self {
            FormatArg::Auto => None,
            FormatArg::SglangRouted => Some(Format::SglangRouted),
            FormatArg::SglangStat => Some(Format::SglangStat),
            FormatArg::SglangPerPass => Some(Format::SglangPerPass),
            FormatArg::SglangPerToken => Some(Format::SglangPerToken),
            FormatArg::VllmEplb => Some(Format::VllmEplb),
        }
    }
}

/// The shape a model gives: layers on each engine's axis, experts, and top-k.
struct ModelShape {
    name: String,
    all_layers: usize,
    moe_layers: usize,
    experts: usize,
    top_k: Option<usize>,
}

fn model_shape(path: &std::path::Path) -> Result<ModelShape> {
    let source = crate::model::ModelSource::open(path).bad_input()?;
    let cfg = source.config();
    let top_k = match cfg.default_policy {
        crate::routing::RoutingPolicy::TopK { k, .. } => Some(k),
        _ => None,
    };
    Ok(ModelShape {
        name: path.display().to_string(),
        all_layers: cfg.n_layers,
        moe_layers: cfg.moe_layer_indices().len(),
        experts: cfg.n_experts,
        top_k,
    })
}

/// Checks the dump's layer and expert counts against the model's, naming both.
fn check_against(dump: &Dump, file: &std::path::Path, m: &ModelShape) -> Result<()> {
    let (layers, axis) = if dump.format.layers_are_all_layers() {
        (m.all_layers, "layers")
    } else {
        (m.moe_layers, "MoE layers")
    };
    if dump.n_layers != layers || dump.n_experts != m.experts {
        return Err(anyhow::anyhow!(
            "{}: the {} dump has {} layers × {} experts, but the model {} has {layers} {axis} × {} experts",
            file.display(),
            dump.format,
            dump.n_layers,
            dump.n_experts,
            m.name,
            m.experts
        ))
        .bad_input();
    }
    Ok(())
}

/// Reads the dump, prints (or shows) the summary and writes the report.
pub fn run(a: ImportArgs) -> Result<ExitCode> {
    if let Some(t) = a.threshold
        && !(t > 0.0 && t <= 1.0)
    {
        return Err(usage(format!("--threshold must be in (0, 1], found {t}")));
    }
    if a.gpus == Some(0) {
        return Err(usage("--gpus must be at least 1"));
    }
    if let Some(path) = &a.report {
        report_kind(path)?;
        crate::atomic_file::check_target(path, a.force).usage()?;
    }
    let model = a.model.as_deref().map(model_shape).transpose()?;
    let hints = Hints {
        layers: a.layers.or(model.as_ref().map(|m| m.all_layers)),
        top_k: a.top_k.or(model.as_ref().and_then(|m| m.top_k)),
        experts: a.experts.or(model.as_ref().map(|m| m.experts)),
    };
    let format = a.format.and_then(FormatArg::format);
    let dump = crate::import::read(&a.file, format, hints).bad_input()?;
    if let Some(m) = &model {
        check_against(&dump, &a.file, m)?;
    }
    if let Some(e) = a.experts
        && e != dump.n_experts
    {
        return Err(anyhow::anyhow!(
            "{}: the {} dump has {} experts per layer, --experts says {e}",
            a.file.display(),
            dump.format,
            dump.n_experts
        ))
        .bad_input();
    }
    let placement = match (&a.placement, a.gpus) {
        (Some(spec), _) => PlacementChoice::Spec(spec.clone()),
        (None, Some(n)) => PlacementChoice::Gpus(n),
        (None, None) => PlacementChoice::None,
    };
    let summary = summarize(
        &dump,
        &a.file.display().to_string(),
        &placement,
        a.threshold,
    )
    .map_err(usage)?;
    if let Some(path) = &a.report {
        let text = match report_kind(path)? {
            "json" => crate::report::import::json(&summary),
            "md" => crate::report::import::markdown(&summary),
            _ => crate::report::import::html(&summary),
        };
        crate::atomic_file::write_atomically(path, text.as_bytes(), a.force)?;
        eprintln!("wrote {}", path.display());
    }
    if a.tui {
        crate::tui::render::import::run(&summary)?;
    } else {
        super::print_stdout(&crate::report::import::text(&summary))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn report_kind(path: &std::path::Path) -> Result<&'static str> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("json") => Ok("json"),
        Some("md") | Some("markdown") => Ok("md"),
        Some("html") | Some("htm") => Ok("html"),
        _ => Err(usage(format!(
            "--report {}: use a .json, .md or .html name",
            path.display()
        ))),
    }
}
