//! Hugging Face checkpoints: a directory with `config.json`, `tokenizer.json` and one or many
//! `*.safetensors` shards (with `model.safetensors.index.json` when sharded). Every tensor keeps its
//! stored dtype; see `docs/model-families.md`.
//!
//! Tensors that become candle tensors are read, not memory-mapped: candle's CPU tensors own their
//! storage, so mapped weights would be copied anyway, and the touched file pages would count in
//! the process's resident set next to the copy (measured on a 13.8 GB checkpoint: 22 GB peak
//! instead of 13). Each is read once with a positioned read into its own buffer. The experts,
//! most of the bytes, are the exception: the CPU kernel reads them in place from the mapped
//! shards ([`HfCheckpoint::mapped`], `docs/model-families.md`, "Experts read in place").

pub mod config;
pub mod mxfp4;
pub mod synth;

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::Dtype;

pub use config::{HfConfig, HfFamily, SUPPORTED_MODEL_TYPES};

use super::config::ModelConfig;
use super::format::LoadError;

/// Where one tensor lives.
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    range: std::ops::Range<usize>,
}

/// An opened checkpoint: configuration read, shard headers checked, tensors indexed by name.
pub struct HfCheckpoint {
    dir: PathBuf,
    config: HfConfig,
    model_config: ModelConfig,
    shards: Vec<(PathBuf, File)>,
    /// Each shard's mapping, made the first time an expert is read in place from it.
    maps: Vec<std::sync::OnceLock<std::sync::Arc<memmap2::Mmap>>>,
    tensors: HashMap<String, Entry>,
    tensor_bytes: usize,
}

/// Where a tensor's bytes lie in the checkpoint's files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorPlace {
    /// Index of the shard (see [`HfCheckpoint::mapped`]).
    pub shard: usize,
    /// Byte offset of the tensor's data in the shard file.
    pub offset: usize,
    /// Its stored dtype.
    pub dtype: Dtype,
}

