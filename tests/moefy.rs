//! `xmoe-top moefy` on a tiny synthetic Llama checkpoint written here: the converted file
//! reproduces the dense logits when every expert is selected, loads in every command's engine
//! with its stored tokenizer, and each bad input gets one clear line and a non-zero exit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{QTensor, gguf_file};
use candle_core::{Device, Tensor};
use xmoe_top::model::Model;
use xmoe_top::model::config::Combine;
use xmoe_top::model::forward::RoutingConfig;
use xmoe_top::model::trace::ForwardTrace;
use xmoe_top::moefy::{DenseModel, Lm};
use xmoe_top::routing::RoutingPolicy;
use xmoe_top::workload::tokenizer::TextTokenizer;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// A Llama checkpoint of random weights: 2 blocks, d 32, 4 heads of 8 with 2 KV heads, SwiGLU FFN
/// of 64, an untied LM head, and the 512-token tokenizer of the Mixtral fixture.
fn tiny_llama(dir: &Path, model_type: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let (d, ffn, v, heads, kv, hd) = (32usize, 64usize, 512usize, 4usize, 2usize, 8usize);
    let cfg = serde_json::json!({
        "model_type": model_type,
        "hidden_size": d,
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hd,
        "intermediate_size": ffn,
        "vocab_size": v,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": false,
        "hidden_act": "silu"
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let dev = Device::Cpu;
    let r = |shape: &[usize], scale: f64| {
        (Tensor::randn(0f32, 1.0, shape, &dev).unwrap() * scale).unwrap()
    };
    let ones = |n: usize| {
        (Tensor::ones(n, candle_core::DType::F32, &dev).unwrap() + r(&[n], 0.1)).unwrap()
    };
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), r(&[v, d], 1.0));
    t.insert("lm_head.weight".into(), r(&[v, d], 0.2));
    t.insert("model.norm.weight".into(), ones(d));
    for i in 0..2 {
        let p = format!("model.layers.{i}");
        t.insert(format!("{p}.input_layernorm.weight"), ones(d));
        t.insert(format!("{p}.post_attention_layernorm.weight"), ones(d));
        t.insert(
            format!("{p}.self_attn.q_proj.weight"),
            r(&[heads * hd, d], 0.3),
        );
        t.insert(
            format!("{p}.self_attn.k_proj.weight"),
            r(&[kv * hd, d], 0.3),
        );
        t.insert(
            format!("{p}.self_attn.v_proj.weight"),
            r(&[kv * hd, d], 0.3),
        );
        t.insert(
            format!("{p}.self_attn.o_proj.weight"),
            r(&[d, heads * hd], 0.2),
        );
        t.insert(format!("{p}.mlp.gate_proj.weight"), r(&[ffn, d], 0.3));
        t.insert(format!("{p}.mlp.up_proj.weight"), r(&[ffn, d], 0.3));
        t.insert(format!("{p}.mlp.down_proj.weight"), r(&[d, ffn], 0.2));
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    std::fs::copy(
        repo("tests/fixtures/hf/mixtral/per_expert/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
}

/// `xmoe-top ARGS`: exit code, stdout, stderr.
fn xmoe(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xmoe-top"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

const CALIB: &str = "assets/kjv-train.txt";

#[test]
fn selecting_every_expert_reproduces_the_dense_logits_and_the_file_is_self_describing() {
    let tmp = tempfile::tempdir().unwrap();
    let dense_dir = tmp.path().join("tiny-llama");
    tiny_llama(&dense_dir, "llama");
    let out = tmp.path().join("tiny-xmoe.safetensors");
    let (code, stdout, stderr) = xmoe(&[
        "moefy",
        s(&dense_dir),
        "--experts",
        "8",
        "--calib",
        s(&repo(CALIB)),
        "--calib-tokens",
        "512",
        "--seq-len",
        "64",
        "--router-steps",
        "30",
        "--eval-tokens",
        "256",
        "--out",
        s(&out),
    ]);
    assert_eq!(code, 0, "{stderr}");
    // The closing table: dense and five thresholds, FLOPs shares below 100% under a threshold.
    assert!(
        stdout.contains("bits/byte") && stdout.contains("t 0.50"),
        "{stdout}"
    );

    let model = Model::load(&out, &Device::Cpu).unwrap();
    let cfg = model.config();
    assert_eq!(cfg.combine, Combine::Sum);
    assert_eq!(
        (
            cfg.n_kv_heads,
            cfg.head_size,
            cfg.n_experts,
            cfg.expert_hidden
        ),
        (Some(2), Some(8), 8, 8)
    );
    assert!(!cfg.tie_embeddings);

    // The stored tokenizer is the checkpoint's.
    let stored = TextTokenizer::from_file(model.tokenizer_path().unwrap(), cfg.vocab_size).unwrap();
    let original =
        TextTokenizer::from_file(&dense_dir.join("tokenizer.json"), cfg.vocab_size).unwrap();
    let text = b"In the beginning God created the heaven and the earth.";
    assert_eq!(stored.encode(text).unwrap(), original.encode(text).unwrap());
    assert!(!stored.is_byte());

    let ids: Vec<u32> = stored.encode(text).unwrap().ids;
    let dense = Lm::new(&DenseModel::open(&dense_dir).unwrap()).unwrap();
    let want = dense
        .dense_logits(&ids, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut trace = ForwardTrace::default();
    for policy in [RoutingPolicy::Dense, RoutingPolicy::threshold(1.0)] {
        let routing = RoutingConfig::uniform(policy, 2, 8).unwrap();
        let got = model.forward(&ids, 1, &routing, None, &mut trace).unwrap();
        let diff = max_rel_diff(&got, &want);
        assert!(
            diff < 1e-5,
            "{policy:?}: logits off by {diff} of their range"
        );
    }
    // A threshold below 1 selects fewer experts and changes the logits.
    let routing = RoutingConfig::uniform(RoutingPolicy::threshold(0.3), 2, 8).unwrap();
    let got = model.forward(&ids, 1, &routing, None, &mut trace).unwrap();
    assert!(max_rel_diff(&got, &want) > 1e-4);

    // Every command opens it: inspect, and a headless run that tokenizes with the stored tokenizer.
    let (code, stdout, stderr) = xmoe(&["inspect", s(&out)]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("tiny-llama-moefy8"), "{stdout}");
    let (code, stdout, stderr) = xmoe(&[
        "run",
        s(&out),
        "--headless",
        "--tokens",
        "256",
        "--text",
        s(&repo("assets/kjv-heldout.txt")),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("bits per byte"), "{stdout}");
}

#[test]
fn bad_input_gets_one_clear_line_and_a_non_zero_exit() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("llama");
    tiny_llama(&good, "llama");
    let mistral = tmp.path().join("mistral");
    tiny_llama(&mistral, "mistral");
    let out = tmp.path().join("out.safetensors");
    let calib = repo(CALIB);
    let short = tmp.path().join("short.txt");
    std::fs::write(
        &short,
        "In the beginning God created the heaven and the earth.",
    )
    .unwrap();
    let existing = tmp.path().join("existing.safetensors");
    std::fs::write(&existing, b"not mine to overwrite").unwrap();

    // A GGUF whose tokenizer lacks its merges.
    let fixture = repo("tests/fixtures/gguf/llama-dense.f32.gguf");
    let mut f = std::fs::File::open(&fixture).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let meta: Vec<(&str, &gguf_file::Value)> = c
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "tokenizer.ggml.merges")
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensors: Vec<(String, QTensor)> = c
        .tensor_infos
        .keys()
        .map(|n| (n.clone(), c.tensor(&mut f, n, &Device::Cpu).unwrap()))
        .collect();
    let no_merges = tmp.path().join("no-merges.gguf");
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(
        &mut std::fs::File::create(&no_merges).unwrap(),
        &meta,
        &refs,
    )
    .unwrap();

    let base = |dense: &Path, experts: &str, calib: &Path, out: &Path| -> Vec<String> {
        [
            "moefy",
            s(dense),
            "--experts",
            experts,
            "--calib",
            s(calib),
            "--calib-tokens",
            "512",
            "--out",
            s(out),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let cases: Vec<(Vec<String>, i32, &[&str])> = vec![
        (
            base(&mistral, "8", &calib, &out),
            3,
            &["unsupported dense architecture", "\"mistral\"", "llama"],
        ),
        (
            base(
                &repo("tests/fixtures/gguf/qwen3_moe.f32.gguf"),
                "8",
                &calib,
                &out,
            ),
            3,
            &["qwen3moe", "llama"],
        ),
        (
            base(&good, "7", &calib, &out),
            2,
            &["--experts 7 does not divide the FFN width 64", "2, 4, 8"],
        ),
        (
            base(&good, "128", &calib, &out),
            2,
            &["--experts 128 must be in 1..=64"],
        ),
        (
            base(&good, "8", &short, &out),
            3,
            &[
                "short.txt",
                "has 21 tokens",
                "needs 512",
                "lower --calib-tokens",
            ],
        ),
        (
            base(&good, "8", &calib, &existing),
            2,
            &["existing.safetensors already exists", "--force"],
        ),
        (
            base(&no_merges, "2", &calib, &out),
            3,
            &["no-merges.gguf", "tokenizer.ggml.merges", "missing"],
        ),
    ];
    for (args, want_code, needles) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, stderr) = xmoe(&args);
        assert_eq!(code, want_code, "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        for n in needles {
            assert!(stderr.contains(n), "{args:?}: `{n}` not in {stderr}");
        }
    }
    assert!(!out.exists());
    assert_eq!(std::fs::read(&existing).unwrap(), b"not mine to overwrite");
}
