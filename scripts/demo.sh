#!/usr/bin/env bash
# One command on a fresh machine: set up (scripts/setup.sh), then run the demo.
# Extra arguments go to the demo, e.g. `bash scripts/demo.sh --epochs 3`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
# Not -P: the script imports demo_data from its own folder; the installed varlen_rnn is imported
# (the script's folder, not the repository root, comes first on sys.path).
exec "$VENV/bin/python" examples/demo.py "$@"
