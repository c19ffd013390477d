#!/usr/bin/env bash
# A short SFT run of the real SmolLM2-135M-Instruct on real SWE-bench-derived
# trajectories, on a CPU:
#   fetch the GGUF -> convert it to a HF directory (its tokenizer and chat template)
#   -> prepare the CI set's trees from PyPI releases -> sample oracle trajectories
#   (configs/sample-oracle-swebench.toml, recorded with SmolLM2's tokenizer)
#   -> train-sft (configs/sft-smollm2-swebench.toml) uninterrupted
#   -> the same run stopped half-way (a checkpoint, as if preempted) and resumed
#   -> the exported HF model answers a prompt.
# Prints the loss of every step of both runs, checks that they are identical and that
# the loss went down, and reports the run times.
#
#   scripts/sft-smollm2.sh
# Knobs (environment): OUT (default runs/sft-smollm2), STEPS (default 6),
# TOOLTRAIN_BIN_DIR (prebuilt binaries).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT="${OUT:-runs/sft-smollm2}"
STEPS="${STEPS:-6}"
HALF=$(( STEPS / 2 ))

start=$(date +%s)
source scripts/lib-binaries.sh
TOOLTRAIN="$T" scripts/prepare-ci-repos.sh >&2

rm -rf "$OUT"
mkdir -p "$OUT"
"$T" sample --config configs/sample-oracle-swebench.toml \
  --set tokenizer=assets/smollm2-hf --set samples=2 --set out="$OUT/sample" >&2

common=(--config configs/sft-smollm2-swebench.toml --set train_file="$OUT/sample/sft.jsonl"
  --set max_steps="$STEPS" --set save_every="$HALF")
t0=$(date +%s)
"$S" "${common[@]}" --set output_dir="$OUT/full" >&2
t1=$(date +%s)
# Stopped half-way with a checkpoint (as a preempted job), then resumed.
"$S" "${common[@]}" --set output_dir="$OUT/resumed" --set stop_at_step="$HALF" >&2
if [[ -e "$OUT/resumed/final" ]]; then
  echo "the run stopped at step $HALF exported a final model" >&2
  exit 1
fi
"$S" "${common[@]}" --set output_dir="$OUT/resumed" --resume >&2
t2=$(date +%s)

"$T" generate --model "$OUT/full/final" --cpu --temperature 0 --max-new-tokens 24 \
  --prompt "Which file defines the class Session in the requests package?" > "$OUT/generate.txt"

python3 - "$OUT" "$(( t1 - t0 ))" "$(( t2 - t1 ))" "$(( $(date +%s) - start ))" <<'EOF'
import json, sys
out, full_s, resumed_s, total_s = sys.argv[1], *map(int, sys.argv[2:])
def losses(run):
    return [json.loads(l) for l in open(f"{out}/{run}/metrics.jsonl") if '"loss"' in l]
full, resumed = losses("full"), losses("resumed")
s = json.load(open(f"{out}/sample/summary.json"))
rows = [json.loads(l) for l in open(f"{out}/sample/sft.jsonl")]
ntok = [len(r["input_ids"]) for r in rows]
print(f"data: {s['kept']} of {s['sampled']} oracle trajectories kept, {min(ntok)}-{max(ntok)} tokens")
for a in full:
    print(f"step {a['step']}: loss {a['loss']:.4f}  grad_norm {a['grad_norm']:.3f}  {a['tokens_per_s']:.0f} tokens/s")
fl = [round(a["loss"], 6) for a in full]
rl = [round(a["loss"], 6) for a in resumed if a["step"] > 0]
print(f"uninterrupted {full_s} s; stopped at step {len(rl)//2} and resumed {resumed_s} s; total {total_s} s")
print("generate:", open(f"{out}/generate.txt").read().strip()[:200].replace("\n", " "))
ok = True
if fl != rl:
    print(f"resumed losses {rl} differ from uninterrupted {fl}"); ok = False
if not fl[-1] < fl[0]:
    print(f"the loss did not go down: {fl[0]} -> {fl[-1]}"); ok = False
print(f"loss {fl[0]:.4f} -> {fl[-1]:.4f}; resumed run identical: {fl == rl}")
sys.exit(0 if ok else 1)
EOF
