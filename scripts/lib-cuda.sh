# Sourced (from the repository root) by .ci/run and scripts/gpu-check.sh: finds an nvcc
# (the system's, else one installed from PyPI by scripts/install-nvcc.sh into
# .venv-cuda), puts it on PATH and exports the toolkit root under the names the build
# scripts (cudarc, bindgen_cuda) look for. Without a GPU, candle-kernels cannot ask
# nvidia-smi for the compute capability: CUDA_COMPUTE_CAP names one (default 80; set 90
# for H100/H200). Sets nvcc_bin to nvcc's directory, or to "" when there is none.
nvcc_bin=""
if command -v nvcc >/dev/null 2>&1; then
  nvcc_bin="$(dirname "$(command -v nvcc)")"
elif nvcc_bin="$(scripts/install-nvcc.sh)"; then
  export PATH="$nvcc_bin:$PATH"
else
  nvcc_bin=""
fi
if [[ -n "$nvcc_bin" ]]; then
  cuda_root="$(cd "$nvcc_bin/.." && pwd)"
  # The toolkit root is the directory above bin/ (it holds include/cuda.h).
  export CUDA_ROOT="${CUDA_ROOT:-$cuda_root}"
  export CUDA_PATH="${CUDA_PATH:-$cuda_root}"
  export CUDA_HOME="${CUDA_HOME:-$cuda_root}"
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
  fi
fi
