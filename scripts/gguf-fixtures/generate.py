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

Deviations from a real conversion, all needed to reproduce the HF goldens exactly:
- mixtral: `llama.attention.sliding_window` = 5 is written (the converter does not write it for
  `llama`; published Mixtral has no sliding window, the tiny fixture has one).
- qwen2_moe / qwen3_moe: block 1 is a dense FFN (`mlp_only_layers`); llama.cpp has no such block
  for these architectures, so it is written under the `llama` dense names
  `blk.1.ffn_{gate,up,down}.weight` with `{arch}.feed_forward_length` its width.
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
    if qtype == Q.F32 or arr.ndim < 2 or name.endswith("ffn_gate_inp.weight"):
        return Q.F32
    if arr.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] != 0:
        return Q.F16
    return qtype


def write(path, family, cfg, tensors, qtype, dense=False):
    w = gguf.GGUFWriter(str(path), ARCH[family] if not dense else "llama")
    add_metadata(w, family, cfg, dense)
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
