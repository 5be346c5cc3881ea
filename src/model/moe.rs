//! A MoE layer's experts and how they compute the selected (token, expert) pairs.

use std::sync::Mutex;

use candle_core::{DType, Device, Storage, Tensor};
use safetensors::Dtype;

use super::blocks::ffn::activate;
use super::format::{LoadError, ModelFile};
use crate::kernel::{Activation, ClampedSwiglu};
use crate::kernel::{
    ExpertData, ExpertRows, ExpertWeight, KernelVariant, MoeScratch, PackedExperts, RowSource,
    WeightDtype, moe_forward,
};
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
    /// The CPU kernel of [`crate::kernel`] with a given variant (CPU device only).
    Kernel(KernelVariant),
}

impl std::str::FromStr for MoeDispatch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => MoeDispatch::Auto,
            "candle" => MoeDispatch::Candle,
            "kernel" => MoeDispatch::Kernel(KernelVariant::Auto),
            "portable" => MoeDispatch::Kernel(KernelVariant::Portable),
            "avx2" => MoeDispatch::Kernel(KernelVariant::Avx2),
            "avx512" => MoeDispatch::Kernel(KernelVariant::Avx512),
            "avx512bf16" => MoeDispatch::Kernel(KernelVariant::Avx512Bf16),
            "amx" => MoeDispatch::Kernel(KernelVariant::Amx),
            "gemm" => MoeDispatch::Kernel(KernelVariant::Gemm),
            _ => {
                return Err(format!(
                    "expected auto, candle, kernel, portable, avx2, avx512, avx512bf16, amx or gemm, found `{s}`"
                ));
            }
        })
    }
}

/// Where the CPU kernel keeps a checkpoint's expert weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ExpertStorage {
    /// Read in place where the checkpoint allows it (Hugging Face float experts on the CPU
    /// kernel), packed otherwise.
    #[default]
    Auto,
    /// Packed into the kernel's panels at load (a copy the size of the experts).
    Packed,
    /// Read in place from the mapped checkpoint files; an error where that is not possible.
    InPlace,
}

impl std::str::FromStr for ExpertStorage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => ExpertStorage::Auto,
            "packed" => ExpertStorage::Packed,
            "in-place" => ExpertStorage::InPlace,
            _ => return Err(format!("expected auto, packed or in-place, found `{s}`")),
        })
    }
}

/// How a model is loaded: MoE dispatch and CPU threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// How MoE layers compute.
    pub dispatch: MoeDispatch,
    /// Where the CPU kernel keeps expert weights.
    pub experts: ExpertStorage,
    /// Threads the CPU kernel may use.
    pub threads: usize,
    /// The scores a threshold ranks on in a sigmoid router (DeepSeek-V3); ignored elsewhere.
    pub sigmoid_selection: crate::routing::SigmoidSelection,
}

/// Why `--expert-weights in-place` cannot be met when [`LoadOptions::experts_in_place`] is false
/// (completes "experts are ...").
pub(crate) const IN_PLACE_NEEDS_KERNEL: &str =
    "read in place only by the CPU kernel (--device cpu, --moe-dispatch other than candle)";

impl LoadOptions {
    /// True when these options let the CPU kernel read a checkpoint's experts in place on
    /// `device` (whether a given checkpoint allows it is decided at load).
    pub fn experts_in_place(&self, device: &Device) -> bool {
        device.is_cpu()
            && self.dispatch != MoeDispatch::Candle
            && self.experts != ExpertStorage::Packed
    }

    /// True when the dense bf16 products (attention projections, LM head) run on AMX tiles as
    /// well as the experts: `--moe-dispatch amx` on the CPU (see `Linear::on_amx`).
    pub fn dense_amx(&self, device: &Device) -> bool {
        device.is_cpu() && self.dispatch == MoeDispatch::Kernel(KernelVariant::Amx)
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dispatch: MoeDispatch::Auto,
            experts: ExpertStorage::Auto,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            sigmoid_selection: crate::routing::SigmoidSelection::Biased,
        }
    }
}

/// The kernel path: weights packed once at load, scratch reused across passes.
struct KernelExperts {
    packed: PackedExperts,
    variant: KernelVariant,
    threads: usize,
    // The model is used from one thread at a time; the lock is uncontended and keeps `forward(&self)`.
    scratch: Mutex<MoeScratch>,
}

