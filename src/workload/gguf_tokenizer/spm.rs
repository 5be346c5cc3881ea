//! SentencePiece from GGUF metadata (`tokenizer.ggml.model = "llama"`: Llama 1/2, Mistral,
//! Mixtral), as a `tokenizers` BPE model that gives llama.cpp's `llm_tokenizer_spm` ids.
//!
//! llama.cpp's algorithm: the text (with a space in front when `add_space_prefix`, spaces
//! replaced by U+2581) starts as one symbol per character; the adjacent pair whose concatenation
//! is the vocabulary token with the highest score is merged, again and again; a final symbol that
//! is no token is written as its bytes (`<0xXX>` tokens). That is BPE with one merge rule per way
//! of splitting a token into two tokens, ranked by the merged token's score, plus byte fallback:
//! the construction of `transformers`' `SentencePieceExtractor` (the source of the
//! `tokenizer.json` files published next to these models), reproduced here rule for rule,
//! including its order among equal scores.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::{Map, json};

use super::{CONTROL, UNKNOWN, USER_DEFINED, bad, int};
use crate::workload::tokenizer::TokenizerError;

/// U+2581 LOWER ONE EIGHTH BLOCK, SentencePiece's visible space.
const SPACE: &str = "\u{2581}";

/// `tokenizer.ggml.scores`, one per token.
fn scores(
    path: &Path,
    meta: &HashMap<String, Value>,
    n: usize,
) -> Result<Vec<f32>, TokenizerError> {
    let key = "tokenizer.ggml.scores";
    let a = match meta.get(key) {
        Some(Value::Array(a)) if a.len() == n => a,
        Some(v) => {
            return Err(bad(
                path,
                format!(
                    "metadata `{key}` is {}, expected an array of {n} floats (one per token)",
                    crate::model::gguf::config::describe(v)
                ),
            ));
        }
        None => {
            return Err(bad(
                path,
                format!(
                    "metadata `{key}` is missing: a SentencePiece (`llama`) tokenizer ranks its merges by these scores"
                ),
            ));
        }
    };
    a.iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::F32(x) if !x.is_nan() => Ok(*x),
            Value::F64(x) if !x.is_nan() => Ok(*x as f32),
            other => Err(bad(
                path,
                format!("metadata `{key}`[{i}] is {other:?}, expected a number"),
            )),
        })
        .collect()
}

/// A token id from metadata `key` (llama.cpp's `default` when absent), checked against the
/// vocabulary size.
fn token_id(
    path: &Path,
    meta: &HashMap<String, Value>,
    key: &str,
    default: usize,
    n: usize,
) -> Result<usize, TokenizerError> {
    let id = match meta.get(key) {
        None => default,
        Some(v) => int(v)
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| {
                bad(
                    path,
                    format!("metadata `{key}` is {v:?}, expected a token id"),
                )
            })?,
    };
    if id >= n {
        return Err(bad(
            path,
            format!("metadata `{key}` is {id}, but the vocabulary has {n} tokens"),
        ));
    }
    Ok(id)
}

fn flag(
    path: &Path,
    meta: &HashMap<String, Value>,
    key: &str,
    default: bool,
) -> Result<bool, TokenizerError> {
    match meta.get(key) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(bad(
            path,
            format!("metadata `{key}` is {v:?}, expected a boolean"),
        )),
    }
}

/// The merge rules of a SentencePiece vocabulary, as (left, right) token ids, first rule first:
/// every split of a token into two tokens (at a character boundary), ranked by the merged token's
/// score, highest first; among equal scores by merged token id, then left id, then right id
/// (`SentencePieceExtractor.extract`: per token sorted by ids, then a stable sort by score).
///
/// One hash lookup per character boundary of each token: linear in the vocabulary's text.
pub(super) fn merges(tokens: &[&str], scores: &[f32], ids: &HashMap<&str, u32>) -> Vec<(u32, u32)> {
    // (merged, left, right)
    let mut rules: Vec<(u32, u32, u32)> = Vec::new();
    for (merged, tok) in tokens.iter().enumerate() {
        for (at, _) in tok.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (ids.get(&tok[..at]), ids.get(&tok[at..])) {
                rules.push((merged as u32, l, r));
            }
        }
    }
    rules.sort_unstable_by(|a, b| {
        scores[b.0 as usize]
            .total_cmp(&scores[a.0 as usize])
            .then(a.cmp(b))
    });
    rules.into_iter().map(|(_, l, r)| (l, r)).collect()
}

