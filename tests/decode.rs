//! The lean decode path (`model::decode`) against the candle path: the same tokens decoded both
//! ways, logits within float rounding and expert choices identical, on the embedded model and on
//! every Hugging Face fixture family it covers; the KV cache handed between the two paths; and
//! generate mode using it.

use candle_core::Device;
use xmoe_top::model::trace::ForwardTrace;
use xmoe_top::model::{DecodePath, LoadOptions, Model, ModelSource, RoutingConfig};
use xmoe_top::routing::RoutingPolicy;
use xmoe_top::workload::{GenerateSpec, Workload};

#[path = "support/golden.rs"]
mod golden;
use golden::hf_fixtures;

/// Logits may differ by float rounding only: both paths accumulate in f32, in different orders
/// (candle's gemm blocks, the lean path's matvec lanes and its per-key attention loop). Relative
/// to `1 + |logit|`, measured on this machine (AVX2): at most 1.2e-5 on the embedded model (four
/// LayerNorm blocks, logits up to ~20) and 2.1e-6 on the fixtures. 1e-4 leaves room for other
/// CPUs' rounding; a real mistake (a wrong position, head, norm or bias) changes the computation
/// itself, not its rounding.
const TOL: f32 = 1e-4;

/// What one decoded step leaves: logits and, per MoE slot, the chosen experts in rank order.
struct Step {
    logits: Vec<f32>,
    experts: Vec<Vec<u16>>,
    lean: bool,
}

/// Prefill `prompt` (a full pass), then decode `tokens` one at a time (teacher-forced, so both
/// paths see the same inputs), with the lean path on or off.
fn decode_all(
    model: &mut Model,
    lean: bool,
    routing: &RoutingConfig,
    prompt: &[u32],
    tokens: &[u32],
) -> Vec<Step> {
    model.set_lean_decode(lean);
    let mut cache = model.new_cache(1);
    let mut trace = ForwardTrace::default();
    model
        .forward(prompt, 1, routing, Some(&mut cache), &mut trace)
        .unwrap();
    assert!(!trace.lean_decode, "a prefill is a full pass");
    tokens
        .iter()
        .map(|&t| {
            let logits = model
                .decode(t, routing, &mut cache, &mut trace)
                .unwrap()
                .to_vec();
            Step {
                logits,
                experts: trace
                    .moe
                    .iter()
                    .map(|m| m.routing.experts.clone())
                    .collect(),
                lean: trace.lean_decode,
            }
        })
        .collect()
}

/// Largest |a - b| / (1 + |b|).
fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f32::max)
}

/// Decodes both ways under each policy and compares; returns the largest logit difference.
fn compare(model: &mut Model, name: &str, prompt: &[u32], tokens: &[u32]) -> f32 {
    assert_eq!(
        model.decode_path(),
        &DecodePath::Lean,
        "{name} should decode on the lean path"
    );
    let cfg = model.config().clone();
    let n_moe = model.moe_layers().len();
    let policies = [
        RoutingPolicy::threshold(0.9),
        RoutingPolicy::threshold(0.5),
        RoutingPolicy::TopK {
            k: 2.min(cfg.n_experts),
            renormalize: true,
        },
        RoutingPolicy::Dense,
    ];
    let mut worst = 0.0f32;
    for policy in policies {
        let routing = RoutingConfig::uniform(policy, n_moe, cfg.n_experts).unwrap();
        let lean = decode_all(model, true, &routing, prompt, tokens);
        let candle = decode_all(model, false, &routing, prompt, tokens);
        for (i, (l, c)) in lean.iter().zip(&candle).enumerate() {
            assert!(
                l.lean && !c.lean,
                "{name} {policy}: step {i} took the wrong path"
            );
            let diff = max_rel(&l.logits, &c.logits);
            assert!(
                diff <= TOL,
                "{name} {policy}: step {i} logits differ by {diff:e} (tolerance {TOL:e})"
            );
            assert_eq!(
                l.experts, c.experts,
                "{name} {policy}: step {i} chose other experts"
            );
            worst = worst.max(diff);
        }
    }
    model.set_lean_decode(true);
    worst
}

fn bytes(s: &[u8]) -> Vec<u32> {
    s.iter().map(|&b| u32::from(b)).collect()
}