/// The candle path (any device), weights in the file's dtype (f32, f16 or bf16).
struct CandleExperts {
    /// [E, d, h]: each expert's up projection transposed for `x @ up_t`.
    up_t: Tensor,
    gate_t: Option<Tensor>,
    /// [E, h, d].
    down_t: Tensor,
    up_b: Option<Tensor>,
    down_b: Option<Tensor>,
}

/// Per-expert weights kept as stored (f32, f16 or bf16), each widened to f32 only while it runs:
/// a half-precision checkpoint keeps its size in memory.
struct StoredExperts {
    gate: Vec<Tensor>,
    up: Vec<Tensor>,
    down: Vec<Tensor>,
    biases: Option<ExpertBiases>,
    clamped: Option<ClampedSwiglu>,
}

enum ExpertCompute {
    Kernel(Box<KernelExperts>),
    Candle(CandleExperts),
    Stored(StoredExperts),
    Quant(Box<super::quant::QuantExperts>),
}

/// The gated experts of one layer as `[out, in]` tensors, one per expert: `gate` and `up`
/// `[h, d]`, `down` `[d, h]` (views into a fused tensor are fine).
pub struct ExpertWeights {
    /// Gate projections.
    pub gate: Vec<Tensor>,
    /// Up projections.
    pub up: Vec<Tensor>,
    /// Down projections.
    pub down: Vec<Tensor>,
}

/// Per-expert biases of gated experts (gpt-oss), f32: `gate` and `up` `[h]`, `down` `[d]`.
pub struct ExpertBiases {
    /// Gate biases.
    pub gate: Vec<Tensor>,
    /// Up biases.
    pub up: Vec<Tensor>,
    /// Down (output) biases.
    pub down: Vec<Tensor>,
}

/// The experts of one MoE layer.
pub struct MoeExperts {
    n_experts: usize,
    activation: Activation,
    compute: ExpertCompute,
}

