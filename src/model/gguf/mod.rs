//! llama.cpp's GGUF files: the header, metadata and tensor index read with candle-core's GGUF
//! reader (`candle_core::quantized::gguf_file`); quantised matrices are kept as stored and
//! multiplied by [`crate::model::quant`] (or dequantised to f32 for the reference). The metadata is mapped onto the same [`HfConfig`] a Hugging Face
//! checkpoint gives and the tensors onto the same blocks ([`build`]); see `docs/gguf.md`.

mod build;
pub mod config;
mod deepseek;
pub mod dense;

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

pub use build::build;
pub use config::{GgufArch, SUPPORTED_ARCHITECTURES};
pub use dense::{DenseLlama, DenseLlamaConfig};

use super::config::ModelConfig;
use super::format::LoadError;
use super::hf::HfConfig;
use super::quant::QuantMatrix;

/// True when `path` names a GGUF file: by its extension, or (for any other name) by its first
/// four bytes `GGUF`.
pub fn is_gguf(path: &Path) -> bool {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return true;
    }
    if !path.is_file() {
        return false;
    }
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

/// An opened GGUF file: header and metadata read, tensors indexed, nothing loaded yet.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    // candle's `TensorInfo::read` wants a `Read + Seek`; the lock makes one file handle usable
    // from a shared `&self` (tensors are read one at a time during a load).
    file: Mutex<File>,
    file_len: u64,
}

