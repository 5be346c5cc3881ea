#!/usr/bin/env bash
# The long fuzzing campaign (docs/fuzzing.md): every target in turn, one process on one core at
# a time, each for SECONDS seconds (default 300) in libFuzzer's fork mode with one job, so that a
# crash, timeout or OOM is saved to fuzz/artifacts/<target>/ and fuzzing goes on. The corpus of
# each target grows in fuzz/corpus/<target>/; logs go to fuzz/logs/. Build first, as
# scripts/fuzz-smoke.sh does (it also writes fuzz/seeds/).
# Usage: fuzz/campaign.sh [seconds per target] [target...]
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-300}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] ||
    targets=(model_format model_config hf_config hf_index hf_shard_header tokenizer report_json trace import_dump torch_pickle recording)
bin=target/x86_64-unknown-linux-gnu/release
mkdir -p logs
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    s=$(date +%s)
    nice -n 15 "$bin/$t" "corpus/$t" "seeds/$t" -fork=1 -ignore_crashes=1 -ignore_timeouts=1 \
        -ignore_ooms=1 -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -max_len=65536 \
        -artifact_prefix="artifacts/$t/" >"logs/$t.log" 2>&1 || true
    wall=$(($(date +%s) - s))
    last=$(grep -E '^#[0-9]+' "logs/$t.log" | tail -n 1)
    execs=$(echo "$last" | sed -E 's/^#([0-9]+).*/\1/')
    crashes=$(echo "$last" | sed -nE 's#.*oom/timeout/crash: ([0-9/]+).*#\1#p')
    echo "$t execs=${execs:-?} wall_s=$wall exec_per_s=$(( ${execs:-0} / (wall > 0 ? wall : 1) )) oom/timeout/crash=${crashes:-?} corpus=$(ls "corpus/$t" | wc -l) artifacts=$(ls "artifacts/$t" | wc -l)" |
        tee -a logs/summary.txt
done
