//! Hostile inputs (issue 16): the small inputs committed under `tests/fixtures/fuzz/<target>/`
//! go through the same entry points as the fuzz targets of `fuzz/` (docs/fuzzing.md). None may
//! panic; a file named `ok-*` must load and one named `err-*` or `crash-*` must give an error,
//! and each input that once crashed a target has a test of its own that checks the message.

use std::path::{Path, PathBuf};

use xmoe_top::model::config::ModelConfig;
use xmoe_top::model::format::{ModelFile, expected_tensors};
use xmoe_top::model::hf::{HfConfig, check_shard_header, index_shard_files};
use xmoe_top::report::{ReportFormat, TraceReader, json};
use xmoe_top::workload::tokenizer::TextTokenizer;

fn dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fuzz")
        .join(target)
}

fn input(target: &str, name: &str) -> Vec<u8> {
    let p = dir(target).join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Runs `check` (the target's entry point: `Ok(())` or the error's message) on every committed
/// input of `target`, and checks the outcome its name promises.
fn replay(target: &str, check: impl Fn(&[u8]) -> Result<(), String>) {
    let mut names: Vec<String> = std::fs::read_dir(dir(target))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no inputs for {target}");
    for name in names {
        let outcome = check(&input(target, &name));
        if name.starts_with("ok-") {
            assert!(outcome.is_ok(), "{target}/{name}: {outcome:?}");
        } else if name.starts_with("err-") || name.starts_with("crash-") {
            let msg = outcome.expect_err(&format!("{target}/{name} was accepted"));
            assert!(!msg.is_empty(), "{target}/{name}: empty message");
        } else {
            panic!("{target}/{name}: name it ok-*, err-* or crash-*");
        }
    }
}

fn text(data: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(data).map_err(|e| e.to_string())
}

fn model_format(data: &[u8]) -> Result<(), String> {
    let file = ModelFile::from_vec("fuzz.safetensors", data.to_vec()).map_err(|e| e.to_string())?;
    let _ = file.tensor_table();
    Ok(())
}

fn model_config(data: &[u8]) -> Result<(), String> {
    let cfg = ModelConfig::from_json(text(data)?).map_err(|e| e.to_string())?;
    let _ = expected_tensors(&cfg, |_| true);
    let _ = expected_tensors(&cfg, |_| false);
    Ok(())
}

fn hf_config(data: &[u8]) -> Result<(), String> {
    let cfg = HfConfig::parse(Path::new("config.json"), text(data)?).map_err(|e| e.to_string())?;
    let model = cfg.model_config("fuzz");
    let _ = expected_tensors(&model, |_| true);
    Ok(())
}

fn hf_index(data: &[u8]) -> Result<(), String> {
    index_shard_files(Path::new("model.safetensors.index.json"), text(data)?)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The shard header, both as the whole file and as the head of a 1 TiB file: an error in either.
fn hf_shard_header(data: &[u8]) -> Result<(), String> {
    let path = Path::new("model.safetensors");
    let whole = check_shard_header(path, data, data.len());
    let head = check_shard_header(path, data, 1 << 40);
    whole.and(head).map(|_| ()).map_err(|e| e.to_string())
}

fn tokenizer(data: &[u8]) -> Result<(), String> {
    let t = TextTokenizer::from_bytes(Path::new("tokenizer.json"), data, 1 << 20)
        .map_err(|e| e.to_string())?;
    let enc = t
        .encode("The quick brown fox, 12 étés.".as_bytes())
        .map_err(|e| e.to_string())?;
    let _ = t.decode(&enc.ids);
    Ok(())
}

fn report_json(data: &[u8]) -> Result<(), String> {
    let report = json::read(text(data)?).map_err(|e| format!("{e:#}"))?;
    for format in ReportFormat::ALL {
        let _ = format.render(&report);
    }
    Ok(())
}

/// The header and every record: an error in any.
fn trace(data: &[u8]) -> Result<(), String> {
    let reader = TraceReader::new(data).map_err(|e| format!("{e:#}"))?;
    for record in reader {
        record.map_err(|e| format!("{e:#}"))?;
    }
    Ok(())
}

/// A recording as the `recording` target reads it: open, then every frame and the trace.
fn recording(data: &[u8]) -> Result<(), String> {
    let mut r = xmoe_top::record::Recording::from_bytes(data.to_vec(), "input")
        .map_err(|e| format!("{e:#}"))?;
    for i in 0..r.frames().len() {
        r.frame(i).map_err(|e| format!("{e:#}"))?;
    }
    let mut out = Vec::new();
    r.write_trace(&mut out).map_err(|e| format!("{e:#}"))?;
    trace(&out)
}

#[test]
fn recording_inputs() {
    replay("recording", recording);
}

#[test]
fn model_format_inputs() {
    replay("model_format", model_format);
}

#[test]
fn model_config_inputs() {
    replay("model_config", model_config);
}

#[test]
fn hf_config_inputs() {
    replay("hf_config", hf_config);
}

#[test]
fn hf_index_inputs() {
    replay("hf_index", hf_index);
}

#[test]
fn hf_shard_header_inputs() {
    replay("hf_shard_header", hf_shard_header);
}

#[test]
fn tokenizer_inputs() {
    replay("tokenizer", tokenizer);
}

#[test]
fn report_json_inputs() {
    replay("report_json", report_json);
}

#[test]
fn trace_inputs() {
    replay("trace", trace);
}

/// Found by the `tokenizer` target in its first seconds: a `decoder` object that is not
/// well-formed JSON (here a key without quotes) made `tokenizers` 0.23 panic
/// (`expect("Helper")` in its decoder deserializer) instead of returning an error.
#[test]
fn tokenizer_decoder_not_json_is_an_error() {
    let data = input("tokenizer", "crash-decoder-not-json.json");
    let err = TextTokenizer::from_bytes(Path::new("models/x/tokenizer.json"), &data, 1 << 20)
        .expect_err("accepted")
        .to_string();
    assert!(
        err.starts_with("models/x/tokenizer.json: not a valid tokenizer.json: ")
            && err.contains("line 1 column"),
        "{err}"
    );
}

/// A shard named `../x` or `/x` in the index would be read from outside the checkpoint.
#[test]
fn index_shard_outside_the_checkpoint_is_an_error() {
    for name in ["err-parent-dir", "err-absolute-path"] {
        let data = input("hf_index", name);
        let err = index_shard_files(
            Path::new("ckpt/model.safetensors.index.json"),
            text(&data).unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("ckpt/model.safetensors.index.json: ")
                && err.contains("not a file name inside the checkpoint directory"),
            "{name}: {err}"
        );
    }
    let ok = index_shard_files(
        Path::new("i.json"),
        r#"{"weight_map": {"a": "./m.safetensors", "b": "sub/m.safetensors"}}"#,
    )
    .unwrap();
    assert_eq!(ok.len(), 2);
}
