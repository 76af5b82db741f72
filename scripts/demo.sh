#!/usr/bin/env bash
# One command on a fresh machine: set up (scripts/setup.sh), then run the demo.
# Extra arguments go to the demo, e.g. `bash scripts/demo.sh --epochs 3`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
exec "$VENV/bin/python" -P examples/demo.py "$@"