impl MoeExperts {
    /// Loads the experts stored under `prefix` onto `device`: stacked (`{prefix}.up_proj`
    /// [E, h, d], ...) or, when `per_expert`, one tensor per expert (`{prefix}.{e}.up_proj.weight`,
    /// ...).
    pub fn load(
        file: &ModelFile,
        prefix: &str,
        per_expert: bool,
        device: &Device,
        options: LoadOptions,
    ) -> Result<Self, LoadError> {
        let cfg = file.config();
        let (e, d, h) = (cfg.n_experts, cfg.d_model, cfg.expert_hidden);
        let p = prefix;
        let stacked = |suffix: &str, per: &str, shape: &[usize]| -> Vec<f32> {
            if per_expert {
                (0..e)
                    .flat_map(|x| file.f32(&format!("{p}.{x}.{per}")))
                    .collect()
            } else {
                debug_assert_eq!(file.raw(&format!("{p}.{suffix}")).shape, shape);
                file.f32(&format!("{p}.{suffix}"))
            }
        };
        let variant = match (options.dispatch, device.is_cpu()) {
            (MoeDispatch::Candle, _) | (MoeDispatch::Auto, false) => None,
            (MoeDispatch::Auto, true) => Some(KernelVariant::Auto),
            (MoeDispatch::Kernel(v), true) => Some(v),
            (MoeDispatch::Kernel(_), false) => {
                return Err(LoadError::Device {
                    path: file.path().to_path_buf(),
                    detail: "the CPU expert kernel needs --device cpu".into(),
                });
            }
        };
        if let Some(variant) = variant {
            if !variant.is_supported() {
                return Err(LoadError::Device {
                    path: file.path().to_path_buf(),
                    detail: format!("this CPU does not support the {variant:?} kernel"),
                });
            }
            let (ub, db) = if cfg.expert_bias {
                (
                    Some(stacked("up_bias", "up_proj.bias", &[e, h])),
                    Some(stacked("down_bias", "down_proj.bias", &[e, d])),
                )
            } else {
                (None, None)
            };
            let packed = match stored_half_dtype(file, p, per_expert, e, cfg.gated) {
                // Half-precision experts are packed straight from the file's bytes, one expert
                // at a time, in their own precision: no f32 copy of the layer is ever made.
                Some(Dtype::F16) => pack_from_file::<half::f16>(
                    file,
                    p,
                    per_expert,
                    cfg,
                    ub.as_deref(),
                    db.as_deref(),
                ),
                Some(Dtype::BF16) => pack_from_file::<half::bf16>(
                    file,
                    p,
                    per_expert,
                    cfg,
                    ub.as_deref(),
                    db.as_deref(),
                ),
                _ => {
                    let up = stacked("up_proj", "up_proj.weight", &[e, h, d]);
                    let gate = cfg
                        .gated
                        .then(|| stacked("gate_proj", "gate_proj.weight", &[e, h, d]));
                    let down = stacked("down_proj", "down_proj.weight", &[e, d, h]);
                    PackedExperts::new(
                        e,
                        d,
                        h,
                        cfg.activation,
                        &up,
                        gate.as_deref(),
                        &down,
                        ub.as_deref(),
                        db.as_deref(),
                    )
                }
            };
            return Ok(Self {
                n_experts: e,
                activation: cfg.activation,
                compute: ExpertCompute::Kernel(Box::new(KernelExperts {
                    packed,
                    variant: variant.resolve(),
                    threads: options.threads,
                    scratch: Mutex::new(MoeScratch::default()),
                })),
            });
        }
        let de = |err: candle_core::Error| LoadError::Device {
            path: file.path().to_path_buf(),
            detail: err.to_string(),
        };
        // Half-precision experts stay half on the device (the file's size, not twice it), each
        // expert widened to f32 only while it runs; f32 ones are uploaded as they are.
        let half = stored_half_dtype(file, p, per_expert, e, cfg.gated);
        let stacked_tensor =
            |suffix: &str, per: &str, a: usize, b: usize| -> Result<Tensor, LoadError> {
                let t = match half {
                    Some(dt) => {
                        let bytes: Vec<u8> = if per_expert {
                            (0..e)
                                .flat_map(|x| {
                                    file.raw(&format!("{p}.{x}.{per}")).data.iter().copied()
                                })
                                .collect()
                        } else {
                            file.raw(&format!("{p}.{suffix}")).data.to_vec()
                        };
                        let dtype = if dt == Dtype::F16 {
                            DType::F16
                        } else {
                            DType::BF16
                        };
                        Tensor::from_raw_buffer(&bytes, dtype, &[e, a, b], device)
                    }
                    None => Tensor::from_vec(stacked(suffix, per, &[e, a, b]), (e, a, b), device),
                };
                t.and_then(|t| t.transpose(1, 2))
                    .and_then(|t| t.contiguous())
                    .map_err(de)
            };
        let up_t = stacked_tensor("up_proj", "up_proj.weight", h, d)?;
        let gate_t = if cfg.gated {
            Some(stacked_tensor("gate_proj", "gate_proj.weight", h, d)?)
        } else {
            None
        };
        let down_t = stacked_tensor("down_proj", "down_proj.weight", d, h)?;
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
            compute: ExpertCompute::Candle(CandleExperts {
                up_t,
                gate_t,
                down_t,
                up_b,
                down_b,
            }),
        })
    }

    /// Gated experts from per-expert weights (a Hugging Face checkpoint). f32 weights on the CPU
    /// go to the packed kernel (unless the candle path is asked for); other dtypes, and other
    /// devices, keep the weights as stored and widen one expert at a time.
    pub fn from_weights(
        weights: ExpertWeights,
        activation: Activation,
        device: &Device,
        options: LoadOptions,
    ) -> candle_core::Result<Self> {
        let n_experts = weights.gate.len();
        // The kernel keeps f32, f16 and bf16 weights as they are (one dtype for the layer).
        let dtypes: Vec<DType> = [&weights.gate, &weights.up, &weights.down]
            .iter()
            .flat_map(|ws| ws.iter().map(|w| w.dtype()))
            .collect();
        let common = dtypes
            .first()
            .copied()
            .filter(|first| dtypes.iter().all(|d| d == first))
            .filter(|d| matches!(d, DType::F32 | DType::F16 | DType::BF16));
        let variant = match (options.dispatch, device.is_cpu(), common) {
            (MoeDispatch::Auto, true, Some(_)) => Some(KernelVariant::Auto),
            (MoeDispatch::Kernel(v), true, Some(_)) => Some(v),
            (MoeDispatch::Kernel(_), _, _) => candle_core::bail!(
                "the CPU expert kernel needs f32, f16 or bf16 expert weights (one dtype for the \
                 layer, found {dtypes}) on the CPU device; use --moe-dispatch candle",
                dtypes =
                    common.map_or_else(|| format!("{:?}", dedup(&dtypes)), |d| format!("{d:?}"))
            ),
            _ => None,
        };
        if let Some(variant) = variant {
            if !variant.is_supported() {
                candle_core::bail!("this CPU does not support the {variant:?} kernel");
            }
            let packed = match common {
                Some(DType::F16) => pack_tensors::<half::f16>(weights, activation)?,
                Some(DType::BF16) => pack_tensors::<half::bf16>(weights, activation)?,
                _ => pack_tensors::<f32>(weights, activation)?,
            };
            return Ok(Self {
                n_experts,
                activation,
                compute: ExpertCompute::Kernel(Box::new(KernelExperts {
                    packed,
                    variant: variant.resolve(),
                    threads: options.threads,
                    scratch: Mutex::new(MoeScratch::default()),
                })),
            });
        }
        let on_device = |ws: Vec<Tensor>| -> candle_core::Result<Vec<Tensor>> {
            ws.into_iter().map(|w| w.to_device(device)).collect()
        };
        Ok(Self {
            n_experts,
            activation,
            compute: ExpertCompute::Stored(StoredExperts {
                gate: on_device(weights.gate)?,
                up: on_device(weights.up)?,
                down: on_device(weights.down)?,
                biases: None,
                clamped: None,
            }),
        })
    }

    /// Gated SiLU experts (`down(silu(gate x) * up x)`, no biases: every family whose experts
    /// are read in place) that the CPU kernel reads where they lie ([`PackedExperts::from_rows`]:
    /// width `d`, hidden `h`, the matrices at `rows` in `sources`), with the variant
    /// `options.dispatch` asks for (`Auto` for anything but a kernel variant).
    ///
    /// # Errors
    /// A matrix outside its source, or a variant this CPU does not support.
    pub fn in_place(
        d: usize,
        h: usize,
        dtype: WeightDtype,
        sources: Vec<std::sync::Arc<dyn RowSource>>,
        rows: Vec<ExpertRows>,
        options: LoadOptions,
    ) -> Result<Self, String> {
        let activation = Activation::Silu;
        let packed =
            PackedExperts::from_rows(d, h, true, activation, dtype, sources, rows, None, None)?;
        let variant = match options.dispatch {
            MoeDispatch::Kernel(v) => v,
            MoeDispatch::Auto | MoeDispatch::Candle => KernelVariant::Auto,
        };
        if !variant.is_supported() {
            return Err(format!("this CPU does not support the {variant:?} kernel"));
        }
        Ok(Self {
            n_experts: packed.n_experts(),
            activation,
            compute: ExpertCompute::Kernel(Box::new(KernelExperts {
                packed,
                variant: variant.resolve(),
                threads: options.threads,
                scratch: Mutex::new(MoeScratch::default()),
            })),
        })
    }

    /// gpt-oss experts: gated, with gate/up/down biases and the clamped SwiGLU. They run on the
    /// per-expert candle path with the weights kept as given (bf16 stays bf16 and is widened one
    /// expert at a time): the CPU kernel has neither gate biases nor the clamp. Asking for the
    /// kernel (`--moe-dispatch kernel` and its variants) is an error.
    pub fn gated_with_biases(
        weights: ExpertWeights,
        biases: ExpertBiases,
        clamped: ClampedSwiglu,
        device: &Device,
        options: LoadOptions,
    ) -> candle_core::Result<Self> {
        if let MoeDispatch::Kernel(_) = options.dispatch {
            candle_core::bail!(
                "the CPU expert kernel has no gate biases or clamped SwiGLU (gpt-oss experts); \
                 use --moe-dispatch auto or --moe-dispatch candle"
            );
        }
        let n_experts = weights.gate.len();
        let on_device = |ws: Vec<Tensor>| -> candle_core::Result<Vec<Tensor>> {
            ws.into_iter().map(|w| w.to_device(device)).collect()
        };
        Ok(Self {
            n_experts,
            activation: Activation::Silu,
            compute: ExpertCompute::Stored(StoredExperts {
                gate: on_device(weights.gate)?,
                up: on_device(weights.up)?,
                down: on_device(weights.down)?,
                biases: Some(ExpertBiases {
                    gate: on_device(biases.gate)?,
                    up: on_device(biases.up)?,
                    down: on_device(biases.down)?,
                }),
                clamped: Some(clamped),
            }),
        })
    }

    /// Experts kept in their quantised form (GGUF blocks, MXFP4), multiplied in place.
    pub fn quantized(experts: super::quant::QuantExperts, activation: Activation) -> Self {
        Self {
            n_experts: experts.n_experts(),
            activation,
            compute: ExpertCompute::Quant(Box::new(experts)),
        }
    }

    /// The dispatch in use, with the kernel variant resolved for this CPU (quantised experts
    /// are per-expert products like the candle path's).
    pub fn dispatch(&self) -> MoeDispatch {
        match &self.compute {
            ExpertCompute::Kernel(k) => MoeDispatch::Kernel(k.variant),
            ExpertCompute::Candle(_) | ExpertCompute::Stored(_) | ExpertCompute::Quant(_) => {
                MoeDispatch::Candle
            }
        }
    }

    /// `sum over kept pairs (t, e, w) of w * expert_e(x[t])` for `x` = [T, d]; rows without a
    /// pair are zero. Only the grouped rows are computed.
    pub fn forward(&self, x: &Tensor, groups: &ExpertGroups) -> candle_core::Result<Tensor> {
        debug_assert_eq!(groups.n_experts(), self.n_experts);
        match &self.compute {
            ExpertCompute::Kernel(k) => k.forward(x, groups),
            ExpertCompute::Candle(c) => c.forward(x, groups, self.activation),
            ExpertCompute::Stored(s) => s.forward(x, groups, self.activation),
            ExpertCompute::Quant(q) => q.forward(x, groups, self.activation),
        }
    }
}

