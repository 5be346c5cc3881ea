//! Text to token ids and back: one token per byte for the project's own models, or a Hugging Face
//! `tokenizer.json` (read by Hugging Face's `tokenizers` crate) for checkpoints.

use std::path::{Path, PathBuf};

/// Why a tokenizer cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The file is missing or unreadable.
    #[error("{path}: cannot read the tokenizer: {io}")]
    Read {
        /// `tokenizer.json`.
        path: PathBuf,
        /// The OS error.
        io: std::io::Error,
    },
    /// Not a tokenizer the `tokenizers` crate accepts.
    #[error("{path}: not a valid tokenizer.json: {detail}")]
    Invalid {
        /// `tokenizer.json`.
        path: PathBuf,
        /// Parser message.
        detail: String,
    },
    /// The tokenizer has ids the model has no embedding for.
    #[error(
        "{path}: the tokenizer has {found} tokens (ids up to {max_id}) but the model's embedding has {expected} rows"
    )]
    VocabMismatch {
        /// `tokenizer.json`.
        path: PathBuf,
        /// The model's `vocab_size`.
        expected: usize,
        /// Tokens in the tokenizer (added tokens included).
        found: usize,
        /// Largest id.
        max_id: u32,
    },
    /// The `tokenizer.ggml.*` metadata of a GGUF file does not make a tokenizer.
    #[error("{path}: cannot build the tokenizer from the GGUF metadata: {detail}")]
    Gguf {
        /// The `.gguf` file.
        path: PathBuf,
        /// What is missing or wrong.
        detail: String,
    },
    /// Encoding failed.
    #[error("tokenizing failed: {0}")]
    Encode(String),
}

/// A text as token ids, with the UTF-8 bytes of the source each token covers (they sum to the
/// text's length), so that quality can be reported per byte whatever the tokenizer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Bytes of the source each token covers.
    pub bytes: Vec<u32>,
}

impl Encoded {
    /// Bytes of the text covered by the `n` tokens after `start`: the targets of a window of
    /// `n + 1` tokens starting there.
    pub fn target_bytes(&self, start: usize, n: usize) -> u64 {
        self.bytes[start + 1..start + n + 1]
            .iter()
            .map(|&b| b as u64)
            .sum()
    }
}

/// How a model turns text into tokens.
pub enum TextTokenizer {
    /// One token per byte (ids 0..=255).
    Byte,
    /// A Hugging Face tokenizer.
    HuggingFace(Box<tokenizers::Tokenizer>),
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TextTokenizer::Byte => f.write_str("TextTokenizer::Byte"),
            TextTokenizer::HuggingFace(t) => {
                write!(
                    f,
                    "TextTokenizer::HuggingFace({} tokens)",
                    t.get_vocab_size(true)
                )
            }
        }
    }
}

impl TextTokenizer {
    /// Reads `tokenizer.json` (or the tokenizer in a GGUF file's metadata, or the one stored in a
    /// model file of the project's format) for a model whose embedding has `vocab_size` rows.
    pub fn from_file(path: &Path, vocab_size: usize) -> Result<Self, TokenizerError> {
        if crate::model::gguf::is_gguf(path) {
            let tok = super::gguf_tokenizer::from_file(path)?;
            return Self::checked(path, tok, vocab_size);
        }
        if crate::model::format::is_safetensors(path) {
            // A model file of the project's format with its tokenizer.json in the header.
            let file = crate::model::format::ModelFile::open(path).map_err(|e| {
                TokenizerError::Invalid {
                    path: path.to_path_buf(),
                    detail: e.to_string(),
                }
            })?;
            let Some(text) = file.stored_tokenizer() else {
                return Err(TokenizerError::Invalid {
                    path: path.to_path_buf(),
                    detail: format!(
                        "the model file stores no tokenizer (no `__metadata__[\"{}\"]`)",
                        crate::model::config::TOKENIZER_KEY
                    ),
                });
            };
            return Self::from_bytes(path, text.as_bytes(), vocab_size);
        }
        let bytes =
            crate::input_file::read(path, crate::input_file::MAX_JSON_BYTES).map_err(|io| {
                TokenizerError::Read {
                    path: path.to_path_buf(),
                    io,
                }
            })?;
        Self::from_bytes(path, &bytes, vocab_size)
    }

