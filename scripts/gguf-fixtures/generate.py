#!/usr/bin/env python3
"""Writes tiny GGUF files from the tiny Hugging Face fixtures in tests/fixtures/hf/, the way
llama.cpp's convert_hf_to_gguf.py would (tensor names, metadata keys, the q/k row permutation of
the `llama` architecture, tokenizer metadata), into tests/fixtures/gguf/.

Run by hand (never by the tests), from the repository root:

    /work/venv-goldens/bin/pip install gguf==0.19.0
    /work/venv-goldens/bin/python scripts/gguf-fixtures/generate.py
    /work/venv-goldens/bin/python scripts/gguf-fixtures/generate.py gpt_oss   # only gpt-oss
    # a gpt-oss-20b-shaped file of 2 blocks with random weights, for memory checks (not committed)
    /work/venv-goldens/bin/python scripts/gguf-fixtures/generate.py gpt_oss_synthetic PATH

For each of mixtral (arch `llama`), qwen2_moe (`qwen2moe`), qwen3_moe (`qwen3moe`) and olmoe
(`olmoe`) it writes `<family>.f32.gguf`, `<family>.q8_0.gguf`, `<family>.q4_1.gguf` and `<family>.q4_0.gguf`. The
quantised files quantise what the converter / llama-quantize would: 2-D and 3-D weight matrices
whose rows (the innermost GGUF dimension) are a multiple of the block size (32), except the
router `ffn_gate_inp` (kept F32, as the converter does); other matrices fall back to F16, 1-D
tensors stay F32. It also writes `llama-dense.f32.gguf` and `llama-dense.q8_0.gguf`: a dense
`llama` model (no experts) made of the mixtral fixture's attention and, as each block's FFN, its
expert 0 (issue 14's `moefy` input; the tests check the tensors read back equal the HF ones).

It also writes llama.cpp's `deepseek2` architecture from tests/fixtures/hf/deepseek_v{2,3}/per_expert
as llama.cpp's `DeepseekV2Model` (`conversion/deepseek.py`; see docs/gguf.md for what was read)
writes it: `deepseek_v2.{f32,q8_0,q4_0}.gguf` and
`deepseek_v3.{f32,q8_0,q4_0}.gguf` with `kv_b_proj` split into `attn_k_b` (each head's key half,
transposed) and `attn_v_b` plus the `*_mla` head sizes (current converters), and
`deepseek_v3-kvb.{f32,q8_0}.gguf` in the legacy layout (one `attn_kv_b`, `key_length` /
`value_length` the per-head sizes, no `*_mla` keys, as converters before the MLA split wrote it).
For deepseek2 the Hugging Face weights are written unpermuted (llama.cpp rotates adjacent pairs,
which is DeepSeek's interleaved layout), the experts stacked, `e_score_correction_bias` as
`blk.N.exp_probs_b.bias`, tied embeddings without `output.weight`.

It also writes llama.cpp's `gpt-oss` architecture from tests/fixtures/hf/gpt_oss/fused as
llama.cpp's `GptOssModel` (`conversion/gpt_oss.py`, llama.cpp 0c1e57098) writes it:
`gpt_oss.f32.gguf` (the converter's path for a float checkpoint: `gate_up_proj` transposed and
de-interleaved into `ffn_gate_exps` / `ffn_up_exps`, `down_proj` transposed, biases split the
same way, everything F32) and `gpt_oss.mxfp4.gguf` (the path for the published checkpoints: the
experts quantised here to Hugging Face's MXFP4 `*_blocks` + `*_scales`, as the published files
store them, then repacked by the converter's own `repack_mxfp4` / `transform_nibble_layout` into
ggml `block_mxfp4` tensors; every other tensor F32).

Deviations from a real conversion, all needed to reproduce the HF goldens exactly:
- mixtral: `llama.attention.sliding_window` = 5 is written (the converter does not write it for
  `llama`; published Mixtral has no sliding window, the tiny fixture has one).
- qwen2_moe / qwen3_moe: block 1 is a dense FFN (`mlp_only_layers`); llama.cpp has no such block
  for these architectures, so it is written under the `llama` dense names
  `blk.1.ffn_{gate,up,down}.weight` with `{arch}.feed_forward_length` its width.
- deepseek2: the fixture configs lack `scoring_func` (transformers 5.24 does not save it), from
  which the converter writes `expert_gating_func`; it is written here as the published configs
  would give it (V2 softmax, V3 sigmoid). The configs' `head_dim` (transformers' alias of
  `qk_rope_head_dim`, absent from published configs) is not written as `key_length`.
- gpt-oss: the tiny checkpoint ties its embeddings; llama.cpp requires `output.weight` for
  gpt-oss, so the tied matrix is written as `output.weight`. The tiny expert width 12 is not a
  whole MXFP4 block, so `gpt_oss.mxfp4.gguf` pads it to 32 with zero weights and zero biases
  (those units compute (0 + 1) * 0 * sigmoid(0) = 0 and add nothing). `tokenizer.ggml.pre` is
  "gpt-4o", as in the published gpt-oss files, although the tiny vocabulary was trained with
  GPT-2's regex (the tests account for it).
"""

