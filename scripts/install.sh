#!/usr/bin/env bash
# Install genailab and its test tools into the current Python environment.
# PyTorch is installed first only when it is missing, pinned to a release whose CPU build
# some machines keep locally; a machine that already has torch keeps its own build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    "$PYTHON" -m pip install "torch==2.13.0"
fi
"$PYTHON" -m pip install -e ".[test,loom]"
