//! The trainer of the embedded model: a byte-level XMoE language model trained with threshold
//! routing and the Switch-style top-1 load-balancing loss (see `docs/embedded-model.md`).
//!
//! Training computes every expert densely and multiplies by the detached threshold mask and the
//! raw router probabilities, which is the same function as sparse execution (see [`model`]).

pub mod gelu;
pub mod mask;
pub mod model;
pub mod save;

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::model::config::ModelConfig;
use crate::routing::RoutingPolicy;
use model::{ParamGroup, TrainModel};

/// Command-line options of `xmoe-top train`. The defaults reproduce the shipped model.
#[derive(clap::Args, Clone, Debug)]
pub struct TrainArgs {
    /// Training text (bytes).
    #[arg(long, default_value = "assets/kjv-train.txt")]
    pub train_text: PathBuf,
    /// Held-out text (bytes), for evaluation only.
    #[arg(long, default_value = "assets/kjv-heldout.txt")]
    pub heldout_text: PathBuf,
    /// Output model file.
    #[arg(long, default_value = "assets/xmoe-kjv.safetensors")]
    pub out: PathBuf,
    /// Loss-curve CSV.
    #[arg(long, default_value = "docs/train-loss.csv")]
    pub csv: PathBuf,
    /// Model name written into the configuration.
    #[arg(long, default_value = "xmoe-kjv")]
    pub name: String,
    /// Optimiser steps.
    #[arg(long, default_value_t = 2500)]
    pub steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Training sequence length (<= max_seq_len).
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// Final learning rate as a fraction of the peak (cosine decay).
    #[arg(long, default_value_t = 0.1)]
    pub min_lr_frac: f64,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 100)]
    pub warmup: usize,
    /// AdamW weight decay of the weight matrices.
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    /// Learning-rate multiplier of the router weights.
    #[arg(long, default_value_t = 3.0)]
    pub router_lr_mult: f64,
    /// Standard deviation of the router weights at initialisation.
    #[arg(long, default_value_t = 0.1)]
    pub router_std: f32,
    /// Standard deviation of the q, k, v and expert up projections at initialisation (output
    /// projections divided by sqrt(2 * layers), position embeddings by 2).
    #[arg(long, default_value_t = 0.02)]
    pub init_std: f32,
    /// Coefficient of the top-1 load-balancing loss (summed over MoE blocks).
    #[arg(long, default_value_t = 0.01)]
    pub aux_coef: f64,
    /// Coefficient of a router-entropy penalty (mean per-token entropy summed over MoE blocks);
    /// 0 (the paper's recipe) disables it.
    #[arg(long, default_value_t = 0.0)]
    pub router_entropy: f64,
    /// Routing threshold used in training.
    #[arg(long, default_value_t = 0.9)]
    pub threshold: f32,
    /// Global gradient-norm clip (0 disables).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// Random seed (initialisation and batch sampling).
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// Residual width.
    #[arg(long, default_value_t = 128)]
    pub d_model: usize,
    /// Transformer blocks (all MoE).
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// Longest context of the saved model (learned position table size).
    #[arg(long, default_value_t = 256)]
    pub max_seq_len: usize,
    /// Experts per MoE block.
    #[arg(long, default_value_t = 16)]
    pub experts: usize,
    /// Hidden width of one expert.
    #[arg(long, default_value_t = 64)]
    pub expert_hidden: usize,
    /// Reference dense FFN width (split ratio = dense_hidden / expert_hidden).
    #[arg(long, default_value_t = 512)]
    pub dense_hidden: usize,
    /// Print progress every this many steps.
    #[arg(long, default_value_t = 10)]
    pub log_every: usize,
    /// Evaluate on held-out text every this many steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    pub eval_every: usize,
    /// Held-out windows of `seq` bytes used by the periodic evaluation.
    #[arg(long, default_value_t = 16)]
    pub eval_windows: usize,
}

