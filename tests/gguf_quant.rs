//! Quantised GGUF files run on their stored blocks (`xmoe_top::model::quant`): every committed
//! quantised fixture against the same file dequantised to f32 on load, a K-quant model written
//! here (the fixtures' 32-wide rows are too short for 256-value K-quant blocks), the memory the
//! loaded weights take, and a quantised tensor whose rows do not fit its blocks. The measured
//! figures are in docs/gguf.md; `--nocapture` prints them.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use xmoe_top::model::trace::ForwardTrace;
use xmoe_top::model::{LoadOptions, Model, ModelSource, MoeDispatch};

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

const FAMILIES: &[&str] = &["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"];

/// Opens `path` and loads it on the CPU, kept as stored or (`dequantize`) all f32.
fn load(path: &Path, dequantize: bool, dispatch: MoeDispatch) -> (Model, usize) {
    let mut source = ModelSource::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let ModelSource::Gguf(g) = &mut source else {
        panic!("{} is not read as GGUF", path.display())
    };
    g.set_dequantize(dequantize);
    let f32_bytes = g.file().dequantized_bytes();
    let resident = if dequantize {
        f32_bytes
    } else {
        source.resident_weight_bytes()
    };
    let options = LoadOptions {
        dispatch,
        threads: 2,
        ..Default::default()
    };
    let model = Model::from_source(&source, &Device::Cpu, options)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (model, resident)
}

/// Logits and, per MoE slot and token, the sorted native expert set.
fn forward(model: &Model, tokens: &[u32], batch: usize) -> (Vec<f32>, Vec<Vec<Vec<usize>>>) {
    let mut trace = ForwardTrace::default();
    let logits = model
        .forward(tokens, batch, &model.default_routing(), None, &mut trace)
        .unwrap();
    let sets = trace
        .moe
        .iter()
        .map(|m| {
            (0..m.routing.tokens())
                .map(|t| {
                    let mut s: Vec<usize> = m.routing.choices(t).map(|c| c.0).collect();
                    s.sort();
                    s
                })
                .collect()
        })
        .collect();
    (logits, sets)
}

/// (max |a - b|, max |b|, sets differing, sets).
fn compare(
    a: &(Vec<f32>, Vec<Vec<Vec<usize>>>),
    b: &(Vec<f32>, Vec<Vec<Vec<usize>>>),
) -> (f32, f32, usize, usize) {
    let diff =
        a.0.iter()
            .zip(&b.0)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    let scale = b.0.iter().fold(0f32, |m, y| m.max(y.abs()));
    let (mut differ, mut total) = (0, 0);
    for (sa, sb) in a.1.iter().zip(&b.1) {
        for (x, y) in sa.iter().zip(sb) {
            differ += usize::from(x != y);
            total += 1;
        }
    }
    (diff, scale, differ, total)
}

