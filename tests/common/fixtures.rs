//! Deterministic example snapshots for render tests, docs and report tests.
//!
//! Test-only: compiled into the integration tests (through `tests/common`), the library's unit
//! tests (`profiling::fixtures`, under `cfg(test)`) and the `example_report` example, never into
//! the binary. Paths go through `xmoe_top::` so the one file builds in all three.
//!
//! The data is synthetic (router logits from a seeded generator, made-up timings and device
//! counters) but it goes through the real [`RunStats`] pipeline, so every figure in the snapshot is
//! consistent with every other: shares match the distributions, FLOPs match the selections,
//! percentiles match the histograms. Never shown to users as measurements.

use xmoe_top::model::config::{ModelConfig, MoeLayers};
use xmoe_top::model::trace::ForwardTrace;
use xmoe_top::profiling::snapshot::{
    DeviceBackend, DeviceHistoryPoint, DeviceSnapshot, GeneratedText, GeneratedToken, GpuCounters,
    LayerPolicy, ModelInfo, PolicyState, ProcessCounters, Snapshot, TokenOrigin, WorkloadInfo,
    WorkloadKind,
};
use xmoe_top::profiling::stats::{
    BatchQuality, PassKind, ReferenceComparison, RunStats, SnapshotInputs, cross_entropy_nats,
    experts_per_layer, kl_nats,
};
use xmoe_top::routing::RoutingPolicy;
use xmoe_top::routing::route;
use xmoe_top::session::describe::model_info as describe_model;

/// A small configuration: 6 blocks, MoE in blocks 1, 3, 5, `n_experts` experts of width
/// `256 / 4` (so the top-k baseline is k = 4), byte vocabulary.
pub fn example_config(n_experts: usize) -> ModelConfig {
    ModelConfig {
        name: "example-xmoe".into(),
        moe_layers: MoeLayers::Every {
            every: 2,
            offset: 1,
        },
        top_k_baseline: Some(4),
        ..ModelConfig::byte_level(64, 6, 4, 128, n_experts, 64, 256)
    }
}

struct Lcg(u64);

impl Lcg {
    fn next_f32(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32) / (1u64 << 24) as f32
    }
}

fn policy_state(cfg: &ModelConfig, t: f32) -> PolicyState {
    PolicyState {
        layers: cfg
            .moe_layer_indices()
            .into_iter()
            .map(|layer| LayerPolicy {
                layer,
                policy: RoutingPolicy::threshold(t),
            })
            .collect(),
        capacity_factor: None,
        reference: RoutingPolicy::Dense,
    }
}

/// Fills `trace` with one synthetic pass of `batch x seq` tokens routed under threshold `t`.
fn synthetic_pass(
    cfg: &ModelConfig,
    rng: &mut Lcg,
    batch: usize,
    seq: usize,
    start: usize,
    t: f32,
    trace: &mut ForwardTrace,
) {
    let e = cfg.n_experts;
    trace.begin(batch, seq, start, cfg.n_layers);
    let tokens = batch * seq;
    for (slot, layer) in cfg.moe_layer_indices().into_iter().enumerate() {
        let mut logits = Vec::with_capacity(tokens * e);
        for _ in 0..tokens {
            // Some tokens are "easy" (a sharp router), some "hard" (a flat one).
            let sharpness = 1.0 + 6.0 * rng.next_f32();
            for x in 0..e {
                // Expert popularity falls with its id, differently per layer.
                let bias = -(((x + slot * 3) % e) as f32) * 0.08;
                logits.push(bias + sharpness * rng.next_f32());
            }
        }
        let m = trace.moe_slot(slot, layer);
        let policy = RoutingPolicy::threshold(t)
            .check(e)
            .expect("thresholds of the fixtures are in (0, 1]");
        route(&logits, policy, None, &mut m.routing).expect("synthetic logits are finite");
    }
    let mut total = 0;
    for (b, bt) in trace.blocks.iter_mut().enumerate() {
        let jitter = (rng.next_f32() * 40.0) as u64;
        bt.attention_ns = (120 + jitter) * tokens as u64;
        bt.router_ns = if b % 2 == 1 { 15 * tokens as u64 } else { 0 };
        bt.ffn_ns = (200 + 2 * jitter) * tokens as u64;
        total += bt.attention_ns + bt.router_ns + bt.ffn_ns;
    }
    trace.head_ns = 60 * tokens as u64;
    trace.total_ns = total + trace.head_ns;
}

fn model_info(cfg: &ModelConfig, device: &str) -> ModelInfo {
    ModelInfo {
        // A round synthetic figure that the render tests look for; fixtures are never real runs.
        parameters: 1_234_567,
        ..describe_model(cfg, device, cfg.top_k_baseline())
    }
}

