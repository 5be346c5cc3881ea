# By-hand check (docs/gguf.md, "Tokenizer"; not run by the tests): llama.cpp's llm_tokenizer_spm
# (src/llama-vocab.cpp, ported line by line) against a Hugging Face `tokenizers` BPE whose merges
# are derived as src/workload/gguf_tokenizer/spm.rs derives them, on llama.cpp's llama-spm vocabulary.
#
#   /work/venv-goldens/bin/python scripts/gguf-fixtures/spm_check.py \
#       target/models/llama-vocab/ggml-vocab-llama-spm.gguf assets/alice-heldout.txt
import heapq, sys, json, time
import gguf
from tokenizers import Tokenizer
r = gguf.GGUFReader(sys.argv[1])
toks = r.fields["tokenizer.ggml.tokens"].contents()
scores = r.fields["tokenizer.ggml.scores"].contents()
ids = {t: i for i, t in enumerate(toks)}
print("ws tokens", sorted(len(t) for t, s in zip(toks, scores) if s == -1e9))

def llama_spm(text):
    text = (" " + text).replace(" ", "\u2581")
    syms = [[c, i - 1, i + 1] for i, c in enumerate(text)]  # text, prev, next
    if syms: syms[-1][2] = -1
    q = []; rev = {}
    def add(l, rr):
        if l == -1 or rr == -1: return
        t = syms[l][0] + syms[rr][0]
        if t not in ids: return
        # priority: higher score first, then smaller left
        heapq.heappush(q, (-scores[ids[t]], l, rr, len(t)))
        rev[t] = (l, rr)
    for i in range(1, len(syms)): add(i - 1, i)
    while q:
        s, l, rr, n = heapq.heappop(q)
        L, R = syms[l], syms[rr]
        if not L[0] or not R[0] or len(L[0]) + len(R[0]) != n: continue
        L[0] += R[0]; R[0] = ""
        L[2] = R[2]
        if R[2] >= 0: syms[R[2]][1] = l
        add(L[1], l); add(l, L[2])
    out = []
    i = 0
    while i != -1 and syms:
        t = syms[i][0]
        if t in ids: out.append(ids[t])
        else:
            out.extend(ids["<0x%02X>" % b] for b in t.encode())
        i = syms[i][2]
    return out

rules = []
for m, t in enumerate(toks):
    for at in range(1, len(t)):
        if t[:at] in ids and t[at:] in ids:
            rules.append((-scores[m], m, ids[t[:at]], ids[t[at:]]))
rules.sort()
merges = [[toks[l], toks[rr]] for _, _, l, rr in rules]
print("merges", len(merges))
j = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
     "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
     "pre_tokenizer": None, "post_processor": None, "decoder": None,
     "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False, "vocab": ids, "merges": merges}}
hf = Tokenizer.from_str(json.dumps(j))
texts = [" " * k for k in range(1, 70)] + ["a" + " " * k + "b" for k in range(1, 70)] + ["\t" * k for k in range(1, 10)]
for f in sys.argv[2:]:
    data = open(f, encoding="utf-8").read()
    texts += [data[i:i + 2000] for i in range(0, len(data), 2000)]
diff = 0
for t in texts:
    a = llama_spm(t); b = hf.encode(t, add_special_tokens=False).ids
    if a != b:
        diff += 1
        if diff <= 5: print("DIFF", repr(t[:60]), a[:12], b[:12])
print(f"{len(texts)} texts, {diff} differ")
