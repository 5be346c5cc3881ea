//! Exact FLOP accounting for one token, per layer, for the actual routing and for the baselines.
//!
//! Convention (see `docs/flops.md`): one multiply-add is 2 FLOPs; a bias add is 1 FLOP per
//! element; activations, softmax and normalisation are not counted (they are O(d), not O(d^2)).
//!
//! | part | FLOPs per token |
//! |---|---|
//! | attention projections (q, k, v, o) | 2·d·(2·q + 2·kv) (+ q + 2·kv + d with biases) |
//! | attention scores and weighted sum over `c` keys | 2·2·c·q |
//! | router | 2·d·E (+ E with a bias, gpt-oss) |
//! | one expert, non-gated | 2·2·d·h (+ h + d with biases) |
//! | one expert, gated | 3·2·d·h (+ h + d with biases; + 2·h + d with gate biases too, gpt-oss) |
//! | combining a selected expert's output (scale and add) | 2·d |
//! | dense FFN of width H | as one expert of width H, without the combine |
//! | shared expert of width S (every token, outside the routing) | 3·2·d·S (+ 2·d with its gate, + d to scale) |
//! | LM head | 2·d·V |
//!
//! Multi-head latent attention (DeepSeek) instead: its projections (`MlaShape::projection_flops`,
//! each latent expanded once per token) plus 2·c·heads·(qk_head_dim + v_head_dim) over `c` keys.
//!
//! with `q = heads · head_dim` and `kv = kv_heads · head_dim` (`q = kv = d` for the project's own
//! models). gpt-oss's attention sinks (one more logit in each softmax, no value) and its clamped
//! SwiGLU are part of the softmax and the activation, which are not counted. The shared expert costs the same under every policy, so it is counted with the
//! non-MoE part and never as "saved".

use crate::model::config::ModelConfig;

/// Computes FLOPs per token for a given configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct FlopModel {
    d: u64,
    vocab: u64,
    n_layers: usize,
    n_experts: u64,
    expert_hidden: u64,
    dense_hidden: u64,
    gated: bool,
    expert_bias: bool,
    expert_gate_bias: bool,
    router_bias: bool,
    ffn_bias: bool,
    attn_bias: bool,
    qkv_bias: bool,
    q_width: u64,
    kv_width: u64,
    shared_hidden: u64,
    shared_gate: bool,
    windows: Vec<Option<usize>>,
    moe_layers: Vec<usize>,
    top_k: u64,
    heads: u64,
    mla: Option<crate::model::config::MlaShape>,
}

impl FlopModel {
    /// Builds the model of a configuration; `top_k` is the baseline's k.
    pub fn new(cfg: &ModelConfig) -> Self {
        Self {
            d: cfg.d_model as u64,
            vocab: cfg.vocab_size as u64,
            n_layers: cfg.n_layers,
            n_experts: cfg.n_experts as u64,
            expert_hidden: cfg.expert_hidden as u64,
            dense_hidden: cfg.dense_ffn_hidden as u64,
            gated: cfg.gated,
            expert_bias: cfg.expert_bias,
            expert_gate_bias: cfg.expert_bias && cfg.expert_gate_bias,
            router_bias: cfg.router_bias,
            ffn_bias: cfg.ffn_bias,
            attn_bias: cfg.attn_bias,
            qkv_bias: cfg.qkv_bias,
            q_width: (cfg.n_heads * cfg.head_dim()) as u64,
            kv_width: (cfg.kv_heads() * cfg.head_dim()) as u64,
            shared_hidden: cfg.shared_expert_hidden.unwrap_or(0) as u64,
            shared_gate: cfg.shared_expert_gate,
            windows: cfg.sliding_windows.clone(),
            moe_layers: cfg.moe_layer_indices(),
            top_k: cfg.top_k_baseline() as u64,
            heads: cfg.n_heads as u64,
            mla: cfg.mla,
        }
    }

    /// Same model with another top-k baseline.
    pub fn with_top_k(mut self, k: usize) -> Self {
        self.top_k = k as u64;
        self
    }

    /// k of the top-k baseline.
    pub fn top_k(&self) -> usize {
        self.top_k as usize
    }

    /// Experts per MoE layer.
    pub fn n_experts(&self) -> usize {
        self.n_experts as usize
    }

    fn ffn_flops(&self, h: u64, bias: bool) -> u64 {
        let mats = if self.gated { 3 } else { 2 };
        mats * 2 * self.d * h + if bias { h + self.d } else { 0 }
    }

    /// One expert applied to one token, including the weighted combine into the output.
    pub fn expert(&self) -> u64 {
        self.ffn_flops(self.expert_hidden, self.expert_bias)
            + if self.expert_gate_bias {
                self.expert_hidden
            } else {
                0
            }
            + 2 * self.d
    }

    /// Router logits for one token.
    pub fn router(&self) -> u64 {
        2 * self.d * self.n_experts + if self.router_bias { self.n_experts } else { 0 }
    }

