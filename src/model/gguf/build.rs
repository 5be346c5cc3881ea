//! The blocks of a GGUF MoE model, from llama.cpp's tensor names (`gguf` Python package,
//! `constants.py` `TENSOR_NAMES`): the same [blocks](crate::model::blocks) a Hugging Face
//! checkpoint of the family builds. On the CPU every matrix stays as stored: quantised ones as
//! [`QuantMatrix`] (experts multiplied in place in their stacked tensors), F16/BF16 ones in
//! half precision; norms and routers are widened to f32. On another device the matrices take
//! their device form ([`QuantMatrix::on_device`]: candle `QMatMul`s on the device, one per expert
//! of a stacked tensor; F16/BF16 stay half), and so do the experts on the CPU with `--moe-dispatch candle`
//! (the device-generic path, tested on the CPU). With [`GgufModel::set_dequantize`], or with
//! `--moe-dispatch kernel` for the experts, weights are dequantised to f32 on load instead (the reference
//! the tests compare with).

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

use super::{GgufArch, GgufFile, GgufModel, TensorType, candle_message, gguf_error};
use crate::kernel::{Activation, ExpertRows, RowRef, RowSource, WeightDtype};
use crate::model::blocks::{
    Attention, Block, BlockFfn, Embedding, Ffn, Linear, MoeBlock, Norm, QkNorm, Rotary,
    SharedExpert,
};
use crate::model::format::LoadError;
use crate::model::forward::ModelParts;
use crate::model::moe::{
    ExpertBiases, ExpertStorage, ExpertWeights, IN_PLACE_NEEDS_KERNEL, LoadOptions, MoeDispatch,
    MoeExperts,
};
use crate::model::quant::{GateUp, QuantExperts, QuantMatrix};

/// True for the block types (not F32, F16, BF16).
pub(crate) fn is_block_type(d: TensorType) -> bool {
    d.is_block()
}

/// The row order that undoes `LlamaModel.permute` (see [`unpermute_rope_rows`]): row `i` of the
/// result is row `order[i]` of the stored matrix.
fn unpermute_order(rows: usize, heads: usize) -> Vec<usize> {
    let d = rows / heads;
    let half = d / 2;
    (0..rows)
        .map(|n| {
            let (h, r) = (n / d, n % d);
            let (two, i) = (r / half, r % half);
            h * d + i * 2 + two
        })
        .collect()
}

