//! The tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.*`), rebuilt as a Hugging Face
//! `tokenizers::Tokenizer`: the byte-level BPE of `tokenizer.ggml.model = "gpt2"` from
//! `tokens`, `merges` and `token_type`, with the pre-tokenizer llama.cpp uses for
//! `tokenizer.ggml.pre` (`llama-vocab.cpp`, `regex_exprs` of each pre-tokenizer type).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::{Map, json};

use super::tokenizer::TokenizerError;

/// GPT-2's pre-tokenizer regex (also what `ByteLevel { use_regex: true }` applies).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3` (`llama-bpe`).
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN2`.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp `LLAMA_VOCAB_PRE_TYPE_DEEPSEEK3_LLM` (`deepseek-v3`): three splits in turn, as in
/// DeepSeek-V3's own `tokenizer.json`.
const DEEPSEEK_V3: [&str; 3] = [
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
/// llama.cpp `LLAMA_VOCAB_PRE_TYPE_GPT4O` (`gpt-4o`: gpt-oss, Llama 4): the "original regex from
/// tokenizer.json" llama.cpp quotes there (o200k's), which fancy-regex runs as written; llama.cpp
/// itself runs a rewrite of it for its own regex engine.
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// `tokenizer.ggml.pre` values this reader maps, in the order messages list them.
pub const SUPPORTED_PRE: &[&str] = &[
    "default",
    "gpt-2",
    "gpt2",
    "olmo",
    "smollm",
    "llama-bpe",
    "llama3",
    "qwen2",
    "deepseek-v3",
    "gpt-4o",
];

/// `tokenizer.ggml.token_type` values (llama.cpp `llama_token_type`).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

fn bad(path: &Path, detail: impl Into<String>) -> TokenizerError {
    TokenizerError::Gguf {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

fn strings<'a>(
    path: &Path,
    meta: &'a HashMap<String, Value>,
    key: &str,
) -> Result<Vec<&'a str>, TokenizerError> {
    let v = meta
        .get(key)
        .ok_or_else(|| bad(path, format!("metadata `{key}` is missing")))?;
    let Value::Array(a) = v else {
        return Err(bad(
            path,
            format!(
                "metadata `{key}` is {}, expected an array of strings",
                crate::model::gguf::config::describe(v)
            ),
        ));
    };
    a.iter()
        .enumerate()
        .map(|(i, x)| match x {
            Value::String(s) => Ok(s.as_str()),
            other => Err(bad(
                path,
                format!("metadata `{key}`[{i}] is {other:?}, expected a string"),
            )),
        })
        .collect()
}

fn int(v: &Value) -> Option<i64> {
    Some(match v {
        Value::I8(x) => *x as i64,
        Value::U8(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I64(x) => *x,
        Value::U64(x) => i64::try_from(*x).ok()?,
        _ => return None,
    })
}

/// The pre-tokenizer (and whether BPE ignores merges for whole-vocabulary words) llama.cpp uses
/// for `pre`.
fn pre_tokenizer(path: &Path, pre: &str) -> Result<(serde_json::Value, bool), TokenizerError> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    Ok(match pre {
        "default" | "gpt-2" | "gpt2" | "olmo" => (byte_level(true), false),
        // llama.cpp: each digit alone, then GPT-2's regex.
        "smollm" => (
            json!({"type": "Sequence", "pretokenizers": [split(r"\p{N}"), split(GPT2), byte_level(false)]}),
            false,
        ),
        "llama-bpe" | "llama3" => (
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3), byte_level(false)]}),
            true,
        ),
        "qwen2" => (
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2), byte_level(false)]}),
            false,
        ),
        "deepseek-v3" => {
            let mut seq: Vec<_> = DEEPSEEK_V3.iter().map(|re| split(re)).collect();
            seq.push(byte_level(false));
            (json!({"type": "Sequence", "pretokenizers": seq}), false)
        }
        "gpt-4o" => (
            json!({"type": "Sequence", "pretokenizers": [split(GPT4O), byte_level(false)]}),
            false,
        ),
        other => {
            return Err(bad(
                path,
                format!(
                    "metadata `tokenizer.ggml.pre` is \"{other}\", a pre-tokenizer this reader does not know (supported: {})",
                    SUPPORTED_PRE.join(", ")
                ),
            ));
        }
    })
}

/// The tokenizer described by the `tokenizer.ggml.*` entries of `meta` (of the file `path`, for
/// messages).
pub fn from_metadata(
    path: &Path,
    meta: &HashMap<String, Value>,
) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let model = match meta.get("tokenizer.ggml.model") {
        Some(Value::String(s)) => s.as_str(),
        Some(v) => {
            return Err(bad(
                path,
                format!("metadata `tokenizer.ggml.model` is {v:?}, expected a string"),
            ));
        }
        None => {
            return Err(bad(
                path,
                "metadata `tokenizer.ggml.model` is missing: the file has no tokenizer",
            ));
        }
    };
    if model != "gpt2" {
        let what = match model {
            "llama" => " (SentencePiece; not supported yet, see docs/gguf.md)",
            _ => "",
        };
        return Err(bad(
            path,
            format!(
                "metadata `tokenizer.ggml.model` is \"{model}\"{what}; supported: \"gpt2\" (byte-level BPE)"
            ),
        ));
    }
    let tokens = strings(path, meta, "tokenizer.ggml.tokens")?;
    let merges = strings(path, meta, "tokenizer.ggml.merges")?;
    let types: Vec<i64> = match meta.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(Value::Array(a)) if a.len() == tokens.len() => a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                int(v).ok_or_else(|| {
                    bad(
                        path,
                        format!("metadata `tokenizer.ggml.token_type`[{i}] is {v:?}, expected an integer"),
                    )
                })
            })
            .collect::<Result<_, _>>()?,
        Some(v) => {
            return Err(bad(
                path,
                format!(
                    "metadata `tokenizer.ggml.token_type` is {}, expected an array of {} integers (one per token)",
                    crate::model::gguf::config::describe(v),
                    tokens.len()
                ),
            ));
        }
    };
    let pre = match meta.get("tokenizer.ggml.pre") {
        Some(Value::String(s)) => s.as_str(),
        Some(v) => {
            return Err(bad(
                path,
                format!("metadata `tokenizer.ggml.pre` is {v:?}, expected a string"),
            ));
        }
        // Files older than the key: llama.cpp's default is GPT-2's regex.
        None => "default",
    };
    let (pre_tokenizer, ignore_merges) = pre_tokenizer(path, pre)?;
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, (tok, ty)) in tokens.iter().zip(&types).enumerate() {
        if vocab.contains_key(*tok) {
            return Err(bad(
                path,
                format!("metadata `tokenizer.ggml.tokens` holds {tok:?} twice (second at id {id})"),
            ));
        }
        vocab.insert(tok.to_string(), json!(id));
        if *ty == CONTROL || *ty == USER_DEFINED {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": *ty == CONTROL,
            }));
        }
    }
    for (i, m) in merges.iter().enumerate() {
        let mut parts = m.split(' ');
        let ok = matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None)
            if vocab.contains_key(a) && vocab.contains_key(b));
        if !ok {
            return Err(bad(
                path,
                format!(
                    "metadata `tokenizer.ggml.merges`[{i}] is {m:?}, expected two tokens of the vocabulary separated by one space"
                ),
            ));
        }
    }
    let json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges,
        },
    });
    let bytes = serde_json::to_vec(&json).map_err(|e| bad(path, e.to_string()))?;
    tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| {
        bad(
            path,
            format!("the tokenizer metadata does not make a tokenizer: {e}"),
        )
    })
}

/// The tokenizer of the GGUF file at `path`.
pub fn from_file(path: &Path) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let g = crate::model::gguf::GgufFile::open(path).map_err(|e| TokenizerError::Gguf {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    from_metadata(path, g.metadata())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    /// The pieces the pre-tokenizer of `pre` cuts `text` into, as text (before byte mapping).
    fn pieces(pre: &str, text: &str) -> Vec<String> {
        let (json, _) = pre_tokenizer(Path::new("t.gguf"), pre).unwrap();
        let p: tokenizers::PreTokenizerWrapper = serde_json::from_value(json).unwrap();
        let mut s = PreTokenizedString::from(text);
        p.pre_tokenize(&mut s).unwrap();
        // Undo the byte-level mapping so the expectations read as the input text.
        let bl = tokenizers::decoders::byte_level::ByteLevel::default();
        s.get_splits(OffsetReferential::Original, OffsetType::Char)
            .into_iter()
            .map(|(piece, _, _)| {
                tokenizers::Decoder::decode_chain(&bl, vec![piece.to_string()]).unwrap()[0].clone()
            })
            .collect()
    }

    #[test]
    fn deepseek_v3_splits_digits_in_threes_and_kana_and_han_apart() {
        assert_eq!(
            pieces("deepseek-v3", "Hello, world 12345 日本語です!"),
            [
                "Hello",
                ",",
                " world",
                " ",
                "123",
                "45",
                " ",
                "日本語です",
                "!"
            ]
        );
    }

    /// Expected pieces from Python's `regex` module (2026.11.19) running the same pattern: a
    /// second regex engine. Case-insensitive contractions stay on their word, digits go in threes,
    /// punctuation takes trailing newlines, and capitals run into the lower-case letters after them.
    #[test]
    fn gpt_4o_splits_as_o200k_does() {
        assert_eq!(
            pieces("gpt-4o", "Hello WORLD's HTTPServer don'T 12345 ok!!\n\n  x"),
            [
                "Hello",
                " WORLD's",
                " HTTPServer",
                " don'T",
                " ",
                "123",
                "45",
                " ok",
                "!!\n\n",
                " ",
                " x"
            ]
        );
        assert_eq!(
            pieces("gpt-4o", "naïve CAFÉ déjà-vu 3.14159"),
            ["naïve", " CAFÉ", " déjà", "-vu", " ", "3", ".", "141", "59"]
        );
        assert_eq!(
            pieces("gpt-4o", "<|endoftext|>path/to//file\r\nend"),
            [
                "<|",
                "endoftext",
                "|>",
                "path",
                "/to",
                "//",
                "file",
                "\r\n",
                "end"
            ]
        );
    }
}
