#!/usr/bin/env bash
# Install scvi-cli with its test extras into a virtual environment, then run the test suite.
# usage: scripts/test.sh [VENV_DIR] [PYTEST_ARGS...]      (default venv: .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
shift || true
scripts/install.sh "$venv" test
# The Snakemake example runs in the tests; snakemake gets its own pinned environment because
# its dependency pins differ from ours.
if [ ! -x .venv-snakemake/bin/snakemake ]; then
    "${PYTHON:-python3}" -m venv .venv-snakemake
    .venv-snakemake/bin/python -m pip install --quiet --disable-pip-version-check -r requirements/snakemake.txt
fi
"$venv/bin/python" -m pytest -q "$@"
