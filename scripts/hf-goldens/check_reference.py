#!/usr/bin/env python3
"""Independent re-implementation of the forward passes described in docs/hf-families-notes.md,
written from the notes (plain torch ops, no transformers), run on the committed checkpoints and
compared with the committed goldens. It checks the notes, and is a model for the Rust code.

    /work/venv-goldens/bin/python scripts/hf-goldens/check_reference.py
"""
import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "hf"


def load(folder: Path):
    cfg = json.loads((folder / "config.json").read_text())
    w = {}
    for f in sorted(folder.glob("*.safetensors")):
        w.update(load_file(str(f)))
    return cfg, {k: v.float() for k, v in w.items()}


def rms(x, wt, eps, weight_in_f32=False):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * wt


def lin(x, w, b=None):
    y = x @ w.T
    return y + b if b is not None else y


def yarn(cfg, d):
    rp = cfg["rope_parameters"]
    base, factor, L0 = rp["rope_theta"], rp["factor"], rp["original_max_position_embeddings"]
    pos = base ** (torch.arange(0, d, 2, dtype=torch.float) / d)
    extrap, interp = 1 / pos, 1 / (factor * pos)
    fcd = lambda r: (d * math.log(L0 / (r * 2 * math.pi))) / (2 * math.log(base))  # noqa: E731
    low, high = fcd(rp.get("beta_fast") or 32), fcd(rp.get("beta_slow") or 1)
    if rp.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    ef = 1 - ramp
    inv = interp * (1 - ef) + extrap * ef
    gm = lambda s, m=1: 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0  # noqa: E731
    if rp.get("attention_factor") is not None:
        af = rp["attention_factor"]
    elif rp.get("mscale") and rp.get("mscale_all_dim"):
        af = gm(factor, rp["mscale"]) / gm(factor, rp["mscale_all_dim"])
    else:
        af = gm(factor)
    return inv, af


def rope_tables(cfg, d, T):
    rp = cfg["rope_parameters"]
    if rp["rope_type"] == "yarn":
        inv, af = yarn(cfg, d)
    else:
        inv, af = 1.0 / (rp["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float) / d)), 1.0
    ang = torch.arange(T, dtype=torch.float)[:, None] * inv[None]  # [T, d/2]
    return torch.cos(ang) * af, torch.sin(ang) * af


def rot_half(x, cos, sin):  # x [..., T, d]; half-split layout
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)


def rot_pairs(x, cos, sin):  # adjacent pairs (x[2i], x[2i+1]) rotated by angle i, kept interleaved
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)


def attention(q, k, v, scale, window=None, sinks=None):
    # q [Hq, T, d], k/v [Hkv, T, d]
    Hq, T, _ = q.shape
    rep = Hq // k.shape[0]
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    s = q @ k.transpose(-1, -2) * scale
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None]
    ok = j <= i
    if window:
        ok &= j > i - window
    s = s.masked_fill(~ok, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks[:, None, None].expand(Hq, T, 1)], -1)
        p = torch.softmax(s, -1)[..., :-1]
    else:
        p = torch.softmax(s, -1)
    return p @ v  # [Hq, T, dv]