impl TrainArgs {
    /// Refuses option values outside their sensible ranges, before any work (the model's shape
    /// is checked by its configuration's `validate`).
    pub fn check(&self) -> anyhow::Result<()> {
        let within = |name: &str, v: f64, lo: f64, hi: f64| {
            anyhow::ensure!(
                v.is_finite() && (lo..=hi).contains(&v),
                "--{name} must be in [{lo}, {hi}], found {v}"
            );
            Ok(())
        };
        within("steps", self.steps as f64, 1.0, 1e7)?;
        within("batch", self.batch as f64, 1.0, 4096.0)?;
        within("seq", self.seq as f64, 1.0, 65536.0)?;
        within("warmup", self.warmup as f64, 0.0, self.steps as f64)?;
        within("lr", self.lr, 1e-9, 1.0)?;
        within("min-lr-frac", self.min_lr_frac, 0.0, 1.0)?;
        within("weight-decay", self.weight_decay, 0.0, 1.0)?;
        within("router-lr-mult", self.router_lr_mult, 0.0, 1e3)?;
        within("router-std", f64::from(self.router_std), 0.0, 10.0)?;
        within("init-std", f64::from(self.init_std), 1e-6, 10.0)?;
        within("aux-coef", self.aux_coef, 0.0, 1e3)?;
        within("router-entropy", self.router_entropy, 0.0, 1e3)?;
        within("threshold", f64::from(self.threshold), 1e-6, 1.0)?;
        within("clip", self.clip, 1e-6, 1e6)?;
        within("eval-windows", self.eval_windows as f64, 1.0, 1e5)?;
        Ok(())
    }

    /// The model configuration these options describe.
    pub fn model_config(&self) -> ModelConfig {
        ModelConfig {
            name: self.name.clone(),
            default_policy: RoutingPolicy::threshold(self.threshold),
            ..ModelConfig::byte_level(
                self.d_model,
                self.layers,
                self.heads,
                self.max_seq_len,
                self.experts,
                self.expert_hidden,
                self.dense_hidden,
            )
        }
    }
}

/// Keeps freed memory in the process instead of returning it to the kernel after every step:
/// training allocates and frees tensors of tens of MiB per step, and with glibc's defaults each is
/// a fresh `mmap` whose page faults cost about a third as much time as the arithmetic.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_TOP_PAD: i32 = -2;
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only changes allocator tuning parameters; called before any training
        // allocation, from one thread.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_TRIM_THRESHOLD, 1 << 30);
            mallopt(M_TOP_PAD, 64 << 20);
        }
    }
}

/// Learning rate at `step` (0-based): linear warm-up, then cosine decay to `min_lr_frac * lr`.
pub fn lr_at(args: &TrainArgs, step: usize) -> f64 {
    if step < args.warmup {
        return args.lr * (step + 1) as f64 / args.warmup as f64;
    }
    let span = (args.steps - args.warmup).max(1) as f64;
    let x = ((step - args.warmup) as f64 / span).min(1.0);
    let cos = 0.5 * (1.0 + (std::f64::consts::PI * x).cos());
    args.lr * (args.min_lr_frac + (1.0 - args.min_lr_frac) * cos)
}

/// Held-out quality of the model under its current routing.
#[derive(Clone, Copy, Debug)]
pub struct EvalResult {
    /// Bits per byte of the next-byte prediction.
    pub bpb: f64,
    /// Selected experts per token, averaged over MoE blocks.
    pub experts_per_token: f64,
}

/// Evaluates `windows` evenly spaced windows of `seq + 1` bytes of `text`.
pub fn evaluate(
    model: &TrainModel,
    text: &[u8],
    seq: usize,
    windows: usize,
    dev: &Device,
) -> anyhow::Result<EvalResult> {
    anyhow::ensure!(
        text.len() > seq + 1,
        "held-out text shorter than one window"
    );
    let stride = ((text.len() - seq - 1) / windows.max(1)).max(1);
    let starts: Vec<usize> = (0..windows)
        .map(|i| (i * stride).min(text.len() - seq - 1))
        .collect();
    let (mut nll, mut count, mut pairs, mut routed) = (0.0f64, 0usize, 0usize, 0usize);
    for chunk in starts.chunks(16) {
        let (x, y) = make_batch(text, chunk, seq, dev)?;
        let out = model.forward(&x)?;
        let loss = candle_nn::loss::cross_entropy(&out.logits, &y)?.to_scalar::<f32>()?;
        nll += loss as f64 * (chunk.len() * seq) as f64;
        count += chunk.len() * seq;
        for l in &out.layers {
            pairs += l.pairs;
            routed += l.tokens;
        }
    }
    Ok(EvalResult {
        bpb: nll / count as f64 / std::f64::consts::LN_2,
        experts_per_token: pairs as f64 / routed.max(1) as f64,
    })
}

