//! A dense projection `x @ W^T + b`.

use candle_core::Tensor;

/// A linear layer, its weight stored transposed.
pub struct Linear {
    /// [in, out], contiguous, so that `x @ w_t` needs no transposed-stride matmul.
    w_t: Tensor,
    b: Option<Tensor>,
}

impl Linear {
    /// From a weight in the usual `[out, in]` layout and an optional `[out]` bias.
    pub fn new(weight: &Tensor, bias: Option<Tensor>) -> candle_core::Result<Self> {
        Ok(Self {
            w_t: weight.t()?.contiguous()?,
            b: bias,
        })
    }

    /// `x` = [n, in] -> [n, out].
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = x.matmul(&self.w_t)?;
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}
