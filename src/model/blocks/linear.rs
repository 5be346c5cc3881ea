//! A dense projection `x @ W^T + b`.

use candle_core::{DType, Tensor};

/// How a linear layer keeps its weight.
enum Weight {
    /// `[in, out]`, contiguous f32, so that `x @ w_t` needs no transposed-stride matmul (the
    /// project's own models, converted at load).
    Transposed(Tensor),
    /// `[out, in]` as stored in the checkpoint, in its own dtype (f32, f16 or bf16): a half-precision
    /// model keeps its size in memory, and each pass widens one weight at a time to f32.
    Stored(Tensor),
    /// `[out, in]` kept quantised (GGUF blocks), multiplied without dequantising the matrix.
    Quant(std::sync::Arc<crate::model::quant::QuantMatrix>),
}

/// How a [`Linear`] keeps its weight, as [`Linear::weight_view`] shows it.
pub enum LinearWeight<'a> {
    /// `[in, out]`, contiguous f32.
    Transposed(&'a Tensor),
    /// `[out, in]` in its stored dtype.
    Stored(&'a Tensor),
    /// Quantised blocks (GGUF), only multiplied through candle.
    Quantized,
}

/// A linear layer.
pub struct Linear {
    w: Weight,
    b: Option<Tensor>,
}

impl Linear {
    /// From a weight in the usual `[out, in]` layout and an optional `[out]` bias; the weight is
    /// transposed once so that every pass multiplies a contiguous `[in, out]` matrix.
    pub fn new(weight: &Tensor, bias: Option<Tensor>) -> candle_core::Result<Self> {
        Ok(Self {
            w: Weight::Transposed(weight.t()?.contiguous()?),
            b: bias,
        })
    }

    /// From a weight `[out, in]` kept as it is, in its own dtype (no copy, no transpose); the bias,
    /// if any, is widened to f32 now.
    pub fn stored(weight: Tensor, bias: Option<Tensor>) -> candle_core::Result<Self> {
        Ok(Self {
            w: Weight::Stored(weight),
            b: bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
        })
    }

    /// From a quantised weight `[out, in]` (shared, e.g. with a tied embedding table); the
    /// bias, if any, is widened to f32 now.
    pub fn quantized(
        weight: std::sync::Arc<crate::model::quant::QuantMatrix>,
        bias: Option<Tensor>,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            w: Weight::Quant(weight),
            b: bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
        })
    }

    /// The weight as this layer keeps it and the bias, for code that multiplies on plain slices
    /// (the lean decode path, `model::decode`).
    pub fn weight_view(&self) -> (LinearWeight<'_>, Option<&Tensor>) {
        let w = match &self.w {
            Weight::Transposed(t) => LinearWeight::Transposed(t),
            Weight::Stored(t) => LinearWeight::Stored(t),
            Weight::Quant(_) => LinearWeight::Quantized,
        };
        (w, self.b.as_ref())
    }

    /// `x` = [n, in] (f32) -> [n, out] (f32).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = match &self.w {
            Weight::Transposed(w_t) => x.matmul(w_t)?,
            // `to_dtype` to the same dtype is a cheap clone: an f32 weight is not copied.
            Weight::Stored(w) => x.matmul(&w.to_dtype(x.dtype())?.t()?)?,
            Weight::Quant(q) => q.forward(x)?,
        };
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn stored_half_precision_weights_match_the_transposed_f32_path() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 2., 3.], [-1., 0.5, 4.]], &dev).unwrap(); // [2, 3]
        let b = Tensor::new(&[0.25f32, -1.], &dev).unwrap();
        let x = Tensor::new(&[[1f32, 1., 1.], [2., 0., -1.]], &dev).unwrap();
        let reference = Linear::new(&w, Some(b.clone()))
            .unwrap()
            .forward(&x)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(reference, vec![vec![6.25, 2.5], vec![-0.75, -7.]]);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let l = Linear::stored(w.to_dtype(dtype).unwrap(), Some(b.clone())).unwrap();
            let y = l.forward(&x).unwrap();
            assert_eq!(y.dtype(), DType::F32);
            // These weights are exact in every dtype, so the results are too.
            assert_eq!(y.to_vec2::<f32>().unwrap(), reference, "{dtype:?}");
        }
    }
}