impl MoeExperts {
    /// Runs the CPU kernel on plain slices (`x`, `out` = `[T, d]`), as [`MoeExperts::forward`]
    /// does for tensors: the lean decode path (`model::decode`) calls it with `T = 1`. `None` when
    /// these experts are not on the kernel path (candle, stored or quantised experts).
    pub(crate) fn forward_slices(
        &self,
        x: &[f32],
        groups: &ExpertGroups,
        out: &mut [f32],
    ) -> Option<()> {
        let ExpertCompute::Kernel(k) = &self.compute else {
            return None;
        };
        let mut scratch = k.scratch.lock().unwrap_or_else(|p| p.into_inner());
        moe_forward(
            &k.packed,
            x,
            groups,
            out,
            &mut scratch,
            k.variant,
            k.threads,
        );
        Some(())
    }

    /// The packed weights when the experts run on the CPU kernel.
    pub fn packed(&self) -> Option<&PackedExperts> {
        match &self.compute {
            ExpertCompute::Kernel(k) => Some(&k.packed),
            _ => None,
        }
    }
}

impl KernelExperts {
    fn forward(&self, x: &Tensor, groups: &ExpertGroups) -> candle_core::Result<Tensor> {
        let x = x.contiguous()?;
        let mut out = vec![0.0f32; x.elem_count()];
        {
            // Read the normed activations in place: no copy of x on the hot path.
            let (storage, layout) = x.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else {
                candle_core::bail!("the CPU expert kernel got a tensor on another device");
            };
            let (start, end) = layout
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("non-contiguous input".into()))?;
            let xs = &cpu.as_slice::<f32>()?[start..end];
            let mut scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
            moe_forward(
                &self.packed,
                xs,
                groups,
                &mut out,
                &mut scratch,
                self.variant,
                self.threads,
            );
        }
        Tensor::from_vec(out, x.shape(), x.device())
    }
}

