# By hand (docs/gguf.md, "Tokenizer"; not run by the tests): the Mixtral f32 fixture with Llama 2's
# SentencePiece vocabulary (from llama.cpp's ggml-vocab-llama-spm.gguf) and token_embd/output
# widened to 32000 random rows, to run xmoe-top on a GGUF with a SentencePiece tokenizer.
#
#   /work/venv-goldens/bin/python scripts/gguf-fixtures/mixtral_spm.py tests/fixtures/gguf/mixtral.f32.gguf \
#       target/models/llama-vocab/ggml-vocab-llama-spm.gguf /tmp/mixtral-spm.gguf
import sys, numpy as np, gguf
from gguf import GGUFReader, GGUFWriter, GGUFValueType
src, vocab, out = sys.argv[1:4]
r = GGUFReader(src); v = GGUFReader(vocab)
arch = r.fields["general.architecture"].contents()
w = GGUFWriter(out, arch)
skip = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture"}
def copy(reader, k, f):
    t = f.types[0]
    if t == GGUFValueType.ARRAY:
        w.add_key_value(k, f.contents(), t, sub_type=f.types[-1])
    else:
        w.add_key_value(k, f.contents(), t)
for k, f in r.fields.items():
    if k in skip or k.startswith("tokenizer."): continue
    if k.endswith(".vocab_size"):
        w.add_uint32(k, len(v.fields["tokenizer.ggml.tokens"].data)); continue
    copy(r, k, f)
for k, f in v.fields.items():
    if k.startswith("tokenizer."): copy(v, k, f)
n = len(v.fields["tokenizer.ggml.tokens"].data)
rng = np.random.default_rng(0)
for t in r.tensors:
    a = np.array(t.data)
    if t.name in ("token_embd.weight", "output.weight"):
        a = (rng.standard_normal((n, a.shape[1])) * 0.2).astype(np.float32)
    w.add_tensor(t.name, a)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
print("wrote", out, "vocab", n)
