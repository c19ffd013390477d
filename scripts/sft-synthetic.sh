#!/usr/bin/env bash
# The whole SFT pipeline on synthetic tasks, from a clean checkout, on a CPU:
#   synth (train + held-out tasks) -> sample (scripted teacher, Qwen tokenizer)
#   -> train-sft (tiny Qwen2 from scratch) -> eval of the untrained and the SFT model
# The last line is `base_reward=X sft_reward=Y` (mean held-out nDCG@5).
#
#   scripts/sft-synthetic.sh            # the documented longer run
#   SMOKE=1 scripts/sft-synthetic.sh    # the CI smoke test (a few minutes)
# Knobs (environment): OUT, N_TRAIN, N_TEST, EPOCHS, MIN_GAIN (smoke: fail unless
# sft_reward >= base_reward + MIN_GAIN), TOOLTRAIN_BIN_DIR (prebuilt binaries).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ "${SMOKE:-0}" == "1" ]]; then
  OUT="${OUT:-runs/sft-synthetic-smoke}"
  N_TRAIN="${N_TRAIN:-160}"
  N_TEST="${N_TEST:-24}"
  EPOCHS="${EPOCHS:-4}"
  MIN_GAIN="${MIN_GAIN:-0.2}"
else
  OUT="${OUT:-runs/sft-synthetic}"
  N_TRAIN="${N_TRAIN:-600}"
  N_TEST="${N_TEST:-100}"
  EPOCHS="${EPOCHS:-6}"
  MIN_GAIN="${MIN_GAIN:-0}"
fi

start=$(date +%s)
scripts/fetch-assets.sh >&2
if [[ -z "${TOOLTRAIN_BIN_DIR:-}" ]]; then
  cargo build --release -p tooltrain-cli --bins >&2
  TOOLTRAIN_BIN_DIR=target/release
fi
T="$TOOLTRAIN_BIN_DIR/tooltrain"
S="$TOOLTRAIN_BIN_DIR/train-sft"

rm -rf "$OUT"
mkdir -p "$OUT"
# Held-out tasks come from another seed: other names, other repositories.
"$T" synth --out "$OUT/train-data" --n "$N_TRAIN" --seed 1 --prefix synthtrain >&2
"$T" synth --out "$OUT/test-data" --n "$N_TEST" --seed 2 --prefix synthtest >&2

"$T" sample --config configs/sample-synthetic.toml \
  --set dataset="$OUT/train-data/dataset.jsonl" --set gt="$OUT/train-data/gt.json" \
  --set repos_dir="$OUT/train-data/repos" --set out="$OUT/sample" >&2

"$S" --config configs/sft-cpu-small.toml \
  --set train_file="$OUT/sample/sft.jsonl" --set output_dir="$OUT/sft" \
  --set epochs="$EPOCHS" >&2
# The untrained model: the same random initialisation, no steps.
"$S" --config configs/sft-cpu-small.toml \
  --set train_file="$OUT/sample/sft.jsonl" --set output_dir="$OUT/base" \
  --set max_steps=0 >&2

eval_model() { # $1 = checkpoint, $2 = out dir
  "$T" eval --config configs/eval-synthetic.toml \
    --dataset "$OUT/test-data/dataset.jsonl" --gt "$OUT/test-data/gt.json" \
    --repos-dir "$OUT/test-data/repos" --out "$2" \
    --set policy.model.path="$1" >&2
  python3 -c 'import json,sys; print("%.4f" % json.load(open(sys.argv[1]))["mean_reward"])' "$2/metrics.json"
}
base=$(eval_model "$OUT/base/final" "$OUT/eval-base")
sft=$(eval_model "$OUT/sft/final" "$OUT/eval-sft")
elapsed=$(( $(date +%s) - start ))
python3 - "$OUT" "$elapsed" <<'EOF' >&2
import json, sys
out, secs = sys.argv[1], int(sys.argv[2])
s = json.load(open(f"{out}/sample/summary.json"))
print(f"sampled {s['sampled']} kept {s['kept']}; run time {secs} s")
for name in ("eval-base", "eval-sft"):
    m = json.load(open(f"{out}/{name}/metrics.json"))
    r = m["report"]["function_strict"]
    print(f"{name}: mean reward {m['mean_reward']:.4f}  Acc@5 {r['acc'][2]:.1f}  nDCG@5 {r['ndcg5']:.1f}  "
          f"tool calls/episode {m['mean_tool_calls']:.2f}  invalid turns {100*m['invalid_turn_rate']:.1f}%")
EOF
if python3 -c 'import sys; b,s,g=map(float,sys.argv[1:]); sys.exit(0 if s >= b + g else 1)' "$base" "$sft" "$MIN_GAIN"; then :; else
  echo "sft_reward $sft is not at least base_reward $base + $MIN_GAIN" >&2
  echo "base_reward=$base sft_reward=$sft"
  exit 1
fi
echo "base_reward=$base sft_reward=$sft"
