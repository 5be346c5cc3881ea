//! The model and held-out text that ship inside the binary (see `docs/embedded-model.md`).

use crate::model::format::{LoadError, ModelFile};
use crate::workload::TextSource;

/// Name shown for the embedded model.
pub const MODEL_NAME: &str = "embedded:xmoe-kjv";

/// The trained model, as stored in `assets/`.
pub static MODEL_BYTES: &[u8] = include_bytes!("../assets/xmoe-kjv.safetensors");

/// The held-out part of the corpus: the default eval workload and quality measure.
pub static HELDOUT_TEXT: &[u8] = include_bytes!("../assets/kjv-heldout.txt");

/// The embedded model, checked like any file.
pub fn model_file() -> Result<ModelFile, LoadError> {
    ModelFile::from_static(MODEL_NAME, MODEL_BYTES)
}

/// The embedded held-out text.
pub fn heldout_text() -> TextSource {
    TextSource {
        name: "embedded held-out text (KJV)".into(),
        bytes: HELDOUT_TEXT.to_vec(),
    }
}
