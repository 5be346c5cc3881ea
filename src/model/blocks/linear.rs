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
            Weight::Stored(w) => match stored_matvec(x, w)? {
                Some(y) => y,
                None => x.matmul(&w.to_dtype(x.dtype())?.t()?)?,
            },
            Weight::Quant(q) => q.forward(x)?,
        };
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// `x @ w^T` for one row of `x` on the CPU, reading a stored weight in place (a decode step
/// outside the lean decoder: DeepSeek, gpt-oss). Widening a half-precision weight to f32 first
/// would write it whole and read it back for one token: 605 ms of a 1 s step for
/// DeepSeek-V2-Lite's 419 MB LM head. `None` where this does not apply (several rows, another
/// device or dtype, a shape the matmul should report).
fn stored_matvec(x: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let dims = x.dims();
    let Some(&n_in) = dims.last() else {
        return Ok(None);
    };
    let (out, w_in) = w.dims2()?;
    if !x.device().is_cpu()
        || !w.device().is_cpu()
        || x.dtype() != DType::F32
        || !matches!(w.dtype(), DType::F32 | DType::F16 | DType::BF16)
        || n_in == 0
        || x.elem_count() != n_in
        || w_in != n_in
        || !w.is_contiguous()
    {
        return Ok(None);
    }
    let xv = x.flatten_all()?.to_vec1::<f32>()?;
    let mut y = vec![0f32; out];
    matvec_stored(w, &xv, &mut y)?;
    let mut shape = dims.to_vec();
    if let Some(last) = shape.last_mut() {
        *last = out;
    }
    Tensor::from_vec(y, shape, x.device()).map(Some)
}

/// `y = w x` for a weight `[out, in]` kept on the CPU in its stored dtype (f32, f16 or bf16), read
/// in place, on every thread when it is large (`model::decode::SPLIT_MIN_BYTES`). Shared by
/// [`Linear::forward`] for one row and the lean decoder's projections.
pub(crate) fn matvec_stored(w: &Tensor, x: &[f32], y: &mut [f32]) -> candle_core::Result<()> {
    use crate::kernel::matvec::matvec_rows_split;
    use candle_core::Storage;
    let bytes = w.elem_count() * w.dtype().size_in_bytes();
    let parts = if crate::model::decode::SPLIT_MIN_BYTES.is_some_and(|min| bytes >= min) {
        rayon::current_num_threads()
    } else {
        1
    };
    let (storage, layout) = w.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("a weight left the CPU");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("a weight is not contiguous");
    };
    match w.dtype() {
        DType::F32 => matvec_rows_split(&cpu.as_slice::<f32>()?[start..end], x, y, parts),
        DType::F16 => matvec_rows_split(&cpu.as_slice::<half::f16>()?[start..end], x, y, parts),
        DType::BF16 => matvec_rows_split(&cpu.as_slice::<half::bf16>()?[start..end], x, y, parts),
        other => candle_core::bail!("{other:?} weight for a matrix-vector product"),
    }
    Ok(())
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

    #[test]
    fn one_row_reads_the_stored_weight_in_place_and_agrees_with_the_matmul() {
        let dev = Device::Cpu;
        let (out, n_in) = (37, 70);
        let w: Vec<f32> = (0..out * n_in)
            .map(|i| ((i * 7919 % 211) as f32 - 105.0) / 64.0)
            .collect();
        let w = Tensor::from_vec(w, (out, n_in), &dev).unwrap();
        let b = Tensor::arange(0f32, out as f32, &dev).unwrap();
        let x: Vec<f32> = (0..n_in).map(|i| (i as f32 * 0.37).sin()).collect();
        // A decode step's shape: [batch 1, 1 token, in].
        let x = Tensor::from_vec(x, (1, 1, n_in), &dev).unwrap();
        let reference = Linear::new(&w, Some(b.clone()))
            .unwrap()
            .forward(&x.reshape((1, n_in)).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let stored = w.to_dtype(dtype).unwrap();
            assert!(stored_matvec(&x, &stored).unwrap().is_some(), "{dtype:?}");
            let y = Linear::stored(stored, Some(b.clone()))
                .unwrap()
                .forward(&x)
                .unwrap();
            assert_eq!(y.dims(), &[1, 1, out]);
            // The weights are multiples of 1/64 below 2 in magnitude: exact in every dtype.
            for (o, (g, r)) in y
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .zip(&reference)
                .enumerate()
            {
                assert!(
                    (g - r).abs() <= 1e-4 * (1.0 + r.abs()),
                    "{dtype:?} row {o}: {g} vs {r}"
                );
            }
        }
        // Two rows go to the matmul.
        let two = Tensor::zeros((2, n_in), DType::F32, &dev).unwrap();
        assert!(stored_matvec(&two, &w).unwrap().is_none());
    }
}
