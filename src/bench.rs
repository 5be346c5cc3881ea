//! Whole-model benchmarks (issue 7, items 2 and 5): tokens/s of the embedded model under each
//! policy for the eval and generate workloads, and the time to load a generated 1 GiB model.
//! Run by `xmoe-top bench` (also on a GPU, with `--device cuda`) and `cargo bench --bench model`.
//! Prints markdown tables; results are recorded in docs/benchmarks.md.

use std::time::Instant;

use crate::kernel::{Activation, KernelVariant, MoeScratch, PackedExperts, moe_forward};
use crate::model::config::ModelConfig;
use crate::model::format::{ModelFile, StoreDtype, write_model};
use crate::model::synth::random_weights;
use crate::model::trace::ForwardTrace;
use crate::model::{LoadOptions, Model, RoutingConfig};
use crate::profiling::flops::FlopModel;
use crate::routing::RoutingPolicy;
use crate::routing::{ExpertGroups, Routing, route};
use candle_core::Device;

/// Runs every whole-model benchmark on `device`; `quick` runs fewer passes and loads a 0.24 GiB
/// model instead of 1 GiB.
pub fn run(quick: bool, device: &Device, threads: usize) -> anyhow::Result<()> {
    println!(
        "machine: {} threads, {}",
        threads,
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| format!(
                "load average {}",
                l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
            ))
            .unwrap_or_default()
    );
    whole_model(quick, device, threads)?;
    load_time(quick, device, threads)?;
    if device.is_cpu() {
        half_layer(quick, threads);
    }
    Ok(())
}

fn policies(r: usize) -> Vec<RoutingPolicy> {
    let mut v = vec![RoutingPolicy::Dense];
    let mut ks = vec![1, 2, r];
    ks.dedup();
    for k in ks {
        v.push(RoutingPolicy::TopK {
            k,
            renormalize: false,
        });
    }
    for t in [0.5, 0.7, 0.9, 0.99] {
        v.push(RoutingPolicy::threshold(t));
    }
    v
}

fn whole_model(quick: bool, device: &Device, threads: usize) -> anyhow::Result<()> {
    let file = crate::embedded::model_file()?;
    let model = Model::from_file(&file, device, LoadOptions::default())?;
    let cfg = model.config().clone();
    let flops = FlopModel::new(&cfg);
    let n_moe = model.moe_layers().len();
    let text = crate::embedded::HELDOUT_TEXT;
    let (batch, seq) = (8, 128);
    let passes = if quick { 3 } else { 12 };
    println!(
        "\n## Whole model: {} on {device:?} ({threads} CPU threads), eval {batch} x {seq} tokens, generate 1 x 128 positions\n",
        cfg.name
    );
    println!(
        "| policy | experts/token | MoE FLOPs / all experts | eval tokens/s | decode tokens/s | decode us/token |"
    );
    println!("|---|---|---|---|---|---|");
    for policy in policies(cfg.split_ratio().min(cfg.n_experts)) {
        let routing = RoutingConfig::uniform(policy, n_moe, cfg.n_experts)?;
        let mut trace = ForwardTrace::default();
        let (mut tokens, mut pairs, mut elapsed) = (0usize, 0usize, 0f64);
        for p in 0..=passes {
            let start = (p * batch * seq * 7) % (text.len() - batch * seq);
            let toks: Vec<u32> = text[start..start + batch * seq]
                .iter()
                .map(|&b| b as u32)
                .collect();
            let t0 = Instant::now();
            model.forward(&toks, batch, &routing, None, &mut trace)?;
            if p > 0 {
                // The first pass warms caches and allocations.
                elapsed += t0.elapsed().as_secs_f64();
                tokens += toks.len();
                pairs += trace.moe.iter().map(|m| m.groups.pairs()).sum::<usize>();
            }
        }
        let experts = pairs as f64 / (tokens * n_moe) as f64;
        let frac = (flops.router() as f64 + experts * flops.expert() as f64)
            / flops.moe_layer_all_experts() as f64;
        // Decode: a short prompt, then one token at a time with the KV cache.
        let mut cache = model.new_cache(1);
        let prompt: Vec<u32> = b"And God said, ".iter().map(|&b| b as u32).collect();
        let logits = model.forward(&prompt, 1, &routing, Some(&mut cache), &mut trace)?;
        let vocab = cfg.vocab_size;
        let mut next = argmax(&logits[logits.len() - vocab..]);
        let steps = if quick { 32 } else { 112 };
        let t0 = Instant::now();
        for _ in 0..steps {
            let l = model.forward(&[next], 1, &routing, Some(&mut cache), &mut trace)?;
            next = argmax(&l);
        }
        let dec = t0.elapsed().as_secs_f64();
        println!(
            "| {policy} | {experts:.2} | {:.1}% | {:.0} | {:.0} | {:.0} |",
            frac * 100.0,
            tokens as f64 / elapsed,
            steps as f64 / dec,
            dec / steps as f64 * 1e6
        );
    }
    Ok(())
}

fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32)
}

fn load_time(quick: bool, device: &Device, threads: usize) -> anyhow::Result<()> {
    // d 1024, 64 experts x 128 per layer: 21 M parameters a layer; 25 layers = 1 GiB in f16.
    let layers = if quick { 6 } else { 25 };
    let cfg = ModelConfig {
        name: format!("random-d1024-l{layers}-e64x128"),
        ..ModelConfig::byte_level(1024, layers, 16, 1024, 64, 128, 4096)
    };
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("big.safetensors");
    write_model(
        &path,
        &cfg,
        &random_weights(&cfg, 1, false, 1.0),
        StoreDtype::F16,
        true,
    )?;
    let bytes = std::fs::metadata(&path)?.len();
    println!(
        "\n## Loading a generated {:.2} GiB model (f16, {layers} layers, d 1024, 64 x 128 experts), {threads} threads\n",
        bytes as f64 / (1u64 << 30) as f64
    );
    println!("| step | time (page cache warm) |");
    println!("|---|---|");
    for round in 0..2 {
        let t0 = Instant::now();
        let file = ModelFile::open(&path)?;
        let checked = t0.elapsed().as_secs_f64();
        let model = Model::from_file(&file, device, LoadOptions::default())?;
        let ready = t0.elapsed().as_secs_f64();
        // Prove it runs.
        let mut trace = ForwardTrace::default();
        model.forward(&[1, 2, 3], 1, &model.default_routing(), None, &mut trace)?;
        if round == 1 {
            println!(
                "| open, parse header, check config and every tensor | {:.3} s |",
                checked
            );
            println!(
                "| open to ready (dense weights widened to f32, experts packed in f16) | {:.3} s |",
                ready
            );
        }
    }
    // The embedded model: its bytes are in the binary, so "cold" is the first load in this
    // process (the binary's pages faulted in, allocations fresh) and "warm" the best of the next.
    let mut times = Vec::new();
    for _ in 0..6 {
        let t0 = Instant::now();
        let file = crate::embedded::model_file()?;
        let model = Model::from_file(&file, device, LoadOptions::default())?;
        times.push(t0.elapsed().as_secs_f64());
        std::hint::black_box(model);
    }
    let warm = times[1..].iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "| embedded model, open to ready: first load in this process / best of the next 5 | {:.1} ms / {:.1} ms |",
        times[0] * 1e3,
        warm * 1e3
    );
    Ok(())
}