/// Undoes `convert_hf_to_gguf.py`'s `LlamaModel.permute` on a q or k projection `[heads *
/// head_dim, in]`: the converter reorders each head's rows from Hugging Face's half-split rotary
/// layout (first half, second half) to GGML's adjacent pairs, so that llama.cpp can rotate pairs
/// (x0, x1), (x2, x3), ...; xmoe-top's rotary is the half-split one.
pub fn unpermute_rope_rows(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let half = rows / heads / 2;
    w.reshape((heads, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// Builds every block of `model` on `device`. Returns the parts and the names of the tensors it
/// did not use (reported as warnings).
pub fn build(
    model: &GgufModel,
    device: &Device,
    options: LoadOptions,
) -> Result<(ModelParts, Vec<String>), LoadError> {
    if model.arch() == GgufArch::Deepseek2 {
        return super::deepseek::build(model, device, options);
    }
    let g = model.file();
    let c = model.hf_config();
    let used = RefCell::new(BTreeSet::new());
    let de = |e: candle_core::Error| LoadError::Device {
        path: g.path().to_path_buf(),
        detail: candle_message(&e),
    };
    let load = |name: &str, shape: &[usize]| -> Result<Tensor, LoadError> {
        used.borrow_mut().insert(name.to_string());
        g.tensor(name, shape, device)
    };
    // Matrices stay as stored (on the CPU) or in their device form (elsewhere) unless the
    // reference (all f32) is asked for.
    let keep = !model.dequantizes();
    let stored_type = |name: &str| g.dtype(name).filter(|_| keep);
    let matrix = |name: &str, shape: &[usize]| -> Result<QuantMatrix, LoadError> {
        used.borrow_mut().insert(name.to_string());
        g.matrix(name, shape)
    };
    // `parts`: 1 for a whole matrix, the expert count for a stacked expert tensor.
    let to_device = |m: QuantMatrix, name: &str, parts: usize| -> Result<QuantMatrix, LoadError> {
        m.on_device(device, parts).map_err(|e| {
            gguf_error(
                g.path(),
                format!(
                    "tensor `{name}` ({}) on {:?}: {}",
                    m.type_name(),
                    device.location(),
                    candle_message(&e)
                ),
            )
        })
    };
    let (h, eps) = (c.hidden, c.rms_norm_eps as f32);
    // A linear layer's weight `[out, in]` as stored where that saves memory, else f32; `order`
    // reorders its rows (the llama q/k un-permutation).
    let weight = |name: &str,
                  out: usize,
                  inp: usize,
                  order: Option<&[usize]>|
     -> Result<Weight, LoadError> {
        let bad = |e: candle_core::Error| {
            gguf_error(g.path(), format!("tensor `{name}`: {}", candle_message(&e)))
        };
        match stored_type(name) {
            Some(d) if d != TensorType::F32 => {
                let mut m = matrix(name, &[out, inp])?;
                if let Some(o) = order {
                    m = m.permute_rows(o).map_err(bad)?;
                }
                if !device.is_cpu() {
                    m = to_device(m, name, 1)?;
                }
                Ok(Weight::Kept(Arc::new(m)))
            }
            _ => {
                let mut w = load(name, &[out, inp])?;
                if let Some(o) = order {
                    let idx: Vec<u32> = o.iter().map(|&r| r as u32).collect();
                    let idx = Tensor::from_vec(idx, o.len(), device).map_err(bad)?;
                    w = w.index_select(&idx, 0).map_err(bad)?;
                }
                Ok(Weight::F32(w))
            }
        }
    };
    let linear_with = |name: &str,
                       out: usize,
                       inp: usize,
                       bias: bool,
                       order: Option<&[usize]>|
     -> Result<Linear, LoadError> {
        let b = if bias {
            Some(load(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        match weight(&format!("{name}.weight"), out, inp, order)? {
            Weight::Kept(m) => Linear::quantized(m, b),
            Weight::F32(w) => Linear::stored(w, b),
        }
        .map_err(de)
    };
    let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear, LoadError> {
        linear_with(name, out, inp, bias, None)
    };
    let rms = |name: &str, n: usize| -> Result<Norm, LoadError> {
        Ok(Norm::new(load(&format!("{name}.weight"), &[n])?, None, eps))
    };
    // YaRN only for gpt-oss (the other architectures refuse `rope.scaling.type` at open).
    let rotary = Rotary::for_config(
        c.head_dim,
        c.max_positions,
        c.rope_theta as f32,
        c.rope_yarn.as_deref(),
        device,
    )
    .map_err(de)?;
    let gpt_oss = model.arch() == GgufArch::GptOss;
    let (q_w, kv_w) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
    let permuted = model.arch() == GgufArch::Llama;
    let mut blocks = Vec::with_capacity(c.layers);
    for i in 0..c.layers {
        let b = format!("blk.{i}");
        let qkv_bias = c.qkv_bias || c.attention_bias;
        // A bias would need the same reordering; the llama converter writes none.
        let (q_order, k_order) = if permuted {
            (
                Some(unpermute_order(q_w, c.heads)),
                Some(unpermute_order(kv_w, c.kv_heads)),
            )
        } else {
            (None, None)
        };
        if permuted && qkv_bias {
            return Err(gguf_error(
                g.path(),
                "a llama file with q/k biases: their rows would need the rotary un-permutation too (not supported)",
            ));
        }
        let mut attention = Attention::new(
            rms(&format!("{b}.attn_norm"), h)?,
            linear_with(&format!("{b}.attn_q"), q_w, h, qkv_bias, q_order.as_deref())?,
            linear_with(
                &format!("{b}.attn_k"),
                kv_w,
                h,
                qkv_bias,
                k_order.as_deref(),
            )?,
            linear(&format!("{b}.attn_v"), kv_w, h, qkv_bias)?,
            linear(&format!("{b}.attn_output"), h, q_w, c.attention_bias)?,
            c.heads,
            c.head_dim,
            Some(rotary.clone()),
        )
        .with_kv_heads(c.kv_heads)
        .with_sliding_window(c.sliding_window[i]);
        attention = match model.arch() {
            GgufArch::Qwen3Moe => attention.with_qk_norm(QkNorm::PerHead {
                q: rms(&format!("{b}.attn_q_norm"), c.head_dim)?,
                k: rms(&format!("{b}.attn_k_norm"), c.head_dim)?,
            }),
            GgufArch::Olmoe => attention.with_qk_norm(QkNorm::Full {
                q: rms(&format!("{b}.attn_q_norm"), q_w)?,
                k: rms(&format!("{b}.attn_k_norm"), kv_w)?,
            }),
            GgufArch::Llama | GgufArch::Qwen2Moe | GgufArch::Deepseek2 | GgufArch::GptOss => {
                attention
            }
        };
        if c.attn_sinks {
            attention = attention.with_sinks(load(&format!("{b}.attn_sinks.weight"), &[c.heads])?);
        }
        // gpt-oss's `post_attention_layernorm` keeps llama.cpp's generic name for it.
        let ffn_norm = if gpt_oss {
            rms(&format!("{b}.post_attention_norm"), h)?
        } else {
            rms(&format!("{b}.ffn_norm"), h)?
        };
        let ffn = if let Some(slot) = c.moe_layers.iter().position(|&l| l == i) {
            let router = load(&format!("{b}.ffn_gate_inp.weight"), &[c.experts, h])?;
            let names = ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]
                .map(|t| format!("{b}.{t}.weight"));
            // `--moe-dispatch kernel` asks for the packed f32 kernel: it gets the experts dequantised to
            // f32. `--moe-dispatch candle` (and any device but the CPU) gets their device form.
            let kernel = matches!(options.dispatch, MoeDispatch::Kernel(_));
            let device_form = !device.is_cpu() || options.dispatch == MoeDispatch::Candle;
            let quantised = names
                .iter()
                .any(|n| stored_type(n).is_some_and(is_block_type));
            // gpt-oss: per-expert biases (`ffn_{gate,up,down}_exps.bias`, the converter's split
            // of Hugging Face's interleaved `gate_up_proj_bias`) and the clamped SwiGLU.
            let biases = match c.clamped_swiglu {
                Some(_) => Some(expert_biases(g, &b, c.experts, c.expert_hidden, h, &load)?),
                None => None,
            };
            let in_place = in_place_experts(
                g,
                &b,
                (c.experts, c.expert_hidden, h),
                keep && !quantised && biases.is_none(),
                device,
                options,
                &used,
            )?;
            let experts = if let Some(x) = in_place {
                x
            } else if quantised && !kernel {
                let (n, i) = (c.experts, c.expert_hidden);
                let mut gate = matrix(&names[0], &[n, i, h])?;
                let mut up = matrix(&names[1], &[n, i, h])?;
                let mut down = matrix(&names[2], &[n, h, i])?;
                if device_form {
                    gate = to_device(gate, &names[0], n)?;
                    up = to_device(up, &names[1], n)?;
                    down = to_device(down, &names[2], n)?;
                }
                let mut q = QuantExperts::new(n, i, h, GateUp::Separate { gate, up }, down)
                    .map_err(|e| gguf_error(g.path(), format!("{b}: {}", candle_message(&e))))?;
                if let (Some(biases), Some(clamped)) = (biases, c.clamped_swiglu) {
                    q = q.with_biases(biases, clamped);
                }
                MoeExperts::quantized(q, Activation::Silu)
            } else {
                let weights = experts(g, &b, c.experts, c.expert_hidden, h, &load)?;
                match (biases, c.clamped_swiglu) {
                    (Some(biases), Some(clamped)) => {
                        MoeExperts::gated_with_biases(weights, biases, clamped, device, options)
                    }
                    _ => MoeExperts::from_weights(weights, Activation::Silu, device, options),
                }
                .map_err(de)?
            };
            let mut moe = MoeBlock::new(ffn_norm, &router, experts, slot).map_err(de)?;
            if c.router_bias {
                moe = moe.with_router_bias(load(&format!("{b}.ffn_gate_inp.bias"), &[c.experts])?);
            }
            if let Some(s) = c.shared_expert_hidden {
                let gate = linear(&format!("{b}.ffn_gate_shexp"), s, h, false)?;
                let up = linear(&format!("{b}.ffn_up_shexp"), s, h, false)?;
                let down = linear(&format!("{b}.ffn_down_shexp"), h, s, false)?;
                // The converter keeps the HF shape [1, H]; a file may also hold it as [H].
                let name = format!("{b}.ffn_gate_inp_shexp.weight");
                let scale = match g.shape(&name) {
                    Some([n]) if *n == h => load(&name, &[h])?.reshape((1, h)).map_err(de)?,
                    _ => load(&name, &[1, h])?,
                };
                let scale = Linear::stored(scale, None).map_err(de)?;
                moe = moe.with_shared(SharedExpert::new(
                    gate,
                    up,
                    down,
                    Activation::Silu,
                    Some(scale),
                ));
            }
            BlockFfn::Moe(Box::new(moe))
        } else {
            let width = c.dense_hidden.unwrap_or(c.expert_hidden);
            let gate = linear(&format!("{b}.ffn_gate"), width, h, false)?;
            let up = linear(&format!("{b}.ffn_up"), width, h, false)?;
            let down = linear(&format!("{b}.ffn_down"), h, width, false)?;
            BlockFfn::Dense(Ffn::new(ffn_norm, up, Some(gate), down, Activation::Silu))
        };
        blocks.push(Block::new(attention, ffn));
    }
    let (embedding, lm_head) = match weight("token_embd.weight", c.vocab, h, None)? {
        Weight::Kept(m) => {
            let head = if c.tie_embeddings {
                Linear::quantized(m.clone(), None).map_err(de)?
            } else {
                linear("output", c.vocab, h, false)?
            };
            (Embedding::quantized(m), head)
        }
        Weight::F32(emb) => {
            let head = if c.tie_embeddings {
                Linear::stored(emb.clone(), None).map_err(de)?
            } else {
                linear("output", c.vocab, h, false)?
            };
            (Embedding::new(emb, None), head)
        }
    };
    let parts = ModelParts {
        embedding,
        blocks,
        final_norm: rms("output_norm", h)?,
        lm_head,
    };
    let used = used.into_inner();
    let unused = g
        .names()
        .into_iter()
        .filter(|n| !used.contains(*n))
        // llama.cpp's precomputed rotary frequencies: the rotary tables are computed from
        // `rope.freq_base` (a file whose factors are not the plain ones was refused at open).
        .filter(|n| *n != "rope_freqs.weight")
        .map(|n| {
            format!(
                "tensor `{n}` is not used by the {} forward",
                model.arch().name()
            )
        })
        .collect();
    Ok((parts, unused))
}

/// A linear layer's weight as loaded.
enum Weight {
    /// As stored (quantised blocks, or F16/BF16).
    Kept(Arc<QuantMatrix>),
    /// Dequantised to f32.
    F32(Tensor),
}

/// Reads a tensor by name, checked against a shape.
pub(super) type TensorLoader<'a> = dyn Fn(&str, &[usize]) -> Result<Tensor, LoadError> + 'a;

/// The experts of block `b`, split out of the stacked `ffn_{gate,up}_exps.weight` `[E, I, H]`
/// and `ffn_down_exps.weight` `[E, H, I]` (GGUF dims `[H, I, E]` and `[I, H, E]`).
pub(super) fn experts(
    g: &GgufFile,
    b: &str,
    n: usize,
    inter: usize,
    h: usize,
    load: &TensorLoader,
) -> Result<ExpertWeights, LoadError> {
    let split = |name: &str, shape: [usize; 3]| -> Result<Vec<Tensor>, LoadError> {
        let t = load(&format!("{b}.{name}.weight"), &shape)?;
        (0..n)
            .map(|e| t.get(e))
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(|e| {
                gguf_error(
                    g.path(),
                    format!("tensor `{b}.{name}.weight`: {}", candle_message(&e)),
                )
            })
    };
    Ok(ExpertWeights {
        gate: split("ffn_gate_exps", [n, inter, h])?,
        up: split("ffn_up_exps", [n, inter, h])?,
        down: split("ffn_down_exps", [n, h, inter])?,
    })
}

/// The experts of block `b` read in place from the mapped file by the CPU kernel, when
/// `options` allow it on `device`, `eligible` (stored form kept, no expert biases) and the three
/// stacked tensors are F32, F16 or BF16 in one type with the expected shapes `(E, I, H)`; their
/// names go into `used`. `None` otherwise (the caller loads them), or an error when
/// `--expert-weights in-place` asked for it.
pub(super) fn in_place_experts(
    g: &GgufFile,
    b: &str,
    (n, inter, h): (usize, usize, usize),
    eligible: bool,
    device: &Device,
    options: LoadOptions,
    used: &RefCell<BTreeSet<String>>,
) -> Result<Option<MoeExperts>, LoadError> {
    let required = options.experts == ExpertStorage::InPlace;
    let refuse = |why: &str| {
        gguf_error(
            g.path(),
            format!("--expert-weights in-place: the experts of {b} {why}"),
        )
    };
    if !options.experts_in_place(device) {
        return if required {
            Err(refuse(&format!("are {IN_PLACE_NEEDS_KERNEL}")))
        } else {
            Ok(None)
        };
    }
    let names =
        ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"].map(|t| format!("{b}.{t}.weight"));
    let shapes = [[n, inter, h], [n, inter, h], [n, h, inter]];
    let types: Vec<Option<TensorType>> = names.iter().map(|n| g.dtype(n)).collect();
    let weight_dtype = match types[..] {
        [Some(a), Some(b2), Some(c)] if a == b2 && b2 == c => match a {
            TensorType::Ggml(GgmlDType::F32) => Some(WeightDtype::F32),
            TensorType::Ggml(GgmlDType::F16) => Some(WeightDtype::F16),
            TensorType::Ggml(GgmlDType::BF16) => Some(WeightDtype::Bf16),
            _ => None,
        },
        _ => None,
    };
    let shapes_ok = names
        .iter()
        .zip(&shapes)
        .all(|(name, shape)| g.shape(name) == Some(&shape[..]));
    let (Some(weight_dtype), true, true) = (weight_dtype, eligible, shapes_ok) else {
        return if required {
            Err(refuse(
                "are not three F32, F16 or BF16 tensors of one type without biases",
            ))
        } else {
            Ok(None)
        };
    };
    let start = |name: &str| g.data_range(name).map_or(0, |(offset, _)| offset as usize);
    let (gate0, up0, down0) = (start(&names[0]), start(&names[1]), start(&names[2]));
    let mat = inter * h * weight_dtype.bytes();
    let at = |offset| RowRef { source: 0, offset };
    let rows = (0..n)
        .map(|e| ExpertRows {
            gate: Some(at(gate0 + e * mat)),
            up: at(up0 + e * mat),
            down: at(down0 + e * mat),
        })
        .collect();
    let sources: Vec<Arc<dyn RowSource>> = vec![g.mapped()?];
    let experts = MoeExperts::in_place(h, inter, weight_dtype, sources, rows, options)
        .map_err(|detail| gguf_error(g.path(), format!("experts of {b}: {detail}")))?;
    used.borrow_mut().extend(names);
    Ok(Some(experts))
}

/// gpt-oss expert biases of block `b`: `ffn_{gate,up}_exps.bias` `[E, I]` and
/// `ffn_down_exps.bias` `[E, H]`, one f32 row per expert.
fn expert_biases(
    g: &GgufFile,
    b: &str,
    n: usize,
    inter: usize,
    h: usize,
    load: &TensorLoader,
) -> Result<ExpertBiases, LoadError> {
    let rows = |name: &str, width: usize| -> Result<Vec<Tensor>, LoadError> {
        let name = format!("{b}.{name}.bias");
        let t = load(&name, &[n, width])?;
        (0..n)
            .map(|e| t.get(e))
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(|e| gguf_error(g.path(), format!("tensor `{name}`: {}", candle_message(&e))))
    };
    Ok(ExpertBiases {
        gate: rows("ffn_gate_exps", inter)?,
        up: rows("ffn_up_exps", inter)?,
        down: rows("ffn_down_exps", h)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_row_order_is_the_tensor_unpermutation() {
        for (heads, d) in [(4usize, 12usize), (2, 8), (1, 2)] {
            let rows = heads * d;
            let w = Tensor::arange(0f32, (rows * 3) as f32, &Device::Cpu)
                .unwrap()
                .reshape((rows, 3))
                .unwrap();
            let want = unpermute_rope_rows(&w, heads).unwrap();
            let idx: Vec<u32> = unpermute_order(rows, heads)
                .into_iter()
                .map(|r| r as u32)
                .collect();
            let idx = Tensor::from_vec(idx, rows, &Device::Cpu).unwrap();
            let got = w.index_select(&idx, 0).unwrap();
            assert_eq!(
                got.to_vec2::<f32>().unwrap(),
                want.to_vec2::<f32>().unwrap(),
                "{heads} heads of {d}"
            );
        }
    }
}
