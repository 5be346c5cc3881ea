//! LayerNorm (weight and bias) or RMSNorm (weight only) over the last dimension.

use candle_core::Tensor;

/// A normalisation layer; the presence of a bias makes it a LayerNorm.
pub struct Norm {
    w: Tensor,
    b: Option<Tensor>,
    eps: f32,
}

impl Norm {
    /// LayerNorm when `bias` is given, RMSNorm otherwise.
    pub fn new(weight: Tensor, bias: Option<Tensor>, eps: f32) -> Self {
        Self {
            w: weight,
            b: bias,
            eps,
        }
    }

    /// Weight, bias (LayerNorm only) and epsilon, for code that runs the norm on plain slices
    /// (the lean decode path, `model::decode`).
    pub fn parts(&self) -> (&Tensor, Option<&Tensor>, f32) {
        (&self.w, self.b.as_ref(), self.eps)
    }

    /// Normalises every row of `x`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.b {
            Some(b) => candle_nn::ops::layer_norm(x, &self.w, b, self.eps),
            None => candle_nn::ops::rms_norm(x, &self.w, self.eps),
        }
    }
}
