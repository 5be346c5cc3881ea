#!/usr/bin/env python3
"""Hugging Face transformers on the CPU, on the checkpoints xmoe-top is compared with (issue 15,
section 3). Run by hand (never by the tests); `scripts/peers/run.sh` runs it beside
`xmoe-top bench --model` and prints the ratios. Details: docs/benchmarks.md, "Peers".

    /work/venv-goldens/bin/python scripts/peers/transformers_cpu.py --build   # write the checkpoints
    /work/venv-goldens/bin/python scripts/peers/transformers_cpu.py --json target/peers/transformers.json

What it does:
  --build   writes, deterministically (seeded), bf16 Hugging Face checkpoint directories under
            --out (default target/peers/): the tiny golden families of tests/fixtures/hf scaled to
            d_model 1024 (olmoe, mixtral, qwen2_moe; 4 layers, the fixtures' 512-token tokenizer)
            and `olmoe-1b-7b-l4`, OLMoE-1B-7B's published widths with 4 of its 16 layers
            (1.9 B parameters, 3.8 GB: the whole 13.8 GB model does not fit beside the other jobs
            of a 24 GiB machine). Weights are drawn as `xmoe-top synth --hf` draws them.
  timing    (the default) loads each checkpoint with `from_pretrained` and times, on --threads
            threads (default 2):
              eval:   full forward passes (all logits, no cache) over --batch x --seq tokens of
                      real text, one warm-up pass, then --passes timed passes, each on the next
                      window of the text; tokens/s = tokens / summed pass time;
              decode: a --prompt-tokens prompt, then --new-tokens greedy steps of one token with
                      the KV cache (use_cache=True), one warm-up run first; ms/token = mean step.
            Native top-k routing (transformers has no other). Prints a Markdown table and writes
            --json.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "tests" / "fixtures" / "hf" / "tokenizer.json"
TEXT = REPO / "assets" / "kjv-heldout.txt"
SEED = 1515

# The goldens' shapes (scripts/hf-goldens/generate.py: hidden 32, 4 heads / 2 kv heads, 8 experts,
# top-2, expert width 12, dense width 20, shared expert 40) scaled by 32 to d_model 1024, with
# 16 heads of 64 (8 kv heads, the goldens' 2:1 grouping) and 4 layers. The goldens' test-only
# oddities are dropped because they would make the comparison about something else: Mixtral's
# 5-token sliding window and explicit head_dim 12, Qwen2-MoE's dense middle layer.
D = 1024
SCALED = dict(
    vocab_size=512,
    hidden_size=D,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=8,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    num_experts_per_tok=2,
    pad_token_id=None,
    bos_token_id=None,
    eos_token_id=0,
)


def checkpoint_specs():
    """name -> (transformers config class name, config kwargs, one line for the table)."""
    return {
        "olmoe-d1024": (
            "OlmoeConfig",
            dict(
                SCALED,
                intermediate_size=12 * 32,
                num_experts=8,
                norm_topk_prob=False,
                attention_bias=False,
                clip_qkv=None,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
            ),
            "olmoe, d 1024, 4 layers, 8 experts x 384, top-2, vocab 512",
        ),
        "mixtral-d1024": (
            "MixtralConfig",
            dict(
                SCALED,
                intermediate_size=12 * 32,
                num_local_experts=8,
                sliding_window=None,
                tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            ),
            "mixtral, d 1024, 4 layers, 8 experts x 384, top-2 (renormalised), tied, vocab 512",
        ),
        "qwen2_moe-d1024": (
            "Qwen2MoeConfig",
            dict(
                SCALED,
                intermediate_size=20 * 32,
                moe_intermediate_size=12 * 32,
                shared_expert_intermediate_size=40 * 32,
                num_experts=8,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                norm_topk_prob=False,
                qkv_bias=True,
                use_sliding_window=False,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            ),
            "qwen2_moe, d 1024, 4 layers, 8 experts x 384 + shared 1280, top-2, q/k/v biases, vocab 512",
        ),
        # allenai/OLMoE-1B-7B-0924's config.json, 4 of its 16 layers (src/model/hf/synth.rs has
        # the same numbers for `xmoe-top synth --hf olmoe-1b-7b`).
        "olmoe-1b-7b-l4": (
            "OlmoeConfig",
            dict(
                vocab_size=50304,
                hidden_size=2048,
                intermediate_size=1024,
                num_hidden_layers=4,
                num_attention_heads=16,
                num_key_value_heads=16,
                num_experts=64,
                num_experts_per_tok=8,
                max_position_embeddings=4096,
                rms_norm_eps=1e-5,
                hidden_act="silu",
                norm_topk_prob=False,
                attention_bias=False,
                clip_qkv=None,
                tie_word_embeddings=False,
                pad_token_id=1,
                bos_token_id=None,
                eos_token_id=50279,
                rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
            ),
            "OLMoE-1B-7B widths (d 2048, 16 heads, 64 experts x 1024, top-8, vocab 50304), 4 of 16 layers",
        ),
    }


def init_weights(model, seed):
    """The distribution of `xmoe-top synth --hf` (src/model/hf/synth.rs), uniform with the given
    standard deviation: norm weights 1 + U(-0.1, 0.1); routers std 0.1 (well beyond
    1/sqrt(d), so routing is not uniform); embeddings std 1; biases std 0.1; every other matrix
    std 1/sqrt(fan_in), fan_in being the last dimension (true of transformers' fused expert
    tensors too). Seeded, in sorted parameter order, so the bytes do not depend on the machine."""
    import torch

    routers = {
        name + ".weight"
        for name, mod in model.named_modules()
        if type(mod).__name__.lower().endswith("topkrouter")
    }
    if not routers:
        sys.exit("init: found no *TopKRouter module; the transformers version is not the pinned one")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name and p.dim() == 1:
                p.uniform_(-0.1, 0.1, generator=g).add_(1.0)
                continue
            if name in routers or name.endswith("bias"):
                std = 0.1
            elif "embed_tokens" in name:
                std = 1.0
            else:
                std = 1.0 / p.shape[-1] ** 0.5
            a = std * 3**0.5
            p.uniform_(-a, a, generator=g)


def build(out: Path, names, force: bool):
    import torch
    import transformers

    specs = checkpoint_specs()
    for name in names:
        cls_name, kwargs, _ = specs[name]
        folder = out / name
        stamp = dict(config=cls_name, kwargs=kwargs, seed=SEED, transformers=transformers.__version__)
        stamp_file = folder / "peers-build.json"
        if not force and stamp_file.exists() and json.loads(stamp_file.read_text()) == json.loads(json.dumps(stamp)):
            print(f"{name}: up to date in {folder}", file=sys.stderr)
            continue
        if folder.exists():
            shutil.rmtree(folder)
        t0 = time.perf_counter()
        cfg = getattr(transformers, cls_name)(**kwargs)
        # Build in bf16 from the start: the 1.9 B-parameter model would need 7.6 GB in f32.
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = transformers.AutoModelForCausalLM.from_config(cfg)
        finally:
            torch.set_default_dtype(torch.float32)
        init_weights(model, SEED)
        model.save_pretrained(folder, max_shard_size="2GB")
        shutil.copy(TOKENIZER, folder / "tokenizer.json")
        stamp_file.write_text(json.dumps(stamp, indent=1))
        n = sum(p.numel() for p in model.parameters())
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(
            f"{name}: {n / 1e6:.1f} M parameters, {size / 1e9:.2f} GB bf16 in {folder} ({time.perf_counter() - t0:.0f} s)",
            file=sys.stderr,
        )
        del model


def loadavg():
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def text_tokens(tokenizer_file: Path, text_file: Path):
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_file)).encode(text_file.read_text()).ids
    return ids


def time_model(folder: Path, args, impl: str, dtype_name: str):
    import torch
    import transformers

    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[dtype_name]
    kw = dict(dtype=dtype)
    if impl == "eager":
        kw.update(attn_implementation="eager", experts_implementation="eager")
    load_avg_before = loadavg()
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kw)
    model.eval()
    load_s = time.perf_counter() - t0
    cfg = model.config
    ids = text_tokens(folder / "tokenizer.json", args.text)
    b, s = args.batch, args.seq
    need = (args.passes + 1) * b * s
    if len(ids) < need:
        sys.exit(f"{args.text}: {len(ids)} tokens, the eval needs {need}")

    # Wall time is the figure; process CPU time (all threads) is recorded beside it because this
    # machine is shared, and a busy machine stretches wall time but not CPU time (much).
    pass_s, pass_cpu = [], 0.0
    with torch.inference_mode():
        for p in range(args.passes + 1):
            x = torch.tensor(ids[p * b * s : (p + 1) * b * s]).view(b, s)
            t, c = time.perf_counter(), time.process_time()
            logits = model(input_ids=x, use_cache=False).logits
            dt, dc = time.perf_counter() - t, time.process_time() - c
            assert logits.shape == (b, s, cfg.vocab_size), logits.shape
            if p > 0:  # pass 0 warms caches and allocations
                pass_s.append(dt)
                pass_cpu += dc

        def decode():
            prompt = torch.tensor(ids[: args.prompt_tokens]).view(1, -1)
            out = model(input_ids=prompt, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            steps, tokens = [], [int(nxt)]
            c = time.process_time()
            for _ in range(args.new_tokens):
                t = time.perf_counter()
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                steps.append(time.perf_counter() - t)
                tokens.append(int(nxt))
            return steps, tokens, time.process_time() - c

        decode()  # warm-up
        steps, generated, decode_cpu = decode()
    r = dict(
        checkpoint=folder.name,
        impl=impl,
        attn_implementation=cfg._attn_implementation,
        experts_implementation=getattr(cfg, "_experts_implementation", None),
        dtype=dtype_name,
        parameters=sum(p.numel() for p in model.parameters()),
        load_s=load_s,
        eval_tokens=b * s * args.passes,
        eval_tokens_per_s=b * s * args.passes / sum(pass_s),
        eval_pass_s=pass_s,
        eval_cpu_s_per_pass=pass_cpu / args.passes,
        decode_steps=len(steps),
        decode_ms_per_token=1e3 * statistics.mean(steps),
        decode_ms_p50=1e3 * statistics.median(steps),
        decode_cpu_ms_per_token=1e3 * decode_cpu / len(steps),
        decode_tokens=generated,
        max_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        load_average_before=load_avg_before,
        load_average_after=loadavg(),
        utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    )
    del model
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "target" / "peers", help="checkpoint directory root")
    ap.add_argument("--models", default=",".join(checkpoint_specs()), help="comma-separated checkpoint names")
    ap.add_argument("--build", action="store_true", help="write the checkpoints (skipped when up to date), then stop")
    ap.add_argument("--force", action="store_true", help="with --build: rewrite even if up to date")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--impl", default="eager", help="comma-separated: eager (eager attention and expert loop) and/or default (transformers' choice: sdpa, grouped_mm where it dispatches)")
    ap.add_argument("--dtype", default="bf16", help="comma-separated: bf16 (as stored) and/or f32")
    ap.add_argument("--text", type=Path, default=TEXT)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    # Before torch starts its thread pools.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in checkpoint_specs()]
    if unknown:
        sys.exit(f"--models: unknown {unknown}; known: {', '.join(checkpoint_specs())}")
    if args.build:
        build(args.out, names, args.force)
        return

    machine = dict(
        cpu=next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
        cpus=os.cpu_count(),
        threads=torch.get_num_threads(),
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
    )
    results = []
    for name in names:
        folder = args.out / name
        if not (folder / "peers-build.json").exists():
            sys.exit(f"{folder}: no checkpoint; run with --build first")
        for impl in args.impl.split(","):
            for dt in args.dtype.split(","):
                print(f"timing {name} ({impl}, {dt}), load average {loadavg()}", file=sys.stderr)
                results.append(time_model(folder, args, impl.strip(), dt.strip()))
    setup = dict(batch=args.batch, seq=args.seq, passes=args.passes, prompt_tokens=args.prompt_tokens,
                 new_tokens=args.new_tokens, text=str(args.text.relative_to(REPO) if args.text.is_relative_to(REPO) else args.text))
    print(f"\ntransformers {machine['transformers']}, torch {machine['torch']} ({machine['cpu_capability']}), "
          f"{machine['threads']} threads, {machine['cpu']}; eval {args.batch} x {args.seq} tokens, "
          f"decode {args.new_tokens} tokens after {args.prompt_tokens}\n")
    print("| checkpoint | impl (attention, experts) | dtype | eval tokens/s | eval CPU s/pass | decode ms/token (p50) | decode CPU ms/token | load s | max RSS GiB | load avg before / after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['checkpoint']} | {r['impl']} ({r['attn_implementation']}, {r['experts_implementation']}) | {r['dtype']} "
              f"| {r['eval_tokens_per_s']:.1f} | {r['eval_cpu_s_per_pass']:.2f} | {r['decode_ms_per_token']:.2f} ({r['decode_ms_p50']:.2f}) "
              f"| {r['decode_cpu_ms_per_token']:.2f} | {r['load_s']:.1f} "
              f"| {r['max_rss_gib']:.2f} | {r['load_average_before']} / {r['load_average_after']} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(machine=machine, setup=setup, results=results), indent=1))


if __name__ == "__main__":
    main()
