//! `xmoe-top bench`: whole-model throughput per policy and model load time, on any device; with
//! `--model`, eval tokens/s and decode ms/token of one checkpoint per policy, timed as
//! `scripts/peers/transformers_cpu.py` times Hugging Face transformers (issue 15, section 3).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use super::exit::Classify;
use anyhow::{Context, Result};
use clap::Args;

use crate::model::trace::ForwardTrace;
use crate::model::{DeviceChoice, LoadOptions, RoutingConfig};

/// Arguments of `bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Fewer passes and a 0.24 GiB model instead of 1 GiB (a minute instead of several).
    #[arg(long)]
    quick: bool,
    /// Where the model runs: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Time this model (a Hugging Face checkpoint directory or a model file) instead of the
    /// built-in benchmarks: eval tokens/s and decode ms/token under each of `--policies`.
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// With --model: the text whose tokens are evaluated and prompted with (default: the
    /// embedded held-out KJV text, assets/kjv-heldout.txt).
    #[arg(long, value_name = "FILE", requires = "model")]
    text: Option<PathBuf>,
    /// With --model: comma-separated policies: native, t=T, top-K or dense.
    #[arg(long, default_value = "native,t=0.9,t=0.8")]
    policies: String,
    /// With --model: sequences per eval pass.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=1024))]
    batch: u64,
    /// With --model: tokens per sequence in an eval pass.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=65536))]
    seq_len: u64,
    /// With --model: timed eval passes (after one warm-up pass), each on the next window of text.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=1000))]
    passes: u64,
    /// With --model: prompt length, in tokens, before decoding.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=65536))]
    prompt_tokens: u64,
    /// With --model: greedy decode steps timed (after one warm-up run of the same length).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=65536))]
    new_tokens: u64,
    /// With --model: also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// With --model: where the CPU kernel keeps the experts (auto, packed or in-place; see
    /// `xmoe-top run --help`).
    #[arg(long, default_value = "auto", value_name = "auto|packed|in-place")]
    expert_weights: crate::model::ExpertStorage,
    /// With --model: how MoE layers compute on the CPU (auto, kernel, portable, avx2, avx512,
    /// avx512bf16, amx, gemm or candle; see `xmoe-top run --help`).
    #[arg(long, default_value = "auto")]
    moe_dispatch: crate::model::MoeDispatch,
    /// With --model: load it even when its weights exceed the available memory.
    #[arg(long)]
    allow_large: bool,
}

/// Runs the benchmarks and prints markdown tables.
pub fn run(a: BenchArgs, threads: usize) -> Result<ExitCode> {
    if let Some(path) = a.model.clone() {
        return model_bench(&a, &path, threads);
    }
    let device = a.device.resolve(threads).usage()?;
    if let Some(note) = &device.note {
        eprintln!("xmoe-top: {note}");
    }
    crate::bench::run(a.quick, &device.device, threads)?;
    Ok(ExitCode::SUCCESS)
}

/// Wall and process CPU time (all threads) since `start`.
struct Clock {
    wall: Instant,
    cpu_ticks: Option<u64>,
}

impl Clock {
    fn start() -> Self {
        Clock {
            cpu_ticks: cpu_ticks(),
            wall: Instant::now(),
        }
    }
    /// (wall s, CPU s); CPU is NaN where `/proc/self/stat` cannot be read.
    fn read(&self) -> (f64, f64) {
        let wall = self.wall.elapsed().as_secs_f64();
        let cpu = match (self.cpu_ticks, cpu_ticks()) {
            (Some(a), Some(b)) => (b - a) as f64 / 100.0, // USER_HZ
            _ => f64::NAN,
        };
        (wall, cpu)
    }
}

fn cpu_ticks() -> Option<u64> {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| crate::gpu::parse_stat_cpu_ticks(&s))
}

/// Where a pass's time went, summed over passes, in seconds.
#[derive(Default)]
struct Parts {
    attention: f64,
    router: f64,
    ffn: f64,
    head: f64,
    total: f64,
}

impl Parts {
    fn add(&mut self, t: &ForwardTrace) {
        for b in &t.blocks {
            self.attention += b.attention_ns as f64 * 1e-9;
            self.router += b.router_ns as f64 * 1e-9;
            self.ffn += b.ffn_ns as f64 * 1e-9;
        }
        self.head += t.head_ns as f64 * 1e-9;
        self.total += t.total_ns as f64 * 1e-9;
    }
    /// Per-unit milliseconds, as JSON.
    fn json(&self, per: f64) -> serde_json::Value {
        let ms = |s: f64| s / per * 1e3;
        serde_json::json!({
            "attention_ms": ms(self.attention),
            "router_ms": ms(self.router),
            "experts_or_ffn_ms": ms(self.ffn),
            "embedding_and_head_ms": ms(self.head),
            "total_ms": ms(self.total),
        })
    }
}

