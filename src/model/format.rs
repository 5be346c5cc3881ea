//! The file format: reading and checking a safetensors file against its configuration, and
//! writing one (atomically). See `docs/model-format.md`.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors, View};

use super::config::{
    METADATA_KEY, ModelConfig, NormKind, PositionKind, TOKENIZER_KEY, TokenizerKind,
};

/// Everything that can go wrong opening a model. Every message names the file, and the tensor or
/// field when there is one, with expected versus found.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The path does not exist or cannot be opened.
    #[error("{path}: cannot open the model file: {io}")]
    Open {
        /// The model path.
        path: PathBuf,
        /// The OS error (shown in the message, so not chained as a source).
        io: std::io::Error,
    },
    /// The path is a directory, a FIFO, a device or a socket.
    #[error("{path}: is {kind}, not a .safetensors file or a checkpoint directory")]
    NotAFile {
        /// The model path.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// Zero bytes.
    #[error("{path}: the file is empty (0 bytes); expected a safetensors model")]
    Empty {
        /// The model path.
        path: PathBuf,
    },
    /// Too short to hold the 8-byte header length, or data shorter than the header says.
    #[error("{path}: the file is truncated: {detail}")]
    Truncated {
        /// The model path.
        path: PathBuf,
        /// What was expected versus found.
        detail: String,
    },
    /// The header is not valid safetensors JSON.
    #[error("{path}: corrupt safetensors header: {detail}")]
    CorruptHeader {
        /// The model path.
        path: PathBuf,
        /// Parser message.
        detail: String,
    },
    /// No `xmoe_config` metadata and no `config.json` beside the file.
    #[error(
        "{path}: no model configuration: the header has no `__metadata__[\"{METADATA_KEY}\"]` and {config_json} does not exist"
    )]
    NoConfig {
        /// The model path.
        path: PathBuf,
        /// The config.json that was looked for.
        config_json: PathBuf,
    },
    /// The configuration is not valid.
    #[error("{path}: {problem}")]
    Config {
        /// Where the configuration came from.
        path: PathBuf,
        /// What is wrong.
        problem: super::config::ConfigError,
    },
    /// A tensor the configuration calls for is missing.
    #[error("{path}: missing tensor `{tensor}` (expected shape {expected:?})")]
    MissingTensor {
        /// The model path.
        path: PathBuf,
        /// Tensor name.
        tensor: String,
        /// Expected shape.
        expected: Vec<usize>,
    },
    /// A tensor has the wrong shape.
    #[error("{path}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    WrongShape {
        /// The model path.
        path: PathBuf,
        /// Tensor name.
        tensor: String,
        /// Expected shape.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// A tensor has an unsupported dtype.
    #[error("{path}: tensor `{tensor}` has dtype {found}, expected F32, F16 or BF16")]
    WrongDtype {
        /// The model path.
        path: PathBuf,
        /// Tensor name.
        tensor: String,
        /// Dtype in the file.
        found: String,
    },
    /// An MXFP4-quantised tensor (`*_blocks` / `*_scales`) that cannot be read.
    #[error("{path}: MXFP4 tensor `{tensor}`: {detail}")]
    Mxfp4 {
        /// The shard (or checkpoint directory).
        path: PathBuf,
        /// Tensor name.
        tensor: String,
        /// What is wrong, with what was expected and found.
        detail: String,
    },
    /// A router weight is NaN or infinite.
    #[error("{path}: tensor `{tensor}` has a non-finite value ({value}) at flat index {index}")]
    NonFinite {
        /// The model path.
        path: PathBuf,
        /// Tensor name.
        tensor: String,
        /// Flat index of the first bad value.
        index: usize,
        /// The value.
        value: f32,
    },
    /// A Hugging Face checkpoint directory without `config.json`.
    #[error("{dir}: no config.json: not a Hugging Face checkpoint directory")]
    HfNoConfig {
        /// The directory.
        dir: PathBuf,
    },
    /// A checkpoint directory with `config.json` but no `*.safetensors` file.
    #[error("{dir}: no model.safetensors, index or *.safetensors shard")]
    HfNoWeights {
        /// The directory.
        dir: PathBuf,
    },
    /// `config.json` or the shard index is not the JSON expected.
    #[error("{path}: not valid JSON: {detail}")]
    HfConfigJson {
        /// The file.
        path: PathBuf,
        /// Parser message or what is missing.
        detail: String,
    },
    /// A model family this loader does not run.
    #[error("{path}: unsupported {found}; supported model types: {supported}")]
    HfUnknownFamily {
        /// `config.json`.
        path: PathBuf,
        /// The `model_type` (or architecture) found.
        found: String,
        /// The supported `model_type`s.
        supported: String,
    },
    /// A `config.json` key missing, of the wrong type or out of range.
    #[error("{path}: `{key}`: {message}")]
    HfConfigKey {
        /// `config.json`.
        path: PathBuf,
        /// The key.
        key: String,
        /// Expected versus found.
        message: String,
    },
    /// The shard index names a file that does not exist.
    #[error("{index}: names the shard {shard}, which does not exist")]
    MissingShard {
        /// The index file.
        index: PathBuf,
        /// The missing shard.
        shard: PathBuf,
    },
    /// Two shards hold a tensor of the same name.
    #[error("tensor `{tensor}` is in both {first} and {second}")]
    DuplicateTensor {
        /// Tensor name.
        tensor: String,
        /// The first shard holding it.
        first: PathBuf,
        /// The second.
        second: PathBuf,
    },
    /// The weights would not fit in the memory available.
    #[error(
        "{path}: the weights need {need_gib:.1} GiB but only {available_gib:.1} GiB of memory is available; pass --allow-large to try anyway"
    )]
    TooLarge {
        /// The model path.
        path: PathBuf,
        /// Bytes of tensor data, in GiB.
        need_gib: f64,
        /// `MemAvailable`, in GiB.
        available_gib: f64,
    },
    /// A GGUF file (llama.cpp) that cannot be read: bad magic or version, truncated header or
    /// tensor data, a quantisation type that cannot be dequantised, inconsistent metadata.
    #[error("{path}: cannot read the GGUF file: {detail}")]
    Gguf {
        /// The `.gguf` file.
        path: PathBuf,
        /// What was expected versus found.
        detail: String,
    },
    /// The tensor backend failed (device out of memory, CUDA error).
    #[error("{path}: cannot place the weights on the device: {detail}")]
    Device {
        /// The model path.
        path: PathBuf,
        /// Backend message.
        detail: String,
    },
}

