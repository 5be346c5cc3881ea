//! A MoE layer's experts and how they compute the selected (token, expert) pairs.

use candle_core::{Device, Tensor};

use super::config::Activation;
use super::format::{LoadError, ModelFile};
use super::forward::activate;
use crate::routing::ExpertGroups;

/// How the experts of a MoE layer compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MoeDispatch {
    /// The fastest path for the device.
    #[default]
    Auto,
    /// Per-expert candle ops: gather the expert's rows (`index_select`), two matmuls, scatter-add
    /// (`index_add`). Works on every candle device; the baseline the CPU kernel must beat.
    Candle,
}

/// The experts of one MoE layer.
pub struct MoeExperts {
    n_experts: usize,
    activation: Activation,
    /// [E, d, h]: each expert's up projection transposed for `x @ up_t`.
    up_t: Tensor,
    gate_t: Option<Tensor>,
    /// [E, h, d].
    down_t: Tensor,
    up_b: Option<Tensor>,
    down_b: Option<Tensor>,
    dispatch: MoeDispatch,
}

impl MoeExperts {
    /// Loads block `layer`'s experts (stacked or per-expert form) onto `device`.
    pub fn load(file: &ModelFile, layer: usize, device: &Device) -> Result<Self, LoadError> {
        let cfg = file.config();
        let (e, d, h) = (cfg.n_experts, cfg.d_model, cfg.expert_hidden);
        let p = format!("layers.{layer}.moe.experts");
        let stacked = |suffix: &str, per: &str, shape: &[usize]| -> Vec<f32> {
            if file.is_per_expert(layer) {
                (0..e)
                    .flat_map(|x| file.f32(&format!("{p}.{x}.{per}")))
                    .collect()
            } else {
                debug_assert_eq!(file.raw(&format!("{p}.{suffix}")).shape, shape);
                file.f32(&format!("{p}.{suffix}"))
            }
        };
        let de = |err: candle_core::Error| LoadError::Device {
            path: file.path().to_path_buf(),
            detail: err.to_string(),
        };
        let transposed = |v: Vec<f32>, a: usize, b: usize| -> Result<Tensor, LoadError> {
            Tensor::from_vec(v, (e, a, b), device)
                .and_then(|t| t.transpose(1, 2))
                .and_then(|t| t.contiguous())
                .map_err(de)
        };
        let up_t = transposed(stacked("up_proj", "up_proj.weight", &[e, h, d]), h, d)?;
        let gate_t = if cfg.gated {
            Some(transposed(
                stacked("gate_proj", "gate_proj.weight", &[e, h, d]),
                h,
                d,
            )?)
        } else {
            None
        };
        let down_t = transposed(stacked("down_proj", "down_proj.weight", &[e, d, h]), d, h)?;
        let (up_b, down_b) = if cfg.expert_bias {
            (
                Some(
                    Tensor::from_vec(stacked("up_bias", "up_proj.bias", &[e, h]), (e, h), device)
                        .map_err(de)?,
                ),
                Some(
                    Tensor::from_vec(
                        stacked("down_bias", "down_proj.bias", &[e, d]),
                        (e, d),
                        device,
                    )
                    .map_err(de)?,
                ),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            n_experts: e,
            activation: cfg.activation,
            up_t,
            gate_t,
            down_t,
            up_b,
            down_b,
            dispatch: MoeDispatch::Auto,
        })
    }

    /// Chooses the dispatch.
    pub fn set_dispatch(&mut self, dispatch: MoeDispatch) {
        self.dispatch = dispatch;
    }

    /// `sum over kept pairs (t, e, w) of w * expert_e(x[t])` for `x` = [T, d]; rows without a
    /// pair are zero. Only the grouped rows are computed.
    pub fn forward(&self, x: &Tensor, groups: &ExpertGroups) -> candle_core::Result<Tensor> {
        debug_assert_eq!(groups.n_experts(), self.n_experts);
        match self.dispatch {
            MoeDispatch::Auto | MoeDispatch::Candle => self.forward_candle(x, groups),
        }
    }

    fn forward_candle(&self, x: &Tensor, groups: &ExpertGroups) -> candle_core::Result<Tensor> {
        let device = x.device();
        let mut y = x.zeros_like()?;
        for e in 0..self.n_experts {
            let (rows, weights) = groups.group(e);
            if rows.is_empty() {
                continue;
            }
            let n = rows.len();
            let idx = Tensor::from_slice(rows, n, device)?;
            let xs = x.index_select(&idx, 0)?;
            let mut up = xs.matmul(&self.up_t.get(e)?)?;
            if let Some(b) = &self.up_b {
                up = up.broadcast_add(&b.get(e)?)?;
            }
            let hidden = match &self.gate_t {
                Some(g) => (activate(&xs.matmul(&g.get(e)?)?, self.activation)? * up)?,
                None => activate(&up, self.activation)?,
            };
            let mut out = hidden.matmul(&self.down_t.get(e)?)?;
            if let Some(b) = &self.down_b {
                out = out.broadcast_add(&b.get(e)?)?;
            }
            let w = Tensor::from_slice(weights, (n, 1), device)?;
            y = y.index_add(&idx, &out.broadcast_mul(&w)?, 0)?;
        }
        Ok(y)
    }
}
