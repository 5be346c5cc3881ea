//! Bad Hugging Face checkpoints: each gives one clear error naming the file and what is wrong,
//! never a panic; and the binary exits non-zero with that line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use xmoe_top::model::{LoadOptions, Model, ModelSource};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(rel)
}

/// A copy of a fixture checkpoint folder to break.
fn copy_of(rel: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(rel)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let p = dir.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, &p).unwrap();
}

/// The error of opening and loading `path`, as the user sees it.
fn error_of(path: &Path) -> String {
    let source = match ModelSource::open(path) {
        Ok(s) => s,
        Err(e) => return e.to_string(),
    };
    match Model::from_source(&source, &Device::Cpu, LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "`{msg}` does not mention `{p}`");
    }
}

#[test]
fn directory_and_config_errors() {
    let empty = tempfile::tempdir().unwrap();
    assert_mentions(&error_of(empty.path()), &["no config.json"]);

    let d = copy_of("olmoe/per_expert");
    std::fs::write(d.path().join("config.json"), "{ not json").unwrap();
    assert_mentions(&error_of(d.path()), &["config.json", "not valid JSON"]);

    let d = copy_of("olmoe/per_expert");
    edit_config(d.path(), |c| {
        c.insert("model_type".into(), "llama".into());
    });
    assert_mentions(
        &error_of(d.path()),
        &[
            "config.json",
            "model_type \"llama\"",
            "mixtral, qwen2_moe, qwen3_moe, olmoe",
        ],
    );

    let d = copy_of("olmoe/per_expert");
    edit_config(d.path(), |c| {
        c.remove("hidden_size");
    });
    assert_mentions(
        &error_of(d.path()),
        &["config.json", "`hidden_size`", "missing"],
    );

    let d = copy_of("olmoe/per_expert");
    edit_config(d.path(), |c| {
        c.insert("num_experts_per_tok".into(), "two".into());
    });
    assert_mentions(
        &error_of(d.path()),
        &["`num_experts_per_tok`", "non-negative integer", "\"two\""],
    );

    let d = copy_of("olmoe/per_expert");
    edit_config(d.path(), |c| {
        c.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}),
        );
    });
    assert_mentions(
        &error_of(d.path()),
        &["rope_parameters", "\"dynamic\"", "not supported"],
    );
}

#[test]
fn sizes_from_config_json_are_bounded_before_anything_is_allocated() {
    for (key, value, want) in [
        (
            "num_hidden_layers",
            1_000_000_000u64,
            "at most 4096 supported, found 1000000000",
        ),
        ("hidden_size", 1 << 40, "at most 65536 supported"),
        ("vocab_size", 1 << 40, "at most 16777216 supported"),
    ] {
        let d = copy_of("olmoe/per_expert");
        edit_config(d.path(), |c| {
            c.insert(key.into(), value.into());
        });
        assert_mentions(&error_of(d.path()), &[key, want]);
    }
    // A huge context is capped (rotary tables are precomputed), not allocated.
    let d = copy_of("olmoe/per_expert");
    edit_config(d.path(), |c| {
        c.insert("max_position_embeddings".into(), (1u64 << 40).into());
    });
    let source = ModelSource::open(d.path()).unwrap();
    assert_eq!(
        source.config().max_seq_len,
        xmoe_top::model::hf::config::MAX_CONTEXT
    );
}

