#!/usr/bin/env python3
"""Writes tests/fixtures/import/: small dumps in each engine format, built the way each engine's
own dump code builds them (the code is mirrored below, function by function; the engine commits
are in docs/import-formats.md), plus the bad inputs of tests/import.rs.

Run by hand, with torch installed:  /work/venv-goldens/bin/python scripts/import-fixtures/generate.py
Never run by the tests (they read the committed outputs). Deterministic: the same files each run,
up to the zip entry timestamps torch does not set (it writes none) and serialization_id.
"""

import base64
import json
import os
import pathlib

import torch

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "import"

LAYERS = 2  # SGLang: num_hidden_layers; vLLM: num_moe_layers
LOGICAL = 4
TOP_K = 2
# The example of vLLM's EplbState docstring: 6 physical experts for 4 logical ones on 3 ranks.
PHYSICAL_TO_LOGICAL = [[0, 1, 2, 3, 0, 1], [0, 2, 0, 1, 0, 3]]
PHYSICAL = len(PHYSICAL_TO_LOGICAL[0])


def save(obj, name):
    # torch.save writes a zip whose entries are named <stem>/data.pkl, <stem>/data/<key>, ...
    # A fixed name keeps the archive independent of the temporary path.
    torch.save(obj, OUT / name)


# ---- per-token routing of the small case -------------------------------------------------------
# Physical expert ids chosen by each token at each layer (top-2), as SGLang's select_experts hands
# them to the recorder (after logical-to-physical dispatch). Pass 0: 3 tokens, pass 1: 2 tokens.
PASSES = [
    [[[0, 1], [4, 2], [0, 3]], [[0, 3], [2, 5], [1, 0]]],  # [layer][token][k]
    [[[5, 2], [3, 4]], [[4, 1], [0, 5]]],
]


# sglang python/sglang/srt/eplb/expert_distribution.py, _convert_per_token_to_global_physical_count
def convert_per_token_to_global_physical_count(num_tokens, num_layers, num_physical_experts, topk_ids_of_layer):
    topk_ids_layer_major = topk_ids_of_layer[:, :num_tokens, :].reshape(num_layers, -1)
    mask = topk_ids_layer_major != -1
    index = topk_ids_layer_major.masked_fill(~mask, 0).long()
    src = mask.int()
    ans = torch.zeros((num_layers, num_physical_experts), dtype=topk_ids_of_layer.dtype)
    ans.scatter_add_(dim=1, index=index, src=src)
    return ans


# sglang ..., _convert_global_physical_count_to_logical_count
def convert_global_physical_count_to_logical_count(global_physical_count, num_layers, num_logical_experts, physical_to_logical_map):
    dim_extra, _, _ = global_physical_count.shape
    logical_count = torch.zeros((dim_extra, num_layers, num_logical_experts), dtype=global_physical_count.dtype)
    logical_count.scatter_add_(
        dim=2,
        index=physical_to_logical_map.unsqueeze(0).expand(dim_extra, -1, -1).to(torch.int64),
        src=global_physical_count,
    )
    return logical_count


def topk_buffer(pass_ids):
    # _DetailSinglePassGatherer: a [num_layers, chunked_prefill_size * 8, _TOP_K_NUM = 8] int32
    # buffer reset to -1; on_select_experts writes [:tokens, :top_k]; collect() slices [:, :tokens].
    tokens = len(pass_ids[0])
    buf = torch.full((LAYERS, 16 * 8, 8), -1, dtype=torch.int32)
    for layer, rows in enumerate(pass_ids):
        buf[layer, :tokens, :TOP_K] = torch.tensor(rows, dtype=torch.int32)
    return buf, tokens


def p2l():
    # ExpertLocationMetadata.physical_to_logical_map: int64 [num_layers, num_physical_experts].
    return torch.tensor(PHYSICAL_TO_LOGICAL, dtype=torch.int64)