/// The dtypes in `dtypes`, each once.
fn dedup(dtypes: &[DType]) -> Vec<DType> {
    let mut seen = Vec::new();
    for d in dtypes {
        if !seen.contains(d) {
            seen.push(*d);
        }
    }
    seen
}

/// Packs gated per-expert tensors in their own precision `T`, dropping each expert's tensors once
/// it is packed: at most one expert is held twice while loading.
fn pack_tensors<T: ExpertWeight + candle_core::WithDType>(
    weights: ExpertWeights,
    activation: Activation,
) -> candle_core::Result<PackedExperts> {
    let n = weights.gate.len();
    let (h, d) = weights.gate[0].dims2()?;
    let take = |ws: Vec<Tensor>| ws.into_iter().map(Some).collect::<Vec<_>>();
    let (mut gate, mut up, mut down) = (take(weights.gate), take(weights.up), take(weights.down));
    let flat = |w: Option<Tensor>| -> Result<Vec<T>, String> {
        w.ok_or("expert tensor taken twice")?
            .flatten_all()
            .and_then(|t| t.to_vec1::<T>())
            .map_err(|e| e.to_string())
    };
    PackedExperts::from_experts::<T, String>(n, d, h, true, activation, None, None, |e| {
        Ok(ExpertData {
            gate: Some(flat(gate[e].take())?),
            up: flat(up[e].take())?,
            down: flat(down[e].take())?,
        })
    })
    .map_err(candle_core::Error::Msg)
}

