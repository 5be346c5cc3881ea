#!/usr/bin/env bash
# Fuzz smoke test (docs/fuzzing.md): builds the fuzz package (fuzz/, libFuzzer through
# libfuzzer-sys on stable Rust) and runs every target for a few seconds from its seeds.
# Exits non-zero if any target crashes, times out, runs out of memory or fails to build.
# Usage: scripts/fuzz-smoke.sh [seconds per target, default 12]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-12}"
targets=(model_format model_config hf_config hf_index hf_shard_header tokenizer report_json trace import_dump torch_pickle recording gguf)
triple=x86_64-unknown-linux-gnu

# Sanitizer coverage for libFuzzer, without nightly's -Zsanitizer; --target keeps these flags off
# build scripts and proc macros.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
command -v g++ >/dev/null || { echo "fuzz-smoke: g++ is needed to build libFuzzer" >&2; exit 1; }

t0=$(date +%s)
cargo build --release --locked --manifest-path fuzz/Cargo.toml --target "$triple"
echo "fuzz-smoke: build took $(($(date +%s) - t0)) s"
fuzz/seeds.sh >/dev/null

bin=fuzz/target/$triple/release
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()
for t in "${targets[@]}"; do
    mkdir -p "$work/$t" fuzz/artifacts/"$t"
    s=$(date +%s)
    # New inputs go to the scratch corpus; crashing inputs to fuzz/artifacts/<target>/.
    if "$bin/$t" "$work/$t" "fuzz/seeds/$t" -max_total_time="$secs" -rss_limit_mb=2048 \
        -timeout=10 -max_len=65536 -artifact_prefix="fuzz/artifacts/$t/" -print_final_stats=1 \
        >"$work/$t.log" 2>&1; then
        status=ok
    else
        status="FAILED (see fuzz/artifacts/$t/)"
        failed+=("$t")
        tail -n 30 "$work/$t.log" >&2
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t.log" | tail -n 1)
    printf 'fuzz-smoke: %-16s %3d s %9s runs  %s\n' "$t" $(($(date +%s) - s)) "${runs:-?}" "$status"
done
echo "fuzz-smoke: total $(($(date +%s) - t0)) s"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz-smoke: crashes in: ${failed[*]}" >&2
    exit 1
fi