/// True when `path` looks like a Hugging Face checkpoint rather than a file of the project's own
/// format: a directory, an index, or a `.safetensors` file without the `xmoe_config` metadata
/// that has a `config.json` with a `model_type` beside it.
pub fn is_hf_checkpoint(path: &Path) -> bool {
    if path.is_dir() || path.to_string_lossy().ends_with(".index.json") {
        return true;
    }
    let Some(dir) = path.parent() else {
        return false;
    };
    let config = dir.join("config.json");
    let Ok(text) = crate::input_file::read_to_string(&config, crate::input_file::MAX_JSON_BYTES)
    else {
        return false;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    v.get("model_type").is_some() || v.get("architectures").is_some()
}

impl HfCheckpoint {
    /// Opens the checkpoint at `path`: its directory, any of its shards, or its index.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let dir = if path.is_dir() {
            path.to_path_buf()
        } else {
            if !path.exists() {
                return Err(LoadError::Open {
                    path: path.to_path_buf(),
                    io: std::io::Error::from(std::io::ErrorKind::NotFound),
                });
            }
            path.parent()
                .map(Path::to_path_buf)
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or_else(|| PathBuf::from("."))
        };
        let config_path = config::config_path(&dir);
        if !config_path.exists() {
            return Err(LoadError::HfNoConfig { dir });
        }
        let config = HfConfig::read(&config_path)?;
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| config.family.model_type().to_string());
        let model_config = config.model_config(&name);
        let shard_paths = shard_paths(&dir)?;
        let mut shards = Vec::with_capacity(shard_paths.len());
        let mut tensors: HashMap<String, Entry> = HashMap::new();
        let mut tensor_bytes = 0;
        for (i, p) in shard_paths.into_iter().enumerate() {
            crate::input_file::regular_file(&p).map_err(|io| LoadError::Open {
                path: p.clone(),
                io,
            })?;
            let file = File::open(&p).map_err(|io| LoadError::Open {
                path: p.clone(),
                io,
            })?;
            let file_len = file
                .metadata()
                .map_err(|io| LoadError::Open {
                    path: p.clone(),
                    io,
                })?
                .len() as usize;
            let (header_len, meta) =
                read_header(|buf, at| file.read_exact_at(buf, at), file_len, &p)?;
            for t in shard_entries(&p, header_len, &meta, file_len)? {
                if let Some(first) = tensors.get(&t.name) {
                    return Err(LoadError::DuplicateTensor {
                        tensor: t.name,
                        first: shards
                            .get(first.shard)
                            .map_or_else(|| p.clone(), |(fp, _): &(PathBuf, File)| fp.clone()),
                        second: p.clone(),
                    });
                }
                tensor_bytes += t.range.len();
                tensors.insert(
                    t.name,
                    Entry {
                        shard: i,
                        dtype: t.dtype,
                        shape: t.shape,
                        range: t.range,
                    },
                );
            }
            shards.push((p, file));
        }
        Ok(Self {
            dir,
            config,
            model_config,
            maps: shards.iter().map(|_| std::sync::OnceLock::new()).collect(),
            shards,
            tensors,
            tensor_bytes,
        })
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What `config.json` says.
    pub fn hf_config(&self) -> &HfConfig {
        &self.config
    }

    /// The model description the rest of xmoe-top reads.
    pub fn config(&self) -> &ModelConfig {
        &self.model_config
    }

    /// Bytes of tensor data over all shards.
    pub fn tensor_bytes(&self) -> usize {
        self.tensor_bytes
    }

    /// Bytes the weights take once loaded on the CPU: the stored bytes (MXFP4 experts stay
    /// packed, `--moe-dispatch auto`). On another device, or with `--moe-dispatch candle`, MXFP4 experts are
    /// dequantised to bf16 instead: 4 bytes of bf16 per byte of blocks.
    pub fn resident_bytes(&self) -> usize {
        self.tensor_bytes
    }

    /// The shard files.
    pub fn shard_paths(&self) -> Vec<&Path> {
        self.shards.iter().map(|(p, _)| p.as_path()).collect()
    }

    /// Every tensor: name, dtype, shape, bytes; sorted by name.
    pub fn tensor_table(&self) -> Vec<(String, String, Vec<usize>, usize)> {
        let mut v: Vec<_> = self
            .tensors
            .iter()
            .map(|(n, e)| {
                (
                    n.clone(),
                    format!("{:?}", e.dtype),
                    e.shape.clone(),
                    e.range.len(),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// True when the checkpoint holds `name`.
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Names of the tensors, for checking what a build did not use.
    pub fn names(&self) -> BTreeSet<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    /// The entry of tensor `name` and its shard's path, checked against `shape`.
    fn entry(&self, name: &str, shape: &[usize]) -> Result<(&Entry, &PathBuf), LoadError> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor {
                path: self.dir.clone(),
                tensor: name.to_string(),
                expected: shape.to_vec(),
            })?;
        let path = &self.shards[e.shard].0;
        if e.shape != shape {
            return Err(LoadError::WrongShape {
                path: path.clone(),
                tensor: name.to_string(),
                expected: shape.to_vec(),
                found: e.shape.clone(),
            });
        }
        Ok((e, path))
    }

    /// Where tensor `name` lies, checked against `shape` (its bytes were checked against the
    /// shard's length when the checkpoint was opened).
    pub fn place(&self, name: &str, shape: &[usize]) -> Result<TensorPlace, LoadError> {
        let (e, _) = self.entry(name, shape)?;
        Ok(TensorPlace {
            shard: e.shard,
            offset: e.range.start,
            dtype: e.dtype,
        })
    }

    /// Shard `shard` mapped read-only into memory (once; later calls share the mapping).
    pub fn mapped(&self, shard: usize) -> Result<std::sync::Arc<memmap2::Mmap>, LoadError> {
        if let Some(m) = self.maps[shard].get() {
            return Ok(m.clone());
        }
        let (path, file) = &self.shards[shard];
        // SAFETY: the mapping is read-only and private to this process's view of a file it
        // opened for reading; as for every memory-mapped model file (and candle's own
        // safetensors loader), the file must not be truncated or rewritten while the model is
        // loaded: that is documented, not enforceable.
        let map = unsafe { memmap2::Mmap::map(file) }.map_err(|io| LoadError::Open {
            path: path.clone(),
            io,
        })?;
        let map = std::sync::Arc::new(map);
        Ok(self.maps[shard].get_or_init(|| map).clone())
    }

    /// Bytes of the expert matrices a CPU kernel can read in place: routed experts' float
    /// weights (`….experts.….weight`, or the fused `….experts.gate_up_proj` / `down_proj`), not
    /// MXFP4 blocks or shared experts.
    pub fn in_place_expert_bytes(&self) -> usize {
        // gpt-oss experts have biases and the clamped SwiGLU, which the kernel does not compute.
        if self.config.family == HfFamily::GptOss {
            return 0;
        }
        self.tensors
            .iter()
            .filter(|(name, e)| {
                let expert = name.contains(".experts.")
                    && (name.ends_with(".weight")
                        || name.ends_with(".gate_up_proj")
                        || name.ends_with(".down_proj"));
                expert && matches!(e.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16)
            })
            .map(|(_, e)| e.range.len())
            .sum()
    }

    /// The stored bytes of `e`.
    fn read(&self, e: &Entry, path: &Path) -> Result<Vec<u8>, LoadError> {
        let mut bytes = vec![0u8; e.range.len()];
        self.shards[e.shard]
            .1
            .read_exact_at(&mut bytes, e.range.start as u64)
            .map_err(|io| LoadError::Open {
                path: path.to_path_buf(),
                io,
            })?;
        Ok(bytes)
    }

    /// Tensor `name`, checked against `shape`, in its stored dtype on `device`.
    pub fn tensor(
        &self,
        name: &str,
        shape: &[usize],
        device: &Device,
    ) -> Result<Tensor, LoadError> {
        let (e, path) = self.entry(name, shape)?;
        let dtype = match e.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => {
                return Err(LoadError::WrongDtype {
                    path: path.clone(),
                    tensor: name.to_string(),
                    found: format!("{other:?}"),
                });
            }
        };
        let bytes = self.read(e, path)?;
        Tensor::from_raw_buffer(&bytes, dtype, shape, device).map_err(|err| LoadError::Device {
            path: path.clone(),
            detail: err.to_string(),
        })
    }

    /// The bytes of u8 tensor `name`, checked against `shape`.
    pub fn bytes_u8(&self, name: &str, shape: &[usize]) -> Result<Vec<u8>, LoadError> {
        let (e, path) = self.entry(name, shape)?;
        if e.dtype != Dtype::U8 {
            return Err(LoadError::Mxfp4 {
                path: path.clone(),
                tensor: name.to_string(),
                detail: format!("dtype {:?}, expected U8", e.dtype),
            });
        }
        self.read(e, path)
    }

    /// The MXFP4 tensor stored as `{name}_blocks` `[E, rows, cols / 32, 16]` and `{name}_scales`
    /// `[E, rows, cols / 32]`, dequantised to bf16 `[E, rows, cols]` (gpt-oss experts; see
    /// [`mxfp4`]). `cols` must be a multiple of 32.
    pub fn mxfp4_bf16(
        &self,
        name: &str,
        experts: usize,
        rows: usize,
        cols: usize,
        device: &Device,
    ) -> Result<Tensor, LoadError> {
        if !cols.is_multiple_of(mxfp4::BLOCK) {
            return Err(LoadError::Mxfp4 {
                path: self.dir.clone(),
                tensor: format!("{name}_blocks"),
                detail: format!(
                    "rows of {cols} values, expected a multiple of {} (one scale per {} values)",
                    mxfp4::BLOCK,
                    mxfp4::BLOCK
                ),
            });
        }
        let groups = cols / mxfp4::BLOCK;
        let blocks = self.bytes_u8(
            &format!("{name}_blocks"),
            &[experts, rows, groups, mxfp4::BLOCK / 2],
        )?;
        let scales = self.bytes_u8(&format!("{name}_scales"), &[experts, rows, groups])?;
        let values = mxfp4::dequantize(&blocks, &scales);
        let bytes = values.len() * 2;
        // On a GPU this is where a checkpoint too large for its memory fails (bf16 takes 16 bits a
        // weight against MXFP4's 4.25): say which tensor and how much it needed.
        Tensor::from_vec(values, (experts, rows, cols), device).map_err(|err| LoadError::Mxfp4 {
            path: self.dir.clone(),
            tensor: format!("{name}_blocks"),
            detail: format!(
                "dequantised to bf16 ({:.2} GiB) on {:?}: {err}",
                bytes as f64 / f64::from(1u32 << 30),
                device.location()
            ),
        })
    }

    /// Tensor `name` widened to f32 (norm weights, routers: small and used in f32).
    pub fn tensor_f32(
        &self,
        name: &str,
        shape: &[usize],
        device: &Device,
    ) -> Result<Tensor, LoadError> {
        let t = self.tensor(name, shape, device)?;
        t.to_dtype(DType::F32).map_err(|err| LoadError::Device {
            path: self.dir.clone(),
            detail: err.to_string(),
        })
    }
}

