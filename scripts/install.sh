#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install scvi-cli into it with pinned versions.
# The constraints file pins torch to its CPU build: an unpinned torch pulls GBs of CUDA packages.
# usage: scripts/install.sh [VENV_DIR] [EXTRAS]     (defaults: .venv, "test")
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
extras="${2:-test}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -c requirements/constraints.txt -e ".[${extras}]"
"$venv/bin/python" -c "import scvi_cli, torch; print(f'scvi-cli {scvi_cli.__version__} with torch {torch.__version__} in $venv')"
