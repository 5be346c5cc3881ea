//! Every variant against a naive per-token f64 reference, on random experts and random routings.

use super::*;
use crate::routing::{Routing, RoutingPolicy, route};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Raw expert weights in the model-file layout, kept for the reference.
struct Raw {
    e: usize,
    d: usize,
    h: usize,
    act: Activation,
    up: Vec<f32>,
    gate: Option<Vec<f32>>,
    down: Vec<f32>,
    up_bias: Option<Vec<f32>>,
    down_bias: Option<Vec<f32>>,
}

impl Raw {
    #[allow(clippy::too_many_arguments)]
    fn random(
        rng: &mut StdRng,
        e: usize,
        d: usize,
        h: usize,
        act: Activation,
        gated: bool,
        up_bias: bool,
        down_bias: bool,
    ) -> Raw {
        let mut v = |n: usize, scale: f32| -> Vec<f32> {
            (0..n)
                .map(|_| rng.random_range(-1.0f32..1.0) * scale)
                .collect()
        };
        let (si, so) = (2.0 / (d as f32).sqrt(), 2.0 / (h as f32).sqrt());
        let up = v(e * h * d, si);
        let gate = gated.then(|| v(e * h * d, si));
        let down = v(e * d * h, so);
        let up_bias = up_bias.then(|| v(e * h, 0.5));
        let down_bias = down_bias.then(|| v(e * d, 0.5));
        Raw {
            e,
            d,
            h,
            act,
            up,
            gate,
            down,
            up_bias,
            down_bias,
        }
    }

    fn pack(&self) -> PackedExperts {
        PackedExperts::new(
            self.e,
            self.d,
            self.h,
            self.act,
            &self.up,
            self.gate.as_deref(),
            &self.down,
            self.up_bias.as_deref(),
            self.down_bias.as_deref(),
        )
    }

    /// The same experts with every weight matrix passed through `f` (biases kept): the values
    /// a reduced-precision copy holds, for the reference.
    fn map_weights(&self, f: impl Fn(&[f32]) -> Vec<f32>) -> Raw {
        Raw {
            e: self.e,
            d: self.d,
            h: self.h,
            act: self.act,
            up: f(&self.up),
            gate: self.gate.as_deref().map(&f),
            down: f(&self.down),
            up_bias: self.up_bias.clone(),
            down_bias: self.down_bias.clone(),
        }
    }

    /// Overwrites every weight and bias of expert `e` with NaN.
    fn poison(&mut self, e: usize) {
        let (d, h) = (self.d, self.h);
        self.up[e * h * d..(e + 1) * h * d].fill(f32::NAN);
        self.down[e * h * d..(e + 1) * h * d].fill(f32::NAN);
        if let Some(g) = &mut self.gate {
            g[e * h * d..(e + 1) * h * d].fill(f32::NAN);
        }
        if let Some(b) = &mut self.up_bias {
            b[e * h..(e + 1) * h].fill(f32::NAN);
        }
        if let Some(b) = &mut self.down_bias {
            b[e * d..(e + 1) * d].fill(f32::NAN);
        }
    }

    fn act64(&self, x: f64) -> f64 {
        match self.act {
            Activation::Gelu => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
            }
            Activation::Silu => x / (1.0 + (-x).exp()),
        }
    }

    /// expert_e(f) exactly as docs/model-format.md writes it, in f64.
    fn expert(&self, e: usize, f: &[f32]) -> Vec<f64> {
        self.down(e, &self.hidden(e, f))
    }

    /// The hidden activations of expert `e` for input row `f`.
    fn hidden(&self, e: usize, f: &[f32]) -> Vec<f64> {
        let (d, h) = (self.d, self.h);
        let dot = |w: &[f32], j: usize| -> f64 {
            (0..d)
                .map(|k| w[(e * h + j) * d + k] as f64 * f[k] as f64)
                .sum()
        };
        (0..h)
            .map(|j| {
                let u =
                    dot(&self.up, j) + self.up_bias.as_ref().map_or(0.0, |b| b[e * h + j] as f64);
                match &self.gate {
                    Some(g) => self.act64(dot(g, j)) * u,
                    None => self.act64(u),
                }
            })
            .collect()
    }

    /// `down_e` applied to `hidden`, plus the down bias.
    fn down(&self, e: usize, hidden: &[f64]) -> Vec<f64> {
        let (d, h) = (self.d, self.h);
        (0..d)
            .map(|n| {
                let s: f64 = (0..h)
                    .map(|j| self.down[(e * d + n) * h + j] as f64 * hidden[j])
                    .sum();
                s + self.down_bias.as_ref().map_or(0.0, |b| b[e * d + n] as f64)
            })
            .collect()
    }

    /// As [`Raw::reference`], with the activations rounded to bf16 where
    /// `KernelVariant::Avx512Bf16` rounds them on bf16 weights: each token row before the first
    /// product, each hidden row (already scaled by its routing weight, in f32) before the second.
    fn reference_bf16_activations(&self, x: &[f32], routing: &Routing) -> Vec<f64> {
        let d = self.d;
        let bf = |v: f32| half::bf16::from_f32(v).to_f32();
        let mut out = vec![0.0f64; x.len()];
        for t in 0..routing.tokens() {
            let f: Vec<f32> = x[t * d..(t + 1) * d].iter().map(|&v| bf(v)).collect();
            for (e, w, kept) in routing.choices(t) {
                if kept {
                    let z: Vec<f64> = self
                        .hidden(e, &f)
                        .iter()
                        .map(|&v| bf(v as f32 * w) as f64)
                        .collect();
                    let mut y = self.down(e, &z);
                    // `down` added the bias once; the kernel scales it by the routing weight.
                    if let Some(b) = &self.down_bias {
                        for (n, yn) in y.iter_mut().enumerate() {
                            *yn += (w as f64 - 1.0) * b[e * d + n] as f64;
                        }
                    }
                    for (o, v) in out[t * d..(t + 1) * d].iter_mut().zip(y) {
                        *o += v;
                    }
                }
            }
        }
        out
    }

    /// Per token, the kept choices of the routing (not the groups, so a grouping bug shows).
    fn reference(&self, x: &[f32], routing: &Routing) -> Vec<f64> {
        let d = self.d;
        let mut out = vec![0.0f64; x.len()];
        for t in 0..routing.tokens() {
            for (e, w, kept) in routing.choices(t) {
                if kept {
                    let y = self.expert(e, &x[t * d..(t + 1) * d]);
                    for (o, v) in out[t * d..(t + 1) * d].iter_mut().zip(y) {
                        *o += w as f64 * v;
                    }
                }
            }
        }
        out
    }
}

