#!/usr/bin/env python3
"""PyTorch reference benchmark for tooltrain (training + generation throughput).

Usage (from the repository root, after scripts/setup-python.sh):

    .venv/bin/python scripts/bench_torch.py --config benches/qwen2-12m.json \
        [--steps 5] [--batch 4] [--seq 256] [--warmup 2] \
        [--gen-batch 4] [--prompt-len 32] [--new-tokens 64] [--device cpu|cuda]
        [--dtype f32|bf16] [--threads N]

Builds a randomly initialised model from the HF config (any `model_type` transformers
knows: qwen2, llama for SmolLM2, ...), times `--steps` training steps (forward +
next-token cross-entropy + backward + AdamW(lr=1e-4) step + zero_grad) after `--warmup`
untimed steps, then times greedy KV-cached generation of `--new-tokens` tokens for
`--gen-batch` random prompts of `--prompt-len` tokens. `--dtype bf16` trains f32 weights
under bf16 autocast (mixed precision, as tooltrain keeps f32 master weights) and
generates with bf16 weights. `--steps 0` skips training, `--new-tokens 0` generation.
Prints one JSON line, with the peak memory: the process's peak RSS on a CPU, the peak
allocated CUDA memory on a GPU.
"""

import argparse
import json
import os
import resource
import time

import torch
import torch.nn.functional as F


def peak_bytes(dev):
    """Peak allocated CUDA memory, or the process's peak RSS on a CPU (bytes)."""
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


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
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)

    with open(args.config) as f:
        cfg_dict = json.load(f)
    model_type = cfg_dict.get("model_type", "qwen2")
    cfg_dict = {k: v for k, v in cfg_dict.items() if k not in ("architectures", "model_type", "torch_dtype")}
    cfg = AutoConfig.for_model(model_type, **cfg_dict)
    cfg._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(cfg).to(device=dev, dtype=torch.float32)
    bf16 = args.dtype == "bf16"
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
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    train_tps, train_s, loss_val = 0.0, 0.0, float("nan")
    if args.steps > 0:
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
    train_peak = peak_bytes(dev)
    opt = None
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    # ---------------- generation ----------------
    model.eval()
    if bf16:
        model = model.to(torch.bfloat16)
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
    gen_tps, gen_s, new = 0.0, 0.0, 0
    if args.new_tokens > 0:
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
                "impl": "pytorch",
                "dtype": args.dtype,
                "train_tokens_per_s": round(train_tps, 2),
                "train_peak_bytes": train_peak,
                "gen_peak_bytes": peak_bytes(dev),
                "gen_tokens_per_s": round(gen_tps, 2),
                "threads": torch.get_num_threads(),
                "simd": torch.backends.cpu.get_cpu_capability() if dev.type == "cpu" else str(dev),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "device": str(dev),
                "params": n_params,
                "train_step_s": round(train_s / args.steps, 4) if args.steps else 0.0,
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
