//! Hugging Face checkpoints against the `transformers` goldens in `tests/fixtures/hf/` (written by
//! `scripts/hf-goldens/generate.py`): logits, the native top-k of every MoE layer, and the
//! threshold rule on the same router probabilities against a naive reference.

use std::path::Path;

use candle_core::{Device, Tensor};
use xmoe_top::model::trace::ForwardTrace;
use xmoe_top::model::{ExpertStorage, LoadOptions, Model, ModelSource, MoeDispatch, RoutingConfig};
use xmoe_top::routing::RoutingPolicy;

#[path = "support/golden.rs"]
mod golden;
use golden::{
    f32s, golden_tensors as goldens, hf_fixtures as fixtures, input_ids as ids, load, load_with,
    max_rel, run,
};

const FAMILIES: &[(&str, &[&str])] = &[
    ("mixtral", &["per_expert", "fused"]),
    ("qwen2_moe", &["per_expert", "fused"]),
    ("qwen3_moe", &["per_expert", "fused"]),
    ("olmoe", &["per_expert", "fused"]),
    // transformers writes gpt-oss only in its fused `x @ W` layout (MXFP4: see the test below).
    ("gpt_oss", &["fused"]),
];

#[test]
fn f32_checkpoints_match_transformers_logits_and_native_top_k() {
    for &(family, layouts) in FAMILIES {
        let g = goldens(&fixtures().join(family).join("golden.safetensors"));
        let tokens = ids(&g);
        let want = f32s(&g["logits"]);
        for layout in layouts {
            // The candle path, the kernel on experts read in place (the default), and the kernel
            // on packed experts.
            for (dispatch, experts) in [
                (MoeDispatch::Candle, ExpertStorage::Auto),
                (MoeDispatch::Auto, ExpertStorage::Auto),
                (MoeDispatch::Auto, ExpertStorage::Packed),
            ] {
                let what = format!("{family}/{layout} ({dispatch:?}, experts {experts:?})");
                let options = LoadOptions {
                    dispatch,
                    experts,
                    ..Default::default()
                };
                let model = load_with(&fixtures().join(family).join(layout), options);
                let (logits, trace) = run(&model, &tokens, &model.default_routing());
                let err = max_rel(&logits, &want);
                let abs = logits
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                // Printed for docs/model-families.md (`--nocapture`).
                println!("{what}: max |logit diff| {abs:.2e}, relative {err:.2e}");
                assert!(err < 1e-4, "{what}: logits off by {err} (relative)");
                for (slot, &layer) in model.moe_layers().iter().enumerate() {
                    let want_ids: Vec<i64> = g[&format!("topk_ids.{layer}")]
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    let want_w = f32s(&g[&format!("topk_weights.{layer}")]);
                    let routing = &trace.moe[slot].routing;
                    let k = want_ids.len() / routing.tokens();
                    for t in 0..routing.tokens() {
                        let got: Vec<(usize, f32, bool)> = routing.choices(t).collect();
                        assert_eq!(got.len(), k, "{what}: layer {layer} token {t}");
                        for (r, (e, w, kept)) in got.into_iter().enumerate() {
                            assert!(kept);
                            assert_eq!(
                                e as i64,
                                want_ids[t * k + r],
                                "{what}: layer {layer} token {t} rank {r}"
                            );
                            let ww = want_w[t * k + r];
                            assert!(
                                (w - ww).abs() < 1e-5,
                                "{what}: layer {layer} token {t} weight {w} vs {ww}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// The XMoE rule written out the plain way: sort one token's probabilities, take experts while
/// the mass before them is below t.
fn naive_threshold(logits: &[f32], t: f32) -> Vec<usize> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f64> = logits.iter().map(|&z| ((z - max) as f64).exp()).collect();
    let sum: f64 = exp.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]).then(a.cmp(&b)));
    let mut before = 0.0;
    let mut out = Vec::new();
    for e in order {
        if !out.is_empty() && before >= t as f64 {
            break;
        }
        out.push(e);
        before += exp[e] / sum;
    }
    out
}

#[test]
fn threshold_routing_on_hf_routers_matches_the_naive_rule() {
    for &(family, layouts) in FAMILIES {
        let g = goldens(&fixtures().join(family).join("golden.safetensors"));
        let model = load(
            &fixtures().join(family).join(layouts[0]),
            MoeDispatch::Candle,
        );
        let n = model.moe_layers().len();
        for t in [0.3f32, 0.6, 0.9] {
            let e = model.config().n_experts;
            let routing = RoutingConfig::uniform(RoutingPolicy::threshold(t), n, e).unwrap();
            let (_, trace) = run(&model, &ids(&g), &routing);
            // The first MoE layer sees exactly the reference's hidden states: its router logits
            // are the goldens'. (Later layers see the threshold policy's own hidden states.)
            let layer = model.moe_layers()[0];
            let e = model.config().n_experts;
            let golden = f32s(&g[&format!("router_logits.{layer}")]);
            let r = &trace.moe[0].routing;
            let mut multi = 0;
            for tok in 0..r.tokens() {
                let got: Vec<usize> = r.choices(tok).map(|(x, _, _)| x).collect();
                let want = naive_threshold(&golden[tok * e..(tok + 1) * e], t);
                assert_eq!(got, want, "{family} t={t} token {tok}");
                multi += usize::from(got.len() > 1);
            }
            if t >= 0.6 {
                assert!(
                    multi > 0,
                    "{family} t={t}: the test needs tokens with several experts"
                );
            }
        }
    }
}

#[test]
fn experts_read_in_place_are_the_default_on_the_cpu_and_give_the_packed_results() {
    // bf16 and sharded: each layer's experts come from the shard that holds them.
    for dir in [
        fixtures().join("mixtral/bf16"),
        fixtures().join("olmoe/fused"),
        fixtures().join("deepseek_v3/per_expert"),
    ] {
        let what = dir.display().to_string();
        let g_tokens: Vec<u32> = (0..24).map(|i| (i * 7 + 3) % 100).collect();
        let in_place = load(&dir, MoeDispatch::Auto);
        let packed = load_with(
            &dir,
            LoadOptions {
                experts: ExpertStorage::Packed,
                ..Default::default()
            },
        );
        assert!(in_place.experts_in_place(), "{what}");
        assert!(!packed.experts_in_place(), "{what}");
        let routing = in_place.default_routing();
        let (a, ta) = run(&in_place, &g_tokens, &routing);
        let (b, tb) = run(&packed, &g_tokens, &routing);
        let err = max_rel(&a, &b);
        assert!(err < 1e-5, "{what}: in place vs packed off by {err}");
        for (x, y) in ta.moe.iter().zip(&tb.moe) {
            assert_eq!(x.routing.experts, y.routing.experts, "{what}");
        }
        // Decoding one token at a time (the lean decoder where the family has it) on the same
        // experts: a prompt of 8 tokens, then 6 greedy steps.
        let decode = |m: &Model| -> (Vec<u32>, Vec<f32>) {
            let mut cache = m.new_cache(1);
            let mut trace = ForwardTrace::default();
            let (mut tokens, mut logits) = (Vec::new(), Vec::new());
            let mut token = g_tokens[0];
            for step in 0..14 {
                let l = m.decode(token, &routing, &mut cache, &mut trace).unwrap();
                let best = (0..l.len()).fold(0, |b, i| if l[i] > l[b] { i } else { b }) as u32;
                logits.extend_from_slice(l);
                token = if step < 7 { g_tokens[step + 1] } else { best };
                tokens.push(token);
            }
            (tokens, logits)
        };
        let ((ka, la), (kb, lb)) = (decode(&in_place), decode(&packed));
        assert_eq!(ka, kb, "{what}: greedy tokens");
        let err = max_rel(&la, &lb);
        assert!(err < 1e-5, "{what}: decode logits off by {err}");
    }
    // Asking for in place where it cannot be: the candle path, and MXFP4 (gpt-oss) experts.
    let refuse = |dir: &Path, dispatch: MoeDispatch| -> String {
        let source = ModelSource::open(dir).unwrap();
        let options = LoadOptions {
            dispatch,
            experts: ExpertStorage::InPlace,
            ..Default::default()
        };
        match Model::from_source(&source, &Device::Cpu, options) {
            Ok(_) => panic!("{}: loaded", dir.display()),
            Err(e) => e.to_string(),
        }
    };
    // `inspect` says what will be read in place and what loaded (the three files' sizes).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xmoe-top"))
        .arg("inspect")
        .arg(fixtures().join("mixtral/bf16"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("memory     51.3 KiB loaded; experts 36.0 KiB read in place from the files"),
        "{text}"
    );
    let msg = refuse(&fixtures().join("olmoe/fused"), MoeDispatch::Candle);
    assert!(
        msg.contains("--expert-weights in-place") && msg.contains("CPU kernel"),
        "{msg}"
    );
}

#[test]
fn bf16_sharded_checkpoint_stays_bf16_and_tracks_transformers() {
    let dir = fixtures().join("mixtral/bf16");
    let source = ModelSource::open(&dir.join("model.safetensors.index.json")).unwrap();
    assert_eq!(
        source.file_bytes(),
        // Every tensor's bytes at 2 bytes per value: the model is not widened on disk or in the
        // source.
        source.tensor_table().iter().map(|t| t.3).sum::<usize>()
    );
    assert!(source.tensor_table().iter().all(|t| t.1 == "BF16"));
    let g = goldens(&fixtures().join("mixtral/golden-bf16.safetensors"));
    let model = load(&dir, MoeDispatch::Auto);
    let (logits, _) = run(&model, &ids(&g), &model.default_routing());
    let want = f32s(&g["logits"]);
    let max = logits
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    let mean = logits
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .sum::<f32>()
        / want.len() as f32;
    // transformers runs every activation in bf16; xmoe-top widens bf16 weights and computes in
    // f32, so the two differ by activation rounding (measured: max 0.088, mean 0.0092; see
    // docs/model-families.md).
    assert!(max < 0.15 && mean < 0.02, "max {max} mean {mean}");
}

#[test]
fn parameter_counts_match_the_tensors_on_disk() {
    for &(family, layouts) in FAMILIES {
        for layout in layouts {
            let source = ModelSource::open(&fixtures().join(family).join(layout)).unwrap();
            let on_disk: usize = source
                .tensor_table()
                .iter()
                .map(|(_, _, shape, _)| shape.iter().product::<usize>())
                .sum();
            let counted = xmoe_top::model::forward::param_counts(source.config()).total;
            assert_eq!(counted, on_disk, "{family}/{layout}");
        }
    }
}

#[test]
fn flops_of_qwen2_moe_by_hand() {
    use xmoe_top::profiling::flops::FlopModel;
    // d 32, 4 heads of 8 with 2 KV heads (q 32 wide, k and v 16), q/k/v biases, 8 experts of 12,
    // top-2, a gated shared expert of 40, one dense block of 20, vocab 512, 3 blocks.
    let source = ModelSource::open(&fixtures().join("qwen2_moe/per_expert")).unwrap();
    let f = FlopModel::new(source.config());
    let attention = |c: u64| 2 * 32 * (2 * 32 + 2 * 16) + (32 + 2 * 16) + 2 * 2 * c * 32;
    assert_eq!(f.attention(10), attention(10));
    assert_eq!(f.router(), 2 * 32 * 8);
    assert_eq!(f.expert(), 3 * 2 * 32 * 12 + 2 * 32);
    assert_eq!(f.shared_expert(), 3 * 2 * 32 * 40 + 2 * 32 + 32);
    assert_eq!(f.dense_ffn(), 3 * 2 * 32 * 20);
    assert_eq!(f.lm_head(), 2 * 32 * 512);
    assert_eq!(f.top_k(), 2);
    assert_eq!(
        f.non_moe(10),
        3 * attention(10) + f.dense_ffn() + 2 * f.shared_expert() + f.lm_head()
    );
    assert_eq!(
        f.moe_layer_top_k(),
        2 * 32 * 8 + 2 * (3 * 2 * 32 * 12 + 2 * 32)
    );
}

#[test]
fn sliding_windows_cap_the_attention_flops() {
    use xmoe_top::profiling::flops::FlopModel;
    // Mixtral fixture: window 5 on both blocks; beyond 5 keys attention costs no more.
    let source = ModelSource::open(&fixtures().join("mixtral/per_expert")).unwrap();
    let f = FlopModel::new(source.config());
    assert_eq!(f.non_moe(12), f.non_moe(5));
    assert!(f.non_moe(4) < f.non_moe(5));
    assert_eq!(f.non_moe(5), 2 * f.attention(5) + f.lm_head());
}

#[test]
fn a_synthetic_olmoe_checkpoint_is_written_shard_by_shard_and_runs() {
    use xmoe_top::model::hf::synth::{OlmoeShape, write_checkpoint};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("olmoe");
    let shape = OlmoeShape::tiny();
    let mut calls = Vec::new();
    let shards = write_checkpoint(
        &out,
        &shape,
        &fixtures().join("tokenizer.json"),
        7,
        100_000,
        false,
        &mut |d, n| calls.push((d, n)),
    )
    .unwrap();
    assert!(shards.len() > 3, "{} shards", shards.len());
    assert_eq!(calls.last(), Some(&(shards.len(), shards.len())));
    // Refuses to overwrite.
    assert!(
        write_checkpoint(
            &out,
            &shape,
            &fixtures().join("tokenizer.json"),
            7,
            100_000,
            false,
            &mut |_, _| {}
        )
        .is_err()
    );
    let source = ModelSource::open(&out).unwrap();
    let params = xmoe_top::model::forward::param_counts(source.config()).total;
    assert_eq!(source.file_bytes(), 2 * params, "bf16 on disk");
    assert_eq!(source.tensor_table().len(), shape.tensors().len());
    let model = Model::from_source(&source, &Device::Cpu, LoadOptions::default()).unwrap();
    assert!(model.warnings().is_empty(), "{:?}", model.warnings());
    let tokens: Vec<u32> = (0..32).map(|i| (i * 37 % 512) as u32).collect();
    let (logits, trace) = run(&model, &tokens, &model.default_routing());
    assert!(logits.iter().all(|v| v.is_finite()));
    assert_eq!(trace.moe[0].routing.pairs(), 32 * shape.top_k);
}

#[test]
fn eval_with_the_checkpoint_tokenizer_reports_bits_per_byte_of_the_covered_text() {
    use std::sync::Arc;
    use xmoe_top::workload::tokenizer::TextTokenizer;
    use xmoe_top::workload::{EvalSpec, TextSource, Workload};
    let dir = fixtures().join("qwen3_moe/per_expert");
    let model = load(&dir, MoeDispatch::Auto);
    let tokenizer = Arc::new(
        TextTokenizer::from_file(model.tokenizer_path().unwrap(), model.config().vocab_size)
            .unwrap(),
    );
    let text = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/kjv-heldout.txt"))
        .unwrap()[..6000]
        .to_vec();
    let spec = EvalSpec {
        text: TextSource {
            name: "kjv".into(),
            bytes: text.clone(),
        },
        batch: 2,
        seq_len: 32,
    };
    let mut w = Workload::eval_tokenized(spec, model.config(), &tokenizer).unwrap();
    let mut trace = ForwardTrace::default();
    let out = w
        .run_pass(&model, &model.default_routing(), &mut trace)
        .unwrap();
    let q = out.quality.unwrap();
    assert_eq!(q.scored_tokens, 64);
    // Two windows of 33 tokens from the start with stride 32: the targets are tokens 1..65 of
    // the text. Byte-level BPE: a token covers exactly the bytes it decodes to.
    let ids = tokenizer.encode(&text).unwrap().ids;
    assert_eq!(&w.last_inputs()[..32], &ids[..32]);
    let covered: usize = ids[1..65]
        .iter()
        .map(|&t| tokenizer.token_bytes(t).len())
        .sum();
    assert_eq!(q.bytes as usize, covered);
    assert!(
        q.bytes > 64,
        "BPE tokens cover more than a byte each on average"
    );
}

#[test]
fn screens_and_reports_name_the_native_top_k() {
    use xmoe_top::session::describe::model_info;
    let source = ModelSource::open(&fixtures().join("olmoe/per_expert")).unwrap();
    let info = model_info(source.config(), "CPU", 2);
    assert_eq!(info.native_top_k, Some(2));
    assert_eq!(info.top_k_name(2), "native top-2");
    assert_eq!(info.top_k_name(4), "top-4");
    // The project's own models have no native top-k.
    let own = xmoe_top::model::config::ModelConfig::byte_level(16, 2, 2, 32, 8, 16, 64);
    let info = model_info(&own, "CPU", 4);
    assert_eq!(
        (info.native_top_k, info.top_k_name(4).as_str()),
        (None, "top-4")
    );
}

#[test]
fn the_sweep_of_a_checkpoint_compares_with_its_native_top_k() {
    use xmoe_top::session::sweep::{SweepSpec, run_sweep, token_batches};
    use xmoe_top::workload::tokenizer::TextTokenizer;
    let dir = fixtures().join("mixtral/per_expert");
    let model = load(&dir, MoeDispatch::Auto);
    let tok = TextTokenizer::from_file(model.tokenizer_path().unwrap(), 512).unwrap();
    let text = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/kjv-heldout.txt"))
        .unwrap();
    let (batches, bytes) = token_batches(&tok.encode(&text[..8000]).unwrap(), 2, 16, 64).unwrap();
    let spec = |reference| SweepSpec {
        thresholds: vec![0.5, 0.9],
        top_k: vec![1],
        top_k_baseline: None,
        capacity_factor: None,
        renormalize: None,
        reference,
        batch_bytes: Some(bytes.clone()),
        source: "kjv".into(),
        source_size: 8000,
        device: "CPU".into(),
        repeats: 1,
    };
    let native = RoutingPolicy::TopK {
        k: 2,
        renormalize: true,
    };
    let r = run_sweep(&model, &batches, 2, &spec(None), &mut |_, _| {})
        .unwrap()
        .result;
    assert_eq!(r.reference_policy, native);
    let labels: Vec<&str> = r.points.iter().map(|p| p.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "t=0.5 renorm",
            "t=0.9 renorm",
            "top-1 renorm",
            "dense",
            "top-2 renorm"
        ]
    );
    let reference = r.points.last().unwrap();
    assert!(reference.is_reference && reference.is_default);
    assert_eq!(reference.delta_bits_per_byte_vs_reference, Some(0.0));
    assert!(r.points[..4].iter().all(|p| !p.is_reference));
    // The threshold and top-k points renormalise as the native rule does.
    assert!(r.points[..3].iter().all(|p| p.policy.renormalizes()));
    // --reference dense: Dense is the reference and the native point is compared with it.
    let r = run_sweep(
        &model,
        &batches,
        2,
        &spec(Some(RoutingPolicy::Dense)),
        &mut |_, _| {},
    )
    .unwrap()
    .result;
    assert_eq!(r.reference_policy, RoutingPolicy::Dense);
    let native_point = r.points.iter().find(|p| p.policy == native).unwrap();
    assert!(!native_point.is_reference);
    assert!(native_point.delta_bits_per_byte_vs_reference.unwrap().abs() > 0.0);
}

/// FP4 E2M1 values by code (bit 3 the sign), as the MXFP4 format defines them.
const FP4: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Quantises rows of `cols` values (a multiple of 32) to MXFP4 the way the published gpt-oss files
/// store them: per row and group of 32, an E8M0 scale byte `127 + e` with `2^e >= max|v| / 6`,
/// and 16 bytes holding the nearest FP4 codes, value `2i` in the low nibble and `2i + 1` in the
/// high one. Returns (blocks, scales, the dequantised values).
fn mxfp4_encode(rows: &[f32], cols: usize) -> (Vec<u8>, Vec<u8>, Vec<f32>) {
    assert!(rows.len().is_multiple_of(cols) && cols.is_multiple_of(32));
    let (mut blocks, mut scales, mut values) = (Vec::new(), Vec::new(), Vec::new());
    for group in rows.chunks_exact(32) {
        let amax = group.iter().fold(0f32, |m, v| m.max(v.abs()));
        let e = if amax == 0.0 {
            0
        } else {
            (amax / 6.0).log2().ceil() as i32
        };
        scales.push((127 + e) as u8);
        let scale = 2f32.powi(e);
        let codes: Vec<u8> = group
            .iter()
            .map(|&v| {
                (0..16u8)
                    .min_by(|&a, &b| {
                        let d = |c: u8| (v / scale - FP4[c as usize]).abs();
                        d(a).total_cmp(&d(b))
                    })
                    .unwrap()
            })
            .collect();
        for pair in codes.chunks_exact(2) {
            blocks.push(pair[0] | (pair[1] << 4));
        }
        values.extend(codes.iter().map(|&c| FP4[c as usize] * scale));
    }
    (blocks, scales, values)
}

/// The gpt-oss fixture with its experts widened from I = 12 to 32 (zero gate, up and down weights
/// and biases for the new units, whose output is then exactly 0: `gate = 0` gives `glu = 0`), so
/// that MXFP4 groups of 32 fit both projections. With `quantise`, the expert weights are replaced
/// by their MXFP4 values and, when `packed`, stored as `*_blocks` + `*_scales`; otherwise as f32 in
/// the fused `x @ W` layout.
fn gpt_oss_padded(out: &Path, quantise: bool, packed: bool) {
    let src = fixtures().join("gpt_oss/fused");
    std::fs::create_dir_all(out).unwrap();
    for f in ["tokenizer.json", "generation_config.json"] {
        std::fs::copy(src.join(f), out.join(f)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let (e_n, h, i0, i1) = (8usize, 32usize, 12usize, 32usize);
    config["intermediate_size"] = i1.into();
    std::fs::write(out.join("config.json"), config.to_string()).unwrap();
    let mut t =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let dev = Device::Cpu;
    for layer in 0..2 {
        let p = format!("model.layers.{layer}.mlp.experts");
        let gu = f32s(&t[&format!("{p}.gate_up_proj")]); // [E, H, 2 I0]
        let gub = f32s(&t[&format!("{p}.gate_up_proj_bias")]); // [E, 2 I0]
        let down = f32s(&t[&format!("{p}.down_proj")]); // [E, I0, H]
        // [out, in] matrices, as MXFP4 stores them: gate_up [E, 2 I1, H], down [E, H, I1].
        let mut gu_w = vec![0f32; e_n * 2 * i1 * h];
        let mut down_w = vec![0f32; e_n * h * i1];
        let mut gub_p = vec![0f32; e_n * 2 * i1];
        for e in 0..e_n {
            for r in 0..2 * i0 {
                for k in 0..h {
                    gu_w[(e * 2 * i1 + r) * h + k] = gu[(e * h + k) * 2 * i0 + r];
                }
                gub_p[e * 2 * i1 + r] = gub[e * 2 * i0 + r];
            }
            for n in 0..h {
                for j in 0..i0 {
                    down_w[(e * h + n) * i1 + j] = down[(e * i0 + j) * h + n];
                }
            }
        }
        for name in ["gate_up_proj", "down_proj"] {
            t.remove(&format!("{p}.{name}"));
        }
        t.insert(
            format!("{p}.gate_up_proj_bias"),
            Tensor::from_vec(gub_p, (e_n, 2 * i1), &dev).unwrap(),
        );
        for (name, w, rows, cols) in [
            ("gate_up_proj", gu_w, 2 * i1, h),
            ("down_proj", down_w, h, i1),
        ] {
            let (blocks, scales, q) = mxfp4_encode(&w, cols);
            let w = if quantise { q } else { w };
            if packed {
                t.insert(
                    format!("{p}.{name}_blocks"),
                    Tensor::from_vec(blocks, (e_n, rows, cols / 32, 16), &dev).unwrap(),
                );
                t.insert(
                    format!("{p}.{name}_scales"),
                    Tensor::from_vec(scales, (e_n, rows, cols / 32), &dev).unwrap(),
                );
            } else {
                // Back to the `x @ W` layout: [E, cols, rows].
                let fused = Tensor::from_vec(w, (e_n, rows, cols), &dev)
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap();
                t.insert(format!("{p}.{name}"), fused);
            }
        }
    }
    candle_core::safetensors::save(&t, out.join("model.safetensors")).unwrap();
}

#[test]
fn gpt_oss_mxfp4_experts_load_as_their_dequantised_values() {
    let g = goldens(&fixtures().join("gpt_oss/golden.safetensors"));
    let tokens = ids(&g);
    let dir = tempfile::tempdir().unwrap();
    let (padded, reference, packed) = (
        dir.path().join("padded"),
        dir.path().join("reference"),
        dir.path().join("mxfp4"),
    );
    gpt_oss_padded(&padded, false, false);
    gpt_oss_padded(&reference, true, false);
    gpt_oss_padded(&packed, true, true);

    // The zero-padded experts compute the same function as the fixture's.
    let model = load(&padded, MoeDispatch::Auto);
    let (logits, _) = run(&model, &tokens, &model.default_routing());
    let err = max_rel(&logits, &f32s(&g["logits"]));
    assert!(err < 1e-4, "padded experts: logits off by {err}");

    // On the CPU the MXFP4 experts stay packed (`--moe-dispatch auto`) and give the logits of the f32
    // checkpoint holding the same values, and of the dequantise-to-bf16 path (`--moe-dispatch candle`,
    // exact in bf16).
    let source = ModelSource::open(&packed).unwrap();
    assert!(
        source
            .tensor_table()
            .iter()
            .any(|t| t.0.ends_with("gate_up_proj_blocks") && t.1 == "U8")
    );
    // The memory check before loading counts the packed experts as stored.
    let table = source.tensor_table();
    let bytes = |suffix: &str| -> usize {
        table
            .iter()
            .filter(|t| t.0.ends_with(suffix))
            .map(|t| t.3)
            .sum()
    };
    assert!(bytes("_blocks") > 0 && bytes("_scales") > 0);
    assert_eq!(source.resident_weight_bytes(), source.file_bytes());
    let want = load(&reference, MoeDispatch::Auto);
    let got = load(&packed, MoeDispatch::Auto);
    let routing = want.default_routing();
    let (want_logits, want_trace) = run(&want, &tokens, &routing);
    let (got_logits, got_trace) = run(&got, &tokens, &routing);
    let (bf16_logits, _) = run(&load(&packed, MoeDispatch::Candle), &tokens, &routing);
    let packed_vs_bf16 = got_logits
        .iter()
        .zip(&bf16_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    println!("MXFP4 packed vs dequantised to bf16: max |logit diff| {packed_vs_bf16:.2e}");
    assert!(packed_vs_bf16 < 1e-5, "packed vs bf16: {packed_vs_bf16}");
    let max_abs = got_logits
        .iter()
        .zip(&want_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(
        max_abs < 1e-5,
        "MXFP4 vs its f32 values: max |logit diff| {max_abs}"
    );
    for slot in 0..2 {
        let (a, b) = (&got_trace.moe[slot].routing, &want_trace.moe[slot].routing);
        for tok in 0..a.tokens() {
            let chosen = |r: &xmoe_top::routing::Routing| -> Vec<usize> {
                r.choices(tok).map(|c| c.0).collect()
            };
            assert_eq!(chosen(a), chosen(b), "slot {slot} token {tok}");
        }
    }
    // Quantisation moved the weights (the test would prove nothing otherwise).
    println!("MXFP4 vs its f32 values: max |logit diff| {max_abs:.2e}");
    let moved = max_rel(&want_logits, &logits);
    println!("quantisation moved the logits by up to {moved:.2e} (relative)");
    assert!(moved > 1e-3, "quantised logits moved only {moved}");
}

#[test]
fn a_synthetic_deepseek_v2_checkpoint_loads_with_its_dense_block_shared_experts_and_yarn() {
    use xmoe_top::model::hf::synth::{DeepseekV2Shape, SynthShape, write_checkpoint};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("deepseek");
    let shape = DeepseekV2Shape::tiny();
    write_checkpoint(
        &out,
        &shape,
        &fixtures().join("tokenizer.json"),
        3,
        200_000,
        false,
        &mut |_, _| {},
    )
    .unwrap();
    let source = ModelSource::open(&out).unwrap();
    let params = xmoe_top::model::forward::param_counts(source.config()).total;
    assert_eq!(source.file_bytes(), 2 * params, "bf16 on disk");
    assert_eq!(source.tensor_table().len(), shape.tensors().len());
    let model = Model::from_source(&source, &Device::Cpu, LoadOptions::default()).unwrap();
    assert!(model.warnings().is_empty(), "{:?}", model.warnings());
    // Block 0 is dense (`first_k_dense_replace` 1); the others route top-4 of 16.
    assert_eq!(model.moe_layers(), &[1, 2]);
    let tokens: Vec<u32> = (0..32).map(|i| (i * 37 % 512) as u32).collect();
    let (logits, trace) = run(&model, &tokens, &model.default_routing());
    assert!(logits.iter().all(|v| v.is_finite()));
    assert_eq!(trace.moe[0].routing.pairs(), 32 * shape.top_k);
}