/// Random routing with capacity drops, some tokens with no pair at all and expert 0 never used.
fn random_routing(rng: &mut StdRng, tokens: usize, e: usize, policy: RoutingPolicy) -> Routing {
    let logits: Vec<f32> = (0..tokens * e)
        .map(|_| rng.random_range(-3.0f32..3.0))
        .collect();
    let cf = if tokens > 8 { Some(1.0) } else { None };
    let mut r = Routing::default();
    let cf = crate::routing::CapacityFactor::optional(cf).unwrap();
    route(&logits, policy.check(e).unwrap(), cf, &mut r).unwrap();
    for t in 0..tokens {
        let range = r.offsets[t] as usize..r.offsets[t + 1] as usize;
        let no_pair = tokens > 1 && t % 5 == 3;
        for j in range {
            if no_pair || r.experts[j] == 0 {
                r.kept[j] = false;
            }
        }
    }
    r
}

/// The variants that round activations to bf16 when the weights are bf16.
fn rounds_activations(v: KernelVariant) -> bool {
    matches!(v, KernelVariant::Avx512Bf16 | KernelVariant::Amx)
}

fn check(got: &[f32], want: &[f64], what: &str) {
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-3);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= 1e-4 * w.abs().max(scale * 1e-2) + 1e-6 * scale,
            "{what}: element {i}: got {g}, want {w} (err {err:e})"
        );
    }
}

#[test]
fn matches_f64_reference_every_variant_threads_and_shape() {
    let mut rng = StdRng::seed_from_u64(7);
    // Force the threaded paths even for small shapes: T=1 and 7 take the pair split, T=256 the
    // token split.
    let mut scratch = MoeScratch {
        par_min_flops: 0,
        ..MoeScratch::default()
    };
    let acts = [Activation::Gelu, Activation::Silu];
    // (E, d, h, gated, up_bias, down_bias): multiples of the 32-wide panel and ragged sizes.
    let shapes = [
        (8, 64, 32, false, false, false),
        (8, 40, 24, true, true, true),
        (6, 96, 40, false, true, false),
        (16, 33, 64, true, false, true),
    ];
    let policies = [
        RoutingPolicy::threshold(0.9),
        RoutingPolicy::TopK {
            k: 2,
            renormalize: false,
        },
        RoutingPolicy::Dense,
    ];
    let mut runs = 0;
    for (si, &(e, d, h, gated, ub, db)) in shapes.iter().enumerate() {
        let act = acts[si % 2];
        let raw = Raw::random(&mut rng, e, d, h, act, gated, ub, db);
        let packed = raw.pack();
        for &tokens in &[1usize, 7, 256] {
            let policy = policies[(si + tokens) % policies.len()];
            let routing = random_routing(&mut rng, tokens, e, policy);
            let mut groups = ExpertGroups::default();
            groups.build(&routing);
            let x: Vec<f32> = (0..tokens * d)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect();
            let want = raw.reference(&x, &routing);
            for v in KernelVariant::testable() {
                let mut first: Option<Vec<f32>> = None;
                for threads in [1, 2] {
                    let mut out = vec![f32::NAN; tokens * d];
                    moe_forward(&packed, &x, &groups, &mut out, &mut scratch, v, threads);
                    let what = format!("{v:?} threads={threads} T={tokens} shape#{si} {policy}");
                    check(&out, &want, &what);
                    runs += 1;
                    // The fused variants promise the same bits for every thread count.
                    if v != KernelVariant::Gemm {
                        match &first {
                            None => first = Some(out),
                            Some(f) => assert!(
                                f.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits()),
                                "{what}: differs from threads=1"
                            ),
                        }
                    }
                }
            }
        }
    }
    assert!(runs >= 4 * 3 * 2 * 2, "only {runs} runs");
}

#[test]
fn all_variants_agree_with_auto_and_default_thresholds() {
    // Default thresholds: a small pass stays serial, a large one goes parallel.
    let mut rng = StdRng::seed_from_u64(11);
    let raw = Raw::random(&mut rng, 16, 128, 64, Activation::Silu, true, true, true);
    let packed = raw.pack();
    let mut scratch = MoeScratch::default();
    for tokens in [1usize, 300] {
        let routing = random_routing(&mut rng, tokens, 16, RoutingPolicy::threshold(0.7));
        let mut groups = ExpertGroups::default();
        groups.build(&routing);
        let x: Vec<f32> = (0..tokens * 128)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let want = raw.reference(&x, &routing);
        for v in [KernelVariant::Auto]
            .into_iter()
            .chain(KernelVariant::testable())
        {
            let mut out = vec![0.0; x.len()];
            moe_forward(&packed, &x, &groups, &mut out, &mut scratch, v, 2);
            check(&out, &want, &format!("{v:?} T={tokens}"));
        }
    }
}