/// One tensor of a shard, as its header declares it (checked against the file's length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardTensor {
    /// The tensor's name.
    pub name: String,
    /// Its stored dtype.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its bytes in the shard file (from the file's start, not the data section's).
    pub range: std::ops::Range<usize>,
}

/// Checks the header of one safetensors shard as [`HfCheckpoint::open`] does, from the file's
/// first bytes `head` (the 8-byte length and the header it declares; more is ignored) and the
/// file's whole length `file_len`; `path` is for messages. The fuzz targets (`fuzz/`) and
/// `tests/fuzz_regressions.rs` use it.
pub fn check_shard_header(
    path: &Path,
    head: &[u8],
    file_len: usize,
) -> Result<Vec<ShardTensor>, LoadError> {
    let read_at = |buf: &mut [u8], at: u64| -> std::io::Result<()> {
        let at = usize::try_from(at).map_err(std::io::Error::other)?;
        let src = at
            .checked_add(buf.len())
            .and_then(|end| head.get(at..end))
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    };
    let (header_len, meta) = read_header(read_at, file_len, path)?;
    shard_entries(path, header_len, &meta, file_len)
}

/// The tensors a shard's header declares, each checked: its byte count matches its shape and
/// dtype, and it lies within the `file_len`-byte file.
fn shard_entries(
    path: &Path,
    header_len: usize,
    meta: &safetensors::tensor::Metadata,
    file_len: usize,
) -> Result<Vec<ShardTensor>, LoadError> {
    let data_start = 8 + header_len;
    let mut out = Vec::new();
    for (name, info) in meta.tensors() {
        let (start, end) = info.data_offsets;
        let range = data_start + start..data_start + end;
        let elements: usize = info.shape.iter().product();
        if elements * info.dtype.bitsize() / 8 != range.len() {
            return Err(LoadError::CorruptHeader {
                path: path.to_path_buf(),
                detail: format!(
                    "tensor `{name}` has shape {:?} of {:?} ({} bytes) but {} bytes of data",
                    info.shape,
                    info.dtype,
                    elements * info.dtype.bitsize() / 8,
                    range.len()
                ),
            });
        }
        if range.end > file_len {
            return Err(LoadError::Truncated {
                path: path.to_path_buf(),
                detail: format!(
                    "tensor `{name}` ends at byte {} but the file has {file_len} bytes",
                    range.end
                ),
            });
        }
        out.push(ShardTensor {
            name,
            dtype: info.dtype,
            shape: info.shape.clone(),
            range,
        });
    }
    Ok(out)
}