import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

import gguf
from gguf import GGMLQuantizationType as Q
from gguf import quants

ROOT = Path(__file__).resolve().parents[2]
HF = ROOT / "tests" / "fixtures" / "hf"
OUT = ROOT / "tests" / "fixtures" / "gguf"

ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}


def permute(w, n_head, n_head_kv):
    """convert_hf_to_gguf.py LlamaModel.permute: HF's half-split rotary rows -> GGML's pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def tensors_for(family, cfg, st):
    """(gguf name, numpy array in HF [out, in] orientation) for every tensor of the model."""
    arch = ARCH[family]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    n_exp = cfg.get("num_local_experts") or cfg.get("num_experts")
    out = [("token_embd.weight", st["model.embed_tokens.weight"]),
           ("output_norm.weight", st["model.norm.weight"])]
    if not cfg.get("tie_word_embeddings", False):
        out.append(("output.weight", st["lm_head.weight"]))
    for i in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{i}", f"blk.{i}"
        a = f"{p}.self_attn"
        q, k = st[f"{a}.q_proj.weight"], st[f"{a}.k_proj.weight"]
        if arch == "llama":
            q, k = permute(q, heads, heads), permute(k, heads, kv)
        out += [(f"{b}.attn_norm.weight", st[f"{p}.input_layernorm.weight"]),
                (f"{b}.attn_q.weight", q), (f"{b}.attn_k.weight", k),
                (f"{b}.attn_v.weight", st[f"{a}.v_proj.weight"]),
                (f"{b}.attn_output.weight", st[f"{a}.o_proj.weight"]),
                (f"{b}.ffn_norm.weight", st[f"{p}.post_attention_layernorm.weight"])]
        for x in "qkv":
            if f"{a}.{x}_proj.bias" in st:
                out.append((f"{b}.attn_{x}.bias", st[f"{a}.{x}_proj.bias"]))
        for x in "qk":
            if f"{a}.{x}_norm.weight" in st:
                out.append((f"{b}.attn_{x}_norm.weight", st[f"{a}.{x}_norm.weight"]))
        m = f"{p}.block_sparse_moe" if family == "mixtral" else f"{p}.mlp"
        if f"{m}.gate.weight" in st:
            names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
            out.append((f"{b}.ffn_gate_inp.weight", st[f"{m}.gate.weight"]))
            for g, hf in zip(("gate", "up", "down"), names):
                out.append((f"{b}.ffn_{g}_exps.weight",
                            np.stack([st[f"{m}.experts.{e}.{hf}.weight"] for e in range(n_exp)])))
            if f"{m}.shared_expert.gate_proj.weight" in st:
                for g in ("gate", "up", "down"):
                    out.append((f"{b}.ffn_{g}_shexp.weight", st[f"{m}.shared_expert.{g}_proj.weight"]))
                out.append((f"{b}.ffn_gate_inp_shexp.weight", st[f"{m}.shared_expert_gate.weight"]))
        else:
            for g in ("gate", "up", "down"):
                out.append((f"{b}.ffn_{g}.weight", st[f"{p}.mlp.{g}_proj.weight"]))
    return out


DS_ARCH = "deepseek2"


def deepseek_tensors(cfg, st, split):
    """(gguf name, array) of a DeepSeek checkpoint as DeepseekV2Model.modify_tensors maps it."""
    heads = cfg["num_attention_heads"]
    nope, vd = cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    n_exp = cfg["n_routed_experts"]
    out = [("token_embd.weight", st["model.embed_tokens.weight"]),
           ("output_norm.weight", st["model.norm.weight"])]
    if not cfg.get("tie_word_embeddings", False):
        out.append(("output.weight", st["lm_head.weight"]))
    for i in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{i}", f"blk.{i}"
        a = f"{p}.self_attn"
        out += [(f"{b}.attn_norm.weight", st[f"{p}.input_layernorm.weight"]),
                (f"{b}.ffn_norm.weight", st[f"{p}.post_attention_layernorm.weight"]),
                (f"{b}.attn_kv_a_mqa.weight", st[f"{a}.kv_a_proj_with_mqa.weight"]),
                (f"{b}.attn_kv_a_norm.weight", st[f"{a}.kv_a_layernorm.weight"]),
                (f"{b}.attn_output.weight", st[f"{a}.o_proj.weight"])]
        if f"{a}.q_proj.weight" in st:
            out.append((f"{b}.attn_q.weight", st[f"{a}.q_proj.weight"]))
        else:
            out += [(f"{b}.attn_q_a.weight", st[f"{a}.q_a_proj.weight"]),
                    (f"{b}.attn_q_a_norm.weight", st[f"{a}.q_a_layernorm.weight"]),
                    (f"{b}.attn_q_b.weight", st[f"{a}.q_b_proj.weight"])]
        kv_b = st[f"{a}.kv_b_proj.weight"]
        if split:
            # modify_tensors: view(n_head_kv, nope + v, rank), split, k_b.transpose(1, 2).
            kv = kv_b.reshape(heads, nope + vd, kv_b.shape[-1])
            k_b = np.ascontiguousarray(kv[:, :nope, :].transpose(0, 2, 1))
            v_b = np.ascontiguousarray(kv[:, nope:, :])
            out += [(f"{b}.attn_k_b.weight", k_b), (f"{b}.attn_v_b.weight", v_b)]
        else:
            out.append((f"{b}.attn_kv_b.weight", kv_b))
        m = f"{p}.mlp"
        if f"{m}.gate.weight" in st:
            out.append((f"{b}.ffn_gate_inp.weight", st[f"{m}.gate.weight"]))
            if f"{m}.gate.e_score_correction_bias" in st:
                out.append((f"{b}.exp_probs_b.bias", st[f"{m}.gate.e_score_correction_bias"]))
            for g in ("gate", "up", "down"):
                out.append((f"{b}.ffn_{g}_exps.weight",
                            np.stack([st[f"{m}.experts.{e}.{g}_proj.weight"] for e in range(n_exp)])))
                if f"{m}.shared_experts.{g}_proj.weight" in st:
                    out.append((f"{b}.ffn_{g}_shexp.weight", st[f"{m}.shared_experts.{g}_proj.weight"]))
        else:
            for g in ("gate", "up", "down"):
                out.append((f"{b}.ffn_{g}.weight", st[f"{m}.{g}_proj.weight"]))
    return out


def add_deepseek_metadata(w, name, cfg, split):
    """DeepseekV2Model.set_gguf_parameters (and TextModel's) for `cfg`; `split` as the current
    converter, else as converters before the MLA split."""
    rp = cfg["rope_parameters"]
    heads = cfg["num_attention_heads"]
    rank, rope = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    nope, vd = cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    v3 = cfg["model_type"] == "deepseek_v3"
    w.add_name(name)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    # The current converter sets num_key_value_heads to 1 (MLA as MQA); older ones kept it.
    w.add_head_count_kv(1 if split else cfg["num_key_value_heads"])
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(rp["factor"])
    w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
    if split:
        w.add_rope_scaling_yarn_beta_fast(rp["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(rp["beta_slow"])
    w.add_rope_freq_base(rp["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(cfg["n_routed_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_expert_group_count(cfg["n_group"])
    w.add_expert_group_used_count(cfg["topk_group"])
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if v3 else gguf.ExpertGatingFuncType.SOFTMAX)
    w.add_leading_dense_block_count(cfg["first_k_dense_replace"])
    w.add_vocab_size(cfg["vocab_size"])
    if cfg.get("q_lora_rank") is not None:
        w.add_q_lora_rank(cfg["q_lora_rank"])
    w.add_kv_lora_rank(rank)
    if split:
        w.add_key_length(rank + rope)
        w.add_value_length(rank)
        w.add_key_length_mla(nope + rope)
        w.add_value_length_mla(vd)
    else:
        w.add_key_length(nope + rope)
        w.add_value_length(vd)
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_expert_shared_count(cfg.get("n_shared_experts", 0))
    w.add_expert_weights_scale(cfg["routed_scaling_factor"])
    if cfg.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(rope)
    w.add_rope_scaling_yarn_log_mul(0.1 * rp["mscale_all_dim"])


def write_deepseek(path, family, cfg, tensors, qtype, split):
    w = gguf.GGUFWriter(str(path), DS_ARCH)
    add_deepseek_metadata(w, f"tiny-{family}", cfg, split)
    add_tensors(w, tensors, qtype)


def add_tokenizer(w, pre="gpt-2"):
    """tokenizer.ggml.* as the converter's gpt2 path (LlamaModel falls back to it for a
    byte-level BPE tokenizer.json) writes them."""
    t = json.loads((HF / "tokenizer.json").read_text())
    vocab = t["model"]["vocab"]
    special = {a["id"] for a in t["added_tokens"] if a["special"]}
    tokens = [None] * len(vocab)
    for s, i in vocab.items():
        tokens[i] = s
    w.add_tokenizer_model("gpt2")
    # The fixture's pre-tokenizer is ByteLevel(use_regex=True): the GPT-2 regex, llama.cpp "gpt-2".
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                       for i in range(len(tokens))])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in t["model"]["merges"]])
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)


def add_metadata(w, family, cfg, dense=False):
    arch = ARCH[family] if not dense else "llama"
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w.add_name(f"tiny-{family}" if not dense else "tiny-llama-dense")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    if cfg.get("head_dim") and cfg["head_dim"] * heads != cfg["hidden_size"]:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if family == "mixtral" and cfg.get("sliding_window"):
        w.add_sliding_window(cfg["sliding_window"])
    if dense:
        w.add_feed_forward_length(cfg["intermediate_size"])
        return
    w.add_expert_count(cfg.get("num_local_experts") or cfg.get("num_experts"))
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    # The converter writes the expert width as feed_forward_length for llama (Mixtral) and as
    # expert_feed_forward_length for the others; feed_forward_length is then the dense width.
    w.add_feed_forward_length(cfg["intermediate_size"])
    if family != "mixtral":
        w.add_expert_feed_forward_length(cfg.get("moe_intermediate_size", cfg["intermediate_size"]))
    if cfg.get("shared_expert_intermediate_size"):
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])


def qtype_for(name, arr, qtype):
    """What the converter with --outtype q8_0 (or llama-quantize) stores `name` as."""
    if qtype == Q.F32 or arr.ndim < 2 or name.endswith("ffn_gate_inp.weight") \
            or name.endswith(".bias"):
        return Q.F32
    if arr.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] != 0:
        return Q.F16
    return qtype


def write(path, family, cfg, tensors, qtype, dense=False):
    w = gguf.GGUFWriter(str(path), ARCH[family] if not dense else "llama")
    add_metadata(w, family, cfg, dense)
    add_tensors(w, tensors, qtype)


def add_tensors(w, tensors, qtype):
    """The file type, the tokenizer and the tensors (quantised as qtype_for says); writes and
    closes the file."""
    w.add_file_type({Q.F32: gguf.LlamaFileType.ALL_F32, Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
                     Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
                     Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])
    add_tokenizer(w)
    for name, arr in tensors:
        arr = np.ascontiguousarray(arr.astype(np.float32))
        t = qtype_for(name, arr, qtype)
        if t == Q.F32:
            w.add_tensor(name, arr)
        elif t == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            data = quants.quantize(arr, t)
            w.add_tensor(name, data, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


GPT_OSS_ARCH = "gpt-oss"
FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
               dtype=np.float32)


def hf_mxfp4(w):
    """Hugging Face's MXFP4 of `w` [..., rows, cols] (cols a multiple of 32), as the published
    gpt-oss checkpoints store it: `blocks` [..., rows, cols/32, 16] u8 (value 2i in the low nibble
    of byte i, 2i + 1 in the high one) and `scales` [..., rows, cols/32] u8 (E8M0: 2^(s - 127)),
    each scale the least power of two with max|v| / scale <= 6, each code the nearest E2M1 value
    (the first of equals)."""
    g = w.reshape(*w.shape[:-1], w.shape[-1] // 32, 32).astype(np.float32)
    amax = np.abs(g).max(axis=-1)
    e = np.where(amax > 0, np.ceil(np.log2(np.where(amax > 0, amax, 1) / 6.0)), 0).astype(np.int32)
    scale = np.exp2(e).astype(np.float32)[..., None]
    codes = np.abs(g[..., None] / scale[..., None] - FP4).argmin(axis=-1).astype(np.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.astype(np.uint8), (127 + e).astype(np.uint8)


def transform_nibble_layout(tensor):
    """conversion/gpt_oss.py GptOssModel.transform_nibble_layout, verbatim (torch)."""
    import torch
    assert tensor.dtype == torch.uint8
    assert tensor.shape[-1] == 16
    # swap nibbles
    t_lo = tensor & 0x0F
    t_hi = tensor & 0xF0
    t_swapped = (t_lo << 4) | (t_hi >> 4)
    tensor = t_swapped
    # transform aaaa...bbbb... to abababab...
    blk_a, blk_b = tensor.chunk(2, dim=-1)
    # get a_
    blk_a0 = (blk_a & 0xF0).view(-1, 1)
    blk_a1 = (blk_a << 4).view(-1, 1)
    blk_a = torch.stack((blk_a0, blk_a1), dim=2).view(tensor.shape)
    # get _b
    blk_b0 = (blk_b >> 4).view(-1, 1)
    blk_b1 = (blk_b & 0x0F).view(-1, 1)
    blk_b = torch.stack((blk_b0, blk_b1), dim=2).view(tensor.shape)
    # swap once more
    out = blk_a | blk_b
    out_h = out & 0xF0
    out_l = out & 0x0F
    out = (out_h >> 4) | (out_l << 4)
    return out


def repack_mxfp4(blocks, scales):
    """conversion/gpt_oss.py GptOssModel.repack_mxfp4: ggml block_mxfp4 bytes [E, rows, groups * 17]
    (scale byte, then the 16 code bytes in ggml's order)."""
    import torch
    blocks = transform_nibble_layout(torch.from_numpy(np.ascontiguousarray(blocks)))
    scales = torch.from_numpy(np.ascontiguousarray(scales)).unsqueeze(-1)
    new_data = torch.concat((scales, blocks), dim=-1)
    return new_data.view(new_data.shape[0], new_data.shape[1], new_data.shape[2] * new_data.shape[3]).numpy()


def ggml_mxfp4_values(raw, cols):
    """ggml-quants.c dequantize_row_mxfp4 on raw [..., groups * 17] bytes: kvalues_mxfp4 (E2M1
    doubled) x 2^(e - 128), value j from the low nibble of qs[j], j + 16 from its high nibble."""
    kv = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float64)
    b = raw.reshape(*raw.shape[:-1], cols // 32, 17)
    d = np.exp2(b[..., 0].astype(np.float64) - 128)[..., None]
    qs = b[..., 1:]
    vals = np.concatenate([kv[qs & 0x0F], kv[qs >> 4]], axis=-1) * d
    return vals.reshape(*raw.shape[:-1], cols)


def gpt_oss_tensors(cfg, st, mxfp4):
    """(gguf name, array or (raw MXFP4 bytes, shape)) of the gpt-oss checkpoint as GptOssModel maps
    it; with `mxfp4`, the experts padded to a width of 32 and stored as ggml MXFP4."""
    n_exp, inter, h = cfg["num_local_experts"], cfg["intermediate_size"], cfg["hidden_size"]
    out = [("token_embd.weight", st["model.embed_tokens.weight"]),
           ("output_norm.weight", st["model.norm.weight"]),
           ("output.weight", st.get("lm_head.weight", st["model.embed_tokens.weight"]))]
    for i in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{i}", f"blk.{i}"
        a, m = f"{p}.self_attn", f"{p}.mlp"
        out += [(f"{b}.attn_norm.weight", st[f"{p}.input_layernorm.weight"]),
                (f"{b}.post_attention_norm.weight", st[f"{p}.post_attention_layernorm.weight"]),
                (f"{b}.attn_sinks.weight", st[f"{a}.sinks"])]
        for x, g in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output")):
            out += [(f"{b}.attn_{g}.weight", st[f"{a}.{x}_proj.weight"]),
                    (f"{b}.attn_{g}.bias", st[f"{a}.{x}_proj.bias"])]
        out += [(f"{b}.ffn_gate_inp.weight", st[f"{m}.router.weight"]),
                (f"{b}.ffn_gate_inp.bias", st[f"{m}.router.bias"])]
        # modify_tensors: [E, H, 2I] used as x @ W -> transpose -> [E, 2I, H], rows interleaved.
        gate_up = st[f"{m}.experts.gate_up_proj"].transpose(0, 2, 1)
        gu_bias = st[f"{m}.experts.gate_up_proj_bias"]
        down = st[f"{m}.experts.down_proj"].transpose(0, 2, 1)  # [E, H, I]
        down_bias = st[f"{m}.experts.down_proj_bias"]
        if mxfp4:
            # Pad each expert from I to 32 units (zero rows / columns / biases).
            pad = 32 - inter
            gu = gate_up.reshape(n_exp, inter, 2, h)
            gu = np.concatenate([gu, np.zeros((n_exp, pad, 2, h), np.float32)], axis=1)
            gate_up = gu.reshape(n_exp, 64, h)
            gub = gu_bias.reshape(n_exp, inter, 2)
            gu_bias = np.concatenate([gub, np.zeros((n_exp, pad, 2), np.float32)], axis=1).reshape(n_exp, 64)
            down = np.concatenate([down, np.zeros((n_exp, h, pad), np.float32)], axis=2)
            # Hugging Face's published form, then generate_extra_tensors / repack_mxfp4.
            gu_blocks, gu_scales = hf_mxfp4(gate_up)
            d_blocks, d_scales = hf_mxfp4(down)
            gate = repack_mxfp4(gu_blocks[:, ::2], gu_scales[:, ::2])
            up = repack_mxfp4(gu_blocks[:, 1::2], gu_scales[:, 1::2])
            dn = repack_mxfp4(d_blocks, d_scales)
            # The repacked bytes must decode (as ggml does) to the Hugging Face MXFP4 values.
            hf_vals = FP4[gu_blocks & 0x0F], FP4[gu_blocks >> 4]
            hf_gu = np.stack(hf_vals, axis=-1).reshape(n_exp, 64, h // 32, 32) \
                * np.exp2(gu_scales.astype(np.float64) - 127)[..., None]
            hf_gu = hf_gu.reshape(n_exp, 64, h)
            assert np.array_equal(ggml_mxfp4_values(gate, h), hf_gu[:, ::2])
            assert np.array_equal(ggml_mxfp4_values(up, h), hf_gu[:, 1::2])
            out += [(f"{b}.ffn_gate_exps.weight", (gate, (n_exp, 32, h))),
                    (f"{b}.ffn_up_exps.weight", (up, (n_exp, 32, h))),
                    (f"{b}.ffn_down_exps.weight", (dn, (n_exp, h, 32)))]
        else:
            out += [(f"{b}.ffn_gate_exps.weight", gate_up[:, ::2, :]),
                    (f"{b}.ffn_up_exps.weight", gate_up[:, 1::2, :]),
                    (f"{b}.ffn_down_exps.weight", down)]
        out += [(f"{b}.ffn_gate_exps.bias", gu_bias[..., ::2]),
                (f"{b}.ffn_up_exps.bias", gu_bias[..., 1::2]),
                (f"{b}.ffn_down_exps.bias", down_bias)]
    return out


def write_gpt_oss(path, cfg, tensors, mxfp4):
    """GptOssModel.set_gguf_parameters (TextModel's keys, sliding_window, expert width) and the
    tensors: F32, or ggml MXFP4 bytes for the experts."""
    rp = cfg["rope_parameters"]
    w = gguf.GGUFWriter(str(path), GPT_OSS_ARCH)
    w.add_name("tiny-gpt-oss")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(32 if mxfp4 else cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(rp["factor"])
    w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
    w.add_rope_scaling_yarn_beta_fast(rp["beta_fast"])
    w.add_rope_scaling_yarn_beta_slow(rp["beta_slow"])
    w.add_rope_freq_base(rp["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(cfg["num_local_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_sliding_window(cfg["sliding_window"])
    w.add_expert_feed_forward_length(32 if mxfp4 else cfg["intermediate_size"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_MXFP4_MOE if mxfp4 else gguf.LlamaFileType.ALL_F32)
    add_tokenizer(w, pre="gpt-4o")
    for name, arr in tensors:
        if isinstance(arr, tuple):
            raw, _shape = arr
            w.add_tensor(name, np.ascontiguousarray(raw), raw_dtype=Q.MXFP4)
        else:
            w.add_tensor(name, np.ascontiguousarray(arr.astype(np.float32)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_synthetic_gpt_oss(path, layers=2, hidden=2880, inter=2880, experts=32, heads=64, kv=8,
                            head_dim=64, seed=0):
    """A gpt-oss-20b-shaped file with random weights (not committed; docs/gguf.md, "Memory"):
    per block the real model's widths (hidden 2880, 32 experts of 2880, 64 / 8 heads of 64, MXFP4
    experts, F16 attention), `layers` blocks, the fixtures' 512-token vocabulary. The MXFP4 bytes
    are random codes with scale bytes 118-121 (values up to 6 x 2^-6)."""
    rng = np.random.default_rng(seed)
    cfg = json.loads((HF / "gpt_oss" / "fused" / "config.json").read_text())
    w = gguf.GGUFWriter(str(path), GPT_OSS_ARCH)
    w.add_name("synthetic-gpt-oss")
    w.add_block_count(layers)
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(32.0)
    w.add_rope_scaling_orig_ctx_len(4096)
    w.add_rope_scaling_yarn_beta_fast(32.0)
    w.add_rope_scaling_yarn_beta_slow(1.0)
    w.add_rope_freq_base(150000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(experts)
    w.add_expert_used_count(4)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_sliding_window(128)
    w.add_expert_feed_forward_length(inter)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_MXFP4_MOE)
    add_tokenizer(w, pre="gpt-4o")

    def normal(*shape, scale):
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)

    def mxfp4(e, rows, cols):
        raw = rng.integers(0, 256, size=(e, rows, cols // 32, 17), dtype=np.uint8)
        raw[..., 0] = rng.integers(118, 122, size=(e, rows, cols // 32), dtype=np.uint8)
        return raw.reshape(e, rows, cols // 32 * 17)

    q, k = heads * head_dim, kv * head_dim
    w.add_tensor("token_embd.weight", normal(cfg["vocab_size"], hidden, scale=0.02).astype(np.float16))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output.weight", normal(cfg["vocab_size"], hidden, scale=0.02).astype(np.float16))
    for i in range(layers):
        b = f"blk.{i}"
        w.add_tensor(f"{b}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"{b}.post_attention_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"{b}.attn_sinks.weight", normal(heads, scale=0.5))
        for name, rows, cols in (("attn_q", q, hidden), ("attn_k", k, hidden), ("attn_v", k, hidden),
                                 ("attn_output", hidden, q)):
            w.add_tensor(f"{b}.{name}.weight", normal(rows, cols, scale=cols ** -0.5).astype(np.float16))
            w.add_tensor(f"{b}.{name}.bias", normal(rows, scale=0.01))
        w.add_tensor(f"{b}.ffn_gate_inp.weight", normal(experts, hidden, scale=hidden ** -0.5))
        w.add_tensor(f"{b}.ffn_gate_inp.bias", normal(experts, scale=0.1))
        for name, rows, cols in (("ffn_gate_exps", inter, hidden), ("ffn_up_exps", inter, hidden),
                                 ("ffn_down_exps", hidden, inter)):
            w.add_tensor(f"{b}.{name}.weight", mxfp4(experts, rows, cols), raw_dtype=Q.MXFP4)
            w.add_tensor(f"{b}.{name}.bias", normal(experts, rows, scale=0.01))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def mxfp4_reference_logits(cfg, st, out_path):
    """transformers' gpt-oss (eager, f32) on the goldens' input ids with every expert weight
    replaced by its MXFP4 value as the MXFP4 fixture stores it (ggml's decoding of the repacked
    bytes, padding removed): the logits the MXFP4 file must give up to f32 summation order."""
    import torch
    import transformers
    from safetensors.numpy import save_file
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(HF / "gpt_oss" / "fused"), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    inter, h = cfg["intermediate_size"], cfg["hidden_size"]
    named = dict(gpt_oss_tensors(cfg, st, True))
    for i, layer in enumerate(model.model.layers):
        ex = layer.mlp.experts
        gate = ggml_mxfp4_values(named[f"blk.{i}.ffn_gate_exps.weight"][0], h)[:, :inter]  # [E, I, H]
        up = ggml_mxfp4_values(named[f"blk.{i}.ffn_up_exps.weight"][0], h)[:, :inter]
        down = ggml_mxfp4_values(named[f"blk.{i}.ffn_down_exps.weight"][0], 32)[..., :inter]  # [E, H, I]
        gu = np.stack([gate, up], axis=2).reshape(gate.shape[0], 2 * inter, h)  # rows interleaved
        with torch.no_grad():
            ex.gate_up_proj.copy_(torch.from_numpy(gu.transpose(0, 2, 1).astype(np.float32)))
            ex.down_proj.copy_(torch.from_numpy(down.transpose(0, 2, 1).astype(np.float32)))
    golden = load_file(str(HF / "gpt_oss" / "golden.safetensors"))
    ids = torch.from_numpy(golden["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().numpy()
    save_file({"logits": np.ascontiguousarray(logits)}, str(out_path))
    print(f"{out_path.relative_to(ROOT)}: MXFP4 reference logits, max |diff| from the goldens "
          f"{np.abs(logits - golden['logits']).max():.3f}")


def write_all_gpt_oss():
    cfg = json.loads((HF / "gpt_oss" / "fused" / "config.json").read_text())
    st = load_file(str(HF / "gpt_oss" / "fused" / "model.safetensors"))
    for mx, stem in ((False, "f32"), (True, "mxfp4")):
        path = OUT / f"gpt_oss.{stem}.gguf"
        write_gpt_oss(path, cfg, gpt_oss_tensors(cfg, st, mx), mx)
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size} bytes")
    mxfp4_reference_logits(cfg, st, OUT / "gpt_oss.mxfp4.logits.safetensors")


def main():
    """Writes every fixture, or with `gpt_oss` as the argument only the gpt-oss ones."""
    OUT.mkdir(parents=True, exist_ok=True)
    if sys.argv[1:] == ["gpt_oss"]:
        return write_all_gpt_oss()
    if sys.argv[1:2] == ["gpt_oss_synthetic"] and len(sys.argv) == 3:
        write_synthetic_gpt_oss(Path(sys.argv[2]))
        return print(f"{sys.argv[2]}: {Path(sys.argv[2]).stat().st_size} bytes")
    suffix = {Q.F32: "f32", Q.Q8_0: "q8_0", Q.Q4_1: "q4_1", Q.Q4_0: "q4_0"}
    for family in ARCH:
        cfg = json.loads((HF / family / "per_expert" / "config.json").read_text())
        st = load_file(str(HF / family / "per_expert" / "model.safetensors"))
        tensors = tensors_for(family, cfg, st)
        for qt in (Q.F32, Q.Q8_0, Q.Q4_1, Q.Q4_0):
            path = OUT / f"{family}.{suffix[qt]}.gguf"
            write(path, family, cfg, tensors, qt)
            print(f"{path.relative_to(ROOT)}: {path.stat().st_size} bytes")
    for family in ("deepseek_v2", "deepseek_v3"):
        cfg = json.loads((HF / family / "per_expert" / "config.json").read_text())
        st = load_file(str(HF / family / "per_expert" / "model.safetensors"))
        layouts = [(True, family, (Q.F32, Q.Q8_0, Q.Q4_0))]
        if family == "deepseek_v3":
            layouts.append((False, f"{family}-kvb", (Q.F32, Q.Q8_0)))
        for split, stem, qtypes in layouts:
            tensors = deepseek_tensors(cfg, st, split)
            for qt in qtypes:
                path = OUT / f"{stem}.{suffix[qt]}.gguf"
                write_deepseek(path, family, cfg, tensors, qt, split)
                print(f"{path.relative_to(ROOT)}: {path.stat().st_size} bytes")
    write_all_gpt_oss()
    # Dense llama: mixtral's attention, expert 0 of each block as its FFN, tied embeddings.
    cfg = json.loads((HF / "mixtral" / "per_expert" / "config.json").read_text())
    st = load_file(str(HF / "mixtral" / "per_expert" / "model.safetensors"))
    dense = {}
    for k, v in st.items():
        if ".block_sparse_moe." not in k:
            dense[k] = v
    for i in range(cfg["num_hidden_layers"]):
        m = f"model.layers.{i}.block_sparse_moe.experts.0"
        for hf, g in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            dense[f"model.layers.{i}.mlp.{g}.weight"] = st[f"{m}.{hf}.weight"]
    tensors = tensors_for("mixtral", cfg, dense)
    for qt in (Q.F32, Q.Q8_0):
        path = OUT / f"llama-dense.{suffix[qt]}.gguf"
        write(path, "mixtral", cfg, tensors, qt, dense=True)
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    sys.exit(main())
