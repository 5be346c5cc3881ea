//! Where a model comes from: a file of the project's own format or a Hugging Face checkpoint.
//! One `open` decides which from the path, so every command takes either.

use std::path::{Path, PathBuf};

use super::config::ModelConfig;
use super::format::{LoadError, ModelFile};
use super::hf::{HfCheckpoint, is_hf_checkpoint};

/// An opened and checked model, not yet loaded onto a device.
pub enum ModelSource {
    /// The project's own `.safetensors` format.
    Xmoe(ModelFile),
    /// A Hugging Face checkpoint directory.
    HuggingFace(HfCheckpoint),
}

impl ModelSource {
    /// Opens `path`: a Hugging Face checkpoint (a directory, its index, or one of its shards) or
    /// a model file of the project's own format.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        if is_hf_checkpoint(path) {
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
        }
    }

    /// The path the model was opened from (the file, or the checkpoint directory).
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Xmoe(f) => f.path(),
            ModelSource::HuggingFace(c) => c.dir(),
        }
    }

    /// Findings at open that did not stop it.
    pub fn warnings(&self) -> &[String] {
        match self {
            ModelSource::Xmoe(f) => f.warnings(),
            ModelSource::HuggingFace(_) => &[],
        }
    }

    /// Bytes of the model file, or of all the tensor data of a checkpoint.
    pub fn file_bytes(&self) -> usize {
        match self {
            ModelSource::Xmoe(f) => f.file_bytes(),
            ModelSource::HuggingFace(c) => c.tensor_bytes(),
        }
    }

    /// The `tokenizer.json` that goes with the model, if it has one.
    pub fn tokenizer_path(&self) -> Option<PathBuf> {
        match self {
            ModelSource::Xmoe(_) => None,
            ModelSource::HuggingFace(c) => Some(c.dir().join("tokenizer.json")),
        }
    }

    /// Every tensor: name, dtype, shape, bytes; sorted by name.
    pub fn tensor_table(&self) -> Vec<(String, String, Vec<usize>, usize)> {
        match self {
            ModelSource::Xmoe(f) => f.tensor_table(),
            ModelSource::HuggingFace(c) => c.tensor_table(),
        }
    }
}

impl From<ModelFile> for ModelSource {
    fn from(f: ModelFile) -> Self {
        ModelSource::Xmoe(f)
    }
}
