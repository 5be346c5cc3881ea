//! GELU (tanh approximation) as one fused candle operation with a one-pass backward.
//!
//! candle's own `gelu` differentiates through about fifteen element-wise tensor operations, each a
//! full pass with its own allocation over the `tokens x experts x hidden` activations, which on a
//! CPU costs more than the expert matmuls themselves. The forward value is exactly
//! [`Activation::Gelu`](crate::kernel::Activation) (`Activation::apply`).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use crate::kernel::Activation;

const C: f32 = 0.797_884_6; // sqrt(2/pi), as in Activation::apply
const A: f32 = 0.044_715;

/// d/dx of the tanh-approximated GELU.
#[inline]
fn gelu_grad(x: f32) -> f32 {
    let th = (C * (x + A * x * x * x)).tanh();
    0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * C * (1.0 + 3.0 * A * x * x)
}

fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// `out[i] = f(i)` over `n` elements, split across threads for large `n`.
fn par_fill(n: usize, f: impl Fn(usize) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0.0f32; n];
    let t = threads().min(n / (1 << 15)).max(1);
    if t == 1 {
        for (i, o) in out.iter_mut().enumerate() {
            *o = f(i);
        }
        return out;
    }
    let chunk = n.div_ceil(t);
    std::thread::scope(|s| {
        for (c, part) in out.chunks_mut(chunk).enumerate() {
            let f = &f;
            s.spawn(move || {
                for (j, o) in part.iter_mut().enumerate() {
                    *o = f(c * chunk + j);
                }
            });
        }
    });
    out
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused gelu needs a contiguous input".into()))?;
    Ok(&s.as_slice::<f32>()?[a..b])
}

struct GeluFused;

impl CustomOp1 for GeluFused {
    fn name(&self) -> &'static str {
        "gelu-tanh-fused"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l)?;
        let out = par_fill(x.len(), |i| Activation::Gelu.apply(x[i]));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = arg
            .contiguous()?
            .apply_op2_no_bwd(&grad_res.contiguous()?, &GeluFusedGrad)?;
        Ok(Some(g))
    }
}

struct GeluFusedGrad;

impl CustomOp2 for GeluFusedGrad {
    fn name(&self) -> &'static str {
        "gelu-tanh-fused-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1)?;
        let g = contiguous_f32(s2, l2)?;
        if x.len() != g.len() {
            candle_core::bail!("fused gelu grad: {} vs {} elements", x.len(), g.len());
        }
        let out = par_fill(x.len(), |i| g[i] * gelu_grad(x[i]));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// GELU (tanh approximation) of an f32 CPU tensor, differentiable, with a fused backward.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(GeluFused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn forward_matches_activation_and_backward_matches_candle() {
        let xs: Vec<f32> = (0..70_001).map(|i| (i as f32 - 35_000.0) * 2e-4).collect();
        let v = Var::from_vec(xs.clone(), xs.len(), &Device::Cpu).unwrap();
        let y = gelu(v.as_tensor()).unwrap();
        let yv = y.to_vec1::<f32>().unwrap();
        for (x, y) in xs.iter().zip(&yv) {
            assert_eq!(*y, Activation::Gelu.apply(*x));
        }
        // Weighted sum so that every element gets a different upstream gradient.
        let w = Tensor::from_vec(
            (0..xs.len())
                .map(|i| (i % 7) as f32 - 3.0)
                .collect::<Vec<_>>(),
            xs.len(),
            &Device::Cpu,
        )
        .unwrap();
        let g1 = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g1 = g1.get(&v).unwrap().to_vec1::<f32>().unwrap();
        let y2 = v.as_tensor().gelu().unwrap();
        let g2 = (y2 * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = g2.get(&v).unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in g1.iter().zip(&g2) {
            assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }
}
