#!/usr/bin/env bash
# Build `xmoe-top --features cuda` on a machine with no GPU and no CUDA installation.
#
# Fetches NVIDIA's CUDA 13.0 wheels from PyPI into a git-ignored cache (.cuda-toolkit/, reused
# when present), lays them out as a CUDA_HOME (unversioned .so links, a link-time-only libcuda.so
# stub in $CUDA_HOME/lib/stubs), then runs cargo with its own target dir (target/cuda) so the CPU
# build is untouched. See docs/gpu.md.
#
# Environment (all optional):
#   XMOE_CUDA_TOOLKIT_DIR  toolkit cache            (default: <repo>/.cuda-toolkit)
#   XMOE_CUDA_TARGET_DIR   cargo target dir         (default: <repo>/target/cuda)
#   XMOE_CUDA_LINKING      dynamic-loading | dynamic-linking   (default: dynamic-loading)
#                          dynamic-loading: cudarc dlopens the driver and libraries at run time,
#                          so the binary starts on machines without CUDA; dynamic-linking: candle's
#                          own choice, the binary needs libcuda.so.1 & co. just to start.
#   PYTHON                 python with pip          (default: python3)
# Extra arguments are passed to `cargo build`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLKIT_DIR=${XMOE_CUDA_TOOLKIT_DIR:-$ROOT/.cuda-toolkit}
TARGET_DIR=${XMOE_CUDA_TARGET_DIR:-$ROOT/target/cuda}
LINKING=${XMOE_CUDA_LINKING:-dynamic-loading}
PYTHON=${PYTHON:-python3}

# CUDA 13.0 only: the GPU machines run driver 580 (CUDA 13.0), which must accept our PTX,
# and cudarc 0.19 rejects toolkits newer than 13.4.
WHEELS=(
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
  nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35 nvidia-cublas==13.1.0.3
)

log() { printf '[build-cuda] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
T_START=$(now)
T_STEP=$T_START
TIMES=()
done_step() {  # done_step NAME: record and print the time since the previous step
  local t; t=$(now)
  local d; d=$(awk -v a="$T_STEP" -v b="$t" 'BEGIN{printf "%.1f", b-a}')
  TIMES+=("$(printf '%-28s %7s s' "$1" "$d")")
  log "step '$1' took ${d} s"
  T_STEP=$t
}
trap 'rc=$?; if [ $rc -ne 0 ]; then log "FAILED (exit $rc) after $(awk -v a="$T_START" -v b="$(now)" "BEGIN{printf \"%.0f\", b-a}") s"; fi' EXIT

case "$LINKING" in dynamic-loading|dynamic-linking) ;; *) die "XMOE_CUDA_LINKING must be dynamic-loading or dynamic-linking, not '$LINKING'";; esac
for tool in cargo rustc gcc g++ "$PYTHON"; do
  command -v "$tool" >/dev/null || die "'$tool' not found (needed: cargo, gcc, g++ as nvcc's host compiler, $PYTHON with pip)"
done

# ---- 1. toolkit: pip wheels, cached -------------------------------------------------------
STAMP="$TOOLKIT_DIR/.xmoe-wheels"
WANT=$(printf '%s\n' "${WHEELS[@]}")
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  log "toolkit: reusing $TOOLKIT_DIR"
else
  log "toolkit: installing ${#WHEELS[@]} wheels from PyPI into $TOOLKIT_DIR"
  rm -rf "$TOOLKIT_DIR" "$TOOLKIT_DIR.partial"
  "$PYTHON" -m pip install --disable-pip-version-check --root-user-action=ignore --no-input --no-deps --only-binary=:all: \
    --target "$TOOLKIT_DIR.partial" "${WHEELS[@]}"
  mv "$TOOLKIT_DIR.partial" "$TOOLKIT_DIR"
  printf '%s\n' "$WANT" > "$STAMP"
fi
done_step "toolkit (pip)"

# ---- 2. CUDA_HOME layout: unversioned links, libcuda stub ---------------------------------
CUDA_HOME="$TOOLKIT_DIR/nvidia/cu13"
[ -x "$CUDA_HOME/bin/nvcc" ] || die "no nvcc at $CUDA_HOME/bin/nvcc"
LIB="$CUDA_HOME/lib"
mkdir -p "$LIB" "$LIB/stubs"
# Libraries of wheels that land outside cu13/ (if any) are linked into $CUDA_HOME/lib too.
while IFS= read -r -d '' so; do
  [ -e "$LIB/$(basename "$so")" ] || ln -s "$so" "$LIB/$(basename "$so")"
done < <(find "$TOOLKIT_DIR/nvidia" -path "$CUDA_HOME" -prune -o -name 'lib*.so.*' -print0)
# The wheels ship only versioned libraries (libcublas.so.13); the linker wants libcublas.so.
for so in "$LIB"/lib*.so.*; do
  base=$(basename "$so"); plain="${base%%.so.*}.so"
  [ -e "$LIB/$plain" ] || ln -s "$base" "$LIB/$plain"
done
for l in nvrtc curand cublas cublasLt; do
  [ -e "$LIB/lib$l.so" ] || die "lib$l.so missing from $LIB after layout"
done
# candle-kernels links its nvcc-built static kernels (libmoe.a) with `-lcudart`, which would make
# libcudart.so.13 a NEEDED entry. For dynamic-loading, let -lcudart find the static runtime
# instead (libcudart.a -> libcudart_static.a, no libcudart.so): cudart itself dlopens the driver.
if [ "$LINKING" = dynamic-loading ]; then
  [ -f "$LIB/libcudart_static.a" ] || die "no libcudart_static.a in $LIB"
  rm -f "$LIB/libcudart.so"
  ln -sfn libcudart_static.a "$LIB/libcudart.a"