    /// A MoE layer for one token that used `experts` (kept) experts.
    pub fn moe_layer(&self, experts: usize) -> u64 {
        self.router() + experts as u64 * self.expert()
    }

    /// The all-experts baseline for one token of one MoE layer.
    pub fn moe_layer_all_experts(&self) -> u64 {
        self.moe_layer(self.n_experts as usize)
    }

    /// The top-k baseline for one token of one MoE layer.
    pub fn moe_layer_top_k(&self) -> u64 {
        self.moe_layer(self.top_k as usize)
    }

    /// A dense FFN block for one token.
    pub fn dense_ffn(&self) -> u64 {
        self.ffn_flops(self.dense_hidden, self.ffn_bias)
    }

    /// Attention of one token attending over `context` keys (itself included).
    pub fn attention(&self, context: usize) -> u64 {
        if let Some(mla) = &self.mla {
            // Scores over q·k of qk_head_dim per head, the weighted sum over v_head_dim.
            let per_key = self.heads * (mla.qk_head_dim() + mla.v_head_dim) as u64;
            return mla.projection_flops(self.d as usize, self.heads as usize, self.attn_bias)
                + 2 * context as u64 * per_key;
        }
        let (q, kv) = (self.q_width, self.kv_width);
        let proj = 2 * self.d * (2 * q + 2 * kv)
            + if self.attn_bias {
                q + 2 * kv + self.d
            } else if self.qkv_bias {
                q + 2 * kv
            } else {
                0
            };
        proj + 2 * 2 * context as u64 * q
    }

    /// The shared expert of one MoE block for one token (zero without one): the same under every
    /// policy.
    pub fn shared_expert(&self) -> u64 {
        if self.shared_hidden == 0 {
            return 0;
        }
        self.ffn_flops(self.shared_hidden, false)
            + if self.shared_gate {
                2 * self.d + self.d
            } else {
                0
            }
    }

    /// LM head for one token.
    pub fn lm_head(&self) -> u64 {
        2 * self.d * self.vocab
    }

    /// Everything but the MoE layers, for one token with `context` keys (fewer in a block with a
    /// sliding window: the window's).
    pub fn non_moe(&self, context: usize) -> u64 {
        let dense_blocks = (self.n_layers - self.moe_layers.len()) as u64;
        (0..self.n_layers)
            .map(|l| match self.windows.get(l).copied().flatten() {
                Some(w) => self.attention(context.min(w)),
                None => self.attention(context),
            })
            .sum::<u64>()
            + dense_blocks * self.dense_ffn()
            + self.moe_layers.len() as u64 * self.shared_expert()
            + self.lm_head()
    }

    /// Indices of the MoE blocks.
    pub fn moe_layers(&self) -> &[usize] {
        &self.moe_layers
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::tests::small;

    #[test]
    fn formulas_by_hand() {
        // d 16, E 8, h 16, expert bias, non-gated, dense 64, V 256, 2 layers both MoE, k = 4.
        let f = FlopModel::new(&small());
        assert_eq!(f.router(), 2 * 16 * 8);
        assert_eq!(f.expert(), 2 * 2 * 16 * 16 + 16 + 16 + 2 * 16);
        assert_eq!(f.moe_layer(3), 256 + 3 * 1088);
        assert_eq!(f.moe_layer_all_experts(), 256 + 8 * 1088);
        assert_eq!(f.moe_layer_top_k(), 256 + 4 * 1088);
        assert_eq!(f.attention(5), 8 * 256 + 4 * 5 * 16);
        assert_eq!(f.lm_head(), 2 * 16 * 256);
        assert_eq!(f.non_moe(1), 2 * f.attention(1) + f.lm_head());
        let mut c = small();
        c.gated = true;
        c.expert_bias = false;
        assert_eq!(FlopModel::new(&c).expert(), 3 * 2 * 16 * 16 + 2 * 16);
        // gpt-oss: gate, up and down biases and a router bias.
        c.expert_bias = true;
        c.expert_gate_bias = true;
        c.router_bias = true;
        let g = FlopModel::new(&c);
        assert_eq!(g.expert(), 3 * 2 * 16 * 16 + 2 * 16 + 16 + 2 * 16);
        assert_eq!(g.router(), 2 * 16 * 8 + 8);
    }

    #[test]
    fn paper_split_ratio_is_compute_matched() {
        // d 768: top-2 of 16 x 1536 costs the same as top-4 of 32 x 768 (routers aside).
        let mut c = small();
        c.d_model = 768;
        c.n_heads = 12;
        c.expert_bias = false;
        c.dense_ffn_hidden = 3072;
        c.n_experts = 16;
        c.expert_hidden = 1536;
        let a = FlopModel::new(&c);
        c.n_experts = 32;
        c.expert_hidden = 768;
        let b = FlopModel::new(&c);
        assert_eq!(a.top_k(), 2);
        assert_eq!(b.top_k(), 4);
        let matmuls = |f: &FlopModel| f.moe_layer_top_k() - f.router() - f.top_k() as u64 * 2 * 768;
        assert_eq!(matmuls(&a), matmuls(&b));
    }
}
