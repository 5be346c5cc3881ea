//! MoE layer benchmark (issue 7, item 1): the kernel against the dense FFN of the same width and
//! against candle's per-expert `index_select` / `matmul` / `index_add` dispatch, in one run.
//!
//! `cargo bench --bench moe_layer` runs the full grid; `-- --quick` (or `MOE_BENCH_QUICK=1`) a
//! subset in under a minute. `MOE_BENCH_THREADS` sets the thread count (default: all cores); it is
//! also written to `RAYON_NUM_THREADS` before candle starts, since candle 0.11 re-reads
//! /proc/cpuinfo on every CPU matmul when that variable is unset. `MOE_BENCH_CLOCK=cpu` times
//! the calling thread's CPU time on one thread, for a machine that other jobs keep busy.
//! `MOE_BENCH_D`, `MOE_BENCH_WIDTH` (multiples of d), `MOE_BENCH_E`, `MOE_BENCH_T` override the
//! grid with comma-separated lists; `MOE_BENCH_VARIANT=avx2|portable|avx512` picks the fused
//! variant timed (default: the one `Auto` picks).

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use xmoe_top::kernel::Activation;
use xmoe_top::kernel::{KernelVariant, MoeScratch, PackedExperts, moe_forward};
use xmoe_top::routing::{ExpertGroups, Routing, RoutingPolicy, route};

const ACT: Activation = Activation::Gelu;

/// How calls are timed.
#[derive(Clone, Copy, PartialEq)]
enum Clock {
    /// Wall time, minimum over the samples (the least disturbed call on a shared machine).
    Wall,
    /// CPU time of the calling thread, median over the samples: immune to time slicing when other
    /// jobs load the machine, but only meaningful with one thread.
    ThreadCpu,
}

fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; this clock exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Seconds per call of `f` (see [`Clock`]), repeating until `budget` is spent, at least 3 calls.
fn time<F: FnMut()>(clock: Clock, budget: Duration, mut f: F) -> f64 {
    f();
    let mut samples = Vec::new();
    let start = Instant::now();
    while samples.len() < 3 || (start.elapsed() < budget && samples.len() < 1000) {
        let (w, c) = (Instant::now(), thread_cpu_s());
        f();
        samples.push(match clock {
            Clock::Wall => w.elapsed().as_secs_f64(),
            Clock::ThreadCpu => thread_cpu_s() - c,
        });
    }
    samples.sort_by(f64::total_cmp);
    match clock {
        Clock::Wall => samples[0],
        Clock::ThreadCpu => samples[samples.len() / 2],
    }
}

/// A comma-separated list from the environment (e.g. `MOE_BENCH_D=1024`), else `default`.
fn list_env(name: &str, default: Vec<usize>) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or(default)
}

/// One thread stays on the calling thread (so the thread CPU clock sees the work).
fn par(threads: usize) -> gemm::Parallelism {
    if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

fn rand_vec(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| rng.random_range(-1.0f32..1.0) * scale)
        .collect()
}

/// Routing of `tokens` tokens: `k` uniformly random experts each (top-k on random logits), or
/// skewed: threshold 0.9 on logits where 4 experts get +3, as a trained router's hot experts.
fn routing(rng: &mut StdRng, tokens: usize, e: usize, k: Option<usize>) -> Routing {
    let logits: Vec<f32> = (0..tokens * e)
        .map(|i| {
            let hot = if k.is_none() && i % e < 4 { 3.0 } else { 0.0 };
            rng.random_range(-1.0f32..1.0) + hot
        })
        .collect();
    let policy = match k {
        Some(k) => RoutingPolicy::TopK {
            k,
            renormalize: false,
        },
        None => RoutingPolicy::threshold(0.9),
    };
    let mut r = Routing::default();
    route(&logits, policy.check(e).unwrap(), None, &mut r).unwrap();
    r
}

/// candle tensors of the same experts, in the orientation candle-transformers uses (`[in, out]`
/// after a transpose is made contiguous once, so no transposes are timed).
struct CandleExperts {
    w1: Vec<Tensor>,
    w2: Vec<Tensor>,
}

fn candle_experts(e: usize, d: usize, h: usize, up: &[f32], down: &[f32]) -> CandleExperts {
    let dev = Device::Cpu;
    let mut w1 = Vec::new();
    let mut w2 = Vec::new();
    for i in 0..e {
        let u = Tensor::from_slice(&up[i * h * d..(i + 1) * h * d], (h, d), &dev).unwrap();
        let dn = Tensor::from_slice(&down[i * h * d..(i + 1) * h * d], (d, h), &dev).unwrap();
        w1.push(u.t().unwrap().contiguous().unwrap());
        w2.push(dn.t().unwrap().contiguous().unwrap());
    }
    CandleExperts { w1, w2 }
}