/// `Some(F16)` / `Some(BF16)` when every expert weight of the layer under `prefix` is stored in
/// that one half-precision dtype.
fn stored_half_dtype(
    file: &ModelFile,
    prefix: &str,
    per_expert: bool,
    n_experts: usize,
    gated: bool,
) -> Option<Dtype> {
    let mut kinds = vec!["up_proj", "down_proj"];
    if gated {
        kinds.push("gate_proj");
    }
    let names: Vec<String> = if per_expert {
        (0..n_experts)
            .flat_map(|x| {
                kinds
                    .iter()
                    .map(move |k| format!("{prefix}.{x}.{k}.weight"))
            })
            .collect()
    } else {
        kinds.iter().map(|k| format!("{prefix}.{k}")).collect()
    };
    let first = file.raw(&names[0]).dtype;
    (matches!(first, Dtype::F16 | Dtype::BF16) && names.iter().all(|n| file.raw(n).dtype == first))
        .then_some(first)
}

/// Packs the experts under `prefix` from the file's half-precision bytes (dtype `T`, checked by
/// [`stored_half_dtype`]), one expert at a time.
fn pack_from_file<T: ExpertWeight + HalfBits>(
    file: &ModelFile,
    prefix: &str,
    per_expert: bool,
    cfg: &crate::model::config::ModelConfig,
    up_bias: Option<&[f32]>,
    down_bias: Option<&[f32]>,
) -> PackedExperts {
    let (e, d, h) = (cfg.n_experts, cfg.d_model, cfg.expert_hidden);
    let hd = h * d;
    // Values of expert `x` of the tensor kind `k`, from its own tensor or its slice of the stack.
    let values = |x: usize, k: &str| -> Vec<T> {
        let (raw, from) = if per_expert {
            (file.raw(&format!("{prefix}.{x}.{k}.weight")), 0)
        } else {
            (file.raw(&format!("{prefix}.{k}")), x * hd)
        };
        raw.data[2 * from..2 * (from + hd)]
            .chunks_exact(2)
            .map(|b| T::from_bits16(u16::from_le_bytes([b[0], b[1]])))
            .collect()
    };
    let packed = PackedExperts::from_experts::<T, String>(
        e,
        d,
        h,
        cfg.gated,
        cfg.activation,
        up_bias,
        down_bias,
        |x| {
            Ok(ExpertData {
                up: values(x, "up_proj"),
                gate: cfg.gated.then(|| values(x, "gate_proj")),
                down: values(x, "down_proj"),
            })
        },
    );
    // Every shape was checked when the file was opened.
    packed.unwrap_or_else(|err| unreachable!("{err}"))
}

/// A half-precision type from its bits.
trait HalfBits {
    fn from_bits16(bits: u16) -> Self;
}