#[test]
fn only_the_rows_that_chose_an_expert_are_computed() {
    // An expert whose group is empty has NaN weights, and a token with no pair has a NaN input
    // row: one stray row or expert would put a NaN in the output.
    let mut rng = StdRng::seed_from_u64(3);
    let (e, d, h, tokens) = (12, 64, 32, 64);
    let mut raw = Raw::random(&mut rng, e, d, h, Activation::Gelu, false, true, true);
    let routing = random_routing(&mut rng, tokens, e, RoutingPolicy::threshold(0.5));
    let mut groups = ExpertGroups::default();
    groups.build(&routing);
    let mut x: Vec<f32> = (0..tokens * d)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let want = raw.reference(&x, &routing);
    // The same layer packed in bf16 (its own reference: rounded weights, and for the AVX-512
    // BF16 variant rounded activations too), poisoned the same way below.
    let bf16 = |raw: &Raw| rounded(raw, half::bf16::from_f32, half::bf16::to_f32);
    let (ref16, _) = bf16(&raw);
    let want16 = ref16.reference(&x, &routing);
    let want16_rounded = ref16.reference_bf16_activations(&x, &routing);
    let empty: Vec<usize> = (0..e).filter(|&i| groups.rows(i) == 0).collect();
    assert!(empty.contains(&0), "expert 0 must be unused: {empty:?}");
    for &i in &empty {
        raw.poison(i);
    }
    let mut idle_tokens = 0;
    for t in 0..tokens {
        if routing.choices(t).all(|(_, _, kept)| !kept) {
            x[t * d..(t + 1) * d].fill(f32::NAN);
            idle_tokens += 1;
        }
    }
    assert!(idle_tokens > 0);
    let packed = raw.pack();
    let (_, packed16) = bf16(&raw);
    let mut scratch = MoeScratch {
        par_min_flops: 0,
        ..MoeScratch::default()
    };
    for v in KernelVariant::testable() {
        let rounds = rounds_activations(v);
        for (name, layer, want) in [
            ("f32", &packed, &want),
            (
                "bf16",
                &packed16,
                if rounds { &want16_rounded } else { &want16 },
            ),
        ] {
            for threads in [1, 2] {
                let mut out = vec![f32::NAN; x.len()];
                moe_forward(layer, &x, &groups, &mut out, &mut scratch, v, threads);
                assert!(
                    out.iter().all(|v| v.is_finite()),
                    "{name} {v:?}: NaN leaked"
                );
                check(&out, want, &format!("{name} {v:?} threads={threads}"));
                for t in 0..tokens {
                    if routing.choices(t).all(|(_, _, kept)| !kept) {
                        assert!(out[t * d..(t + 1) * d].iter().all(|&v| v == 0.0));
                    }
                }
            }
        }
    }
}

#[test]
fn repeated_runs_are_bit_identical() {
    let mut rng = StdRng::seed_from_u64(5);
    let raw = Raw::random(&mut rng, 8, 64, 32, Activation::Gelu, false, true, false);
    let packed = raw.pack();
    let routing = random_routing(&mut rng, 200, 8, RoutingPolicy::Dense);
    let mut groups = ExpertGroups::default();
    groups.build(&routing);
    let x: Vec<f32> = (0..200 * 64)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let mut scratch = MoeScratch {
        par_min_flops: 0,
        ..MoeScratch::default()
    };
    for v in KernelVariant::testable() {
        let mut a = vec![0.0; x.len()];
        let mut b = vec![1.0; x.len()];
        moe_forward(&packed, &x, &groups, &mut a, &mut scratch, v, 2);
        moe_forward(&packed, &x, &groups, &mut b, &mut scratch, v, 2);
        assert!(
            a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{v:?}"
        );
    }
}

/// The layer on `threads` threads (1: the calling thread alone), every pass large enough to split.
fn split_pass(
    packed: &PackedExperts,
    x: &[f32],
    groups: &ExpertGroups,
    v: KernelVariant,
    threads: usize,
) -> Vec<f32> {
    let mut out = vec![f32::NAN; x.len()];
    let mut scratch = MoeScratch {
        par_min_flops: 0,
        ..MoeScratch::default()
    };
    moe_forward(packed, x, groups, &mut out, &mut scratch, v, threads);
    out
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits())
}

#[test]
fn a_wide_layer_splits_its_pairs_and_gives_the_serial_result_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(33);
    let top = |rng: &mut StdRng, tokens: usize, e: usize, k: usize| {
        let logits: Vec<f32> = (0..tokens * e)
            .map(|_| rng.random_range(-3.0f32..3.0))
            .collect();
        let mut r = Routing::default();
        let cf = crate::routing::CapacityFactor::optional(None).unwrap();
        let policy = RoutingPolicy::TopK {
            k,
            renormalize: false,
        };
        route(&logits, policy.check(e).unwrap(), cf, &mut r).unwrap();
        let mut groups = ExpertGroups::default();
        groups.build(&r);
        groups
    };
    // OLMoE's routing (64 experts, top-8) over 256 tokens: 16 rows per expert and thread on a
    // token split of 2 threads, so the pairs are split; 32 (8 experts, top-2) keeps the token
    // split, and so do pair rows past the byte cap.
    let wide = top(&mut rng, 256, 64, 8);
    assert!(pairs_split_better(&wide, 64, 2));
    assert!(!pairs_split_better(&wide, 64, 1));
    assert!(!pairs_split_better(&wide, 1 << 14, 2));
    assert!(!pairs_split_better(&top(&mut rng, 256, 8, 2), 64, 2));
    let raw = Raw::random(&mut rng, 64, 64, 32, Activation::Silu, true, true, true);
    let packed = raw.pack();
    let x: Vec<f32> = (0..256 * 64)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    for v in KernelVariant::testable() {
        let serial = split_pass(&packed, &x, &wide, v, 1);
        for threads in [2, 3] {
            let out = split_pass(&packed, &x, &wide, v, threads);
            assert!(same_bits(&out, &serial), "{v:?}, {threads} threads");
        }
    }
}

