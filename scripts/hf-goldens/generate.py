#!/usr/bin/env python3
"""Generate tiny Hugging Face MoE checkpoints and reference outputs (goldens) for xmoe-top's tests.

Run by hand (never in CI); see scripts/hf-goldens/README.md. Writes tests/fixtures/hf/.

For each family (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3, gpt_oss):
  - builds a tiny random config (transformers' own config class) and model, with a fixed seed;
  - saves it with save_pretrained in every expert layout the family has on disk:
      per_expert/  save_pretrained(...)                              (default: original per-expert names)
      fused/       save_pretrained(..., save_original_format=False) (transformers 5 in-memory 3D tensors)
    each with the shared byte-level BPE tokenizer.json (gpt_oss: fused/ only, its single on-disk layout);
  - reloads every saved folder with from_pretrained and checks that it reproduces the logits bit for bit;
  - writes <family>/golden.safetensors and <family>/golden.json.
Extras: one bf16 copy with bf16 goldens, saved sharded (mixtral/bf16/: model-0000x-of-0000n.safetensors + index).
"""

import argparse
import json
import re
import os
import shutil
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "assets" / "kjv-train.txt"
CORPUS_BYTES = 200_000
VOCAB = 512
SEQ = 12
SEED = 1234
TEXTS = [
    "The quick brown fox jumps over the lazy dog while the farmer sleeps in the barn.",
    "In the beginning was the Word, and the Word was with God, and the Word was God.",
]

# Shared tiny sizes (keep tests/fixtures/hf under 4 MB).
HIDDEN = 32
HEADS = 4
KV_HEADS = 2
EXPERTS = 8
TOP_K = 2
MOE_INTER = 12  # 2*I=24, I=12, H=32 and E=8 all differ, so the fused dimension order is unambiguous
DENSE_INTER = 20
WEIGHT_STD = 0.2  # much larger than the default 0.02 so routing and logits are not degenerate


def train_tokenizer(out_dir: Path) -> Tokenizer:
    text = CORPUS.read_bytes()[:CORPUS_BYTES].decode("ascii")
    lines = text.splitlines()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=2,
        show_progress=False,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"), pretty=False)
    return tok


