//! Whole-model benchmarks (issue 7, items 2 and 5): tokens/s of the embedded model under each
//! policy for the eval and generate workloads, and the time to load a generated 1 GiB model.
//! Run by `xmoe-top bench` (also on a GPU, with `--device cuda`) and `cargo bench --bench model`.
//! Prints markdown tables; results are recorded in docs/benchmarks.md.

use std::time::Instant;

use crate::kernel::{
    Activation, ExpertRows, KernelVariant, MoeScratch, PackedExperts, RowRef, RowSource,
    WeightDtype, moe_forward,
};
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
        load_average()
            .map(|l| format!("load average {l}"))
            .unwrap_or_default()
    );
    whole_model(quick, device, threads)?;
    if device.is_cpu() {
        matvec_split(quick, threads);
    }
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
    let mut model = Model::from_file(&file, device, LoadOptions::default())?;
    let cfg = model.config().clone();
    let flops = FlopModel::new(&cfg);
    let n_moe = model.moe_layers().len();
    let text = crate::embedded::HELDOUT_TEXT;
    let (batch, seq) = (8, 128);
    let passes = if quick { 3 } else { 12 };
    println!(
        "\n## Whole model: {} on {device:?} ({threads} CPU threads), eval {batch} x {seq} tokens; decode {} tokens after a 14-token prompt, the median of {DECODE_RUNS} runs\n",
        cfg.name,
        if quick { 32 } else { 112 },
    );
    println!("decode path: {}\n", model.decode_path());
    let bound = DecodeBound::measure(&model, threads, quick);
    println!("{}\n", bound.describe());
    println!(
        "| policy | experts/token | MoE FLOPs / all experts | eval tokens/s | decode tokens/s | decode us/token | decode CPU us/token | bound us/token | CPU / bound | candle decode us/token | candle CPU us/token |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
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
        let prompt: Vec<u32> = b"And God said, ".iter().map(|&b| b as u32).collect();
        let steps = if quick { 32 } else { 112 };
        let lean = median_decode_run(&model, &routing, &prompt, steps, &bound)?;
        model.set_lean_decode(false);
        let candle = median_decode_run(&model, &routing, &prompt, steps, &bound)?;
        model.set_lean_decode(true);
        let cpu = |r: &DecodeRun| r.cpu_us_per_token.map_or("-".into(), |c| format!("{c:.1}"));
        let ratio = lean
            .cpu_us_per_token
            .map_or("-".into(), |c| format!("{:.2}", c / lean.bound_us));
        println!(
            "| {policy} | {experts:.2} | {:.1}% | {:.0} | {:.0} | {:.1} | {} | {:.1} | {ratio} | {:.1} | {} |",
            frac * 100.0,
            tokens as f64 / elapsed,
            1e6 / lean.us_per_token,
            lean.us_per_token,
            cpu(&lean),
            lean.bound_us,
            candle.us_per_token,
            cpu(&candle),
        );
    }
    println!(
        "\nCPU columns: the calling thread's time. From eight routed experts in a layer (dense, top-8) the lean step splits them over the rayon pool, and the other thread's share is not counted there: compare wall time for those rows."
    );
    Ok(())
}

/// What a decode step is held against: its arithmetic at the machine's matmul rate, or, when the
/// weights do not fit the last-level cache, the bytes it reads at the memory's read bandwidth.
pub struct DecodeBound {
    flops: FlopModel,
    /// FLOP/s of the fastest 1024^3 f32 matmul on these threads.
    peak_flops: f64,
    /// Bytes/s read from a buffer far larger than the caches (measured only when the weights do
    /// not fit the last-level cache).
    bandwidth: Option<f64>,
    /// Weight bytes every token reads (attention, router, dense FFNs, shared experts, LM head)
    /// and bytes of one routed expert, as the decode path keeps them.
    weight_bytes: Option<(usize, usize)>,
    llc_bytes: Option<usize>,
    kv_width: usize,
    n_layers: usize,
}

