#!/usr/bin/env bash
# Create ./.venv (git-ignored) with the Python packages used to regenerate the
# fixtures in data/fixtures/ (scripts/make_fixtures.py) and to run the PyTorch
# reference benchmark (scripts/bench_torch.py). Not needed for building or CI.
#
# (accelerate is required by transformers to load GGUF files.)
# Versions are pinned to the ones the committed fixtures were generated with.
# Usage (from anywhere): scripts/setup-python.sh   [PYTHON=python3.11]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV=".venv"

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup-python: creating $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
else
  echo "setup-python: $VENV exists, reusing"
fi

"$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install --disable-pip-version-check \
  "torch==2.15.0" \
  "transformers==5.23.0" \
  "tokenizers==0.23.3" \
  "gguf==0.19.0" \
  "numpy==2.4.6" \
  "safetensors==0.8.0" \
  "sentencepiece==0.2.3" \
  "Jinja2==3.1.6" \
  "accelerate==1.15.0"

"$VENV/bin/python" -c 'import torch, transformers, gguf, numpy, safetensors; print("setup-python: torch", torch.__version__, "transformers", transformers.__version__, "gguf", gguf.__version__ if hasattr(gguf, "__version__") else "?", "numpy", numpy.__version__, "safetensors", safetensors.__version__)'
echo "setup-python: done. Use PYTHON=$VENV/bin/python"
