//! The router of one converted block: a linear map `d -> E` trained so that
//! `softmax(router(f))` predicts each expert's share of the FFN output for `f` (the normalised
//! norms of the experts' contributions). A threshold `t` then keeps the experts that carry `t` of
//! the predicted output mass: the XMoE rule, unchanged.

use anyhow::Result;
use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

/// How the router is trained.
#[derive(Clone, Copy, Debug)]
pub struct RouterTraining {
    /// AdamW steps.
    pub steps: usize,
    /// Tokens per step.
    pub batch: usize,
    /// Learning rate (decayed linearly to a tenth over the last third of the steps).
    pub lr: f64,
}

impl Default for RouterTraining {
    fn default() -> Self {
        // About 40 passes over the default 8192 calibration tokens; the held-out KL each
        // conversion prints shows whether it was enough.
        Self {
            steps: 300,
            batch: 1024,
            lr: 0.01,
        }
    }
}

/// A trained router and how well it fits tokens it did not train on.
pub struct TrainedRouter {
    /// `[E, d]`.
    pub weight: Tensor,
    /// Held-out mean KL divergence (nats) from the true shares to the predicted ones.
    pub heldout_kl: f64,
    /// Held-out mean KL (nats) of the uniform prediction, for scale.
    pub uniform_kl: f64,
}

/// Soft-target cross-entropy `-mean_n sum_e s_ne log softmax(z)_ne`.
fn soft_ce(logits: &Tensor, shares: &Tensor) -> candle_core::Result<Tensor> {
    let lp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    (shares * lp)?.sum(D::Minus1)?.mean_all()?.neg()
}

/// Mean over tokens of `sum_e s log s`: the shares' own negative entropy (so CE + this = KL).
fn neg_entropy(shares: &Tensor) -> candle_core::Result<f64> {
    let s = shares.clamp(1e-30, 1.0)?;
    (shares * s.log()?)?
        .sum(D::Minus1)?
        .mean_all()?
        .to_scalar::<f32>()
        .map(f64::from)
}

/// Trains a router on `inputs` `[n, d]` (the FFN's normed inputs) to predict `shares` `[n, E]`
/// (rows sum to 1). The last tenth of the tokens is held out to measure the fit.
pub fn train(
    inputs: &Tensor,
    shares: &Tensor,
    how: RouterTraining,
    seed: u64,
) -> Result<TrainedRouter> {
    let (n, d) = inputs.dims2()?;
    let e = shares.dim(1)?;
    let held = (n / 10).max(1);
    let n_train = n - held;
    let (xt, st) = (inputs.narrow(0, 0, n_train)?, shares.narrow(0, 0, n_train)?);
    let (xv, sv) = (
        inputs.narrow(0, n_train, held)?,
        shares.narrow(0, n_train, held)?,
    );
    let w = Var::from_tensor(&Tensor::zeros((e, d), DType::F32, &Device::Cpu)?)?;
    let mut opt = AdamW::new(
        vec![w.clone()],
        ParamsAdamW {
            lr: how.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<u32> = (0..n_train as u32).collect();
    let batch = how.batch.min(n_train);
    let mut cursor = n_train;
    for step in 0..how.steps {
        if cursor + batch > n_train {
            order.shuffle(&mut rng);
            cursor = 0;
        }
        let idx = Tensor::from_slice(&order[cursor..cursor + batch], batch, &Device::Cpu)?;
        cursor += batch;
        let (xb, sb) = (xt.index_select(&idx, 0)?, st.index_select(&idx, 0)?);
        let loss = soft_ce(&xb.matmul(&w.as_tensor().t()?)?, &sb)?;
        let decay_from = how.steps * 2 / 3;
        if step >= decay_from {
            let frac = (step - decay_from) as f64 / (how.steps - decay_from).max(1) as f64;
            opt.set_learning_rate(how.lr * (1.0 - 0.9 * frac));
        }
        opt.backward_step(&loss)?;
    }
    let weight = w.as_tensor().clone();
    let ce = soft_ce(&xv.matmul(&weight.t()?)?, &sv)?.to_scalar::<f32>()? as f64;
    let ne = neg_entropy(&sv)?;
    Ok(TrainedRouter {
        weight,
        heldout_kl: ce + ne,
        uniform_kl: (e as f64).ln() + ne,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_router_learns_shares_that_a_linear_map_can_express() {
        // Shares softmax(A x) for a fixed A: the trained router must get far closer than uniform.
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2000, 8), &dev).unwrap();
        let a = Tensor::randn(0f32, 1.0, (4, 8), &dev).unwrap();
        let s = candle_nn::ops::softmax_last_dim(&x.matmul(&a.t().unwrap()).unwrap()).unwrap();
        let r = train(
            &x,
            &s,
            RouterTraining {
                steps: 300,
                batch: 256,
                lr: 0.05,
            },
            1,
        )
        .unwrap();
        assert!(
            r.heldout_kl < 0.1 * r.uniform_kl,
            "held-out KL {} vs uniform {}",
            r.heldout_kl,
            r.uniform_kl
        );
    }
}