def family_configs(vocab: int):
    """Tiny configs. Each dict: family, config class kwargs, notes."""
    common = dict(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        initializer_range=WEIGHT_STD,
        hidden_act="silu",
        num_experts_per_tok=TOP_K,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=0,
    )
    return [
        dict(
            family="mixtral",
            cls=transformers.MixtralConfig,
            kwargs=dict(
                common,
                num_hidden_layers=2,
                intermediate_size=MOE_INTER,
                num_local_experts=EXPERTS,
                head_dim=12,  # explicit, differs from hidden/heads = 8
                sliding_window=5,
                tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            ),
            notes="every layer is MoE (Mixtral has no dense blocks); sliding_window=5 < seq; tied embeddings; "
            "explicit head_dim=12 != hidden/heads=8",
            rule="softmax over all E router logits (f32), top-k of the probabilities, renormalised to sum 1 "
            "(Mixtral always renormalises)",
        ),
        dict(
            family="qwen2_moe",
            cls=transformers.Qwen2MoeConfig,
            kwargs=dict(
                common,
                num_hidden_layers=3,
                intermediate_size=DENSE_INTER,
                moe_intermediate_size=MOE_INTER,
                shared_expert_intermediate_size=40,  # != 2*MOE_INTER, H, DENSE_INTER
                num_experts=EXPERTS,
                decoder_sparse_step=1,
                mlp_only_layers=[1],
                norm_topk_prob=False,
                qkv_bias=True,
                use_sliding_window=False,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            ),
            notes="layers 0 and 2 MoE, layer 1 dense (mlp_only_layers=[1]); shared expert with sigmoid gate; "
            "q/k/v biases (qkv_bias); untied LM head",
            rule="softmax over all E router logits (f32), top-k of the probabilities, NOT renormalised "
            "(norm_topk_prob=false, as in Qwen1.5-MoE-A2.7B); plus shared_expert(x) * sigmoid(shared_expert_gate(x))",
        ),
        dict(
            family="qwen3_moe",
            cls=transformers.Qwen3MoeConfig,
            kwargs=dict(
                common,
                num_hidden_layers=3,
                intermediate_size=DENSE_INTER,
                moe_intermediate_size=MOE_INTER,
                num_experts=EXPERTS,
                decoder_sparse_step=1,
                mlp_only_layers=[1],
                norm_topk_prob=True,
                head_dim=16,  # explicit, differs from hidden/heads = 8 (as Qwen3-30B-A3B: 128 vs 64)
                attention_bias=False,
                use_sliding_window=False,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            ),
            notes="layers 0 and 2 MoE, layer 1 dense (mlp_only_layers=[1]); per-head q/k RMSNorm; "
            "explicit head_dim=16 != hidden/heads=8; untied LM head",
            rule="softmax over all E router logits (f32), top-k of the probabilities, renormalised to sum 1 "
            "(norm_topk_prob=true, as in Qwen3-30B-A3B)",
        ),
        dict(
            family="olmoe",
            cls=transformers.OlmoeConfig,
            kwargs=dict(
                common,
                num_hidden_layers=2,
                intermediate_size=MOE_INTER,
                num_experts=EXPERTS,
                norm_topk_prob=False,
                attention_bias=False,
                clip_qkv=None,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
            ),
            notes="every layer is MoE (OLMoE has no dense blocks); q/k RMSNorm over the full projection "
            "(q: hidden, k: kv_heads*head_dim); untied LM head",
            rule="softmax over all E router logits (f32), top-k of the probabilities, NOT renormalised "
            "(norm_topk_prob=false, as in OLMoE-1B-7B)",
        ),
        dict(
            family="deepseek_v2",
            cls=transformers.DeepseekV2Config,
            kwargs=dict(
                common,
                num_key_value_heads=HEADS,  # MLA: every head has its own k/v (expanded from the latent)
                num_hidden_layers=2,
                intermediate_size=DENSE_INTER,
                moe_intermediate_size=MOE_INTER,
                n_routed_experts=EXPERTS,
                n_shared_experts=2,
                first_k_dense_replace=1,
                topk_method="group_limited_greedy",
                n_group=2,
                topk_group=1,
                routed_scaling_factor=16.0,
                norm_topk_prob=False,
                q_lora_rank=None,  # as DeepSeek-V2-Lite: plain q_proj
                kv_lora_rank=16,
                qk_nope_head_dim=8,
                qk_rope_head_dim=8,
                v_head_dim=12,
                attention_bias=False,
                tie_word_embeddings=True,  # published: untied; tied here to fit the 4 MB budget
                max_position_embeddings=128,
                rope_parameters={
                    "rope_type": "yarn",
                    "rope_theta": 10_000.0,
                    "factor": 4.0,
                    "original_max_position_embeddings": 32,
                    "beta_fast": 32.0,
                    "beta_slow": 1.0,
                    "mscale": 0.707,
                    "mscale_all_dim": 0.707,
                },
            ),
            notes="layer 0 dense (first_k_dense_replace=1), layers 1-2 MoE with 2 shared experts; MLA without "
            "q LoRA (q_lora_rank=null, as V2-Lite); YaRN rope (factor 4, mscale 0.707 as DeepSeek-V2) on the "
            "complex-pair (interleaved) layout; group_limited_greedy over 2 groups of 4, 1 group kept",
            rule="softmax over all E router logits (f32); group score = max prob in each of n_group=2 groups; keep "
            "the topk_group=1 best group(s), zero the other probabilities; top-2 of what is left (torch.topk "
            "sorted=False); weights = those probabilities * routed_scaling_factor (16), never renormalised "
            "(transformers ignores norm_topk_prob for deepseek_v2); plus the shared experts (ungated)",
            select="v2",
        ),
        dict(
            family="deepseek_v3",
            cls=transformers.DeepseekV3Config,
            kwargs=dict(
                common,
                num_key_value_heads=HEADS,
                num_hidden_layers=2,
                intermediate_size=DENSE_INTER,
                moe_intermediate_size=MOE_INTER,
                n_routed_experts=EXPERTS,
                n_shared_experts=1,
                first_k_dense_replace=1,
                n_group=2,
                topk_group=1,
                routed_scaling_factor=2.5,
                norm_topk_prob=True,
                q_lora_rank=20,
                kv_lora_rank=16,
                qk_nope_head_dim=8,
                qk_rope_head_dim=8,
                v_head_dim=12,
                attention_bias=False,
                rope_interleave=True,
                tie_word_embeddings=True,  # published: untied; tied here to fit the 4 MB budget
                max_position_embeddings=128,
                rope_parameters={
                    "rope_type": "yarn",
                    "rope_theta": 10_000.0,
                    "factor": 4.0,
                    "original_max_position_embeddings": 32,
                    "beta_fast": 32.0,
                    "beta_slow": 1.0,
                    "mscale": 1.0,
                    "mscale_all_dim": 1.0,
                },
            ),
            notes="layer 0 dense (first_k_dense_replace=1), layers 1-2 MoE with 1 shared expert; MLA with q LoRA "
            "(q_lora_rank=20); YaRN rope (factor 4, mscale 1.0 as DeepSeek-V3), rope_interleave=true; sigmoid "
            "router with e_score_correction_bias (random, non-zero here), 2 groups of 4, 1 kept",
            rule="scores = sigmoid(router logits) (f32); choice = scores + e_score_correction_bias; group score = "
            "sum of the top-2 choice values in each of n_group=2 groups; keep topk_group=1 group(s); top-2 of the "
            "choice values in the kept groups (torch.topk sorted=False); weights = the *unbiased* sigmoid scores of "
            "those experts, divided by their sum (+1e-20) (norm_topk_prob=true), times routed_scaling_factor (2.5); "
            "plus the shared expert (ungated)",
            select="v3",
        ),
        dict(
            family="gpt_oss",
            cls=transformers.GptOssConfig,
            kwargs=dict(
                common,
                num_hidden_layers=2,
                intermediate_size=MOE_INTER,
                num_local_experts=EXPERTS,
                head_dim=12,
                layer_types=["sliding_attention", "full_attention"],
                sliding_window=5,
                attention_bias=True,
                tie_word_embeddings=True,  # published: untied; tied here to fit the 4 MB budget
                max_position_embeddings=128,
                rope_parameters={
                    "rope_type": "yarn",
                    "rope_theta": 150_000.0,
                    "factor": 4.0,
                    "original_max_position_embeddings": 32,
                    "beta_fast": 32.0,
                    "beta_slow": 1.0,
                    "truncate": False,
                },
            ),
            notes="layer 0 sliding (window 5), layer 1 full attention; both MoE (gpt-oss has no dense blocks); "
            "attention sinks; biases on q/k/v/o, router and experts; clamped SwiGLU (alpha 1.702, limit 7); "
            "YaRN rope (factor 4, truncate false, as gpt-oss); explicit head_dim 12",
            rule="router logits = x W^T + b; top-2 of the logits; weights = softmax over those 2 logits",
            select="logits",
            layouts=("fused",),
        ),
    ]


