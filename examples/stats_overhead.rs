//! Measures what collecting statistics costs: tokens/s of a full `Session` (statistics,
//! snapshots at 10/s, cross-entropy, device sampler) against a bare loop of `Model::forward` over
//! the same batches, and the direct cost of `RunStats::record_pass` and of building a snapshot.
//!
//! `cargo run --release --example stats_overhead [-- MODEL.safetensors]`; without a model it
//! writes a random one (d 256, 4 MoE layers of 64 experts x 32) to a temporary directory.
//! Results are recorded in docs/stats-overhead.md.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::Device;
use xmoe_top::model::config::ModelConfig;
use xmoe_top::model::format::{StoreDtype, write_model};
use xmoe_top::model::synth::random_weights;
use xmoe_top::model::trace::ForwardTrace;
use xmoe_top::model::{Model, RoutingConfig};
use xmoe_top::profiling::snapshot::DeviceSnapshot;
use xmoe_top::profiling::stats::{PassKind, RunStats, SnapshotInputs};
use xmoe_top::routing::RoutingPolicy;
use xmoe_top::session::describe::model_info;
use xmoe_top::session::{Session, SessionConfig, policy_state};
use xmoe_top::workload::{EvalSpec, TextSource, Workload};

const BATCH: usize = 4;
const SEQ: usize = 128;
const PASSES: usize = 40;
const ROUNDS: usize = 5;

fn config() -> ModelConfig {
    ModelConfig {
        name: "random-d256-l4-e64x32".into(),
        ..ModelConfig::byte_level(256, 4, 4, 256, 64, 32, 1024)
    }
}

