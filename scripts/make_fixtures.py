#!/usr/bin/env python3
"""Regenerate the committed test fixtures under data/fixtures/.

Usage (from the repository root, after scripts/fetch-assets.sh):

    .venv/bin/python scripts/make_fixtures.py            # everything
    .venv/bin/python scripts/make_fixtures.py tiny chat  # a subset: tiny, chat, smollm2

Outputs (all deterministic, CPU, float32):
  data/fixtures/tiny-{llama,qwen2,qwen3}/{config.json,model.safetensors,generation_config.json,reference.safetensors}
  data/fixtures/chat_template_qwen.json      (needs assets/qwen-tokenizer)
  data/fixtures/smollm2_reference.json       (needs assets/smollm2/*.gguf)
See data/fixtures/README.md for the layouts.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file, load_file

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "data" / "fixtures"
ASSETS = ROOT / "assets"

torch.set_default_dtype(torch.float32)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)  # bit-for-bit reproducible reductions on CPU


# --------------------------------------------------------------------------
# a. tiny random checkpoints
# --------------------------------------------------------------------------

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_specs():
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    return [
        (
            "tiny-llama",
            LlamaForCausalLM,
            LlamaConfig(
                **COMMON,
                rope_theta=10000.0,
                tie_word_embeddings=False,
                attention_bias=False,
                mlp_bias=False,
            ),
            10000.0,
        ),
        (
            "tiny-qwen2",
            Qwen2ForCausalLM,
            Qwen2Config(**COMMON, rope_theta=1000000.0, tie_word_embeddings=True),
            1000000.0,
        ),
        (
            "tiny-qwen3",
            Qwen3ForCausalLM,
            Qwen3Config(
                **COMMON,
                head_dim=16,
                rope_theta=1000000.0,
                tie_word_embeddings=False,
                attention_bias=False,
            ),
            1000000.0,
        ),
    ]


def reinit_(model, seed):
    """Re-initialise every parameter so that outputs are far from trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # input/post_attention/final norm, q_norm, k_norm
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:  # linear weights and biases (incl. qwen2 q/k/v biases, untied lm_head)
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def next_token_loss(logits, ids):
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1))


def make_tiny():
    for i, (name, cls, cfg, theta) in enumerate(tiny_specs()):
        out = FIX / name
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(1234 + i)
        cfg._attn_implementation = "eager"
        cfg.dtype = "float32"
        model = cls(cfg).to(torch.float32)
        model.config._attn_implementation = "eager"
        reinit_(model, seed=1000 + i)
        model.eval()
        model.save_pretrained(out, safe_serialization=True)

        # transformers>=5 writes rope_theta inside "rope_parameters"; also expose the
        # classic top-level key (transformers 4.x layout) so simple loaders find it.
        cpath = out / "config.json"
        c = json.loads(cpath.read_text())
        c["rope_theta"] = theta
        rp = c.get("rope_parameters") or {}
        assert rp.get("rope_theta", theta) == theta, rp
        cpath.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")

        g = torch.Generator().manual_seed(42 + i)
        ids = torch.randint(0, 128, (2, 12), generator=g, dtype=torch.int64)

        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits.float()
        loss = next_token_loss(logits, ids)
        loss.backward()

        ref = {
            "input_ids": ids.contiguous(),
            "logits": logits.detach().contiguous(),
            "loss": loss.detach().reshape(()).contiguous(),
        }
        for pname, p in model.named_parameters():
            assert p.grad is not None, pname
            ref[f"grad.{pname}"] = p.grad.detach().float().contiguous()

        with torch.no_grad():
            a = model(input_ids=ids[0:1, :7]).logits.float()
            b = model(input_ids=ids[1:2, :5]).logits.float()
            ref["packed_logits"] = torch.cat([a, b], dim=1).contiguous()
            # sanity: a prefix run equals the prefix of the full run (causality)
            assert torch.allclose(a, logits[0:1, :7], atol=1e-4), (a - logits[0:1, :7]).abs().max()

        save_file(ref, str(out / "reference.safetensors"), metadata={"generator": "scripts/make_fixtures.py"})
        print(
            f"{name}: loss={loss.item():.6f} logits std={logits.std().item():.3f} "
            f"params={sum(p.numel() for p in model.parameters())} grads={len(ref) - 4}"
        )


