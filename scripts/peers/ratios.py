#!/usr/bin/env python3
"""The ratio table of issue 15, section 3, from the JSON that scripts/peers/run.sh collected:
transformers_cpu.py's (one file) and `xmoe-top bench --model --json`'s (one file per checkpoint).
Standard library only.

    python3 scripts/peers/ratios.py target/peers/run-TIME/*.json

(Files with a "machine" key are transformers_cpu.py's, files with a "model" key xmoe-top's.)

Against each checkpoint, the transformers figure is the fastest configuration timed (eager or
default implementation, bf16 or f32), separately for eval and for decode, so the ratio never
flatters xmoe-top by picking a slow peer. Target: >= 3x at native top-k, more under a threshold.
"""

import json
import sys
from pathlib import Path


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main():
    docs = [json.loads(Path(p).read_text()) for p in sys.argv[1:]]
    hf_results = [r for d in docs if "machine" in d for r in d["results"]]
    xs = [d for d in docs if "model" in d]
    if not hf_results or not xs:
        sys.exit("need at least one transformers_cpu.py JSON and one `xmoe-top bench --model --json` JSON\n" + __doc__)
    by_ckpt = {}
    for r in hf_results:
        by_ckpt.setdefault(r["checkpoint"], []).append(r)

    print("| checkpoint | policy | experts/token | xmoe-top eval tok/s | transformers eval tok/s (best: impl, dtype) | eval ratio "
          "| xmoe-top decode ms/token | transformers decode ms/token (best) | decode ratio | CPU-time ratio eval / decode | greedy tokens equal (native) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for x in xs:
        name = Path(x["model"]).name
        peers = by_ckpt.get(name)
        if not peers:
            print(f"| {name} | (no transformers result) |||||||||")
            continue
        best_eval = max(peers, key=lambda r: r["eval_tokens_per_s"])
        best_dec = min(peers, key=lambda r: r["decode_ms_per_token"])
        # CPU time of the whole process (all threads), per pass and per step: less sensitive to
        # the other jobs of a shared machine than wall time (spinning worker threads count too).
        best_eval_cpu = min(r["eval_cpu_s_per_pass"] for r in peers)
        best_dec_cpu = min(r["decode_cpu_ms_per_token"] for r in peers)
        for r in x["results"]:
            eval_ratio = r["eval_tokens_per_s"] / best_eval["eval_tokens_per_s"]
            dec_ratio = best_dec["decode_ms_per_token"] / r["decode_ms_per_token"]
            cpu_eval = best_eval_cpu / (r["eval_cpu_s"] / x["setup"]["passes"])
            cpu_dec = best_dec_cpu / r["decode_cpu_ms_per_token"]
            same = ""
            if r["policy"] == "native":
                # Same model, same prompt, greedy: the two engines should pick the same tokens
                # until rounding (bf16 in transformers vs f32 activations here) flips an argmax.
                agree = max(common_prefix(r["decode_tokens"], p["decode_tokens"]) for p in peers)
                same = f"{agree} of {len(r['decode_tokens'])}"
            print(
                f"| {name} | {r['policy']} | {r['experts_per_token_eval']:.2f} | {r['eval_tokens_per_s']:.1f} "
                f"| {best_eval['eval_tokens_per_s']:.1f} ({best_eval['impl']}, {best_eval['dtype']}) | {eval_ratio:.2f}x "
                f"| {r['decode_ms_per_token']:.2f} | {best_dec['decode_ms_per_token']:.2f} ({best_dec['impl']}, {best_dec['dtype']}) "
                f"| {dec_ratio:.2f}x | {cpu_eval:.2f}x / {cpu_dec:.2f}x | {same} |"
            )
    print()
    print("load averages: transformers " + "; ".join(
        f"{r['checkpoint']} {r['impl']} {r['dtype']}: {r['load_average_before']} -> {r['load_average_after']}" for r in hf_results))
    print("load averages: xmoe-top " + "; ".join(
        f"{Path(x['model']).name}: {x['load_average_before']} -> {x['load_average_after']}" for x in xs))


if __name__ == "__main__":
    main()