#[test]
fn shard_and_tensor_errors() {
    // An index naming a shard that is not there.
    let d = copy_of("mixtral/bf16");
    std::fs::remove_file(d.path().join("model-00002-of-00003.safetensors")).unwrap();
    assert_mentions(
        &error_of(d.path()),
        &[
            "model.safetensors.index.json",
            "model-00002-of-00003.safetensors",
            "does not exist",
        ],
    );

    // The same tensors in two shards.
    let d = copy_of("mixtral/bf16");
    std::fs::copy(
        d.path().join("model-00001-of-00003.safetensors"),
        d.path().join("extra.safetensors"),
    )
    .unwrap();
    let index = d.path().join("model.safetensors.index.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    v["weight_map"]["extra"] = "extra.safetensors".into();
    std::fs::write(&index, v.to_string()).unwrap();
    assert_mentions(&error_of(d.path()), &["is in both", "extra.safetensors"]);

    // A tensor in no shard.
    let d = copy_of("olmoe/per_expert");
    edit_tensors(d.path(), |t| {
        t.remove("model.layers.1.mlp.experts.3.up_proj.weight");
    });
    assert_mentions(
        &error_of(d.path()),
        &[
            "missing tensor `model.layers.1.mlp.experts.3.up_proj.weight`",
            "[12, 32]",
        ],
    );

    // A shape that disagrees with the config.
    let d = copy_of("olmoe/per_expert");
    edit_config(d.path(), |c| {
        c.insert("intermediate_size".into(), 13.into());
    });
    assert_mentions(
        &error_of(d.path()),
        &[
            "model.safetensors",
            "experts.0.gate_proj.weight",
            "[12, 32]",
            "expected [13, 32]",
        ],
    );

    // A dtype it cannot run.
    let d = copy_of("olmoe/per_expert");
    edit_tensors(d.path(), |t| {
        let n = Tensor::zeros(32, candle_core::DType::I64, &Device::Cpu).unwrap();
        t.insert("model.norm.weight".into(), n);
    });
    assert_mentions(&error_of(d.path()), &["model.norm.weight", "dtype I64"]);
}

#[test]
fn a_model_larger_than_memory_is_refused_before_loading() {
    let source = ModelSource::open(&fixture("olmoe/per_expert")).unwrap();
    let need = source.resident_weight_bytes() as u64;
    assert_eq!(source.check_fits(Some(need), false).unwrap(), None);
    let msg = source
        .check_fits(Some(need - 1), false)
        .unwrap_err()
        .to_string();
    assert_mentions(&msg, &["GiB of memory is available", "--allow-large"]);
    // Experts read in place need no memory of their own: what does not fit beside the rest is a
    // note (it pages), and only the rest can be too large.
    let experts = source.in_place_bytes(true) as u64;
    assert!(experts > 0 && experts < need, "{experts} of {need} bytes");
    assert_eq!(source.check_fits(Some(need), true).unwrap(), None);
    let note = source.check_fits(Some(need - 1), true).unwrap().unwrap();
    assert_mentions(&note, &["read in place", "read from disk"]);
    assert!(
        source
            .check_fits(Some(need - experts), true)
            .unwrap()
            .is_some()
    );
    let msg = source
        .check_fits(Some(need - experts - 1), true)
        .unwrap_err()
        .to_string();
    assert_mentions(&msg, &["GiB of memory is available"]);
}

#[test]
fn the_binary_prints_one_line_and_exits_non_zero() {
    let d = copy_of("olmoe/per_expert");
    edit_config(d.path(), |c| {
        c.insert("model_type".into(), "gemma".into());
    });
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xmoe-top"))
        .args(["inspect"])
        .arg(d.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_mentions(&err, &["model_type \"gemma\"", "supported model types"]);
}

#[test]
fn a_missing_or_mismatched_tokenizer_stops_the_run() {
    let run = |dir: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_xmoe-top"))
            .args(["run", "--headless", "--tokens", "64"])
            .arg(dir)
            .output()
            .unwrap()
    };
    let d = copy_of("olmoe/per_expert");
    std::fs::remove_file(d.path().join("tokenizer.json")).unwrap();
    let out = run(d.path());
    assert!(!out.status.success());
    assert_mentions(
        &String::from_utf8_lossy(&out.stderr),
        &["tokenizer.json", "cannot read the tokenizer"],
    );
    // A vocabulary larger than the embedding.
    let d = copy_of("olmoe/per_expert");
    edit_config(d.path(), |c| {
        c.insert("vocab_size".into(), 300.into());
    });
    edit_tensors(d.path(), |t| {
        for name in ["model.embed_tokens.weight", "lm_head.weight"] {
            let narrowed = t[name].narrow(0, 0, 300).unwrap().contiguous().unwrap();
            t.insert(name.into(), narrowed);
        }
    });
    let out = run(d.path());
    assert!(!out.status.success());
    assert_mentions(
        &String::from_utf8_lossy(&out.stderr),
        &["tokenizer.json", "512 tokens", "300 rows"],
    );
}

#[test]
fn malformed_gpt_oss_configs_and_mxfp4_tensors_are_named() {
    // One `layer_types` entry for two layers.
    let d = copy_of("gpt_oss/fused");
    edit_config(d.path(), |c| {
        c.insert(
            "layer_types".into(),
            serde_json::json!(["sliding_attention"]),
        );
    });
    assert_mentions(
        &error_of(d.path()),
        &[
            "config.json",
            "layer_types",
            "num_hidden_layers 2",
            "found 1 entries",
        ],
    );

    // An attention kind transformers does not know.
    let d = copy_of("gpt_oss/fused");
    edit_config(d.path(), |c| {
        c.insert(
            "layer_types".into(),
            serde_json::json!(["sliding_attention", "chunked_attention"]),
        );
    });
    assert_mentions(
        &error_of(d.path()),
        &["layer_types", "\"chunked_attention\""],
    );

    // YaRN without the pretraining context it scales from.
    let d = copy_of("gpt_oss/fused");
    edit_config(d.path(), |c| {
        c["rope_parameters"]
            .as_object_mut()
            .unwrap()
            .remove("original_max_position_embeddings");
    });
    assert_mentions(
        &error_of(d.path()),
        &["rope_parameters.original_max_position_embeddings", "yarn"],
    );

    // A rope type that is not implemented.
    let d = copy_of("gpt_oss/fused");
    edit_config(d.path(), |c| {
        c["rope_parameters"]["rope_type"] = "longrope".into();
    });
    assert_mentions(&error_of(d.path()), &["rope type \"longrope\""]);

    // A missing sink tensor is named with its expected shape.
    let d = copy_of("gpt_oss/fused");
    edit_tensors(d.path(), |t| {
        t.remove("model.layers.1.self_attn.sinks");
    });
    assert_mentions(
        &error_of(d.path()),
        &["model.layers.1.self_attn.sinks", "[4]"],
    );

    // MXFP4 blocks of the wrong dtype, and of the wrong shape.
    let d = copy_of("gpt_oss/fused");
    edit_tensors(d.path(), |t| {
        t.remove("model.layers.0.mlp.experts.gate_up_proj");
        t.insert(
            "model.layers.0.mlp.experts.gate_up_proj_blocks".into(),
            Tensor::zeros((8, 24, 1, 16), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        t.insert(
            "model.layers.0.mlp.experts.gate_up_proj_scales".into(),
            Tensor::zeros((8, 24, 1), candle_core::DType::U8, &Device::Cpu).unwrap(),
        );
    });
    assert_mentions(
        &error_of(d.path()),
        &["MXFP4", "gate_up_proj_blocks", "dtype F32, expected U8"],
    );
    let d = copy_of("gpt_oss/fused");
    edit_tensors(d.path(), |t| {
        t.remove("model.layers.0.mlp.experts.gate_up_proj");
        t.insert(
            "model.layers.0.mlp.experts.gate_up_proj_blocks".into(),
            Tensor::zeros((8, 12, 1, 16), candle_core::DType::U8, &Device::Cpu).unwrap(),
        );
        t.insert(
            "model.layers.0.mlp.experts.gate_up_proj_scales".into(),
            Tensor::zeros((8, 12, 1), candle_core::DType::U8, &Device::Cpu).unwrap(),
        );
    });
    assert_mentions(
        &error_of(d.path()),
        &[
            "gate_up_proj_blocks",
            "[8, 12, 1, 16]",
            "expected [8, 24, 1, 16]",
        ],
    );
}
