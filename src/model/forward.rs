//! The forward pass: a decoder-only LM whose dense parts run through candle (CPU or CUDA) and
//! whose MoE layers compute only the selected (token, expert) pairs.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};

use super::config::{Activation, ModelConfig, NormKind, PositionKind};
use super::format::{LoadError, ModelFile};
use super::moe::{LoadOptions, MoeExperts};
use crate::profiling::trace::ForwardTrace;
use crate::routing::{RoutingPolicy, route};

/// The routing in force: one policy per MoE layer and an optional capacity factor.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingConfig {
    /// One policy per MoE layer, in block order.
    pub policies: Vec<RoutingPolicy>,
    /// Optional capacity factor applied to every MoE layer.
    pub capacity_factor: Option<f32>,
}

impl RoutingConfig {
    /// The same policy on every one of `n_moe` layers.
    pub fn uniform(policy: RoutingPolicy, n_moe: usize) -> Self {
        Self {
            policies: vec![policy; n_moe],
            capacity_factor: None,
        }
    }
}

struct Linear {
    /// [in, out], contiguous, so that `x @ w_t` needs no transposed-stride matmul.
    w_t: Tensor,
    b: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = x.matmul(&self.w_t)?;
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

struct Norm {
    w: Tensor,
    b: Option<Tensor>,
    eps: f32,
}

impl Norm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.b {
            Some(b) => candle_nn::ops::layer_norm(x, &self.w, b, self.eps),
            None => candle_nn::ops::rms_norm(x, &self.w, self.eps),
        }
    }
}

struct DenseFfn {
    up: Linear,
    gate: Option<Linear>,
    down: Linear,
}

enum Ffn {
    Dense(DenseFfn),
    Moe {
        /// Router weight transposed, [d, E].
        router_t: Tensor,
        experts: Box<MoeExperts>,
        /// Index of this layer among the MoE layers.
        slot: usize,
    },
}

struct Block {
    attn_norm: Norm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: Norm,
    ffn: Ffn,
}

/// Keys and values of past positions, for autoregressive decoding.
pub struct KvCache {
    k: Vec<Option<Tensor>>,
    v: Vec<Option<Tensor>>,
    len: usize,
    batch: usize,
}

impl KvCache {
    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position.
    pub fn clear(&mut self) {
        self.k.iter_mut().for_each(|k| *k = None);
        self.v.iter_mut().for_each(|v| *v = None);
        self.len = 0;
    }
}

/// Parameter counts of a model.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ParamCounts {
    /// Every parameter.
    pub total: usize,
    /// Embeddings (token and position) and, when untied, the LM head.
    pub embeddings: usize,
    /// One expert.
    pub per_expert: usize,
    /// Parameters of each block.
    pub per_layer: Vec<usize>,
    /// Parameters in MoE experts across the model.
    pub experts_total: usize,
}

/// A loaded model, ready to run.
pub struct Model {
    config: ModelConfig,
    device: Device,
    tok_emb: Tensor,
    pos_emb: Option<Tensor>,
    rope: Option<(Tensor, Tensor)>,
    blocks: Vec<Block>,
    norm_f: Norm,
    lm_head_t: Tensor,
    moe_layers: Vec<usize>,
    warnings: Vec<String>,
    source: String,
    file_bytes: usize,
}

fn dev_err(file: &ModelFile) -> impl Fn(candle_core::Error) -> LoadError + '_ {
    move |e| LoadError::Device {
        path: file.path().to_path_buf(),
        detail: e.to_string(),
    }
}

impl Model {
    /// Opens, checks and loads a model file onto `device` with default options.
    pub fn load(path: &std::path::Path, device: &Device) -> Result<Self, LoadError> {
        let file = ModelFile::open(path)?;
        Self::from_file(&file, device, LoadOptions::default())
    }

