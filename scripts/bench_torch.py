#!/usr/bin/env python3
"""PyTorch reference benchmark for tooltrain (training + generation throughput).

Usage (from the repository root, after scripts/setup-python.sh):

    .venv/bin/python scripts/bench_torch.py --config benches/qwen2-12m.json \
        [--steps 5] [--batch 4] [--seq 256] [--warmup 2] \
        [--gen-batch 4] [--prompt-len 32] [--new-tokens 64] [--device cpu] [--threads N]

Builds a randomly initialised Qwen2ForCausalLM (float32) from the HF-style config,
times `--steps` training steps (forward + next-token cross-entropy + backward +
AdamW(lr=1e-4) step + zero_grad) after `--warmup` untimed steps, then times greedy
KV-cached generation of `--new-tokens` tokens for `--gen-batch` random prompts of
`--prompt-len` tokens. Prints one JSON line.
"""

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="benches/qwen2-12m.json")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--gen-batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import transformers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)

    with open(args.config) as f:
        cfg_dict = json.load(f)
    cfg_dict = {k: v for k, v in cfg_dict.items() if k not in ("architectures", "model_type", "torch_dtype")}
    cfg = Qwen2Config(**cfg_dict)
    cfg._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(cfg).to(device=dev, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    vocab = cfg.vocab_size

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # ---------------- training ----------------
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(args.seed)

    def step():
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(dev)
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss_val = float(loss.detach())  # forces completion
    sync()
    train_s = time.perf_counter() - t0
    train_tps = args.steps * args.batch * args.seq / train_s

    # ---------------- generation ----------------
    model.eval()
    prompts = torch.randint(0, vocab, (args.gen_batch, args.prompt_len), generator=g).to(dev)
    gen_kwargs = dict(
        attention_mask=torch.ones_like(prompts),
        do_sample=False,
        use_cache=True,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        eos_token_id=None,
        pad_token_id=0,
    )
    with torch.no_grad():
        model.generate(prompts, **{**gen_kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warmup
        sync()
        t0 = time.perf_counter()
        out = model.generate(prompts, **gen_kwargs)
        sync()
        gen_s = time.perf_counter() - t0
    new = out.shape[1] - args.prompt_len
    assert new == args.new_tokens, (new, args.new_tokens)
    gen_tps = args.gen_batch * new / gen_s

    print(
        json.dumps(
            {
                "train_tokens_per_s": round(train_tps, 2),
                "gen_tokens_per_s": round(gen_tps, 2),
                "threads": torch.get_num_threads(),
                "simd": torch.backends.cpu.get_cpu_capability() if dev.type == "cpu" else str(dev),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "device": str(dev),
                "params": n_params,
                "train_step_s": round(train_s / args.steps, 4),
                "gen_s": round(gen_s, 4),
                "final_loss": round(loss_val, 4),
                "batch": args.batch,
                "seq": args.seq,
                "steps": args.steps,
                "gen_batch": args.gen_batch,
                "prompt_len": args.prompt_len,
                "new_tokens": new,
            }
        )
    )


if __name__ == "__main__":
    main()