def route(fam, cfg, w, pre, x):
    k = cfg["num_experts_per_tok"]
    if fam == "gpt_oss":
        logits = lin(x, w[pre + "mlp.router.weight"], w[pre + "mlp.router.bias"])
        tv, ti = logits.topk(k, -1)
        return logits, torch.softmax(tv, -1), ti
    logits = lin(x, w[pre + ("block_sparse_moe." if fam == "mixtral" and pre + "block_sparse_moe.gate.weight" in w else "mlp.") + "gate.weight"])
    if fam in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        p = torch.softmax(logits, -1)
        tv, ti = p.topk(k, -1)
        if fam == "mixtral" or cfg.get("norm_topk_prob"):
            tv = tv / tv.sum(-1, keepdim=True)
        return logits, tv, ti
    E, G, TG = cfg["n_routed_experts"], cfg["n_group"], cfg["topk_group"]
    if fam == "deepseek_v2":
        s = torch.softmax(logits, -1)
        gs = s.view(-1, G, E // G).max(-1).values
        keep = torch.zeros_like(gs).scatter_(1, gs.topk(TG, -1)[1], 1).repeat_interleave(E // G, -1).bool()
        tv, ti = s.masked_fill(~keep, 0.0).topk(k, -1)
        return logits, tv * cfg["routed_scaling_factor"], ti
    s = logits.sigmoid()
    ch = s + w[pre + "mlp.gate.e_score_correction_bias"]
    gs = ch.view(-1, G, E // G).topk(2, -1)[0].sum(-1)
    keep = torch.zeros_like(gs).scatter_(1, gs.topk(TG, -1)[1], 1).repeat_interleave(E // G, -1).bool()
    ti = ch.masked_fill(~keep, float("-inf")).topk(k, -1)[1]
    tv = s.gather(1, ti)
    if cfg.get("norm_topk_prob"):
        tv = tv / (tv.sum(-1, keepdim=True) + 1e-20)
    return logits, tv * cfg["routed_scaling_factor"], ti


def expert(fam, cfg, w, pre, e, x):
    if fam == "gpt_oss":
        gu = x @ w[pre + "mlp.experts.gate_up_proj"][e] + w[pre + "mlp.experts.gate_up_proj_bias"][e]
        g, u = gu[..., ::2], gu[..., 1::2]
        lim, a = cfg["swiglu_limit"], cfg["swiglu_alpha"]
        g, u = g.clamp(max=lim), u.clamp(-lim, lim)
        h = (u + 1) * (g * torch.sigmoid(g * a))
        return h @ w[pre + "mlp.experts.down_proj"][e] + w[pre + "mlp.experts.down_proj_bias"][e]
    fused = pre + "mlp.experts.gate_up_proj"
    if fused in w:
        I = w[fused].shape[1] // 2
        gate, up, down = w[fused][e][:I], w[fused][e][I:], w[pre + "mlp.experts.down_proj"][e]
    elif fam == "mixtral":
        q = f"{pre}block_sparse_moe.experts.{e}."
        gate, up, down = w[q + "w1.weight"], w[q + "w3.weight"], w[q + "w2.weight"]
    else:
        q = f"{pre}mlp.experts.{e}."
        gate, up, down = w[q + "gate_proj.weight"], w[q + "up_proj.weight"], w[q + "down_proj.weight"]
    return lin(torch.nn.functional.silu(lin(x, gate)) * lin(x, up), down)


def mlp(w, p, x):
    return lin(torch.nn.functional.silu(lin(x, w[p + "gate_proj.weight"])) * lin(x, w[p + "up_proj.weight"]), w[p + "down_proj.weight"])


def forward(fam, cfg, w, ids):
    B, T = ids.shape
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    eps = cfg["rms_norm_eps"]
    x = w["model.embed_tokens.weight"][ids]
    routes = {}
    for L in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{L}."
        a = pre + "self_attn."
        h = rms(x, w[pre + "input_layernorm.weight"], eps)
        outs = []
        for b in range(B):
            hb = h[b]
            if fam.startswith("deepseek"):
                dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
                if a + "q_proj.weight" in w:
                    q = lin(hb, w[a + "q_proj.weight"])
                else:
                    q = lin(rms(lin(hb, w[a + "q_a_proj.weight"]), w[a + "q_a_layernorm.weight"], eps), w[a + "q_b_proj.weight"])
                q = q.view(T, nh, dn + dr).transpose(0, 1)
                ckv = lin(hb, w[a + "kv_a_proj_with_mqa.weight"])
                lat, kpe = ckv[:, : cfg["kv_lora_rank"]], ckv[:, cfg["kv_lora_rank"]:]
                kv = lin(rms(lat, w[a + "kv_a_layernorm.weight"], eps), w[a + "kv_b_proj.weight"]).view(T, nh, dn + dv).transpose(0, 1)
                cos, sin = rope_tables(cfg, dr, T)
                qpe = rot_pairs(q[..., dn:], cos, sin)
                kpe = rot_pairs(kpe[None], cos, sin).expand(nh, T, dr)
                qq = torch.cat([q[..., :dn], qpe], -1)
                kk = torch.cat([kv[..., :dn], kpe], -1)
                scale = (dn + dr) ** -0.5
                rp = cfg["rope_parameters"]
                if rp.get("mscale_all_dim"):
                    m = 0.1 * rp["mscale_all_dim"] * math.log(rp["factor"]) + 1.0
                    scale *= m * m
                o = attention(qq, kk, kv[..., dn:], scale)
            else:
                hd = cfg.get("head_dim") or H // nh
                nkv = cfg["num_key_value_heads"]
                bias = lambda n: w.get(a + n + ".bias")  # noqa: E731
                q = lin(hb, w[a + "q_proj.weight"], bias("q_proj"))
                k = lin(hb, w[a + "k_proj.weight"], bias("k_proj"))
                v = lin(hb, w[a + "v_proj.weight"], bias("v_proj"))
                if fam == "olmoe":
                    q, k = rms(q, w[a + "q_norm.weight"], eps), rms(k, w[a + "k_norm.weight"], eps)
                q, k, v = (t.view(T, -1, hd).transpose(0, 1) for t in (q, k, v))
                if fam == "qwen3_moe":
                    q, k = rms(q, w[a + "q_norm.weight"], eps), rms(k, w[a + "k_norm.weight"], eps)
                cos, sin = rope_tables(cfg, hd, T)
                cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
                q, k = rot_half(q, cos[:, : hd // 2], sin[:, : hd // 2]), rot_half(k, cos[:, : hd // 2], sin[:, : hd // 2])
                window = None
                if fam == "mixtral":
                    window = cfg.get("sliding_window")
                if fam == "gpt_oss" and cfg["layer_types"][L] == "sliding_attention":
                    window = cfg["sliding_window"]
                o = attention(q, k, v, hd ** -0.5, window, w.get(a + "sinks"))
                assert nkv == k.shape[0]
            o = o.transpose(0, 1).reshape(T, -1)
            outs.append(lin(o, w[a + "o_proj.weight"], w.get(a + "o_proj.bias")))
        x = x + torch.stack(outs)
        h = rms(x, w[pre + "post_attention_layernorm.weight"], eps).reshape(B * T, H)
        is_moe = any(k.startswith(pre + "mlp.experts") or k.startswith(pre + "block_sparse_moe") for k in w)
        if not is_moe:
            y = mlp(w, pre + "mlp.", h)
        else:
            logits, tw, ti = route(fam, cfg, w, pre, h)
            routes[L] = (logits, tw, ti)
            y = torch.zeros_like(h)
            for t in range(B * T):
                for j in range(ti.shape[1]):
                    y[t] += tw[t, j] * expert(fam, cfg, w, pre, int(ti[t, j]), h[t])
            if fam == "qwen2_moe":
                y += torch.sigmoid(lin(h, w[pre + "mlp.shared_expert_gate.weight"])) * mlp(w, pre + "mlp.shared_expert.", h)
            if fam.startswith("deepseek"):
                y += mlp(w, pre + "mlp.shared_experts.", h)
        x = x + y.view(B, T, H)
    x = rms(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T, routes


def main():
    worst = 0.0
    ok = True
    for fam_dir in sorted(p for p in ROOT.iterdir() if p.is_dir()):
        fam = fam_dir.name
        g = load_file(str(fam_dir / "golden.safetensors"))
        for folder in sorted(p for p in fam_dir.iterdir() if p.is_dir() and p.name != "bf16"):
            cfg, w = load(folder)
            logits, routes = forward(fam, cfg, w, g["input_ids"])
            d = float((logits - g["logits"]).abs().max())
            same_routes = all(
                torch.equal(torch.sort(routes[L][2], -1).values, torch.sort(g[f"topk_ids.{L}"], -1).values)
                for L in routes
            )
            wd = max(
                float((torch.sort(routes[L][1], -1).values - torch.sort(g[f"topk_weights.{L}"], -1).values).abs().max())
                for L in routes
            )
            rd = max(float((routes[L][0] - g[f"router_logits.{L}"]).abs().max()) for L in routes)
            good = d < 1e-4 and same_routes and wd < 1e-5
            ok &= good
            worst = max(worst, d)
            print(f"{fam}/{folder.name}: max|logits diff| {d:.2e}, router logits {rd:.2e}, "
                  f"top-k ids {'equal' if same_routes else 'DIFFER'}, weights {wd:.2e} {'ok' if good else 'FAIL'}")
    print("all match" if ok else "MISMATCH", f"(worst logits diff {worst:.2e})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
