//! Quality and FFN compute of a converted model under several expert selections, on the same
//! tokens: the dense original, the trained router under a threshold (the XMoE rule, through
//! `routing::route`, as the engine runs it), and two baselines at equal FFN FLOPs: static pruning
//! (the same experts for every token, chosen by mean share) and an oracle (per token, as many
//! experts as the router chose, but those whose true contribution is largest).
//!
//! The selection is applied as a neuron mask on the full FFN: this measures quality, not speed
//! (the engine computes only the selected experts; `xmoe-top` and `sweep` show the time).

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::lm::{FfnWeights, Lm, nll_sum};
use super::{Conversion, Progress};
use crate::model::blocks::Linear;
use crate::routing::{Routing, RoutingPolicy, route};
use crate::workload::tokenizer::Encoded;

/// Which experts each token uses in the converted blocks.
#[derive(Clone, Debug, PartialEq)]
pub enum Selection {
    /// Every neuron (the dense model).
    Dense,
    /// The router under threshold `t`.
    Router(f32),
    /// Per token the router's count under threshold `t`, filled with the experts of largest true
    /// contribution `|down_e h_e|`.
    Oracle(f32),
    /// The same `k[i]` experts for every token in converted block `i`, those of largest mean share.
    Static(Vec<usize>),
}

/// The outcome of one evaluation.
#[derive(Clone, Debug)]
pub struct EvalResult {
    /// Cross-entropy in nats summed over the targets.
    pub nats: f64,
    /// Bytes of text the targets cover.
    pub bytes: u64,
    /// Targets.
    pub tokens: usize,
    /// FFN FLOPs per token (router included) as a share of the dense model's FFN FLOPs.
    pub ffn_flops_share: f64,
    /// Mean experts per token in each converted block.
    pub experts_per_token: Vec<f64>,
}

impl EvalResult {
    /// Bits per byte.
    pub fn bits_per_byte(&self) -> f64 {
        self.nats / std::f64::consts::LN_2 / self.bytes.max(1) as f64
    }
}

/// Evaluation windows: `seq + 1` tokens with stride `seq` (inputs the first `seq`, targets the
/// last `seq`), as `workload::for_each_eval_window` cuts a text, without wrapping; at most
/// `max_tokens` targets.
pub struct Windows {
    /// Inputs and targets of each window, and the bytes its targets cover.
    pub windows: Vec<(Vec<u32>, Vec<u32>, u64)>,
    /// Tokens per window.
    pub seq: usize,
}

impl Windows {
    /// Cuts `enc` into windows of `seq` targets, at most `max_tokens` targets in all.
    pub fn new(enc: &Encoded, seq: usize, max_tokens: usize) -> Self {
        let mut windows = Vec::new();
        let mut start = 0;
        while start + seq < enc.ids.len() && (windows.len() + 1) * seq <= max_tokens {
            let w = &enc.ids[start..start + seq + 1];
            windows.push((
                w[..seq].to_vec(),
                w[1..].to_vec(),
                enc.target_bytes(start, seq),
            ));
            start += seq;
        }
        Self { windows, seq }
    }

    /// Targets in all.
    pub fn tokens(&self) -> usize {
        self.windows.len() * self.seq
    }
}

/// The converted model as the evaluator runs it: the dense model's blocks, each converted FFN's
/// neurons in expert order and its router.
pub struct EvalModel<'a> {
    lm: &'a Lm,
    conv: &'a Conversion,
    ffns: Vec<FfnWeights>,
    routers: Vec<Linear>,
}

impl<'a> EvalModel<'a> {
    /// Prepares `conv` on `lm`.
    pub fn new(lm: &'a Lm, conv: &'a Conversion) -> Result<Self> {
        let mut ffns = Vec::new();
        let mut routers = Vec::new();
        for (i, b) in conv.blocks.iter().enumerate() {
            let f = &lm.blocks[i].ffn;
            ffns.push(FfnWeights::new(&f.gate, &f.up, &f.down, Some(&b.perm))?);
            routers.push(Linear::new(&b.router, None)?);
        }
        Ok(Self {
            lm,
            conv,
            ffns,
            routers,
        })
    }