/// The SentencePiece tokenizer described by `meta`, whose `tokenizer.ggml.tokens` and
/// `token_type` the caller has read.
pub(super) fn from_metadata(
    path: &Path,
    meta: &HashMap<String, Value>,
    tokens: &[&str],
    types: &[i64],
) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let n = tokens.len();
    let scores = scores(path, meta, n)?;
    let mut ids: HashMap<&str, u32> = HashMap::with_capacity(n);
    for (id, tok) in tokens.iter().enumerate() {
        if ids.insert(tok, id as u32).is_some() {
            return Err(bad(
                path,
                format!("metadata `tokenizer.ggml.tokens` holds {tok:?} twice (second at id {id})"),
            ));
        }
    }
    // llama.cpp's defaults for a `llama` vocabulary (`llama_vocab::impl::load`).
    let unk = token_id(path, meta, "tokenizer.ggml.unknown_token_id", 0, n)?;
    let bos = token_id(path, meta, "tokenizer.ggml.bos_token_id", 1, n)?;
    let eos = token_id(path, meta, "tokenizer.ggml.eos_token_id", 2, n)?;
    let add_bos = flag(path, meta, "tokenizer.ggml.add_bos_token", true)?;
    let add_eos = flag(path, meta, "tokenizer.ggml.add_eos_token", false)?;
    let add_space_prefix = flag(path, meta, "tokenizer.ggml.add_space_prefix", true)?;

    let rules = merges(tokens, &scores, &ids);
    let merges: Vec<[&str; 2]> = rules
        .iter()
        .map(|&(l, r)| [tokens[l as usize], tokens[r as usize]])
        .collect();
    let vocab: Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(id, tok)| (tok.to_string(), json!(id)))
        .collect();
    // Control and unknown tokens (`<s>`, `</s>`, `<unk>`) are special; user-defined ones are
    // matched whole before the rest of the text, as llama.cpp does (`tokenizer_st_partition`).
    let added: Vec<_> = tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, ty))| matches!(**ty, CONTROL | USER_DEFINED | UNKNOWN))
        .map(|(id, (tok, ty))| {
            json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": *ty != USER_DEFINED,
            })
        })
        .collect();
    let replace_space = json!({"type": "Replace", "pattern": {"String": " "}, "content": SPACE});
    let (normalizer, decoder) = if add_space_prefix {
        (
            json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": SPACE}, replace_space]}),
            json!({"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                // The space the normaliser put in front.
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}),
        )
    } else {
        (
            replace_space,
            json!({"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]}),
        )
    };
    // `encode(text, true)` adds what llama.cpp's `add_special` adds.
    let special = |id: usize| json!({"SpecialToken": {"id": tokens[id], "type_id": 0}});
    let seq = |s: &str| json!({"Sequence": {"id": s, "type_id": 0}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    if add_bos {
        single.push(special(bos));
        pair.push(special(bos));
    }
    single.push(seq("A"));
    pair.push(seq("A"));
    if add_eos {
        single.push(special(eos));
        pair.push(special(eos));
    }
    if add_bos {
        pair.push(special(bos));
    }
    pair.push(seq("B"));
    if add_eos {
        pair.push(special(eos));
    }
    let mut special_tokens = Map::new();
    for id in [bos, eos] {
        special_tokens.insert(
            tokens[id].to_string(),
            json!({"id": tokens[id], "ids": [id], "tokens": [tokens[id]]}),
        );
    }
    let json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair,
            "special_tokens": special_tokens},
        "decoder": decoder,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": tokens[unk],
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
            "byte_fallback": true, "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    });
    let bytes = serde_json::to_vec(&json).map_err(|e| bad(path, e.to_string()))?;
    tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| {
        bad(
            path,
            format!("the SentencePiece metadata does not make a tokenizer: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(tokens: &[&str], scores: &[f32], types: &[i32]) -> HashMap<String, Value> {
        let mut m = HashMap::new();
        m.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
        m.insert(
            "tokenizer.ggml.tokens".into(),
            Value::Array(
                tokens
                    .iter()
                    .map(|t| Value::String(t.to_string()))
                    .collect(),
            ),
        );
        m.insert(
            "tokenizer.ggml.scores".into(),
            Value::Array(scores.iter().map(|&s| Value::F32(s)).collect()),
        );
        m.insert(
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
        );
        m
    }

    /// A vocabulary in the shape of Llama's: `<unk>`, `<s>`, `</s>`, 256 byte tokens, pieces.
    fn small() -> (Vec<String>, Vec<f32>, Vec<i32>) {
        let mut toks: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2, 3, 3];
        for b in 0..=255u8 {
            toks.push(format!("<0x{b:02X}>"));
            types.push(6);
        }
        let mut scores = vec![0.0; toks.len()];
        // Scores fall with the id, as in Llama's vocabulary; "▁ab" is reachable from "▁a"+"b" and
        // from "▁"+"ab", "abc" outranks "▁ab".
        for (i, p) in ["ab", "abc", "▁a", "▁ab", "▁", "a", "b", "c"]
            .iter()
            .enumerate()
        {
            toks.push(p.to_string());
            types.push(1);
            scores.push(-(i as f32));
        }
        (toks, scores, types)
    }

    fn build(toks: &[String], scores: &[f32], types: &[i32]) -> tokenizers::Tokenizer {
        let t: Vec<&str> = toks.iter().map(String::as_str).collect();
        super::super::from_metadata(Path::new("t.gguf"), &meta(&t, scores, types)).unwrap()
    }

    fn ids_of(t: &tokenizers::Tokenizer, text: &str) -> Vec<String> {
        let e = t.encode(text, false).unwrap();
        e.get_tokens().to_vec()
    }

    #[test]
    fn merges_follow_the_merged_tokens_score_then_ids() {
        let (toks, scores, _) = small();
        let t: Vec<&str> = toks.iter().map(String::as_str).collect();
        let ids: HashMap<&str, u32> = t.iter().enumerate().map(|(i, s)| (*s, i as u32)).collect();
        let named: Vec<(&str, &str)> = merges(&t, &scores, &ids)
            .into_iter()
            .map(|(l, r)| (t[l as usize], t[r as usize]))
            .collect();
        // "ab" (score 0) first; "abc" (-1); "▁a" (-2); "▁ab" (-3): its two splits by left id,
        // "▁a" (id 261) before "▁" (263).
        assert_eq!(
            named,
            [
                ("a", "b"),
                ("ab", "c"),
                ("▁", "a"),
                ("▁a", "b"),
                ("▁", "ab")
            ]
        );
    }

    #[test]
    fn highest_score_merges_first_and_unknown_characters_fall_back_to_bytes() {
        let (toks, scores, types) = small();
        let t = build(&toks, &scores, &types);
        // "▁abc": "ab" first (highest score), then "abc" beats "▁ab" -> ▁ + abc.
        assert_eq!(ids_of(&t, "abc"), ["▁", "abc"]);
        // "▁ab": "ab" first, then "▁"+"ab".
        assert_eq!(ids_of(&t, "ab"), ["▁ab"]);
        // "é" is no token: its two UTF-8 bytes.
        assert_eq!(ids_of(&t, "aé"), ["▁a", "<0xC3>", "<0xA9>"]);
        assert_eq!(
            t.decode(t.encode("aé abc", false).unwrap().get_ids(), false)
                .unwrap(),
            "aé abc"
        );
        // BOS from the post-processor, as llama.cpp's `add_special`.
        assert_eq!(t.encode("a", true).unwrap().get_ids(), [1, 261]);
    }

    #[test]
    fn without_add_space_prefix_nothing_is_prepended() {
        let (toks, scores, types) = small();
        let t: Vec<&str> = toks.iter().map(String::as_str).collect();
        let mut m = meta(&t, &scores, &types);
        m.insert("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false));
        let tok = super::super::from_metadata(Path::new("t.gguf"), &m).unwrap();
        assert_eq!(ids_of(&tok, "ab c"), ["ab", "▁", "c"]);
        assert_eq!(
            tok.decode(tok.encode("ab c", false).unwrap().get_ids(), false)
                .unwrap(),
            "ab c"
        );
    }

    #[test]
    fn bad_spm_metadata_is_named() {
        let (toks, scores, types) = small();
        let t: Vec<&str> = toks.iter().map(String::as_str).collect();
        let err = |m: &HashMap<String, Value>| {
            super::super::from_metadata(Path::new("t.gguf"), m)
                .unwrap_err()
                .to_string()
        };
        let mut m = meta(&t, &scores, &types);
        m.remove("tokenizer.ggml.scores");
        assert!(
            err(&m).contains("`tokenizer.ggml.scores` is missing"),
            "{}",
            err(&m)
        );
        let mut m = meta(&t, &scores[1..], &types);
        assert!(
            err(&m).contains("expected an array of 267 floats"),
            "{}",
            err(&m)
        );
        m = meta(&t, &scores, &types);
        m.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(267));
        assert!(
            err(&m).contains(
                "`tokenizer.ggml.bos_token_id` is 267, but the vocabulary has 267 tokens"
            ),
            "{}",
            err(&m)
        );
        let mut dup = t.clone();
        dup[266] = "a";
        m = meta(&dup, &scores, &types);
        assert!(err(&m).contains("holds \"a\" twice"), "{}", err(&m));
    }
}