impl HalfBits for half::f16 {
    fn from_bits16(bits: u16) -> Self {
        half::f16::from_bits(bits)
    }
}

impl HalfBits for half::bf16 {
    fn from_bits16(bits: u16) -> Self {
        half::bf16::from_bits(bits)
    }
}

/// `sum over experts e of w * f(e, x[rows of e])` scattered back to the rows: the gather,
/// weighting and scatter-add of the candle paths, with `f` computing one expert on its rows.
///
/// Built for a device that is not the host: the pairs' rows and weights (already grouped by
/// expert on the host, where the routing decision was made) go to the device in **one upload
/// each**, all selected rows are gathered in one `index_select`, each active expert multiplies a
/// view of its run of rows (no copy, no upload), and the weighted outputs go back in one
/// `index_add`. Nothing is read back: the only device-to-host transfer of a MoE layer is the
/// router's logits, read by `MoeBlock::forward` because the policy runs on the host.
pub(super) fn per_expert_groups(
    x: &Tensor,
    groups: &ExpertGroups,
    mut f: impl FnMut(usize, &Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let pairs = groups.pairs();
    if pairs == 0 {
        return x.zeros_like();
    }
    let device = x.device();
    let rows = Tensor::from_slice(&groups.tokens, pairs, device)?;
    let weights = Tensor::from_slice(&groups.weights, (pairs, 1), device)?;
    let gathered = x.index_select(&rows, 0)?;
    let mut outs = Vec::with_capacity(groups.n_experts());
    for e in 0..groups.n_experts() {
        let n = groups.rows(e);
        if n == 0 {
            continue;
        }
        let start = groups.offsets[e] as usize;
        outs.push(f(e, &gathered.narrow(0, start, n)?)?);
    }
    let out = Tensor::cat(&outs, 0)?.broadcast_mul(&weights)?;
    x.zeros_like()?.index_add(&rows, &out, 0)
}

impl CandleExperts {
    fn forward(
        &self,
        x: &Tensor,
        groups: &ExpertGroups,
        activation: Activation,
    ) -> candle_core::Result<Tensor> {
        // A same-dtype `to_dtype` is a cheap clone: f32 weights are not copied.
        let w = |t: &Tensor, e: usize| t.get(e)?.to_dtype(x.dtype());
        per_expert_groups(x, groups, |e, xs| {
            let mut up = xs.matmul(&w(&self.up_t, e)?)?;
            if let Some(b) = &self.up_b {
                up = up.broadcast_add(&b.get(e)?)?;
            }
            let hidden = match &self.gate_t {
                Some(g) => (activate(&xs.matmul(&w(g, e)?)?, activation)? * up)?,
                None => activate(&up, activation)?,
            };
            let out = hidden.matmul(&w(&self.down_t, e)?)?;
            match &self.down_b {
                Some(b) => out.broadcast_add(&b.get(e)?),
                None => Ok(out),
            }
        })
    }
}

impl StoredExperts {
    fn forward(
        &self,
        x: &Tensor,
        groups: &ExpertGroups,
        activation: Activation,
    ) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        // Widened one expert at a time: the working set is one expert, not the layer.
        let w = |t: &Tensor| -> candle_core::Result<Tensor> { t.to_dtype(dtype)?.t() };
        let bias = |t: Tensor, b: Option<&Tensor>| -> candle_core::Result<Tensor> {
            match b {
                Some(b) => t.broadcast_add(&b.to_dtype(dtype)?),
                None => Ok(t),
            }
        };
        let b = self.biases.as_ref();
        per_expert_groups(x, groups, |e, xs| {
            let gate = bias(xs.matmul(&w(&self.gate[e])?)?, b.map(|b| &b.gate[e]))?;
            let up = bias(xs.matmul(&w(&self.up[e])?)?, b.map(|b| &b.up[e]))?;
            let hidden = match self.clamped {
                Some(c) => clamped_swiglu(&gate, &up, c)?,
                None => (activate(&gate, activation)? * up)?,
            };
            bias(hidden.matmul(&w(&self.down[e])?)?, b.map(|b| &b.down[e]))
        })
    }
}

