//! A differentiable candle version of the computation in `docs/model-format.md`, restricted to
//! what the trainer writes: byte vocabulary, learned positions, LayerNorm, non-gated GELU (tanh)
//! experts with biases, MoE in every block, tied embeddings, no attention biases.
//!
//! Every expert runs densely (one matmul over all experts) and its output is multiplied by
//! `p_e * mask_e`, where the mask is the threshold selection (detached). Unselected experts thus
//! contribute exactly zero: the same function as sparse execution of the selected experts
//! (`tests/train_vs_engine.rs` checks it against the engine on one saved file).

use candle_core::{D, DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::gelu::gelu;
use super::mask::threshold_mask;
use crate::kernel::Activation;
use crate::model::config::{ModelConfig, NormKind, PositionKind, TokenizerKind};
use crate::routing::{Routing, RoutingPolicy, route};

/// One named trainable tensor.
pub struct Param {
    /// Tensor name in the model file.
    pub name: String,
    /// The variable.
    pub var: Var,
    /// Which optimiser group it belongs to.
    pub group: ParamGroup,
}

/// Optimiser groups: weight decay and learning rate differ between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamGroup {
    /// Weight matrices (decayed).
    Matrix,
    /// Norm weights, biases and embeddings (not decayed).
    NoDecay,
    /// Router weights (own learning-rate multiplier, not decayed).
    Router,
}

struct Block {
    attn_norm: (Var, Var),
    q: Var,
    k: Var,
    v: Var,
    o: Var,
    ffn_norm: (Var, Var),
    router: Var,
    up: Var,
    up_bias: Var,
    down: Var,
    down_bias: Var,
}

/// Per-forward routing statistics of one MoE block.
#[derive(Clone, Debug, Default)]
pub struct LayerStats {
    /// Selected (token, expert) pairs.
    pub pairs: usize,
    /// Tokens routed.
    pub tokens: usize,
}

/// Result of a training forward pass.
pub struct ForwardOut {
    /// Logits `[batch * seq, vocab]`.
    pub logits: Tensor,
    /// Sum over MoE blocks of the Switch-style top-1 load-balancing loss (scalar).
    pub aux_loss: Tensor,
    /// Sum over MoE blocks of the mean router entropy per token, in nats (scalar).
    pub router_entropy: Tensor,
    /// Routing statistics per block.
    pub layers: Vec<LayerStats>,
}

/// The trainable model.
pub struct TrainModel {
    cfg: ModelConfig,
    policy: crate::routing::CheckedPolicy,
    routing: std::cell::RefCell<Routing>,
    tok: Var,
    pos: Var,
    blocks: Vec<Block>,
    norm_f: (Var, Var),
    params: Vec<Param>,
}

/// Normal(0, std) samples from a seeded generator (Box-Muller), so that initialisation is
/// reproducible (candle's CPU random generator cannot be seeded).
fn normal(rng: &mut StdRng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f32 = rng.random_range(f32::EPSILON..1.0);
            let u2: f32 = rng.random_range(0.0..1.0);
            std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect()
}

/// Checks that the configuration is one this trainer can build.
pub fn check_trainable(cfg: &ModelConfig) -> anyhow::Result<()> {
    cfg.validate()?;
    anyhow::ensure!(cfg.tokenizer == TokenizerKind::Byte, "byte tokenizer only");
    anyhow::ensure!(cfg.norm == NormKind::LayerNorm, "layer_norm only");
    anyhow::ensure!(
        cfg.positions == PositionKind::Learned,
        "learned positions only"
    );
    anyhow::ensure!(
        cfg.activation == Activation::Gelu && !cfg.gated,
        "non-gated GELU only"
    );
    anyhow::ensure!(!cfg.attn_bias, "no attention biases");
    anyhow::ensure!(cfg.expert_bias, "expert biases required");
    anyhow::ensure!(cfg.tie_embeddings, "tied embeddings only");
    anyhow::ensure!(
        cfg.moe_layer_indices().len() == cfg.n_layers,
        "MoE in every block only"
    );
    Ok(())
}

