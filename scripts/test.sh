#!/usr/bin/env bash
# Set up the virtualenv with every extra the tests need, lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh train,export,cpu,plot,dev
"$VENV/bin/ruff" check .
"$VENV/bin/python" -m pytest "$@"
