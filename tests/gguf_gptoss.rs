//! llama.cpp `gpt-oss` GGUF files written by `scripts/gguf-fixtures/generate.py` from the tiny
//! gpt-oss checkpoint of `tests/fixtures/hf/gpt_oss`: the F32 file reproduces the transformers
//! goldens (logits, native expert ids and weights); the MXFP4 file runs on its packed experts and
//! gives the logits of the same file dequantised to f32, and the goldens within the measured
//! tolerance; threshold routing follows the plain rule; the tokenizer (`gpt-4o`) comes from the
//! metadata; bad files get one clear line and exit status 3.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::QTensor;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::{Device, Tensor};
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
use xmoe_top::model::gguf::{GgufFile, TensorType};
use xmoe_top::model::trace::ForwardTrace;
use xmoe_top::model::{Model, ModelSource, MoeDispatch, RoutingConfig};
use xmoe_top::routing::RoutingPolicy;
use xmoe_top::workload::tokenizer::TextTokenizer;

#[path = "support/golden.rs"]
mod golden;
use golden::{choices, f32s, golden_choices, input_ids, load, max_abs, max_rel, run};
#[path = "support/gguf_files.rs"]
mod gguf_files;
use gguf_files::{Parts, xmoe};

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn gguf(quant: &str) -> PathBuf {
    repo(&format!("tests/fixtures/gguf/gpt_oss.{quant}.gguf"))
}

fn goldens() -> HashMap<String, Tensor> {
    golden::golden_tensors(&repo("tests/fixtures/hf/gpt_oss/golden.safetensors"))
}

/// (native top-k sets differing from the goldens', sets compared).
fn sets_differing(trace: &ForwardTrace, want: &[Vec<Vec<(usize, f32)>>]) -> (usize, usize) {
    let (mut differ, mut total) = (0, 0);
    for (slot, tokens) in choices(trace).iter().enumerate() {
        for (t, got) in tokens.iter().enumerate() {
            let a: Vec<usize> = got.iter().map(|p| p.0).collect();
            let b: Vec<usize> = want[slot][t].iter().map(|p| p.0).collect();
            differ += usize::from(a != b);
            total += 1;
        }
    }
    (differ, total)
}