impl TrainModel {
    /// Initialises a model with a seeded generator. `router_std` is the router weights' standard
    /// deviation; q, k, v and expert up projections use `init_std`, the output projections
    /// `init_std / sqrt(2 * layers)`, position embeddings `init_std / 2`, token embeddings 0.02.
    pub fn new(
        cfg: &ModelConfig,
        threshold: f32,
        seed: u64,
        router_std: f32,
        init_std: f32,
        dev: &Device,
    ) -> anyhow::Result<Self> {
        check_trainable(cfg)?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut params = Vec::new();
        let (d, e, h) = (cfg.d_model, cfg.n_experts, cfg.expert_hidden);
        let out_std = init_std / (2.0 * cfg.n_layers as f32).sqrt();
        let mut mk =
            |name: String, shape: &[usize], init: Init, group: ParamGroup| -> Result<Var> {
                let n: usize = shape.iter().product();
                let data = match init {
                    Init::Normal(s) => normal(&mut rng, n, s),
                    Init::Const(c) => vec![c; n],
                };
                let var = Var::from_tensor(&Tensor::from_vec(data, shape, dev)?)?;
                params.push(Param {
                    name,
                    var: var.clone(),
                    group,
                });
                Ok(var)
            };
        use Init::*;
        use ParamGroup::*;
        let tok = mk(
            "tok_embeddings.weight".into(),
            &[cfg.vocab_size, d],
            Normal(0.02),
            NoDecay,
        )?;
        let pos = mk(
            "pos_embeddings.weight".into(),
            &[cfg.max_seq_len, d],
            Normal(init_std / 2.0),
            NoDecay,
        )?;
        let mut blocks = Vec::new();
        for i in 0..cfg.n_layers {
            let p = |s: &str| format!("layers.{i}.{s}");
            blocks.push(Block {
                attn_norm: (
                    mk(p("attn_norm.weight"), &[d], Const(1.0), NoDecay)?,
                    mk(p("attn_norm.bias"), &[d], Const(0.0), NoDecay)?,
                ),
                q: mk(p("attn.q_proj.weight"), &[d, d], Normal(init_std), Matrix)?,
                k: mk(p("attn.k_proj.weight"), &[d, d], Normal(init_std), Matrix)?,
                v: mk(p("attn.v_proj.weight"), &[d, d], Normal(init_std), Matrix)?,
                o: mk(p("attn.o_proj.weight"), &[d, d], Normal(out_std), Matrix)?,
                ffn_norm: (
                    mk(p("ffn_norm.weight"), &[d], Const(1.0), NoDecay)?,
                    mk(p("ffn_norm.bias"), &[d], Const(0.0), NoDecay)?,
                ),
                router: mk(p("moe.router.weight"), &[e, d], Normal(router_std), Router)?,
                up: mk(
                    p("moe.experts.up_proj"),
                    &[e, h, d],
                    Normal(init_std),
                    Matrix,
                )?,
                up_bias: mk(p("moe.experts.up_bias"), &[e, h], Const(0.0), NoDecay)?,
                down: mk(
                    p("moe.experts.down_proj"),
                    &[e, d, h],
                    Normal(out_std),
                    Matrix,
                )?,
                down_bias: mk(p("moe.experts.down_bias"), &[e, d], Const(0.0), NoDecay)?,
            });
        }
        let norm_f = (
            mk("norm_f.weight".into(), &[d], Const(1.0), NoDecay)?,
            mk("norm_f.bias".into(), &[d], Const(0.0), NoDecay)?,
        );
        Ok(Self {
            cfg: cfg.clone(),
            policy: RoutingPolicy::threshold(threshold).check(cfg.n_experts)?,
            routing: Default::default(),
            tok,
            pos,
            blocks,
            norm_f,
            params,
        })
    }

    /// Sets the routing used by [`TrainModel::forward`] (training uses the threshold policy).
    /// Renormalised weights are not supported: the weights are always the raw `p`.
    pub fn set_policy(&mut self, policy: RoutingPolicy) -> anyhow::Result<()> {
        let checked = policy.check(self.cfg.n_experts)?;
        anyhow::ensure!(
            !policy.renormalizes(),
            "renormalised weights are not supported by the training forward pass"
        );
        self.policy = checked;
        Ok(())
    }

