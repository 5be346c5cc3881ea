#!/usr/bin/env python3
"""Writes tiny GGUF files from the tiny Hugging Face fixtures in tests/fixtures/hf/, the way
llama.cpp's convert_hf_to_gguf.py would (tensor names, metadata keys, the q/k row permutation of
the `llama` architecture, tokenizer metadata), into tests/fixtures/gguf/.

Run by hand (never by the tests), from the repository root:

    /work/venv-goldens/bin/pip install gguf==0.19.0
    /work/venv-goldens/bin/python scripts/gguf-fixtures/generate.py

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


def add_tokenizer(w):
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
    w.add_tokenizer_pre("gpt-2")
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


def main():
    OUT.mkdir(parents=True, exist_ok=True)
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
