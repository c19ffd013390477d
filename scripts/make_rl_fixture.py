#!/usr/bin/env python3
"""Regenerate data/fixtures/rl_objective.{json,safetensors}: the RL objective of a fixed
batch under the tiny Qwen2 checkpoint (data/fixtures/tiny-qwen2), computed independently
in PyTorch (transformers' Qwen2ForCausalLM, autograd), for every advantage estimator x
aggregation mode with PPO (clip-higher and dual clip), GSPO, the KL estimators, the
entropy bonus, a temperature, truncated importance sampling and the trust-region mask.

The Rust test crates/rl/tests/pytorch_fixture.rs rebuilds the batch, runs the trainer's
mini-batch objective and compares the loss and the gradients (1e-4).

Usage (from the repository root): .venv/bin/python scripts/make_rl_fixture.py
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "data" / "fixtures"
torch.set_default_dtype(torch.float32)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

# Parameters whose gradients are stored whole (the others by their norm).
FULL_GRADS = ["model.norm.weight", "model.layers.0.self_attn.q_proj.weight"]


def batch():
    """Two groups of two sequences: a prompt, generated tokens, a masked tool result,
    more generated tokens."""
    g = torch.Generator().manual_seed(7)
    seqs = []
    for n_prompt, gen1, tool, gen2 in [(5, 4, 3, 3), (6, 3, 0, 0), (4, 5, 2, 2), (7, 2, 3, 4)]:
        n = n_prompt + gen1 + tool + gen2
        ids = torch.randint(3, 128, (n,), generator=g).tolist()
        mask = [0] * n_prompt + [1] * gen1 + [0] * tool + [1] * gen2
        seqs.append({"ids": ids, "mask": mask})
    rewards = [[1.0, 0.2], [0.0, 0.5]]
    return seqs, rewards


def logprobs_and_entropy(model, ids, temperature):
    logits = model(torch.tensor([ids])).logits[0, :-1] / temperature
    lsm = torch.log_softmax(logits.double(), -1)
    lp = lsm.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    ent = -(lsm.exp() * lsm).sum(-1)
    return lp, ent  # position j predicts token j + 1


def advantages(r, kind):
    r = torch.tensor(r, dtype=torch.float64)
    n = len(r)
    if kind == "grpo":
        return (r - r.mean()) / (r.std(unbiased=False) + 1e-6)
    if kind == "dr_grpo":
        return r - r.mean()
    if kind == "rloo":
        return r - (r.sum() - r) / (n - 1)
    raise ValueError(kind)


def token_weight(kind, n_i, b, total, norm_len):
    return {"token-mean": 1.0 / total,
            "seq-mean-token-mean": 1.0 / (b * n_i),
            "seq-mean-token-sum": 1.0 / b,
            "seq-mean-token-sum-norm": 1.0 / (b * norm_len)}[kind]


def kl_value(x, r, est):
    d = x - r
    if est == "k1":
        return d
    if est == "k2":
        return 0.5 * d * d
    return torch.exp(-d) + d - 1.0


def objective(model, seqs, rewards, side, case):
    t = case["temperature"]
    clip_lo, clip_hi, dual = case["clip_low"], case["clip_high"], case.get("dual_clip")
    adv = torch.cat([advantages(g, case["advantage"]) for g in rewards])
    gens = [sum(s["mask"][1:]) for s in seqs]
    b, total = len(seqs), sum(gens)
    loss = torch.zeros((), dtype=torch.float64)
    for i, s in enumerate(seqs):
        lp, ent = logprobs_and_entropy(model, s["ids"], t)
        sel = torch.tensor([j - 1 for j in range(1, len(s["ids"])) if s["mask"][j] == 1])
        x, h = lp[sel], ent[sel]
        old = torch.tensor(side[i]["old"], dtype=torch.float64)
        roll = torch.tensor(side[i]["rollout"], dtype=torch.float64)
        ref = torch.tensor(side[i]["reference"], dtype=torch.float64)
        w = token_weight(case["aggregation"], gens[i], b, total, case["norm_len"])
        a = adv[i]
        if case["policy_loss"] == "ppo":
            ratio = torch.exp(x - old)
            l1 = -a * ratio
            l2 = -a * torch.clamp(ratio, 1 - clip_lo, 1 + clip_hi)
            pg = torch.maximum(l1, l2)
            if dual is not None and a < 0:
                pg = torch.minimum(pg, -dual * a)
            if case["trust_region"] > 0:
                keep = (torch.exp(x) - torch.exp(old)).abs() <= case["trust_region"]
                pg = torch.where(keep, pg, torch.zeros_like(pg))
            if case["tis_cap"] is not None:
                pg = pg * torch.clamp(torch.exp(old - roll), max=case["tis_cap"])
            loss = loss + (w * pg).sum()
        else:  # gspo
            sratio = torch.exp((x - old).mean())
            l1 = -a * sratio
            l2 = -a * torch.clamp(sratio, 1 - clip_lo, 1 + clip_hi)
            pg = torch.maximum(l1, l2)
            if dual is not None and a < 0:
                pg = torch.minimum(pg, -dual * a)
            if case["tis_cap"] is not None:
                pg = pg * torch.clamp(torch.exp((old - roll).mean()), max=case["tis_cap"])
            loss = loss + w * len(x) * pg
        if case["kl_coef"] > 0:
            loss = loss + (w * case["kl_coef"] * kl_value(x, ref, case["kl_estimator"])).sum()
        if case["entropy_coef"] != 0:
            loss = loss - (w * case["entropy_coef"] * h).sum()
    return loss


def main():
    model = Qwen2ForCausalLM.from_pretrained(FIX / "tiny-qwen2", dtype=torch.float32)
    model.config._attn_implementation = "eager"
    model.eval()
    seqs, rewards = batch()
    # Old, rollout and reference log-probs near the current ones (temperature 1), so
    # that ratios spread over the clip ranges.
    g = torch.Generator().manual_seed(11)
    side = []
    with torch.no_grad():
        for s in seqs:
            lp, _ = logprobs_and_entropy(model, s["ids"], 1.0)
            sel = [j - 1 for j in range(1, len(s["ids"])) if s["mask"][j] == 1]
            x = lp[sel]
            old = x + 0.6 * (torch.rand(len(sel), generator=g, dtype=torch.float64) - 0.5)
            roll = old + 0.3 * (torch.rand(len(sel), generator=g, dtype=torch.float64) - 0.5)
            ref = x + 0.5 * (torch.rand(len(sel), generator=g, dtype=torch.float64) - 0.5)
            side.append({"old": old.tolist(), "rollout": roll.tolist(), "reference": ref.tolist()})
    base = dict(temperature=1.0, clip_low=0.2, clip_high=0.28, dual_clip=3.0,
                policy_loss="ppo", trust_region=0.0, tis_cap=None, kl_coef=0.0,
                kl_estimator="k3", entropy_coef=0.0, norm_len=20, aggregation="token-mean",
                advantage="grpo")
    cases = []
    for adv in ["grpo", "dr_grpo", "rloo"]:
        for agg in ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                    "seq-mean-token-sum-norm"]:
            cases.append(dict(base, advantage=adv, aggregation=agg))
    cases.append(dict(base, policy_loss="gspo", clip_low=0.05, clip_high=0.08))
    cases.append(dict(base, policy_loss="gspo", tis_cap=1.1))
    for est in ["k1", "k2", "k3"]:
        cases.append(dict(base, kl_coef=0.3, kl_estimator=est))
    cases.append(dict(base, entropy_coef=0.05))
    cases.append(dict(base, temperature=0.7, entropy_coef=0.02))
    cases.append(dict(base, tis_cap=1.1))
    cases.append(dict(base, trust_region=0.05))
    cases.append(dict(base, dual_clip=None, clip_high=0.2))
    tensors = {}
    out_cases = []
    for k, case in enumerate(cases):
        model.zero_grad()
        loss = objective(model, seqs, rewards, side, case)
        loss.backward()
        norms = {}
        for name, p in model.named_parameters():
            gr = p.grad if p.grad is not None else torch.zeros_like(p)
            norms[name] = float(gr.double().norm())
            if name in FULL_GRADS:
                tensors[f"case{k}/{name}"] = gr.detach().clone().contiguous()
        out_cases.append({"settings": case, "loss": float(loss), "grad_norms": norms})
    (FIX / "rl_objective.json").write_text(json.dumps(
        {"model": "tiny-qwen2", "sequences": seqs, "rewards": rewards, "side": side,
         "full_grads": FULL_GRADS, "cases": out_cases}, indent=1) + "\n")
    save_file(tensors, str(FIX / "rl_objective.safetensors"))
    print(f"{len(cases)} cases written")


if __name__ == "__main__":
    main()
