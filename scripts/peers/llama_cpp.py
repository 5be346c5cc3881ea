#!/usr/bin/env python3
"""llama.cpp beside xmoe-top on the same GGUF MoE file (issue 15, section 3). Run by hand.

    # once: llama-cpp-python built from its PyPI source package (see docs/benchmarks.md, "Peers")
    # 1. the GGUF (needs torch, safetensors, gguf==0.19.0: the venv of transformers_cpu.py)
    /work/venv-goldens/bin/python scripts/peers/llama_cpp.py convert target/peers/olmoe-d1024 target/peers/olmoe-d1024.q8_0.gguf
    # 2. llama.cpp's timing (needs only llama-cpp-python and numpy)
    LLAMA_VENV/bin/python scripts/peers/llama_cpp.py time target/peers/olmoe-d1024.q8_0.gguf --json OUT.json
    # 3. xmoe-top on the same file
    xmoe-top bench --threads 2 --model target/peers/olmoe-d1024.q8_0.gguf --policies native,t=0.9,t=0.8

convert: the checkpoint's tensors (read with torch, since numpy has no bf16) written as
scripts/gguf-fixtures/generate.py writes the fixtures (llama.cpp's convert_hf_to_gguf.py names
and metadata), quantised to Q8_0 as `--outtype q8_0` would (routers and 1-D tensors stay F32).
time: the same protocol as transformers_cpu.py, on --threads threads: prefill of one sequence of
--batch x --seq tokens of the text (llama.cpp computes the last position's logits only) after a
warm-up, and --new-tokens greedy decode steps of one token with the KV cache after a
--prompt-tokens prompt, one warm-up run first; the native top-k (llama.cpp has no other).
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEXT = REPO / "assets" / "kjv-heldout.txt"


def convert(src: Path, dst: Path):
    import torch
    from safetensors.torch import load_file
    from gguf import GGMLQuantizationType as Q

    spec = importlib.util.spec_from_file_location("gguf_fixtures", REPO / "scripts" / "gguf-fixtures" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    cfg = json.loads((src / "config.json").read_text())
    family = cfg["model_type"]
    if family not in gen.ARCH:
        sys.exit(f"{src}: model_type {family!r}; the GGUF writer knows {', '.join(gen.ARCH)}")
    if (src / "tokenizer.json").read_bytes() != (gen.HF / "tokenizer.json").read_bytes():
        sys.exit(f"{src}/tokenizer.json is not tests/fixtures/hf/tokenizer.json, the one the GGUF writer embeds")
    st = {}
    for f in sorted(src.glob("*.safetensors")):
        st.update({k: v.float().numpy() for k, v in load_file(str(f)).items()})
    gen.write(dst, family, cfg, gen.tensors_for(family, cfg, st), Q.Q8_0)
    print(f"{dst}: {dst.stat().st_size} bytes", file=sys.stderr)


def loadavg():
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def time_gguf(args):
    import numpy as np
    import llama_cpp
    from llama_cpp import Llama

    before = loadavg()
    n = args.batch * args.seq
    llm = Llama(model_path=str(args.gguf), n_threads=args.threads, n_threads_batch=args.threads,
                n_ctx=max(n, args.prompt_tokens + args.new_tokens) + 8, n_batch=n, verbose=False, seed=0)
    ids = llm.tokenize(args.text.read_bytes(), add_bos=False, special=False)
    if len(ids) < 2 * n:
        sys.exit(f"{args.text}: {len(ids)} tokens, need {2 * n}")
    prefill = []
    for p in range(args.passes + 1):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids[p * n:(p + 1) * n])
        if p > 0:
            prefill.append(time.perf_counter() - t)

    def decode():
        llm.reset()
        llm.eval(ids[: args.prompt_tokens])
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out, steps = [nxt], []
        for _ in range(args.new_tokens):
            t = time.perf_counter()
            llm.eval([nxt])
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            steps.append(time.perf_counter() - t)
            out.append(nxt)
        return steps, out

    decode()
    steps, toks = decode()
    r = dict(
        gguf=str(args.gguf), llama_cpp_python=llama_cpp.__version__, threads=args.threads,
        text_tokens=len(ids), prefill_tokens=n, prefill_tokens_per_s=n * args.passes / sum(prefill),
        decode_ms_per_token=1e3 * statistics.mean(steps), decode_ms_p50=1e3 * statistics.median(steps),
        decode_tokens=toks, load_average_before=before, load_average_after=loadavg(),
        system_info=llama_cpp.llama_print_system_info().decode(),
    )
    print(f"| llama.cpp {r['llama_cpp_python']} | {args.gguf.name} | prefill {n} tokens: {r['prefill_tokens_per_s']:.1f} tokens/s "
          f"| decode {r['decode_ms_per_token']:.2f} ms/token (p50 {r['decode_ms_p50']:.2f}) | load {before} -> {r['load_average_after']} |")
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("src", type=Path)
    c.add_argument("dst", type=Path)
    t = sub.add_parser("time")
    t.add_argument("gguf", type=Path)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--text", type=Path, default=TEXT)
    t.add_argument("--batch", type=int, default=2)
    t.add_argument("--seq", type=int, default=128)
    t.add_argument("--passes", type=int, default=3)
    t.add_argument("--prompt-tokens", type=int, default=32)
    t.add_argument("--new-tokens", type=int, default=32)
    t.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.cmd == "convert":
        convert(args.src, args.dst)
    else:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        time_gguf(args)


if __name__ == "__main__":
    main()