/// The header of a safetensors file of `file_len` bytes, read with `read_at` (a positioned read
/// of exactly the buffer's length): its length and what it says.
fn read_header(
    read_at: impl Fn(&mut [u8], u64) -> std::io::Result<()>,
    file_len: usize,
    path: &Path,
) -> Result<(usize, safetensors::tensor::Metadata), LoadError> {
    let corrupt = |detail: String| LoadError::CorruptHeader {
        path: path.to_path_buf(),
        detail,
    };
    let mut len = [0u8; 8];
    if file_len < 8 {
        return Err(LoadError::Truncated {
            path: path.to_path_buf(),
            detail: format!("{file_len} bytes, fewer than the 8-byte header length"),
        });
    }
    read_at(&mut len, 0).map_err(|e| corrupt(e.to_string()))?;
    let n = u64::from_le_bytes(len) as usize;
    if n > file_len - 8 || n > 100_000_000 {
        return Err(corrupt(format!(
            "header length {n} does not fit in the {file_len}-byte file"
        )));
    }
    let mut head = vec![0u8; n];
    read_at(&mut head, 8).map_err(|e| corrupt(e.to_string()))?;
    let text = std::str::from_utf8(&head).map_err(|e| corrupt(e.to_string()))?;
    let meta: safetensors::tensor::Metadata =
        serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))?;
    Ok((n, meta))
}

/// The shard file names that the text of `model.safetensors.index.json` (at `index`, for
/// messages) maps tensors to, each once and sorted. [`HfCheckpoint::open`] reads the index
/// through it; the fuzz targets (`fuzz/`) and `tests/fuzz_regressions.rs` use it too.
pub fn index_shard_files(index: &Path, text: &str) -> Result<BTreeSet<String>, LoadError> {
    let bad = |detail: String| LoadError::HfConfigJson {
        path: index.to_path_buf(),
        detail,
    };
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut files = BTreeSet::new();
    for (tensor, file) in map {
        let f = file.as_str().ok_or_else(|| {
            bad(format!(
                "`weight_map[\"{tensor}\"]` is {file}, not a file name"
            ))
        })?;
        // A shard is a file of the checkpoint directory (or below it): an absolute name or `..`
        // would read a file elsewhere.
        let inside = !f.is_empty()
            && Path::new(f)
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !inside {
            return Err(bad(format!(
                "`weight_map[\"{tensor}\"]` is {file}, not a file name inside the checkpoint directory"
            )));
        }
        files.insert(f.to_string());
    }
    Ok(files)
}

/// The shard files of the checkpoint in `dir`: those the index names, else `model.safetensors`,
/// else every `*.safetensors` file.
fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = crate::input_file::read_to_string(&index, crate::input_file::MAX_JSON_BYTES)
            .map_err(|io| LoadError::Open {
                path: index.clone(),
                io,
            })?;
        let mut out = Vec::new();
        for f in index_shard_files(&index, &text)? {
            let p = dir.join(&f);
            if !p.is_file() {
                return Err(LoadError::MissingShard {
                    index: index.clone(),
                    shard: p,
                });
            }
            out.push(p);
        }
        return Ok(out);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|io| LoadError::Open {
            path: dir.to_path_buf(),
            io,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    out.sort();
    if out.is_empty() {
        return Err(LoadError::HfNoWeights {
            dir: dir.to_path_buf(),
        });
    }
    Ok(out)
}