/// `bench --model`: the protocol of `scripts/peers/transformers_cpu.py`, per policy. Eval: one
/// warm-up pass, then `passes` passes of `batch x seq_len` tokens (all logits, no cache), pass p
/// on tokens `[p * b * s, (p + 1) * b * s)` of the text. Decode: `prompt_tokens` of the text, then
/// `new_tokens` greedy steps of one token with the KV cache, after one warm-up run.
fn model_bench(a: &BenchArgs, path: &std::path::Path, threads: usize) -> Result<ExitCode> {
    let before = crate::bench::load_average().unwrap_or_default();
    let t0 = Instant::now();
    let (model, device) = super::load_model(
        Some(path),
        &a.device,
        threads,
        a.allow_large,
        LoadOptions {
            experts: a.expert_weights,
            dispatch: a.moe_dispatch,
            ..LoadOptions::default()
        },
    )?;
    let load_s = t0.elapsed().as_secs_f64();
    let cfg = model.config().clone();
    let tokenizer = super::model_tokenizer(&model)?;
    let text = super::eval_text(a.text.as_deref(), false, &tokenizer, "bench")?;
    let ids = tokenizer
        .encode(&text.bytes)
        .with_context(|| format!("cannot tokenize {}", text.name))
        .bad_input()?
        .ids;
    let (b, s, passes) = (a.batch as usize, a.seq_len as usize, a.passes as usize);
    let (prompt, steps) = (a.prompt_tokens as usize, a.new_tokens as usize);
    let need = ((passes + 1) * b * s).max(prompt);
    if ids.len() < need {
        return Err(super::exit::usage(format!(
            "{}: {} tokens, but --passes {passes} (+1 warm-up) x --batch {b} x --seq-len {s} needs {need}",
            text.name,
            ids.len()
        )));
    }
    if s > cfg.max_seq_len || prompt + steps + 1 > cfg.max_seq_len {
        return Err(super::exit::usage(format!(
            "--seq-len {s} and --prompt-tokens {prompt} + --new-tokens {steps} must fit the model's context of {}",
            cfg.max_seq_len
        )));
    }
    // Every policy is checked before anything is timed: a typo in the last one should not cost
    // the minutes the first ones take on a large model.
    let mut plans = Vec::new();
    for spec in a.policies.split(',').map(str::trim) {
        let policies = super::policy_args::parse_policy_spec(spec, &cfg, None).map_err(|e| {
            super::exit::usage(format!(
                "--policies: `{spec}`: {e:#} (expected native, t=T, top-K or dense)"
            ))
        })?;
        plans.push((
            spec,
            RoutingConfig::new(&policies, cfg.capacity_factor, cfg.n_experts).usage()?,
        ));
    }
    let n_moe = model.moe_layers().len();
    let mut rows = Vec::new();
    println!(
        "model {} ({}), {device}, {threads} threads; {} tokens of {}; load {load_s:.2} s; load average {before}",
        cfg.name,
        path.display(),
        ids.len(),
        text.name
    );
    println!("decode path: {}", model.decode_path());
    let bound = crate::bench::DecodeBound::measure(&model, threads, false);
    println!("{}\n", bound.describe());
    println!(
        "| policy | experts/token (eval) | eval tokens/s | eval GFLOP/s (share of {threads} x matmul rate) | eval CPU s/pass | decode ms/token (p50) | decode CPU ms/token | bound ms/token | decode / bound | eval pass: attention / router / experts / head ms | decode step: attention / router / experts / head ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (spec, routing) in &plans {
        let mut trace = ForwardTrace::default();
        let (mut wall, mut cpu, mut pairs) = (0.0, 0.0, 0usize);
        let mut eval_parts = Parts::default();
        for p in 0..=passes {
            let toks = &ids[p * b * s..(p + 1) * b * s];
            let clock = Clock::start();
            model.forward(toks, b, routing, None, &mut trace)?;
            let (w, c) = clock.read();
            if p > 0 {
                // Pass 0 warms caches and allocations.
                wall += w;
                cpu += c;
                pairs += trace.moe.iter().map(|m| m.groups.pairs()).sum::<usize>();
                eval_parts.add(&trace);
            }
        }
        let eval_tokens = passes * b * s;
        let experts = pairs as f64 / (eval_tokens * n_moe.max(1)) as f64;
        // Useful FLOPs of the timed passes (each sequence's token i attends to i + 1 keys) at
        // the threads' combined matmul rate: how near the arithmetic limit an eval pass runs.
        let fm = bound.flops();
        let eval_flops = (passes * b) as f64 * (1..=s).map(|c| fm.non_moe(c) as f64).sum::<f64>()
            + (eval_tokens * fm.moe_layers().len()) as f64 * fm.router() as f64
            + pairs as f64 * fm.expert() as f64;
        let eval_gflops = eval_flops / wall / 1e9;
        let peak_share = eval_flops / wall / (threads as f64 * bound.matmul_rate());
        // Decoded as a user's session decodes (`Model::decode`: the lean path where the model
        // has one), each step held against its bound (`DecodeBound`: the bytes it reads at the
        // measured bandwidth for weights beyond the last-level cache).
        let decode = |parts: &mut Parts| -> Result<(Vec<f64>, f64, Vec<u32>, f64)> {
            let mut cache = model.new_cache(1);
            let mut tr = ForwardTrace::default();
            let logits = model.forward(&ids[..prompt], 1, routing, Some(&mut cache), &mut tr)?;
            let mut next = crate::bench::argmax(&logits[logits.len() - cfg.vocab_size..]);
            let mut out = vec![next];
            let mut times = Vec::with_capacity(steps);
            let mut bound_s = 0.0;
            let clock = Clock::start();
            for _ in 0..steps {
                let t = Instant::now();
                next = crate::bench::argmax(model.decode(next, routing, &mut cache, &mut tr)?);
                times.push(t.elapsed().as_secs_f64());
                let pairs = tr.moe.iter().map(|m| m.groups.pairs()).sum::<usize>();
                bound_s += bound.seconds(tr.start_pos + 1, pairs);
                parts.add(&tr);
                out.push(next);
            }
            Ok((times, clock.read().1, out, bound_s))
        };
        decode(&mut Parts::default())?; // warm-up
        let mut dec_parts = Parts::default();
        let (times, dec_cpu, generated, bound_s) = decode(&mut dec_parts)?;
        let mean = times.iter().sum::<f64>() / steps as f64;
        let bound_ms = bound_s / steps as f64 * 1e3;
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        let p50 = sorted[steps / 2];
        let fmt_parts = |p: &Parts, per: f64| {
            format!(
                "{:.1} / {:.1} / {:.1} / {:.1}",
                p.attention / per * 1e3,
                p.router / per * 1e3,
                p.ffn / per * 1e3,
                p.head / per * 1e3
            )
        };
        println!(
            "| {spec} | {experts:.2} | {:.1} | {eval_gflops:.1} ({:.0}%) | {:.2} | {:.3} ({:.3}) | {:.3} | {bound_ms:.3} | {:.2} | {} | {} |",
            eval_tokens as f64 / wall,
            peak_share * 100.0,
            cpu / passes as f64,
            mean * 1e3,
            p50 * 1e3,
            dec_cpu / steps as f64 * 1e3,
            mean * 1e3 / bound_ms,
            fmt_parts(&eval_parts, passes as f64),
            fmt_parts(&dec_parts, steps as f64),
        );
        rows.push(serde_json::json!({
            "policy": spec,
            "experts_per_token_eval": experts,
            "eval_tokens": eval_tokens,
            "eval_tokens_per_s": eval_tokens as f64 / wall,
            "eval_gflops": eval_gflops,
            "eval_share_of_matmul_rate": peak_share,
            "eval_wall_s": wall,
            "eval_cpu_s": cpu,
            "eval_pass": eval_parts.json(passes as f64),
            "decode_steps": steps,
            "decode_ms_per_token": mean * 1e3,
            "decode_ms_p50": p50 * 1e3,
            "decode_cpu_ms_per_token": dec_cpu / steps as f64 * 1e3,
            "decode_bound_ms_per_token": bound_ms,
            "decode_step": dec_parts.json(steps as f64),
            "decode_tokens": generated,
        }));
    }
    let after = crate::bench::load_average().unwrap_or_default();
    println!("\nload average after: {after}");
    if let Some(out) = &a.json {
        let doc = serde_json::json!({
            "model": path.display().to_string(),
            "name": cfg.name,
            "device": device,
            "threads": threads,
            "xmoe_top_version": env!("CARGO_PKG_VERSION"),
            "load_s": load_s,
            "text": text.name,
            "text_tokens": ids.len(),
            "setup": {"batch": b, "seq": s, "passes": passes, "prompt_tokens": prompt, "new_tokens": steps},
            "decode_path": model.decode_path().to_string(),
            "decode_bound": bound.describe(),
            "load_average_before": before,
            "load_average_after": after,
            "results": rows,
        });
        std::fs::write(out, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
