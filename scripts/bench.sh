#!/usr/bin/env bash
# Training-step and generation throughput: tooltrain (candle, CPU, f32) against PyTorch
# on the same ~12M-parameter Qwen2 (benches/qwen2-12m.json), same shapes, same machine,
# same run. Prints both JSON lines and the ratios (>1 means tooltrain is faster).
#
#   scripts/bench.sh [--steps N] [--batch B] [--seq T]
#
# Needs a Python with torch+transformers: $PYTHON, else .venv/bin/python
# (scripts/setup-python.sh makes it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-.venv/bin/python}"
if ! "$PY" -c "import torch, transformers" 2>/dev/null; then
  echo "no torch/transformers in $PY: run scripts/setup-python.sh or set PYTHON" >&2
  exit 1
fi
cargo build --release -p tooltrain-model --bench train_gen >&2
ours=$(cargo bench -q -p tooltrain-model --bench train_gen -- "$@" | tail -n 1)
theirs=$("$PY" scripts/bench_torch.py --config benches/qwen2-12m.json "$@" | tail -n 1)
echo "tooltrain: $ours"
echo "pytorch:   $theirs"
"$PY" - "$ours" "$theirs" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"train tokens/s ratio (tooltrain / pytorch): {a['train_tokens_per_s'] / b['train_tokens_per_s']:.2f}x "
      f"({a['train_tokens_per_s']:.0f} vs {b['train_tokens_per_s']:.0f}, {a['threads']} threads)")
print(f"generation tokens/s ratio (tooltrain / pytorch): {a['gen_tokens_per_s'] / b['gen_tokens_per_s']:.2f}x "
      f"({a['gen_tokens_per_s']:.0f} vs {b['gen_tokens_per_s']:.0f})")
PY