#[test]
fn a_split_from_a_pool_thread_gives_the_serial_result_bit_for_bit_for_one_token_and_for_many() {
    // A decode step (1 token, every expert: the pair split) and a small pass (the token split),
    // called from a pool thread of 2 and of 3 threads (which splits from smaller passes, as the
    // lean decoder does) and from outside the pool, against the calling thread alone.
    let mut rng = StdRng::seed_from_u64(21);
    let raw = Raw::random(&mut rng, 8, 64, 48, Activation::Silu, true, true, true);
    let packed = raw.pack();
    let pools = [2, 3].map(|n| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    });
    for tokens in [1usize, 100] {
        let routing = random_routing(&mut rng, tokens, 8, RoutingPolicy::Dense);
        let mut groups = ExpertGroups::default();
        groups.build(&routing);
        let x: Vec<f32> = (0..tokens * 64)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        for v in KernelVariant::testable() {
            let serial = split_pass(&packed, &x, &groups, v, 1);
            let run = |threads: usize| split_pass(&packed, &x, &groups, v, threads);
            let mut outs = vec![("outside the pool", run(3))];
            for (pool, name) in pools.iter().zip(["a pool of 2", "a pool of 3"]) {
                let threads = pool.current_num_threads();
                outs.push((name, pool.install(|| run(threads))));
            }
            for (name, out) in outs {
                assert!(
                    same_bits(&out, &serial),
                    "{v:?}, {tokens} tokens, from {name}"
                );
            }
        }
    }
}

#[test]
fn activation_matches_engine_scalar() {
    // The SIMD exp-based activations against Activation::apply over a wide range.
    let xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.01).collect();
    for act in [Activation::Gelu, Activation::Silu] {
        let check_isa = |name: &str, got: Vec<f32>| {
            for (&x, &g) in xs.iter().zip(&got) {
                let want = act.apply(x);
                assert!(
                    (g - want).abs() <= 2e-6 * want.abs().max(1.0),
                    "{name} {act:?}({x}) = {g}, want {want}"
                );
            }
        };
        #[cfg(target_arch = "x86_64")]
        {
            let testable = KernelVariant::testable();
            if testable.contains(&KernelVariant::Avx512) {
                // SAFETY: `testable` includes AVX-512 only when `is_supported` found the CPU
                // features `act_avx512` enables.
                check_isa("avx512", unsafe { act_avx512(act, &xs) });
            }
            if testable.contains(&KernelVariant::Avx2) {
                // SAFETY: `testable` includes AVX2 only when `is_supported` found the CPU
                // features `act_avx2` enables.
                check_isa("avx2", unsafe { act_avx2(act, &xs) });
            }
        }
        // SAFETY: `Portable` needs no CPU feature.
        check_isa("portable", unsafe { act_with::<Portable>(act, &xs) });
    }
}