/// The error for `path` with `detail`.
pub(crate) fn gguf_error(path: &Path, detail: impl Into<String>) -> LoadError {
    LoadError::Gguf {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// ggml type ids that candle-core 0.11 cannot read, by name (ggml.h `enum ggml_type`), so that
/// the message names the quantisation rather than a number.
fn ggml_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        4 => "Q4_2 (removed from ggml)",
        5 => "Q4_3 (removed from ggml)",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

/// candle's message without the backtrace it appends when `RUST_BACKTRACE` is set: the user
/// gets one line.
pub(crate) fn candle_message(err: &candle_core::Error) -> String {
    match err {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        other => other.to_string(),
    }
}

/// candle's message for a header it refused, made to say what a user can act on.
fn header_detail(err: &candle_core::Error, file_len: u64) -> String {
    let text = candle_message(err);
    if let Some(id) = text
        .strip_prefix("unknown dtype for tensor ")
        .and_then(|n| n.trim().parse::<u32>().ok())
    {
        let name = ggml_type_name(id).unwrap_or("unknown");
        return format!(
            "a tensor has ggml type {id} ({name}), which cannot be dequantised (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K)"
        );
    }
    if text.starts_with("unknown magic") {
        return format!("not a GGUF file ({text}; expected the bytes \"GGUF\")");
    }
    if text.contains("failed to fill whole buffer") || text.contains("UnexpectedEof") {
        return format!(
            "the header is truncated: it runs past the end of the {file_len}-byte file"
        );
    }
    format!("invalid header: {text}")
}

impl GgufFile {
    /// Opens and checks `path`: magic, version, metadata and tensor index (candle's reader
    /// bounds every length by the file's size), and that every tensor's data lies in the file.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let open_err = |io| LoadError::Open {
            path: path.to_path_buf(),
            io,
        };
        crate::input_file::regular_file(path).map_err(open_err)?;
        let file = File::open(path).map_err(open_err)?;
        let file_len = file.metadata().map_err(open_err)?.len();
        if file_len < 8 {
            return Err(gguf_error(
                path,
                format!(
                    "the file is truncated: {file_len} bytes, fewer than the 8 of the magic and version"
                ),
            ));
        }
        // The metadata is thousands of small values (a tokenizer's vocabulary): buffered.
        let mut reader = BufReader::new(file.try_clone().map_err(open_err)?);
        let content = Content::read(&mut reader)
            .map_err(|e| gguf_error(path, header_detail(&e, file_len)))?;
        let g = GgufFile {
            path: path.to_path_buf(),
            content,
            file: Mutex::new(file),
            file_len,
        };
        for (name, info) in &g.content.tensor_infos {
            let end = g
                .content
                .tensor_data_offset
                .checked_add(info.offset)
                .and_then(|s| s.checked_add(g.stored_bytes(info) as u64));
            if end.is_none_or(|e| e > file_len) {
                return Err(gguf_error(
                    path,
                    format!(
                        "the file is truncated: tensor `{name}` ({:?} {:?}, {} bytes at offset {}) ends past the end of the {file_len}-byte file",
                        info.ggml_dtype,
                        info.shape.dims(),
                        g.stored_bytes(info),
                        g.content.tensor_data_offset.saturating_add(info.offset),
                    ),
                ));
            }
        }
        Ok(g)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The metadata, by key.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str, LoadError> {
        match self.metadata().get("general.architecture") {
            Some(Value::String(s)) => Ok(s),
            Some(v) => Err(gguf_error(
                &self.path,
                format!("metadata `general.architecture` is {v:?}, expected a string"),
            )),
            None => Err(gguf_error(
                &self.path,
                "metadata `general.architecture` is missing",
            )),
        }
    }

    /// `general.name`, else the file's stem.
    pub fn model_name(&self) -> String {
        match self.metadata().get("general.name") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => self
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "gguf".into()),
        }
    }

    fn stored_bytes(&self, info: &TensorInfo) -> usize {
        info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size()
    }

    /// Bytes of tensor data in the file.
    pub fn tensor_bytes(&self) -> usize {
        self.content
            .tensor_infos
            .values()
            .map(|i| self.stored_bytes(i))
            .sum()
    }

    /// Bytes the weights take once loaded on the CPU (see `build`): matrices as stored;
    /// vectors (norms, biases) and routers widened to f32.
    pub fn resident_bytes(&self) -> usize {
        self.content
            .tensor_infos
            .iter()
            .map(|(name, i)| {
                let widened = i.shape.rank() < 2
                    || name.ends_with("ffn_gate_inp.weight")
                    || name.ends_with("ffn_gate_inp_shexp.weight");
                if widened {
                    i.shape.elem_count() * 4
                } else {
                    self.stored_bytes(i)
                }
            })
            .sum()
    }

    /// Bytes the weights take when every tensor is dequantised to f32 (another device than the
    /// CPU, or [`GgufModel::set_dequantize`]).
    pub fn dequantized_bytes(&self) -> usize {
        self.content
            .tensor_infos
            .values()
            .map(|i| i.shape.elem_count() * 4)
            .sum()
    }

    /// The file's length.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Every tensor: name, ggml type, shape (outermost first, as candle and numpy order it; GGUF
    /// stores the reverse), bytes; sorted by name.
    pub fn tensor_table(&self) -> Vec<(String, String, Vec<usize>, usize)> {
        let mut v: Vec<_> = self
            .content
            .tensor_infos
            .iter()
            .map(|(n, i)| {
                (
                    n.clone(),
                    format!("{:?}", i.ggml_dtype),
                    i.shape.dims().to_vec(),
                    self.stored_bytes(i),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// True when the file holds tensor `name`.
    pub fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The shape of tensor `name` (outermost first), if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.content.tensor_infos.get(name).map(|i| i.shape.dims())
    }

    /// The ggml type of tensor `name`, if present.
    pub fn dtype(&self, name: &str) -> Option<GgmlDType> {
        self.content.tensor_infos.get(name).map(|i| i.ggml_dtype)
    }

    /// Names of the tensors.
    pub fn names(&self) -> BTreeSet<&str> {
        self.content
            .tensor_infos
            .keys()
            .map(String::as_str)
            .collect()
    }

    /// Tensor `name` as stored (quantised or not), checked against `shape`, on the CPU.
    pub fn qtensor(&self, name: &str, shape: &[usize]) -> Result<QTensor, LoadError> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
                expected: shape.to_vec(),
            })?;
        if info.shape.dims() != shape {
            return Err(LoadError::WrongShape {
                path: self.path.clone(),
                tensor: name.to_string(),
                expected: shape.to_vec(),
                found: info.shape.dims().to_vec(),
            });
        }
        let mut file = self
            .file
            .lock()
            .map_err(|_| gguf_error(&self.path, "the file handle was poisoned by a panic"))?;
        info.read(&mut *file, self.content.tensor_data_offset, &Device::Cpu)
            .map_err(|e| {
                gguf_error(
                    &self.path,
                    format!("tensor `{name}`: {}", candle_message(&e)),
                )
            })
    }

    /// Tensor `name`, checked against `shape`, kept as stored on the CPU: ggml blocks as they are,
    /// F16/BF16 in half precision, F32 as f32 (outer dimensions flattened into rows).
    pub fn matrix(&self, name: &str, shape: &[usize]) -> Result<QuantMatrix, LoadError> {
        let q = self.qtensor(name, shape)?;
        let dtype = q.dtype();
        let bad = |e: candle_core::Error| {
            gguf_error(
                &self.path,
                format!("tensor `{name}` ({dtype:?}): {}", candle_message(&e)),
            )
        };
        match dtype {
            GgmlDType::F32 => QuantMatrix::float(q.dequantize(&Device::Cpu).map_err(bad)?),
            GgmlDType::F16 => QuantMatrix::float(q.dequantize_f16(&Device::Cpu).map_err(bad)?),
            GgmlDType::BF16 => QuantMatrix::float(
                q.dequantize(&Device::Cpu)
                    .and_then(|t| t.to_dtype(DType::BF16))
                    .map_err(bad)?,
            ),
            _ => QuantMatrix::ggml(Arc::new(q)),
        }
        .map_err(bad)
    }

    /// Tensor `name`, checked against `shape`, dequantised to f32 on `device`.
    pub fn tensor(
        &self,
        name: &str,
        shape: &[usize],
        device: &Device,
    ) -> Result<Tensor, LoadError> {
        let q = self.qtensor(name, shape)?;
        let dtype = q.dtype();
        q.dequantize(device).map_err(|e| {
            gguf_error(
                &self.path,
                format!(
                    "tensor `{name}`: cannot dequantise {dtype:?}: {}",
                    candle_message(&e)
                ),
            )
        })
    }

    /// The configuration the metadata describes (MoE architectures only; see
    /// [`DenseLlama`] for a dense `llama` file).
    pub fn hf_config(&self) -> Result<HfConfig, LoadError> {
        config::hf_config(self)
    }
}