else
  rm -f "$LIB/libcudart.a"
  ln -sfn libcudart.so.13 "$LIB/libcudart.so"
fi

# libcuda.so is the driver's: no wheel has it. Link against a stub exporting every driver entry
# point cudarc declares (taken from cudarc's own bindings, so it follows the locked version).
# The stub lives only in lib/stubs (cudarc's build script adds it to the link search path);
# it is never on a run-time library path.
CUDARC_SRC=$(cd "$ROOT" && cargo metadata --locked --format-version 1 --features cuda | "$PYTHON" -c '
import json, os, sys
pk = [p for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"]
assert len(pk) == 1, "expected exactly one cudarc in Cargo.lock"
print(os.path.dirname(pk[0]["manifest_path"]))')
BINDINGS="$CUDARC_SRC/src/driver/sys/mod.rs"
[ -f "$BINDINGS" ] || die "cudarc driver bindings not found at $BINDINGS"
STUB_C="$LIB/stubs/libcuda-stub.c"
grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+\(' "$BINDINGS" | sed -E 's/^pub unsafe fn ([A-Za-z0-9_]+)\(/\1/' | sort -u > "$LIB/stubs/libcuda.symbols"
NSYM=$(wc -l < "$LIB/stubs/libcuda.symbols")
[ "$NSYM" -gt 100 ] || die "only $NSYM driver symbols found in $BINDINGS"
{
  echo "/* Link-time stub of the CUDA driver (libcuda.so.1), generated by scripts/build-cuda.sh."
  echo "   Every entry point returns CUDA_ERROR_STUB_LIBRARY (34). Never load this at run time. */"
  sed -E 's/.*/int &(void) { return 34; }/' "$LIB/stubs/libcuda.symbols"
} > "$STUB_C.new"
if ! cmp -s "$STUB_C.new" "$STUB_C" || [ ! -f "$LIB/stubs/libcuda.so" ]; then
  mv "$STUB_C.new" "$STUB_C"
  gcc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$LIB/stubs/libcuda.so" "$STUB_C"
else
  rm -f "$STUB_C.new"
fi
log "libcuda stub: $NSYM driver symbols from $BINDINGS"
done_step "layout + libcuda stub"

# ---- 3. cargo build -------------------------------------------------------------------------
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
export CUDARC_CUDA_VERSION=13000   # cudarc: do not ask nvcc / a GPU for the version
export CUDA_COMPUTE_CAP=90         # candle-kernels: Hopper; never look for a GPU
HOST=$(rustc -vV | sed -n 's/^host: //p')
# --target HOST keeps RUSTFLAGS away from build scripts (cudarc's build.rs must keep seeing only
# candle's `dynamic-linking` feature, or it refuses two linking modes).
CARGO_ARGS=(build --release --locked --features cuda --target "$HOST" --target-dir "$TARGET_DIR"
            --bins)
if [ "$LINKING" = dynamic-loading ]; then
  # candle-core asks cudarc for `dynamic-linking`; cargo features cannot be removed, so turn on
  # cudarc's `dynamic-loading` code path by cfg (only cudarc tests this cfg among our crates).
  # The libraries are still named on the link line, but nothing references them, so
  # --as-needed drops them from the binary's DT_NEEDED.
  export RUSTFLAGS="${RUSTFLAGS:-} --cfg feature=\"dynamic-loading\""
fi
log "cargo ${CARGO_ARGS[*]} $*  (CUDA_HOME=$CUDA_HOME, linking=$LINKING)"
(cd "$ROOT" && cargo "${CARGO_ARGS[@]}" "$@")
BIN="$TARGET_DIR/$HOST/release/xmoe-top"
PROBE="$TARGET_DIR/$HOST/release/cuda-probe"
[ -x "$BIN" ] || die "no binary at $BIN"
[ -x "$PROBE" ] || die "no probe at $PROBE"
done_step "cargo build"

# ---- 4. the binary: what it needs, and whether it starts here ------------------------------
# The probe uses the device (cuBLAS, PTX kernels, candle-kernels' static mmq code), so its
# NEEDED list shows what any CUDA-using binary needs; xmoe-top's shows what ours needs today.
for exe in "$BIN" "$PROBE"; do
  NEEDED=$(readelf -d "$exe" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
  log "$(basename "$exe"): $exe ($(du -h "$exe" | cut -f1)); NEEDED: $NEEDED"
  if [ "$LINKING" = dynamic-loading ]; then
    case " $NEEDED " in *" libcuda.so"*|*" libcublas"*|*" libnvrtc"*|*" libcurand"*|*" libcudart"*)
      die "$(basename "$exe") needs CUDA libraries to start despite dynamic-loading: $NEEDED";; esac
  fi
done
if [ -e /dev/nvidia0 ] || command -v nvidia-smi >/dev/null; then
  log "a GPU driver is present here: skipping the no-GPU start check"
else
  set +e
  OUTPUT=$(env -u LD_LIBRARY_PATH "$PROBE" 2>&1); RC=$?
  set -e
  if [ $RC -eq 3 ] && grep -q '^cuda: no GPU' <<<"$OUTPUT"; then
    log "without a GPU or CUDA libraries the binary starts and says: $OUTPUT"
  elif [ "$LINKING" = dynamic-linking ]; then
    log "without CUDA libraries the binary does not start (expected with dynamic-linking): rc=$RC $OUTPUT"
  else
    die "probe did not report 'no GPU' (rc=$RC): $OUTPUT"
  fi
fi
done_step "check binary"

log "timings:"
for t in "${TIMES[@]}"; do log "  $t"; done
log "  $(printf '%-28s %7s s' total "$(awk -v a="$T_START" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}')")"
echo "$BIN"
