#!/usr/bin/env python3
"""Independent, from-scratch forward pass (no transformers) for the tiny fixtures.

Recomputes `logits`, `loss` and `packed_logits` of data/fixtures/tiny-*/reference.safetensors
from model.safetensors + config.json using plain torch ops, documenting the exact math
(RMSNorm, rotate_half RoPE, GQA, SwiGLU, qwen2 qkv bias, qwen3 q/k norm, tied lm_head).

    .venv/bin/python scripts/check_tiny_reference.py
"""
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

FIX = Path(__file__).resolve().parent.parent / "data" / "fixtures"


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, theta):  # x [b, h, t, d]; HF rotate_half convention
    d = x.shape[-1]
    t = torch.arange(x.shape[2], dtype=torch.float32)
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.outer(t, inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def forward(w, c, ids):
    eps, theta = c["rms_norm_eps"], c["rope_theta"]
    nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or c["hidden_size"] // nh
    x = w["model.embed_tokens.weight"][ids]
    b, t, _ = x.shape
    mask = torch.full((t, t), float("-inf")).triu(1)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"], eps)

        def proj(n):
            y = h @ w[p + f"self_attn.{n}_proj.weight"].T
            bias = w.get(p + f"self_attn.{n}_proj.bias")
            return y + bias if bias is not None else y

        q = proj("q").view(b, t, nh, hd).transpose(1, 2)
        k = proj("k").view(b, t, nkv, hd).transpose(1, 2)
        v = proj("v").view(b, t, nkv, hd).transpose(1, 2)
        if p + "self_attn.q_norm.weight" in w:  # qwen3: per-head RMSNorm before RoPE
            q = rms(q, w[p + "self_attn.q_norm.weight"], eps)
            k = rms(k, w[p + "self_attn.k_norm.weight"], eps)
        q, k = rope(q, theta), rope(k, theta)
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, -1) @ v
        x = x + a.transpose(1, 2).reshape(b, t, nh * hd) @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"], eps)
        g = F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
        x = x + g @ w[p + "mlp.down_proj.weight"].T
    x = rms(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])  # tied when absent
    return x @ head.T


def main():
    for name in ["tiny-llama", "tiny-qwen2", "tiny-qwen3"]:
        d = FIX / name
        c = json.loads((d / "config.json").read_text())
        w = load_file(str(d / "model.safetensors"))
        ref = load_file(str(d / "reference.safetensors"))
        ids = ref["input_ids"]
        logits = forward(w, c, ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        packed = torch.cat([forward(w, c, ids[0:1, :7]), forward(w, c, ids[1:2, :5])], 1)
        dl = (logits - ref["logits"]).abs().max().item()
        dp = (packed - ref["packed_logits"]).abs().max().item()
        dloss = abs(loss.item() - ref["loss"].item())
        print(f"{name}: max|dlogits|={dl:.2e} max|dpacked|={dp:.2e} |dloss|={dloss:.2e}")
        assert dl < 1e-4 and dp < 1e-4 and dloss < 1e-5, name


if __name__ == "__main__":
    main()
