//! The tokenizers rebuilt from GGUF metadata against llama.cpp's own tokenizer tests: its
//! vocabulary-only files `models/ggml-vocab-NAME.gguf`, the texts in `.gguf.inp` (separated by
//! lines `__ggml_vocab_test__`) and the ids expected for each in `.gguf.out` (one line per text,
//! ids separated by spaces; produced by the model's Hugging Face tokenizer, without BOS/EOS:
//! llama.cpp's `tests/test-tokenizer-0.cpp` tokenizes with `add_special = false`). Every text must
//! give exactly those ids, and decode back to itself.
//!
//! The files come from the PyPI source package `llama-cpp-python` 0.3.36 (MIT), fetched by
//! `scripts/fetch-llama-vocab.sh` (CI runs it through `scripts/fetch-test-data.sh`); without them
//! these tests fail, they do not skip.

use std::path::{Path, PathBuf};
use std::time::Instant;

fn vocab_file(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/models/llama-vocab")
        .join(format!("ggml-vocab-{name}.gguf"));
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-llama-vocab.sh (or scripts/fetch-test-data.sh; it downloads llama-cpp-python 0.3.36 from PyPI and checks the SHA-256)",
        p.display()
    );
    p
}

/// The (text, expected ids) pairs of `file`'s `.inp` and `.out`, split as test-tokenizer-0.cpp
/// splits them.
fn cases(file: &Path) -> Vec<(String, Vec<u32>)> {
    let read = |ext: &str| {
        let p = PathBuf::from(format!("{}.{ext}", file.display()));
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let inp = read("inp");
    let out = read("out");
    let sep = "\n__ggml_vocab_test__\n";
    let mut texts = Vec::new();
    let mut pos = 0;
    while pos < inp.len() {
        match inp[pos..].find(sep) {
            Some(next) => {
                texts.push(inp[pos..pos + next].to_string());
                pos += next + sep.len();
            }
            None => {
                texts.push(inp[pos..].to_string());
                break;
            }
        }
    }
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(
        texts.len(),
        ids.len(),
        "{}: texts and id lines",
        file.display()
    );
    texts.into_iter().zip(ids).collect()
}

/// Checks every case of `ggml-vocab-{name}.gguf`; returns the number of texts and the time to
/// build the tokenizer from the file.
fn check(name: &str) -> (usize, f64) {
    let file = vocab_file(name);
    let t0 = Instant::now();
    let tok = xmoe_top::workload::gguf_tokenizer::from_file(&file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let build = t0.elapsed().as_secs_f64();
    let cases = cases(&file);
    let mut failures = Vec::new();
    for (text, want) in &cases {
        let enc = tok.encode(text.as_str(), false).unwrap();
        let got = enc.get_ids();
        if got != want.as_slice() {
            failures.push(format!(
                "{text:?}\n  expected {want:?} {:?}\n  got      {got:?} {:?}",
                want.iter()
                    .map(|&i| tok.id_to_token(i).unwrap_or_default())
                    .collect::<Vec<_>>(),
                enc.get_tokens()
            ));
            continue;
        }
        let back = tok.decode(got, false).unwrap();
        if &back != text {
            failures.push(format!("{text:?} decodes back to {back:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "ggml-vocab-{name}.gguf: {} of {} texts differ from llama.cpp's expected ids:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    eprintln!(
        "ggml-vocab-{name}.gguf: {} texts identical; tokenizer built in {build:.3} s",
        cases.len()
    );
    (cases.len(), build)
}

#[test]
fn llama_spm_sentencepiece_gives_llama_cpps_ids() {
    let (n, build) = check("llama-spm");
    assert_eq!(n, 46);
    // Merges are derived from 32k scores with one lookup per character boundary; a quadratic
    // derivation (every token pair) would take minutes here.
    assert!(build < 10.0, "building took {build:.1} s");
}

#[test]
fn deepseek_llm_pre_tokenizer_gives_llama_cpps_ids() {
    check("deepseek-llm");
}

#[test]
fn deepseek_coder_pre_tokenizer_gives_llama_cpps_ids() {
    check("deepseek-coder");
}

#[test]
fn gpt2_pre_tokenizer_gives_llama_cpps_ids() {
    check("gpt-2");
}

#[test]
fn llama_bpe_pre_tokenizer_gives_llama_cpps_ids() {
    check("llama-bpe");
}

#[test]
fn qwen2_pre_tokenizer_gives_llama_cpps_ids() {
    check("qwen2");
}

/// What generate mode shows: the tokens of a text, each turned into bytes on its own
/// (`TextTokenizer::token_bytes`), must spell the text with its spaces. A SentencePiece
/// decoder strips the space a word starts with when the word opens the text, so decoding a
/// token alone ran generated words together.
#[test]
fn tokens_shown_one_at_a_time_keep_their_spaces() {
    use xmoe_top::workload::tokenizer::TextTokenizer;
    let text = "Hello world, it is a test of 42 tokens.";
    for (name, shown) in [
        ("llama-spm", format!(" {text}")),
        ("gpt-2", text.to_string()),
    ] {
        let file = vocab_file(name);
        let vocab = xmoe_top::workload::gguf_tokenizer::from_file(&file)
            .unwrap()
            .get_vocab_size(true);
        let tok = TextTokenizer::from_file(&file, vocab).unwrap();
        let ids = tok.encode(text.as_bytes()).unwrap().ids;
        let bytes: Vec<u8> = ids.iter().flat_map(|&i| tok.token_bytes(i)).collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), shown, "{name}");
    }
}