/// One tensor's raw bytes as found in the file.
#[derive(Clone, Copy, Debug)]
pub struct RawTensor<'a> {
    /// Storage dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: &'a [usize],
    /// Little-endian bytes.
    pub data: &'a [u8],
}

impl RawTensor<'_> {
    /// Converts to f32 (from F32, F16 or BF16).
    pub fn to_f32(&self) -> Vec<f32> {
        use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
        let n = self.data.len() / (self.dtype.bitsize() / 8).max(1);
        // Aligned data (the usual case: safetensors writers align offsets) converts in bulk with
        // the CPU's conversion instructions; unaligned data falls back to a byte loop.
        match self.dtype {
            Dtype::F32 => {
                // SAFETY: every bit pattern is a valid f32, and `align_to` only yields the
                // aligned middle.
                let (pre, mid, _) = unsafe { self.data.align_to::<f32>() };
                if pre.is_empty() && mid.len() == n {
                    return mid.to_vec();
                }
                self.data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            }
            Dtype::F16 | Dtype::BF16 => {
                // SAFETY: every bit pattern is a valid u16, and `align_to` only yields the
                // aligned middle.
                let (pre, mid, _) = unsafe { self.data.align_to::<u16>() };
                let mut out = vec![0.0f32; n];
                if pre.is_empty() && mid.len() == n && cfg!(target_endian = "little") {
                    if self.dtype == Dtype::F16 {
                        mid.reinterpret_cast::<half::f16>()
                            .convert_to_f32_slice(&mut out);
                    } else {
                        mid.reinterpret_cast::<half::bf16>()
                            .convert_to_f32_slice(&mut out);
                    }
                    return out;
                }
                for (o, b) in out.iter_mut().zip(self.data.chunks_exact(2)) {
                    let bits = u16::from_le_bytes([b[0], b[1]]);
                    *o = if self.dtype == Dtype::F16 {
                        half::f16::from_bits(bits).to_f32()
                    } else {
                        half::bf16::from_bits(bits).to_f32()
                    };
                }
                out
            }
            _ => unreachable!("dtype checked at open"),
        }
    }
}

/// A memory-mapped (or embedded) safetensors file whose header, configuration and tensors have
/// been checked.
pub struct ModelFile {
    path: PathBuf,
    bytes: Bytes,
    config: ModelConfig,
    tensors: HashMap<String, (Dtype, Vec<usize>, std::ops::Range<usize>)>,
    per_expert: Vec<bool>,
    warnings: Vec<String>,
    tokenizer_json: Option<String>,
}