fn device(with_gpu: bool) -> DeviceSnapshot {
    let history: Vec<DeviceHistoryPoint> = (0..30)
        .map(|i| DeviceHistoryPoint {
            t_s: i as f64,
            gpu_utilization_pct: if with_gpu {
                vec![Some(40 + (i * 7 % 50) as u32)]
            } else {
                Vec::new()
            },
            gpu_memory_used_bytes: if with_gpu {
                vec![Some((2_000 + i * 10) << 20)]
            } else {
                Vec::new()
            },
            process_cpu_pct: Some(95.0 + (i % 5) as f64),
            process_rss_bytes: Some((300 + i) << 20),
        })
        .collect();
    DeviceSnapshot {
        backend: if with_gpu {
            DeviceBackend::Nvml
        } else {
            DeviceBackend::ProcessOnly
        },
        note: (!with_gpu)
            .then(|| "no NVIDIA driver found: showing this process's CPU and memory".to_string()),
        driver_version: with_gpu.then(|| "550.54.15".to_string()),
        gpus: if with_gpu {
            vec![GpuCounters {
                index: 0,
                name: "NVIDIA Example GPU".into(),
                utilization_pct: Some(61),
                memory_used_bytes: Some(2_290 << 20),
                memory_total_bytes: Some(81_920 << 20),
                power_watts: Some(212.5),
                temperature_c: Some(54),
                sm_clock_mhz: Some(1_755),
            }]
        } else {
            Vec::new()
        },
        process: ProcessCounters {
            cpu_pct: Some(98.0),
            rss_bytes: Some(329 << 20),
            rss_file_bytes: Some(3 << 20),
            cpus: 8,
        },
        sample_period_s: 1.0,
        history,
    }
}

/// An example snapshot of a session in its second epoch (threshold lowered from 0.9 to 0.7 on
/// every layer, so `previous_epoch` is present), for a model with `n_experts` experts per MoE layer.
/// `kind` chooses the workload (generate adds a generated-text stream); `with_gpu` chooses NVML
/// counters or the process-only fallback.
pub fn example_snapshot(kind: WorkloadKind, n_experts: usize, with_gpu: bool) -> Snapshot {
    let cfg = example_config(n_experts);
    let mut rng = Lcg(7);
    let mut stats = RunStats::new(
        &cfg,
        cfg.top_k_baseline(),
        2048,
        policy_state(&cfg, 0.9),
        0.0,
    );
    let mut trace = ForwardTrace::default();
    let (batch, seq) = match kind {
        WorkloadKind::Eval => (4, 64),
        WorkloadKind::Generate => (1, 1),
    };
    let mut generated = GeneratedText::default();
    let prompt = b"The experts of a small model ";
    for (epoch, t) in [(0, 0.9f32), (1, 0.7)] {
        if epoch == 1 {
            stats.begin_epoch(
                "threshold of all layers set to 0.70",
                policy_state(&cfg, t),
                5.0,
            );
        }
        match kind {
            WorkloadKind::Eval => {
                for pass in 0..12 {
                    synthetic_pass(&cfg, &mut rng, batch, seq, 0, t, &mut trace);
                    stats.record_pass(&trace, PassKind::Eval, trace.total_ns + 20_000);
                    let v = cfg.vocab_size;
                    let rows = batch * seq;
                    let cur: Vec<f32> = (0..rows * v).map(|_| 4.0 * rng.next_f32()).collect();
                    let targets: Vec<u32> = (0..rows).map(|i| ((i * 31) % v) as u32).collect();
                    let q = BatchQuality {
                        scored_tokens: rows as u64,
                        bytes: rows as u64,
                        nats: cross_entropy_nats(&cur, v, &targets),
                    };
                    stats.record_quality(&q);
                    if pass % 4 == 0 {
                        let reference: Vec<f32> =
                            cur.iter().map(|&z| z + 0.3 * rng.next_f32()).collect();
                        stats.record_reference(&ReferenceComparison {
                            current: q,
                            reference: BatchQuality {
                                nats: cross_entropy_nats(&reference, v, &targets),
                                ..q
                            },
                            kl_nats: kl_nats(&reference, &cur, v),
                            kl_tokens: rows as u64,
                            reference_ns: trace.total_ns * 2,
                        });
                    }
                }
            }
            WorkloadKind::Generate => {
                for sequence in 0..2u64 {
                    let sequence = sequence + 2 * epoch;
                    synthetic_pass(&cfg, &mut rng, 1, prompt.len(), 0, t, &mut trace);
                    stats.record_pass(&trace, PassKind::Prefill, trace.total_ns + 5_000);
                    for (i, &b) in prompt.iter().enumerate() {
                        push_token(&mut generated, &trace, i, b, TokenOrigin::Prompt, sequence);
                    }
                    for step in 0..60 {
                        synthetic_pass(&cfg, &mut rng, 1, 1, prompt.len() + step, t, &mut trace);
                        stats.record_pass(&trace, PassKind::Decode, trace.total_ns + 5_000);
                        let byte =
                            b"routing is adaptive, so hard tokens take more experts. "[step % 55];
                        push_token(
                            &mut generated,
                            &trace,
                            0,
                            byte,
                            TokenOrigin::Generated,
                            sequence,
                        );
                    }
                }
            }
        }
    }
    let workload = match kind {
        WorkloadKind::Eval => WorkloadInfo {
            kind,
            source: "example text".into(),
            source_size: 65_536,
            batch,
            seq_len: seq,
            temperature: None,
            seed: 0,
            description: format!("eval: {batch} x {seq} tokens over example text (64 KiB)"),
        },
        WorkloadKind::Generate => WorkloadInfo {
            kind,
            source: "built-in prompts".into(),
            source_size: 1,
            batch: 1,
            seq_len: 128,
            temperature: Some(0.8),
            seed: 0,
            description: "generate: 1 prompt, temperature 0.80, seed 0".into(),
        },
    };
    stats.snapshot(SnapshotInputs {
        sequence: 42,
        session_elapsed_s: 9.5,
        model: model_info(
            &cfg,
            if with_gpu {
                "CUDA:0 NVIDIA Example GPU"
            } else {
                "CPU, 8 threads"
            },
        ),
        workload,
        paused: false,
        ended: None,
        device: device(with_gpu),
        generated: (kind == WorkloadKind::Generate).then_some(generated),
    })
}