impl DecodeBound {
    /// Measures the machine (matmul rate, and bandwidth when the model's weights exceed the
    /// last-level cache) for `model`.
    pub fn measure(model: &Model, threads: usize, quick: bool) -> Self {
        let cfg = model.config();
        let weight_bytes = model.decode_weight_bytes();
        let llc_bytes = last_level_cache_bytes();
        let total = weight_bytes
            .map(|(dense, expert)| dense + expert * cfg.n_experts * model.moe_layers().len());
        let bandwidth = match (total, llc_bytes) {
            (Some(t), Some(llc)) if t > llc => Some(read_bandwidth(
                (1usize << 30).max(4 * llc),
                threads,
                if quick { 2 } else { 5 },
            )),
            _ => None,
        };
        Self {
            flops: FlopModel::new(cfg),
            peak_flops: matmul_rate(if quick { 3 } else { 8 }),
            bandwidth,
            weight_bytes,
            llc_bytes,
            kv_width: cfg.kv_heads() * cfg.head_dim(),
            n_layers: cfg.n_layers,
        }
    }

    /// The model's FLOP counts.
    pub fn flops(&self) -> &FlopModel {
        &self.flops
    }

    /// FLOP/s of the fastest 1024^3 f32 matmul on one thread.
    pub fn matmul_rate(&self) -> f64 {
        self.peak_flops
    }

    /// One line on what was measured and which bound applies.
    pub fn describe(&self) -> String {
        let llc = self.llc_bytes.map_or("unknown".into(), |b| {
            format!("{:.0} MiB", b as f64 / (1 << 20) as f64)
        });
        let weights = self.weight_bytes.map_or("unknown".into(), |(d, e)| {
            format!(
                "{:.2} MB every token + {:.3} MB per routed expert",
                d as f64 / 1e6,
                e as f64 / 1e6
            )
        });
        match self.bandwidth {
            Some(bw) => format!(
                "bound: bytes read / read bandwidth ({:.1} GB/s), since the weights exceed the last-level cache ({llc}); weights read: {weights}; matmul rate {:.0} GFLOP/s",
                bw / 1e9,
                self.peak_flops / 1e9
            ),
            None if self.weight_bytes.is_none() => format!(
                "bound: FLOPs of the token / the fastest 1024^3 matmul on one thread ({:.0} GFLOP/s, thread CPU time); a lower bound only: this model's decode path (not the lean one) does not say which bytes a step reads, so the bandwidth bound is not computed",
                self.peak_flops / 1e9
            ),
            None => format!(
                "bound: FLOPs of the token / the fastest 1024^3 matmul on one thread ({:.0} GFLOP/s, thread CPU time), since the weights fit the last-level cache ({llc}); weights read: {weights}",
                self.peak_flops / 1e9
            ),
        }
    }

    /// The bound of one decoded token, in seconds: `context` keys, `pairs` routed (token,
    /// expert) pairs over all MoE layers.
    pub fn seconds(&self, context: usize, pairs: usize) -> f64 {
        match (self.bandwidth, self.weight_bytes) {
            (Some(bw), Some((dense, expert))) => {
                let kv = 2 * self.kv_width * 4 * context * self.n_layers;
                (dense + pairs * expert + kv) as f64 / bw
            }
            _ => {
                let moe = self.flops.moe_layers().len() as u64 * self.flops.router()
                    + pairs as u64 * self.flops.expert();
                (self.flops.non_moe(context) + moe) as f64 / self.peak_flops
            }
        }
    }
}

