//! Whole-model benchmarks (issue 7, items 2 and 5): tokens/s of the embedded model under each
//! policy for the eval and generate workloads, and the time to load a generated 1 GiB model.
//! Run by `xmoe-top bench` (also on a GPU, with `--device cuda`) and `cargo bench --bench model`.
//! Prints markdown tables; results are recorded in docs/benchmarks.md.

use std::time::Instant;

use crate::model::config::ModelConfig;
use crate::model::format::{ModelFile, StoreDtype, write_model};
use crate::model::synth::random_weights;
use crate::model::trace::ForwardTrace;
use crate::model::{LoadOptions, Model, RoutingConfig};
use crate::profiling::flops::FlopModel;
use crate::routing::RoutingPolicy;
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
                "| open to ready (f32 weights, experts packed) | {:.3} s |",
                ready
            );
        }
    }
    Ok(())
}