fn push_token(
    out: &mut GeneratedText,
    trace: &ForwardTrace,
    row: usize,
    byte: u8,
    origin: TokenOrigin,
    sequence: u64,
) {
    let experts = experts_per_layer(trace, row);
    let mean = experts.iter().map(|&n| n as f32).sum::<f32>() / experts.len().max(1) as f32;
    out.tokens.push(GeneratedToken {
        token: byte as u32,
        bytes: vec![byte],
        origin,
        sequence,
        experts_per_layer: experts,
        mean_experts: mean,
    });
}

/// A 24-layer x 64-expert snapshot: the fixture's layers repeated with new block indices (for
/// scrolling and timing; the figures of the copies repeat those of the originals).
pub fn large_snapshot() -> Snapshot {
    let mut s = example_snapshot(WorkloadKind::Eval, 64, true);
    let base_w = s.epoch.window.layers.clone();
    let base_c = s.epoch.cumulative.layers.clone();
    let base_p = s.policy.layers.clone();
    s.epoch.window.layers.clear();
    s.epoch.cumulative.layers.clear();
    s.policy.layers.clear();
    s.model.moe_layers.clear();
    for i in 0..24 {
        let block = 2 * i + 1;
        let mut w = base_w[i % 3].clone();
        w.layer = block;
        let mut c = base_c[i % 3].clone();
        c.layer = block;
        let mut p = base_p[i % 3].clone();
        p.layer = block;
        s.epoch.window.layers.push(w);
        s.epoch.cumulative.layers.push(c);
        s.policy.layers.push(p);
        s.model.moe_layers.push(block);
    }
    s.model.n_layers = 48;
    s
}

/// A rendered buffer's cells as text, one line per row (what a screen test or printer reads).
pub fn buffer_text(buf: &ratatui::buffer::Buffer) -> String {
    let a = buf.area;
    let mut s = String::new();
    for y in a.y..a.y + a.height {
        for x in a.x..a.x + a.width {
            s.push_str(buf[(x, y)].symbol());
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_are_consistent() {
        for kind in [WorkloadKind::Eval, WorkloadKind::Generate] {
            for gpu in [false, true] {
                let s = example_snapshot(kind, 16, gpu);
                assert_eq!(s.epoch.id, 1);
                let p = s.previous_epoch.as_ref().expect("two epochs");
                // A lower threshold selects fewer experts.
                assert!(s.epoch.cumulative.mean_experts_per_token < p.mean_experts_per_token);
                assert_eq!(s.epoch.window.layers.len(), 3);
                for l in &s.epoch.window.layers {
                    let n: u64 = l.experts_per_token_counts.iter().sum();
                    assert_eq!(n, s.epoch.window.tokens);
                    let share: f64 = l.expert_token_share.iter().sum();
                    assert!((share - l.mean_experts_per_token).abs() < 1e-9);
                }
                assert!(s.epoch.histograms.token_latency_us.count > 0);
                assert_eq!(s.device.gpus.is_empty(), !gpu);
                assert_eq!(s.generated.is_some(), kind == WorkloadKind::Generate);
                if kind == WorkloadKind::Eval {
                    assert!(s.epoch.quality.bits_per_byte.unwrap() > 0.0);
                    assert!(s.epoch.quality.mean_kl_bits.unwrap() > 0.0);
                } else {
                    assert!(s.epoch.decode_tokens_per_second.is_some());
                    let g = s.generated.as_ref().unwrap();
                    assert_eq!(g.text_by_sequence().len(), 4);
                }
            }
        }
    }
}
