//! Test support: random model files, and a naive, obviously-correct f64 reference implementation
//! of the whole model that reads the file with the safetensors crate directly (independent of the
//! engine's loader and forward pass).
// Index loops are the point here: the reference reads like the formulas it checks.
#![allow(dead_code, clippy::needless_range_loop)]

pub mod fixtures;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use xmoe_top::kernel::Activation;
use xmoe_top::model::config::{ModelConfig, NormKind, PositionKind};
use xmoe_top::model::format::{StoreDtype, write_model};
use xmoe_top::model::synth::random_weights;

/// A small configuration; tests change fields as they need.
pub fn small_config() -> ModelConfig {
    ModelConfig {
        name: "test".into(),
        ..ModelConfig::byte_level(32, 2, 4, 64, 8, 16, 64)
    }
}

/// Writes a random model to `dir/name` and returns its path.
pub fn write_random(
    dir: &Path,
    name: &str,
    cfg: &ModelConfig,
    seed: u64,
    per_expert: bool,
    dtype: StoreDtype,
) -> PathBuf {
    let path = dir.join(name);
    let w = random_weights(cfg, seed, per_expert, 2.0);
    write_model(&path, cfg, &w, dtype, true).unwrap();
    path
}

/// A routing policy for the naive reference.
#[derive(Clone, Copy, Debug)]
pub enum NaivePolicy {
    Threshold(f32),
    TopK(usize, bool),
    Dense,
}

/// The naive model: every weight as f64, looked up by name.
pub struct Naive {
    pub cfg: ModelConfig,
    w: HashMap<String, Vec<f64>>,
}