def detail_records(per_token):
    records = []
    for forward_pass_id, pass_ids in enumerate(PASSES):
        buf, tokens = topk_buffer(pass_ids)
        global_physical_count = convert_per_token_to_global_physical_count(tokens, LAYERS, PHYSICAL, buf)
        if per_token:
            single = dict(
                input_ids=list(range(100 + 10 * forward_pass_id, 100 + 10 * forward_pass_id + tokens)),
                positions=list(range(tokens)),
                extend_seq_lens=[tokens],
                forward_mode=1,  # ForwardMode.EXTEND
                topk_ids_of_layer=buf[:, :tokens, :].clone().cpu(),
                misc_objects=[],
                global_physical_count=global_physical_count,
            )
        else:
            # _SelectExpertsSinglePassGatherer.collect(): dict(global_physical_count=...)
            single = dict(global_physical_count=global_physical_count)
        # _DetailAccumulator.append
        records.append(dict(forward_pass_id=forward_pass_id, rank=0, gatherer_key="primary",
                            **{k: (v.cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in single.items()}))
    return records


def sglang_detail(per_token, name):
    # _DetailAccumulator.dump
    save(dict(records=detail_records(per_token), last_physical_to_logical_map=p2l()), name)


def sglang_stat():
    # _StatAccumulator with a _CircularBuffer of expert_distribution_recorder_buffer_size = 4:
    # two passes appended, the other rows stay zero; dump() converts to logical counts.
    buffer = torch.zeros((4, LAYERS, PHYSICAL), dtype=torch.int32)
    for i, pass_ids in enumerate(PASSES):
        buf, tokens = topk_buffer(pass_ids)
        buffer[i] = convert_per_token_to_global_physical_count(tokens, LAYERS, PHYSICAL, buf)
    logical_count = convert_global_physical_count_to_logical_count(buffer, LAYERS, LOGICAL, p2l())
    save(dict(rank=0, logical_count=logical_count, average_utilization_rate_over_window=None), "sglang-stat.pt")


def sglang_routed():
    # tokenizer_manager: meta_info["routed_experts"] = pybase64.b64encode(t.numpy().tobytes()).decode("utf-8")
    # with t int32 [tokens, num_hidden_layers, num_experts_per_tok], logical expert ids.
    responses = []
    for i, pass_ids in enumerate(PASSES):
        per_token = [[[PHYSICAL_TO_LOGICAL[l][p] for p in pass_ids[l][t]] for l in range(LAYERS)]
                     for t in range(len(pass_ids[0]))]
        t = torch.tensor(per_token, dtype=torch.int32)
        responses.append({
            "text": "fixture",
            "meta_info": {
                "id": f"req-{i}",
                "prompt_tokens": len(per_token),
                "completion_tokens": 1,
                "routed_experts": base64.b64encode(t.numpy().tobytes()).decode("utf-8"),
            },
        })
    (OUT / "sglang-routed.json").write_text(json.dumps(responses, indent=1) + "\n")


def vllm_eplb():
    # EplbState: expert_load_window int32 [window_size, num_moe_layers, num_physical_experts];
    # step() copies expert_load_pass into row expert_load_window_step. vLLM writes no file: the
    # documented hook saves the state's tensors with torch.save (docs/import-formats.md).
    window = torch.zeros((3, LAYERS, PHYSICAL), dtype=torch.int32)
    step = 0
    for pass_ids in PASSES:
        buf, tokens = topk_buffer(pass_ids)
        window[step] = convert_per_token_to_global_physical_count(tokens, LAYERS, PHYSICAL, buf)
        step = (step + 1) % window.shape[0]
    save(dict(expert_load_window=window, physical_to_logical_map=p2l(), expert_load_window_step=step), "vllm-eplb.pt")


class Evil:
    # Would run a shell command on load; xmoe-top must refuse it by name without running it.
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def bad_inputs():
    stat = (OUT / "sglang-stat.pt").read_bytes()
    (OUT / "bad-truncated.pt").write_bytes(stat[: len(stat) // 2])
    save({"model.weight": torch.ones(2, 2)}, "bad-foreign.pt")
    save({"logical_count": Evil()}, "bad-global.pt")


def fuzz_pickles():
    # The data.pkl of each archive, for the torch_pickle fuzz target (tests/fixtures/fuzz/): ok-*
    # decode to plain data, err-* are refused.
    import zipfile

    fuzz = OUT.parent / "fuzz" / "torch_pickle"
    fuzz.mkdir(parents=True, exist_ok=True)
    for name in ["sglang-stat", "sglang-per-pass", "sglang-per-token", "vllm-eplb", "bad-foreign", "bad-global"]:
        with zipfile.ZipFile(OUT / f"{name}.pt") as z:
            pkl = next(n for n in z.namelist() if n.endswith("/data.pkl"))
            kind = "err-global" if name == "bad-global" else f"ok-{name}"
            (fuzz / f"{kind}.pkl").write_bytes(z.read(pkl))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    sglang_routed()
    sglang_stat()
    sglang_detail(False, "sglang-per-pass.pt")
    sglang_detail(True, "sglang-per-token.pt")
    vllm_eplb()
    bad_inputs()
    fuzz_pickles()
    print("wrote", sorted(p.name for p in OUT.iterdir()), "with torch", torch.__version__)


if __name__ == "__main__":
    main()