/// Opens `path` and loads it on the CPU with `dispatch`, kept as stored or (`dequantize`) all f32.
fn load_gguf(path: &Path, dispatch: MoeDispatch, dequantize: bool) -> Model {
    let mut source = ModelSource::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let ModelSource::Gguf(g) = &mut source else {
        panic!("{} is not read as GGUF", path.display())
    };
    g.set_dequantize(dequantize);
    let options = xmoe_top::model::LoadOptions {
        dispatch,
        ..Default::default()
    };
    Model::from_source(&source, &Device::Cpu, options)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_f32_gpt_oss_file_matches_the_transformers_goldens() {
    let g = goldens();
    let tokens = input_ids(&g);
    let want = f32s(&g["logits"]);
    for dispatch in [MoeDispatch::Candle, MoeDispatch::Auto] {
        let what = format!("gpt_oss f32 ({dispatch:?})");
        let model = load(&gguf("f32"), dispatch);
        assert!(
            model.warnings().is_empty(),
            "{what}: unused tensors {:?}",
            model.warnings()
        );
        assert_eq!(model.moe_layers(), &[0, 1], "{what}");
        let (logits, trace) = run(&model, &tokens, &model.default_routing());
        let rel = max_rel(&logits, &want);
        println!(
            "{what}: max |logit diff| {:.2e}, relative {rel:.2e}",
            max_abs(&logits, &want)
        );
        assert!(rel < 1e-4, "{what}: logits off by {rel} (relative)");
        let want_choices = golden_choices(&g, &model);
        let mut worst = 0f32;
        for (slot, tokens) in choices(&trace).iter().enumerate() {
            for (t, got) in tokens.iter().enumerate() {
                let exp = &want_choices[slot][t];
                let ids = |v: &[(usize, f32)]| v.iter().map(|p| p.0).collect::<Vec<_>>();
                assert_eq!(ids(got), ids(exp), "{what}: layer {slot} token {t}");
                for (a, b) in got.iter().zip(exp) {
                    worst = worst.max((a.1 - b.1).abs());
                }
            }
        }
        println!("{what}: max weight diff {worst:.2e}");
        assert!(worst < 1e-5, "{what}: weights off by {worst}");
    }
    // `--moe-dispatch kernel` has neither the biases nor the clamp: refused, not run wrongly.
    let source = ModelSource::open(&gguf("f32")).unwrap();
    let options = xmoe_top::model::LoadOptions {
        dispatch: "kernel".parse().unwrap(),
        ..Default::default()
    };
    let e = Model::from_source(&source, &Device::Cpu, options)
        .err()
        .expect("the kernel dispatch must be refused")
        .to_string();
    assert!(e.contains("clamped SwiGLU"), "{e}");
}

/// Max |logit diff| of the MXFP4 file against the goldens (logits up to about 4.7): measured
/// 2.739 (`--nocapture`; docs/gguf.md), which is what transformers itself gives on the same
/// MXFP4 values (`gpt_oss.mxfp4.logits.safetensors`: 2.739 too). It is the experts' 4-bit
/// rounding, amplified through the blocks by the fixture's N(0, 0.2) weights; the tight check is
/// against that reference.
const MXFP4_GOLDEN_BOUND: f32 = 3.0;
/// Share of the 48 native top-k sets that may differ from the goldens' (measured 3/48).
const MXFP4_SET_BOUND: f64 = 0.15;

#[test]
fn the_mxfp4_file_runs_packed_and_gives_its_dequantised_logits() {
    let g = goldens();
    let tokens = input_ids(&g);
    let want = f32s(&g["logits"]);
    let path = gguf("mxfp4");
    let file = GgufFile::open(&path).unwrap();
    let experts: Vec<_> = file
        .tensor_table()
        .into_iter()
        .filter(|t| t.0.ends_with("_exps.weight"))
        .collect();
    assert_eq!(experts.len(), 6);
    assert!(experts.iter().all(|t| t.1 == "MXFP4"), "{experts:?}");
    // 17 bytes per 32 values, as in the file, and what the CPU load keeps.
    for (name, _, shape, bytes) in &experts {
        assert_eq!(*bytes, shape.iter().product::<usize>() / 32 * 17, "{name}");
        assert_eq!(file.dtype(name), Some(TensorType::Mxfp4));
    }
    let packed = load_gguf(&path, MoeDispatch::Auto, false);
    let reference = load_gguf(&path, MoeDispatch::Auto, true);
    // The device form (`--moe-dispatch candle`): MXFP4 widened to bf16, exact for these values.
    let device_form = load_gguf(&path, MoeDispatch::Candle, false);
    assert!(packed.warnings().is_empty(), "{:?}", packed.warnings());
    let (logits, trace) = run(&packed, &tokens, &packed.default_routing());
    let (ref_logits, ref_trace) = run(&reference, &tokens, &reference.default_routing());
    let (dev_logits, _) = run(&device_form, &tokens, &device_form.default_routing());
    let vs_ref = max_abs(&logits, &ref_logits);
    let vs_dev = max_abs(&logits, &dev_logits);
    let vs_golden = max_abs(&logits, &want);
    // transformers on the same MXFP4 values (scripts/gguf-fixtures/generate.py).
    let hf_mxfp4 = f32s(
        &golden::golden_tensors(&repo(
            "tests/fixtures/gguf/gpt_oss.mxfp4.logits.safetensors",
        ))["logits"],
    );
    let vs_hf = max_rel(&logits, &hf_mxfp4);
    let (differ, total) = sets_differing(&trace, &golden_choices(&g, &packed));
    println!(
        "gpt_oss mxfp4: max |logit diff| {vs_ref:.2e} vs the same file dequantised to f32, {vs_dev:.2e} vs the bf16 device form, {:.2e} (relative {vs_hf:.2e}) vs transformers on the MXFP4 values, {vs_golden:.3} vs goldens; top-k sets differing from the goldens {differ}/{total}",
        max_abs(&logits, &hf_mxfp4)
    );
    assert!(vs_hf < 1e-4, "vs transformers on the MXFP4 values: {vs_hf}");
    // The packed product decodes exact values: only the f32 summation order differs.
    assert!(vs_ref < 1e-4, "packed vs dequantised: {vs_ref}");
    assert!(vs_dev < 1e-4, "packed vs device form: {vs_dev}");
    assert_eq!(
        sets_differing(&trace, &choices(&ref_trace)),
        (0, total),
        "packed and dequantised route alike"
    );
    assert!(vs_golden < MXFP4_GOLDEN_BOUND, "{vs_golden}");
    // A file whose experts silently read as the f32 ones would match the goldens to rounding.
    assert!(vs_golden > 1e-3, "{vs_golden}: were the experts quantised?");
    assert!(
        differ as f64 / total as f64 <= MXFP4_SET_BOUND,
        "{differ}/{total}"
    );
}

/// Softmax over all E router logits (bias included).
fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f64> = logits.iter().map(|&z| ((z - max) as f64).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.iter().map(|x| x / sum).collect()
}

/// The threshold rule on gpt-oss's router, the plain way: softmax over all E logits (bias
/// included), experts in descending probability while the mass before them is below t.
fn naive_threshold(logits: &[f32], t: f32) -> Vec<usize> {
    let p = softmax(logits);
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    let (mut before, mut out) = (0.0, Vec::new());
    for x in order {
        if !out.is_empty() && before >= t as f64 {
            break;
        }
        out.push(x);
        before += p[x];
    }
    out
}

#[test]
fn threshold_routing_on_the_gpt_oss_file_follows_the_plain_rule() {
    let model = load(&gguf("f32"), MoeDispatch::Candle);
    let g = goldens();
    let e = model.config().n_experts;
    // Layer 0 sees the reference's hidden states: its router logits are the goldens'.
    let golden = f32s(&g["router_logits.0"]);
    let n = model.moe_layers().len();
    let mut sizes = std::collections::BTreeSet::new();
    for t in [0.3f32, 0.6, 0.9] {
        for renormalize in [false, true] {
            let policy = RoutingPolicy::Threshold { t, renormalize };
            let routing = RoutingConfig::uniform(policy, n, e).unwrap();
            let (_, trace) = run(&model, &input_ids(&g), &routing);
            let r = &trace.moe[0].routing;
            for tok in 0..r.tokens() {
                let logits = &golden[tok * e..(tok + 1) * e];
                let got: Vec<usize> = r.choices(tok).map(|(x, _, _)| x).collect();
                let want = naive_threshold(logits, t);
                assert_eq!(got, want, "t={t} token {tok}");
                // Weights: the probabilities, or (the gpt_oss default in the CLI) the same
                // renormalised over the chosen set.
                let p = softmax(logits);
                let mass: f64 = want.iter().map(|&x| p[x]).sum();
                for (x, w, _) in r.choices(tok) {
                    let expect = if renormalize { p[x] / mass } else { p[x] };
                    assert!(
                        (f64::from(w) - expect).abs() < 1e-5,
                        "t={t} token {tok} expert {x}: weight {w}, expected {expect}"
                    );
                }
                sizes.insert(got.len());
            }
        }
    }
    assert!(
        sizes.len() > 2,
        "the test needs tokens with different expert counts, found {sizes:?}"
    );
}

/// o200k's pre-tokenizer regex, as gpt-oss's `tokenizer.json` holds it.
const O200K: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[test]
fn the_gpt_4o_tokenizer_comes_from_the_metadata() {
    let json = TextTokenizer::from_file(&repo("tests/fixtures/hf/tokenizer.json"), 512).unwrap();
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo("tests/fixtures/hf/gpt_oss/golden.json")).unwrap(),
    )
    .unwrap();
    let ids = input_ids(&goldens());
    let text = std::fs::read(repo("assets/kjv-heldout.txt")).unwrap();
    for quant in ["f32", "mxfp4"] {
        let path = gguf(quant);
        let meta = GgufFile::open(&path).unwrap();
        assert!(
            matches!(meta.metadata().get("tokenizer.ggml.pre"), Some(Value::String(s)) if s == "gpt-4o")
        );
        let t = TextTokenizer::from_file(&path, 512).unwrap();
        // The goldens' texts split alike under GPT-2's and o200k's regex: the goldens' ids.
        for (i, s) in golden["texts"].as_array().unwrap().iter().enumerate() {
            let e = t.encode(s.as_str().unwrap().as_bytes()).unwrap();
            assert_eq!(e.ids[..12], ids[i * 12..(i + 1) * 12], "{quant}");
        }
        let a = t.encode(&text[..8192]).unwrap();
        assert_eq!(t.decode(&a.ids).as_bytes(), &text[..8192], "{quant}");
        // The ids are those of tokenizer.json's vocabulary and merges behind o200k's
        // pre-tokenizer (the regex of gpt-oss's own tokenizer.json).
        let mut o200k: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(repo("tests/fixtures/hf/tokenizer.json")).unwrap(),
        )
        .unwrap();
        o200k["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": O200K}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]});
        let dir = tempfile::tempdir().unwrap();
        let o200k_path = dir.path().join("tokenizer.json");
        std::fs::write(&o200k_path, o200k.to_string()).unwrap();
        let o200k = TextTokenizer::from_file(&o200k_path, 512).unwrap();
        assert_eq!(a, o200k.encode(&text[..8192]).unwrap(), "{quant}");
        // (And, in this vocabulary, tokenizer.json's own ids: see below.)
        assert_eq!(a, json.encode(&text[..8192]).unwrap(), "{quant}");
        // This 512-token vocabulary has no merge across the places where o200k's and GPT-2's
        // regexes cut differently (its ids agree on all of the KJV held-out text), so that the
        // metadata's pre-tokenizer is the one used is checked on the pieces: o200k keeps
        // contractions of any case on their word and cuts digits in threes, GPT-2 does neither.
        let tok = xmoe_top::workload::gguf_tokenizer::from_file(&path).unwrap();
        let mut s = PreTokenizedString::from(" don'T 12345");
        tok.get_pre_tokenizer()
            .unwrap()
            .pre_tokenize(&mut s)
            .unwrap();
        let pieces: Vec<String> = s
            .get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(_, (a, b), _)| " don'T 12345"[a..b].to_string())
            .collect();
        assert_eq!(pieces, [" don'T", " ", "123", "45"], "{quant}");
    }
}

