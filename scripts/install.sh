#!/usr/bin/env bash
# Install the project (editable) with the given extras, e.g. `bash scripts/install.sh dev`.
#
# PyTorch: if torch is already installed it is kept. Otherwise, when pip can see a torch wheel
# locally (its find-links, e.g. a machine-provided CPU build), that wheel is installed first, so
# that a CPU-only machine does not pull the multi-GB CUDA build from the package index.
# Anywhere else pip resolves torch as usual (set PIP_INDEX_URL / PIP_EXTRA_INDEX_URL to choose).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
pip=(python -m pip install --quiet --disable-pip-version-check)
if ! python -c "import torch" >/dev/null 2>&1; then
  # --no-index: only local wheels (find-links); --no-deps: torch's own deps come with the step below.
  "${pip[@]}" --no-index --no-deps torch >/dev/null 2>&1 || true
fi
if [ -n "$extras" ]; then
  "${pip[@]}" -e ".[${extras}]"
else
  "${pip[@]}" -e .
fi