    /// Loads a file written by [`super::save::save_safetensors`] (f16 values widened to f32),
    /// routing with the file's default policy.
    pub fn from_file(path: &std::path::Path, dev: &Device) -> anyhow::Result<Self> {
        let file = super::save::check_saved(path)?;
        let cfg = file.config().clone();
        let t = match cfg.default_policy {
            crate::routing::RoutingPolicy::Threshold { t, .. } => t,
            _ => 0.9,
        };
        let mut model = Self::new(&cfg, t, 0, 0.02, 0.02, dev)?;
        for p in &model.params {
            let shape = file.raw(&p.name).shape.to_vec();
            p.var
                .set(&Tensor::from_vec(file.f32(&p.name), shape, dev)?)?;
        }
        model.set_policy(cfg.default_policy)?;
        Ok(model)
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// All trainable tensors with their file names.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Total number of parameters.
    pub fn n_params(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }

    /// Forward pass over `ids` `[batch, seq]` (u32). Returns logits for every position.
    pub fn forward(&self, ids: &Tensor) -> anyhow::Result<ForwardOut> {
        let (b, t) = ids.dims2()?;
        anyhow::ensure!(
            t <= self.cfg.max_seq_len,
            "sequence longer than max_seq_len"
        );
        let cfg = &self.cfg;
        let (d, nh, e, h) = (cfg.d_model, cfg.n_heads, cfg.n_experts, cfg.expert_hidden);
        let dh = d / nh;
        let n = b * t;
        let dev = ids.device();
        let eps = cfg.norm_eps;

        let flat = ids.flatten_all()?;
        let mut x = self
            .tok
            .as_tensor()
            .index_select(&flat, 0)?
            .reshape((b, t, d))?
            .broadcast_add(&self.pos.as_tensor().narrow(0, 0, t)?)?
            .reshape((n, d))?;

        let causal: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { -1e30 }))
            .collect();
        let causal = Tensor::from_vec(causal, (t, t), dev)?;
        let scale = 1.0 / (dh as f64).sqrt();

