//! Hugging Face MoE families (`mixtral`, `qwen2_moe`, `qwen3_moe`, `olmoe`, `gpt_oss`): the tensor
//! names of each, in every expert layout found on disk (gpt-oss: fused, or MXFP4 as published),
//! assembled into the same blocks as every model. The forward each family needs is in
//! `docs/model-families.md`.

use std::collections::BTreeSet;

use candle_core::{Device, Tensor};

use crate::kernel::{Activation, ExpertRows, RowRef, RowSource, WeightDtype};
use crate::model::blocks::{
    Attention, Block, BlockFfn, Embedding, Ffn, Linear, MoeBlock, Norm, QkNorm, Rotary,
    SharedExpert,
};
use crate::model::format::LoadError;
use crate::model::forward::ModelParts;
use crate::model::hf::{HfCheckpoint, HfFamily, TensorPlace};
use crate::model::moe::{
    ExpertBiases, ExpertStorage, ExpertWeights, IN_PLACE_NEEDS_KERNEL, LoadOptions, MoeDispatch,
    MoeExperts,
};

/// Builds every block of `ckpt` on `device`. Returns the parts and the names of the tensors it
/// did not use (reported as warnings).
pub fn build(
    ckpt: &HfCheckpoint,
    device: &Device,
    options: LoadOptions,
) -> Result<(ModelParts, Vec<String>), LoadError> {
    let c = ckpt.hf_config();
    if c.family.is_deepseek() {
        return super::deepseek::build(ckpt, device, options);
    }
    let used = std::cell::RefCell::new(BTreeSet::new());
    let de = |e: candle_core::Error| LoadError::Device {
        path: ckpt.dir().to_path_buf(),
        detail: e.to_string(),
    };
    let stored = |name: &str, shape: &[usize]| -> Result<Tensor, LoadError> {
        used.borrow_mut().insert(name.to_string());
        ckpt.tensor(name, shape, device)
    };
    let widened = |name: &str, shape: &[usize]| -> Result<Tensor, LoadError> {
        used.borrow_mut().insert(name.to_string());
        ckpt.tensor_f32(name, shape, device)
    };
    let (h, eps) = (c.hidden, c.rms_norm_eps as f32);
    // `--moe-dispatch amx` computes the model's bf16 products on AMX, the dense ones included.
    let dense_amx = options.dense_amx(device);
    let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear, LoadError> {
        let w = stored(&format!("{name}.weight"), &[out, inp])?;
        let b = if bias {
            Some(widened(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear::stored(w, b).map_err(de)?.on_amx(dense_amx))
    };
    let rms = |name: &str, n: usize| -> Result<Norm, LoadError> {
        Ok(Norm::new(
            widened(&format!("{name}.weight"), &[n])?,
            None,
            eps,
        ))
    };
    let gated_mlp = |p: &str, width: usize| -> Result<(Linear, Linear, Linear), LoadError> {
        Ok((
            linear(&format!("{p}.gate_proj"), width, h, false)?,
            linear(&format!("{p}.up_proj"), width, h, false)?,
            linear(&format!("{p}.down_proj"), h, width, false)?,
        ))
    };
    let rotary = Rotary::for_config(
        c.head_dim,
        c.max_positions,
        c.rope_theta as f32,
        c.rope_yarn.as_deref(),
        device,
    )
    .map_err(de)?;
    let (q_w, kv_w) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
    let mut blocks = Vec::with_capacity(c.layers);
    for i in 0..c.layers {
        let p = format!("model.layers.{i}");
        let a = format!("{p}.self_attn");
        let qkv_bias = c.qkv_bias || c.attention_bias;
        let mut attention = Attention::new(
            rms(&format!("{p}.input_layernorm"), h)?,
            linear(&format!("{a}.q_proj"), q_w, h, qkv_bias)?,
            linear(&format!("{a}.k_proj"), kv_w, h, qkv_bias)?,
            linear(&format!("{a}.v_proj"), kv_w, h, qkv_bias)?,
            linear(&format!("{a}.o_proj"), h, q_w, c.attention_bias)?,
            c.heads,
            c.head_dim,
            Some(rotary.clone()),
        )
        .with_kv_heads(c.kv_heads)
        .with_sliding_window(c.sliding_window[i]);
        attention = match c.family {
            HfFamily::Qwen3Moe => attention.with_qk_norm(QkNorm::PerHead {
                q: rms(&format!("{a}.q_norm"), c.head_dim)?,
                k: rms(&format!("{a}.k_norm"), c.head_dim)?,
            }),
            HfFamily::Olmoe => attention.with_qk_norm(QkNorm::Full {
                q: rms(&format!("{a}.q_norm"), q_w)?,
                k: rms(&format!("{a}.k_norm"), kv_w)?,
            }),
            // (DeepSeek is built by `arch::deepseek`.)
            HfFamily::Mixtral
            | HfFamily::Qwen2Moe
            | HfFamily::GptOss
            | HfFamily::DeepseekV2
            | HfFamily::DeepseekV3 => attention,
        };
        if c.attn_sinks {
            attention = attention.with_sinks(widened(&format!("{a}.sinks"), &[c.heads])?);
        }
        let ffn_norm = rms(&format!("{p}.post_attention_layernorm"), h)?;
        let ffn = if let Some(slot) = c.moe_layers.iter().position(|&l| l == i) {
            // Mixtral's original names put the block under `block_sparse_moe`; the fused layout
            // (transformers 5) renames it `mlp`.
            let m = if c.family == HfFamily::Mixtral
                && ckpt.has(&format!("{p}.block_sparse_moe.gate.weight"))
            {
                format!("{p}.block_sparse_moe")
            } else {
                format!("{p}.mlp")
            };
            let packed = |name: &str| ckpt.has(&format!("{m}.experts.{name}_blocks"));
            // MXFP4 experts stay packed on the CPU unless a float dispatch is asked for.
            let keep_mxfp4 = device.is_cpu()
                && options.dispatch == MoeDispatch::Auto
                && packed("gate_up_proj")
                && packed("down_proj");
            let mut moe = if let Some(clamped) = c.clamped_swiglu {
                let router = widened(&format!("{m}.router.weight"), &[c.experts, h])?;
                let bias = widened(&format!("{m}.router.bias"), &[c.experts])?;
                let (n, inter) = (c.experts, c.expert_hidden);
                let biases = gpt_oss_biases(ckpt, &m, n, inter, h, &widened)?;
                let experts = if keep_mxfp4 {
                    let q = crate::model::hf::mxfp4::packed_experts(ckpt, &m, n, inter, h, &used)?
                        .with_biases(biases, clamped);
                    MoeExperts::quantized(q, Activation::Silu)
                } else {
                    let weights = gpt_oss_experts(ckpt, &m, n, inter, h, device, &stored, &used)?;
                    MoeExperts::gated_with_biases(weights, biases, clamped, device, options)
                        .map_err(de)?
                };
                MoeBlock::new(ffn_norm, &router, experts, slot)
                    .map_err(de)?
                    .with_router_bias(bias)
            } else {
                let router = widened(&format!("{m}.gate.weight"), &[c.experts, h])?;
                let shape = (c.experts, c.expert_hidden, h);
                let experts =
                    gated_experts(ckpt, c.family, &m, shape, device, options, &stored, &used)?;
                MoeBlock::new(ffn_norm, &router, experts, slot).map_err(de)?
            };
            if let Some(s) = c.shared_expert_hidden {
                let (g, u, d) = gated_mlp(&format!("{m}.shared_expert"), s)?;
                let scale = linear(&format!("{m}.shared_expert_gate"), 1, h, false)?;
                moe = moe.with_shared(SharedExpert::new(g, u, d, Activation::Silu, Some(scale)));
            }
            BlockFfn::Moe(Box::new(moe))
        } else {
            let width = c.dense_hidden.unwrap_or(c.expert_hidden);
            let (g, u, d) = gated_mlp(&format!("{p}.mlp"), width)?;
            BlockFfn::Dense(Ffn::new(ffn_norm, u, Some(g), d, Activation::Silu))
        };
        blocks.push(Block::new(attention, ffn));
    }
    let emb = stored("model.embed_tokens.weight", &[c.vocab, h])?;
    let head = if c.tie_embeddings {
        emb.clone()
    } else {
        stored("lm_head.weight", &[c.vocab, h])?
    };
    let parts = ModelParts {
        embedding: Embedding::new(emb, None),
        blocks,
        final_norm: rms("model.norm", h)?,
        lm_head: Linear::stored(head, None).map_err(de)?.on_amx(dense_amx),
    };
    let used = used.into_inner();
    let unused = ckpt
        .names()
        .into_iter()
        .filter(|n| !used.contains(*n))
        .map(|n| {
            format!(
                "tensor `{n}` is not used by the {} forward",
                c.family.model_type()
            )
        })
        .collect();
    Ok((parts, unused))
}

/// The gated experts of one MoE block under `m`, `(experts, intermediate, hidden)` in `shape`:
/// read in place from the mapped shards when the CPU kernel runs them and `options.experts`
/// allows it, else loaded as tensors ([`expert_weights`]) for [`MoeExperts::from_weights`].
#[allow(clippy::too_many_arguments)]
pub(super) fn gated_experts(
    ckpt: &HfCheckpoint,
    family: HfFamily,
    m: &str,
    shape: (usize, usize, usize),
    device: &Device,
    options: LoadOptions,
    stored: &TensorLoader,
    used: &std::cell::RefCell<BTreeSet<String>>,
) -> Result<MoeExperts, LoadError> {
    let (n, inter, h) = shape;
    let refuse = |detail: String| LoadError::Device {
        path: ckpt.dir().to_path_buf(),
        detail: format!("--expert-weights in-place: {detail}"),
    };
    let try_in_place = options.experts_in_place(device);
    if options.experts == ExpertStorage::InPlace && !try_in_place {
        return Err(refuse(format!("experts are {IN_PLACE_NEEDS_KERNEL}")));
    }
    if try_in_place {
        match in_place_experts(ckpt, family, (m, n, inter, h), options)? {
            Ok((experts, names)) => {
                used.borrow_mut().extend(names);
                return Ok(experts);
            }
            Err(why) if options.experts == ExpertStorage::InPlace => return Err(refuse(why)),
            Err(_) => {}
        }
    }
    let weights = expert_weights(ckpt, family, m, n, inter, h, stored)?;
    MoeExperts::from_weights(weights, Activation::Silu, device, options).map_err(|e| {
        LoadError::Device {
            path: ckpt.dir().to_path_buf(),
            detail: e.to_string(),
        }
    })
}

/// The experts under `m` read in place from the mapped shards, with the names of the tensors
/// they come from; `Ok(Err(why))` when their dtypes do not allow it (not f32, f16 or bf16, or not
/// one dtype for the layer). Names and layouts as [`expert_weights`] reads them.
fn in_place_experts(
    ckpt: &HfCheckpoint,
    family: HfFamily,
    (m, n, inter, h): (&str, usize, usize, usize),
    options: LoadOptions,
) -> Result<Result<(MoeExperts, Vec<String>), String>, LoadError> {
    // (tensor name, shape, byte offset of each expert's matrix inside it, per role)
    let mut places: Vec<(String, TensorPlace)> = Vec::new();
    let mut experts: Vec<[(usize, usize); 3]> = Vec::with_capacity(n);
    let fused = format!("{m}.experts.gate_up_proj");
    if ckpt.has(&fused) {
        let down = format!("{m}.experts.down_proj");
        places.push((fused.clone(), ckpt.place(&fused, &[n, 2 * inter, h])?));
        places.push((down.clone(), ckpt.place(&down, &[n, h, inter])?));
        let size = places[0].1.dtype.bitsize() / 8;
        let mat = inter * h * size;
        for e in 0..n {
            // gate rows first, then up, in each expert's [2I, H] slice.
            experts.push([(0, 2 * e * mat), (0, (2 * e + 1) * mat), (1, e * mat)]);
        }
    } else {
        let (g, u, d) = match family {
            HfFamily::Mixtral => ("w1", "w3", "w2"),
            _ => ("gate_proj", "up_proj", "down_proj"),
        };
        for e in 0..n {
            let mut roles = [(0, 0); 3];
            for (role, (name, shape)) in [(g, [inter, h]), (u, [inter, h]), (d, [h, inter])]
                .into_iter()
                .enumerate()
            {
                let full = format!("{m}.experts.{e}.{name}.weight");
                places.push((full.clone(), ckpt.place(&full, &shape)?));
                roles[role] = (places.len() - 1, 0);
            }
            experts.push(roles);
        }
    }
    let dtype = places[0].1.dtype;
    if let Some((name, p)) = places.iter().find(|(_, p)| p.dtype != dtype) {
        return Ok(Err(format!(
            "the experts under {m} mix dtypes ({dtype:?}, and {:?} in `{name}`)",
            p.dtype
        )));
    }
    let weight_dtype = match dtype {
        safetensors::Dtype::F32 => WeightDtype::F32,
        safetensors::Dtype::F16 => WeightDtype::F16,
        safetensors::Dtype::BF16 => WeightDtype::Bf16,
        other => {
            return Ok(Err(format!(
                "the experts under {m} are {other:?}; the kernel reads f32, f16 or bf16"
            )));
        }
    };
    // One source per shard the layer uses.
    let mut shard_source: Vec<(usize, usize)> = Vec::new();
    let mut sources: Vec<std::sync::Arc<dyn RowSource>> = Vec::new();
    for (_, p) in &places {
        if !shard_source.iter().any(|&(s, _)| s == p.shard) {
            shard_source.push((p.shard, sources.len()));
            sources.push(ckpt.mapped(p.shard)?);
        }
    }
    let at = |(place, extra): (usize, usize)| {
        let p = places[place].1;
        let source = shard_source
            .iter()
            .find(|&&(s, _)| s == p.shard)
            .map(|&(_, i)| i)
            .unwrap_or_default();
        RowRef {
            source,
            offset: p.offset + extra,
        }
    };
    let rows: Vec<ExpertRows> = experts
        .into_iter()
        .map(|[g, u, d]| ExpertRows {
            gate: Some(at(g)),
            up: at(u),
            down: at(d),
        })
        .collect();
    let experts =
        MoeExperts::in_place(h, inter, weight_dtype, sources, rows, options).map_err(|detail| {
            LoadError::Device {
                path: ckpt.dir().to_path_buf(),
                detail: format!("experts under {m}: {detail}"),
            }
        })?;
    Ok(Ok((experts, places.into_iter().map(|(n, _)| n).collect())))
}

/// Reads a tensor by name, checked against a shape.
pub(super) type TensorLoader<'a> = dyn Fn(&str, &[usize]) -> Result<Tensor, LoadError> + 'a;

/// The experts of one MoE block as per-expert `[out, in]` tensors, from either layout: one
/// tensor per expert (`experts.{j}.w1/w3/w2` for Mixtral, `experts.{j}.{gate,up,down}_proj` for
/// the others) or fused (`experts.gate_up_proj [E, 2I, H]`, gate rows first, and
/// `experts.down_proj [E, H, I]`, without `.weight`).
pub(super) fn expert_weights(
    ckpt: &HfCheckpoint,
    family: HfFamily,
    m: &str,
    n: usize,
    inter: usize,
    h: usize,
    stored: &TensorLoader,
) -> Result<ExpertWeights, LoadError> {
    let de = |e: candle_core::Error| LoadError::Device {
        path: ckpt.dir().to_path_buf(),
        detail: e.to_string(),
    };
    let fused = format!("{m}.experts.gate_up_proj");
    if ckpt.has(&fused) {
        let gate_up = stored(&fused, &[n, 2 * inter, h])?;
        let down = stored(&format!("{m}.experts.down_proj"), &[n, h, inter])?;
        let mut w = ExpertWeights {
            gate: Vec::with_capacity(n),
            up: Vec::with_capacity(n),
            down: Vec::with_capacity(n),
        };
        for e in 0..n {
            let gu = gate_up.get(e).map_err(de)?;
            w.gate.push(gu.narrow(0, 0, inter).map_err(de)?);
            w.up.push(gu.narrow(0, inter, inter).map_err(de)?);
            w.down.push(down.get(e).map_err(de)?);
        }
        return Ok(w);
    }
    let (g, u, d) = match family {
        HfFamily::Mixtral => ("w1", "w3", "w2"),
        _ => ("gate_proj", "up_proj", "down_proj"),
    };
    let one = |e: usize, name: &str, shape: &[usize]| {
        stored(&format!("{m}.experts.{e}.{name}.weight"), shape)
    };
    Ok(ExpertWeights {
        gate: (0..n)
            .map(|e| one(e, g, &[inter, h]))
            .collect::<Result<_, _>>()?,
        up: (0..n)
            .map(|e| one(e, u, &[inter, h]))
            .collect::<Result<_, _>>()?,
        down: (0..n)
            .map(|e| one(e, d, &[h, inter]))
            .collect::<Result<_, _>>()?,
    })
}

/// gpt-oss experts as per-expert `[out, in]` weights and f32 biases. Each of `gate_up_proj` and
/// `down_proj` is read from its MXFP4 form when the checkpoint has `{name}_blocks` (as the
/// published checkpoints do: `[E, 2I, H/32, 16]` and `[E, H, I/32, 16]`, rows `[out]`, dequantised
/// to bf16), else from the fused `x @ W` layout transformers writes (`gate_up_proj [E, H, 2I]`,
/// `down_proj [E, I, H]`). gate and up are interleaved: gate = column (or MXFP4 row) 0, 2, 4, ...,
/// up = 1, 3, 5, ...; the biases are [`gpt_oss_biases`].
#[allow(clippy::too_many_arguments)]
fn gpt_oss_experts(
    ckpt: &HfCheckpoint,
    m: &str,
    n: usize,
    inter: usize,
    h: usize,
    device: &Device,
    stored: &TensorLoader,
    used: &std::cell::RefCell<BTreeSet<String>>,
) -> Result<ExpertWeights, LoadError> {
    let de = |e: candle_core::Error| LoadError::Device {
        path: ckpt.dir().to_path_buf(),
        detail: e.to_string(),
    };
    let mxfp4 = |name: &str, rows: usize, cols: usize| -> Result<Option<Tensor>, LoadError> {
        if !ckpt.has(&format!("{name}_blocks")) {
            return Ok(None);
        }
        used.borrow_mut().insert(format!("{name}_blocks"));
        used.borrow_mut().insert(format!("{name}_scales"));
        ckpt.mxfp4_bf16(name, n, rows, cols, device).map(Some)
    };
    let mut w = ExpertWeights {
        gate: Vec::with_capacity(n),
        up: Vec::with_capacity(n),
        down: Vec::with_capacity(n),
    };
    let gate_up = format!("{m}.experts.gate_up_proj");
    if let Some(gu) = mxfp4(&gate_up, 2 * inter, h)? {
        // [E, 2I, H]: row 2j is gate unit j, row 2j + 1 up unit j.
        let gu = gu.reshape((n, inter, 2, h)).map_err(de)?;
        for e in 0..n {
            let ge = gu.get(e).map_err(de)?;
            let half = |i: usize| ge.narrow(1, i, 1)?.squeeze(1)?.contiguous();
            w.gate.push(half(0).map_err(de)?);
            w.up.push(half(1).map_err(de)?);
        }
    } else {
        // [E, H, 2I] used as `x @ W`: column 2j is gate unit j, 2j + 1 up unit j.
        let gu = stored(&gate_up, &[n, h, 2 * inter])?
            .reshape((n, h, inter, 2))
            .map_err(de)?;
        for e in 0..n {
            let ge = gu.get(e).map_err(de)?;
            let half = |i: usize| ge.narrow(2, i, 1)?.squeeze(2)?.t()?.contiguous();
            w.gate.push(half(0).map_err(de)?);
            w.up.push(half(1).map_err(de)?);
        }
    }
    let down = format!("{m}.experts.down_proj");
    if let Some(d) = mxfp4(&down, h, inter)? {
        for e in 0..n {
            w.down
                .push(d.get(e).and_then(|t| t.contiguous()).map_err(de)?);
        }
    } else {
        let d = stored(&down, &[n, inter, h])?;
        for e in 0..n {
            w.down
                .push(d.get(e).and_then(|t| t.t()?.contiguous()).map_err(de)?);
        }
    }
    Ok(w)
}

/// gpt-oss expert biases, f32, whatever form the weights take: `gate_up_proj_bias [E, 2I]` with
/// gate and up interleaved like the weights (gate = 0, 2, 4, ...), `down_proj_bias [E, H]`.
fn gpt_oss_biases(
    ckpt: &HfCheckpoint,
    m: &str,
    n: usize,
    inter: usize,
    h: usize,
    widened: &TensorLoader,
) -> Result<ExpertBiases, LoadError> {
    let de = |e: candle_core::Error| LoadError::Device {
        path: ckpt.dir().to_path_buf(),
        detail: e.to_string(),
    };
    let (gate_up, down) = (
        format!("{m}.experts.gate_up_proj"),
        format!("{m}.experts.down_proj"),
    );
    let gu_b = widened(&format!("{gate_up}_bias"), &[n, 2 * inter])?
        .reshape((n, inter, 2))
        .map_err(de)?;
    let down_b = widened(&format!("{down}_bias"), &[n, h])?;
    let mut b = ExpertBiases {
        gate: Vec::with_capacity(n),
        up: Vec::with_capacity(n),
        down: Vec::with_capacity(n),
    };
    for e in 0..n {
        let be = gu_b.get(e).map_err(de)?;
        let half = |i: usize| be.narrow(1, i, 1)?.squeeze(1)?.contiguous();
        b.gate.push(half(0).map_err(de)?);
        b.up.push(half(1).map_err(de)?);
        b.down.push(down_b.get(e).map_err(de)?);
    }
    Ok(b)
}
