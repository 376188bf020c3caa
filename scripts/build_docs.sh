#!/usr/bin/env bash
# Build the documentation site into docs/_build/html: Sphinx + MyST-NB, warnings as errors
# (-W, nitpicky -n), every notebook page executed (a cell that raises fails the build).
#   bash scripts/build_docs.sh            # build (the docs extra must be installed)
#   bash scripts/build_docs.sh --install  # pip install -e ".[docs]" first (CI does this)
# GENAILAB_DOCS_EXECUTE=cache reuses the outputs of unchanged notebooks from
# docs/_build/.jupyter_cache (for editing; the default, force, runs every notebook).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ "${1:-}" = "--install" ]; then
    "$PYTHON" -m pip install -e ".[docs]"
fi
started=$(date +%s)
# -E: read every page again, so every notebook runs against the code as it is now.
"$PYTHON" -m sphinx -b html -E -W --keep-going -n docs docs/_build/html
echo "docs built in $(( $(date +%s) - started )) s: docs/_build/html/index.html"
