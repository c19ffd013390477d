#!/usr/bin/env bash
# SmolLM2-135M shapes (benches/smollm2-135m.json, random weights, f32) against PyTorch and
# HF generate, same machine, alternating rounds (scripts/bench.sh):
#   - the SFT training step of configs/sft-smollm2-synthetic.toml: one 2048-token
#     sequence, forward + backward + AdamW, and the peak RSS of each side's process;
#   - RL-style decoding: a batch of 8 prompts of 1,536 tokens, 128 new tokens each,
#     greedy, KV-cached (prefill included, as in a rollout's turn).
#
#   [ROUNDS=3] scripts/bench-smollm2.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CONFIG=benches/smollm2-135m.json exec scripts/bench.sh --steps 2 --warmup 1 --batch 1 \
  --seq 2048 --gen-batch 8 --prompt-len 1536 --new-tokens 128 "$@"