/// The baseline dispatch: per expert gather its rows, two matmuls, scale by the routing weight,
/// `index_add` into the output.
fn candle_moe(ce: &CandleExperts, x: &Tensor, groups: &ExpertGroups) -> Tensor {
    let dev = Device::Cpu;
    let mut out = x.zeros_like().unwrap();
    for e in 0..groups.n_experts() {
        let (toks, ws) = groups.group(e);
        if toks.is_empty() {
            continue;
        }
        let ids = Tensor::from_slice(toks, toks.len(), &dev).unwrap();
        let w = Tensor::from_slice(ws, (ws.len(), 1), &dev).unwrap();
        let xs = x.index_select(&ids, 0).unwrap();
        let hdn = xs.matmul(&ce.w1[e]).unwrap().gelu().unwrap();
        let y = hdn.matmul(&ce.w2[e]).unwrap().broadcast_mul(&w).unwrap();
        out = out.index_add(&ids, &y, 0).unwrap();
    }
    out
}

#[derive(Default)]
struct Row {
    d: usize,
    e: usize,
    h: usize,
    tokens: usize,
    routing: String,
    share: f64,
    moe_s: f64,
    gemm_var_s: f64,
    gflops: f64,
    dense_s: f64,
    dense_kind: &'static str,
    candle_s: Option<f64>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick")
        || std::env::var("MOE_BENCH_QUICK").is_ok_and(|v| v != "0");
    let clock = if std::env::var("MOE_BENCH_CLOCK").is_ok_and(|v| v == "cpu") {
        Clock::ThreadCpu
    } else {
        Clock::Wall
    };
    let threads: usize = if clock == Clock::ThreadCpu {
        1
    } else {
        std::env::var("MOE_BENCH_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    };
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    let budget = Duration::from_millis(if quick { 40 } else { 100 });
    // The fused variant under test (MOE_BENCH_VARIANT=avx2 / portable / avx512; default Auto).
    let fused = match std::env::var("MOE_BENCH_VARIANT").as_deref() {
        Ok("avx2") => KernelVariant::Avx2,
        Ok("portable") => KernelVariant::Portable,
        Ok("avx512") => KernelVariant::Avx512,
        Ok("avx512bf16") => KernelVariant::Avx512Bf16,
        Ok("amx") => KernelVariant::Amx,
        _ => KernelVariant::Auto,
    };
    assert!(
        fused.is_supported(),
        "{fused:?} is not supported by this CPU"
    );
    let auto = fused.resolve();
    println!(
        "# MoE layer benchmark: {} mode, {threads} threads, kernel {auto:?}, GELU non-gated experts, f32, {}",
        if quick { "quick" } else { "full" },
        match clock {
            Clock::Wall => "wall time (min of samples)",
            Clock::ThreadCpu => "thread CPU time (median of samples)",
        }
    );

    // Peak: one 1024^3 matmul, gemm (all threads) and candle.
    let mut rng = StdRng::seed_from_u64(42);
    let n = 1024;
    let a = rand_vec(&mut rng, n * n, 1.0);
    let b = rand_vec(&mut rng, n * n, 1.0);
    let mut c = vec![0.0f32; n * n];
    let gemm_peak_s = time(clock, budget * 2, || unsafe {
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
            par(threads),
        )
    });
    let ta = Tensor::from_slice(&a, (n, n), &Device::Cpu).unwrap();
    let tb = Tensor::from_slice(&b, (n, n), &Device::Cpu).unwrap();
    let candle_peak_s = time(clock, budget * 2, || {
        ta.matmul(&tb).unwrap();
    });
    let flop = 2.0 * (n * n * n) as f64;
    let peak = (flop / gemm_peak_s).max(flop / candle_peak_s) / 1e9;
    println!(
        "peak 1024^3 matmul: gemm {:.0} GFLOP/s, candle {:.0} GFLOP/s",
        flop / gemm_peak_s / 1e9,
        flop / candle_peak_s / 1e9
    );

    // Decode overhead: one token whose every pair was dropped, so no expert runs and what is left
    // is the layer's fixed cost (planning, zeroing, dispatch).
    {
        let (d, e, h) = (1024, 64, 128);
        let up = rand_vec(&mut rng, e * h * d, 0.03);
        let packed = PackedExperts::new(e, d, h, ACT, &up, None, &up, None, None);
        let x = rand_vec(&mut rng, d, 1.0);
        let mut out = vec![0.0f32; d];
        let mut r = routing(&mut rng, 1, e, Some(8));
        r.kept.iter_mut().for_each(|k| *k = false);
        let mut groups = ExpertGroups::default();
        groups.build(&r);
        let mut scratch = MoeScratch::default();
        let empty = time(clock, budget, || {
            moe_forward(
                &packed,
                &x,
                &groups,
                &mut out,
                &mut scratch,
                KernelVariant::Auto,
                threads,
            )
        });
        println!(
            "decode fixed overhead (d=1024, E=64, 1 token, no expert run): {:.2} us",
            empty * 1e6
        );
    }

    let (dims, widths, experts, token_set) = if quick {
        (vec![512], vec![4], vec![16, 64], vec![1, 256])
    } else {
        (
            vec![512, 1024],
            vec![4, 8],
            vec![16, 64],
            vec![1, 16, 256, 1024],
        )
    };
    let dims = list_env("MOE_BENCH_D", dims);
    let widths = list_env("MOE_BENCH_WIDTH", widths);
    let experts = list_env("MOE_BENCH_E", experts);
    let token_set = list_env("MOE_BENCH_T", token_set);
    let shares: [(Option<f64>, &str); 5] = [
        (Some(1.0), "100%"),
        (Some(0.5), "50%"),
        (Some(0.25), "25%"),
        (Some(0.125), "12.5%"),
        (None, "skewed"),
    ];
    let mut rows = Vec::new();
    let mut scratch = MoeScratch::default();
    for &d in &dims {
        for &mult in &widths {
            let width = mult * d;
            // Dense FFN of the same width: the fused kernel with one expert taking every token,
            // gemm (all threads) plus the scalar activation, candle, and the two gemm matmuls
            // without any activation (a bound no dense FFN beats); the fastest counts.
            let up = rand_vec(&mut rng, width * d, 1.0 / (d as f32).sqrt());
            let down = rand_vec(&mut rng, width * d, 1.0 / (width as f32).sqrt());
            let dense_packed = PackedExperts::new(1, d, width, ACT, &up, None, &down, None, None);
            let w1t: Vec<f32> = (0..d * width)
                .map(|i| up[(i % width) * d + i / width])
                .collect();
            let w2t: Vec<f32> = (0..width * d)
                .map(|i| down[(i % d) * width + i / d])
                .collect();
            let tw1 = Tensor::from_slice(&w1t, (d, width), &Device::Cpu).unwrap();
            let tw2 = Tensor::from_slice(&w2t, (width, d), &Device::Cpu).unwrap();
            for &tokens in &token_set {
                let x = rand_vec(&mut rng, tokens * d, 1.0);
                let tx = Tensor::from_slice(&x, (tokens, d), &Device::Cpu).unwrap();
                let mut out = vec![0.0f32; tokens * d];
                let mut dense_groups = ExpertGroups::default();
                dense_groups.build(&routing(&mut rng, tokens, 1, Some(1)));
                let t_fused = time(clock, budget, || {
                    moe_forward(
                        &dense_packed,
                        &x,
                        &dense_groups,
                        &mut out,
                        &mut scratch,
                        fused,
                        threads,
                    )
                });
                let mut hbuf = vec![0.0f32; tokens * width];
                let t_gemm = time(clock, budget, || unsafe {
                    let par = par(threads);
                    gemm::gemm(
                        tokens,
                        width,
                        d,
                        hbuf.as_mut_ptr(),
                        1,
                        width as isize,
                        false,
                        x.as_ptr(),
                        1,
                        d as isize,
                        w1t.as_ptr(),
                        1,
                        width as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        par,
                    );
                    if threads > 1 {
                        hbuf.par_chunks_mut(4096)
                            .for_each(|c| c.iter_mut().for_each(|v| *v = ACT.apply(*v)));
                    } else {
                        hbuf.iter_mut().for_each(|v| *v = ACT.apply(*v));
                    }
                    gemm::gemm(
                        tokens,
                        d,
                        width,
                        out.as_mut_ptr(),
                        1,
                        d as isize,
                        false,
                        hbuf.as_ptr(),
                        1,
                        width as isize,
                        w2t.as_ptr(),
                        1,
                        d as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        par,
                    );
                });
                // Lower bound for any dense FFN of this width: its two matmuls alone.
                let t_matmuls = time(clock, budget, || unsafe {
                    let par = par(threads);
                    gemm::gemm(
                        tokens,
                        width,
                        d,
                        hbuf.as_mut_ptr(),
                        1,
                        width as isize,
                        false,
                        x.as_ptr(),
                        1,
                        d as isize,
                        w1t.as_ptr(),
                        1,
                        width as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        par,
                    );
                    gemm::gemm(
                        tokens,
                        d,
                        width,
                        out.as_mut_ptr(),
                        1,
                        d as isize,
                        false,
                        hbuf.as_ptr(),
                        1,
                        width as isize,
                        w2t.as_ptr(),
                        1,
                        d as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        par,
                    );
                });
                let t_candle_dense = time(clock, budget, || {
                    tx.matmul(&tw1)
                        .unwrap()
                        .gelu()
                        .unwrap()
                        .matmul(&tw2)
                        .unwrap();
                });
                let (dense_s, dense_kind) = [
                    (t_fused, "fused"),
                    (t_gemm, "gemm"),
                    (t_candle_dense, "candle"),
                    (t_matmuls, "matmuls only"),
                ]
                .into_iter()
                .min_by(|a, b| a.0.total_cmp(&b.0))
                .unwrap();

                for &e in &experts {
                    let h = width / e;
                    let up_e = rand_vec(&mut rng, e * h * d, 1.0 / (d as f32).sqrt());
                    let down_e = rand_vec(&mut rng, e * h * d, 1.0 / (h as f32).sqrt());
                    let packed = PackedExperts::new(e, d, h, ACT, &up_e, None, &down_e, None, None);
                    // The candle baseline is slow; in the full grid it runs where issue 7's
                    // target is stated (>= 256 tokens) and at 1 token.
                    let with_candle = !quick || tokens >= 256;
                    let ce = with_candle.then(|| candle_experts(e, d, h, &up_e, &down_e));
                    for &(share, label) in &shares {
                        let k = share.map(|s| ((s * e as f64).round() as usize).max(1));
                        let r = routing(&mut rng, tokens, e, k);
                        let mut groups = ExpertGroups::default();
                        groups.build(&r);
                        let pairs = groups.pairs();
                        let active = pairs as f64 / (tokens * e) as f64;
                        let moe_s = time(clock, budget, || {
                            moe_forward(
                                &packed,
                                &x,
                                &groups,
                                &mut out,
                                &mut scratch,
                                fused,
                                threads,
                            )
                        });
                        let gemm_var_s = time(clock, budget, || {
                            moe_forward(
                                &packed,
                                &x,
                                &groups,
                                &mut out,
                                &mut scratch,
                                KernelVariant::Gemm,
                                threads,
                            )
                        });
                        let candle_s = ce.as_ref().map(|ce| {
                            time(clock, budget, || {
                                candle_moe(ce, &tx, &groups);
                            })
                        });
                        let useful = (pairs * packed.flops_per_pair()) as f64;
                        rows.push(Row {
                            d,
                            e,
                            h,
                            tokens,
                            routing: label.to_string(),
                            share: active,
                            moe_s,
                            gemm_var_s,
                            gflops: useful / moe_s / 1e9,
                            dense_s,
                            dense_kind,
                            candle_s,
                        });
                        let r = rows.last().unwrap();
                        eprintln!(
                            "d={d} E={e} h={h} T={tokens} {label}: {:.1} us",
                            r.moe_s * 1e6
                        );
                    }
                }
            }
        }
    }

    println!();
    println!(
        "| d | E x h | T | routing | active | time (us) | GFLOP/s | % peak | / dense | / (active x dense) | gemm-variant / fused | candle dispatch / fused | dense (us, fastest) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let candle = r
            .candle_s
            .map_or("-".to_string(), |c| format!("{:.1}x", c / r.moe_s));
        println!(
            "| {} | {}x{} | {} | {} | {:.1}% | {:.1} | {:.0} | {:.0}% | {:.3} | {:.2} | {:.2} | {} | {:.1} ({}) |",
            r.d,
            r.e,
            r.h,
            r.tokens,
            r.routing,
            r.share * 100.0,
            r.moe_s * 1e6,
            r.gflops,
            r.gflops / peak * 100.0,
            r.moe_s / r.dense_s,
            r.moe_s / (r.share * r.dense_s),
            r.gemm_var_s / r.moe_s,
            candle,
            r.dense_s * 1e6,
            r.dense_kind
        );
    }
    println!("\npeak (fastest 1024^3 matmul) = {peak:.0} GFLOP/s");
}