/// Whether splitting one decode matrix-vector product over the threads pays: bf16 `[out, in]`
/// weights from 128 KiB to OLMoE's LM head (50304 x 2048, 206 MB), each on one thread and split
/// on the rayon pool, called from a pool thread (as the lean decoder is, `model::on_pool`) and
/// from a thread outside the pool, best of a few runs (wall clock).
fn matvec_split(quick: bool, threads: usize) {
    use crate::kernel::matvec::matvec_rows_split;
    println!(
        "\n## Splitting one matrix-vector product (bf16 weights, decode): 1 thread vs {threads}, called from a pool thread and from outside the pool\n"
    );
    println!(
        "\"in cache\": the same weight multiplied again and again (it stays in the caches when it fits, as a small model's do); \"from memory\": a cycle over copies that together exceed 4x the last-level cache, each used once per cycle, as the weights of a large model are in a decode step.\n"
    );
    println!(
        "| weight | bytes | in cache: 1 thread (us) | {threads} threads, from the pool (us) | from outside (us) | speed-up, pool / outside | from memory: 1 thread (us) | from the pool (us) | from outside (us) | speed-up, pool / outside |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    // `f` on a thread of its own, outside the rayon pool.
    fn outside<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        std::thread::scope(|s| s.spawn(f).join().expect("a timing thread panicked"))
    }
    // What a split of small parts costs: one 20 us part per thread (20 us when the threads run
    // them side by side at once, more when a thread is late or the caller runs them all), median
    // of 2000 splits.
    let part = std::time::Duration::from_micros(20);
    let small_split = || {
        let mut times: Vec<f64> = (0..2000)
            .map(|_| {
                let t0 = Instant::now();
                crate::kernel::split::each((0..threads).collect(), |i| {
                    let t = Instant::now();
                    while t.elapsed() < part {
                        std::hint::black_box(i);
                    }
                });
                t0.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    };
    let reps = if quick { 3 } else { 10 };
    let cold_bytes = 4 * last_level_cache_bytes().unwrap_or(32 << 20);
    for (out, inp) in [
        (64usize, 1024usize),
        (128, 1024),
        (512, 1024),
        (2048, 2048),
        (8192, 2048),
        (50304, 2048),
    ] {
        let bytes = out * inp * 2;
        let copies = cold_bytes.div_ceil(bytes).max(1);
        let ws: Vec<Vec<half::bf16>> = (0..copies)
            .map(|c| {
                (0..out * inp)
                    .map(|i| half::bf16::from_f32(weight(i + c, 0.05)))
                    .collect()
            })
            .collect();
        let x: Vec<f32> = (0..inp).map(|i| weight(i + 5, 1.0)).collect();
        // Seconds per product, best of `reps` rounds: over `uses` of the copies in turn.
        let time = |parts: usize, uses: usize| {
            let mut y = vec![0.0f32; out];
            let mut best = f64::INFINITY;
            for r in 0..=reps {
                let t0 = Instant::now();
                for w in ws.iter().cycle().take(uses) {
                    matvec_rows_split(w, &x, &mut y, parts);
                    std::hint::black_box(&y);
                }
                if r > 0 {
                    best = best.min(t0.elapsed().as_secs_f64() / uses as f64);
                }
            }
            best
        };
        let (hot1, hot_n) = (time(1, 1), time(threads, 1));
        let hot_o = outside(|| time(threads, 1));
        let (cold1, cold_n) = (time(1, copies), time(threads, copies));
        let cold_o = outside(|| time(threads, copies));
        println!(
            "| {out} x {inp} | {:.2} MB | {:.1} | {:.1} | {:.1} | {:.2}x / {:.2}x | {:.1} | {:.1} | {:.1} | {:.2}x / {:.2}x |",
            bytes as f64 / 1e6,
            hot1 * 1e6,
            hot_n * 1e6,
            hot_o * 1e6,
            hot1 / hot_n,
            hot1 / hot_o,
            cold1 * 1e6,
            cold_n * 1e6,
            cold_o * 1e6,
            cold1 / cold_n,
            cold1 / cold_o
        );
    }
    println!(
        "\nA split of {threads} parts of 20 us each (20 us if they run side by side), median of 2000: {:.1} us from a pool thread, {:.1} us from outside the pool.",
        small_split() * 1e6,
        outside(small_split) * 1e6
    );
}

/// Per-token time of a decode run and its bound.
struct DecodeRun {
    /// Wall clock.
    us_per_token: f64,
    /// CPU time of the calling thread: on a shared machine the time the step computed, without
    /// the time it waited for a core. A step of the embedded model runs on it alone unless it
    /// routes eight or more experts in a layer (dense, top-8), when another pool thread computes
    /// part of them, uncounted here.
    cpu_us_per_token: Option<f64>,
    bound_us: f64,
}

/// CPU time this thread has run, in nanoseconds (`CLOCK_THREAD_CPUTIME_ID`: exact, unlike
/// `/proc/thread-self/schedstat`, which is brought up to date only at scheduler ticks).
pub fn thread_cpu_ns() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// Runs of [`decode_run`] per figure. A run of the embedded model lasts a few milliseconds, so one
/// preemption on a shared machine moved a single run's tokens/s by 2-4x (`docs/benchmarks.md`,
/// "The embedded model: eval, and decode"); the median of several runs does not move with it.
const DECODE_RUNS: usize = 9;

/// The run with the median wall time of [`DECODE_RUNS`] runs of [`decode_run`].
fn median_decode_run(
    model: &Model,
    routing: &RoutingConfig,
    prompt: &[u32],
    steps: usize,
    bound: &DecodeBound,
) -> anyhow::Result<DecodeRun> {
    let mut runs = (0..DECODE_RUNS)
        .map(|_| decode_run(model, routing, prompt, steps, bound))
        .collect::<anyhow::Result<Vec<_>>>()?;
    runs.sort_by(|a, b| a.us_per_token.total_cmp(&b.us_per_token));
    Ok(runs.swap_remove(DECODE_RUNS / 2))
}

/// Prefills `prompt`, then decodes `steps` greedy tokens one at a time.
fn decode_run(
    model: &Model,
    routing: &RoutingConfig,
    prompt: &[u32],
    steps: usize,
    bound: &DecodeBound,
) -> anyhow::Result<DecodeRun> {
    let mut trace = ForwardTrace::default();
    let mut cache = model.new_cache(1);
    let vocab = model.config().vocab_size;
    let logits = model.forward(prompt, 1, routing, Some(&mut cache), &mut trace)?;
    let mut next = argmax(&logits[logits.len() - vocab..]);
    // One warm-up step: the lean path sizes its buffers and copies the prefill's keys here.
    next = argmax(model.decode(next, routing, &mut cache, &mut trace)?);
    let mut bound_s = 0.0;
    let cpu0 = thread_cpu_ns();
    let t0 = Instant::now();
    for _ in 0..steps {
        next = argmax(model.decode(next, routing, &mut cache, &mut trace)?);
        let pairs = trace.moe.iter().map(|m| m.groups.pairs()).sum::<usize>();
        bound_s += bound.seconds(trace.start_pos + 1, pairs);
    }
    let dec = t0.elapsed().as_secs_f64();
    let cpu = cpu0
        .zip(thread_cpu_ns())
        .map(|(a, b)| (b - a) as f64 / 1e3 / steps as f64);
    Ok(DecodeRun {
        us_per_token: dec / steps as f64 * 1e6,
        cpu_us_per_token: cpu,
        bound_us: bound_s / steps as f64 * 1e6,
    })
}

/// FLOP/s of the fastest of `reps` 1024^3 f32 matmuls (the `gemm` crate candle uses) on the
/// calling thread alone, timed by this thread's CPU clock (wall clock where there is none): the
/// rate a one-thread decode step could reach, and one that a shared machine does not distort.
pub fn matmul_rate(reps: usize) -> f64 {
    let n = 1024;
    let a: Vec<f32> = (0..n * n).map(|i| weight(i, 1.0)).collect();
    let b: Vec<f32> = (0..n * n).map(|i| weight(i + 1, 1.0)).collect();
    let mut c = vec![0.0f32; n * n];
    let mut best = f64::INFINITY;
    for r in 0..=reps {
        let (t0, cpu0) = (Instant::now(), thread_cpu_ns());
        // SAFETY: a, b and c are n x n row-major buffers (row stride n, column stride 1) that
        // live across the call, and c does not alias a or b.
        unsafe {
            gemm::gemm(
                n,
                n,
                n,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        let secs = match cpu0.zip(thread_cpu_ns()) {
            Some((x, y)) => (y - x) as f64 / 1e9,
            None => t0.elapsed().as_secs_f64(),
        };
        std::hint::black_box(&c);
        if r > 0 {
            best = best.min(secs);
        }
    }
    (2 * n * n * n) as f64 / best
}

/// Size of the largest CPU cache (Linux sysfs), if the kernel says.
fn last_level_cache_bytes() -> Option<usize> {
    let dir = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
    let mut best = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let Ok(size) = std::fs::read_to_string(entry.path().join("size")) else {
            continue;
        };
        let s = size.trim();
        let bytes = if let Some(k) = s.strip_suffix('K') {
            k.parse::<usize>().ok().map(|v| v << 10)
        } else if let Some(m) = s.strip_suffix('M') {
            m.parse::<usize>().ok().map(|v| v << 20)
        } else {
            s.parse::<usize>().ok()
        };
        best = best.max(bytes);
    }
    best
}

/// The 1, 5 and 15 minute load averages (`/proc/loadavg`), recorded beside every timing because
/// the machines are shared.
pub(crate) fn load_average() -> Option<String> {
    let l = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

/// The greedy choice: the index of the largest logit.
pub(crate) fn argmax(row: &[f32]) -> u32 {
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

/// A layer of gated experts read in place ([`PackedExperts::from_rows`]) from one buffer that
/// holds each expert's gate, up and down in `dtype`, as a checkpoint shard does.
#[allow(clippy::too_many_arguments)]
fn in_place_layer(
    e: usize,
    d: usize,
    h: usize,
    act: Activation,
    dtype: WeightDtype,
    up: &[f32],
    gate: &[f32],
    down: &[f32],
) -> PackedExperts {
    let hd = h * d;
    let mut buf = Vec::with_capacity(3 * e * hd * dtype.bytes());
    let mut put = |v: &[f32]| {
        let at = buf.len();
        dtype.encode(v, &mut buf);
        RowRef {
            source: 0,
            offset: at,
        }
    };
    let experts: Vec<ExpertRows> = (0..e)
        .map(|x| {
            let r = x * hd..(x + 1) * hd;
            ExpertRows {
                gate: Some(put(&gate[r.clone()])),
                up: put(&up[r.clone()]),
                down: put(&down[r]),
            }
        })
        .collect();
    let sources: Vec<std::sync::Arc<dyn RowSource>> = vec![std::sync::Arc::new(buf)];
    PackedExperts::from_rows(d, h, true, act, dtype, sources, experts, None, None)
        .expect("every matrix lies in the buffer")
}

/// The half-precision expert layer against the f32 one (issue 15, section 1): useful GFLOP/s at
/// prefill sizes, and decode time against the time to read the selected experts' weights at the
/// read bandwidth measured in the same run.
pub fn half_layer(quick: bool, threads: usize) {
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
        (
            "bf16 in place",
            in_place_layer(e, d, h, act, WeightDtype::Bf16, &up, &gate, &down),
        ),
        (
            "f32 in place",
            in_place_layer(e, d, h, act, WeightDtype::F32, &up, &gate, &down),
        ),
    ];
    drop((up, gate, down));
    let variant = KernelVariant::Auto.resolve();
    // On AVX-512 BF16 the bf16 layers also run with rounded activations (`vdpbf16ps`), the
    // variant a user may choose instead of the exact default.
    let mut runs: Vec<(String, &PackedExperts, KernelVariant)> = Vec::new();
    for (name, layer) in &layers {
        runs.push((name.to_string(), layer, variant));
        for v in [KernelVariant::Avx512Bf16, KernelVariant::Amx] {
            if v.is_supported() && layer.dtype() == WeightDtype::Bf16 {
                runs.push((format!("{name}, {}", v.name()), layer, v));
            }
        }
    }
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
    for (name, layer, variant) in &runs {
        let (layer, variant) = (*layer, *variant);
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
        if name == "f32" {
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
    for (name, layer, variant) in &runs {
        let (layer, variant) = (*layer, *variant);
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
