#!/usr/bin/env bash
# The GPU check, prepared on a machine without a GPU and run on one that has no Rust
# toolchain and no network (nvcc, PyTorch and transformers only).
#
#   scripts/gpu-check.sh build [BUNDLE]
#       Here: nvcc (scripts/lib-cuda.sh), then a CUDA build (--features cuda, for
#       CUDA_COMPUTE_CAP, default 90: H100/H200) of the test executables that run on
#       every device present (crates/model/tests/{parity,generation}.rs) and of the
#       benchmark (benches/train_gen.rs); stripped and xz-compressed into BUNDLE
#       (default gpu-bundle/, git-ignored), which must stay under 64 MiB: carry it.
#   scripts/gpu-check.sh run [BUNDLE]
#       On the GPU machine, from the repository root: the CUDA tests, then the
#       training-step and decoding benchmarks of tooltrain and of PyTorch on the same
#       shapes (the 12M Qwen2 of benches/qwen2-12m.json and SmolLM2-135M, f32 and
#       bf16), with tokens/s, MFU and peak memory. Writes $OUT (default runs/gpu-check):
#       report.md, bench.jsonl, and one log per part. At most about 8 minutes: each
#       part has its own time limit (tests 90 s, benchmarks 40 s), parts that would
#       end past BUDGET_S are skipped, and a failure does not stop the others (the exit
#       status says whether any failed or were skipped).
#   CPU=1 scripts/gpu-check.sh run [BUNDLE]
#       The same on the CPU with small shapes: exercises the script without a GPU.
#
# Device run (tool `run`): carry gpu-bundle, command `scripts/gpu-check.sh run`.
# Knobs: OUT, CUDA_COMPUTE_CAP, PEAK_TFLOPS_F32 / PEAK_TFLOPS_BF16 (dense peak for the
# MFU; default H200/H100 SXM: 67 / 989), PYTHON, TIME_SCALE (multiplies every limit),
# BUDGET_S (parts that would run past it are skipped; default 420).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

mode="${1:-}"
bundle="${2:-gpu-bundle}"
max_bytes=$((64 * 1024 * 1024))
tests=(parity generation)

die() {
  echo "gpu-check: $*" >&2
  exit 2
}

# The executables that cargo reports for `$@` (JSON messages), as "name path" lines.
executables() {
  cargo "$@" --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["name"], m["executable"])
'
}

