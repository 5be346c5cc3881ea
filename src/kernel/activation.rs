//! The FFN and expert nonlinearity, shared by the CPU kernel and the model (which names it in its
//! configuration); it lives here so that the kernel needs nothing from the model.

use serde::{Deserialize, Serialize};

/// FFN and expert nonlinearity.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// GELU, tanh approximation.
    Gelu,
    /// SiLU (swish).
    Silu,
}

impl Activation {
    /// Applies the activation to one value (f32, as the engine computes).
    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Gelu => {
                const C: f32 = 0.797_884_6; // sqrt(2/pi)
                0.5 * x * (1.0 + (C * (x + 0.044_715 * x * x * x)).tanh())
            }
            Activation::Silu => x / (1.0 + (-x).exp()),
        }
    }
}

/// gpt-oss's clamped SwiGLU between a gated expert's projections (transformers
/// `GptOssExperts._apply_gate`): `gate = min(gate, limit)`, `up = clamp(up, -limit, limit)`,
/// `out = (up + 1) * gate * sigmoid(alpha * gate)`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct ClampedSwiglu {
    /// Slope inside the sigmoid (`swiglu_alpha`, 1.702 in gpt-oss).
    pub alpha: f32,
    /// Clamp bound (`swiglu_limit`, 7.0 in gpt-oss).
    pub limit: f32,
}

impl ClampedSwiglu {
    /// The hidden value of one unit from its gate and up pre-activations (biases included).
    #[inline]
    pub fn apply(self, gate: f32, up: f32) -> f32 {
        let g = gate.min(self.limit);
        let u = up.clamp(-self.limit, self.limit);
        (u + 1.0) * g / (1.0 + (-self.alpha * g).exp())
    }
}
