#!/usr/bin/env bash
# One command on a fresh machine: set up (scripts/setup.sh), then run the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k parity`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
# pytest (not `python -m pytest`) so the installed package is imported, not the source tree.
exec "$VENV/bin/pytest" tests -q "$@"
