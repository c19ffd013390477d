#!/usr/bin/env python3
"""Regenerate data/fixtures/tiny-qwen2-lora/: LoRA adapters on every projection of the
tiny Qwen2 checkpoint (data/fixtures/tiny-qwen2), saved by HF PEFT, with PEFT's outputs
on fixed ids: logits, the mean next-token loss, the adapters' gradients, and the merged
weights of `merge_and_unload` (reference.safetensors, reference.json).

The Rust test crates/model/tests/lora.rs loads the adapter directory onto the model and
compares everything (1e-4).

Usage (from the repository root): .venv/bin/python scripts/make_lora_fixture.py
(needs `pip install peft` in .venv)
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "data" / "fixtures"
OUT = FIX / "tiny-qwen2-lora"
torch.set_default_dtype(torch.float32)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    base = Qwen2ForCausalLM.from_pretrained(FIX / "tiny-qwen2", dtype=torch.float32)
    base.config._attn_implementation = "eager"
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                     task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # B non-zero too, so the adapters change the outputs
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.eval()
    OUT.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(OUT)
    (OUT / "README.md").unlink(missing_ok=True)  # PEFT's model-card template
    c = json.loads((OUT / "adapter_config.json").read_text())
    c["base_model_name_or_path"] = "data/fixtures/tiny-qwen2"
    (OUT / "adapter_config.json").write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    ids = torch.randint(3, 128, (2, 10), generator=g)
    logits = model(ids).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    tensors = {"logits": logits.detach().contiguous()}
    trainable = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            trainable += 1
            key = name.replace(".default", "")
            tensors[f"grad/{key}"] = p.grad.detach().contiguous()
        else:
            assert p.grad is None, name
    merged = model.merge_and_unload()
    for name, p in merged.named_parameters():
        if any(t in name for t in TARGETS):
            tensors[f"merged/{name}"] = p.detach().contiguous()
    save_file(tensors, str(OUT / "reference.safetensors"))
    (OUT / "reference.json").write_text(json.dumps(
        {"ids": ids.tolist(), "loss": float(loss), "rank": 4, "alpha": 8,
         "trainable_tensors": trainable}, indent=1) + "\n")
    print(f"loss {float(loss):.6f}, {trainable} adapter tensors")


if __name__ == "__main__":
    main()