/// The F32 fixture's metadata and tensors.
fn f32_parts() -> Parts {
    let mut f = std::fs::File::open(gguf("f32")).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let mut names: Vec<_> = c.tensor_infos.keys().cloned().collect();
    names.sort();
    let tensors = names
        .into_iter()
        .map(|n| {
            let t = c.tensor(&mut f, &n, &Device::Cpu).unwrap();
            (n, t)
        })
        .collect();
    (c.metadata.into_iter().collect(), tensors)
}

/// Writes `meta` and `tensors` to `dir/name`.
fn write_gguf(
    dir: &Path,
    name: &str,
    meta: &[(String, Value)],
    tensors: &[(String, QTensor)],
) -> PathBuf {
    let p = dir.join(name);
    let m: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(&mut std::fs::File::create(&p).unwrap(), &m, &t).unwrap();
    p
}

#[test]
fn the_sliding_window_pattern_follows_llama_cpp() {
    // Without the key: llama.cpp's pattern 2, the even blocks slide (transformers' default).
    let windows = |path: &Path| {
        let ModelSource::Gguf(g) = ModelSource::open(path).unwrap() else {
            panic!("not GGUF")
        };
        g.hf_config().sliding_window.clone()
    };
    assert_eq!(windows(&gguf("f32")), [Some(5), None]);
    let dir = tempfile::tempdir().unwrap();
    let (meta, tensors) = f32_parts();
    let key = "gpt-oss.attention.sliding_window_pattern";
    for (name, value, want) in [
        // `set_swa_pattern(n)`: block i slides when n == 0 or i % n < n - 1.
        ("p0", Value::U32(0), [Some(5), Some(5)]),
        ("p1", Value::U32(1), [None, None]),
        ("p3", Value::U32(3), [Some(5), Some(5)]),
        (
            "array",
            Value::Array(vec![Value::Bool(false), Value::Bool(true)]),
            [None, Some(5)],
        ),
    ] {
        let mut m = meta.clone();
        m.push((key.into(), value));
        let p = write_gguf(dir.path(), &format!("{name}.gguf"), &m, &tensors);
        assert_eq!(windows(&p), want, "{name}");
    }
    let mut m = meta.clone();
    m.push((key.into(), Value::Array(vec![Value::Bool(true)])));
    let p = write_gguf(dir.path(), "short.gguf", &m, &tensors);
    let e = ModelSource::open(&p).err().unwrap().to_string();
    assert!(
        e.contains(key) && e.contains("one entry per block (2)"),
        "{e}"
    );
}

