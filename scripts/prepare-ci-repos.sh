#!/usr/bin/env bash
# Build the CI set's source trees: the SWE-bench Verified instances of
# data/ci/instances.txt, from the PyPI releases pinned in data/ci/pypi-manifest.json
# (sha256-checked), into assets/repos-ci/<instance_id>/ (git-ignored). Resumable: trees
# already there are skipped. Downloads (about 6 MB) are cached in assets/repos-ci/.cache.
#
#   scripts/prepare-ci-repos.sh                 # builds target/release/tooltrain first
#   TOOLTRAIN=path/to/tooltrain scripts/prepare-ci-repos.sh
#   REPOS_DIR=/somewhere/else scripts/prepare-ci-repos.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -z "${TOOLTRAIN:-}" ]]; then
  cargo build --release -p tooltrain-cli
  TOOLTRAIN=target/release/tooltrain
fi
repos_dir="${REPOS_DIR:-assets/repos-ci}"

"$TOOLTRAIN" repos prepare \
  --dataset data/swebench/swebench_verified.jsonl \
  --instances-file data/ci/instances.txt \
  --manifest data/ci/pypi-manifest.json \
  --source pypi \
  --repos-dir "$repos_dir" \
  --jobs 4 \
  --min-free-gb 1