        let mut aux = Tensor::zeros((), DType::F32, dev)?;
        let mut entropy = Tensor::zeros((), DType::F32, dev)?;
        let mut stats = Vec::with_capacity(self.blocks.len());
        let mut mask = Vec::new();
        for blk in &self.blocks {
            // Attention.
            let a = layer_norm(&x, &blk.attn_norm.0, &blk.attn_norm.1, eps)?;
            let heads = |w: &Var| -> Result<Tensor> {
                a.matmul(&w.as_tensor().t()?)?
                    .reshape((b, t, nh, dh))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (q, k, v) = (heads(&blk.q)?, heads(&blk.k)?, heads(&blk.v)?);
            let att = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&causal)?;
            let att = softmax_last(&att)?;
            let y = att
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((n, d))?;
            x = (x + y.matmul(&blk.o.as_tensor().t()?)?)?;

            // MoE FFN.
            let f = layer_norm(&x, &blk.ffn_norm.0, &blk.ffn_norm.1, eps)?;
            let logits_r = f.matmul(&blk.router.as_tensor().t()?)?;
            let p = softmax_last(&logits_r)?;
            let pv = p.flatten_all()?.to_vec1::<f32>()?;
            let t = match self.policy.policy() {
                RoutingPolicy::Threshold { t, .. } => t,
                _ => 1.0,
            };
            let mut ms = threshold_mask(&pv, e, t, &mut mask);
            match self.policy.policy() {
                RoutingPolicy::Threshold { .. } => {}
                RoutingPolicy::Dense => {
                    mask.fill(1.0);
                    ms.pairs = n * e;
                }
                RoutingPolicy::TopK { .. } => {
                    // Softmax again from the logits in the routing module: same probabilities.
                    let lv = logits_r.flatten_all()?.to_vec1::<f32>()?;
                    let mut r = std::mem::take(&mut *self.routing.borrow_mut());
                    route(&lv, self.policy, None, &mut r)?;
                    mask.fill(0.0);
                    for i in 0..n {
                        for (x, _, _) in r.choices(i) {
                            mask[i * e + x] = 1.0;
                        }
                    }
                    ms.pairs = r.pairs();
                    *self.routing.borrow_mut() = r;
                }
            }
            let mask_t = Tensor::from_slice(&mask, (n, e), dev)?;
            let w = (&p * &mask_t)?; // [n, e]; mask is a constant (no gradient)
            let up = blk.up.as_tensor().reshape((e * h, d))?;
            let hid = gelu(
                &f.matmul(&up.t()?)?
                    .broadcast_add(&blk.up_bias.as_tensor().reshape(e * h)?)?,
            )?; // tanh approximation, exactly Activation::Gelu
            let hid = hid
                .reshape((n, e, h))?
                .broadcast_mul(&w.unsqueeze(2)?)?
                .reshape((n, e * h))?;
            let down = blk
                .down
                .as_tensor()
                .transpose(1, 2)?
                .contiguous()?
                .reshape((e * h, d))?;
            let moe = (hid.matmul(&down)? + w.matmul(blk.down_bias.as_tensor())?)?;
            x = (x + moe)?;

            // Switch-style load balancing on the top-1 expert: E * sum_e mean(p_e) * frac_e.
            let frac: Vec<f32> = ms
                .top1_counts
                .iter()
                .map(|&c| c as f32 / n as f32)
                .collect();
            let frac = Tensor::from_vec(frac, e, dev)?;
            let l = ((p.mean(0)? * frac)?.sum_all()? * e as f64)?;
            aux = (aux + l)?;
            let h = (&p * (&p + 1e-9)?.log()?)?.sum(1)?.mean(0)?.neg()?;
            entropy = (entropy + h)?;
            stats.push(LayerStats {
                pairs: ms.pairs,
                tokens: n,
            });
        }
        let x = layer_norm(&x, &self.norm_f.0, &self.norm_f.1, eps)?;
        let logits = x.matmul(&self.tok.as_tensor().t()?)?;
        Ok(ForwardOut {
            logits,
            aux_loss: aux,
            router_entropy: entropy,
            layers: stats,
        })
    }
}

enum Init {
    Normal(f32),
    Const(f32),
}

/// LayerNorm over the last dimension from differentiable primitives.
fn layer_norm(x: &Tensor, w: &Var, b: &Var, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(w.as_tensor())?
        .broadcast_add(b.as_tensor())
}

/// Softmax over the last dimension; the subtracted maximum is detached (the gradient is the
/// same, and it saves the backward pass through `max`).
fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let num = x.broadcast_sub(&max)?.exp()?;
    let den = num.sum_keepdim(D::Minus1)?;
    num.broadcast_div(&den)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(model: &TrainModel, ids: &[u32]) -> Vec<Vec<f32>> {
        let x = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
        model.forward(&x).unwrap().logits.to_vec2::<f32>().unwrap()
    }

    #[test]
    fn attention_is_causal_and_uses_the_context() {
        let cfg = crate::model::config::tests::small();
        let mut model = TrainModel::new(&cfg, 0.9, 5, 0.5, 0.02, &Device::Cpu).unwrap();
        for p in [RoutingPolicy::threshold(0.9), RoutingPolicy::Dense] {
            model.set_policy(p).unwrap();
            let a: Vec<u32> = (0..12).map(|i| 97 + i).collect();
            let mut b = a.clone();
            *b.last_mut().unwrap() = 7; // the future changes: earlier positions must not
            let (la, lb) = (logits(&model, &a), logits(&model, &b));
            for i in 0..11 {
                assert_eq!(la[i], lb[i], "position {i} saw the future");
            }
            let mut c = a.clone();
            c[0] = 3; // the past changes: later positions must
            let lc = logits(&model, &c);
            assert!((1..12).all(|i| la[i] != lc[i]));
        }
    }
}