// ---- bad input -------------------------------------------------------------------------------

/// The byte offset of tensor `name`'s name length in the tensor index of `bytes` (GGUF v3).
fn entry_offset(bytes: &[u8], name: &str) -> usize {
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend_from_slice(name.as_bytes());
    bytes
        .windows(key.len())
        .position(|w| w == key.as_slice())
        .unwrap()
}

/// The offsets of tensor `name`'s dimension count, first dimension and ggml type.
fn entry_fields(bytes: &[u8], name: &str) -> (usize, usize, usize) {
    let at = entry_offset(bytes, name) + 8 + name.len();
    let dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    (at, at + 4, at + 4 + 8 * dims)
}

#[test]
fn bad_gpt_oss_files_get_one_clear_line_and_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let src = gguf("mxfp4");
    let bytes = std::fs::read(&src).unwrap();
    let mut cases: Vec<(&str, PathBuf, Vec<String>)> = Vec::new();
    let save = |name: &str, b: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, b).unwrap();
        p
    };

    // MXFP4 data cut 1000 bytes into `blk.1.ffn_up_exps.weight`.
    let tensor = "blk.1.ffn_up_exps.weight";
    let (start, len) = GgufFile::open(&src).unwrap().data_range(tensor).unwrap();
    assert_eq!(len, 8 * 32 * 32 / 32 * 17);
    let p = save("cut.gguf", &bytes[..start as usize + 1000]);
    cases.push((
        "MXFP4 data cut short",
        p,
        vec![
            format!("`{tensor}`"),
            "MXFP4".into(),
            format!("{len} bytes at offset {start}"),
            "only 1000 bytes remain".into(),
        ],
    ));

    // A tensor name longer than the file.
    let mut b = bytes.clone();
    let at = entry_offset(&b, "token_embd.weight");
    b[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let p = save("name.gguf", &b);
    cases.push((
        "tensor name longer than the file",
        p,
        vec![
            "1099511627776 bytes long".into(),
            "bytes left in the".into(),
        ],
    ));

    // A dimension count past GGML_MAX_DIMS, and a dimension the file cannot hold.
    let mut b = bytes.clone();
    let (n_dims, first_dim, _) = entry_fields(&b, "blk.0.ffn_gate_exps.weight");
    b[n_dims..n_dims + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    let p = save("ndims.gguf", &b);
    cases.push((
        "dimension count",
        p,
        vec![
            "`blk.0.ffn_gate_exps.weight` has 4294967295 dimensions".into(),
            "at most 4".into(),
        ],
    ));
    let mut b = bytes.clone();
    b[first_dim..first_dim + 8].copy_from_slice(&(1u64 << 45).to_le_bytes());
    let p = save("dim.gguf", &b);
    cases.push((
        "dimension larger than the file",
        p,
        vec![
            "`blk.0.ffn_gate_exps.weight`".into(),
            "more values than the".into(),
        ],
    ));

    // More tensors than the file can index.
    let mut b = bytes.clone();
    b[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let p = save("count.gguf", &b);
    cases.push((
        "tensor count larger than the file",
        p,
        vec!["declares 1099511627776 tensors".into()],
    ));

    // Unknown ggml types other than MXFP4 are named.
    for (id, name) in [(20u32, "IQ4_NL"), (40, "NVFP4"), (77, "unknown")] {
        let mut b = bytes.clone();
        let (_, _, ty) = entry_fields(&b, "blk.0.ffn_down_exps.weight");
        b[ty..ty + 4].copy_from_slice(&id.to_le_bytes());
        let p = save(&format!("type{id}.gguf"), &b);
        cases.push((
            "unsupported ggml type",
            p,
            vec![
                "`blk.0.ffn_down_exps.weight`".into(),
                format!("ggml type {id} ({name})"),
            ],
        ));
    }

    // A missing gpt-oss key (the F32 file, which candle's writer can rewrite).
    let (meta, tensors) = f32_parts();
    for key in [
        "gpt-oss.attention.sliding_window",
        "gpt-oss.expert_feed_forward_length",
    ] {
        let m: Vec<_> = meta.iter().filter(|(k, _)| k != key).cloned().collect();
        let p = write_gguf(dir.path(), &format!("{key}.gguf"), &m, &tensors);
        cases.push((
            "missing gpt-oss key",
            p,
            vec![format!("`{key}`"), "missing".into()],
        ));
    }

    // An alignment of 0, which candle-core's reader divides by.
    let mut m = meta.clone();
    m.push(("general.alignment".into(), Value::U32(0)));
    let p = write_gguf(dir.path(), "align0.gguf", &m, &tensors);
    cases.push((
        "alignment 0",
        p,
        vec!["invalid header".into(), "`general.alignment` of 0".into()],
    ));

    for (what, path, says) in cases {
        let p = path.to_string_lossy().into_owned();
        let (code, err) = xmoe(&["inspect", &p]);
        println!("{what}: exit {code}: {}", err.trim());
        assert_eq!(code, 3, "{what}: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{what}: {err}");
        assert!(err.contains(&p), "{what}: names the file: {err}");
        for s in says {
            assert!(err.contains(&s), "{what}: `{s}` missing from: {err}");
        }
        assert!(ModelSource::open(&path).is_err(), "{what}");
    }
}

#[test]
fn the_mxfp4_file_runs_headless_from_the_command_line() {
    let p = gguf("mxfp4").to_string_lossy().into_owned();
    let (code, err) = xmoe(&["run", "--headless", "--tokens", "48", "--threads", "1", &p]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("warning"), "{err}");
}