enum Bytes {
    Mapped(Mmap),
    Static(&'static [u8]),
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Static(s) => s,
            Bytes::Owned(v) => v,
        }
    }
}

impl ModelFile {
    /// Opens and checks a model file: header, configuration (metadata or `config.json` beside it)
    /// and every tensor's presence, shape and dtype, before any compute.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let path_buf = path.to_path_buf();
        let meta = std::fs::metadata(path).map_err(|io| LoadError::Open {
            path: path_buf.clone(),
            io,
        })?;
        if !meta.is_file() {
            return Err(LoadError::NotAFile {
                path: path_buf,
                kind: crate::input_file::kind_of(&meta),
            });
        }
        let file = File::open(path).map_err(|io| LoadError::Open {
            path: path_buf.clone(),
            io,
        })?;
        if meta.len() == 0 {
            return Err(LoadError::Empty { path: path_buf });
        }
        // SAFETY: the map is read-only; a file truncated by another process while mapped is
        // outside what any mmap-based loader can defend against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|io| LoadError::Open {
            path: path_buf.clone(),
            io,
        })?;
        let config_json = path.with_file_name("config.json");
        Self::from_bytes(path_buf, Bytes::Mapped(mmap), Some(config_json))
    }

    /// Checks a model embedded in the binary.
    pub fn from_static(name: &str, bytes: &'static [u8]) -> Result<Self, LoadError> {
        Self::from_bytes(PathBuf::from(name), Bytes::Static(bytes), None)
    }

    /// Checks a model file held in memory, as [`ModelFile::open`] does a file on disk but with no
    /// `config.json` beside it (the configuration must be in the header's metadata); `name` is
    /// used in messages. The fuzz targets (`fuzz/`) and `tests/fuzz_regressions.rs` use it.
    pub fn from_vec(name: &str, bytes: Vec<u8>) -> Result<Self, LoadError> {
        Self::from_bytes(PathBuf::from(name), Bytes::Owned(bytes), None)
    }

    fn from_bytes(
        path: PathBuf,
        bytes: Bytes,
        config_json: Option<PathBuf>,
    ) -> Result<Self, LoadError> {
        let data = bytes.as_slice();
        if data.is_empty() {
            return Err(LoadError::Empty { path });
        }
        if data.len() < 8 {
            return Err(LoadError::Truncated {
                path,
                detail: format!(
                    "expected at least 8 bytes for the header length, found {}",
                    data.len()
                ),
            });
        }
        let header_len = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
        if header_len > (data.len() - 8) as u64 {
            return Err(LoadError::Truncated {
                path,
                detail: format!(
                    "the header length field says {header_len} bytes but only {} follow it",
                    data.len() - 8
                ),
            });
        }
        // A file cut short parses as a valid header whose tensors run past the end: call it
        // truncated and name the first tensor cut, rather than a corrupt header.
        if let Ok(text) = std::str::from_utf8(&data[8..8 + header_len as usize])
            && let Ok(meta) = serde_json::from_str::<safetensors::tensor::Metadata>(text)
        {
            let available = data.len() - 8 - header_len as usize;
            let cut = meta
                .tensors()
                .into_iter()
                .filter(|(_, info)| info.data_offsets.1 > available)
                .min_by_key(|(_, info)| info.data_offsets.0);
            if let Some((name, info)) = cut {
                return Err(LoadError::Truncated {
                    path,
                    detail: format!(
                        "tensor `{name}` ends at byte {} of the data, but only {available} bytes of data follow the header",
                        info.data_offsets.1
                    ),
                });
            }
        }
        let (_, metadata) =
            SafeTensors::read_metadata(data).map_err(|e| LoadError::CorruptHeader {
                path: path.clone(),
                detail: e.to_string(),
            })?;
        let data_start = 8 + header_len as usize;
        let config_text = match metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get(METADATA_KEY))
        {
            Some(text) => text.clone(),
            None => match &config_json {
                Some(cj) if cj.is_file() => {
                    crate::input_file::read_to_string(cj, crate::input_file::MAX_JSON_BYTES)
                        .map_err(|io| LoadError::Open {
                            path: cj.clone(),
                            io,
                        })?
                }
                _ => {
                    return Err(LoadError::NoConfig {
                        config_json: config_json
                            .unwrap_or_else(|| PathBuf::from("(embedded: no config.json)")),
                        path,
                    });
                }
            },
        };
        let config = ModelConfig::from_json(&config_text).map_err(|problem| LoadError::Config {
            path: path.clone(),
            problem,
        })?;
        if let Some(&field) = config.hf_only_fields().first() {
            return Err(LoadError::Config {
                path,
                problem: super::config::ConfigError {
                    field,
                    message: "is read from Hugging Face checkpoints only, not from the xmoe format"
                        .into(),
                },
            });
        }

        let tokenizer_json = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get(TOKENIZER_KEY))
            .cloned();
        if config.tokenizer == TokenizerKind::HuggingFace && tokenizer_json.is_none() {
            return Err(LoadError::Config {
                path,
                problem: super::config::ConfigError {
                    field: "tokenizer",
                    message: format!(
                        "\"hugging_face\" needs the tokenizer.json text in the header's `__metadata__[\"{TOKENIZER_KEY}\"]`, which is missing"
                    ),
                },
            });
        }

        let mut tensors = HashMap::new();
        for (name, info) in metadata.tensors() {
            let (start, end) = info.data_offsets;
            let range = data_start + start..data_start + end;
            if range.end > data.len() {
                return Err(LoadError::Truncated {
                    path,
                    detail: format!(
                        "tensor `{name}` ends at byte {} but the file has {} bytes",
                        range.end,
                        data.len()
                    ),
                });
            }
            tensors.insert(name, (info.dtype, info.shape.clone(), range));
        }
        let per_expert: Vec<bool> = (0..config.n_layers)
            .map(|i| {
                config.is_moe_layer(i)
                    && !tensors.contains_key(&format!("layers.{i}.moe.experts.up_proj"))
                    && tensors.contains_key(&format!("layers.{i}.moe.experts.0.up_proj.weight"))
            })
            .collect();
        let expected = expected_tensors(&config, |i| per_expert[i]);
        for (name, shape) in &expected {
            let Some((dtype, found, _)) = tensors.get(name) else {
                return Err(LoadError::MissingTensor {
                    path,
                    tensor: name.clone(),
                    expected: shape.clone(),
                });
            };
            if found != shape {
                return Err(LoadError::WrongShape {
                    path,
                    tensor: name.clone(),
                    expected: shape.clone(),
                    found: found.clone(),
                });
            }
            if !matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                return Err(LoadError::WrongDtype {
                    path,
                    tensor: name.clone(),
                    found: format!("{dtype:?}"),
                });
            }
        }
        let expected_names: std::collections::HashSet<&str> =
            expected.iter().map(|(n, _)| n.as_str()).collect();
        let mut warnings: Vec<String> = tensors
            .keys()
            .filter(|n| !expected_names.contains(n.as_str()))
            .map(|n| {
                format!(
                    "{}: ignoring tensor `{n}`, which the configuration does not use",
                    path.display()
                )
            })
            .collect();
        warnings.sort();
        let file = ModelFile {
            path,
            bytes,
            config,
            tensors,
            per_expert,
            warnings,
            tokenizer_json,
        };
        for i in file.config.moe_layer_indices() {
            file.check_finite(&format!("layers.{i}.moe.router.weight"))?;
        }
        Ok(file)
    }

    fn check_finite(&self, name: &str) -> Result<(), LoadError> {
        let values = self.f32(name);
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(LoadError::NonFinite {
                path: self.path.clone(),
                tensor: name.to_string(),
                index,
                value: values[index],
            });
        }
        Ok(())
    }

    /// The checked configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Where the model came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Non-fatal findings (extra tensors).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The `tokenizer.json` text stored in the header (`"tokenizer": "hugging_face"`).
    pub fn stored_tokenizer(&self) -> Option<&str> {
        self.tokenizer_json.as_deref()
    }

    /// Whether MoE block `layer` stores one tensor per expert.
    pub fn is_per_expert(&self, layer: usize) -> bool {
        self.per_expert[layer]
    }

    /// The raw tensor `name`. Panics if absent: every expected tensor was checked at open.
    pub fn raw(&self, name: &str) -> RawTensor<'_> {
        let (dtype, shape, range) = self
            .tensors
            .get(name)
            .unwrap_or_else(|| panic!("tensor `{name}` was checked at open"));
        RawTensor {
            dtype: *dtype,
            shape,
            data: &self.bytes.as_slice()[range.clone()],
        }
    }

    /// The tensor `name` converted to f32.
    pub fn f32(&self, name: &str) -> Vec<f32> {
        self.raw(name).to_f32()
    }

    /// A table of every tensor in the file: name, dtype, shape, bytes; sorted by name.
    pub fn tensor_table(&self) -> Vec<(String, String, Vec<usize>, usize)> {
        let mut rows: Vec<_> = self
            .tensors
            .iter()
            .map(|(n, (d, s, r))| (n.clone(), format!("{d:?}"), s.clone(), r.len()))
            .collect();
        rows.sort_by_key(|r| natural_key(&r.0));
        rows
    }

    /// Size of the file in bytes.
    pub fn file_bytes(&self) -> usize {
        self.bytes.as_slice().len()
    }
}