build() {
  set -e
  export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
  # shellcheck source=lib-cuda.sh
  source scripts/lib-cuda.sh
  [[ -n "$nvcc_bin" ]] || die "no nvcc (scripts/install-nvcc.sh failed)"
  nvcc --version | tail -n 1 >&2
  # candle-kernels links libcudart (the rest is opened at run time: vendor/README.md);
  # the pip toolkit only has the versioned name, so give the linker an unversioned one.
  local link_dir="$PWD/target/cuda-link"
  mkdir -p "$link_dir"
  local cudart
  cudart=$(find "$CUDA_ROOT/lib" "$CUDA_ROOT/lib64" -maxdepth 1 -name 'libcudart.so*' 2>/dev/null | sort | tail -n 1 || true)
  if [[ -n "$cudart" ]]; then
    ln -sf "$cudart" "$link_dir/libcudart.so"
    export LIBRARY_PATH="$link_dir${LIBRARY_PATH:+:$LIBRARY_PATH}"
  fi
  local args=(--release --features cuda -p tooltrain-model)
  echo "gpu-check: cargo test --no-run ${args[*]} (compute capability $CUDA_COMPUTE_CAP)" >&2
  cargo test --no-run "${args[@]}" "${tests[@]/#/--test=}" >&2
  cargo bench --no-run "${args[@]:1}" --bench train_gen >&2
  rm -rf "$bundle.tmp"
  mkdir -p "$bundle.tmp/bin"
  while read -r name path; do
    cp "$path" "$bundle.tmp/bin/$name"
  done < <(executables test --no-run "${args[@]}" "${tests[@]/#/--test=}"; executables bench --no-run "${args[@]:1}" --bench train_gen)
  for t in "${tests[@]}" train_gen; do
    [[ -f "$bundle.tmp/bin/$t" ]] || die "cargo built no executable named $t"
  done
  strip "$bundle.tmp"/bin/*
  (cd "$bundle.tmp" && tar -cJf bin.tar.xz bin && rm -rf bin)
  {
    echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD -- crates benches || echo ' (with local changes)')"
    echo "built $(date -u +%FT%TZ) on $(hostname)"
    echo "compute capability $CUDA_COMPUTE_CAP; $(nvcc --version | tail -n 1)"
  } >"$bundle.tmp/manifest.txt"
  local size
  size=$(du -sb "$bundle.tmp" | cut -f1)
  if ((size > max_bytes)); then
    die "the bundle is $size bytes, more than 64 MiB: it cannot be carried"
  fi
  rm -rf "$bundle"
  mv "$bundle.tmp" "$bundle"
  echo "gpu-check: $bundle is $((size / 1024 / 1024)) MiB ($size bytes); run it with: scripts/gpu-check.sh run $bundle" >&2
}

# Adds the CUDA libraries the executables link against (cuBLAS, cuRAND, NVRTC) from the
# toolkit and from PyTorch's nvidia-* wheels to LD_LIBRARY_PATH.
cuda_libs() {
  local dirs=()
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [[ -d "$d" ]] && dirs+=("$d")
  done
  # The pip toolkit of scripts/install-nvcc.sh and a project venv, where present.
  for d in "$PWD"/.venv*/lib/python3*/site-packages/nvidia/*/lib; do
    [[ -d "$d" ]] && dirs+=("$d")
  done
  while read -r d; do dirs+=("$d"); done < <("$PY" - <<'PY' 2>/dev/null
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib"))) + sorted(glob.glob(os.path.join(r, "nvidia", "cu*", "lib"))):
        print(d)
PY
  )
  local joined
  joined=$(IFS=:; echo "${dirs[*]}")
  export LD_LIBRARY_PATH="${joined}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

failures=()
# part NAME SECONDS CMD...: runs CMD with a time limit, logs to $OUT/NAME.log. Parts
# that would start after BUDGET_S seconds of the run (default 420) are skipped, so the
# report is written within a device call's limit even when parts hang.
part() {
  local name="$1" limit="$2"
  shift 2
  limit=$(python3 -c "print(max(1, int($limit * ${TIME_SCALE:-1})))")
  if ((SECONDS + limit > ${BUDGET_S:-420} + 60)); then
    echo "| $name | skipped (time budget) | 0s |" >>"$OUT/parts.md"
    failures+=("$name")
    return
  fi
  local t0=$SECONDS
  echo "gpu-check: $name (limit ${limit}s)" >&2
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local took=$((SECONDS - t0))
  if ((rc == 0)); then
    echo "| $name | ok | ${took}s |" >>"$OUT/parts.md"
  else
    [[ $rc == 124 ]] && rc="timeout"
    echo "| $name | FAILED ($rc) | ${took}s |" >>"$OUT/parts.md"
    failures+=("$name")
    tail -n 20 "$OUT/$name.log" >&2
  fi
}

run() {
  # PyTorch: $PYTHON, else the project's venv (scripts/setup-python.sh), else python3
  # (the GPU machine's).
  PY="${PYTHON:-python3}"
  if [[ -z "${PYTHON:-}" && -x .venv/bin/python ]]; then PY=.venv/bin/python; fi
  OUT="${OUT:-runs/gpu-check}"
  mkdir -p "$OUT"
  : >"$OUT/parts.md"
  : >"$OUT/bench.jsonl"
  [[ -f "$bundle/bin.tar.xz" ]] || die "$bundle/bin.tar.xz is missing: run scripts/gpu-check.sh build first"
  local bin="$OUT/bin"
  rm -rf "$bin"
  # tar needs xz; Python's lzma is the fallback.
  tar -xJf "$bundle/bin.tar.xz" -C "$OUT" 2>/dev/null ||
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' \
      "$bundle/bin.tar.xz" "$OUT" || die "cannot unpack $bundle/bin.tar.xz"
  chmod +x "$bin"/*
  export TOOLTRAIN_REPO_ROOT="$PWD"
  local device=cuda
  [[ "${CPU:-0}" == "1" ]] && device=cpu
  # The executables need libcudart (linked) even on the CPU; the rest is opened when used.
  cuda_libs
  {
    echo "# GPU check $(date -u +%FT%TZ)"
    echo
    sed 's/^/    /' "$bundle/manifest.txt"
    echo
    echo "device: $device; $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
    echo "CPU: $(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1), $(nproc) cores"
    echo "torch: $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1 | tail -n 1)"
  } >"$OUT/header.md"
  if [[ "$device" == cuda ]]; then
    ldd "$bin/train_gen" | grep -E "not found" >"$OUT/missing-libs.txt" || true
    if [[ -s "$OUT/missing-libs.txt" ]]; then
      echo "gpu-check: libraries not found (LD_LIBRARY_PATH=$LD_LIBRARY_PATH):" >&2
      cat "$OUT/missing-libs.txt" >&2
    fi
  fi

  # 1. The CUDA tests: every device-generic test runs on the CPU and on CUDA.
  for t in "${tests[@]}"; do
    part "test-$t" 90 "$bin/$t" --test-threads=1
  done

  # 2. Benchmarks: the same shapes on both sides; each line of bench.jsonl is one run.
  local shapes
  if [[ "$device" == cuda ]]; then
    # name, config, train batch x seq, decode batch x prompt + new
    shapes=("qwen2-12m benches/qwen2-12m.json 8 512 32 512 128"
      "smollm2-135m benches/smollm2-135m.json 8 1024 8 1536 128")
  else
    shapes=("qwen2-12m benches/qwen2-12m.json 1 64 2 32 8")
  fi
  for s in "${shapes[@]}"; do
    read -r name cfg b t gb pl nt <<<"$s"
    for dtype in f32 bf16; do
      local common=(--steps 3 --warmup 1 --batch "$b" --seq "$t" --gen-batch "$gb" --prompt-len "$pl" --new-tokens "$nt" --dtype "$dtype")
      for side in tooltrain pytorch; do
        local cmd=("$bin/train_gen")
        [[ $side == pytorch ]] && cmd=("$PY" scripts/bench_torch.py)
        local tag="bench-$side-$name-$dtype" sampler=""
        # Device memory, the same way for both sides: nvidia-smi's used memory, sampled.
        if [[ "$device" == cuda ]] && command -v nvidia-smi >/dev/null; then
          nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$OUT/$tag.mem" 2>/dev/null &
          sampler=$!
        fi
        part "$tag" 40 "${cmd[@]}" --config "$cfg" --device "$device" "${common[@]}"
        [[ -n "$sampler" ]] && kill "$sampler" 2>/dev/null
        if tail -n 1 "$OUT/$tag.log" | "$PY" -c 'import json,sys; json.loads(sys.stdin.read())' 2>/dev/null; then
          tail -n 1 "$OUT/$tag.log" | "$PY" -c '
import json, sys
d = json.loads(sys.stdin.read())
d["shape"], d["side"] = sys.argv[1], sys.argv[2]
try:
    used = [int(x) for x in open(sys.argv[3]).read().split() if x.strip().isdigit()]
    d["gpu_used_mib_peak"] = max(used) - used[0] if used else None
except OSError:
    d["gpu_used_mib_peak"] = None
print(json.dumps(d))' "$name" "$side" "$OUT/$tag.mem" >>"$OUT/bench.jsonl"
        fi
      done
    done
  done

  # 3. The report.
  "$PY" - "$OUT" "${PEAK_TFLOPS_F32:-67}" "${PEAK_TFLOPS_BF16:-989}" <<'PY' >"$OUT/bench.md"
import json, sys
out, peak32, peak16 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
rows = [json.loads(l) for l in open(f"{out}/bench.jsonl") if l.strip()]
def mfu(r):
    # Training FLOPs per token ~ 6 x parameters + 12 x layers x hidden x seq (attention);
    # the parameter count includes the (tied) embedding, a slight overestimate.
    cfg = json.load(open({"qwen2-12m": "benches/qwen2-12m.json", "smollm2-135m": "benches/smollm2-135m.json"}[r["shape"]]))
    flops = 6 * r["params"] + 12 * cfg["num_hidden_layers"] * cfg["hidden_size"] * r["seq"]
    peak = (peak16 if r["dtype"] == "bf16" else peak32) * 1e12
    return 100 * flops * r["train_tokens_per_s"] / peak
print("| shape | dtype | side | train tok/s | MFU % | decode tok/s | train peak MiB | decode peak MiB | GPU used MiB (peak) |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    g = r.get("gpu_used_mib_peak")
    print(f"| {r['shape']} | {r['dtype']} | {r['side']} | {r['train_tokens_per_s']:.0f} | {mfu(r):.1f} "
          f"| {r['gen_tokens_per_s']:.0f} | {r['train_peak_bytes'] / 2**20:.0f} | {r['gen_peak_bytes'] / 2**20:.0f} "
          f"| {'-' if g is None else g} |")
print()
by = {(r["shape"], r["dtype"], r["side"]): r for r in rows}
for (shape, dtype, side), r in by.items():
    o = by.get((shape, dtype, "pytorch"))
    if side == "tooltrain" and o and o["train_tokens_per_s"] and o["gen_tokens_per_s"]:
        print(f"- {shape} {dtype}: training {r['train_tokens_per_s'] / o['train_tokens_per_s']:.2f}x PyTorch, "
              f"decoding {r['gen_tokens_per_s'] / o['gen_tokens_per_s']:.2f}x HF generate")
print()
print("Peak memory: tooltrain reports its process's peak RSS (host memory, also on CUDA),")
print("PyTorch its peak allocated CUDA memory on a GPU and peak RSS on a CPU. The last column")
print("is the same for both: the GPU's used memory (nvidia-smi, every 100 ms) above its level")
print("at the start of the run.")
PY
  {
    cat "$OUT/header.md"
    echo
    echo "| part | result | time |"
    echo "|---|---|---|"
    cat "$OUT/parts.md"
    echo
    cat "$OUT/bench.md"
  } >"$OUT/report.md"
  cat "$OUT/report.md"
  if ((${#failures[@]} > 0)); then
    echo "gpu-check: failed: ${failures[*]}" >&2
    exit 1
  fi
}

case "$mode" in
  build) build ;;
  run) run ;;
  *) die "usage: scripts/gpu-check.sh build|run [BUNDLE]  (CPU=1 for a CPU run)" ;;
esac
