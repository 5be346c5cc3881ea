//! Where a decode step of the embedded model spends its time: attention (norm, projections,
//! scores), router, experts and LM head, per token, from the timings every step records in its
//! `ForwardTrace`. `xmoe-top bench` gives the totals; this splits them.
//!
//! `cargo run --release --example decode_profile [-- POLICY...]` with policies `t=0.9` (default),
//! `top-K` or `dense`. Each policy decodes 32 tokens after a 14-byte prompt (as `bench --quick`
//! does), 300 times over, on the calling thread. Results are in docs/benchmarks.md.

use std::time::Instant;

use candle_core::Device;
use xmoe_top::model::trace::ForwardTrace;
use xmoe_top::model::{LoadOptions, Model, RoutingConfig};
use xmoe_top::routing::RoutingPolicy;

const REPEATS: usize = 300;
const STEPS: usize = 32;

fn policy(spec: &str) -> anyhow::Result<RoutingPolicy> {
    if spec == "dense" {
        return Ok(RoutingPolicy::Dense);
    }
    if let Some(t) = spec.strip_prefix("t=") {
        return Ok(RoutingPolicy::threshold(t.parse()?));
    }
    if let Some(k) = spec.strip_prefix("top-") {
        return Ok(RoutingPolicy::TopK {
            k: k.parse()?,
            renormalize: false,
        });
    }
    anyhow::bail!("policy `{spec}`: expected t=T, top-K or dense")
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

fn main() -> anyhow::Result<()> {
    // As the `xmoe-top` binary does: without it candle re-reads /proc/cpuinfo at every matmul
    // (6300 reads in one run of this example, 10% of its samples).
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: no other thread has been started yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    let file = xmoe_top::embedded::model_file()?;
    let model = Model::from_file(&file, &Device::Cpu, LoadOptions::default())?;
    println!("decode path: {}", model.decode_path());
    println!(
        "| policy | attention us | router us | experts us | embedding + head us | step us | tokens/s |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut specs: Vec<String> = std::env::args().skip(1).collect();
    if specs.is_empty() {
        specs.push("t=0.9".into());
    }
    let prompt: Vec<u32> = b"In the beginni".iter().map(|&b| u32::from(b)).collect();
    let vocab = model.config().vocab_size;
    for spec in &specs {
        let routing = RoutingConfig::uniform(
            policy(spec)?,
            model.moe_layers().len(),
            model.config().n_experts,
        )?;
        let mut sums = [0u64; 5];
        let mut n = 0u64;
        let mut decode_s = 0.0;
        for _ in 0..REPEATS {
            let mut trace = ForwardTrace::default();
            let mut cache = model.new_cache(1);
            let logits = model.forward(&prompt, 1, &routing, Some(&mut cache), &mut trace)?;
            let mut next = argmax(&logits[logits.len() - vocab..]);
            // One warm-up step: the lean path copies the prefill's keys here.
            next = argmax(model.decode(next, &routing, &mut cache, &mut trace)?);
            let d0 = Instant::now();
            for _ in 0..STEPS {
                next = argmax(model.decode(next, &routing, &mut cache, &mut trace)?);
                for b in &trace.blocks {
                    sums[0] += b.attention_ns;
                    sums[1] += b.router_ns;
                    sums[2] += b.ffn_ns;
                }
                sums[3] += trace.head_ns;
                sums[4] += trace.total_ns;
                n += 1;
            }
            decode_s += d0.elapsed().as_secs_f64();
        }
        let us = |i: usize| sums[i] as f64 / n as f64 / 1e3;
        println!(
            "| {spec} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} |",
            us(0),
            us(1),
            us(2),
            us(3),
            us(4),
            n as f64 / decode_s
        );
    }
    Ok(())
}
