//! llama.cpp's GGUF files: the header and metadata read with candle-core's GGUF reader
//! (`candle_core::quantized::gguf_file`), the tensor index by [`index`] (so that MXFP4, which
//! candle-core 0.11 does not know, can be listed); quantised matrices are kept as stored and
//! multiplied by [`crate::model::quant`] (or dequantised to f32 for the reference). The metadata
//! is mapped onto the same [`HfConfig`] a Hugging Face checkpoint gives and the tensors onto the
//! same blocks ([`build`]); see `docs/gguf.md`.

mod build;
pub mod config;
mod deepseek;
pub mod dense;
mod gptoss;
pub mod index;

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
pub use index::TensorType;
use index::{Entry, HideTensorCount};

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
    /// candle's parse of the metadata (its `tensor_infos` is empty: see [`index`]).
    content: Content,
    tensors: HashMap<String, Entry>,
    data_offset: u64,
    // candle's `TensorInfo::read` wants a `Read + Seek`; the lock makes one file handle usable
    // from a shared `&self` (tensors are read one at a time during a load).
    file: Mutex<File>,
    file_len: u64,
    /// The file mapped read-only, made the first time experts are read in place from it.
    map: std::sync::OnceLock<Arc<memmap2::Mmap>>,
}

/// The error for `path` with `detail`.
pub(crate) fn gguf_error(path: &Path, detail: impl Into<String>) -> LoadError {
    LoadError::Gguf {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// ggml type ids that candle-core 0.11 cannot read, by name (ggml.h `enum ggml_type`), so that
/// the message names the quantisation rather than a number. (39, MXFP4, is read by [`index`].)
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
        40 => "NVFP4",
        41 => "Q1_0",
        42 => "Q2_0",
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
        let mut head = Vec::with_capacity(16);
        (&file).take(16).read_to_end(&mut head).map_err(open_err)?;
        (&file).seek(SeekFrom::Start(0)).map_err(open_err)?;
        let (count, count_at, count_len) = index::tensor_count(&head).unwrap_or((0, 0, 0));
        let version = head
            .get(4..8)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        // The metadata is thousands of small values (a tokenizer's vocabulary): buffered.
        let reader = BufReader::new(file.try_clone().map_err(open_err)?);
        let mut reader = HideTensorCount::new(reader, count_at, count_len);
        // candle-core 0.11.1 divides by `general.alignment` without checking it, so a file that
        // says 0 panics inside `Content::read`; that is bad input, reported like any other. The
        // hook is silenced for the call so that the user gets one line.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let read =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut reader)));
        std::panic::set_hook(hook);
        let content = match read {
            Ok(r) => r.map_err(|e| gguf_error(path, header_detail(&e, file_len)))?,
            Err(panic) => {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                return Err(gguf_error(
                    path,
                    format!(
                        "invalid header: candle-core's GGUF reader failed on the metadata ({why}; a `general.alignment` of 0 does this)"
                    ),
                ));
            }
        };
        let at = reader.position();
        let (tensors, data_offset) = index::read_index(
            reader.inner(),
            at,
            file_len,
            version,
            count,
            &content.metadata,
        )
        .map_err(|e| gguf_error(path, e))?;
        let g = GgufFile {
            path: path.to_path_buf(),
            content,
            tensors,
            data_offset,
            file: Mutex::new(file),
            file_len,
            map: std::sync::OnceLock::new(),
        };
        let mut by_offset: Vec<_> = g.tensors.iter().collect();
        by_offset.sort_by_key(|(_, e)| e.offset);
        for (name, e) in by_offset {
            let start = g.data_offset.saturating_add(e.offset);
            let end = start.checked_add(e.bytes);
            if end.is_none_or(|e| e > file_len) {
                return Err(gguf_error(
                    path,
                    format!(
                        "the file is truncated: tensor `{name}` ({} {:?}, {} bytes at offset {start}) ends past the end of the {file_len}-byte file: only {} bytes remain",
                        e.dtype.name(),
                        e.dims,
                        e.bytes,
                        file_len.saturating_sub(start),
                    ),
                ));
            }
        }
        Ok(g)
    }

    /// The file mapped read-only into memory (once; later calls share the mapping).
    pub fn mapped(&self) -> Result<Arc<memmap2::Mmap>, LoadError> {
        if let Some(m) = self.map.get() {
            return Ok(m.clone());
        }
        let file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: a read-only mapping of a file opened for reading; as for every memory-mapped
        // model file, the file must not be truncated or rewritten while the model is loaded
        // (documented, not enforceable).
        let map = unsafe { memmap2::Mmap::map(&*file) }.map_err(|io| LoadError::Open {
            path: self.path.clone(),
            io,
        })?;
        let map = Arc::new(map);
        Ok(self.map.get_or_init(|| map).clone())
    }

    /// Bytes of the stacked expert tensors (`…_exps.weight`) in F32, F16 or BF16, which the CPU
    /// kernel reads in place from the mapped file; none for `gpt-oss` (its experts have biases
    /// and the clamped SwiGLU, which the kernel does not compute).
    pub fn in_place_expert_bytes(&self) -> usize {
        if self.architecture().is_ok_and(|a| a == "gpt-oss") {
            return 0;
        }
        self.tensors
            .iter()
            .filter(|(name, e)| name.ends_with("_exps.weight") && !e.dtype.is_block())
            .map(|(_, e)| e.bytes as usize)
            .sum()
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

    /// Bytes of tensor data in the file.
    pub fn tensor_bytes(&self) -> usize {
        self.tensors.values().map(|e| e.bytes as usize).sum()
    }

    /// Bytes the weights take once loaded on the CPU (see `build`): matrices as stored;
    /// vectors (norms, biases) and routers widened to f32.
    pub fn resident_bytes(&self) -> usize {
        self.tensors
            .iter()
            .map(|(name, e)| {
                let widened = e.dims.len() < 2
                    || name.ends_with("ffn_gate_inp.weight")
                    || name.ends_with("ffn_gate_inp_shexp.weight")
                    || name.ends_with(".bias");
                if widened {
                    e.dims.iter().product::<usize>() * 4
                } else {
                    e.bytes as usize
                }
            })
            .sum()
    }

    /// Bytes the weights take when every tensor is dequantised to f32 (another device than the
    /// CPU, or [`GgufModel::set_dequantize`]).
    pub fn dequantized_bytes(&self) -> usize {
        self.tensors
            .values()
            .map(|e| e.dims.iter().product::<usize>() * 4)
            .sum()
    }

    /// The file's length.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Every tensor: name, stored type, shape (outermost first, as candle and numpy order it;
    /// GGUF stores the reverse), bytes; sorted by name.
    pub fn tensor_table(&self) -> Vec<(String, String, Vec<usize>, usize)> {
        let mut v: Vec<_> = self
            .tensors
            .iter()
            .map(|(n, e)| (n.clone(), e.dtype.name(), e.dims.clone(), e.bytes as usize))
            .collect();
        v.sort();
        v
    }

    /// Where tensor `name`'s data lies in the file: (first byte, bytes).
    pub fn data_range(&self, name: &str) -> Option<(u64, u64)> {
        self.tensors
            .get(name)
            .map(|e| (self.data_offset.saturating_add(e.offset), e.bytes))
    }

    /// True when the file holds tensor `name`.
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The shape of tensor `name` (outermost first), if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|e| e.dims.as_slice())
    }

    /// The stored type of tensor `name`, if present.
    pub fn dtype(&self, name: &str) -> Option<TensorType> {
        self.tensors.get(name).map(|e| e.dtype)
    }

    /// Names of the tensors.
    pub fn names(&self) -> BTreeSet<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    /// The index entry of `name`, checked against `shape`.
    fn entry(&self, name: &str, shape: &[usize]) -> Result<&Entry, LoadError> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
                expected: shape.to_vec(),
            })?;
        if e.dims != shape {
            return Err(LoadError::WrongShape {
                path: self.path.clone(),
                tensor: name.to_string(),
                expected: shape.to_vec(),
                found: e.dims.clone(),
            });
        }
        Ok(e)
    }

    /// Tensor `name` as stored, checked against `shape`, on the CPU: a candle `QTensor` for
    /// candle's types; MXFP4 tensors are read by [`GgufFile::matrix`] instead.
    pub fn qtensor(&self, name: &str, shape: &[usize]) -> Result<QTensor, LoadError> {
        let e = self.entry(name, shape)?;
        let TensorType::Ggml(ggml_dtype) = e.dtype else {
            return Err(gguf_error(
                &self.path,
                format!(
                    "tensor `{name}` is {}, which candle-core cannot hold as a QTensor",
                    e.dtype.name()
                ),
            ));
        };
        let info = TensorInfo {
            ggml_dtype,
            shape: candle_core::Shape::from(e.dims.clone()),
            offset: e.offset,
        };
        let mut file = self
            .file
            .lock()
            .map_err(|_| gguf_error(&self.path, "the file handle was poisoned by a panic"))?;
        info.read(&mut *file, self.data_offset, &Device::Cpu)
            .map_err(|e| {
                gguf_error(
                    &self.path,
                    format!("tensor `{name}`: {}", candle_message(&e)),
                )
            })
    }

    /// MXFP4 tensor `name` (checked against `shape`) in the project's MXFP4 layout, outer
    /// dimensions flattened into rows: 4.25 bits a value, as in the file.
    fn mxfp4_matrix(&self, name: &str, shape: &[usize]) -> Result<QuantMatrix, LoadError> {
        let e = self.entry(name, shape)?;
        let cols = *shape.last().unwrap_or(&1);
        let rows = shape.iter().product::<usize>() / cols.max(1);
        let blocks = rows * cols / super::hf::mxfp4::BLOCK;
        let start = self.data_offset.saturating_add(e.offset);
        let mut file = self
            .file
            .lock()
            .map_err(|_| gguf_error(&self.path, "the file handle was poisoned by a panic"))?;
        let found = self.file_len.saturating_sub(start);
        let short = |why: String| {
            gguf_error(
                &self.path,
                format!(
                    "tensor `{name}` (MXFP4 {shape:?}): expected {} bytes at offset {start}, found {found} in the file: {why}",
                    e.bytes
                ),
            )
        };
        file.seek(SeekFrom::Start(start))
            .map_err(|io| short(io.to_string()))?;
        let (codes, scales) = index::read_mxfp4(&mut BufReader::new(&mut *file), blocks)
            .map_err(|io| short(io.to_string()))?;
        QuantMatrix::mxfp4(codes, scales, rows, cols).map_err(|err| {
            gguf_error(
                &self.path,
                format!("tensor `{name}` (MXFP4): {}", candle_message(&err)),
            )
        })
    }

    /// Tensor `name`, checked against `shape`, kept as stored on the CPU: ggml blocks as they are,
    /// F16/BF16 in half precision, F32 as f32 (outer dimensions flattened into rows).
    pub fn matrix(&self, name: &str, shape: &[usize]) -> Result<QuantMatrix, LoadError> {
        if self.dtype(name) == Some(TensorType::Mxfp4) {
            return self.mxfp4_matrix(name, shape);
        }
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
        if self.dtype(name) == Some(TensorType::Mxfp4) {
            // Exact: every MXFP4 value is an E2M1 value times a power of two.
            let m = self.mxfp4_matrix(name, shape)?;
            return m
                .dequantize_rows(0, m.rows())
                .and_then(|v| Tensor::from_vec(v, shape, device))
                .map_err(|e| {
                    gguf_error(
                        &self.path,
                        format!(
                            "tensor `{name}`: cannot dequantise MXFP4: {}",
                            candle_message(&e)
                        ),
                    )
                });
        }
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
