#!/usr/bin/env bash
# Set up the virtualenv with every extra the tests need, lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[train,export,cpu,plot,dev]'
"$VENV/bin/ruff" check .
"$VENV/bin/python" -m pytest "$@"
