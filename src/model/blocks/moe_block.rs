//! The Mixture-of-Experts sublayer: router, routing policy, and the experts of [`MoeExperts`].

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Tensor;

use super::ffn::activate;
use super::{Linear, Norm, elapsed_ns};
use crate::kernel::Activation;
use crate::model::config::Combine;
use crate::model::forward::RoutingConfig;
use crate::model::moe::{MoeDispatch, MoeExperts};
use crate::model::trace::ForwardTrace;
use crate::routing::{Router, route_with};

/// An expert every token uses, outside the routing (Qwen2-MoE's `shared_expert`):
/// `down(act(gate(x)) * up(x))`, scaled per token by `sigmoid(scale(x))` when it has a scalar gate.
pub struct SharedExpert {
    gate: Linear,
    up: Linear,
    down: Linear,
    activation: Activation,
    scale: Option<Linear>,
}

impl SharedExpert {
    /// A gated MLP, with an optional `[1, d]` per-token scale gate.
    pub fn new(
        gate: Linear,
        up: Linear,
        down: Linear,
        activation: Activation,
        scale: Option<Linear>,
    ) -> Self {
        Self {
            gate,
            up,
            down,
            activation,
            scale,
        }
    }

    /// Gate, up, down, activation and the optional scale gate, borrowed.
    pub fn parts(&self) -> (&Linear, &Linear, &Linear, Activation, Option<&Linear>) {
        (
            &self.gate,
            &self.up,
            &self.down,
            self.activation,
            self.scale.as_ref(),
        )
    }

    /// `f` = [n, d] (already normed) -> [n, d].
    pub fn forward(&self, f: &Tensor) -> candle_core::Result<Tensor> {
        let h = (activate(&self.gate.forward(f)?, self.activation)? * self.up.forward(f)?)?;
        let y = self.down.forward(&h)?;
        match &self.scale {
            Some(s) => y.broadcast_mul(&candle_nn::ops::sigmoid(&s.forward(f)?)?),
            None => Ok(y),
        }
    }
}

/// Every part of a [`MoeBlock`], borrowed.
pub struct MoeParts<'a> {
    /// Pre-norm.
    pub norm: &'a Norm,
    /// Router weight transposed, `[d, E]`.
    pub router_t: &'a Tensor,
    /// Router bias `[E]`.
    pub router_b: Option<&'a Tensor>,
    /// How logits become scores and weights.
    pub router: &'a Router,
    /// The routed experts.
    pub experts: &'a MoeExperts,
    /// The always-on expert.
    pub shared: Option<&'a SharedExpert>,
    /// Index among the model's MoE blocks.
    pub slot: usize,
    /// How the selected experts combine.
    pub combine: Combine,
}

/// `x + sum over the selected experts e of w_e * expert_e(n(x))`, with `n` its pre-norm and the
/// selection made by the routing policy from the router's logits.
pub struct MoeBlock {
    norm: Norm,
    /// Router weight transposed, [d, E].
    router_t: Tensor,
    /// Router bias, [E] (gpt-oss).
    router_b: Option<Tensor>,
    /// How logits become scores and weights (softmax, or a DeepSeek router).
    router: Router,
    experts: MoeExperts,
    shared: Option<SharedExpert>,
    /// Index of this block among the model's MoE blocks: its policy and its trace slot.
    slot: usize,
    /// Gate-weighted, or a plain sum of the selected experts (a split dense FFN).
    combine: Combine,
}

impl MoeBlock {
    /// Assembles the sublayer from its pre-norm, its router weight `[n_experts, d]`, its experts
    /// and its index among the model's MoE blocks.
    pub fn new(
        norm: Norm,
        router: &Tensor,
        experts: MoeExperts,
        slot: usize,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            norm,
            router_t: router.t()?.contiguous()?,
            router_b: None,
            router: Router::Softmax,
            experts,
            shared: None,
            slot,
            combine: Combine::GateWeighted,
        })
    }

    /// Combines the selected experts as `combine` says (default: gate-weighted).
    pub fn with_combine(mut self, combine: Combine) -> Self {
        self.combine = combine;
        self
    }

    /// Adds a bias `[n_experts]` to the router logits (gpt-oss's `mlp.router.bias`).
    pub fn with_router_bias(mut self, bias: Tensor) -> Self {
        self.router_b = Some(bias);
        self
    }

    /// Scores and weights experts with `router` instead of a softmax (DeepSeek).
    pub fn with_router(mut self, router: Router) -> Self {
        self.router = router;
        self
    }

    /// Adds an always-on shared expert to the routed ones.
    pub fn with_shared(mut self, shared: SharedExpert) -> Self {
        self.shared = Some(shared);
        self
    }

    /// Every part, borrowed (for the lean decode path, `model::decode`).
    pub fn parts(&self) -> MoeParts<'_> {
        MoeParts {
            norm: &self.norm,
            router_t: &self.router_t,
            router_b: self.router_b.as_ref(),
            router: &self.router,
            experts: &self.experts,
            shared: self.shared.as_ref(),
            slot: self.slot,
            combine: self.combine,
        }
    }

    /// How the experts compute.
    pub fn dispatch(&self) -> MoeDispatch {
        self.experts.dispatch()
    }

    /// `x` = [n, d] of block `layer` -> `x` with the experts' output added. Routes with this
    /// slot's policy of `routing` (validated by the caller), and fills the slot's routing and
    /// groups and the block's `router_ns` (norm, router and policy) and `ffn_ns` (experts).
    pub fn forward(
        &self,
        x: Tensor,
        layer: usize,
        routing: &RoutingConfig,
        trace: &mut ForwardTrace,
    ) -> Result<Tensor> {
        let t0 = Instant::now();
        let f = self.norm.forward(&x)?;
        let mut logits = f.matmul(&self.router_t)?;
        if let Some(b) = &self.router_b {
            logits = logits.broadcast_add(b)?;
        }
        let logits = logits.flatten_all()?.to_vec1::<f32>()?;
        let lt = trace.moe_slot(self.slot, layer);
        route_with(
            &logits,
            &self.router,
            routing.checked(self.slot),
            routing.checked_capacity(),
            &mut lt.routing,
        )
        .with_context(|| format!("routing in layer {layer}"))?;
        lt.groups.build(&lt.routing);
        if self.combine == Combine::Sum {
            // The routing keeps its probabilities (the statistics show them); only the experts'
            // combine weights become 1.
            lt.groups.weights.fill(1.0);
        }
        let router_ns = elapsed_ns(t0, f.device())?;
        let t1 = Instant::now();
        let mut y = self.experts.forward(&f, &lt.groups)?;
        if let Some(shared) = &self.shared {
            y = (y + shared.forward(&f)?)?;
        }
        let out = (x + y)?;
        let timing = &mut trace.blocks[layer];
        timing.router_ns = router_ns;
        timing.ffn_ns = elapsed_ns(t1, out.device())?;
        Ok(out)
    }
}
