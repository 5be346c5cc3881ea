#!/usr/bin/env bash
# Issue 15, section 3: Hugging Face transformers and xmoe-top on the same checkpoints, the same
# tokens and the same protocol, one checkpoint at a time (so both sides of a ratio see the same
# machine load), then the ratio table. Run by hand from anywhere; results go to
# target/peers/run-<UTC time>/ (JSON per side and checkpoint, and the printed tables in log.md).
#
#   scripts/peers/run.sh                                   # the default PLAN
#   PLAN="olmoe-d1024:default:f32" scripts/peers/run.sh    # a subset
#
# PLAN: space-separated CHECKPOINT:IMPLS:DTYPES, the transformers configurations timed per
# checkpoint (IMPLS: eager and/or default; DTYPES: bf16 and/or f32; see transformers_cpu.py).
# bf16 is timed on olmoe-d1024 only: on this AVX2-only CPU torch takes seconds per bf16 decode
# step even at d 1024 (docs/benchmarks.md), so f32 is transformers' faster choice everywhere and
# the bf16 rows would only lengthen the run. The OLMoE-1B-7B-shaped one gets transformers'
# default implementation in f32 only (14 GiB resident: loading widens the bf16 file).
# Other environment: PY (the Python with scripts/peers/requirements.txt; default
# /work/venv-goldens), THREADS (2), XMOE (the binary; default target/release/xmoe-top, built if
# missing), PASSES (3), NEW_TOKENS (32), XMOE_ARGS (more `xmoe-top bench` options, e.g.
# `--moe-dispatch amx`).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-/work/venv-goldens/bin/python}
PLAN=${PLAN:-olmoe-d1024:eager,default:bf16,f32 mixtral-d1024:eager,default:f32 qwen2_moe-d1024:eager,default:f32 olmoe-1b-7b-l4:default:f32}
MODELS=$(for p in $PLAN; do printf '%s,' "${p%%:*}"; done)
MODELS=${MODELS%,}
THREADS=${THREADS:-2}
PASSES=${PASSES:-3}
NEW_TOKENS=${NEW_TOKENS:-32}
XMOE=${XMOE:-target/release/xmoe-top}
OUT=target/peers/run-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
[ -x "$XMOE" ] || cargo build --release
"$PY" scripts/peers/transformers_cpu.py --build --models "$MODELS"
# The same eval windows and prompt on both sides (the defaults of both: 2 x 128 tokens of
# assets/kjv-heldout.txt per pass, a 32-token prompt).
{
  echo "# peers run $(date -u '+%Y-%m-%d %H:%M:%S') UTC, $(nproc) CPUs, $THREADS threads"
  echo "$("$XMOE" --version 2>/dev/null || echo 'xmoe-top ?'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
} | tee "$OUT/log.md"
for p in $PLAN; do
  IFS=: read -r m IMPL DTYPE <<<"$p"
  echo -e "\n## $m: transformers (load average $(cut -d' ' -f1-3 /proc/loadavg))\n" | tee -a "$OUT/log.md"
  "$PY" scripts/peers/transformers_cpu.py --models "$m" --threads "$THREADS" --impl "$IMPL" --dtype "$DTYPE" \
    --passes "$PASSES" --new-tokens "$NEW_TOKENS" --json "$OUT/transformers-$m.json" 2>>"$OUT/stderr.log" | tee -a "$OUT/log.md"
  echo -e "\n## $m: xmoe-top (load average $(cut -d' ' -f1-3 /proc/loadavg))\n" | tee -a "$OUT/log.md"
  "$XMOE" bench --threads "$THREADS" --model "target/peers/$m" --device cpu --policies native,t=0.9,t=0.8 \
    --passes "$PASSES" --new-tokens "$NEW_TOKENS" --json "$OUT/xmoe-$m.json" ${XMOE_ARGS:-} 2>>"$OUT/stderr.log" | tee -a "$OUT/log.md"
done
echo -e "\n## Ratios (xmoe-top / fastest transformers configuration)\n" | tee -a "$OUT/log.md"
"$PY" scripts/peers/ratios.py "$OUT"/*.json | tee -a "$OUT/log.md"
echo "results in $OUT" >&2