/// [`ClampedSwiglu`] on tensors: `(clamp(up, -l, l) + 1) * g * sigmoid(alpha * g)` with
/// `g = min(gate, l)`.
pub(super) fn clamped_swiglu(
    gate: &Tensor,
    up: &Tensor,
    c: ClampedSwiglu,
) -> candle_core::Result<Tensor> {
    let limit = f64::from(c.limit);
    let g = gate.minimum(limit)?;
    let u = up.clamp(-limit, limit)?;
    let glu = (&g * candle_nn::ops::sigmoid(&(&g * f64::from(c.alpha))?)?)?;
    (u + 1.0)? * glu
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The grouped computation against a per-pair loop: empty experts, a token with several
    /// experts, a token with none, and no pairs at all.
    #[test]
    fn grouped_experts_match_a_per_pair_sum() {
        use crate::routing::Routing;
        let (t, d, e) = (5, 3, 4);
        let x = Tensor::from_vec(
            (0..t * d)
                .map(|i| i as f32 * 0.25 - 1.0)
                .collect::<Vec<_>>(),
            (t, d),
            &Device::Cpu,
        )
        .unwrap();
        // Expert e scales its rows by (e + 1) and adds e.
        let expert = |e: usize, xs: &Tensor| (xs * (e as f64 + 1.0))? + e as f64;
        // (token, expert, weight); token 3 has no expert, expert 2 no token.
        let pairs = [
            (0, 1, 0.5f32),
            (0, 3, 0.25),
            (1, 0, 1.0),
            (2, 1, 0.75),
            (4, 3, 0.1),
            (4, 0, 0.9),
        ];
        let routing_of = |pairs: &[(usize, usize, f32)]| {
            let mut r = Routing::default();
            r.n_experts = e;
            r.offsets.push(0);
            for tok in 0..t {
                for &(_, pe, pw) in pairs.iter().filter(|p| p.0 == tok) {
                    r.experts.push(pe as u16);
                    r.weights.push(pw);
                    r.kept.push(true);
                }
                r.offsets.push(r.experts.len() as u32);
            }
            r
        };
        let routing = routing_of(&pairs);
        let mut groups = ExpertGroups::default();
        groups.build(&routing);
        assert_eq!(groups.rows(2), 0);
        let got = per_expert_groups(&x, &groups, |e, xs| expert(e, xs))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let xs = x.to_vec2::<f32>().unwrap();
        for tok in 0..t {
            for c in 0..d {
                let want: f32 = pairs
                    .iter()
                    .filter(|p| p.0 == tok)
                    .map(|&(_, pe, pw)| pw * (xs[tok][c] * (pe as f32 + 1.0) + pe as f32))
                    .sum();
                assert!(
                    (got[tok][c] - want).abs() < 1e-6,
                    "{tok},{c}: {} vs {want}",
                    got[tok][c]
                );
            }
        }
        groups.build(&routing_of(&[]));
        let none = per_expert_groups(&x, &groups, |e, xs| expert(e, xs)).unwrap();
        assert_eq!(none.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn clamped_swiglu_on_tensors_matches_the_scalar_definition() {
        let c = ClampedSwiglu {
            alpha: 1.702,
            limit: 7.0,
        };
        let gate = [-9.0f32, -1.0, 0.0, 0.5, 6.9, 7.5, 20.0];
        let up = [-20.0f32, -7.5, -0.3, 0.0, 2.0, 7.2, 1.0];
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        let got = clamped_swiglu(&t(&gate), &t(&up), c)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (i, ((&gi, &ui), &out)) in gate.iter().zip(&up).zip(&got).enumerate() {
            // Written out from transformers' `_apply_gate`.
            let g = gi.min(7.0);
            let u = ui.clamp(-7.0, 7.0);
            let want = (u + 1.0) * (g * (1.0 / (1.0 + (-1.702 * g).exp())));
            assert!(
                (out - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{i}: {out} vs {want}"
            );
            assert!((c.apply(gi, ui) - want).abs() <= 1e-5 * (1.0 + want.abs()));
        }
        // The clamp shows: a gate above the limit acts as the limit, an up below -limit as -limit.
        assert_eq!(
            got[6],
            clamped_swiglu(&t(&[7.0]), &t(&[1.0]), c)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()[0]
        );
    }
}