impl Naive {
    pub fn load(path: &Path) -> Naive {
        let bytes = std::fs::read(path).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let cfg: ModelConfig =
            serde_json::from_str(&meta.metadata().as_ref().unwrap()["xmoe_config"]).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut w = HashMap::new();
        for (name, view) in st.tensors() {
            let data = view.data();
            let vals: Vec<f64> = match view.dtype() {
                safetensors::Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f64())
                    .collect(),
                safetensors::Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f64())
                    .collect(),
                other => panic!("unexpected dtype {other:?}"),
            };
            w.insert(name.to_string(), vals);
        }
        Naive { cfg, w }
    }

    fn t(&self, name: &str) -> &[f64] {
        self.w.get(name).unwrap_or_else(|| panic!("missing {name}"))
    }

    /// y = W x (+ b) with W [out, in] row-major.
    fn linear(&self, name: &str, x: &[f64], out: usize, bias: bool) -> Vec<f64> {
        let w = self.t(&format!("{name}.weight"));
        let inp = x.len();
        let mut y: Vec<f64> = (0..out)
            .map(|o| (0..inp).map(|i| w[o * inp + i] * x[i]).sum())
            .collect();
        if bias {
            let b = self.t(&format!("{name}.bias"));
            for (y, b) in y.iter_mut().zip(b) {
                *y += b;
            }
        }
        y
    }

    fn norm(&self, prefix: &str, x: &[f64]) -> Vec<f64> {
        let d = x.len() as f64;
        let w = self.t(&format!("{prefix}.weight"));
        let eps = self.cfg.norm_eps;
        match self.cfg.norm {
            NormKind::LayerNorm => {
                let b = self.t(&format!("{prefix}.bias"));
                let mean = x.iter().sum::<f64>() / d;
                let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d;
                let inv = 1.0 / (var + eps).sqrt();
                (0..x.len())
                    .map(|i| (x[i] - mean) * inv * w[i] + b[i])
                    .collect()
            }
            NormKind::RmsNorm => {
                let ms = x.iter().map(|v| v * v).sum::<f64>() / d;
                let inv = 1.0 / (ms + eps).sqrt();
                (0..x.len()).map(|i| x[i] * inv * w[i]).collect()
            }
        }
    }

    fn act(&self, v: f64) -> f64 {
        match self.cfg.activation {
            Activation::Gelu => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * v * (1.0 + (c * (v + 0.044715 * v * v * v)).tanh())
            }
            Activation::Silu => v / (1.0 + (-v).exp()),
        }
    }

    fn rope(&self, v: &mut [f64], pos: usize) {
        let hd = v.len();
        let half = hd / 2;
        for i in 0..half {
            let freq = 1.0 / self.cfg.rope_theta.powf(2.0 * i as f64 / hd as f64);
            let (s, c) = (pos as f64 * freq).sin_cos();
            let (a, b) = (v[i], v[i + half]);
            v[i] = a * c - b * s;
            v[i + half] = b * c + a * s;
        }
    }

    /// One expert applied to one row.
    fn expert(&self, layer: usize, e: usize, x: &[f64]) -> Vec<f64> {
        let cfg = &self.cfg;
        let (d, h) = (cfg.d_model, cfg.expert_hidden);
        let p = format!("layers.{layer}.moe.experts");
        let stacked = self.w.contains_key(&format!("{p}.up_proj"));
        let get = |stacked_name: &str, per: &str, size: usize| -> Vec<f64> {
            if stacked {
                self.t(&format!("{p}.{stacked_name}"))[e * size..(e + 1) * size].to_vec()
            } else {
                self.t(&format!("{p}.{e}.{per}")).to_vec()
            }
        };
        let up = get("up_proj", "up_proj.weight", h * d);
        let down = get("down_proj", "down_proj.weight", d * h);
        let mut hid: Vec<f64> = (0..h)
            .map(|j| (0..d).map(|i| up[j * d + i] * x[i]).sum())
            .collect();
        if cfg.expert_bias {
            let b = get("up_bias", "up_proj.bias", h);
            for j in 0..h {
                hid[j] += b[j];
            }
        }
        if cfg.gated {
            let g = get("gate_proj", "gate_proj.weight", h * d);
            for j in 0..h {
                let gv: f64 = (0..d).map(|i| g[j * d + i] * x[i]).sum();
                hid[j] *= self.act(gv);
            }
        } else {
            for v in hid.iter_mut() {
                *v = self.act(*v);
            }
        }
        let mut out: Vec<f64> = (0..d)
            .map(|o| (0..h).map(|j| down[o * h + j] * hid[j]).sum())
            .collect();
        if cfg.expert_bias {
            let b = get("down_bias", "down_proj.bias", d);
            for o in 0..d {
                out[o] += b[o];
            }
        }
        out
    }

    /// Selections of one token: (expert, weight) in descending probability. Threshold selections
    /// whose cumulative mass comes within 1e-5 of t are marked ambiguous (`usize::MAX` appended
    /// by `forward`): f32 rounding may legitimately decide them either way.
    pub fn select(probs: &[f64], policy: NaivePolicy) -> (Vec<(usize, f64)>, bool) {
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].partial_cmp(&probs[a]).unwrap().then(a.cmp(&b)));
        match policy {
            NaivePolicy::Threshold(t) => {
                let mut out = Vec::new();
                let mut before = 0.0f64;
                let mut ambiguous = false;
                for (rank, &e) in order.iter().enumerate() {
                    if rank > 0 && (before - t as f64).abs() < 1e-5 {
                        ambiguous = true;
                    }
                    if rank == 0 || before < t as f64 {
                        out.push((e, probs[e]));
                        before += probs[e];
                    }
                }
                (out, ambiguous)
            }
            NaivePolicy::TopK(k, renorm) => {
                let sel: Vec<(usize, f64)> = order[..k].iter().map(|&e| (e, probs[e])).collect();
                let s: f64 = sel.iter().map(|x| x.1).sum();
                if renorm {
                    (sel.into_iter().map(|(e, p)| (e, p / s)).collect(), false)
                } else {
                    (sel, false)
                }
            }
            NaivePolicy::Dense => (order.iter().map(|&e| (e, probs[e])).collect(), false),
        }
    }

    /// Logits [batch*seq][vocab] and, per MoE layer, per token, the kept expert ids (sorted; with
    /// `usize::MAX` appended when the threshold decision is within rounding of t).
    pub fn forward(
        &self,
        tokens: &[u32],
        batch: usize,
        policies: &[NaivePolicy],
        capacity: Option<f32>,
    ) -> (Vec<Vec<f64>>, Vec<Vec<Vec<usize>>>) {
        let cfg = &self.cfg;
        let (d, nh) = (cfg.d_model, cfg.n_heads);
        let hd = d / nh;
        let seq = tokens.len() / batch;
        let n = tokens.len();
        let emb = self.t("tok_embeddings.weight");
        let mut x: Vec<Vec<f64>> = tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                let mut v = emb[t as usize * d..(t as usize + 1) * d].to_vec();
                if cfg.positions == PositionKind::Learned {
                    let pe = self.t("pos_embeddings.weight");
                    let p = i % seq;
                    for j in 0..d {
                        v[j] += pe[p * d + j];
                    }
                }
                v
            })
            .collect();
        let moe = cfg.moe_layer_indices();
        let mut selections = Vec::new();
        for l in 0..cfg.n_layers {
            let p = format!("layers.{l}");
            let a: Vec<Vec<f64>> = x
                .iter()
                .map(|r| self.norm(&format!("{p}.attn_norm"), r))
                .collect();
            let proj = |name: &str| -> Vec<Vec<f64>> {
                a.iter()
                    .map(|r| self.linear(&format!("{p}.attn.{name}"), r, d, cfg.attn_bias))
                    .collect()
            };
            let (mut q, mut k, v) = (proj("q_proj"), proj("k_proj"), proj("v_proj"));
            if cfg.positions == PositionKind::Rotary {
                for i in 0..n {
                    for h in 0..nh {
                        self.rope(&mut q[i][h * hd..(h + 1) * hd], i % seq);
                        self.rope(&mut k[i][h * hd..(h + 1) * hd], i % seq);
                    }
                }
            }
            let mut ctx = vec![vec![0.0; d]; n];
            for b in 0..batch {
                for i in 0..seq {
                    let ti = b * seq + i;
                    for h in 0..nh {
                        let r = h * hd..(h + 1) * hd;
                        let scores: Vec<f64> = (0..=i)
                            .map(|j| {
                                let tj = b * seq + j;
                                q[ti][r.clone()]
                                    .iter()
                                    .zip(&k[tj][r.clone()])
                                    .map(|(a, b)| a * b)
                                    .sum::<f64>()
                                    / (hd as f64).sqrt()
                            })
                            .collect();
                        let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let ex: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                        let z: f64 = ex.iter().sum();
                        for (j, e) in ex.iter().enumerate() {
                            let tj = b * seq + j;
                            for c in r.clone() {
                                ctx[ti][c] += e / z * v[tj][c];
                            }
                        }
                    }
                }
            }
            for i in 0..n {
                let o = self.linear(&format!("{p}.attn.o_proj"), &ctx[i], d, cfg.attn_bias);
                for j in 0..d {
                    x[i][j] += o[j];
                }
            }
            let f: Vec<Vec<f64>> = x
                .iter()
                .map(|r| self.norm(&format!("{p}.ffn_norm"), r))
                .collect();
            if let Some(slot) = moe.iter().position(|&m| m == l) {
                let e = cfg.n_experts;
                let mut chosen: Vec<Vec<(usize, f64)>> = Vec::new();
                let mut ambiguous = Vec::new();
                for i in 0..n {
                    let logits = self.linear(&format!("{p}.moe.router"), &f[i], e, false);
                    let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let ex: Vec<f64> = logits.iter().map(|z| (z - m).exp()).collect();
                    let s: f64 = ex.iter().sum();
                    let probs: Vec<f64> = ex.iter().map(|v| v / s).collect();
                    let (sel, amb) = Self::select(&probs, policies[slot]);
                    chosen.push(sel);
                    ambiguous.push(amb);
                }
                // Capacity: per expert keep the pairs with the lowest rank, then highest p.
                let mut keep = vec![vec![true; 0]; n];
                for i in 0..n {
                    keep[i] = vec![true; chosen[i].len()];
                }
                if let Some(cf) = capacity {
                    let cap = ((cf as f64 * n as f64 / e as f64).ceil() as usize).max(4);
                    for ex in 0..e {
                        let mut pairs: Vec<(usize, f64, usize, usize)> = Vec::new();
                        for i in 0..n {
                            for (r, &(x, p)) in chosen[i].iter().enumerate() {
                                if x == ex {
                                    pairs.push((r, p, i, r));
                                }
                            }
                        }
                        pairs.sort_by(|a, b| {
                            a.0.cmp(&b.0)
                                .then(b.1.partial_cmp(&a.1).unwrap())
                                .then(a.2.cmp(&b.2))
                        });
                        for &(_, _, i, r) in pairs.iter().skip(cap) {
                            keep[i][r] = false;
                        }
                    }
                }
                let mut layer_sel = Vec::new();
                for i in 0..n {
                    let mut ids = Vec::new();
                    for (r, &(ex, w)) in chosen[i].iter().enumerate() {
                        if keep[i][r] {
                            ids.push(ex);
                            let out = self.expert(l, ex, &f[i]);
                            for j in 0..d {
                                x[i][j] += w * out[j];
                            }
                        }
                    }
                    ids.sort_unstable();
                    if ambiguous[i] {
                        ids.push(usize::MAX);
                    }
                    layer_sel.push(ids);
                }
                selections.push(layer_sel);
            } else {
                let h = cfg.dense_ffn_hidden;
                for i in 0..n {
                    let up = self.linear(&format!("{p}.ffn.up_proj"), &f[i], h, cfg.ffn_bias);
                    let hid: Vec<f64> = if cfg.gated {
                        let g = self.linear(&format!("{p}.ffn.gate_proj"), &f[i], h, cfg.ffn_bias);
                        (0..h).map(|j| self.act(g[j]) * up[j]).collect()
                    } else {
                        up.iter().map(|&u| self.act(u)).collect()
                    };
                    let o = self.linear(&format!("{p}.ffn.down_proj"), &hid, d, cfg.ffn_bias);
                    for j in 0..d {
                        x[i][j] += o[j];
                    }
                }
            }
        }
        let head_name = if cfg.tie_embeddings {
            "tok_embeddings.weight"
        } else {
            "lm_head.weight"
        };
        let head = self.t(head_name);
        let logits = x
            .iter()
            .map(|r| {
                let f = self.norm("norm_f", r);
                (0..cfg.vocab_size)
                    .map(|o| (0..d).map(|j| head[o * d + j] * f[j]).sum())
                    .collect()
            })
            .collect();
        (logits, selections)
    }
}

/// Largest |a - b| / max(1, max |b|) over the rows.
pub fn max_rel_err(engine: &[f32], reference: &[Vec<f64>]) -> f64 {
    let vocab = reference[0].len();
    let mut worst = 0.0f64;
    for (row, r) in engine.chunks_exact(vocab).zip(reference) {
        let scale = r.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        for (a, b) in row.iter().zip(r) {
            worst = worst.max((*a as f64 - b).abs() / scale);
        }
    }
    worst
}
