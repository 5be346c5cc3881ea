//! DeepSeek-V2 and DeepSeek-V3 checkpoints against the `transformers` goldens in
//! `tests/fixtures/hf/deepseek_v{2,3}` (written by `scripts/hf-goldens/generate.py`): logits, the
//! native group-limited selections and weights, decoding through the latent KV cache, the
//! threshold rule on the DeepSeek routers against a plain re-implementation, parameter counts,
//! and the errors for configurations that cannot run.

use std::path::Path;

use xmoe_top::model::trace::ForwardTrace;
use xmoe_top::model::{LoadOptions, Model, ModelSource, MoeDispatch, RoutingConfig};
use xmoe_top::routing::{RoutingPolicy, SigmoidSelection};

#[path = "support/golden.rs"]
mod golden;
use golden::{
    f32s, golden_tensors as goldens, hf_fixtures as fixtures, input_ids as ids, load_with, max_abs,
    run,
};

const FAMILIES: &[&str] = &["deepseek_v2", "deepseek_v3"];
const LAYOUTS: &[&str] = &["per_expert", "fused"];

fn load(dir: &Path, dispatch: MoeDispatch) -> Model {
    load_with(
        dir,
        LoadOptions {
            dispatch,
            ..Default::default()
        },
    )
}

#[test]
fn deepseek_checkpoints_match_transformers_logits_and_native_selection() {
    for family in FAMILIES {
        let g = goldens(&fixtures().join(family).join("golden.safetensors"));
        let tokens = ids(&g);
        let want = f32s(&g["logits"]);
        for layout in LAYOUTS {
            for dispatch in [MoeDispatch::Candle, MoeDispatch::Auto] {
                let what = format!("{family}/{layout} ({dispatch:?})");
                let model = load(&fixtures().join(family).join(layout), dispatch);
                let (logits, trace) = run(&model, &tokens, &model.default_routing());
                let abs = max_abs(&logits, &want);
                // Printed for docs/model-families.md (`--nocapture`).
                println!("{what}: max |logit diff| {abs:.2e}");
                assert!(abs < 1e-4, "{what}: logits off by {abs}");
                for (slot, &layer) in model.moe_layers().iter().enumerate() {
                    let want_ids: Vec<i64> = g[&format!("topk_ids.{layer}")]
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    let want_w = f32s(&g[&format!("topk_weights.{layer}")]);
                    let routing = &trace.moe[slot].routing;
                    let k = want_ids.len() / routing.tokens();
                    let mut worst = 0f32;
                    for t in 0..routing.tokens() {
                        // torch.topk(sorted=False): compare (id, weight) pairs as sets.
                        let mut got: Vec<(usize, f32)> =
                            routing.choices(t).map(|(e, w, _)| (e, w)).collect();
                        got.sort_by_key(|p| p.0);
                        let mut exp: Vec<(usize, f32)> = (0..k)
                            .map(|r| (want_ids[t * k + r] as usize, want_w[t * k + r]))
                            .collect();
                        exp.sort_by_key(|p| p.0);
                        let got_ids: Vec<usize> = got.iter().map(|p| p.0).collect();
                        let exp_ids: Vec<usize> = exp.iter().map(|p| p.0).collect();
                        assert_eq!(got_ids, exp_ids, "{what}: layer {layer} token {t}");
                        // Relative: the weights carry routed_scaling_factor (16 for V2).
                        for (a, b) in got.iter().zip(&exp) {
                            worst = worst.max((a.1 - b.1).abs() / (1.0 + b.1.abs()));
                        }
                    }
                    println!("{what}: layer {layer} max relative weight diff {worst:.2e}");
                    assert!(worst < 1e-5, "{what}: layer {layer} weights off by {worst}");
                }
            }
        }
    }
}

#[test]
fn decoding_through_the_latent_cache_gives_the_full_pass_logits() {
    for family in FAMILIES {
        let g = goldens(&fixtures().join(family).join("golden.safetensors"));
        let tokens = ids(&g);
        let model = load(&fixtures().join(family).join("fused"), MoeDispatch::Auto);
        let routing = model.default_routing();
        let (full, _) = run(&model, &tokens, &routing);
        let (seq, vocab) = (tokens.len() / 2, model.config().vocab_size);
        // Prefill 8 positions of both sequences, then one token at a time.
        let prefill = 8;
        let mut cache = model.new_cache(2);
        let mut trace = ForwardTrace::default();
        let mut got = vec![vec![0f32; 0]; 2];
        let first: Vec<u32> = (0..2)
            .flat_map(|b| tokens[b * seq..b * seq + prefill].to_vec())
            .collect();
        let l = model
            .forward(&first, 2, &routing, Some(&mut cache), &mut trace)
            .unwrap();
        for (b, out) in got.iter_mut().enumerate() {
            out.extend_from_slice(&l[b * prefill * vocab..(b + 1) * prefill * vocab]);
        }
        for pos in prefill..seq {
            let step = [tokens[pos], tokens[seq + pos]];
            let l = model
                .forward(&step, 2, &routing, Some(&mut cache), &mut trace)
                .unwrap();
            for (b, out) in got.iter_mut().enumerate() {
                out.extend_from_slice(&l[b * vocab..(b + 1) * vocab]);
            }
        }
        let got: Vec<f32> = got.concat();
        let abs = max_abs(&got, &full);
        println!("{family}: cached decode vs full pass, max |logit diff| {abs:.2e}");
        assert!(abs < 1e-4, "{family}: decode off by {abs}");
    }
}