fn make_batch(
    text: &[u8],
    starts: &[usize],
    seq: usize,
    dev: &Device,
) -> anyhow::Result<(Tensor, Tensor)> {
    let mut xs = Vec::with_capacity(starts.len() * seq);
    let mut ys = Vec::with_capacity(starts.len() * seq);
    for &s in starts {
        xs.extend(text[s..s + seq].iter().map(|&b| b as u32));
        ys.extend(text[s + 1..s + seq + 1].iter().map(|&b| b as u32));
    }
    Ok((
        Tensor::from_vec(xs, (starts.len(), seq), dev)?,
        Tensor::from_vec(ys, starts.len() * seq, dev)?,
    ))
}

/// Trains the model described by `args`, writes the loss curve and saves the model file.
pub fn run(args: &TrainArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    tune_allocator();
    let dev = Device::Cpu;
    args.check()?;
    let cfg = args.model_config();
    cfg.validate()?;
    anyhow::ensure!(args.seq <= cfg.max_seq_len, "--seq exceeds --max-seq-len");
    let train = std::fs::read(&args.train_text)
        .with_context(|| format!("reading {}", args.train_text.display()))?;
    let heldout = std::fs::read(&args.heldout_text)
        .with_context(|| format!("reading {}", args.heldout_text.display()))?;
    anyhow::ensure!(train.len() > args.seq + 1, "training text too short");

    let mut model = TrainModel::new(
        &cfg,
        args.threshold,
        args.seed,
        args.router_std,
        args.init_std,
        &dev,
    )?;
    eprintln!(
        "model {}: {} params, d={} layers={} heads={} E={} h={} (split ratio {}), seq {} batch {}; train {} bytes, held-out {} bytes; threshold {}, RAYON_NUM_THREADS={}",
        cfg.name,
        model.n_params(),
        cfg.d_model,
        cfg.n_layers,
        cfg.n_heads,
        cfg.n_experts,
        cfg.expert_hidden,
        cfg.split_ratio(),
        args.seq,
        args.batch,
        train.len(),
        heldout.len(),
        args.threshold,
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into()),
    );

    let group = |g: ParamGroup| {
        model
            .params()
            .iter()
            .filter(|p| p.group == g)
            .map(|p| p.var.clone())
            .collect::<Vec<_>>()
    };
    let adam = |wd: f64| ParamsAdamW {
        lr: args.lr,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: wd,
    };
    let mut opt_matrix = AdamW::new(group(ParamGroup::Matrix), adam(args.weight_decay))?;
    let mut opt_nodecay = AdamW::new(group(ParamGroup::NoDecay), adam(0.0))?;
    let mut opt_router = AdamW::new(group(ParamGroup::Router), adam(0.0))?;
    let all_vars: Vec<_> = model.params().iter().map(|p| p.var.clone()).collect();

    if let Some(dir) = args.csv.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    let mut csv = std::io::BufWriter::new(
        std::fs::File::create(&args.csv)
            .with_context(|| format!("creating {}", args.csv.display()))?,
    );
    writeln!(
        csv,
        "step,lr,loss,bpb,aux_loss,experts_per_token,tokens_per_s,elapsed_s,heldout_bpb,heldout_experts_per_token,heldout_bpb_dense"
    )?;

    let mut rng = StdRng::seed_from_u64(args.seed ^ 0x5eed_da7a);
    let mut window = Instant::now();
    let mut window_tokens = 0usize;
    let (mut acc_loss, mut acc_aux, mut acc_ent, mut acc_pairs, mut acc_routed, mut acc_n) =
        (0.0f64, 0.0f64, 0.0f64, 0usize, 0usize, 0usize);
    let mut layer_pairs = vec![0usize; cfg.n_layers];
    for step in 0..args.steps {
        let lr = lr_at(args, step);
        opt_matrix.set_learning_rate(lr);
        opt_nodecay.set_learning_rate(lr);
        opt_router.set_learning_rate(lr * args.router_lr_mult);

        let starts: Vec<usize> = (0..args.batch)
            .map(|_| rng.random_range(0..train.len() - args.seq - 1))
            .collect();
        let (x, y) = make_batch(&train, &starts, args.seq, &dev)?;
        let out = model.forward(&x)?;
        let ce = candle_nn::loss::cross_entropy(&out.logits, &y)?;
        let mut loss = (&ce + (&out.aux_loss * args.aux_coef)?)?;
        if args.router_entropy > 0.0 {
            loss = (loss + (&out.router_entropy * args.router_entropy)?)?;
        }
        let mut grads = loss.backward()?;
        if args.clip > 0.0 {
            let mut sq = 0.0f64;
            for v in &all_vars {
                if let Some(g) = grads.get(v) {
                    sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
                }
            }
            let norm = sq.sqrt();
            if norm > args.clip {
                let s = args.clip / norm;
                for v in &all_vars {
                    if let Some(g) = grads.get(v) {
                        let g = (g * s)?;
                        grads.insert(v, g);
                    }
                }
            }
        }
        opt_matrix.step(&grads)?;
        opt_nodecay.step(&grads)?;
        opt_router.step(&grads)?;

        acc_loss += ce.to_scalar::<f32>()? as f64;
        acc_aux += out.aux_loss.to_scalar::<f32>()? as f64;
        acc_ent += out.router_entropy.to_scalar::<f32>()? as f64;
        for (i, l) in out.layers.iter().enumerate() {
            acc_pairs += l.pairs;
            acc_routed += l.tokens;
            layer_pairs[i] += l.pairs;
        }
        acc_n += 1;
        window_tokens += args.batch * args.seq;

        let last = step + 1 == args.steps;
        let do_log = (step + 1) % args.log_every.max(1) == 0 || last;
        let do_eval = last || (args.eval_every > 0 && (step + 1) % args.eval_every == 0);
        if do_log || do_eval {
            let tps = window_tokens as f64 / window.elapsed().as_secs_f64();
            let mean_loss = acc_loss / acc_n as f64;
            let ept = acc_pairs as f64 / acc_routed.max(1) as f64;
            let per_layer: Vec<String> = layer_pairs
                .iter()
                .map(|&p| format!("{:.1}", p as f64 * cfg.n_layers as f64 / acc_routed as f64))
                .collect();
            let mut eval_cols = String::from(",,");
            let mut eval_msg = String::new();
            if do_eval {
                let windows = if last {
                    args.eval_windows * 4
                } else {
                    args.eval_windows
                };
                let ev = evaluate(&model, &heldout, args.seq, windows, &dev)?;
                model.set_policy(RoutingPolicy::Dense)?;
                let dense = evaluate(&model, &heldout, args.seq, windows, &dev);
                model.set_policy(RoutingPolicy::threshold(args.threshold))?;
                let dense = dense?;
                eval_cols = format!("{:.4},{:.3},{:.4}", ev.bpb, ev.experts_per_token, dense.bpb);
                eval_msg = format!(
                    " | held-out bpb {:.4} ({:.2} experts/token), dense {:.4}",
                    ev.bpb, ev.experts_per_token, dense.bpb
                );
                if !last {
                    // A checkpoint, so that an interrupted run still leaves a usable model.
                    save::save_safetensors(&model, &args.out)?;
                }
            }
            let elapsed = started.elapsed().as_secs_f64();
            eprintln!(
                "step {:5}/{} lr {:.2e} loss {:.4} bpb {:.4} aux {:.3} H {:.2} experts/token {:.2} [{}] tok/s {:.0} elapsed {:.0}s{}",
                step + 1,
                args.steps,
                lr,
                mean_loss,
                mean_loss / std::f64::consts::LN_2,
                acc_aux / acc_n as f64,
                acc_ent / (acc_n * cfg.n_layers) as f64,
                ept,
                per_layer.join(" "),
                tps,
                elapsed,
                eval_msg
            );
            writeln!(
                csv,
                "{},{:.6e},{:.5},{:.5},{:.4},{:.3},{:.0},{:.1},{}",
                step + 1,
                lr,
                mean_loss,
                mean_loss / std::f64::consts::LN_2,
                acc_aux / acc_n as f64,
                ept,
                tps,
                elapsed,
                eval_cols
            )?;
            csv.flush()?;
            (acc_loss, acc_aux, acc_ent, acc_pairs, acc_routed, acc_n) = (0.0, 0.0, 0.0, 0, 0, 0);
            layer_pairs.fill(0);
            window = Instant::now();
            window_tokens = 0;
        }
    }

    save::save_safetensors(&model, &args.out)?;
    let back = save::check_saved(&args.out)?;
    anyhow::ensure!(
        back.config() == &cfg,
        "saved configuration differs from the trained one"
    );
    let size = std::fs::metadata(&args.out)?.len();
    eprintln!(
        "saved {} ({:.2} MiB, verified); total wall time {:.1} min",
        args.out.display(),
        size as f64 / (1024.0 * 1024.0),
        started.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}