/// Whether `path` looks like a safetensors file: an 8-byte little-endian header length that fits
/// in the file, then a JSON object. (A `tokenizer.json` read as such would claim a header of
/// exabytes.)
pub fn is_safetensors(path: &Path) -> bool {
    use std::io::Read;
    let Ok(mut f) = File::open(path) else {
        return false;
    };
    let Ok(len) = f.metadata().map(|m| m.len()) else {
        return false;
    };
    let mut head = [0u8; 9];
    if f.read_exact(&mut head).is_err() {
        return false;
    }
    let header = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
    header.checked_add(8).is_some_and(|end| end <= len) && head[8] == b'{'
}

/// Sort key that orders `layers.10` after `layers.9`.
fn natural_key(s: &str) -> Vec<(String, u64)> {
    s.split('.')
        .map(|p| match p.parse::<u64>() {
            Ok(n) => (String::new(), n),
            Err(_) => (p.to_string(), 0),
        })
        .collect()
}

/// Every tensor a configuration calls for, with its shape. `per_expert(i)` selects the
/// one-tensor-per-expert form for MoE block `i`.
pub fn expected_tensors(
    cfg: &ModelConfig,
    per_expert: impl Fn(usize) -> bool,
) -> Vec<(String, Vec<usize>)> {
    let (d, v, l) = (cfg.d_model, cfg.vocab_size, cfg.max_seq_len);
    let (e, h, hd) = (cfg.n_experts, cfg.expert_hidden, cfg.dense_ffn_hidden);
    let mut t: Vec<(String, Vec<usize>)> = vec![("tok_embeddings.weight".into(), vec![v, d])];
    if cfg.positions == PositionKind::Learned {
        t.push(("pos_embeddings.weight".into(), vec![l, d]));
    }
    let norm = |t: &mut Vec<(String, Vec<usize>)>, prefix: &str| {
        t.push((format!("{prefix}.weight"), vec![d]));
        if cfg.norm == NormKind::LayerNorm {
            t.push((format!("{prefix}.bias"), vec![d]));
        }
    };
    // Grouped-query attention and a head size of its own change the projections' widths; by
    // default both are `d`.
    let (qw, kvw) = (
        cfg.n_heads * cfg.head_dim(),
        cfg.kv_heads() * cfg.head_dim(),
    );
    for i in 0..cfg.n_layers {
        norm(&mut t, &format!("layers.{i}.attn_norm"));
        for (p, out, inp) in [("q", qw, d), ("k", kvw, d), ("v", kvw, d), ("o", d, qw)] {
            t.push((format!("layers.{i}.attn.{p}_proj.weight"), vec![out, inp]));
            if cfg.attn_bias {
                t.push((format!("layers.{i}.attn.{p}_proj.bias"), vec![out]));
            }
        }
        norm(&mut t, &format!("layers.{i}.ffn_norm"));
        if cfg.is_moe_layer(i) {
            t.push((format!("layers.{i}.moe.router.weight"), vec![e, d]));
            let p = format!("layers.{i}.moe.experts");
            if per_expert(i) {
                for x in 0..e {
                    t.push((format!("{p}.{x}.up_proj.weight"), vec![h, d]));
                    if cfg.gated {
                        t.push((format!("{p}.{x}.gate_proj.weight"), vec![h, d]));
                    }
                    t.push((format!("{p}.{x}.down_proj.weight"), vec![d, h]));
                    if cfg.expert_bias {
                        t.push((format!("{p}.{x}.up_proj.bias"), vec![h]));
                        t.push((format!("{p}.{x}.down_proj.bias"), vec![d]));
                    }
                }
            } else {
                t.push((format!("{p}.up_proj"), vec![e, h, d]));
                if cfg.gated {
                    t.push((format!("{p}.gate_proj"), vec![e, h, d]));
                }
                t.push((format!("{p}.down_proj"), vec![e, d, h]));
                if cfg.expert_bias {
                    t.push((format!("{p}.up_bias"), vec![e, h]));
                    t.push((format!("{p}.down_bias"), vec![e, d]));
                }
            }
        } else {
            let p = format!("layers.{i}.ffn");
            t.push((format!("{p}.up_proj.weight"), vec![hd, d]));
            if cfg.gated {
                t.push((format!("{p}.gate_proj.weight"), vec![hd, d]));
            }
            t.push((format!("{p}.down_proj.weight"), vec![d, hd]));
            if cfg.ffn_bias {
                t.push((format!("{p}.up_proj.bias"), vec![hd]));
                if cfg.gated {
                    t.push((format!("{p}.gate_proj.bias"), vec![hd]));
                }
                t.push((format!("{p}.down_proj.bias"), vec![d]));
            }
        }
    }
    norm(&mut t, "norm_f");
    if !cfg.tie_embeddings {
        t.push(("lm_head.weight".into(), vec![v, d]));
    }
    t
}

