#!/usr/bin/env bash
# Install scvi-cli with its test extras into a virtual environment, then run the test suite.
# usage: scripts/test.sh [VENV_DIR] [PYTEST_ARGS...]      (default venv: .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
shift || true
scripts/install.sh "$venv" test
"$venv/bin/python" -m pytest -q "$@"