/// CPU time of the whole process so far, seconds (utime + stime at USER_HZ = 100).
fn cpu_s() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| xmoe_top::gpu::parse_stat_cpu_ticks(&s))
        .map_or(f64::NAN, |t| t as f64 / 100.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: no other thread exists yet (candle's CPU matmul needs this set, see main.rs).
    unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    let dir = tempfile::tempdir()?;
    let path = match std::env::args().nth(1) {
        Some(p) => PathBuf::from(p),
        None => {
            let cfg = config();
            let p = dir.path().join("m.safetensors");
            write_model(
                &p,
                &cfg,
                &random_weights(&cfg, 1, false, 2.0),
                StoreDtype::F32,
                true,
            )?;
            p
        }
    };
    let mut text = Vec::new();
    for f in ["README.md", "docs/model-format.md", "src/routing/mod.rs"] {
        if let Ok(b) = std::fs::read(f) {
            text.extend(b);
        }
    }
    anyhow::ensure!(text.len() > SEQ + 1, "run from the repository root");
    let mut model = Model::load(&path, &Device::Cpu)?;
    let routing = RoutingConfig::uniform(
        RoutingPolicy::threshold(0.9),
        model.moe_layers().len(),
        model.config().n_experts,
    )
    .expect("threshold 0.9 is valid");
    let make_workload = |m: &Model| {
        Workload::eval(
            EvalSpec {
                text: TextSource {
                    name: "repository text".into(),
                    bytes: text.clone(),
                },
                batch: BATCH,
                seq_len: SEQ,
            },
            m.config(),
        )
    };
    let tokens = (PASSES * BATCH * SEQ) as u64;
    println!(
        "model {} ({} threads), {PASSES} passes of {BATCH} x {SEQ} tokens per run, {ROUNDS} rounds",
        model.config().name,
        threads
    );

    // Warm up.
    let mut trace = ForwardTrace::default();
    let mut w = make_workload(&model)?;
    for _ in 0..3 {
        w.run_pass(&model, &routing, &mut trace)?;
    }

    let (mut bare, mut full) = (Vec::new(), Vec::new());
    let (mut bare_cpu, mut full_cpu) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // Bare: the same batches through Model::forward, nothing else.
        let mut cursor = 0;
        let c0 = cpu_s();
        let t = Instant::now();
        for _ in 0..PASSES {
            let mut batch = Vec::with_capacity(BATCH * SEQ);
            for _ in 0..BATCH {
                if cursor + SEQ + 1 > text.len() {
                    cursor = 0;
                }
                batch.extend(text[cursor..cursor + SEQ].iter().map(|&b| b as u32));
                cursor += SEQ;
            }
            model.forward(&batch, BATCH, &routing, None, &mut trace)?;
        }
        let b = tokens as f64 / t.elapsed().as_secs_f64();
        let bc = 1e6 * (cpu_s() - c0) / tokens as f64;

        // Full session: statistics, snapshots, cross-entropy, device sampler; no reference passes.
        let mut c = SessionConfig::new(&model, "CPU");
        c.routing = routing.clone();
        c.reference_every = 0;
        c.token_budget = Some(tokens);
        let w = make_workload(&model)?;
        let c0 = cpu_s();
        let t = Instant::now();
        let out = Session::start(model, w, c)?.join()?;
        let f = tokens as f64 / t.elapsed().as_secs_f64();
        let fc = 1e6 * (cpu_s() - c0) / tokens as f64;
        model = out.model;
        println!(
            "round {round}: bare {b:.0} tokens/s ({bc:.1} us CPU/token), session {f:.0} tokens/s ({fc:.1} us CPU/token)"
        );
        bare.push(b);
        full.push(f);
        bare_cpu.push(bc);
        full_cpu.push(fc);
    }
    let (mb, mf) = (median(bare), median(full));
    let (mbc, mfc) = (median(bare_cpu), median(full_cpu));
    println!(
        "median wall: bare {mb:.0} tokens/s, session {mf:.0} tokens/s, overhead {:.2}%",
        100.0 * (1.0 - mf / mb)
    );
    println!(
        "median CPU time: bare {mbc:.1} us/token, session {mfc:.1} us/token, overhead {:.2}%",
        100.0 * (mfc / mbc - 1.0)
    );

    // Direct costs, free of scheduling noise.
    let cfg = model.config().clone();
    let mut stats = RunStats::new(
        &cfg,
        cfg.top_k_baseline(),
        4096,
        policy_state(model.moe_layers(), &routing, RoutingPolicy::Dense),
        0.0,
    );
    let n = 200;
    let t = Instant::now();
    for _ in 0..n {
        stats.record_pass(&trace, PassKind::Eval, trace.total_ns);
    }
    let record_ns = t.elapsed().as_nanos() as f64 / n as f64;
    let inputs = SnapshotInputs {
        sequence: 0,
        session_elapsed_s: 0.0,
        model: model_info(&cfg, "CPU", cfg.top_k_baseline()),
        workload: make_workload(&model)?.info().clone(),
        paused: false,
        ended: None,
        device: DeviceSnapshot::not_sampled(),
        generated: None,
    };
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(stats.snapshot(inputs.clone()));
    }
    let snapshot_ns = t.elapsed().as_nanos() as f64 / n as f64;
    let forward_ns = trace.total_ns as f64;
    let logits = model.forward(&vec![65u32; BATCH * SEQ], BATCH, &routing, None, &mut trace)?;
    let targets = vec![66u32; BATCH * SEQ];
    let t = Instant::now();
    for _ in 0..20 {
        std::hint::black_box(xmoe_top::profiling::stats::cross_entropy_nats(
            &logits,
            cfg.vocab_size,
            &targets,
        ));
    }
    let ce_ns = t.elapsed().as_nanos() as f64 / 20.0;
    println!(
        "cross-entropy (quality): {:.1} us per pass ({:.2}% of the forward pass)",
        ce_ns / 1e3,
        100.0 * ce_ns / forward_ns
    );
    let per_second = Duration::from_secs(1).as_nanos() as f64;
    println!(
        "record_pass: {:.1} us per pass of {} tokens ({:.2}% of the {:.1} ms forward pass)",
        record_ns / 1e3,
        BATCH * SEQ,
        100.0 * record_ns / forward_ns,
        forward_ns / 1e6
    );
    println!(
        "snapshot: {:.1} us to build; at 10 per second {:.3}% of one core",
        snapshot_ns / 1e3,
        100.0 * 10.0 * snapshot_ns / per_second
    );
    Ok(())
}