/// The threshold rule on a DeepSeek router, the plain way, from one token's router logits:
/// scores (softmax for V2; sigmoid + bias, negatives as 0, for V3), the allowed groups (V2: best
/// max; V3: best sum of two), normalised over them, experts in descending order while the mass
/// before them is below t.
fn naive_threshold(
    logits: &[f32],
    bias: Option<&[f32]>,
    n_group: usize,
    topk_group: usize,
    t: f32,
) -> Vec<usize> {
    let e = logits.len();
    let scores: Vec<f64> = match bias {
        None => {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f64> = logits.iter().map(|&z| ((z - max) as f64).exp()).collect();
            let sum: f64 = exp.iter().sum();
            exp.iter().map(|x| x / sum).collect()
        }
        Some(b) => logits
            .iter()
            .zip(b)
            .map(|(&z, &b)| 1.0 / (1.0 + (-(z as f64)).exp()) + b as f64)
            .collect(),
    };
    let size = e / n_group;
    let mut group_score: Vec<(f64, usize)> = (0..n_group)
        .map(|g| {
            let mut m: Vec<f64> = scores[g * size..(g + 1) * size].to_vec();
            m.sort_by(|a, b| b.total_cmp(a));
            let s = if bias.is_some() { m[0] + m[1] } else { m[0] };
            (s, g)
        })
        .collect();
    group_score.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let allowed: Vec<usize> = group_score[..topk_group]
        .iter()
        .flat_map(|&(_, g)| g * size..(g + 1) * size)
        .collect();
    let q = |x: usize| scores[x].max(0.0);
    let sum: f64 = allowed.iter().map(|&x| q(x)).sum();
    let mut order = allowed.clone();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut before = 0.0;
    let mut out = Vec::new();
    for x in order {
        if !out.is_empty() && before >= t as f64 {
            break;
        }
        out.push(x);
        before += q(x) / sum;
    }
    out
}

#[test]
fn threshold_routing_on_deepseek_routers_matches_the_plain_rule() {
    for family in FAMILIES {
        let dir = fixtures().join(family).join("fused");
        let g = goldens(&fixtures().join(family).join("golden.safetensors"));
        let model = load(&dir, MoeDispatch::Candle);
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let (n_group, topk_group) = (
            config["n_group"].as_u64().unwrap() as usize,
            config["topk_group"].as_u64().unwrap() as usize,
        );
        let layer = model.moe_layers()[0];
        let weights = goldens(&dir.join("model.safetensors"));
        let bias = weights
            .get(&format!(
                "model.layers.{layer}.mlp.gate.e_score_correction_bias"
            ))
            .map(f32s);
        let e = model.config().n_experts;
        let golden = f32s(&g[&format!("router_logits.{layer}")]);
        let n = model.moe_layers().len();
        let mut sizes = std::collections::BTreeSet::new();
        for t in [0.3f32, 0.6, 0.9] {
            let policy = RoutingPolicy::threshold(t);
            let routing = RoutingConfig::uniform(policy, n, e).unwrap();
            let (_, trace) = run(&model, &ids(&g), &routing);
            // The first MoE layer sees the reference's hidden states: its logits are the goldens'.
            let r = &trace.moe[0].routing;
            for tok in 0..r.tokens() {
                let got: Vec<usize> = r.choices(tok).map(|(x, _, _)| x).collect();
                let want = naive_threshold(
                    &golden[tok * e..(tok + 1) * e],
                    bias.as_deref(),
                    n_group,
                    topk_group,
                    t,
                );
                assert_eq!(got, want, "{family} t={t} token {tok}");
                // Every chosen expert lies in the kept groups: with 1 of 2 groups kept, at most 4.
                assert!(got.len() <= topk_group * e / n_group);
                sizes.insert(got.len());
            }
        }
        assert!(
            sizes.len() > 2,
            "{family}: the test needs tokens with different expert counts, found {sizes:?}"
        );
    }
}

