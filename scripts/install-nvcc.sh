#!/usr/bin/env bash
# Install the CUDA compiler (nvcc), headers and runtime libraries from PyPI into a
# git-ignored virtual environment at ./.venv-cuda, then print the directory that
# contains the `nvcc` executable (its parent holds include/cuda.h: use it as
# CUDA_ROOT / CUDA_PATH).
#
#   bin="$(scripts/install-nvcc.sh)"
#   export PATH="$bin:$PATH" CUDA_ROOT="$(dirname "$bin")" CUDA_PATH="$(dirname "$bin")"
#
# Run from anywhere; idempotent (an existing install is reused). Messages go to
# stderr so that stdout is only the directory. Override the interpreter with PYTHON=...
set -euo pipefail

PYTHON="${PYTHON:-python3}"
SPEC='cuda-toolkit[nvcc,cudart,crt,nvvm,cccl,cublas,curand]==13.0.*'

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="$PWD/.venv-cuda"

find_nvcc() {
  find "$VENV" -path '*/site-packages/nvidia/*' -type f -name nvcc -perm -u+x 2>/dev/null | head -n1
}

nvcc_path="$(find_nvcc || true)"
if [[ -z "$nvcc_path" ]]; then
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "install-nvcc: creating $VENV" >&2
    "$PYTHON" -m venv "$VENV" >&2
  fi
  echo "install-nvcc: pip install $SPEC" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir "$SPEC" >&2
  nvcc_path="$(find_nvcc || true)"
fi
if [[ -z "$nvcc_path" ]]; then
  echo "install-nvcc: nvcc not found under $VENV after installing $SPEC" >&2
  exit 1
fi
bin="$(dirname "$nvcc_path")"
root="$(dirname "$bin")"
if [[ ! -f "$root/include/cuda.h" ]]; then
  echo "install-nvcc: $root/include/cuda.h is missing" >&2
  exit 1
fi
echo "$bin"
