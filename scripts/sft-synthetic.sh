#!/usr/bin/env bash
# The whole SFT pipeline on synthetic tasks, from a clean checkout, on a CPU:
#   synth (train + held-out tasks, configs/synth-easy.json) -> sample (scripted teacher,
#   configs/sample-synthetic.toml) -> train-sft -> eval of the model before and after SFT
#   (configs/eval-synthetic.toml)
# The last line is `base_reward=X sft_reward=Y` (mean held-out nDCG@5).
#
#   scripts/sft-synthetic.sh            # the documented longer run
#   SMOKE=1 scripts/sft-synthetic.sh    # the CI smoke test (8 held-out tasks, a gain >= 0.25)
#   MODEL=tiny scripts/sft-synthetic.sh # a 7M-parameter Qwen2 from scratch instead
# MODEL=smollm2 (default) fine-tunes the real SmolLM2-135M-Instruct
# (configs/sft-smollm2-synthetic.toml); its base is the model as released. MODEL=tiny
# trains configs/sft-cpu-small.toml from a random initialisation, its base.
# Knobs (environment): OUT, N_TRAIN, N_TEST, MIN_GAIN (fail unless
# sft_reward >= base_reward + MIN_GAIN), TOOLTRAIN_BIN_DIR (prebuilt binaries).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MODEL="${MODEL:-smollm2}"
if [[ "${SMOKE:-0}" == "1" ]]; then
  OUT="${OUT:-runs/sft-synthetic-smoke}"
  N_TRAIN="${N_TRAIN:-16}"
  N_TEST="${N_TEST:-8}"
  MIN_GAIN="${MIN_GAIN:-0.25}"
else
  OUT="${OUT:-runs/sft-synthetic}"
  N_TRAIN="${N_TRAIN:-16}"
  N_TEST="${N_TEST:-16}"
  MIN_GAIN="${MIN_GAIN:-0}"
fi
case "$MODEL" in
  smollm2) SFT_CONFIG=configs/sft-smollm2-synthetic.toml ;;
  tiny) SFT_CONFIG=configs/sft-cpu-small.toml ;;
  *) echo "MODEL must be smollm2 or tiny, not '$MODEL'" >&2; exit 2 ;;
esac

start=$(date +%s)
source scripts/lib-binaries.sh

rm -rf "$OUT"
mkdir -p "$OUT"
# Held-out tasks come from another seed: other repositories and bug reports.
"$T" synth --config configs/synth-easy.json --out "$OUT/train-data" --n "$N_TRAIN" --seed 1 --prefix synthtrain >&2
"$T" synth --config configs/synth-easy.json --out "$OUT/test-data" --n "$N_TEST" --seed 2 --prefix synthtest >&2

"$T" sample --config configs/sample-synthetic.toml \
  --set dataset="$OUT/train-data/dataset.jsonl" --set gt="$OUT/train-data/gt.json" \
  --set repos_dir="$OUT/train-data/repos" --set out="$OUT/sample" >&2

"$S" --config "$SFT_CONFIG" \
  --set train_file="$OUT/sample/sft.jsonl" --set output_dir="$OUT/sft" >&2
if [[ "$MODEL" == "tiny" ]]; then
  # The untrained model: the same random initialisation, no steps.
  "$S" --config "$SFT_CONFIG" \
    --set train_file="$OUT/sample/sft.jsonl" --set output_dir="$OUT/base" \
    --set max_steps=0 >&2
  BASE="$OUT/base/final"
else
  BASE=assets/smollm2-hf
fi

eval_model() { # $1 = checkpoint, $2 = out dir
  "$T" eval --config configs/eval-synthetic.toml \
    --dataset "$OUT/test-data/dataset.jsonl" --gt "$OUT/test-data/gt.json" \
    --repos-dir "$OUT/test-data/repos" --out "$2" \
    --set policy.model.path="$1" >&2
  python3 -c 'import json,sys; print("%.4f" % json.load(open(sys.argv[1]))["mean_reward"])' "$2/metrics.json"
}
base=$(eval_model "$BASE" "$OUT/eval-base")
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