/// Read bandwidth in bytes/s: `threads` threads each summing its share of a buffer of `bytes`
/// (far larger than the caches), best of `rounds` after one warm-up pass that also faults the
/// pages in.
pub fn read_bandwidth(bytes: usize, threads: usize, rounds: usize) -> f64 {
    let words = bytes / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let chunk = words.div_ceil(threads.max(1));
    let mut best = f64::INFINITY;
    for round in 0..=rounds {
        let t0 = Instant::now();
        let sum: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(chunk)
                .map(|c| {
                    s.spawn(move || {
                        // Four independent sums so the adds do not limit the loads.
                        let mut acc = [0u64; 4];
                        for q in c.chunks_exact(4) {
                            for (a, &v) in acc.iter_mut().zip(q) {
                                *a = a.wrapping_add(v);
                            }
                        }
                        acc.iter().fold(0u64, |x, &y| x.wrapping_add(y))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0, u64::wrapping_add)
        });
        std::hint::black_box(sum);
        if round > 0 {
            best = best.min(t0.elapsed().as_secs_f64());
        }
    }
    (words * 8) as f64 / best
}

/// A deterministic pseudo-random weight in [-scale, scale) (the figures need no statistics,
/// only data that is not all zeros).
fn weight(i: usize, scale: f32) -> f32 {
    let x = (i as u64)
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
}

/// Expert groups in which token `t` chooses experts `first(t), first(t) + 1, ...` (`k` of them,
/// modulo `e`), with weight 1 / k.
fn groups_for(tokens: usize, e: usize, k: usize, first: impl Fn(usize) -> usize) -> ExpertGroups {
    let mut logits = vec![0.0f32; tokens * e];
    for t in 0..tokens {
        for j in 0..k {
            logits[t * e + (first(t) + j) % e] = 10.0 + j as f32;
        }
    }
    let mut routing = Routing::default();
    let policy = RoutingPolicy::TopK {
        k,
        renormalize: true,
    }
    .check(e)
    .expect("k <= e");
    route(&logits, policy, None, &mut routing).expect("logits are [T, E]");
    let mut groups = ExpertGroups::default();
    groups.build(&routing);
    groups
}

/// The half-precision expert layer against the f32 one (issue 15, section 1): useful GFLOP/s at
/// prefill sizes, and decode time against the time to read the selected experts' weights at the
/// read bandwidth measured in the same run.
fn half_layer(quick: bool, threads: usize) {
    // OLMoE's expert shape (d 2048, gated experts of 1024) with 16 experts: 0.4 GB in f32, far
    // larger than the caches, so decode reads its experts from memory.
    let (e, d, h) = (16usize, 2048usize, 1024usize);
    let act = Activation::Silu;
    let n = e * h * d;
    let up: Vec<f32> = (0..n).map(|i| weight(i, 0.03)).collect();
    let gate: Vec<f32> = (0..n).map(|i| weight(i + n, 0.03)).collect();
    let down: Vec<f32> = (0..n).map(|i| weight(i + 2 * n, 0.03)).collect();
    let to_bf16 =
        |v: &[f32]| -> Vec<half::bf16> { v.iter().map(|&x| half::bf16::from_f32(x)).collect() };
    let to_f16 =
        |v: &[f32]| -> Vec<half::f16> { v.iter().map(|&x| half::f16::from_f32(x)).collect() };
    let layers = [
        (
            "f32",
            PackedExperts::new(e, d, h, act, &up, Some(gate.as_slice()), &down, None, None),
        ),
        (
            "bf16",
            PackedExperts::new(
                e,
                d,
                h,
                act,
                &to_bf16(&up),
                Some(to_bf16(&gate).as_slice()),
                &to_bf16(&down),
                None,
                None,
            ),
        ),
        (
            "f16",
            PackedExperts::new(
                e,
                d,
                h,
                act,
                &to_f16(&up),
                Some(to_f16(&gate).as_slice()),
                &to_f16(&down),
                None,
                None,
            ),
        ),
    ];
    drop((up, gate, down));
    let variant = KernelVariant::Auto.resolve();
    let bw = read_bandwidth(1 << 30, threads, if quick { 2 } else { 5 });
    println!(
        "\n## Expert layer by weight precision: d {d}, {e} gated experts of {h}, {variant:?} kernel, {threads} threads\n"
    );
    println!(
        "Read bandwidth (1 GiB buffer, {threads} threads, best of {}): {:.1} GB/s\n",
        if quick { 2 } else { 5 },
        bw / 1e9
    );
    println!(
        "| weights | layer bytes | T | experts/token | time (ms) | useful GFLOP/s | vs f32 | bytes read / bandwidth (ms) | time / that bound |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut scratch = MoeScratch::default();
    let prefill_t = 256;
    let k_prefill = 4; // 25% active
    let x: Vec<f32> = (0..prefill_t * d).map(|i| weight(i + 7, 1.0)).collect();
    let prefill = groups_for(prefill_t, e, k_prefill, |t| (t * 5) % e);
    let mut f32_gflops = 0.0;
    for (name, layer) in &layers {
        let mut out = vec![0.0f32; prefill_t * d];
        let reps = if quick { 3 } else { 10 };
        let mut best = f64::INFINITY;
        for r in 0..=reps {
            let t0 = Instant::now();
            moe_forward(
                layer,
                &x,
                &prefill,
                &mut out,
                &mut scratch,
                variant,
                threads,
            );
            if r > 0 {
                best = best.min(t0.elapsed().as_secs_f64());
            }
        }
        let gflops = (prefill.pairs() * layer.flops_per_pair()) as f64 / best / 1e9;
        if *name == "f32" {
            f32_gflops = gflops;
        }
        println!(
            "| {name} | {:.0} MB | {prefill_t} | {k_prefill} | {:.2} | {gflops:.0} | {:.2}x | | |",
            layer.bytes() as f64 / 1e6,
            best * 1e3,
            gflops / f32_gflops
        );
    }
    // Decode: one token choosing 2 experts; each step picks the next pair of experts so that
    // every step reads weights that the caches do not hold (the layer is 8-16 x the L3 here).
    let k_decode = 2;
    let xd: Vec<f32> = (0..d).map(|i| weight(i + 3, 1.0)).collect();
    let steps = if quick { 16 } else { 64 };
    let decode: Vec<ExpertGroups> = (0..steps)
        .map(|s| groups_for(1, e, k_decode, |_| (s * k_decode) % e))
        .collect();
    for (name, layer) in &layers {
        let mut out = vec![0.0f32; d];
        // Warm-up step (scratch, pool), then the timed steps.
        moe_forward(
            layer,
            &xd,
            &decode[0],
            &mut out,
            &mut scratch,
            variant,
            threads,
        );
        let t0 = Instant::now();
        for g in &decode {
            moe_forward(layer, &xd, g, &mut out, &mut scratch, variant, threads);
        }
        let per = t0.elapsed().as_secs_f64() / steps as f64;
        let bound = (k_decode * layer.expert_bytes()) as f64 / bw;
        println!(
            "| {name} | {:.0} MB | 1 | {k_decode} | {:.3} | {:.1} | | {:.3} | {:.2} |",
            layer.bytes() as f64 / 1e6,
            per * 1e3,
            (k_decode * layer.flops_per_pair()) as f64 / per / 1e9,
            bound * 1e3,
            per / bound
        );
    }
}
