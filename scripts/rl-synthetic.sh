#!/usr/bin/env bash
# The whole two-stage recipe on synthetic tasks, from a clean checkout, on a CPU:
#   synth (three disjoint task sets from three seeds: SFT tasks from
#   configs/synth-sft-varied.json, where every report names its culprits, up to two of
#   them, a quarter through a wrapper; RL and held-out test
#   tasks from configs/synth-medium.json, where reports name it half the time, go
#   through wrappers, and have more decoys and up to two culprits)
#   -> sample (scripted teacher) -> train-sft (configs/sft-smollm2-synthetic.toml)
#   -> eval of the SFT model on the test tasks
#   -> train-rl from the SFT model on the RL tasks (configs/rl-smollm2-synthetic.toml)
#   -> eval of the RL model on the same test tasks
# The last line is `sft_reward=X rl_reward=Y` (mean held-out nDCG@5, greedy).
#
#   scripts/rl-synthetic.sh                 # the documented run
#   SMOKE=1 scripts/rl-synthetic.sh         # CI: a few RL steps, resume checked
# Knobs (environment): OUT, SFT_SEED, RL_SEED, TEST_SEED (the seeds of the three task
# sets), N_SFT, N_RL, N_TEST (their sizes), RL_STEPS, MIN_GAIN (fail unless
# rl_reward >= sft_reward + MIN_GAIN), TOOLTRAIN_BIN_DIR (prebuilt binaries),
# SFT_CKPT (skip the SFT stage and start RL from this checkpoint), RL_SET (extra
# `--set key=value` arguments for train-rl, space-separated), SFT_SYNTH / TASK_SYNTH (the
# synth configs of the SFT tasks and of the RL and test tasks). Every stage is skipped
# when its output is complete, and an interrupted RL run resumes, so a rerun continues.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SFT_SEED="${SFT_SEED:-1}"
RL_SEED="${RL_SEED:-3}"
TEST_SEED="${TEST_SEED:-2}"
if [[ "${SMOKE:-0}" == "1" ]]; then
  OUT="${OUT:-runs/rl-synthetic-smoke}"
  N_SFT="${N_SFT:-16}"
  N_RL="${N_RL:-8}"
  N_TEST="${N_TEST:-8}"
  RL_STEPS="${RL_STEPS:-2}"
  MIN_GAIN="${MIN_GAIN:--1}"
else
  OUT="${OUT:-runs/rl-synthetic}"
  N_SFT="${N_SFT:-64}"
  N_RL="${N_RL:-128}"
  N_TEST="${N_TEST:-64}"
  RL_STEPS="${RL_STEPS:-}"
  MIN_GAIN="${MIN_GAIN:-}"
fi
if [[ "$SFT_SEED" == "$RL_SEED" || "$SFT_SEED" == "$TEST_SEED" || "$RL_SEED" == "$TEST_SEED" ]]; then
  echo "SFT_SEED, RL_SEED and TEST_SEED must differ (disjoint task sets)" >&2
  exit 2
fi

start=$(date +%s)
source scripts/lib-binaries.sh
R="$TOOLTRAIN_BIN_DIR/train-rl"

mkdir -p "$OUT"
SFT_SYNTH="${SFT_SYNTH:-configs/synth-sft-varied.json}"
TASK_SYNTH="${TASK_SYNTH:-configs/synth-medium.json}"
synth() { # $1 = name, $2 = seed, $3 = count, $4 = synth config
  if [[ ! -f "$OUT/$1/dataset.jsonl" ]]; then
    "$T" synth --config "$4" --out "$OUT/$1" --n "$3" --seed "$2" --prefix "synth$1$2" --force >&2
  fi
}
synth test "$TEST_SEED" "$N_TEST" "$TASK_SYNTH"
synth rl "$RL_SEED" "$N_RL" "$TASK_SYNTH"

