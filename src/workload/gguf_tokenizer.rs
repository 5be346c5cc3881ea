//! The tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.*`), rebuilt as a Hugging Face
//! `tokenizers::Tokenizer`: the byte-level BPE of `tokenizer.ggml.model = "gpt2"` from
//! `tokens`, `merges` and `token_type`, with the pre-tokenizer llama.cpp uses for
//! `tokenizer.ggml.pre` (`llama-vocab.cpp`, `regex_exprs` of each pre-tokenizer type), and the
//! SentencePiece of `tokenizer.ggml.model = "llama"` ([`spm`]).
//!
//! Both are checked against llama.cpp's own tokenizer test files (`tests/gguf_tokenizer_vocab.rs`).

mod spm;

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
/// llama.cpp `LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_LLM` (`deepseek-llm`, DeepSeek LLM and DeepSeek-V2):
/// six splits in turn. The letter class is an explicit list of ranges, copied code point by code
/// point from `llama-vocab.cpp`; it is written with `\u{..}` escapes because some of its members
/// (U+1FBE, U+1FD3, U+1FDB, U+2126, U+212A, ...) have canonical equivalents that Unicode
/// normalisation would silently substitute in a literal, changing the class.
const DEEPSEEK_LLM: [&str; 6] = [
    "[\r\n]",
    concat!(
        "\\s?[A-Za-z\u{B5}\u{C0}-\u{D6}\u{D8}-\u{F6}\u{F8}-\u{1BA}\u{1BC}-\u{1BF}\u{1C4}-\u{293}",
        "\u{295}-\u{2AF}\u{370}-\u{373}\u{376}\u{377}\u{37B}-\u{37D}\u{37F}\u{386}\u{388}-\u{38A}",
        "\u{38C}\u{38E}-\u{3A1}\u{3A3}-\u{3F5}\u{3F7}-\u{481}\u{48A}-\u{52F}\u{531}-\u{556}",
        "\u{10A0}-\u{10C5}\u{13A0}-\u{13F5}\u{13F8}-\u{13FD}\u{1C90}-\u{1CBA}\u{1CBD}-\u{1CBF}",
        "\u{1D00}-\u{1D2B}\u{1D6B}-\u{1D77}\u{1D79}-\u{1D9A}\u{1E00}-\u{1F15}\u{1F18}-\u{1F1D}",
        "\u{1F20}-\u{1F45}\u{1F48}-\u{1F4D}\u{1F50}-\u{1F57}\u{1F59}\u{1F5B}\u{1F5D}\u{1F5F}-\u{1F7D}",
        "\u{1F80}-\u{1FB4}\u{1FB6}-\u{1FBC}\u{1FBE}\u{1FC2}-\u{1FC4}\u{1FC6}-\u{1FCC}\u{1FD0}-\u{1FD3}",
        "\u{1FD6}-\u{1FDB}\u{1FE0}-\u{1FEC}\u{1FF2}-\u{1FF4}\u{1FF6}-\u{1FFC}\u{2102}\u{2107}",
        "\u{210A}-\u{2113}\u{2115}\u{2119}-\u{211D}\u{2124}\u{2126}\u{2128}\u{212A}-\u{212D}",
        "\u{212F}-\u{2134}\u{2139}\u{213C}-\u{213F}\u{2145}-\u{2149}\u{214E}\u{2183}\u{2184}",
        "\u{2C00}-\u{2C7B}\u{2C7E}-\u{2CE4}\u{2CEB}-\u{2CEE}\u{2CF2}\u{2CF3}\u{A640}-\u{A66D}",
        "\u{A680}-\u{A69B}\u{A722}-\u{A76F}\u{A771}-\u{A787}\u{A78B}-\u{A78E}\u{AB70}-\u{ABBF}",
        "\u{FB00}-\u{FB06}\u{FB13}-\u{FB17}\u{FF21}-\u{FF3A}\u{FF41}-\u{FF5A}\u{10400}-\u{1044F}",
        "\u{104B0}-\u{104D3}\u{104D8}-\u{104FB}\u{10C80}-\u{10CB2}\u{10CC0}-\u{10CF2}",
        "\u{118A0}-\u{118DF}\u{1E900}-\u{1E943}]+",
    ),
    "\\s?[!-/:-~\u{FF01}-\u{FF0F}\u{FF1A}-\u{FF5E}\u{2018}-\u{201F}\u{3000}-\u{3002}]+",
    "\\s+$",
    "[\u{4E00}-\u{9FA5}\u{800}-\u{4E00}\u{AC00}-\u{D7FF}]+",
    "\\p{N}+",
];
/// llama.cpp `LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_CODER` (`deepseek-coder`): five splits in turn.
const DEEPSEEK_CODER: [&str; 5] = [
    "[\r\n]",
    "\\s?\\p{L}+",
    "\\s?\\p{P}+",
    "[\u{4E00}-\u{9FA5}\u{800}-\u{4E00}\u{AC00}-\u{D7FF}]+",
    "\\p{N}",
];
/// Kimi-K2's split (`kimi-k2`): the regex of its `tokenization_kimi.py`, which llama.cpp quotes
/// for `LLAMA_VOCAB_PRE_TYPE_KIMI_K2` and implements by hand (`unicode_regex_split_custom_kimi_k2`).
/// Han runs alone; words split at case changes (`HelloWorld` is two words; llama.cpp's hand
/// version keeps it one, and does not count combining marks as letters, where the regex does).
const KIMI_K2: &str = r"[\p{Han}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
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
    "deepseek-llm",
    "deepseek-coder",
    "kimi-k2",
    "gpt-4o",
];

