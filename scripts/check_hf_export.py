#!/usr/bin/env python3
"""Checks that HF transformers loads what `tooltrain convert` writes, as is.

    target/release/tooltrain convert --model assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --output /tmp/smol
    target/release/tooltrain convert --model data/fixtures/tiny-qwen3 --dtype bf16 --output /tmp/q3
    .venv/bin/python scripts/check_hf_export.py /tmp/smol /tmp/q3

Compares the chat template, tokens and per-token log-probs with the SmolLM2 fixture
(transformers' own GGUF loading) and prints the greedy reply.
"""
import sys
SMOL, Q3 = sys.argv[1], sys.argv[2]
import json, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
ref = json.load(open("data/fixtures/smollm2_reference.json"))
m = AutoModelForCausalLM.from_pretrained(SMOL, torch_dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(SMOL)
chat = ref["chat"]
text = tok.apply_chat_template(chat["messages"], tokenize=False, add_generation_prompt=True)
assert text == chat["text"], (text, chat["text"])
ids = tok(text, add_special_tokens=False).input_ids
assert ids == chat["input_ids"], "tokenizer ids differ"
for t in ref["texts"]:
    assert tok(t["text"], add_special_tokens=False).input_ids == t["input_ids"], t["name"]
with torch.no_grad():
    lp = torch.log_softmax(m(torch.tensor([ids])).logits[0].float(), -1)
got = [lp[i, ids[i+1]].item() for i in range(len(ids)-1)]
print("max |dlogprob| vs GGUF-in-transformers:", max(abs(a-b) for a,b in zip(got, chat["logprobs"])))
out = m.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)
print("greedy:", tok.decode(out[0][len(ids):]))
q3 = AutoModelForCausalLM.from_pretrained(Q3)
print("qwen3 bf16 loads:", q3.dtype, sum(p.numel() for p in q3.parameters()))
