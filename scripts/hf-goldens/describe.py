#!/usr/bin/env python3
"""Print, from the committed files, the tensor names/shapes/dtypes of the first MoE block of every
checkpoint folder under tests/fixtures/hf/ (markdown; pasted into tests/fixtures/hf/README.md)."""
import json
import re
import sys
from pathlib import Path

from safetensors import safe_open

root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "tests/fixtures/hf"
for fam_dir in sorted(p for p in root.iterdir() if p.is_dir()):
    meta = json.loads((fam_dir / "golden.json").read_text())
    L = meta["moe_layers"][0]
    first = sorted(p for p in fam_dir.iterdir() if p.is_dir())[0]
    attn = {}
    for f in sorted(first.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                if k.startswith("model.layers.0.") and ("self_attn" in k or "layernorm" in k):
                    s = sf.get_slice(k)
                    attn[k] = (s.get_shape(), s.get_dtype())
    print(f"`{fam_dir.name}`: attention and norms of layer 0 (`{first.name}/`; the same in every folder of the family):\n")
    print("| tensor | shape | dtype |\n|---|---|---|")
    for k in sorted(attn):
        print(f"| `{k}` | {list(attn[k][0])} | {attn[k][1]} |")
    print()
    for folder in sorted(p for p in fam_dir.iterdir() if p.is_dir()):
        rows = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as sf:
                for k in sf.keys():
                    s = sf.get_slice(k)
                    rows[k] = (s.get_shape(), s.get_dtype(), f.name)
        print(f"`{fam_dir.name}/{folder.name}/` ({len(rows)} tensors; MoE layer {L}):\n")
        print("| tensor | shape | dtype |\n|---|---|---|")
        pre = f"model.layers.{L}."
        for k in sorted(rows):
            if not k.startswith(pre) or "self_attn" in k or "layernorm" in k:
                continue
            m = re.search(r"\.experts\.(\d+)\.", k)
            if m and m.group(1) != "0":
                continue
            shape, dt, _ = rows[k]
            name = k.replace(".experts.0.", ".experts.{j}.") if m else k
            print(f"| `{name}` | {list(shape)} | {dt} |")
        print()
