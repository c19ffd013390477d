#!/usr/bin/env bash
# Training-step and generation throughput: tooltrain (candle, CPU, f32) against PyTorch
# on the same randomly initialised model (CONFIG, an HF config.json; default the ~12M
# Qwen2 of benches/qwen2-12m.json), same shapes, same machine, same run. Prints every
# JSON line, the ratios of the medians (>1: tooltrain is faster) and the peak RSS of
# each side's training process.
#
#   [ROUNDS=3] [CONFIG=benches/qwen2-12m.json] scripts/bench.sh [--steps N] [--batch B]
#       [--seq T] [--gen-batch B] [--prompt-len T] [--new-tokens N]
#   scripts/bench-smollm2.sh     # SmolLM2-135M: an SFT step and RL-style decoding
#   BF16=1 scripts/bench.sh ...  # both sides in mixed precision: ours `--bf16` (bf16
#                                # products on AMX or AVX512-BF16), PyTorch
#                                # `--dtype bf16` (bf16 autocast training, bf16 generate)
#   AVX2=1 scripts/bench.sh ...  # both sides capped at AVX2 + FMA, the code paths of an
#                                # AVX2-only machine on this one: ours TOOLTRAIN_SIMD=avx2
#                                # and gemm built without its AVX-512 kernels (in
#                                # target/avx2), PyTorch ATEN_CPU_CAPABILITY=avx2 with
#                                # MKL and oneDNN capped likewise
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
cargo_args=()
if [[ "${AVX2:-0}" == "1" ]]; then
  cargo_args=(--no-default-features)
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/avx2}"
  export TOOLTRAIN_SIMD=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
    ONEDNN_MAX_CPU_ISA=AVX2
  echo "capped at AVX2: TOOLTRAIN_SIMD=avx2, gemm without x86-v4; ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2, ONEDNN_MAX_CPU_ISA=AVX2"
fi
cargo build --release -p tooltrain-model "${cargo_args[@]}" --bench train_gen >&2
# The machine: every figure is only comparable on the same one.
cpu="$(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1)"
simd="$(grep -o -w -E 'avx2|avx512f|avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null | sort -u | tr '\n' ' ')"
echo "machine: ${cpu:-unknown CPU}, $(nproc) cores; CPU SIMD: ${simd:-none of avx2/avx512f}"
# Rounds alternate the two implementations, so that drift in the machine's speed (a
# shared 2-core VM varies by 10-15% over minutes) hits both; the medians are compared.
ROUNDS="${ROUNDS:-3}"
CONFIG="${CONFIG:-benches/qwen2-12m.json}"
echo "model: $CONFIG; arguments: $*"
ours_args=() theirs_args=()
if [[ "${BF16:-0}" == "1" ]]; then
  ours_args=(--bf16) theirs_args=(--dtype bf16)
  echo "precision: mixed (bf16 products; tooltrain --bf16, pytorch --dtype bf16)"
fi
results=()
for ((r = 1; r <= ROUNDS; r++)); do
  ours=$(cargo bench -q -p tooltrain-model "${cargo_args[@]}" --bench train_gen -- --config "$CONFIG" "$@" \
    "${ours_args[@]}" | tail -n 1)
  theirs=$("$PY" scripts/bench_torch.py --config "$CONFIG" "$@" "${theirs_args[@]}" | tail -n 1)
  echo "round $r tooltrain: $ours"
  echo "round $r pytorch:   $theirs"
  results+=("$ours" "$theirs")
done
"$PY" - "${results[@]}" <<'PY'
import json, statistics, sys
rows = [json.loads(a) for a in sys.argv[1:]]
ours, theirs = rows[0::2], rows[1::2]
for key, what in (("train_tokens_per_s", "train"), ("gen_tokens_per_s", "generation")):
    a = statistics.median(r[key] for r in ours)
    b = statistics.median(r[key] for r in theirs)
    if not (a and b):
        continue
    per_round = ", ".join(f"{x[key] / y[key]:.2f}" for x, y in zip(ours, theirs))
    print(f"{what} tokens/s ratio (tooltrain / pytorch): {a / b:.2f}x "
          f"(medians {a:.0f} vs {b:.0f} over {len(ours)} rounds; per round {per_round}; "
          f"{ours[0]['threads']} threads)")
print(f"SIMD: tooltrain {ours[0].get('simd', '?')}; pytorch {theirs[0].get('simd', '?')}")
if all("train_peak_bytes" in r for r in rows):
    a = max(r["train_peak_bytes"] for r in ours) / 2**20
    b = max(r["train_peak_bytes"] for r in theirs) / 2**20
    print(f"peak RSS after the training steps: tooltrain {a:.0f} MiB, pytorch {b:.0f} MiB "
          f"(ratio {a / b:.2f}; parameters, gradients, AdamW moments and one step's activations)")
PY
