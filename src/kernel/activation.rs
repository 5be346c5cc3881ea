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