def init_weights(model, seed: int):
    """Deterministic re-initialisation: matrices and embeddings N(0, WEIGHT_STD), biases N(0, 0.1),
    norm weights 1 + N(0, 0.1) (so a missing norm weight is caught)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name and name.endswith("weight") and p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(WEIGHT_STD * torch.randn(p.shape, generator=g))
        for name, b in sorted(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3: make the bias matter
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def router_hooks(model):
    captured = {}
    handles = []
    for name, mod in model.named_modules():
        if type(mod).__name__.lower().endswith("topkrouter"):
            layer = int(name.split(".")[2])  # model.layers.{L}.mlp.gate (gpt_oss: .mlp.router)

            def hook(_m, _inp, out, layer=layer):
                logits, weights, ids = out
                captured[layer] = (logits.detach().clone(), weights.detach().clone(), ids.detach().clone())

            handles.append(mod.register_forward_hook(hook))
    return captured, handles


def run(model, input_ids):
    captured, handles = router_hooks(model)
    with torch.no_grad():
        out = model(input_ids=input_ids, output_router_logits=True, use_cache=False)
    for h in handles:
        h.remove()
    return out, captured


def tensor_listing(folder: Path):
    rows = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                sl = sf.get_slice(k)
                rows[k] = dict(shape=list(sl.get_shape()), dtype=sl.get_dtype(), file=f.name)
    return rows


def moe_block_listing(rows: dict, layer: int):
    """Tensors of one MoE block (per-expert tensors: expert 0 only, the others have the same shapes)."""
    pre = f"model.layers.{layer}."
    return {
        k: v
        for k, v in rows.items()
        if k.startswith(pre)
        and not any(s in k for s in ("self_attn", "layernorm"))
        and not re.search(r"\.experts\.[1-9][0-9]*\.", k)
    }


def selection_scores(spec, config, model, layer: int, router_logits: torch.Tensor):
    """The values torch.topk picks the experts from, recomputed from the router logits as the family's
    router does (to look for ties at the top-k boundary), and the group scores where routing is grouped."""
    rl = router_logits.float()
    sel = spec.get("select", "softmax")
    if sel == "softmax":
        return torch.softmax(rl, -1), None
    if sel == "logits":
        return rl, None
    E, G, TG = config.n_routed_experts, config.n_group, config.topk_group
    if sel == "v2":
        scores = torch.softmax(rl, -1)
        group = scores.view(-1, G, E // G).max(-1).values
        fill = 0.0
    else:  # v3
        bias = model.model.layers[layer].mlp.gate.e_score_correction_bias.float()
        scores = rl.sigmoid() + bias
        group = scores.view(-1, G, E // G).topk(2, dim=-1)[0].sum(-1)
        fill = float("-inf")
    keep = torch.zeros_like(group).scatter_(1, torch.topk(group, TG, dim=-1)[1], 1.0)
    mask = keep.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E).bool()
    return scores.masked_fill(~mask, fill), group


def find_ties(probs: torch.Tensor, k: int, eps=1e-6):
    s, idx = torch.sort(probs, dim=-1, descending=True)
    ties = []
    for t in range(probs.shape[0]):
        gap = float(s[t, k - 1] - s[t, k])
        if gap < eps:
            ties.append(dict(token=t, experts=[int(idx[t, k - 1]), int(idx[t, k])], gap=gap))
    return ties


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "tests" / "fixtures" / "hf"))
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        for child in out.iterdir():
            if child.name != "README.md":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(SEED)
    tok = train_tokenizer(out)
    tok_path = out / "tokenizer.json"
    enc = [tok.encode(t).ids for t in TEXTS]
    assert all(len(e) >= SEQ for e in enc), [len(e) for e in enc]
    input_ids = torch.tensor([e[:SEQ] for e in enc], dtype=torch.int64)
    versions = dict(
        python=sys.version.split()[0],
        torch=torch.__version__,
        transformers=transformers.__version__,
        tokenizers=tokenizers.__version__,
        safetensors=safetensors.__version__,
    )

    for fi, spec in enumerate(family_configs(tok.get_vocab_size())):
        fam = spec["family"]
        print(f"== {fam}", flush=True)
        fdir = out / fam
        fdir.mkdir()
        config = spec["cls"](**spec["kwargs"])
        config._attn_implementation = "eager"
        torch.manual_seed(SEED + fi)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
        model.eval()
        init_weights(model, SEED + fi)
        if config.tie_word_embeddings:
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

        outp, cap = run(model, input_ids)
        logits = outp.logits.float()
        moe_layers = sorted(cap)
        assert len(outp.router_logits) == len(moe_layers)
        golden = {"input_ids": input_ids.contiguous(), "logits": logits.contiguous()}
        ties = {}
        router_summary = {}
        for i, L in enumerate(moe_layers):
            rl, w, ids = cap[L]
            assert torch.equal(rl, outp.router_logits[i]), "hook and output_router_logits disagree"
            golden[f"router_logits.{L}"] = rl.float().contiguous()
            golden[f"topk_ids.{L}"] = ids.to(torch.int64).contiguous()
            golden[f"topk_weights.{L}"] = w.float().contiguous()
            probs = torch.softmax(rl.float(), dim=-1)
            sel, group = selection_scores(spec, config, model, L, rl)
            # the chosen set must be the top-k of the recomputed selection scores
            assert torch.equal(
                torch.sort(ids, -1).values, torch.sort(torch.topk(sel, config.num_experts_per_tok, -1)[1], -1).values
            ), f"{fam} layer {L}: recomputed selection differs"
            ties[str(L)] = find_ties(sel, config.num_experts_per_tok)
            if group is not None:
                ties[f"{L}.groups"] = find_ties(group, config.topk_group)
            router_summary[str(L)] = dict(
                max_prob_mean=float(probs.max(-1).values.mean()),
                min_prob_mean=float(probs.min(-1).values.mean()),
                experts_used=sorted({int(x) for x in ids.flatten()}),
            )
        save_file(golden, str(fdir / "golden.safetensors"))

        layouts = {}
        for layout, kw in (("per_expert", {}), ("fused", {"save_original_format": False})):
            if layout not in spec.get("layouts", ("per_expert", "fused")):
                continue
            d = fdir / layout
            model.save_pretrained(str(d), **kw)
            shutil.copy(tok_path, d / "tokenizer.json")
            layouts[layout] = d
        extra = {}
        if fam == "mixtral":
            # bf16 copy: cast the f32 weights to bf16, save, and take the bf16 goldens from the model as
            # from_pretrained(dtype=bfloat16) builds it (the path a user takes; note that a model cast with
            # .to(bfloat16) instead also casts the rotary inv_freq buffer, from_pretrained keeps it f32).
            mb = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
            mb.load_state_dict(model.state_dict())
            mb = mb.to(torch.bfloat16).eval()
            mb.set_experts_implementation("eager")
            d = fdir / "bf16"
            mb.save_pretrained(str(d), max_shard_size="40KB")  # also the sharded example: 2-3 shards + index
            shutil.copy(tok_path, d / "tokenizer.json")
            assert (d / "model.safetensors.index.json").exists()
            # experts_implementation="eager": the default grouped_mm kernel rejects bf16 rows of I=12 elements
            # (24 bytes; it needs strides that are multiples of 16 bytes). "eager" is the per-expert loop of
            # the modeling file (index_add_ accumulation in bf16).
            mbl = transformers.AutoModelForCausalLM.from_pretrained(
                str(d), dtype=torch.bfloat16, attn_implementation="eager", experts_implementation="eager"
            ).eval()
            outb, capb = run(mbl, input_ids)
            out_cast, _ = run(mb, input_ids)
            gb = {"input_ids": input_ids.contiguous(), "logits": outb.logits.float().contiguous()}
            for L in sorted(capb):
                rl, w, ids = capb[L]
                gb[f"router_logits.{L}"] = rl.float().contiguous()
                gb[f"topk_ids.{L}"] = ids.to(torch.int64).contiguous()
                gb[f"topk_weights.{L}"] = w.float().contiguous()
            save_file(gb, str(fdir / "golden-bf16.safetensors"))
            diff = (outb.logits.float() - logits).abs()
            extra["bf16"] = dict(
                folder="bf16/ (per-expert layout, bf16 weights = f32 weights rounded to bf16, saved with "
                "max_shard_size='40KB': 3 shards + model.safetensors.index.json)",
                experts_implementation="eager (grouped_mm rejects bf16 with I=12, see generate.py)",
                goldens="golden-bf16.safetensors: same keys as golden.safetensors, computed by "
                "from_pretrained('bf16', dtype=torch.bfloat16) (all activations bf16; RMSNorm and softmax "
                "internally f32 as in the modeling code); values stored as f32",
                max_abs_logit_diff_vs_f32=float(diff.max()),
                mean_abs_logit_diff_vs_f32=float(diff.mean()),
                f32_logits_abs_max=float(logits.abs().max()),
                topk_ids_equal_to_f32={
                    str(L): bool(torch.equal(capb[L][2], cap[L][2])) for L in sorted(capb)
                },
                topk_set_differs_from_f32={
                    str(L): [
                        dict(
                            token=t,
                            f32_ids=[int(x) for x in cap[L][2][t]],
                            bf16_ids=[int(x) for x in capb[L][2][t]],
                            f32_prob_gap_at_topk_boundary=float(
                                torch.sort(torch.softmax(cap[L][0][t].float(), -1), descending=True).values[
                                    config.num_experts_per_tok - 1
                                ]
                                - torch.sort(torch.softmax(cap[L][0][t].float(), -1), descending=True).values[
                                    config.num_experts_per_tok
                                ]
                            ),
                        )
                        for t in range(input_ids.numel())
                        if set(cap[L][2][t].tolist()) != set(capb[L][2][t].tolist())
                    ]
                    for L in sorted(capb)
                },
                max_abs_logit_diff_if_cast_with_to_bf16_instead=float(
                    (out_cast.logits.float() - outb.logits.float()).abs().max()
                ),
                moe_block_tensors=moe_block_listing(tensor_listing(d), moe_layers[0]),
            )

        # The two layouts hold the same numbers: fused gate_up_proj[e] == cat(gate_e, up_e) on dim 0
        # and fused down_proj[e] == down_e.
        layout_check = "gpt_oss has one on-disk layout in transformers (no conversion mapping): only fused/"
        per = {k: v for f in (fdir / "per_expert").glob("*.safetensors") for k, v in load_file(str(f)).items()}
        fus = {k: v for f in (fdir / "fused").glob("*.safetensors") for k, v in load_file(str(f)).items()}
        names = dict(mixtral=("block_sparse_moe", "w1", "w3", "w2"))
        blk, gname, uname, dname = names.get(fam, ("mlp", "gate_proj", "up_proj", "down_proj"))
        for L in moe_layers if per else []:
            gu = fus[f"model.layers.{L}.mlp.experts.gate_up_proj"]
            dn = fus[f"model.layers.{L}.mlp.experts.down_proj"]
            for e in range(EXPERTS):
                pre = f"model.layers.{L}.{blk}.experts.{e}."
                cat = torch.cat([per[pre + gname + ".weight"], per[pre + uname + ".weight"]], dim=0)
                assert torch.equal(gu[e], cat), (fam, L, e)
                assert torch.equal(dn[e], per[pre + dname + ".weight"]), (fam, L, e)
        layout_check = layout_check if not per else (
            f"checked by the generator: fused model.layers.L.mlp.experts.gate_up_proj[e] == "
            f"cat(model.layers.L.{blk}.experts.e.{gname}.weight, ...{uname}.weight, dim=0) and "
            f"fused down_proj[e] == ...experts.e.{dname}.weight, for every MoE layer and expert; "
            f"every folder reloads with from_pretrained and reproduces the logits"
        )

        # Reload every folder and check it reproduces the goldens exactly.
        layout_info = {}
        for layout, d in layouts.items():
            rows = tensor_listing(d)
            m2 = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager")
            m2.eval()
            o2, _ = run(m2, input_ids)
            exact = bool(torch.equal(o2.logits.float(), logits))
            max_diff = float((o2.logits.float() - logits).abs().max())
            # Same weights (checked), but the fused load can give a different memory layout to the 3D
            # parameters, and the grouped_mm experts kernel then rounds differently (~1e-6).
            assert max_diff < 1e-4, f"{fam}/{layout}: reloaded logits differ by {max_diff}"
            layout_info[layout] = dict(
                holds={
                    "per_expert": "save_pretrained(dir) (save_original_format=True, the default): transformers "
                    "converts its 3D expert tensors back to the original one-tensor-per-expert names",
                    "fused": "save_pretrained(dir, save_original_format=False): the in-memory 3D expert tensors "
                    "(gate_up_proj, down_proj) as they are",
                }[layout],
                files=sorted(p.name for p in d.iterdir()),
                num_tensors=len(rows),
                moe_block_tensors=moe_block_listing(rows, moe_layers[0]),
                reload_logits_bit_exact=exact,
                reload_logits_max_abs_diff=max_diff,
            )
        meta = dict(
            family=fam,
            model_class=type(model).__name__,
            notes=spec["notes"],
            native_rule=spec["rule"],
            moe_layers=moe_layers,
            dense_layers=[i for i in range(config.num_hidden_layers) if i not in moe_layers],
            texts=TEXTS,
            input_ids=dict(dtype="int64", shape=list(input_ids.shape), note=f"first {SEQ} tokens of each text, no padding, no BOS"),
            golden_tensors={k: dict(shape=list(v.shape), dtype=str(v.dtype).replace("torch.", "")) for k, v in golden.items()},
            router_tensors_note="tokens are flattened batch-major: row = b * seq + s; topk_ids/topk_weights are in "
            + ("torch.topk(sorted=False) order (unspecified: compare as sets of (id, weight) pairs)"
               if fam.startswith("deepseek") else "torch.topk order (descending)")
            + "; topk_weights are exactly what the experts' outputs are multiplied by",
            ties_note="gap between the k-th and (k+1)-th of the values torch.topk selects from (probabilities, or "
            "gpt_oss logits, or DeepSeek-V3 biased sigmoid scores), after group masking; 'L.groups': the same at the "
            "topk_group boundary of the group scores",
            ties_within_1e_6_at_topk_boundary=ties,
            router_stats=router_summary,
            attn_implementation="eager",
            experts_implementation=getattr(config, "_experts_implementation", None),
            logits_abs_max=float(logits.abs().max()),
            logits_std=float(logits.std()),
            config=json.loads(config.to_json_string(use_diff=False)),
            layouts=layout_info,
            layout_check=layout_check,
            versions=versions,
            seed=SEED + fi,
            weight_init=f"N(0, {WEIGHT_STD}) for matrices/embeddings, N(0, 0.1) biases, 1+N(0, 0.1) norm weights",
        )
        meta.update(extra)
        (fdir / "golden.json").write_text(json.dumps(meta, indent=1) + "\n")
        print(f"   moe layers {moe_layers}, ties {sum(len(v) for v in ties.values())}, "
              f"logits std {meta['logits_std']:.3f}, layouts {list(layouts)}", flush=True)

    (out / "versions.json").write_text(json.dumps(versions, indent=1) + "\n")


if __name__ == "__main__":
    main()