/// An opened GGUF MoE model: the file and the configuration mapped from its metadata.
pub struct GgufModel {
    file: GgufFile,
    arch: GgufArch,
    config: HfConfig,
    model_config: ModelConfig,
    dequantize: bool,
}

impl GgufModel {
    /// Opens `path` and maps its metadata onto a configuration; the tensors are checked when
    /// the model is built.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let file = GgufFile::open(path)?;
        let arch = GgufArch::of(&file)?;
        let config = file.hf_config()?;
        let model_config = config.model_config(&file.model_name());
        Ok(GgufModel {
            file,
            arch,
            config,
            model_config,
            dequantize: false,
        })
    }

    /// Loads every tensor dequantised to f32 instead of keeping matrices as stored: 4 bytes a
    /// weight, the reference the quantised products are tested against.
    pub fn set_dequantize(&mut self, on: bool) {
        self.dequantize = on;
    }

    /// True when [`GgufModel::set_dequantize`] asked for f32 weights.
    pub fn dequantizes(&self) -> bool {
        self.dequantize
    }

    /// The file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The architecture (`general.architecture`).
    pub fn arch(&self) -> GgufArch {
        self.arch
    }

    /// The configuration in Hugging Face terms.
    pub fn hf_config(&self) -> &HfConfig {
        &self.config
    }

    /// The model description the rest of xmoe-top reads.
    pub fn config(&self) -> &ModelConfig {
        &self.model_config
    }
}