def verify_tiny():
    """Reload each checkpoint from disk and check logits/loss/grads reproduce."""
    from transformers import AutoModelForCausalLM

    for name, *_ in tiny_specs():
        out = FIX / name
        ref = load_file(str(out / "reference.safetensors"))
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
        model.eval()
        ids = ref["input_ids"]
        logits = model(input_ids=ids).logits
        loss = next_token_loss(logits, ids)
        loss.backward()
        d = (logits - ref["logits"]).abs().max().item()
        dl = abs(loss.item() - ref["loss"].item())
        dg = max((p.grad - ref[f"grad.{n}"]).abs().max().item() for n, p in model.named_parameters())
        names = {n for n, _ in model.named_parameters()}
        gnames = {k[5:] for k in ref if k.startswith("grad.")}
        assert names == gnames, names ^ gnames
        assert d < 1e-5 and dl < 1e-5 and dg < 1e-5, (name, d, dl, dg)
        print(f"verify {name}: reload ok (max|dlogits|={d:.2e}, |dloss|={dl:.2e}, max|dgrad|={dg:.2e})")


# --------------------------------------------------------------------------
# b. chat template fixture (Qwen tokenizer)
# --------------------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_code_of_class",
            "description": "Return the source code of a class defined in a file.",
            "parameters": {
                "type": "object",
                "properties": {
                    "file_name": {"type": "string", "description": "Path of the Python file."},
                    "class_name": {"type": "string", "description": "Name of the class."},
                },
                "required": ["file_name", "class_name"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "exit",
            "description": "Finish the episode.",
            "parameters": {"type": "object", "properties": {}, "required": []},
        },
    },
]

TOOL_CALL = {
    "type": "function",
    "function": {"name": "get_code_of_class", "arguments": {"file_name": "a.py", "class_name": "A"}},
}


def chat_cases():
    sys_msg = {"role": "system", "content": "You are a careful coding assistant."}
    return [
        dict(name="user_only", messages=[{"role": "user", "content": "Hello!"}], tools=None, agp=True),
        dict(name="user_only_no_gen_prompt", messages=[{"role": "user", "content": "Hello!"}], tools=None, agp=False),
        dict(
            name="system_user",
            messages=[sys_msg, {"role": "user", "content": "What is 2+2?"}],
            tools=None,
            agp=True,
        ),
        dict(
            name="multi_turn",
            messages=[
                sys_msg,
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And times 3?"},
            ],
            tools=None,
            agp=True,
        ),
        dict(
            name="multi_turn_full_no_gen_prompt",
            messages=[
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And times 3?"},
                {"role": "assistant", "content": "12"},
            ],
            tools=None,
            agp=False,
        ),
        dict(
            name="tools_user",
            messages=[{"role": "user", "content": "Show me class A in a.py"}],
            tools=TOOLS,
            agp=True,
        ),
        dict(
            name="tools_system_user",
            messages=[sys_msg, {"role": "user", "content": "Show me class A in a.py"}],
            tools=TOOLS,
            agp=True,
        ),
        dict(
            name="tool_call_and_responses",
            messages=[
                sys_msg,
                {"role": "user", "content": "Show me class A in a.py, then class B in b.py"},
                {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
                {"role": "tool", "content": "class A:\n    pass"},
                {
                    "role": "assistant",
                    "content": "Now class B.",
                    "tool_calls": [
                        {
                            "type": "function",
                            "function": {
                                "name": "get_code_of_class",
                                "arguments": {"file_name": "b.py", "class_name": "B"},
                            },
                        },
                        {"type": "function", "function": {"name": "exit", "arguments": {}}},
                    ],
                },
                {"role": "tool", "content": "class B(A):\n    x = 1"},
                {"role": "tool", "content": "bye"},
            ],
            tools=TOOLS,
            agp=True,
        ),
        dict(
            name="tool_call_no_gen_prompt",
            messages=[
                {"role": "user", "content": "Show me class A in a.py"},
                {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
                {"role": "tool", "content": "class A:\n    pass"},
                {"role": "assistant", "content": "Here it is:\n```python\nclass A:\n    pass\n```"},
            ],
            tools=TOOLS,
            agp=False,
        ),
        dict(
            name="unicode_newlines",
            messages=[
                {"role": "system", "content": "Réponds en français.\n\nSois bref."},
                {"role": "user", "content": "Ça va? 😀 中文 \"quoted\" <b>tag</b>\n\tindented\n\n"},
                {"role": "assistant", "content": "Oui ✓ — très bien.\n"},
                {"role": "user", "content": "Encore: ü ß ∑ 🚀"},
            ],
            tools=None,
            agp=True,
        ),
        dict(
            name="assistant_think_history",
            messages=[
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "<think>\nThe user greets me.\n</think>\n\nHello!"},
                {"role": "user", "content": "Bye"},
            ],
            tools=None,
            agp=True,
        ),
        dict(
            name="enable_thinking_false",
            messages=[{"role": "user", "content": "Hi"}],
            tools=None,
            agp=True,
            extra={"enable_thinking": False},
        ),
    ]


def make_chat():
    from transformers import AutoTokenizer

    tok_dir = ASSETS / "qwen-tokenizer"
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    cases = []
    for c in chat_cases():
        extra = c.get("extra", {})
        text = tok.apply_chat_template(
            c["messages"], tools=c["tools"], tokenize=False, add_generation_prompt=c["agp"], **extra
        )
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text, c["name"]
        cases.append(
            {
                "name": c["name"],
                "messages": c["messages"],
                "tools": c["tools"],
                "add_generation_prompt": c["agp"],
                "extra_kwargs": extra,
                "text": text,
                "input_ids": ids,
            }
        )
    doc = {
        "tokenizer_dir": "assets/qwen-tokenizer",
        "tokenizer_json_sha256": "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "bos_token": tok.bos_token,
        "cases": cases,
    }
    all_text = "".join(c["text"] for c in cases)
    assert "<tools>" in all_text and "<tool_response>" in all_text and "<tool_call>" in all_text
    path = FIX / "chat_template_qwen.json"
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"chat: {len(cases)} cases -> {path.relative_to(ROOT)}")