    /// Loads an already checked file onto `device`.
    pub fn from_file(
        file: &ModelFile,
        device: &Device,
        options: LoadOptions,
    ) -> Result<Self, LoadError> {
        let cfg = file.config().clone();
        let de = dev_err(file);
        let t = |name: &str, shape: &[usize]| -> Result<Tensor, LoadError> {
            Tensor::from_vec(file.f32(name), shape, device).map_err(&de)
        };
        let (d, v) = (cfg.d_model, cfg.vocab_size);
        let linear =
            |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear, LoadError> {
                let w = t(&format!("{name}.weight"), &[out, inp])?;
                Ok(Linear {
                    w_t: w.t().and_then(|w| w.contiguous()).map_err(&de)?,
                    b: if bias {
                        Some(t(&format!("{name}.bias"), &[out])?)
                    } else {
                        None
                    },
                })
            };
        let norm = |prefix: &str| -> Result<Norm, LoadError> {
            Ok(Norm {
                w: t(&format!("{prefix}.weight"), &[d])?,
                b: if cfg.norm == NormKind::LayerNorm {
                    Some(t(&format!("{prefix}.bias"), &[d])?)
                } else {
                    None
                },
                eps: cfg.norm_eps as f32,
            })
        };
        let tok_emb = t("tok_embeddings.weight", &[v, d])?;
        let pos_emb = if cfg.positions == PositionKind::Learned {
            Some(t("pos_embeddings.weight", &[cfg.max_seq_len, d])?)
        } else {
            None
        };
        let rope = if cfg.positions == PositionKind::Rotary {
            Some(rope_tables(&cfg, device).map_err(&de)?)
        } else {
            None
        };
        let moe_layers = cfg.moe_layer_indices();
        let block = |i: usize| -> Result<Block, LoadError> {
            let p = format!("layers.{i}");
            let ffn = if let Some(slot) = moe_layers.iter().position(|&l| l == i) {
                let router = t(&format!("{p}.moe.router.weight"), &[cfg.n_experts, d])?;
                Ffn::Moe {
                    router_t: router.t().and_then(|r| r.contiguous()).map_err(&de)?,
                    experts: Box::new(MoeExperts::load(file, i, device, options)?),
                    slot,
                }
            } else {
                let h = cfg.dense_ffn_hidden;
                Ffn::Dense(DenseFfn {
                    up: linear(&format!("{p}.ffn.up_proj"), h, d, cfg.ffn_bias)?,
                    gate: if cfg.gated {
                        Some(linear(&format!("{p}.ffn.gate_proj"), h, d, cfg.ffn_bias)?)
                    } else {
                        None
                    },
                    down: linear(&format!("{p}.ffn.down_proj"), d, h, cfg.ffn_bias)?,
                })
            };
            Ok(Block {
                attn_norm: norm(&format!("{p}.attn_norm"))?,
                q: linear(&format!("{p}.attn.q_proj"), d, d, cfg.attn_bias)?,
                k: linear(&format!("{p}.attn.k_proj"), d, d, cfg.attn_bias)?,
                v: linear(&format!("{p}.attn.v_proj"), d, d, cfg.attn_bias)?,
                o: linear(&format!("{p}.attn.o_proj"), d, d, cfg.attn_bias)?,
                ffn_norm: norm(&format!("{p}.ffn_norm"))?,
                ffn,
            })
        };
        // Converting and packing the weights is most of the load time: on the CPU, layers load on
        // all cores. (GPU uploads stay on one thread.)
        let blocks = if device.is_cpu() {
            use rayon::prelude::*;
            (0..cfg.n_layers)
                .into_par_iter()
                .map(block)
                .collect::<Result<Vec<_>, _>>()?
        } else {
            (0..cfg.n_layers)
                .map(block)
                .collect::<Result<Vec<_>, _>>()?
        };
        let head = if cfg.tie_embeddings {
            tok_emb.clone()
        } else {
            t("lm_head.weight", &[v, d])?
        };
        let lm_head_t = head.t().and_then(|h| h.contiguous()).map_err(&de)?;
        Ok(Model {
            norm_f: norm("norm_f")?,
            tok_emb,
            pos_emb,
            rope,
            blocks,
            lm_head_t,
            moe_layers,
            warnings: file.warnings().to_vec(),
            source: file.path().display().to_string(),
            file_bytes: file.file_bytes(),
            device: device.clone(),
            config: cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Block indices of the MoE layers.
    pub fn moe_layers(&self) -> &[usize] {
        &self.moe_layers
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Findings at load that did not stop it (extra tensors).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Where the model was loaded from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Size of the model file in bytes.
    pub fn file_bytes(&self) -> usize {
        self.file_bytes
    }

    /// Routing the configuration asks for by default.
    pub fn default_routing(&self) -> RoutingConfig {
        RoutingConfig {
            policies: vec![self.config.default_policy; self.moe_layers.len()],
            capacity_factor: self.config.capacity_factor,
        }
    }

    /// Parameter counts.
    pub fn param_counts(&self) -> ParamCounts {
        param_counts(&self.config)
    }

    /// A KV cache for `batch` sequences.
    pub fn new_cache(&self, batch: usize) -> KvCache {
        KvCache {
            k: vec![None; self.blocks.len()],
            v: vec![None; self.blocks.len()],
            len: 0,
            batch,
        }
    }

    /// How the MoE layers compute (the kernel variant resolved for this CPU).
    pub fn moe_dispatch(&self) -> Option<super::moe::MoeDispatch> {
        self.blocks.iter().find_map(|b| match &b.ffn {
            Ffn::Moe { experts, .. } => Some(experts.dispatch()),
            Ffn::Dense(_) => None,
        })
    }

    /// Runs `batch` sequences of `tokens.len() / batch` tokens (row-major) and returns the logits,
    /// `[batch * seq, vocab]` row-major on the host. With a cache, the tokens continue the cached
    /// positions and are appended to it. Fills `trace` (its buffers are reused).
    pub fn forward(
        &self,
        tokens: &[u32],
        batch: usize,
        routing: &RoutingConfig,
        mut cache: Option<&mut KvCache>,
        trace: &mut ForwardTrace,
    ) -> Result<Vec<f32>> {
        let start = Instant::now();
        let cfg = &self.config;
        if batch == 0 || tokens.is_empty() || !tokens.len().is_multiple_of(batch) {
            bail!(
                "{} tokens cannot be split into {batch} sequences of equal length",
                tokens.len()
            );
        }
        if routing.policies.len() != self.moe_layers.len() {
            bail!(
                "routing has {} policies but the model has {} MoE layers",
                routing.policies.len(),
                self.moe_layers.len()
            );
        }
        for (p, &l) in routing.policies.iter().zip(&self.moe_layers) {
            p.validate(cfg.n_experts)
                .with_context(|| format!("policy for layer {l}"))?;
        }
        let seq = tokens.len() / batch;
        let start_pos = match &cache {
            Some(c) => {
                if c.batch != batch {
                    bail!("the KV cache holds {} sequences, not {batch}", c.batch);
                }
                c.len
            }
            None => 0,
        };
        if start_pos + seq > cfg.max_seq_len {
            bail!(
                "sequence of {} positions exceeds the model's context of {}",
                start_pos + seq,
                cfg.max_seq_len
            );
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            bail!(
                "token id {bad} is outside the vocabulary (0..{})",
                cfg.vocab_size
            );
        }
        trace.begin(batch, seq, start_pos, self.blocks.len());
        let n = batch * seq;
        let (d, nh) = (cfg.d_model, cfg.n_heads);
        let hd = d / nh;

        let head_start = Instant::now();
        let ids = Tensor::from_slice(tokens, n, &self.device)?;
        let mut x = self.tok_emb.index_select(&ids, 0)?; // [n, d]
        if let Some(pe) = &self.pos_emb {
            let pos = pe.narrow(0, start_pos, seq)?; // [seq, d]
            x = x
                .reshape((batch, seq, d))?
                .broadcast_add(&pos)?
                .reshape((n, d))?;
        }
        let mut head_ns = elapsed_ns(head_start, &self.device)?;

        let mask = if seq > 1 {
            Some(causal_mask(seq, start_pos, &self.device)?)
        } else {
            None
        };
        let scale = 1.0 / (hd as f64).sqrt();
        for (bi, block) in self.blocks.iter().enumerate() {
            let t0 = Instant::now();
            let a = block.attn_norm.forward(&x)?;
            let split = |t: Tensor| -> candle_core::Result<Tensor> {
                t.reshape((batch, seq, nh, hd))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let mut q = split(block.q.forward(&a)?)?;
            let mut k = split(block.k.forward(&a)?)?;
            let v = split(block.v.forward(&a)?)?;
            if let Some((cos, sin)) = &self.rope {
                let cos = cos.narrow(0, start_pos, seq)?;
                let sin = sin.narrow(0, start_pos, seq)?;
                q = candle_nn::rotary_emb::rope(&q, &cos, &sin)?;
                k = candle_nn::rotary_emb::rope(&k, &cos, &sin)?;
            }
            let (k, v) = match cache.as_deref_mut() {
                Some(c) => {
                    let k = match &c.k[bi] {
                        Some(prev) => Tensor::cat(&[prev, &k], 2)?,
                        None => k,
                    };
                    let v = match &c.v[bi] {
                        Some(prev) => Tensor::cat(&[prev, &v], 2)?,
                        None => v,
                    };
                    c.k[bi] = Some(k.clone());
                    c.v[bi] = Some(v.clone());
                    (k, v)
                }
                None => (k, v),
            };
            let mut scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?; // [b, h, seq, keys]
            if let Some(m) = &mask {
                scores = scores.broadcast_add(m)?;
            }
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let ctx = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((n, d))?;
            x = (x + block.o.forward(&ctx)?)?;
            trace.blocks[bi].attention_ns = elapsed_ns(t0, &self.device)?;

            let t1 = Instant::now();
            let f = block.ffn_norm.forward(&x)?;
            match &block.ffn {
                Ffn::Dense(ffn) => {
                    let up = ffn.up.forward(&f)?;
                    let h = match &ffn.gate {
                        Some(g) => (activate(&g.forward(&f)?, cfg.activation)? * up)?,
                        None => activate(&up, cfg.activation)?,
                    };
                    x = (x + ffn.down.forward(&h)?)?;
                    trace.blocks[bi].ffn_ns = elapsed_ns(t1, &self.device)?;
                }
                Ffn::Moe {
                    router_t,
                    experts,
                    slot,
                } => {
                    let logits = f.matmul(router_t)?.flatten_all()?.to_vec1::<f32>()?;
                    let lt = trace.moe_slot(*slot, bi);
                    route(
                        &logits,
                        cfg.n_experts,
                        routing.policies[*slot],
                        routing.capacity_factor,
                        &mut lt.routing,
                    )
                    .with_context(|| format!("routing in layer {bi}"))?;
                    lt.groups.build(&lt.routing);
                    let router_ns = elapsed_ns(t1, &self.device)?;
                    let t2 = Instant::now();
                    let y = experts.forward(&f, &lt.groups)?;
                    x = (x + y)?;
                    let b = &mut trace.blocks[bi];
                    b.router_ns = router_ns;
                    b.ffn_ns = elapsed_ns(t2, &self.device)?;
                }
            }
        }
        if let Some(c) = cache {
            c.len += seq;
        }
        let t3 = Instant::now();
        let logits = self.norm_f.forward(&x)?.matmul(&self.lm_head_t)?;
        let out = logits.flatten_all()?.to_vec1::<f32>()?;
        head_ns += elapsed_ns(t3, &self.device)?;
        trace.head_ns = head_ns;
        trace.total_ns = start.elapsed().as_nanos() as u64;
        Ok(out)
    }
}

fn elapsed_ns(since: Instant, device: &Device) -> candle_core::Result<u64> {
    // GPU work is asynchronous: wait for it so that the time belongs to this part.
    if !device.is_cpu() {
        device.synchronize()?;
    }
    Ok(since.elapsed().as_nanos() as u64)
}

pub(crate) fn activate(x: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    match act {
        Activation::Gelu => x.gelu(),
        Activation::Silu => candle_nn::ops::silu(x),
    }
}

fn causal_mask(seq: usize, start_pos: usize, device: &Device) -> candle_core::Result<Tensor> {
    let keys = start_pos + seq;
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| {
            (0..keys).map(move |j| {
                if j <= start_pos + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (seq, keys), device)
}

fn rope_tables(cfg: &ModelConfig, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim();
    let half = hd / 2;
    let mut cos = Vec::with_capacity(cfg.max_seq_len * half);
    let mut sin = Vec::with_capacity(cfg.max_seq_len * half);
    for p in 0..cfg.max_seq_len {
        for i in 0..half {
            let freq = 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / hd as f64);
            let a = p as f64 * freq;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    Ok((
        Tensor::from_vec(cos, (cfg.max_seq_len, half), device)?.to_dtype(DType::F32)?,
        Tensor::from_vec(sin, (cfg.max_seq_len, half), device)?,
    ))
}

/// Parameter counts from a configuration alone.
pub fn param_counts(cfg: &ModelConfig) -> ParamCounts {
    let (d, v) = (cfg.d_model, cfg.vocab_size);
    let norm = if cfg.norm == NormKind::LayerNorm {
        2 * d
    } else {
        d
    };
    let mats = if cfg.gated { 3 } else { 2 };
    let per_expert = mats * d * cfg.expert_hidden
        + if cfg.expert_bias {
            cfg.expert_hidden + d
        } else {
            0
        };
    let attn = 4 * d * d + if cfg.attn_bias { 4 * d } else { 0 };
    let h = cfg.dense_ffn_hidden;
    let dense = mats * d * h + if cfg.ffn_bias { (mats - 1) * h + d } else { 0 };
    let mut experts_total = 0;
    let per_layer: Vec<usize> = (0..cfg.n_layers)
        .map(|i| {
            let ffn = if cfg.is_moe_layer(i) {
                experts_total += cfg.n_experts * per_expert;
                cfg.n_experts * d + cfg.n_experts * per_expert
            } else {
                dense
            };
            2 * norm + attn + ffn
        })
        .collect();
    let embeddings = v * d
        + if cfg.positions == PositionKind::Learned {
            cfg.max_seq_len * d
        } else {
            0
        }
        + if cfg.tie_embeddings { 0 } else { v * d };
    ParamCounts {
        total: embeddings + per_layer.iter().sum::<usize>() + norm,
        embeddings,
        per_expert,
        per_layer,
        experts_total,
    }
}
