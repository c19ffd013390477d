#!/usr/bin/env bash
# Rollout throughput of the local-model policy, as RL runs it: a checkpoint (default the
# synthetic SFT model of scripts/rl-synthetic.sh) on 8 tasks x 8 samples at temperature
# 1 (configs/eval-synthetic.toml episodes), groups kept together in one batch of 64.
# Prints the machine, then per round episodes/s, generated tokens/s, prefill tokens/s and
# the time per phase (prefill, decoding forward passes, output projection + sampling,
# bookkeeping, and the rest: rendering, tools, parsing); the last line is the medians.
#
#   [ROUNDS=3] scripts/bench-rollout.sh [CHECKPOINT] [TASKS_DIR]
#   BASELINE_BIN=/path/to/old/tooltrain scripts/bench-rollout.sh   # alternate with another
#                                                                  # build: the ratio of
#                                                                  # generated tokens/s
# TASKS_DIR holds `tooltrain synth` output (dataset.jsonl, gt.json, repos/); made with
# configs/synth-medium.json and seed 2 when missing. TOOLTRAIN_BIN_DIR: prebuilt binaries.
# BF16=1: the build under test runs its linear layers in bf16 on AMX tiles or
# AVX512-BF16 (policy.model.bf16; f32 on a CPU with neither); the baseline stays as it is
# unless BASELINE_SAME=1.
# KV_BF16=1: the build under test keeps its KV caches in bf16 (policy.model.kv_bf16).
# BASELINE_SAME=1: the baseline takes the same BF16/KV_BF16 settings (an A/B of two
# builds of the same configuration).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib-binaries.sh
CKPT="${1:-runs/rl-synthetic/sft-run/final}"
TASKS="${2:-runs/bench-rollout/tasks}"
OUT="${OUT:-runs/bench-rollout}"
ROUNDS="${ROUNDS:-3}"
mkdir -p "$OUT"
if [[ ! -f "$CKPT/config.json" ]]; then
  echo "no checkpoint at $CKPT: run scripts/rl-synthetic.sh (its SFT stage) or pass one" >&2
  exit 1
fi
if [[ ! -f "$TASKS/dataset.jsonl" ]]; then
  "$T" synth --config configs/synth-medium.json --out "$TASKS" --n 8 --seed 2 --prefix benchrollout --force >&2
fi
cpu="$(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1)"
simd="$(grep -o -w -E 'avx2|avx512f|avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null | sort -u | tr '\n' ' ')"
echo "machine: ${cpu:-unknown CPU}, $(nproc) cores; CPU SIMD: ${simd:-none}; TOOLTRAIN_SIMD=${TOOLTRAIN_SIMD:-auto}"

run() { # $1 = binary, $2 = out dir, then extra arguments; prints one JSON line
  rm -rf "$2"
  local t0 t1
  t0=$(date +%s.%N)
  "$1" eval --config configs/eval-synthetic.toml \
    --dataset "$TASKS/dataset.jsonl" --gt "$TASKS/gt.json" --repos-dir "$TASKS/repos" \
    --out "$2" --limit 8 --set samples=8 --set batch_size=64 \
    --set policy.model.path="$CKPT" --set policy.model.temperature=1.0 \
    --set policy.model.max_batch=64 "${@:3}" >/dev/null 2>"$2.log" || { cat "$2.log" >&2; exit 1; }
  t1=$(date +%s.%N)
  python3 - "$2" "$t0" "$t1" <<'PY'
import json, sys
out, t0, t1 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
m = json.load(open(f"{out}/metrics.json"))
wall = t1 - t0
gen = 0
for line in open(f"{out}/trajectories.jsonl"):
    t = json.loads(line)
    rec = t.get("tokens") or {}
    gen += sum(rec.get("loss_mask", []))
row = {"episodes": m["episodes"], "wall_s": round(wall, 1), "eval_s": round(m["seconds"], 1),
       "episodes_per_s": m["episodes"] / m["seconds"], "gen_tokens_per_s": gen / m["seconds"],
       "generated_tokens": gen, "mean_reward": m["mean_reward"]}
g = (m.get("policy_stats") or {}).get("generation")
if g:
    phases = g["prefill_s"] + g["decode_s"] + g["sample_s"] + g["bookkeeping_s"]
    row.update({"prefill_tokens_per_s": g["prefill_tokens"] / max(g["prefill_s"], 1e-9),
                "prefill_s": g["prefill_s"], "decode_s": g["decode_s"],
                "sample_s": g["sample_s"], "bookkeeping_s": g["bookkeeping_s"],
                "other_s": m["seconds"] - phases,
                "reused_prompt_tokens": m["policy_stats"]["reused_tokens"],
                "computed_prompt_tokens": m["policy_stats"]["computed_tokens"]})
print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}))
PY
}

ours=(); theirs=(); ours_args=()
if [[ "${BF16:-0}" == "1" ]]; then ours_args+=(--set policy.model.bf16=true); fi
if [[ "${KV_BF16:-0}" == "1" ]]; then ours_args+=(--set policy.model.kv_bf16=true); fi
echo "tooltrain: ${ours_args[*]:-f32}"
for ((r = 1; r <= ROUNDS; r++)); do
  line=$(run "$T" "$OUT/round-$r" "${ours_args[@]}")
  echo "round $r tooltrain: $line"
  ours+=("$line")
  if [[ -n "${BASELINE_BIN:-}" ]]; then
    base_args=()
    if [[ "${BASELINE_SAME:-0}" == "1" ]]; then base_args=("${ours_args[@]}"); fi
    line=$(run "$BASELINE_BIN" "$OUT/round-$r-baseline" "${base_args[@]}")
    echo "round $r baseline:  $line"
    theirs+=("$line")
  fi
done
python3 - "${#ours[@]}" "${ours[@]}" "${theirs[@]}" <<'PY'
import json, statistics, sys
n = int(sys.argv[1])
ours = [json.loads(a) for a in sys.argv[2:2 + n]]
theirs = [json.loads(a) for a in sys.argv[2 + n:]]
med = lambda rows, k: statistics.median(r[k] for r in rows if k in r) if any(k in r for r in rows) else None
keys = ["episodes_per_s", "gen_tokens_per_s", "prefill_tokens_per_s", "prefill_s", "decode_s", "sample_s", "bookkeeping_s", "other_s"]
summary = {k: round(med(ours, k), 3) for k in keys if med(ours, k) is not None}
if theirs:
    b = med(theirs, "gen_tokens_per_s")
    summary["baseline_gen_tokens_per_s"] = round(b, 2)
    summary["ratio_gen_tokens_per_s"] = round(summary["gen_tokens_per_s"] / b, 2)
print("median:", json.dumps(summary))
PY