/// Command-line options of `xmoe-top train-eval`: held-out quality of a trained model under
/// several routing policies, computed with the trainer's forward pass (all experts computed,
/// masked; the same function as sparse execution, but its speed says nothing about the engine's).
#[derive(clap::Args, Clone, Debug)]
pub struct EvalArgs {
    /// Model file.
    #[arg(long, default_value = "assets/xmoe-kjv.safetensors")]
    pub model: PathBuf,
    /// Held-out text.
    #[arg(long, default_value = "assets/kjv-heldout.txt")]
    pub heldout_text: PathBuf,
    /// Window length in bytes (<= max_seq_len).
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// Evenly spaced held-out windows to evaluate.
    #[arg(long, default_value_t = 64)]
    pub windows: usize,
}

/// Prints a markdown table: policy, held-out bits per byte, experts per token, MoE FLOPs as a
/// fraction of all experts.
pub fn run_eval(args: &EvalArgs) -> anyhow::Result<()> {
    tune_allocator();
    let dev = Device::Cpu;
    let mut model = TrainModel::from_file(&args.model, &dev)?;
    let cfg = model.config().clone();
    let heldout = std::fs::read(&args.heldout_text)
        .with_context(|| format!("reading {}", args.heldout_text.display()))?;
    let flops = crate::profiling::flops::FlopModel::new(&cfg);
    let mut policies: Vec<RoutingPolicy> = [0.5f32, 0.7, 0.8, 0.9, 0.95, 0.99]
        .iter()
        .map(|&t| RoutingPolicy::threshold(t))
        .collect();
    policies.push(RoutingPolicy::Dense);
    let mut ks = vec![1, 2, cfg.split_ratio()];
    ks.dedup();
    for k in ks {
        policies.push(RoutingPolicy::TopK {
            k,
            renormalize: false,
        });
    }
    println!(
        "held-out: {} windows of {} bytes from {}\n",
        args.windows,
        args.seq,
        args.heldout_text.display()
    );
    println!("| policy | bits/byte | experts/token | MoE FLOPs / all experts |");
    println!("|---|---|---|---|");
    for p in policies {
        model.set_policy(p)?;
        let ev = evaluate(&model, &heldout, args.seq, args.windows, &dev)?;
        // FLOPs are linear in the number of experts, so the mean count gives the mean FLOPs.
        let frac = (flops.router() as f64 + ev.experts_per_token * flops.expert() as f64)
            / flops.moe_layer_all_experts() as f64;
        println!(
            "| {p} | {:.4} | {:.2} | {:.3} |",
            ev.bpb, ev.experts_per_token, frac
        );
    }
    Ok(())
}