/// The goldens' 2 x 12 input ids (the same tokens for every family).
fn golden_tokens() -> Vec<u32> {
    let g = candle_core::safetensors::load(
        repo("tests/fixtures/hf/mixtral/golden.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    g["input_ids"]
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

/// Bounds on quantised-vs-dequantised, per weight type of the experts, measured with
/// `--nocapture` (docs/gguf.md) with room for summation order: max |logit diff| and native top-k
/// sets differing. The only arithmetic difference is candle's quantisation of the activations
/// to 8 bits (Q8_0 for Q4_0/Q8_0, Q8_1 for Q4_1) before each integer dot product.
/// The fixtures' weights are N(0, 0.2), ten times the usual scale (docs/gguf.md), which amplifies
/// every rounding through the blocks: up to 0.86 measured on logits up to 4.9, 3 of 48 sets.
const REFERENCE_BOUNDS: &[(&str, f32, usize)] =
    &[("q8_0", 1.2, 5), ("q4_1", 1.2, 5), ("q4_0", 1.2, 5)];

#[test]
fn quantised_fixtures_run_on_their_blocks_and_match_the_dequantised_reference() {
    let tokens = golden_tokens();
    let mut failures = Vec::new();
    for family in FAMILIES {
        for &(quant, bound, sets_bound) in REFERENCE_BOUNDS {
            let path = repo(&format!("tests/fixtures/gguf/{family}.{quant}.gguf"));
            let (kept, kept_bytes) = load(&path, false, MoeDispatch::Auto);
            let (reference, f32_bytes) = load(&path, true, MoeDispatch::Auto);
            let (diff, scale, differ, total) = compare(
                &forward(&kept, &tokens, 2),
                &forward(&reference, &tokens, 2),
            );
            println!(
                "{family} {quant}: kept vs dequantised: max |logit diff| {diff:.3e} (logits up to {scale:.2}), top-k sets differing {differ}/{total}; weights {kept_bytes} vs {f32_bytes} bytes"
            );
            if diff > bound || differ > sets_bound {
                failures.push(format!("{family} {quant}: {diff} / {differ} sets"));
            }
            // The 8-bit activations move the logits: a model that silently ran on f32 weights
            // would match to rounding.
            if diff < 1e-4 {
                failures.push(format!("{family} {quant}: {diff}: not run quantised?"));
            }
            if kept_bytes * 2 > f32_bytes {
                failures.push(format!(
                    "{family} {quant}: {kept_bytes} bytes kept vs {f32_bytes} as f32"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn the_kernel_dispatch_and_the_reference_give_the_same_logits() {
    // `--moe-dispatch kernel` asks for the packed f32 kernel: the experts are dequantised for it, the rest
    // stays quantised; with everything dequantised the two dispatches agree to rounding.
    let tokens = golden_tokens();
    let path = repo("tests/fixtures/gguf/olmoe.q8_0.gguf");
    let kernel = MoeDispatch::Kernel(xmoe_top::kernel::KernelVariant::Auto);
    let a = forward(&load(&path, true, kernel).0, &tokens, 2);
    let b = forward(&load(&path, true, MoeDispatch::Candle).0, &tokens, 2);
    let (diff, scale, differ, _) = compare(&a, &b);
    assert!(
        diff <= 1e-4 * (1.0 + scale) && differ == 0,
        "{diff} {differ}"
    );
    let c = forward(&load(&path, false, kernel).0, &tokens, 2);
    let (diff, _, _, _) = compare(&c, &b);
    assert!(
        diff > 1e-5 && diff < 1.2,
        "kernel experts, quantised attention: {diff}"
    );
}

// ---- a K-quant model written here --------------------------------------------------------------

/// Shapes of a synthetic Mixtral-style (`llama` with experts) GGUF.
#[derive(Clone, Copy)]
struct Shape {
    hidden: usize,
    inter: usize,
    experts: usize,
    top_k: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
}

/// Writes a `llama` MoE GGUF of `shape` with random weights (seeded): attention and the LM head
/// in `attn`, gate/up experts in `gate_up`, down experts in `down` (llama.cpp's Q4_K_M puts
/// Q4_K and Q6_K side by side like this), norms and routers F32, the tokenizer of the committed
/// fixtures (vocabulary 512). Tensors are generated and quantised one at a time.
fn write_synthetic(
    path: &Path,
    s: Shape,
    attn: GgmlDType,
    gate_up: GgmlDType,
    down: GgmlDType,
) -> u64 {
    let mut fixture = std::fs::File::open(repo("tests/fixtures/gguf/mixtral.f32.gguf")).unwrap();
    let content = gguf_file::Content::read(&mut fixture).unwrap();
    let vocab = 512;
    let head_dim = s.hidden / s.heads;
    let u = |v: usize| Value::U32(v as u32);
    let mut meta: Vec<(String, Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, v) in [
        ("general.architecture", Value::String("llama".into())),
        ("general.name", Value::String("synthetic-mixtral".into())),
        ("llama.context_length", u(4096)),
        ("llama.embedding_length", u(s.hidden)),
        ("llama.block_count", u(s.layers)),
        ("llama.attention.head_count", u(s.heads)),
        ("llama.attention.head_count_kv", u(s.kv_heads)),
        ("llama.rope.freq_base", Value::F32(1e6)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.expert_count", u(s.experts)),
        ("llama.expert_used_count", u(s.top_k)),
        ("llama.feed_forward_length", u(s.inter)),
        ("llama.vocab_size", u(vocab)),
    ] {
        meta.push((k.to_string(), v));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let dev = Device::Cpu;
    let mut tensor = |dims: &[usize], scale: f32, dtype: GgmlDType| -> QTensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
        let t = Tensor::from_vec(v, dims, &dev).unwrap();
        QTensor::quantize(&t, dtype).unwrap()
    };
    let (h, i, e) = (s.hidden, s.inter, s.experts);
    let kv = s.kv_heads * head_dim;
    let w = 1.0 / (h as f32).sqrt();
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), tensor(&[vocab, h], 1.0, attn)),
        ("output.weight".into(), tensor(&[vocab, h], w, attn)),
        (
            "output_norm.weight".into(),
            tensor(&[h], 1.0, GgmlDType::F32),
        ),
    ];
    for l in 0..s.layers {
        let b = format!("blk.{l}");
        for (name, dims, scale, dtype) in [
            ("attn_norm.weight", vec![h], 1.0, GgmlDType::F32),
            ("ffn_norm.weight", vec![h], 1.0, GgmlDType::F32),
            ("attn_q.weight", vec![h, h], w, attn),
            ("attn_k.weight", vec![kv, h], w, attn),
            ("attn_v.weight", vec![kv, h], w, attn),
            ("attn_output.weight", vec![h, h], w, attn),
            ("ffn_gate_inp.weight", vec![e, h], 4.0 * w, GgmlDType::F32),
            ("ffn_gate_exps.weight", vec![e, i, h], w, gate_up),
            ("ffn_up_exps.weight", vec![e, i, h], w, gate_up),
            (
                "ffn_down_exps.weight",
                vec![e, h, i],
                1.0 / (i as f32).sqrt(),
                down,
            ),
        ] {
            tensors.push((format!("{b}.{name}"), tensor(&dims, scale, dtype)));
        }
    }
    let mut f = std::fs::File::create(path).unwrap();
    let m: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(&mut f, &m, &t).unwrap();
    std::fs::metadata(path).unwrap().len()
}

#[test]
fn k_quant_experts_run_on_their_blocks_and_match_the_dequantised_reference() {
    let dir = tempfile::tempdir().unwrap();
    let shape = Shape {
        hidden: 256,
        inter: 256,
        experts: 4,
        top_k: 2,
        layers: 2,
        heads: 4,
        kv_heads: 2,
    };
    let tokens: Vec<u32> = (0..32u32).map(|i| (i * 37 + 5) % 512).collect();
    let mut failures = Vec::new();
    // (attention, gate/up, down, bound on max |logit diff|), measured in docs/gguf.md.
    for (attn, gu, down, bound) in [
        (GgmlDType::Q4K, GgmlDType::Q4K, GgmlDType::Q6K, 0.05f32),
        (GgmlDType::Q5K, GgmlDType::Q3K, GgmlDType::Q2K, 0.05),
        (GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::Q5_1, 0.05),
    ] {
        let path = dir.path().join(format!("{attn:?}-{gu:?}-{down:?}.gguf"));
        let bytes = write_synthetic(&path, shape, attn, gu, down);
        let (kept, kept_bytes) = load(&path, false, MoeDispatch::Auto);
        let (reference, f32_bytes) = load(&path, true, MoeDispatch::Auto);
        let (diff, scale, differ, total) = compare(
            &forward(&kept, &tokens, 2),
            &forward(&reference, &tokens, 2),
        );
        println!(
            "{attn:?}/{gu:?}/{down:?}: {bytes}-byte file, weights {kept_bytes} vs {f32_bytes} bytes as f32; max |logit diff| {diff:.3e} (logits up to {scale:.2}), top-k sets differing {differ}/{total}"
        );
        if diff > bound || diff < 1e-6 || differ * 10 > total {
            failures.push(format!(
                "{attn:?}/{gu:?}/{down:?}: {diff}, {differ}/{total}"
            ));
        }
        if kept_bytes as u64 > bytes + (64 << 10) {
            failures.push(format!(
                "{kept_bytes} bytes resident for a {bytes}-byte file"
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn rows_that_do_not_fit_their_blocks_are_named() {
    // The header says Q4_K (256-value blocks) for a tensor whose rows are 32 values: refused when
    // the tensor is read, naming the tensor, its shape and the block size, exit status 3.
    let dir = tempfile::tempdir().unwrap();
    let src = repo("tests/fixtures/gguf/olmoe.q8_0.gguf");
    let mut bytes = std::fs::read(&src).unwrap();
    let name = "blk.0.ffn_gate_exps.weight";
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend_from_slice(name.as_bytes());
    let at = bytes
        .windows(key.len())
        .position(|w| w == key.as_slice())
        .unwrap()
        + key.len();
    let dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let t = at + 4 + 8 * dims;
    bytes[t..t + 4].copy_from_slice(&12u32.to_le_bytes());
    let p = dir.path().join("q4k-rows.gguf");
    std::fs::write(&p, &bytes).unwrap();
    let e = match ModelSource::open(&p) {
        Ok(s) => Model::from_source(&s, &Device::Cpu, LoadOptions::default())
            .err()
            .expect("refused")
            .to_string(),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains(name) && e.contains("[8, 12, 32]") && e.contains("256"),
        "{e}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xmoe-top"))
        .args(["run", "--headless", "--tokens", "16", "--threads", "1"])
        .arg(&p)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains(name) && !err.contains("panicked"), "{err}");
}

// ---- memory on a larger file (by hand) --------------------------------------------------------

/// The Mixtral-shaped synthetic file of docs/gguf.md: 4 blocks of 8 experts (top-2), hidden 1024,
/// expert width 3584, Q4_K attention and gate/up, Q6_K down.
const BIG: Shape = Shape {
    hidden: 1024,
    inter: 3584,
    experts: 8,
    top_k: 2,
    layers: 4,
    heads: 8,
    kv_heads: 2,
};

fn big_path() -> PathBuf {
    PathBuf::from(std::env::var("XMOE_SYNTH_GGUF").expect("set XMOE_SYNTH_GGUF to the file's path"))
}

/// Step 1 (by hand): `XMOE_SYNTH_GGUF=/tmp/synth.gguf cargo test --release --test gguf_quant --
/// --ignored --nocapture write_the_big`.
#[test]
#[ignore = "writes a ~200 MB file, see docs/gguf.md"]
fn write_the_big_synthetic_gguf() {
    let path = big_path();
    let t0 = std::time::Instant::now();
    let bytes = write_synthetic(&path, BIG, GgmlDType::Q4K, GgmlDType::Q4K, GgmlDType::Q6K);
    println!(
        "{}: {bytes} bytes in {:.1} s",
        path.display(),
        t0.elapsed().as_secs_f64()
    );
}

fn status_kib(key: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = text.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Step 2 (by hand, its own process): loads the file, runs 2 x 64 tokens, and prints the resident
/// set against the file size; `XMOE_SYNTH_DEQUANTIZE=1` loads the f32 reference instead.
#[test]
#[ignore = "needs the file of write_the_big_synthetic_gguf, see docs/gguf.md"]
fn resident_memory_of_the_big_synthetic_gguf() {
    let path = big_path();
    let dequantize = std::env::var("XMOE_SYNTH_DEQUANTIZE").is_ok_and(|v| v == "1");
    let file = std::fs::metadata(&path).unwrap().len();
    let before = status_kib("VmRSS:");
    let t0 = std::time::Instant::now();
    let (model, estimate) = load(&path, dequantize, MoeDispatch::Auto);
    let load_s = t0.elapsed().as_secs_f64();
    let loaded = status_kib("VmRSS:");
    let tokens: Vec<u32> = (0..128u32).map(|i| (i * 37 + 5) % 512).collect();
    let t1 = std::time::Instant::now();
    let out = forward(&model, &tokens, 2);
    let pass_s = t1.elapsed().as_secs_f64();
    assert!(out.0.iter().all(|v| v.is_finite()));
    let after = status_kib("VmRSS:");
    let peak = status_kib("VmHWM:");
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "{} ({}): file {:.1} MiB; weights estimate {:.1} MiB; VmRSS before load {:.1} MiB, after load {:.1} MiB, after 2x64 tokens {:.1} MiB, peak {:.1} MiB; load {load_s:.1} s, pass {pass_s:.2} s",
        path.display(),
        if dequantize {
            "dequantised to f32"
        } else {
            "kept quantised"
        },
        file as f64 / (1 << 20) as f64,
        estimate as f64 / (1 << 20) as f64,
        mib(before),
        mib(loaded),
        mib(after),
        mib(peak),
    );
    if !dequantize {
        // Near the file size: measured 1.32x (docs/gguf.md), the weights plus code, tables,
        // activations and the allocator's slack.
        assert!(
            (after - before) * 1024 < file * 3 / 2,
            "{} MiB resident for a {} MiB file",
            mib(after - before),
            file >> 20
        );
    }
}