eval_model() { # $1 = checkpoint, $2 = out dir; prints the mean reward
  if [[ ! -f "$2/metrics.json" ]]; then
    "$T" eval --config configs/eval-synthetic.toml \
      --dataset "$OUT/test/dataset.jsonl" --gt "$OUT/test/gt.json" \
      --repos-dir "$OUT/test/repos" --out "$2" \
      --set policy.model.path="$1" >&2
  fi
  python3 -c 'import json,sys; print("%.4f" % json.load(open(sys.argv[1]))["mean_reward"])' "$2/metrics.json"
}

# Stage 1: SFT on the scripted teacher's trajectories (resumable: skipped when done).
if [[ -n "${SFT_CKPT:-}" ]]; then
  SFT="$SFT_CKPT"
else
  SFT="$OUT/sft-run/final"
  if [[ ! -f "$SFT/config.json" ]]; then
    synth sft "$SFT_SEED" "$N_SFT" "$SFT_SYNTH"
    rm -rf "$OUT/sample" "$OUT/sft-run"
    "$T" sample --config configs/sample-synthetic.toml \
      --set dataset="$OUT/sft/dataset.jsonl" --set gt="$OUT/sft/gt.json" \
      --set repos_dir="$OUT/sft/repos" --set out="$OUT/sample" >&2
    "$S" --config configs/sft-smollm2-synthetic.toml \
      --set train_file="$OUT/sample/sft.jsonl" --set output_dir="$OUT/sft-run" >&2
  fi
fi
sft=$(eval_model "$SFT" "$OUT/eval-sft")

# Stage 2: RL from the SFT model on the RL tasks.
rl_args=(--config configs/rl-smollm2-synthetic.toml
  --set init="$SFT" --set output_dir="$OUT/rl-run"
  --set train_data.dataset="$OUT/rl/dataset.jsonl" --set train_data.gt="$OUT/rl/gt.json"
  --set train_data.repos_dir="$OUT/rl/repos"
  --set val_data.dataset="$OUT/test/dataset.jsonl" --set val_data.gt="$OUT/test/gt.json"
  --set val_data.repos_dir="$OUT/test/repos")
if [[ -n "$RL_STEPS" ]]; then rl_args+=(--set max_steps="$RL_STEPS"); fi
if [[ "${SMOKE:-0}" == "1" ]]; then
  # Every group is trained on (even one with equal rewards), so the update path always runs.
  rl_args+=(--set tasks_per_step=2 --set group_size=4 --set val_data.limit=4 --set val_every=0
    --set filter_zero_variance=false --set keep_checkpoints=1)
fi
# shellcheck disable=SC2206
if [[ -n "${RL_SET:-}" ]]; then for kv in $RL_SET; do rl_args+=(--set "$kv"); done; fi
if [[ ! -f "$OUT/rl-run/final/config.json" ]]; then
  resume=()
  if [[ -d "$OUT/rl-run/checkpoints" ]]; then resume=(--resume); fi
  if [[ "${SMOKE:-0}" == "1" && -z "${resume[*]}" ]]; then
    # Stop after the first step, then resume: the CLI's checkpoint-and-resume path.
    "$R" "${rl_args[@]}" --set stop_at_step=1 >&2
    resume=(--resume)
  fi
  "$R" "${rl_args[@]}" "${resume[@]}" >&2
fi
rl=$(eval_model "$OUT/rl-run/final" "$OUT/eval-rl")
elapsed=$(( $(date +%s) - start ))
echo "run time ${elapsed} s; RL metrics: $OUT/rl-run/metrics.jsonl" >&2
if [[ -n "$MIN_GAIN" ]]; then
  if ! python3 -c 'import sys; s,r,g=map(float,sys.argv[1:]); sys.exit(0 if r >= s + g else 1)' "$sft" "$rl" "$MIN_GAIN"; then
    echo "rl_reward $rl is not at least sft_reward $sft + $MIN_GAIN" >&2
    echo "sft_reward=$sft rl_reward=$rl"
    exit 1
  fi
fi
echo "sft_reward=$sft rl_reward=$rl"