    /// Runs `windows` under `sel`; `progress` is told windows done.
    pub fn run(
        &self,
        windows: &Windows,
        sel: &Selection,
        progress: Progress,
    ) -> Result<EvalResult> {
        let lm = self.lm;
        let e = self.conv.experts;
        let n_conv = self.conv.blocks.len();
        let mut expert_tokens = vec![0u64; n_conv];
        let (mut nats, mut bytes) = (0.0, 0u64);
        let batch = 4;
        let mut routing = Routing::default();
        let statics: Vec<Vec<usize>> = match sel {
            Selection::Static(k) => self
                .conv
                .blocks
                .iter()
                .zip(k)
                .map(|(b, &k)| {
                    let mut order: Vec<usize> = (0..e).collect();
                    order.sort_by(|&x, &y| b.mean_share[y].total_cmp(&b.mean_share[x]));
                    order.truncate(k.clamp(1, e));
                    order
                })
                .collect(),
            _ => Vec::new(),
        };
        let total = windows.windows.len();
        for (wi, chunk) in windows.windows.chunks(batch).enumerate() {
            progress("evaluating", wi * batch, total);
            let inputs: Vec<u32> = chunk.iter().flat_map(|w| w.0.iter().copied()).collect();
            let targets: Vec<u32> = chunk.iter().flat_map(|w| w.1.iter().copied()).collect();
            let n = inputs.len();
            let pass = lm.pass(chunk.len(), windows.seq)?;
            let mut x = lm.embed(&inputs, &pass)?;
            for (i, b) in lm.blocks.iter().enumerate() {
                x = lm.attend(i, x, &pass)?;
                let f = b.ffn_norm.forward(&x)?;
                let y = if i >= n_conv || *sel == Selection::Dense {
                    b.ffn.down(&b.ffn.hidden(&f)?)?
                } else {
                    let ffn = &self.ffns[i];
                    let h = ffn.hidden(&f)?;
                    let mut mask = vec![0f32; n * e];
                    match sel {
                        Selection::Dense => unreachable!("handled above"),
                        Selection::Static(_) => {
                            for t in 0..n {
                                for &x in &statics[i] {
                                    mask[t * e + x] = 1.0;
                                }
                            }
                        }
                        Selection::Router(t) | Selection::Oracle(t) => {
                            let logits = self.routers[i].forward(&f)?.flatten_all()?.to_vec1()?;
                            let policy = RoutingPolicy::threshold(*t).check(e)?;
                            route(&logits, policy, None, &mut routing)?;
                            if matches!(sel, Selection::Router(_)) {
                                for tok in 0..n {
                                    for (x, _, _) in routing.choices(tok) {
                                        mask[tok * e + x] = 1.0;
                                    }
                                }
                            } else {
                                let norms =
                                    ffn.expert_norms(&h, e)?.flatten_all()?.to_vec1::<f32>()?;
                                let mut order: Vec<usize> = Vec::with_capacity(e);
                                for tok in 0..n {
                                    let row = &norms[tok * e..(tok + 1) * e];
                                    order.clear();
                                    order.extend(0..e);
                                    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                                    for &x in &order[..routing.selected(tok)] {
                                        mask[tok * e + x] = 1.0;
                                    }
                                }
                            }
                        }
                    }
                    expert_tokens[i] += mask.iter().filter(|&&m| m > 0.0).count() as u64;
                    let hs = h.dim(1)? / e;
                    let m = Tensor::from_vec(mask, (n, e, 1), &Device::Cpu)?
                        .broadcast_as((n, e, hs))?
                        .contiguous()?
                        .reshape((n, e * hs))?;
                    ffn.down(&(h * m)?)?
                };
                x = (x + y)?;
            }
            nats += nll_sum(&lm.logits(&x)?, &targets)?;
            bytes += chunk.iter().map(|w| w.2).sum::<u64>();
        }
        progress("evaluating", total, total);
        let tokens = windows.tokens();
        let experts_per_token: Vec<f64> = expert_tokens
            .iter()
            .map(|&c| c as f64 / tokens.max(1) as f64)
            .collect();
        let ffn_flops_share = match sel {
            Selection::Dense => 1.0,
            _ => self.flops_share(&experts_per_token),
        };
        Ok(EvalResult {
            nats,
            bytes,
            tokens,
            ffn_flops_share,
            experts_per_token,
        })
    }

    /// FFN FLOPs per token relative to the dense model when converted block `i` uses
    /// `experts_per_token[i]` experts on average: router `2·d·E` plus `3·2·d·h` per expert
    /// (SwiGLU), against `3·2·d·H` for each dense FFN; unconverted blocks count in full.
    pub fn flops_share(&self, experts_per_token: &[f64]) -> f64 {
        let c = self.lm.blocks.len() as f64;
        let e = self.conv.experts as f64;
        let width = self.lm.blocks[0].ffn.gate.dims()[0] as f64;
        let d = self.lm.blocks[0].ffn.gate.dims()[1] as f64;
        let dense = 6.0 * d * width;
        let mut sum = 0.0;
        for (i, _) in self.lm.blocks.iter().enumerate() {
            sum += match experts_per_token.get(i) {
                Some(k) => 2.0 * d * e + k * 6.0 * d * (width / e),
                None => dense,
            };
        }
        sum / (c * dense)
    }
}