/// `tokenizer.ggml.token_type` values (llama.cpp `llama_token_type`).
const NORMAL: i64 = 1;
const UNKNOWN: i64 = 2;
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

/// `tokenizer.ggml.token_type`, one per token (all normal when the key is absent).
fn token_types(
    path: &Path,
    meta: &HashMap<String, Value>,
    n: usize,
) -> Result<Vec<i64>, TokenizerError> {
    match meta.get("tokenizer.ggml.token_type") {
        None => Ok(vec![NORMAL; n]),
        Some(Value::Array(a)) if a.len() == n => a
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
            .collect(),
        Some(v) => Err(bad(
            path,
            format!(
                "metadata `tokenizer.ggml.token_type` is {}, expected an array of {n} integers (one per token)",
                crate::model::gguf::config::describe(v),
            ),
        )),
    }
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
        "kimi-k2" => (
            json!({"type": "Sequence", "pretokenizers": [split(KIMI_K2), byte_level(false)]}),
            false,
        ),
        "deepseek-llm" | "deepseek-coder" => {
            let res: &[&str] = if pre == "deepseek-llm" {
                &DEEPSEEK_LLM
            } else {
                &DEEPSEEK_CODER
            };
            let mut seq: Vec<_> = res.iter().map(|re| split(re)).collect();
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
    let tokens = match model {
        "gpt2" => strings(path, meta, "tokenizer.ggml.tokens")?,
        "llama" => {
            let tokens = strings(path, meta, "tokenizer.ggml.tokens")?;
            let types = token_types(path, meta, tokens.len())?;
            return spm::from_metadata(path, meta, &tokens, &types);
        }
        _ => {
            return Err(bad(
                path,
                format!(
                    "metadata `tokenizer.ggml.model` is \"{model}\"; supported: \"gpt2\" (byte-level BPE), \"llama\" (SentencePiece)"
                ),
            ));
        }
    };
    let merges = strings(path, meta, "tokenizer.ggml.merges")?;
    let types = token_types(path, meta, tokens.len())?;
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

    #[test]
    fn kimi_k2_keeps_han_runs_whole_and_splits_words_at_case_changes() {
        // Each expectation follows the regex by hand: the first alternative that matches at a
        // position wins, each quantifier greedy with backtracking.
        assert_eq!(
            pieces("kimi-k2", "Hello, world 12345 日本語です!"),
            [
                "Hello",
                ",",
                " world",
                " ",
                "123",
                "45",
                " ",
                "日本語",
                "です",
                "!"
            ]
        );
        // Upper-case letters only start a word (the first class has no Ll), so a lower-case
        // run ends at the next capital; an all-capital word takes the third alternative;
        // contractions in either case.
        assert_eq!(
            pieces("kimi-k2", "HelloWorld THE iPhone's I'M"),
            ["Hello", "World", " THE", " i", "Phone's", " I'M"]
        );
        assert_eq!(pieces("kimi-k2", "1234567"), ["123", "456", "7"]);
        assert_eq!(
            pieces("kimi-k2", "a\n\n  b  "),
            ["a", "\n\n", " ", " b", "  "]
        );
        assert_eq!(
            pieces("kimi-k2", "我想在apple工作"),
            ["我想在", "apple", "工作"]
        );
        // A combining mark (U+0301) belongs to the word.
        assert_eq!(pieces("kimi-k2", "cafe\u{301} x"), ["cafe\u{301}", " x"]);
    }

    #[test]
    fn deepseek_llm_letter_class_is_llama_cpps_code_point_for_code_point() {
        // Length and code point sum of the class as it stands in llama.cpp's `llama-vocab.cpp`
        // (computed from the file's bytes). The class is not NFC-stable: U+1FD3, U+1FDB, U+212A,
        // U+2126 and U+1FBE have canonical equivalents, and normalised range ends (U+1FD0-U+0390,
        // "K"-U+212D) would make the regex invalid or swallow ASCII punctuation.
        let class = DEEPSEEK_LLM[1];
        assert_eq!(
            (
                class.chars().count(),
                class.chars().map(u32::from).sum::<u32>()
            ),
            (223, 2_789_785)
        );
        for c in ['\u{1FD3}', '\u{1FDB}', '\u{212A}', '\u{2126}', '\u{1FBE}'] {
            assert!(class.contains(c), "U+{:04X}", u32::from(c));
        }
        // Each split applies to the pieces of the ones before: "~" (in the punctuation split's
        // range `:-~`, not a letter) is cut out of a run of letters, and the CJK split's range
        // U+0800-U+4E00 takes U+1FD2 from the space the letter split gave it.
        assert_eq!(
            pieces("deepseek-llm", "Hello~World \u{1FD2}12345!"),
            ["Hello", "~", "World", " ", "\u{1FD2}", "12345", "!"]
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
