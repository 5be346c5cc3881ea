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
    /// Multiply a stored bf16 weight on AMX tiles when a pass has enough rows (`--moe-dispatch
    /// amx`: the model computes its bf16 products with bf16 activations throughout).
    amx: bool,
}

impl Linear {
    /// From a weight in the usual `[out, in]` layout and an optional `[out]` bias; the weight is
    /// transposed once so that every pass multiplies a contiguous `[in, out]` matrix.
    pub fn new(weight: &Tensor, bias: Option<Tensor>) -> candle_core::Result<Self> {
        Ok(Self {
            w: Weight::Transposed(weight.t()?.contiguous()?),
            b: bias,
            amx: false,
        })
    }

    /// From a weight `[out, in]` kept as it is, in its own dtype (no copy, no transpose); the bias,
    /// if any, is widened to f32 now.
    pub fn stored(weight: Tensor, bias: Option<Tensor>) -> candle_core::Result<Self> {
        Ok(Self {
            w: Weight::Stored(weight),
            b: bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
            amx: false,
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
            amx: false,
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

    /// With `on`, a stored bf16 weight is multiplied on Intel AMX tiles where the CPU has them
    /// and a pass has at least [`AMX_MIN_ROWS`] rows, the activations rounded to bf16; other
    /// weights and passes are unchanged.
    pub fn on_amx(mut self, on: bool) -> Self {
        self.amx = on;
        self
    }

    /// `x` = [n, in] (f32) -> [n, out] (f32).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = match &self.w {
            Weight::Transposed(w_t) => x.matmul(w_t)?,
            Weight::Stored(w) => self.stored_forward(x, w)?,
            Weight::Quant(q) => q.forward(x)?,
        };
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

impl Linear {
    /// `x w^T` for a stored weight: the first of one row's matrix-vector product, the AMX tiles
    /// (when on), the in-place rows of a large half-precision weight, and candle's matmul of the
    /// widened weight that applies.
    fn stored_forward(&self, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(y) = stored_matvec(x, w)? {
            return Ok(y);
        }
        if self.amx
            && let Some(y) = stored_amx(x, w)?
        {
            return Ok(y);
        }
        if let Some(y) = stored_rows(x, w)? {
            return Ok(y);
        }
        // `to_dtype` to the same dtype is a cheap clone: an f32 weight is not copied.
        x.matmul(&w.to_dtype(x.dtype())?.t()?)
    }
}

/// Fewer rows than this stay on the f32 path: an AMX tile takes 16 rows, and a decode step's
/// one row has its own matrix-vector product.
pub const AMX_MIN_ROWS: usize = 16;

/// `x w^T` on AMX tiles for f32 `x` with at least [`AMX_MIN_ROWS`] rows and a contiguous bf16
/// `w` on the CPU; `None` where the shapes, dtypes or CPU do not allow it.
fn stored_amx(x: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let dims = x.dims();
    let Some(&k) = dims.last() else {
        return Ok(None);
    };
    let (n, w_in) = w.dims2()?;
    let rows = x.elem_count() / k.max(1);
    if !x.device().is_cpu()
        || x.dtype() != DType::F32
        || w.dtype() != DType::BF16
        || w_in != k
        || rows < AMX_MIN_ROWS
    {
        return Ok(None);
    }
    let (storage, layout) = w.storage_and_layout();
    let Some(wv) = super::cpu_slice::<half::bf16>(&storage, layout) else {
        return Ok(None);
    };
    let threads = rayon::current_num_threads();
    product_rows(x, n, |xv, rows, y| {
        crate::kernel::amx_linear(xv, rows, k, wv, n, y, threads)
    })
}

/// `f(x, rows, y)` on `x`'s values as `[rows, k]` (f32 on the CPU, made contiguous) into a new
/// `[rows, n]` output shaped as `x` with its last dimension `n`; `None` where `x` is not such a
/// tensor or `f` declines (returns false).
fn product_rows(
    x: &Tensor,
    n: usize,
    f: impl FnOnce(&[f32], usize, &mut [f32]) -> bool,
) -> candle_core::Result<Option<Tensor>> {
    let dims = x.dims();
    let k = dims.last().copied().unwrap_or(0).max(1);
    let x = x.contiguous()?;
    let (xs, xl) = x.storage_and_layout();
    let Some(xv) = super::cpu_slice::<f32>(&xs, xl) else {
        return Ok(None);
    };
    let rows = xv.len() / k;
    let mut y = vec![0f32; rows * n];
    if !f(xv, rows, &mut y) {
        return Ok(None);
    }
    let mut shape = dims.to_vec();
    if let Some(last) = shape.last_mut() {
        *last = n;
    }
    Tensor::from_vec(y, shape, x.device()).map(Some)
}

/// Half-precision weights of at least this many bytes are multiplied in place
/// ([`stored_rows`]); smaller ones are widened and go to candle's `gemm`, which was faster for
/// them: on the Intel Xeon of `docs/benchmarks.md` ("Fused attention"), 256 rows against a
/// 2048 x 2048 bf16 weight (8 MiB) took 16 ms through `gemm` and 18-22 ms in place, against
/// OLMoE's 50304 x 2048 LM head (206 MB) 675 ms and 382-587 ms.
const ROWS_MIN_BYTES: usize = 32 << 20;

/// `x w^T` for f32 `x` and a contiguous half-precision `w` of [`ROWS_MIN_BYTES`] or more on the
/// CPU, read in place by the expert kernel's dot-product tiles (`kernel::dense_rows`): exact f32
/// arithmetic without the f32 copy of the whole weight that `to_dtype` writes and reads back at
/// every pass (412 MB per pass for OLMoE's LM head). `None` where this does not apply.
fn stored_rows(x: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let dims = x.dims();
    let Some(&k) = dims.last() else {
        return Ok(None);
    };
    let (n, w_in) = w.dims2()?;
    if !x.device().is_cpu()
        || !w.device().is_cpu()
        || x.dtype() != DType::F32
        || !matches!(w.dtype(), DType::F16 | DType::BF16)
        || w_in != k
        || k == 0
        || w.elem_count() * w.dtype().size_in_bytes() < ROWS_MIN_BYTES
    {
        return Ok(None);
    }
    let (storage, layout) = w.storage_and_layout();
    let threads = rayon::current_num_threads();
    let auto = crate::kernel::KernelVariant::Auto;
    if let Some(wv) = super::cpu_slice::<half::bf16>(&storage, layout) {
        product_rows(x, n, |xv, rows, y| {
            crate::kernel::dense_rows(auto, xv, rows, k, wv, n, y, threads);
            true
        })
    } else if let Some(wv) = super::cpu_slice::<half::f16>(&storage, layout) {
        product_rows(x, n, |xv, rows, y| {
            crate::kernel::dense_rows(auto, xv, rows, k, wv, n, y, threads);
            true
        })
    } else {
        Ok(None)
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
/// in place, split over the rayon pool when it is large enough (`model::decode::SPLIT_MIN_BYTES`,
/// or `POOL_SPLIT_MIN_BYTES` from a pool thread). Shared by [`Linear::forward`] for one row and
/// the lean decoder's projections.
pub(crate) fn matvec_stored(w: &Tensor, x: &[f32], y: &mut [f32]) -> candle_core::Result<()> {
    use crate::kernel::matvec::matvec_rows_split;
    use candle_core::Storage;
    let bytes = w.elem_count() * w.dtype().size_in_bytes();
    let parts = crate::model::decode::split_parts(bytes);
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
    fn large_half_precision_weights_are_read_in_place_and_agree_with_the_widened_matmul() {
        let dev = Device::Cpu;
        // 4100 x 4096 bf16 or f16: just over `ROWS_MIN_BYTES`, and an odd row count.
        let (n, k) = (4100, 4096);
        assert!(n * k * 2 >= ROWS_MIN_BYTES);
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, k), &dev).unwrap();
        for dtype in [DType::BF16, DType::F16] {
            let wd = w.to_dtype(dtype).unwrap();
            let fast = stored_rows(&x, &wd).unwrap().expect("in place");
            let want = x
                .matmul(&wd.to_dtype(DType::F32).unwrap().t().unwrap())
                .unwrap();
            let diff = super::super::max_abs_diff(&fast, &want);
            assert!(diff < 1e-4, "{dtype:?}: {diff}");
            // Through `forward`, with a bias: the same product.
            let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            let y = Linear::stored(wd.clone(), Some(b.clone()))
                .unwrap()
                .forward(&x)
                .unwrap();
            let want = want.broadcast_add(&b).unwrap();
            let diff = super::super::max_abs_diff(&y, &want);
            assert!(diff < 1e-4, "{dtype:?} forward: {diff}");
        }
        // Smaller weights stay on the widened matmul.
        let small = Tensor::zeros((64, 64), DType::BF16, &dev).unwrap();
        let x = Tensor::zeros((2, 64), DType::F32, &dev).unwrap();
        assert!(stored_rows(&x, &small).unwrap().is_none());
    }

    #[test]
    fn bf16_weights_on_amx_match_the_f32_path_on_rounded_activations() {
        if !crate::kernel::KernelVariant::Amx.is_supported() {
            println!("skipped: no AMX here");
            return;
        }
        // 40 rows: a full block of 32 and a partial one; 48 outputs: three tiles of 16; 300
        // rows over both threads; 24 rows of 32 (one step), the test models' shape.
        for (rows, k, n) in [(40, 96, 48), (300, 64, 512), (24, 32, 48), (16, 32, 16)] {
            check_amx(rows, k, n);
        }
    }

    fn check_amx(rows: usize, k: usize, n: usize) {
        let dev = Device::Cpu;
        let val = |i: usize, s: f32| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * s;
        let w: Vec<f32> = (0..n * k).map(|i| val(i, 0.1)).collect();
        let x: Vec<f32> = (0..rows * k).map(|i| val(i + 3, 1.0)).collect();
        let w = Tensor::from_vec(w, (n, k), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let x = Tensor::from_vec(x, (rows, k), &dev).unwrap();
        let b = Tensor::from_vec((0..n).map(|i| i as f32).collect::<Vec<_>>(), n, &dev).unwrap();
        let rounded = x
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let plain = Linear::stored(w.clone(), Some(b.clone())).unwrap();
        let amx = Linear::stored(w, Some(b)).unwrap().on_amx(true);
        let want = plain.forward(&rounded).unwrap().to_vec2::<f32>().unwrap();
        let got = amx.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        let unrounded = plain.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        let mut moved = false;
        for (i, (g, w)) in got.iter().flatten().zip(want.iter().flatten()).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "element {i}: {g} against {w}"
            );
        }
        for (g, u) in got.iter().flatten().zip(unrounded.iter().flatten()) {
            moved |= g != u;
        }
        assert!(moved, "the AMX path did not run (no rounding seen)");
        // Below 16 rows the f32 path runs, bit for bit.
        let few = x.narrow(0, 0, 15).unwrap();
        let plain15 = plain.forward(&few).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(
            amx.forward(&few).unwrap().to_vec2::<f32>().unwrap(),
            plain15
        );
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
