//! The dense feed-forward sublayer, gated or not.

use std::time::Instant;

use candle_core::Tensor;

use super::{Linear, Norm, elapsed_ns};
use crate::kernel::Activation;
use crate::model::trace::BlockTiming;

/// `act` on a tensor, as the engine computes it (the CPU kernel matches [`Activation::apply`]).
pub(crate) fn activate(x: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    match act {
        Activation::Gelu => x.gelu(),
        Activation::Silu => candle_nn::ops::silu(x),
    }
}

/// `x + down(act(up(n(x))))`, or `x + down(act(gate(n(x))) * up(n(x)))` when gated, with `n` its
/// pre-norm.
pub struct Ffn {
    norm: Norm,
    up: Linear,
    gate: Option<Linear>,
    down: Linear,
    activation: Activation,
}

impl Ffn {
    /// Assembles the sublayer; a `gate` makes it gated.
    pub fn new(
        norm: Norm,
        up: Linear,
        gate: Option<Linear>,
        down: Linear,
        activation: Activation,
    ) -> Self {
        Self {
            norm,
            up,
            gate,
            down,
            activation,
        }
    }

    /// Pre-norm, up, gate (if gated), down and activation, borrowed.
    pub fn parts(&self) -> (&Norm, &Linear, Option<&Linear>, &Linear, Activation) {
        (
            &self.norm,
            &self.up,
            self.gate.as_ref(),
            &self.down,
            self.activation,
        )
    }

    /// `x` = [n, d] -> `x` with the FFN added. Records `timing.ffn_ns`.
    pub fn forward(&self, x: Tensor, timing: &mut BlockTiming) -> candle_core::Result<Tensor> {
        let t0 = Instant::now();
        let f = self.norm.forward(&x)?;
        let up = self.up.forward(&f)?;
        let h = match &self.gate {
            Some(g) => (activate(&g.forward(&f)?, self.activation)? * up)?,
            None => activate(&up, self.activation)?,
        };
        let out = (x + self.down.forward(&h)?)?;
        timing.ffn_ns = elapsed_ns(t0, out.device())?;
        Ok(out)
    }
}
