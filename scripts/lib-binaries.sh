# Sourced by the pipeline scripts (scripts/sft-*.sh), from the repository root: fetches
# the assets, builds the release binaries unless TOOLTRAIN_BIN_DIR names prebuilt ones,
# sets T (tooltrain) and S (train-sft), and converts the bundled SmolLM2 GGUF into the
# HF directory assets/smollm2-hf (its tokenizer and chat template) when missing.
scripts/fetch-assets.sh >&2
if [[ -z "${TOOLTRAIN_BIN_DIR:-}" ]]; then
  cargo build --release -p tooltrain-cli --bins >&2
  TOOLTRAIN_BIN_DIR=target/release
fi
T="$TOOLTRAIN_BIN_DIR/tooltrain"
S="$TOOLTRAIN_BIN_DIR/train-sft"
if [[ ! -f assets/smollm2-hf/config.json ]]; then
  "$T" convert --model assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --output assets/smollm2-hf >&2
fi