/// Storage dtype when writing a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreDtype {
    /// 4 bytes per value.
    F32,
    /// 2 bytes per value (IEEE half).
    F16,
    /// 2 bytes per value (bfloat16).
    BF16,
}

struct OwnedView {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &OwnedView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes a model file (configuration in the metadata) atomically: a temporary file in the target
/// directory, then a rename. Refuses to overwrite an existing file unless `force`.
pub fn write_model(
    path: &Path,
    config: &ModelConfig,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    dtype: StoreDtype,
    force: bool,
) -> anyhow::Result<()> {
    write_model_with_tokenizer(path, config, tensors, dtype, force, None)
}

/// [`write_model`], with a `tokenizer.json` text stored in the header under
/// [`TOKENIZER_KEY`] (required when the configuration says `"tokenizer": "hugging_face"`).
pub fn write_model_with_tokenizer(
    path: &Path,
    config: &ModelConfig,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    dtype: StoreDtype,
    force: bool,
    tokenizer_json: Option<&str>,
) -> anyhow::Result<()> {
    config.validate()?;
    anyhow::ensure!(
        (config.tokenizer == TokenizerKind::HuggingFace) == tokenizer_json.is_some(),
        "a model with \"tokenizer\": {:?} {} a stored tokenizer.json",
        config.tokenizer,
        if tokenizer_json.is_some() {
            "cannot have"
        } else {
            "needs"
        }
    );
    let mut views = BTreeMap::new();
    for (name, shape, values) in tensors {
        let n: usize = shape.iter().product();
        anyhow::ensure!(
            n == values.len(),
            "tensor `{name}`: shape {shape:?} needs {n} values, got {}",
            values.len()
        );
        let (dt, data) = match dtype {
            StoreDtype::F32 => (
                Dtype::F32,
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            StoreDtype::F16 => (
                Dtype::F16,
                values
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
            StoreDtype::BF16 => (
                Dtype::BF16,
                values
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
        };
        views.insert(
            name.clone(),
            OwnedView {
                dtype: dt,
                shape: shape.clone(),
                data,
            },
        );
    }
    let mut meta = HashMap::new();
    meta.insert(METADATA_KEY.to_string(), config.to_json());
    if let Some(text) = tokenizer_json {
        meta.insert(TOKENIZER_KEY.to_string(), text.to_string());
    }
    let bytes = safetensors::serialize(views.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))?;
    crate::atomic_file::write_atomically(path, &bytes, force)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversion_is_the_same_aligned_and_unaligned() {
        let values = [0.0f32, -1.5, 3.25, 65504.0, 1e-3, -7.0];
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            let bytes: Vec<u8> = match dtype {
                Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                Dtype::F16 => values
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
                _ => values
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            };
            // One buffer shifted by a byte so that exactly one of the two views is misaligned.
            let mut shifted = vec![0u8; bytes.len() + 1];
            shifted[1..].copy_from_slice(&bytes);
            let shape = [values.len()];
            let a = RawTensor {
                dtype,
                shape: &shape,
                data: &bytes,
            }
            .to_f32();
            let b = RawTensor {
                dtype,
                shape: &shape,
                data: &shifted[1..],
            }
            .to_f32();
            assert_eq!(a, b, "{dtype:?}");
            for (x, v) in a.iter().zip(values) {
                assert!(
                    (x - v).abs() <= 0.01 * v.abs().max(1e-2),
                    "{dtype:?}: {x} vs {v}"
                );
            }
        }
    }
}
