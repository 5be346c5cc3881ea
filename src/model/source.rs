//! Where a model comes from: a file of the project's own format or a Hugging Face checkpoint.
//! One `open` decides which from the path, so every command takes either.

use std::path::{Path, PathBuf};

use super::config::ModelConfig;
use super::format::{LoadError, ModelFile};
use super::gguf::{GgufModel, is_gguf};
use super::hf::{HfCheckpoint, is_hf_checkpoint};

/// An opened and checked model, not yet loaded onto a device.
pub enum ModelSource {
    /// The project's own `.safetensors` format.
    Xmoe(ModelFile),
    /// A Hugging Face checkpoint directory.
    HuggingFace(HfCheckpoint),
    /// A llama.cpp GGUF file.
    Gguf(Box<GgufModel>),
}

impl ModelSource {
    /// Opens `path`: a Hugging Face checkpoint (a directory, its index, or one of its shards) or
    /// a model file of the project's own format.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        if is_gguf(path) {
            GgufModel::open(path).map(|g| ModelSource::Gguf(Box::new(g)))
        } else if is_hf_checkpoint(path) {
            HfCheckpoint::open(path).map(ModelSource::HuggingFace)
        } else {
            ModelFile::open(path).map(ModelSource::Xmoe)
        }
    }

    /// The model description.
    pub fn config(&self) -> &ModelConfig {
        match self {
            ModelSource::Xmoe(f) => f.config(),
            ModelSource::HuggingFace(c) => c.config(),
            ModelSource::Gguf(g) => g.config(),
        }
    }

    /// The path the model was opened from (the file, or the checkpoint directory).
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Xmoe(f) => f.path(),
            ModelSource::HuggingFace(c) => c.dir(),
            ModelSource::Gguf(g) => g.file().path(),
        }
    }

    /// Findings at open that did not stop it.
    pub fn warnings(&self) -> &[String] {
        match self {
            ModelSource::Xmoe(f) => f.warnings(),
            ModelSource::HuggingFace(_) | ModelSource::Gguf(_) => &[],
        }
    }

    /// Bytes of the model file, or of all the tensor data of a checkpoint.
    pub fn file_bytes(&self) -> usize {
        match self {
            ModelSource::Xmoe(f) => f.file_bytes(),
            ModelSource::HuggingFace(c) => c.tensor_bytes(),
            ModelSource::Gguf(g) => g.file().tensor_bytes(),
        }
    }

    /// The `tokenizer.json` that goes with the model, if it has one (for a GGUF file, the file
    /// itself: its tokenizer is in its metadata; likewise a model file with a stored tokenizer).
    pub fn tokenizer_path(&self) -> Option<PathBuf> {
        match self {
            ModelSource::Xmoe(f) => f.stored_tokenizer().map(|_| f.path().to_path_buf()),
            ModelSource::HuggingFace(c) => Some(c.dir().join("tokenizer.json")),
            ModelSource::Gguf(g) => Some(g.file().path().to_path_buf()),
        }
    }

    /// Every tensor: name, dtype, shape, bytes; sorted by name.
    pub fn tensor_table(&self) -> Vec<(String, String, Vec<usize>, usize)> {
        match self {
            ModelSource::Xmoe(f) => f.tensor_table(),
            ModelSource::HuggingFace(c) => c.tensor_table(),
            ModelSource::Gguf(g) => g.file().tensor_table(),
        }
    }
}

impl ModelSource {
    /// Bytes the loaded weights take in memory: a checkpoint keeps its stored dtype (MXFP4 experts
    /// become bf16); the project's own format and GGUF files (dequantised) are widened to f32.
    pub fn resident_weight_bytes(&self) -> usize {
        match self {
            ModelSource::Xmoe(f) => f
                .tensor_table()
                .iter()
                .map(|(_, _, shape, _)| shape.iter().product::<usize>() * 4)
                .sum(),
            ModelSource::HuggingFace(c) => c.resident_bytes(),
            ModelSource::Gguf(g) => g.file().resident_bytes(),
        }
    }

    /// Bytes of expert weights the CPU kernel will read in place from the mapped files rather
    /// than hold in memory of its own, when `in_place` (see [`super::LoadOptions`]).
    pub fn in_place_bytes(&self, in_place: bool) -> usize {
        match self {
            ModelSource::HuggingFace(c) if in_place => c.in_place_expert_bytes(),
            ModelSource::Gguf(g) if in_place => g.file().in_place_expert_bytes(),
            _ => 0,
        }
    }

    /// Refuses, before anything is loaded, a model whose weights need more than `available`
    /// bytes (default: the system's `MemAvailable`; unknown memory passes). Experts read in place
    /// (`in_place`) need no memory of their own: the model is refused only when the rest does
    /// not fit, and the answer is a note when the experts do not fit beside it (then the pages
    /// of experts not in the page cache are read from disk when the router picks them).
    pub fn check_fits(
        &self,
        available: Option<u64>,
        in_place: bool,
    ) -> Result<Option<String>, LoadError> {
        let Some(available) = available.or_else(mem_available) else {
            return Ok(None);
        };
        const GIB: f64 = (1u64 << 30) as f64;
        let mapped = self.in_place_bytes(in_place) as u64;
        let need = self.resident_weight_bytes() as u64 - mapped;
        if need > available {
            return Err(LoadError::TooLarge {
                path: self.path().to_path_buf(),
                need_gib: need as f64 / GIB,
                available_gib: available as f64 / GIB,
            });
        }
        Ok((need + mapped > available).then(|| {
            format!(
                "{}: the experts ({:.1} GiB) are read in place from the model's files and do not \
                 all fit in memory beside the other weights ({:.1} GiB) with {:.1} GiB available: \
                 experts that are not in the page cache are read from disk when they are chosen",
                self.path().display(),
                mapped as f64 / GIB,
                need as f64 / GIB,
                available as f64 / GIB
            )
        }))
    }
}

/// `MemAvailable` from `/proc/meminfo`, in bytes (Linux; `None` elsewhere).
pub fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl From<ModelFile> for ModelSource {
    fn from(f: ModelFile) -> Self {
        ModelSource::Xmoe(f)
    }
}
