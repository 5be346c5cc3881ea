#!/usr/bin/env bash
# Fills fuzz/seeds/<target>/ with the seed inputs of every fuzz target (docs/fuzzing.md): valid
# files of the test fixtures (for model files, only their header), the embedded model's header and
# configuration, plus the small tricky inputs committed under tests/fixtures/fuzz/<target>/.
# Idempotent; needs only coreutils.
set -euo pipefail
cd "$(dirname "$0")/.."
out=fuzz/seeds
rm -rf "$out"
targets=(model_format model_config hf_config hf_index hf_shard_header tokenizer report_json trace import_dump torch_pickle recording gguf)
for t in "${targets[@]}"; do
    mkdir -p "$out/$t"
    if [ -d "tests/fixtures/fuzz/$t" ]; then
        cp tests/fixtures/fuzz/"$t"/* "$out/$t/"
    fi
done

# The 8-byte length and the JSON header of a safetensors file, plus `extra` bytes of its data.
head_of() { # file extra
    local n
    n=$(od -An -t u8 -N8 "$1" | tr -d ' ')
    head -c $((8 + n + $2)) "$1"
}
# A unique, readable seed name for a fixture path.
name_of() { echo "$1" | sed 's#^tests/fixtures/##; s#/#_#g'; }

while IFS= read -r f; do
    head_of "$f" 0 >"$out/hf_shard_header/$(name_of "$f").head"
    head_of "$f" 64 >"$out/model_format/$(name_of "$f").head64"
done < <(find tests/fixtures/hf -name '*.safetensors' | sort | head -n 6)
# The embedded model: its header (a truncated file for model_format); its configuration is
# tests/fixtures/fuzz/model_config/ok-embedded.json.
head_of assets/xmoe-kjv.safetensors 0 >"$out/hf_shard_header/embedded.head"
head_of assets/xmoe-kjv.safetensors 256 >"$out/model_format/embedded.head256"

while IFS= read -r f; do
    cp "$f" "$out/hf_config/$(name_of "$f")"
done < <(find tests/fixtures/hf -name config.json | sort)
while IFS= read -r f; do
    cp "$f" "$out/hf_index/$(name_of "$f")"
done < <(find tests/fixtures/hf -name '*.index.json' | sort)
cp tests/fixtures/hf/tokenizer.json "$out/tokenizer/fixture.json"
# Engine dumps, whole (import_dump); their data.pkl alone is committed for torch_pickle.
cp tests/fixtures/import/* "$out/import_dump/"

# GGUF files written from the tiny checkpoints, one per architecture and quantisation type
# (the f32 ones, which carry the tokenizer as well, and one of each block type).
for f in tests/fixtures/gguf/mixtral.f32.gguf tests/fixtures/gguf/mixtral.q4_0.gguf \
    tests/fixtures/gguf/olmoe.q4_1.gguf tests/fixtures/gguf/qwen3_moe.q8_0.gguf \
    tests/fixtures/gguf/deepseek_v2.q8_0.gguf tests/fixtures/gguf/gpt_oss.mxfp4.gguf; do
    cp "$f" "$out/gguf/"
done

for t in "${targets[@]}"; do
    echo "seeds/$t: $(find "$out/$t" -type f | wc -l) files"
done
