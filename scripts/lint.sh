#!/usr/bin/env bash
# Lint and format checks: ruff (Python) and clang-format (csrc/, the CUDA emulation).
# Installs the pinned linters into the project's venv if they are missing.
#   --fix   rewrite the files instead of failing on a difference
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
RUFF_SPEC=ruff==0.17.6
CLANG_FORMAT_SPEC=clang-format==23.1.5
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
if ! "$VENV/bin/ruff" --version 2>/dev/null | grep -q "${RUFF_SPEC#ruff==}" ||
   ! "$VENV/bin/clang-format" --version 2>/dev/null | grep -q "${CLANG_FORMAT_SPEC#clang-format==}"; then
  "$VENV/bin/pip" install -q --disable-pip-version-check "$RUFF_SPEC" "$CLANG_FORMAT_SPEC"
fi
mapfile -t CXX < <(git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' 'tests/cuda_emulation/*.cpp')
if [ "${1:-}" = "--fix" ]; then
  "$VENV/bin/ruff" check --fix .
  "$VENV/bin/ruff" format .
  "$VENV/bin/clang-format" -i "${CXX[@]}"
  exit 0
fi
echo "== ruff check"
"$VENV/bin/ruff" check .
echo "== ruff format --check"
"$VENV/bin/ruff" format --check .
echo "== clang-format (${#CXX[@]} files)"
"$VENV/bin/clang-format" --dry-run -Werror "${CXX[@]}"
echo "== lint ok"