#[test]
fn embedded_model_decodes_the_same_on_both_paths() {
    let file = xmoe_top::embedded::model_file().unwrap();
    let mut model = Model::from_file(&file, &Device::Cpu, LoadOptions::default()).unwrap();
    let worst = compare(
        &mut model,
        "embedded",
        &bytes(b"And God said, "),
        &bytes(b"Let there be light: and there was light. And God saw"),
    );
    eprintln!("embedded: largest logit difference {worst:e}");
}

/// Every Hugging Face fixture family whose blocks the lean path covers (f32 and bf16 weights,
/// grouped-query attention, q/k norms, sliding windows, shared experts, DeepSeek's latent
/// attention and routers), and the ones it does not, which must say why.
#[test]
fn hf_fixture_families_decode_the_same_on_both_paths_or_say_why_not() {
    let covered = [
        "mixtral/per_expert",
        "mixtral/bf16/model.safetensors.index.json",
        "qwen2_moe/fused",
        "qwen3_moe/per_expert",
        "olmoe/fused",
        // q_proj, group-limited softmax router, YaRN with mscale, two shared experts.
        "deepseek_v2/per_expert",
        "deepseek_v2/fused",
        // q_a_proj + q_a_layernorm + q_b_proj, sigmoid router with a correction bias,
        // rope_interleave.
        "deepseek_v3/per_expert",
        "deepseek_v3/fused",
    ];
    let prompt: Vec<u32> = vec![5, 17, 300, 42];
    let tokens: Vec<u32> = (0..12).map(|i| (i * 37 + 11) % 500).collect();
    for path in covered {
        let source = ModelSource::open(&hf_fixtures().join(path)).unwrap();
        let mut model = Model::from_source(&source, &Device::Cpu, LoadOptions::default()).unwrap();
        let worst = compare(&mut model, path, &prompt, &tokens);
        eprintln!("{path}: largest logit difference {worst:e}");
    }
    for (path, why) in [
        ("gpt_oss/fused", "candle path"),
        ("../gguf/deepseek_v2.q8_0.gguf", "quantised (GGUF)"),
    ] {
        let source = ModelSource::open(&hf_fixtures().join(path)).unwrap();
        let model = Model::from_source(&source, &Device::Cpu, LoadOptions::default()).unwrap();
        match model.decode_path() {
            DecodePath::Candle { reason } => {
                assert!(reason.contains(why), "{path}: {reason}")
            }
            DecodePath::Lean => panic!("{path} has parts the lean path does not cover"),
        }
    }
}

/// llama.cpp's DeepSeek files in F32, in both key/value layouts: the split `attn_k_b` /
/// `attn_v_b` (read in place, already in the absorbed form) and the legacy `attn_kv_b`.
#[test]
fn f32_gguf_deepseek_files_decode_the_same_on_both_paths() {
    let prompt: Vec<u32> = vec![5, 17, 300, 42];
    let tokens: Vec<u32> = (0..12).map(|i| (i * 37 + 11) % 500).collect();
    for stem in ["deepseek_v2", "deepseek_v3", "deepseek_v3-kvb"] {
        let path = hf_fixtures().join(format!("../gguf/{stem}.f32.gguf"));
        let source = ModelSource::open(&path).unwrap();
        let mut model = Model::from_source(&source, &Device::Cpu, LoadOptions::default()).unwrap();
        let worst = compare(&mut model, stem, &prompt, &tokens);
        eprintln!("{stem}.f32.gguf: largest logit difference {worst:e}");
    }
}

/// Prefill, lean steps, then a full pass that continues the cache: the full pass must see the
/// positions the lean path decoded (and the lean path those of the prefill).
#[test]
fn the_kv_cache_passes_between_the_two_paths() {
    let file = xmoe_top::embedded::model_file().unwrap();
    let model = Model::from_file(&file, &Device::Cpu, LoadOptions::default()).unwrap();
    let text = bytes(b"In the beginning God created the heaven and the earth.");
    cache_round_trip(&model, "embedded", &text, b'!'.into());
}

/// The same with latent attention, whose cache holds latents and rotated shared keys.
#[test]
fn the_latent_kv_cache_passes_between_the_two_paths() {
    let text: Vec<u32> = (0..40).map(|i| (i * 53 + 7) % 500).collect();
    for path in ["deepseek_v2/per_expert", "deepseek_v3/fused"] {
        let source = ModelSource::open(&hf_fixtures().join(path)).unwrap();
        let model = Model::from_source(&source, &Device::Cpu, LoadOptions::default()).unwrap();
        assert_eq!(model.decode_path(), &DecodePath::Lean, "{path}");
        cache_round_trip(&model, path, &text, 321);
    }
}