#[test]
fn the_unbiased_sigmoid_selection_is_a_load_option() {
    let dir = fixtures().join("deepseek_v3/fused");
    let g = goldens(&fixtures().join("deepseek_v3/golden.safetensors"));
    let biased = load(&dir, MoeDispatch::Candle);
    let unbiased = load_with(
        &dir,
        LoadOptions {
            dispatch: MoeDispatch::Candle,
            sigmoid_selection: SigmoidSelection::Unbiased,
            ..Default::default()
        },
    );
    let n = biased.moe_layers().len();
    let e = biased.config().n_experts;
    let routing = RoutingConfig::uniform(RoutingPolicy::threshold(0.6), n, e).unwrap();
    let (_, a) = run(&biased, &ids(&g), &routing);
    let (_, b) = run(&unbiased, &ids(&g), &routing);
    let (a, b) = (&a.moe[0].routing, &b.moe[0].routing);
    let differ = (0..a.tokens())
        .filter(|&t| {
            a.choices(t).map(|c| c.0).collect::<Vec<_>>()
                != b.choices(t).map(|c| c.0).collect::<Vec<_>>()
        })
        .count();
    // The fixture's bias is N(0, 0.1): it moves some choices.
    assert!(differ > 0, "the bias changed no threshold selection");
    // The native top-k is the same under both (the option only concerns thresholds).
    let (la, _) = run(&biased, &ids(&g), &biased.default_routing());
    let (lb, _) = run(&unbiased, &ids(&g), &unbiased.default_routing());
    assert_eq!(la, lb);
}

#[test]
fn deepseek_parameter_counts_match_the_tensors_on_disk() {
    for family in FAMILIES {
        for layout in LAYOUTS {
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

/// A copy of `family/fused` with `edit` applied to its config.json.
fn edited(family: &str, edit: impl Fn(&mut serde_json::Value)) -> tempfile::TempDir {
    let src = fixtures().join(family).join("fused");
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    let path = dir.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
    dir
}

fn open_error(dir: &Path) -> String {
    match ModelSource::open(dir) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unsupported_deepseek_configurations_name_the_field_and_value() {
    let cases: &[(&str, &str, serde_json::Value, &[&str])] = &[
        (
            "deepseek_v3",
            "n_group",
            serde_json::json!(3),
            &["n_group", "divide the 8 routed experts", "found 3"],
        ),
        (
            "deepseek_v3",
            "topk_group",
            serde_json::json!(5),
            &["topk_group", "1..=2", "found 5"],
        ),
        (
            "deepseek_v2",
            "topk_method",
            serde_json::json!("sinkhorn"),
            &["topk_method", "\"sinkhorn\"", "group_limited_greedy"],
        ),
        (
            "deepseek_v3",
            "scoring_func",
            serde_json::json!("softmax"),
            &["scoring_func", "\"sigmoid\"", "\"softmax\""],
        ),
        (
            "deepseek_v2",
            "kv_lora_rank",
            serde_json::Value::Null,
            &["kv_lora_rank", "missing"],
        ),
        (
            "deepseek_v3",
            "qk_rope_head_dim",
            serde_json::json!(7),
            &["qk_rope_head_dim", "even", "found 7"],
        ),
    ];
    for (family, key, value, needles) in cases {
        let dir = edited(family, |v| v[*key] = value.clone());
        let msg = open_error(dir.path());
        for n in *needles {
            assert!(
                msg.contains(n),
                "{family} {key}={value}: {msg:?} lacks {n:?}"
            );
        }
        assert!(msg.contains("config.json"), "{msg}");
    }
    // A group limit that leaves fewer experts than the top-k: 1 group of 2 experts for top-2 is
    // fine, for top-3 it is not.
    let dir = edited("deepseek_v3", |v| {
        v["n_group"] = serde_json::json!(4);
        v["num_experts_per_tok"] = serde_json::json!(3);
    });
    let msg = open_error(dir.path());
    assert!(
        msg.contains("topk_group") && msg.contains("fewer than the 3"),
        "{msg}"
    );
}

#[test]
fn moe_layer_freq_and_first_k_dense_replace_pick_the_moe_blocks() {
    let dir = edited("deepseek_v2", |v| {
        v["num_hidden_layers"] = serde_json::json!(6);
        v["first_k_dense_replace"] = serde_json::json!(1);
        v["moe_layer_freq"] = serde_json::json!(2);
    });
    let source = ModelSource::open(dir.path()).unwrap();
    assert_eq!(source.config().moe_layer_indices(), vec![2, 4]);
}