# --------------------------------------------------------------------------
# c. SmolLM2 (GGUF Q4_1, dequantised by transformers)
# --------------------------------------------------------------------------

SMOL_TEXTS = {
    "ascii": "The quick brown fox jumps over the lazy dog. 1234567890!",
    "code": "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n    return a + b\n\n\nclass Foo:\n\tpass\n",
    "unicode": "Héllo wörld 😀🚀 — 你好，世界! ∑x² ≤ ∞",
}


def make_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = ASSETS / "smollm2"
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=gguf, dtype=torch.float32)
    model.eval()
    cfg = model.config
    rp = getattr(cfg, "rope_parameters", None) or {}
    rope_theta = rp.get("rope_theta", getattr(cfg, "rope_theta", None))

    messages = [
        {"role": "system", "content": "You are a helpful assistant named SmolLM."},
        {"role": "user", "content": "What is the capital of France? Answer in one sentence."},
    ]
    chat_text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat_ids = tok(chat_text, add_special_tokens=False).input_ids

    ids = torch.tensor([chat_ids], dtype=torch.int64)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        lp = [logp[i, chat_ids[i + 1]].item() for i in range(len(chat_ids) - 1)]
        top = torch.topk(logits[-1], 20)
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=20,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
    new_ids = gen[0, ids.shape[1]:].tolist()

    # 20 greedy tokens ignoring EOS (full recompute each step, no KV cache).
    cur = ids
    no_eos = []
    with torch.no_grad():
        for _ in range(20):
            nxt = int(model(input_ids=cur).logits[0, -1].argmax())
            no_eos.append(nxt)
            cur = torch.cat([cur, torch.tensor([[nxt]])], dim=1)
    assert no_eos[: len(new_ids)] == new_ids, (no_eos, new_ids)

    # How transformers maps the GGUF attn_q/attn_k tensors: llama.cpp stores them with
    # rows permuted for interleaved (GPT-J style) RoPE; transformers un-permutes them
    # back to the HF rotate_half layout.  Record which layout q_proj matches.
    from gguf import GGUFReader
    from gguf.quants import dequantize
    import numpy as np

    reader = GGUFReader(str(d / gguf))
    raw = {t.name: t for t in reader.tensors}
    t = raw["blk.0.attn_q.weight"]
    q_raw = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(
        cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads), cfg.hidden_size
    )
    nh, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    q_unperm = q_raw.reshape(nh, hd // 2, 2, -1).transpose(1, 2).reshape(q_raw.shape)
    q_hf = model.model.layers[0].self_attn.q_proj.weight.detach()
    q_layout = {
        "hf_q_proj_equals_gguf_raw": bool(torch.equal(q_hf, q_raw)),
        "hf_q_proj_equals_gguf_unpermuted": bool(torch.equal(q_hf, q_unperm)),
        "unpermute": "w.reshape(n_head, head_dim/2, 2, in).swapaxes(1, 2).reshape(out, in)  (k uses n_kv_head)",
        "gguf_tensor_types": {
            "token_embd.weight": raw["token_embd.weight"].tensor_type.name,
            "blk.0.attn_q.weight": t.tensor_type.name,
            "blk.0.attn_norm.weight": raw["blk.0.attn_norm.weight"].tensor_type.name,
        },
        "gguf_has_output_weight": "output.weight" in raw,
    }

    sd = model.state_dict()
    doc = {
        "gguf_file": f"assets/smollm2/{gguf}",
        "gguf_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "config": {
            "model_type": cfg.model_type,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads),
            "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_position_embeddings,
            "rope_theta": rope_theta,
            "rms_norm_eps": cfg.rms_norm_eps,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id,
            "pad_token_id": getattr(cfg, "pad_token_id", None),
        },
        "gguf_q_layout": q_layout,
        "lm_head_is_embed": bool(model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()),
        "weights_sample": {
            # a few dequantised values so loaders can check layout / un-permutation
            k: sd[k].flatten()[:8].tolist()
            for k in [
                "model.embed_tokens.weight",
                "model.layers.0.self_attn.q_proj.weight",
                "model.layers.0.self_attn.k_proj.weight",
                "model.layers.0.self_attn.v_proj.weight",
                "model.layers.0.input_layernorm.weight",
                "model.norm.weight",
            ]
        },
        "weights_row_sum": {
            # sum over each output row of q/k proj, layer 0 (sensitive to the head permutation)
            k: sd[k].sum(dim=1).tolist()[:64]
            for k in ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"]
        },
        "tokenizer": {
            "bos_token": tok.bos_token,
            "bos_token_id": tok.bos_token_id,
            "eos_token": tok.eos_token,
            "eos_token_id": tok.eos_token_id,
            "pad_token": tok.pad_token,
            "pad_token_id": tok.pad_token_id,
            "unk_token": tok.unk_token,
            "vocab_size": len(tok),
            "add_bos_token": getattr(tok, "add_bos_token", None),
        },
        "chat_template": tok.chat_template,
        "texts": [
            {"name": k, "text": v, "input_ids": tok(v, add_special_tokens=False).input_ids}
            for k, v in SMOL_TEXTS.items()
        ],
        "chat": {
            "messages": messages,
            "add_generation_prompt": True,
            "text": chat_text,
            "input_ids": chat_ids,
            "logprobs": lp,
            "last_logits_top": {"ids": top.indices.tolist(), "logits": top.values.tolist()},
            "greedy_ids": new_ids,
            "greedy_text": tok.decode(new_ids),
            "greedy_ids_no_eos": no_eos,
            "greedy_text_no_eos": tok.decode(no_eos),
        },
    }
    for t in doc["texts"]:
        assert tok.decode(t["input_ids"]) == t["text"], t["name"]
    path = FIX / "smollm2_reference.json"
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"smollm2: config={doc['config']}")
    print(f"smollm2: chat prompt {len(chat_ids)} tokens, mean logprob {sum(lp) / len(lp):.3f}")
    print(f"smollm2: greedy -> {doc['chat']['greedy_text']!r}")
    print(f"smollm2: greedy (no eos) -> {doc['chat']['greedy_text_no_eos']!r}")
    print(f"smollm2: q layout {q_layout}")


def main():
    which = set(sys.argv[1:]) or {"tiny", "chat", "smollm2"}
    FIX.mkdir(parents=True, exist_ok=True)
    import transformers

    print(f"torch {torch.__version__} transformers {transformers.__version__}")
    if "tiny" in which:
        make_tiny()
        verify_tiny()
    if "chat" in which:
        make_chat()
    if "smollm2" in which:
        make_smollm2()
    for f in FIX.rglob("*"):
        if f.is_file():
            f.chmod(0o644)


if __name__ == "__main__":
    main()
