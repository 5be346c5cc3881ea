#!/usr/bin/env bash
# Fetches every file the test suite needs and that the repository does not hold (each script is
# idempotent and checks SHA-256 sums): the README's test command is
# `scripts/fetch-test-data.sh && cargo test --release`, and CI runs exactly that.
#
#   scripts/fetch-smollm2.sh       SmolLM2-135M-Instruct Q4_1 GGUF (tests/moefy_smollm2.rs)
#   scripts/fetch-llama-vocab.sh   llama.cpp's vocabulary GGUF files and tokenizer test cases
#                                  (tests/gguf_tokenizer_vocab.rs)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-smollm2.sh
scripts/fetch-llama-vocab.sh