    /// Parses the bytes of a `tokenizer.json` for a model whose embedding has `vocab_size` rows
    /// (`path` is for messages); [`TextTokenizer::from_file`] reads the file and calls it.
    pub fn from_bytes(
        path: &Path,
        bytes: &[u8],
        vocab_size: usize,
    ) -> Result<Self, TokenizerError> {
        // tokenizers 0.23 panics (`expect("Helper")` in the decoder's deserializer) rather than
        // failing when the `decoder` object is not well-formed JSON or nests too deep: check the
        // whole file's syntax first (fuzz target `tokenizer`, docs/fuzzing.md).
        serde_json::from_slice::<serde_json::Value>(bytes).map_err(|e| {
            TokenizerError::Invalid {
                path: path.to_path_buf(),
                detail: e.to_string(),
            }
        })?;
        let tok =
            tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| TokenizerError::Invalid {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })?;
        Self::checked(path, tok, vocab_size)
    }

    /// `tok`, once its ids are checked to fit a `vocab_size`-row embedding.
    fn checked(
        path: &Path,
        tok: tokenizers::Tokenizer,
        vocab_size: usize,
    ) -> Result<Self, TokenizerError> {
        let found = tok.get_vocab_size(true);
        let max_id = tok.get_vocab(true).values().copied().max().unwrap_or(0);
        if max_id as usize >= vocab_size {
            return Err(TokenizerError::VocabMismatch {
                path: path.to_path_buf(),
                expected: vocab_size,
                found,
                max_id,
            });
        }
        Ok(TextTokenizer::HuggingFace(Box::new(tok)))
    }

    /// True for the byte tokenizer.
    pub fn is_byte(&self) -> bool {
        matches!(self, TextTokenizer::Byte)
    }

    /// Tokenizes `text`. A Hugging Face tokenizer needs UTF-8: invalid sequences are replaced by
    /// U+FFFD first, and the byte counts then refer to the replaced text.
    pub fn encode(&self, text: &[u8]) -> Result<Encoded, TokenizerError> {
        match self {
            TextTokenizer::Byte => Ok(Encoded {
                ids: text.iter().map(|&b| b as u32).collect(),
                bytes: vec![1; text.len()],
            }),
            TextTokenizer::HuggingFace(t) => {
                let s = String::from_utf8_lossy(text);
                let enc = t
                    .encode(s.as_ref(), false)
                    .map_err(|e| TokenizerError::Encode(e.to_string()))?;
                let ids = enc.get_ids().to_vec();
                // Each token covers the bytes from its start to the next token's start, so that
                // bytes no offset claims (e.g. ones a normaliser dropped) still count once.
                let starts: Vec<usize> = enc.get_offsets().iter().map(|o| o.0).collect();
                let mut bytes = Vec::with_capacity(ids.len());
                for i in 0..ids.len() {
                    let start = if i == 0 {
                        0
                    } else {
                        starts[i].max(starts[i - 1])
                    };
                    let end = if i + 1 < ids.len() {
                        starts[i + 1].max(start)
                    } else {
                        s.len()
                    };
                    bytes.push((end - start) as u32);
                }
                Ok(Encoded { ids, bytes })
            }
        }
    }

    /// The text of one token, as bytes (a byte token is its byte; a BPE token may be part of a
    /// UTF-8 character, in which case its bytes are what the tokenizer decodes it to alone).
    ///
    /// A token is decoded after a fixed one and that one's text is cut off: SentencePiece-style
    /// decoders (Llama, Mistral, Mixtral, GGUF `llama` vocabularies) strip the space a word starts
    /// with when it opens the text, so a token decoded alone would lose it and generated words
    /// would run together.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        match self {
            TextTokenizer::Byte => vec![id as u8],
            TextTokenizer::HuggingFace(t) => {
                let alone = || {
                    t.decode(&[id], false)
                        .map(String::into_bytes)
                        .unwrap_or_default()
                };
                let Some(anchor) = t.token_to_id("a") else {
                    return alone();
                };
                match (t.decode(&[anchor], false), t.decode(&[anchor, id], false)) {
                    (Ok(base), Ok(both)) if both.starts_with(&base) => {
                        both.as_bytes()[base.len()..].to_vec()
                    }
                    _ => alone(),
                }
            }
        }
    }

    /// Decodes a sequence of ids.
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            TextTokenizer::Byte => {
                String::from_utf8_lossy(&ids.iter().map(|&i| i as u8).collect::<Vec<_>>())
                    .into_owned()
            }
            TextTokenizer::HuggingFace(t) => t.decode(ids, false).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/tokenizer.json")
    }

    #[test]
    fn byte_tokenizer_is_one_token_per_byte() {
        let e = TextTokenizer::Byte.encode(&[0xff, b'a', 0]).unwrap();
        assert_eq!(e.ids, vec![255, 97, 0]);
        assert_eq!(e.bytes, vec![1, 1, 1]);
        assert_eq!(TextTokenizer::Byte.token_bytes(200), vec![200]);
    }

    #[test]
    fn hugging_face_tokenizer_round_trips_and_counts_every_byte_once() {
        let t = TextTokenizer::from_file(&fixture(), 512).unwrap();
        let corpus =
            std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/kjv-heldout.txt"))
                .unwrap();
        for text in [
            &corpus[..4096],
            "naïve café — 東京 🙂 tab\there".as_bytes(),
            b"   leading spaces and\n\nnewlines  ",
        ] {
            let e = t.encode(text).unwrap();
            assert!(
                e.ids.len() < text.len() || text.len() < 40,
                "BPE merges something"
            );
            assert_eq!(e.ids.len(), e.bytes.len());
            assert_eq!(
                e.bytes.iter().map(|&b| b as usize).sum::<usize>(),
                text.len(),
                "bytes covered"
            );
            assert_eq!(t.decode(&e.ids).as_bytes(), text, "round trip");
            assert!(e.ids.iter().all(|&i| i < 512));
        }
        // Token text: concatenating every token's bytes gives the text back (byte-level BPE).
        let e = t.encode(b"In the beginning").unwrap();
        let joined: Vec<u8> = e.ids.iter().flat_map(|&i| t.token_bytes(i)).collect();
        assert_eq!(joined, b"In the beginning");
    }

    #[test]
    fn tokenizer_errors_name_the_file_and_the_mismatch() {
        let missing = TextTokenizer::from_file(Path::new("/nonexistent/tokenizer.json"), 512)
            .unwrap_err()
            .to_string();
        assert!(missing.contains("/nonexistent/tokenizer.json") && missing.contains("cannot read"));
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("tokenizer.json");
        std::fs::write(&bad, "{\"not\": \"a tokenizer\"}").unwrap();
        let msg = TextTokenizer::from_file(&bad, 512).unwrap_err().to_string();
        assert!(msg.contains("not a valid tokenizer.json"), "{msg}");
        let small = TextTokenizer::from_file(&fixture(), 300)
            .unwrap_err()
            .to_string();
        assert!(
            small.contains("512 tokens") && small.contains("300 rows"),
            "{small}"
        );
    }
}
