//! LayerNorm (weight and bias) or RMSNorm (weight only) over the last dimension.

use candle_core::Tensor;

use super::cpu_slice;

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

    /// Normalises every row of `x`. An RMSNorm of f32 rows on the CPU runs
    /// `kernel::norm` (the lean decoder's arithmetic); the rest runs candle-nn's.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.b {
            Some(b) => candle_nn::ops::layer_norm(x, &self.w, b, self.eps),
            None => match self.rms_on_cpu(x)? {
                Some(y) => Ok(y),
                None => candle_nn::ops::rms_norm(x, &self.w, self.eps),
            },
        }
    }

    fn rms_on_cpu(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // `cpu_slice` is `None` for another device or dtype: those run candle-nn's norm.
        if !x.device().is_cpu() || x.dims().last() != Some(&self.w.elem_count()) {
            return Ok(None);
        }
        let x = x.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = self.w.storage_and_layout();
        let (Some(xv), Some(wv)) = (cpu_slice::<f32>(&xs, xl), cpu_slice::<f32>(&ws, wl)) else {
            return Ok(None);
        };
        if wv.is_empty() {
            return Ok(None);
        }
        let mut out = vec![0f32; xv.len()];
        crate::kernel::norm::rms_norm_rows(xv, wv, self.eps, &mut out);
        Tensor::from_vec(out, x.shape(), x.device()).map(Some)
    }
}