#[inline(always)]
unsafe fn act_with<S: Simd>(act: Activation, xs: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; xs.len()];
    for (o, x) in out.chunks_exact_mut(S::W).zip(xs.chunks_exact(S::W)) {
        // SAFETY: `o` and `x` are chunks of exactly `W` floats; the caller enabled the
        // features `S` needs.
        unsafe { S::store(o.as_mut_ptr(), S::act(act, S::load(x.as_ptr()))) };
    }
    let tail = xs.len() / S::W * S::W;
    for i in tail..xs.len() {
        out[i] = act.apply(xs[i]);
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn act_avx512(act: Activation, xs: &[f32]) -> Vec<f32> {
    // SAFETY: this function enables what `Avx512` uses; its caller checked the CPU has it.
    unsafe { act_with::<Avx512>(act, xs) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn act_avx2(act: Activation, xs: &[f32]) -> Vec<f32> {
    // SAFETY: this function enables what `Avx2` uses; its caller checked the CPU has it.
    unsafe { act_with::<Avx2>(act, xs) }
}

#[test]
fn packing_reports_shapes() {
    let mut rng = StdRng::seed_from_u64(1);
    let raw = Raw::random(&mut rng, 3, 20, 10, Activation::Silu, true, false, false);
    let p = raw.pack();
    assert_eq!((p.n_experts(), p.d_model(), p.hidden()), (3, 20, 10));
    assert!(p.gated());
    assert_eq!(p.flops_per_pair(), 2 * 20 * 10 * 3);
}

/// `raw`'s weights rounded to `T` (biases stay f32), as the stacked `T` values to pack and as
/// f32 values (exactly the rounded ones) for the reference.
fn rounded<T: ExpertWeight>(
    raw: &Raw,
    to: impl Fn(f32) -> T,
    back: impl Fn(T) -> f32,
) -> (Raw, PackedExperts) {
    let half = |v: &[f32]| -> Vec<T> { v.iter().map(|&x| to(x)).collect() };
    let (up, gate, down) = (
        half(&raw.up),
        raw.gate.as_deref().map(half),
        half(&raw.down),
    );
    let reference = raw.map_weights(|v| v.iter().map(|&x| back(to(x))).collect());
    let packed = PackedExperts::new(
        raw.e,
        raw.d,
        raw.h,
        raw.act,
        &up,
        gate.as_deref(),
        &down,
        raw.up_bias.as_deref(),
        raw.down_bias.as_deref(),
    );
    (reference, packed)
}

#[test]
fn half_precision_weights_match_f64_reference_and_the_f32_kernel_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(17);
    let mut scratch = MoeScratch {
        par_min_flops: 0,
        ..MoeScratch::default()
    };
    // Odd d (33, 47) exercises the bf16 pair padding and the odd-k tail; d 96 with biases the
    // AMX tiles (d a multiple of 32) with both token tiles of a block.
    let shapes = [
        (8, 64, 32, false, true, false),
        (8, 33, 40, true, true, true),
        (6, 47, 64, true, false, true),
        (4, 96, 64, true, true, true),
    ];
    let mut runs = 0;
    for (si, &(e, d, h, gated, ub, db)) in shapes.iter().enumerate() {
        let act = [Activation::Gelu, Activation::Silu][si % 2];
        let raw = Raw::random(&mut rng, e, d, h, act, gated, ub, db);
        let f16 = rounded(&raw, half::f16::from_f32, half::f16::to_f32);
        let bf16 = rounded(&raw, half::bf16::from_f32, half::bf16::to_f32);
        for (name, (reference, packed), dtype, bytes) in [
            ("f16", f16, WeightDtype::F16, 2),
            ("bf16", bf16, WeightDtype::Bf16, 2),
        ] {
            assert_eq!(packed.dtype(), dtype);
            assert_eq!(dtype.bytes(), bytes);
            // The same values in f32: the half-precision kernels must give its exact bits.
            let widened = reference.pack();
            // Half the bytes of f32, but for bf16's even row count (d 33 and 47 store 34 and 48).
            let ratio = packed.expert_bytes() as f64 / widened.expert_bytes() as f64;
            assert!(
                (0.5..0.52).contains(&ratio),
                "{name}: {ratio} of the f32 size"
            );
            for &tokens in &[1usize, 7, 256] {
                let policy = RoutingPolicy::threshold(0.8);
                let routing = random_routing(&mut rng, tokens, e, policy);
                let mut groups = ExpertGroups::default();
                groups.build(&routing);
                let x: Vec<f32> = (0..tokens * d)
                    .map(|_| rng.random_range(-1.0f32..1.0))
                    .collect();
                let want = reference.reference(&x, &routing);
                let want_rounded = reference.reference_bf16_activations(&x, &routing);
                for v in KernelVariant::testable() {
                    // bf16 weights on AVX-512 BF16 meet rounded activations, which the f32
                    // kernel on the widened weights does not round.
                    let rounds = rounds_activations(v) && dtype == WeightDtype::Bf16;
                    let mut first: Option<Vec<f32>> = None;
                    for threads in [1, 2] {
                        let what = format!("{name} {v:?} threads={threads} T={tokens} shape#{si}");
                        let mut out = vec![f32::NAN; tokens * d];
                        moe_forward(&packed, &x, &groups, &mut out, &mut scratch, v, threads);
                        check(&out, if rounds { &want_rounded } else { &want }, &what);
                        match &first {
                            None => first = Some(out.clone()),
                            Some(f) => assert!(
                                f.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits())
                                    || v == KernelVariant::Gemm,
                                "{what}: differs from threads=1"
                            ),
                        }
                        let mut same = vec![f32::NAN; tokens * d];
                        moe_forward(&widened, &x, &groups, &mut same, &mut scratch, v, threads);
                        if v != KernelVariant::Gemm && !rounds {
                            assert!(
                                out.iter()
                                    .zip(&same)
                                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                                "{what}: differs from the f32 kernel on the widened weights"
                            );
                        }
                        runs += 1;
                    }
                }
            }
        }
    }
    assert!(runs >= 4 * 2 * 3 * 2 * 2, "only {runs} runs");
}

#[test]
fn experts_packed_one_at_a_time_equal_the_stacked_packing_and_bad_shapes_are_errors() {
    let mut rng = StdRng::seed_from_u64(23);
    let (e, d, h) = (4, 21, 18);
    let raw = Raw::random(&mut rng, e, d, h, Activation::Silu, true, false, false);
    let to =
        |v: &[f32]| -> Vec<half::bf16> { v.iter().map(|&x| half::bf16::from_f32(x)).collect() };
    let (up, gate, down) = (to(&raw.up), to(raw.gate.as_ref().unwrap()), to(&raw.down));
    let stacked = PackedExperts::new(
        e,
        d,
        h,
        raw.act,
        &up,
        Some(gate.as_slice()),
        &down,
        None,
        None,
    );
    let hd = h * d;
    let one = |x: usize| ExpertData {
        up: up[x * hd..(x + 1) * hd].to_vec(),
        gate: Some(gate[x * hd..(x + 1) * hd].to_vec()),
        down: down[x * hd..(x + 1) * hd].to_vec(),
    };
    let each = PackedExperts::from_experts::<_, String>(e, d, h, true, raw.act, None, None, |x| {
        Ok(one(x))
    })
    .unwrap();
    let bits = |p: &PackedExperts| -> (Vec<u16>, Vec<u16>) {
        match p.panels() {
            (PackedWeights::Bf16(a), PackedWeights::Bf16(b)) => (
                a.iter().map(|v| v.to_bits()).collect(),
                b.iter().map(|v| v.to_bits()).collect(),
            ),
            _ => panic!("not bf16"),
        }
    };
    assert_eq!(bits(&stacked), bits(&each));
    // A short `down` and a missing gate are reported with the expert.
    let err = PackedExperts::from_experts::<_, String>(e, d, h, true, raw.act, None, None, |x| {
        let mut w = one(x);
        if x == 2 {
            w.down.pop();
        }
        Ok(w)
    })
    .unwrap_err();
    assert!(
        err.contains("expert 2: down has 377 values, expected 378"),
        "{err}"
    );
    let err = PackedExperts::from_experts::<_, String>(e, d, h, true, raw.act, None, None, |x| {
        Ok(ExpertData {
            gate: None,
            ..one(x)
        })
    })
    .unwrap_err();
    assert!(err.contains("expert 0: gate missing"), "{err}");
}

#[test]
fn bf16_pairs_and_f16_widen_exactly_on_every_simd() {
    // Every bf16 and f16 bit pattern that is a finite number, through each SIMD widening.
    let bf: Vec<u16> = (0..=u16::MAX)
        .filter(|&b| half::bf16::from_bits(b).is_finite())
        .collect();
    let f16: Vec<u16> = (0..=u16::MAX)
        .filter(|&b| half::f16::from_bits(b).is_finite())
        .collect();
    let check_isa = |name: &str, (pairs, halves): (Vec<f32>, Vec<f32>)| {
        for (i, (&got, &b)) in pairs.iter().zip(&bf).enumerate() {
            assert_eq!(
                got.to_bits(),
                half::bf16::from_bits(b).to_f32().to_bits(),
                "{name} bf16 #{i}"
            );
        }
        for (i, (&got, &b)) in halves.iter().zip(&f16).enumerate() {
            assert_eq!(
                got.to_bits(),
                half::f16::from_bits(b).to_f32().to_bits(),
                "{name} f16 #{i}"
            );
        }
        assert!(pairs.len() >= bf.len() / 32 * 32 && halves.len() >= f16.len() / 16 * 16);
    };
    #[cfg(target_arch = "x86_64")]
    {
        let testable = KernelVariant::testable();
        if testable.contains(&KernelVariant::Avx512) {
            // SAFETY: `testable` includes AVX-512 only when `is_supported` found the features.
            check_isa("avx512", unsafe { widen_avx512(&bf, &f16) });
        }
        if testable.contains(&KernelVariant::Avx2) {
            // SAFETY: as above, for AVX2 (with F16C).
            check_isa("avx2", unsafe { widen_avx2(&bf, &f16) });
        }
    }
    // SAFETY: `Portable` needs no CPU feature.
    check_isa("portable", unsafe { widen_with::<Portable>(&bf, &f16) });
}

/// The bf16 values widened in pair order (`load_bf16_pairs` splits each pair; this puts them
/// back in memory order) and the f16 values, over whole registers.
#[inline(always)]
unsafe fn widen_with<S: Simd>(bf: &[u16], f16: &[u16]) -> (Vec<f32>, Vec<f32>) {
    let (mut pairs, mut halves) = (Vec::new(), Vec::new());
    let mut lanes = [0.0f32; 16];
    let mut lanes2 = [0.0f32; 16];
    for c in bf.chunks_exact(2 * S::W) {
        // SAFETY: `c` has `2 W` values; `lanes` hold 16 >= W floats.
        unsafe {
            let (a, b) = S::load_bf16_pairs(c.as_ptr());
            S::store(lanes.as_mut_ptr(), a);
            S::store(lanes2.as_mut_ptr(), b);
        }
        for (&a, &b) in lanes[..S::W].iter().zip(&lanes2[..S::W]) {
            pairs.push(a);
            pairs.push(b);
        }
    }
    for c in f16.chunks_exact(S::W) {
        // SAFETY: `c` has `W` values.
        unsafe { S::store(lanes.as_mut_ptr(), S::load_f16(c.as_ptr())) };
        halves.extend_from_slice(&lanes[..S::W]);
    }
    (pairs, halves)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn widen_avx512(bf: &[u16], f16: &[u16]) -> (Vec<f32>, Vec<f32>) {
    // SAFETY: this function enables what `Avx512` uses; its caller checked the CPU has it.
    unsafe { widen_with::<Avx512>(bf, f16) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen_avx2(bf: &[u16], f16: &[u16]) -> (Vec<f32>, Vec<f32>) {
    // SAFETY: this function enables what `Avx2` uses; its caller checked the CPU has it.
    unsafe { widen_with::<Avx2>(bf, f16) }
}

/// `raw`'s weights in `dtype`, laid out as a checkpoint might hold them and read in place: two
/// sources (gate and up in one, down in the other), every matrix at an odd byte offset and the
/// experts in reverse order, so that neither alignment nor adjacency is assumed. Also returns the
/// reference with the weights rounded to `dtype`.
fn in_place(raw: &Raw, dtype: WeightDtype) -> (Raw, PackedExperts) {
    let round = |v: &[f32]| -> Vec<f32> {
        v.iter()
            .map(|&x| match dtype {
                WeightDtype::F32 => x,
                WeightDtype::F16 => half::f16::from_f32(x).to_f32(),
                WeightDtype::Bf16 => half::bf16::from_f32(x).to_f32(),
            })
            .collect()
    };
    let reference = raw.map_weights(round);
    let push = |buf: &mut Vec<u8>, v: &[f32]| -> usize {
        buf.push(0xA5);
        let at = buf.len();
        dtype.encode(v, buf);
        at
    };
    let hd = raw.h * raw.d;
    let (mut first, mut second) = (Vec::new(), Vec::new());
    let mut experts = vec![None; raw.e];
    for e in (0..raw.e).rev() {
        let r = e * hd..(e + 1) * hd;
        let gate = raw.gate.as_ref().map(|g| RowRef {
            source: 0,
            offset: push(&mut first, &g[r.clone()]),
        });
        let up = RowRef {
            source: 0,
            offset: push(&mut first, &raw.up[r.clone()]),
        };
        let down = RowRef {
            source: 1,
            offset: push(&mut second, &raw.down[r]),
        };
        experts[e] = Some(ExpertRows { gate, up, down });
    }
    let sources: Vec<std::sync::Arc<dyn RowSource>> =
        vec![std::sync::Arc::new(first), std::sync::Arc::new(second)];
    let packed = PackedExperts::from_rows(
        raw.d,
        raw.h,
        raw.gate.is_some(),
        raw.act,
        dtype,
        sources,
        experts.into_iter().map(Option::unwrap).collect(),
        raw.up_bias.as_deref(),
        raw.down_bias.as_deref(),
    )
    .unwrap();
    (reference, packed)
}

#[test]
fn weights_read_in_place_match_f64_reference_every_variant_dtype_and_thread_count() {
    let mut rng = StdRng::seed_from_u64(29);
    let mut scratch = MoeScratch {
        par_min_flops: 0,
        ..MoeScratch::default()
    };
    // Ragged widths: tails of every register width, fewer rows than a tile, more than a chunk;
    // d 96 and h 64 with biases run the AMX tiles.
    let shapes = [
        (8, 64, 32, false, true, false),
        (8, 33, 40, true, true, true),
        (6, 47, 64, true, false, true),
        (5, 9, 3, true, false, false),
        (4, 96, 64, true, true, true),
    ];
    let mut runs = 0;
    for (si, &(e, d, h, gated, ub, db)) in shapes.iter().enumerate() {
        let act = [Activation::Gelu, Activation::Silu][si % 2];
        let raw = Raw::random(&mut rng, e, d, h, act, gated, ub, db);
        for dtype in [WeightDtype::F32, WeightDtype::F16, WeightDtype::Bf16] {
            let (reference, layer) = in_place(&raw, dtype);
            assert!(layer.in_place());
            assert_eq!(layer.dtype(), dtype);
            let per = if gated { 3 } else { 2 };
            assert_eq!(layer.expert_bytes(), per * d * h * dtype.bytes());
            for &tokens in &[1usize, 7, 256] {
                let policy = [
                    RoutingPolicy::threshold(0.8),
                    RoutingPolicy::Dense,
                    RoutingPolicy::TopK {
                        k: 2,
                        renormalize: true,
                    },
                ][(si + tokens) % 3];
                let routing = random_routing(&mut rng, tokens, e, policy);
                let mut groups = ExpertGroups::default();
                groups.build(&routing);
                let x: Vec<f32> = (0..tokens * d)
                    .map(|_| rng.random_range(-1.0f32..1.0))
                    .collect();
                let want = reference.reference(&x, &routing);
                let want_rounded = reference.reference_bf16_activations(&x, &routing);
                for v in KernelVariant::testable() {
                    let rounds = rounds_activations(v) && dtype == WeightDtype::Bf16;
                    let mut first: Option<Vec<f32>> = None;
                    for threads in [1, 2] {
                        let what =
                            format!("{dtype:?} {v:?} threads={threads} T={tokens} shape#{si}");
                        let mut out = vec![f32::NAN; tokens * d];
                        moe_forward(&layer, &x, &groups, &mut out, &mut scratch, v, threads);
                        check(&out, if rounds { &want_rounded } else { &want }, &what);
                        // One FMA chain per output whatever the tile: the same bits for every
                        // thread count (and so for every split of the work).
                        match &first {
                            None => first = Some(out),
                            Some(f) => assert!(
                                f.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits()),
                                "{what}: differs from threads=1"
                            ),
                        }
                        runs += 1;
                    }
                }
            }
        }
    }
    assert!(runs >= 5 * 3 * 3 * 2 * 2, "only {runs} runs");
}

#[test]
fn weights_read_in_place_compute_only_the_chosen_pairs() {
    // As `only_the_rows_that_chose_an_expert_are_computed`, on the row layout: unused experts are
    // NaN in the source, tokens without a pair are NaN rows.
    let mut rng = StdRng::seed_from_u64(31);
    let (e, d, h, tokens) = (12, 64, 32, 64);
    let mut raw = Raw::random(&mut rng, e, d, h, Activation::Silu, true, true, true);
    let routing = random_routing(&mut rng, tokens, e, RoutingPolicy::threshold(0.5));
    let mut groups = ExpertGroups::default();
    groups.build(&routing);
    let mut x: Vec<f32> = (0..tokens * d)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let (reference, _) = in_place(&raw, WeightDtype::Bf16);
    let want = reference.reference(&x, &routing);
    let want_rounded = reference.reference_bf16_activations(&x, &routing);
    for i in (0..e).filter(|&i| groups.rows(i) == 0) {
        raw.poison(i);
    }
    for t in 0..tokens {
        if routing.choices(t).all(|(_, _, kept)| !kept) {
            x[t * d..(t + 1) * d].fill(f32::NAN);
        }
    }
    let (_, layer) = in_place(&raw, WeightDtype::Bf16);
    let mut scratch = MoeScratch {
        par_min_flops: 0,
        ..MoeScratch::default()
    };
    for v in KernelVariant::testable() {
        for threads in [1, 2] {
            let mut out = vec![f32::NAN; x.len()];
            moe_forward(&layer, &x, &groups, &mut out, &mut scratch, v, threads);
            assert!(out.iter().all(|v| v.is_finite()), "{v:?}: NaN leaked");
            let rounds = rounds_activations(v);
            let want = if rounds { &want_rounded } else { &want };
            check(&out, want, &format!("{v:?} threads={threads}"));
        }
    }
}

#[test]
fn weights_read_in_place_refuse_matrices_outside_their_source() {
    let src =
        || -> Vec<std::sync::Arc<dyn RowSource>> { vec![std::sync::Arc::new(vec![0u8; 100])] };
    let at = |offset| RowRef { source: 0, offset };
    // [h, d] = [4, 6] bf16 = 48 bytes per matrix.
    let ok = ExpertRows {
        gate: Some(at(0)),
        up: at(48),
        down: at(52),
    };
    let build = |x: ExpertRows, gated: bool| {
        PackedExperts::from_rows(
            6,
            4,
            gated,
            Activation::Silu,
            WeightDtype::Bf16,
            src(),
            vec![x],
            None,
            None,
        )
    };
    assert_eq!(build(ok, true).unwrap().bytes(), 3 * 48);
    let err = build(ExpertRows { down: at(53), ..ok }, true).unwrap_err();
    assert!(
        err.contains("expert 0: down at byte 53 needs 48 bytes, the source has 100"),
        "{err}"
    );
    let err = build(
        ExpertRows {
            up: at(usize::MAX - 10),
            ..ok
        },
        true,
    )
    .unwrap_err();
    assert!(err.contains("expert 0: up at byte"), "{err}");
    let err = build(
        ExpertRows {
            gate: Some(RowRef {
                source: 3,
                offset: 0,
            }),
            ..ok
        },
        true,
    )
    .unwrap_err();
    assert!(err.contains("expert 0: gate names source 3, of 1"), "{err}");
    let err = build(ExpertRows { gate: None, ..ok }, true).unwrap_err();
    assert!(err.contains("expert 0: gate missing"), "{err}");
    let err = build(ok, false).unwrap_err();
    assert!(err.contains("a gate for non-gated experts"), "{err}");
}

#[test]
fn dense_products_in_place_match_f64_reference_every_variant_dtype_and_thread_count() {
    let mut rng = StdRng::seed_from_u64(41);
    // Odd sizes: partial tiles of activation rows and weight rows, a `k` with a tail after whole
    // registers, more threads than some products have rows.
    for (m, k, n) in [(1, 7, 3), (5, 40, 11), (9, 130, 37), (16, 64, 2)] {
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let wb: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let wh: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
        let reference = |wf: &dyn Fn(usize) -> f64| -> Vec<f64> {
            (0..m * n)
                .map(|i| {
                    let (r, j) = (i / n, i % n);
                    (0..k).map(|t| x[r * k + t] as f64 * wf(j * k + t)).sum()
                })
                .collect()
        };
        let want_f32 = reference(&|i| w[i] as f64);
        let want_bf16 = reference(&|i| wb[i].to_f64());
        let want_f16 = reference(&|i| wh[i].to_f64());
        for variant in KernelVariant::testable() {
            let mut first: [Option<Vec<f32>>; 3] = Default::default();
            for threads in [1, 2, 3] {
                let mut y = vec![f32::NAN; m * n];
                super::dense_rows(variant, &x, m, k, &w, n, &mut y, threads);
                let what = format!("{m}x{k}x{n} f32 {} {threads}t", variant.name());
                check(&y, &want_f32, &what);
                let mut yb = vec![f32::NAN; m * n];
                super::dense_rows(variant, &x, m, k, &wb, n, &mut yb, threads);
                check(&yb, &want_bf16, &what.replace("f32", "bf16"));
                let mut yh = vec![f32::NAN; m * n];
                super::dense_rows(variant, &x, m, k, &wh, n, &mut yh, threads);
                check(&yh, &want_f16, &what.replace("f32", "f16"));
                for (f, got) in first.iter_mut().zip([y, yb, yh]) {
                    match f {
                        Some(f) => assert!(
                            f.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{m}x{k}x{n} {}: {threads} threads differ from 1",
                            variant.name()
                        ),
                        None => *f = Some(got),
                    }
                }
            }
        }
    }
}

#[test]
fn an_expert_with_more_rows_than_one_chunk_matches_the_reference_on_every_thread_count() {
    // 600 tokens on 2 experts, every token on both: 600 rows per expert, more than the AMX
    // in-place kernel takes in one chunk (at most 8 blocks of 32), with a partial last block.
    let mut rng = StdRng::seed_from_u64(43);
    let (e, d, h, tokens) = (2, 64, 32, 600);
    let raw = Raw::random(&mut rng, e, d, h, Activation::Silu, true, true, true);
    let logits: Vec<f32> = (0..tokens * e)
        .map(|_| rng.random_range(-3.0f32..3.0))
        .collect();
    let mut routing = Routing::default();
    let no_capacity = crate::routing::CapacityFactor::optional(None).unwrap();
    let dense = RoutingPolicy::Dense.check(e).unwrap();
    route(&logits, dense, no_capacity, &mut routing).unwrap();
    let mut groups = ExpertGroups::default();
    groups.build(&routing);
    assert!(
        (0..e).all(|i| groups.rows(i) == tokens),
        "rows {:?}",
        groups.offsets
    );
    let x: Vec<f32> = (0..tokens * d)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let (reference, layer) = in_place(&raw, WeightDtype::Bf16);
    let want = reference.reference(&x, &routing);
    let want_rounded = reference.reference_bf16_activations(&x, &routing);
    let mut scratch = MoeScratch {
        par_min_flops: 0,
        ..MoeScratch::default()
    };
    for v in KernelVariant::testable() {
        let mut first: Option<Vec<f32>> = None;
        for threads in [1, 2, 3] {
            let mut out = vec![f32::NAN; tokens * d];
            moe_forward(&layer, &x, &groups, &mut out, &mut scratch, v, threads);
            let rounds = rounds_activations(v);
            check(
                &out,
                if rounds { &want_rounded } else { &want },
                &format!("{v:?} {threads}t"),
            );
            match &first {
                None => first = Some(out),
                Some(f) => assert!(same_bits(f, &out), "{v:?}: {threads} threads differ from 1"),
            }
        }
    }
}
