#!/usr/bin/env python3
"""Loads an adapter directory written by tooltrain (`CausalLM::save_adapter`) with HF PEFT
onto the tiny Qwen2 fixture and compares its logits with PEFT's own on the fixture
adapters (data/fixtures/tiny-qwen2-lora). The directory must hold those adapters, as
crates/model/tests/lora.rs writes them:

    TOOLTRAIN_WRITE_ADAPTER=/tmp/adapter cargo test -p tooltrain-model --test lora
    .venv/bin/python scripts/check_peft_adapter.py /tmp/adapter
"""
import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "data" / "fixtures"
base = Qwen2ForCausalLM.from_pretrained(FIX / "tiny-qwen2", dtype=torch.float32)
base.config._attn_implementation = "eager"
model = PeftModel.from_pretrained(base, sys.argv[1]).eval()
ref = load_file(str(FIX / "tiny-qwen2-lora" / "reference.safetensors"))
ids = torch.tensor(json.loads((FIX / "tiny-qwen2-lora" / "reference.json").read_text())["ids"])
with torch.no_grad():
    logits = model(ids).logits
d = (logits - ref["logits"]).abs().max().item()
print(f"PEFT loaded {sys.argv[1]}: max |logit difference| {d:.2e}")
sys.exit(0 if d < 1e-4 else 1)