/// Prefills `text[..10]`, decodes `text[10..30]` lean, runs the rest as a full pass on the same
/// cache, then decodes `next` lean, comparing with full passes over everything.
fn cache_round_trip(model: &Model, name: &str, text: &[u32], next: u32) {
    let routing = model.default_routing();
    let (prompt, middle, tail) = (&text[..10], &text[10..30], &text[30..]);
    let mut trace = ForwardTrace::default();

    let mut mixed = model.new_cache(1);
    model
        .forward(prompt, 1, &routing, Some(&mut mixed), &mut trace)
        .unwrap();
    for &t in middle {
        model.decode(t, &routing, &mut mixed, &mut trace).unwrap();
        assert!(trace.lean_decode);
    }
    let got = model
        .forward(tail, 1, &routing, Some(&mut mixed), &mut trace)
        .unwrap();
    assert!(!trace.lean_decode);
    assert_eq!(mixed.len(), text.len());

    // Reference: one full pass over everything.
    let all = model.forward(text, 1, &routing, None, &mut trace).unwrap();
    let vocab = model.config().vocab_size;
    let want = &all[(prompt.len() + middle.len()) * vocab..];
    let diff = max_rel(&got, want);
    assert!(
        diff <= TOL,
        "{name}: continued cache: logits differ by {diff:e}"
    );

    // And lean again after that full pass, against the full pass's next position.
    let after = model.decode(next, &routing, &mut mixed, &mut trace);
    let after = after.unwrap().to_vec();
    assert!(trace.lean_decode);
    let mut with = text.to_vec();
    with.push(next);
    let all = model.forward(&with, 1, &routing, None, &mut trace).unwrap();
    let diff = max_rel(&after, &all[text.len() * vocab..]);
    assert!(
        diff <= TOL,
        "{name}: lean after a full pass: logits differ by {diff:e}"
    );
}

/// Generate mode (what the session runs for `--workload generate`) decodes on the lean path:
/// prefill passes are full passes, every decode pass is lean.
#[test]
fn generate_mode_decodes_on_the_lean_path() {
    let file = xmoe_top::embedded::model_file().unwrap();
    let model = Model::from_file(&file, &Device::Cpu, LoadOptions::default()).unwrap();
    let mut w = Workload::generate(
        GenerateSpec {
            prompts: vec![b"And God said".to_vec()],
            source: "test".into(),
            max_len: 24,
            temperature: 0.0,
            seed: 1,
        },
        model.config(),
    )
    .unwrap();
    let routing = model.default_routing();
    let mut trace = ForwardTrace::default();
    let (mut prefills, mut decodes) = (0, 0);
    for _ in 0..30 {
        let out = w.run_pass(&model, &routing, &mut trace).unwrap();
        if out.tokens == 1 {
            assert!(trace.lean_decode, "a decode pass ran on candle");
            decodes += 1;
        } else {
            assert!(!trace.lean_decode);
            prefills += 1;
        }
    }
    assert!(
        prefills >= 2 && decodes >= 24,
        "{prefills} prefills, {decodes} decodes"
    );
}

/// A model that has to stay on candle says so, and decodes there.
#[test]
fn candle_expert_dispatch_keeps_the_candle_decode_path() {
    let file = xmoe_top::embedded::model_file().unwrap();
    let options = LoadOptions {
        dispatch: xmoe_top::model::MoeDispatch::Candle,
        ..Default::default()
    };
    let model = Model::from_file(&file, &Device::Cpu, options).unwrap();
    let DecodePath::Candle { reason } = model.decode_path() else {
        panic!("candle experts cannot decode on the lean path");
    };
    assert!(reason.contains("layer 0"), "{reason}");
    let mut cache = model.new_cache(1);
    let mut trace = ForwardTrace::default();
    let routing = model.default_routing();
    model
        .forward(&bytes(b"And"), 1, &routing, Some(&mut cache), &mut trace)
        .unwrap();
    let logits = model.decode(b' '.into(), &routing, &mut cache, &mut trace);
    assert_eq!(logits.unwrap().len(), model.config().vocab_size);
    assert!(!trace.lean_decode);
}
