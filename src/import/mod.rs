//! Routing recorded by serving engines, read into one shape ([`Dump`]) and summarised
//! ([`analysis`]): SGLang's `return_routed_experts` responses and expert-distribution recorder
//! dumps, and vLLM's EPLB load window (`docs/import-formats.md` says which engine code each format
//! was checked against). Everything here reads bytes and computes; the command line, the text
//! summary, reports and the TUI view only present it.

pub mod analysis;
mod formats;
pub mod torch_file;

use std::fmt;
use std::path::Path;

pub use analysis::{GpuBalance, LayerLoad, Placement, Summary, WhatIf};

/// Largest dump read whole (torch.save archives and JSON responses alike).
pub const MAX_DUMP_BYTES: u64 = 4 << 30;

/// Which engine format a file is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// SGLang `/generate` responses with `meta_info.routed_experts` (base64 int32
    /// [tokens, layers, top_k]), one JSON object, an array of them or JSON Lines.
    SglangRouted,
    /// SGLang expert-distribution recorder, mode `stat`: `logical_count` [steps, layers, experts].
    SglangStat,
    /// SGLang recorder, mode `per_pass`: one `global_physical_count` [layers, physical] per pass.
    SglangPerPass,
    /// SGLang recorder, mode `per_token`: per pass, `topk_ids_of_layer` [layers, tokens, 8].
    SglangPerToken,
    /// vLLM EPLB `expert_load_window` [window, layers, physical] and `physical_to_logical_map`,
    /// saved with torch.save (vLLM itself only logs a balancedness figure).
    VllmEplb,
}

impl Format {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Format::SglangRouted => "sglang-routed",
            Format::SglangStat => "sglang-stat",
            Format::SglangPerPass => "sglang-per-pass",
            Format::SglangPerToken => "sglang-per-token",
            Format::VllmEplb => "vllm-eplb",
        }
    }

    /// Whether the dump's layer axis counts every decoder layer (SGLang sizes its buffers by
    /// `num_hidden_layers`) or only the MoE layers (vLLM's `num_moe_layers`).
    pub fn layers_are_all_layers(self) -> bool {
        !matches!(self, Format::VllmEplb)
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Shape facts a format does not record, given on the command line or taken from `--model`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Hints {
    /// Layers per token in `routed_experts` (SGLang: the model's `num_hidden_layers`).
    pub layers: Option<usize>,
    /// Experts per token in `routed_experts` (the model's `num_experts_per_tok`).
    pub top_k: Option<usize>,
    /// Logical experts per layer, where the dump only holds ids (dumps with counts or a map give
    /// their own, which the caller checks).
    pub experts: Option<usize>,
}

/// Per-physical-expert load with the map from physical slots to logical experts.
#[derive(Clone, Debug, PartialEq)]
pub struct Physical {
    /// Token-expert assignments per layer and physical expert.
    pub load: Vec<Vec<u64>>,
    /// The logical expert each physical expert holds, per layer.
    pub to_logical: Vec<Vec<usize>>,
}

/// Routing read from one engine file.
#[derive(Clone, Debug, PartialEq)]
pub struct Dump {
    /// The format it was read as.
    pub format: Format,
    /// Layers on the dump's layer axis (see [`Format::layers_are_all_layers`]).
    pub n_layers: usize,
    /// Logical experts per layer.
    pub n_experts: usize,
    /// Token-expert assignments per layer and logical expert.
    pub load: Vec<Vec<u64>>,
    /// What the leading axis counted: responses, steps, passes or windows, and how many.
    pub records: (usize, &'static str),
    /// Tokens routed, where the format records tokens.
    pub tokens: Option<u64>,
    /// Experts per token, where the format records it.
    pub top_k: Option<usize>,
    /// Physical-expert load and map, where the format records them.
    pub physical: Option<Physical>,
    /// Facts about the file worth a line in the summary (rank, inferred sizes).
    pub notes: Vec<String>,
}

/// Decides the format from the bytes: JSON is SGLang responses; a torch.save archive is told
/// apart by its keys.
pub fn detect(bytes: &[u8]) -> Result<Format, String> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if matches!(first, Some(b'{') | Some(b'[')) {
        return Ok(Format::SglangRouted);
    }
    if bytes.starts_with(b"PK\x03\x04") {
        let value = torch_file::read(bytes)?;
        return formats::detect_torch(&value);
    }
    if bytes.starts_with(&[0x80]) {
        return Err(
            "a bare pickle (torch.save with _use_new_zipfile_serialization=False, or pickle.dump): only the zip archives torch.save writes by default are read".into(),
        );
    }
    Err("neither JSON (SGLang responses) nor a torch.save archive (SGLang recorder or vLLM EPLB dump)".into())
}

/// Reads `bytes` as `format` (or the detected one).
pub fn parse(bytes: &[u8], format: Option<Format>, hints: Hints) -> Result<Dump, String> {
    let format = match format {
        Some(f) => f,
        None => detect(bytes)?,
    };
    match format {
        Format::SglangRouted => formats::sglang_routed(bytes, hints),
        _ => {
            if !bytes.starts_with(b"PK\x03\x04") {
                return Err(format!(
                    "{format} dumps are torch.save archives (zip), and this file is not one"
                ));
            }
            let value = torch_file::read(bytes)?;
            formats::from_torch(format, &value)
        }
    }
}

/// Reads a torch.save archive's decoded object as `format` (or the one its keys name): the
/// second half of [`parse`], for the fuzzer.
pub fn from_value(value: &torch_file::Value, format: Option<Format>) -> Result<Dump, String> {
    let format = match format {
        Some(Format::SglangRouted) => {
            return Err("sglang-routed is JSON, not a torch.save archive".into());
        }
        Some(f) => f,
        None => formats::detect_torch(value)?,
    };
    formats::from_torch(format, value)
}

/// Reads the dump at `path`; errors name the file.
pub fn read(path: &Path, format: Option<Format>, hints: Hints) -> anyhow::Result<Dump> {
    let bytes = crate::input_file::read(path, MAX_DUMP_BYTES)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    parse(&bytes, format, hints).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}
