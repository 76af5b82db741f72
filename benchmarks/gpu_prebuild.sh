#!/usr/bin/env bash
# Builds here, where device time is not spent, the extension benchmarks/gpu_check.sh would build on
# the GPU machine (../shared/GPU.md: Python 3.12, torch 2.11.0+cu130, sm_90), with the build's log
# (ptxas -v, which the check's resources stage reads) and the sources' fingerprint:
#
#   bash benchmarks/gpu_prebuild.sh [DIR]    # default build/gpu_prebuilt; about 4 minutes on 2 cores
#
# Then pass DIR (relative to the repository) in the device tool's `carry`; gpu_check.sh's build
# stage copies it in when the fingerprint, the Python version and torch match, and builds as
# before when they do not or the extension does not load there. The sources built are the working
# tree's (tracked files and untracked ones git does not ignore: what the device tool copies).
# Environment: GPU_PYTHON (default python3.12), GPU_TORCH (default torch==2.11.0), GPU_VENV
# (default .venv-gpu), MAX_JOBS, TORCH_CUDA_ARCH_LIST (default 9.0).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=benchmarks/gpu_prebuilt.sh
. "$REPO/benchmarks/gpu_prebuilt.sh"
DIR="${1:-$REPO/build/gpu_prebuilt}"
VENV="${GPU_VENV:-$REPO/.venv-gpu}"
if [ ! -x "$VENV/bin/python" ]; then
  py="${GPU_PYTHON:-python3.12}"
  # pyenv's shim answers "command not found" for a version not selected: take it from pyenv's tree
  if ! "$py" --version >/dev/null 2>&1 && [ -z "${GPU_PYTHON:-}" ]; then
    py="$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)"
  fi
  [ -n "$py" ] && "$py" --version >/dev/null 2>&1 ||
    { echo "== no Python 3.12 found: set GPU_PYTHON"; exit 1; }
  echo "== creating $VENV with $py"
  "$py" -m venv "$VENV"
fi
echo "== installing ${GPU_TORCH:-torch==2.11.0} and the build's dependencies into $VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check "${GPU_TORCH:-torch==2.11.0}" ninja pybind11 \
  numpy setuptools wheel
src="$(mktemp -d)"
trap 'rm -rf "$src"' EXIT
(cd "$REPO" && git ls-files -z -co --exclude-standard | tar --null -T - -cf -) | tar -C "$src" -xf -
echo "== building in $src (log: $DIR/build.log)"
start=$SECONDS
if ! build_gpu_extension "$src" "$VENV/bin/python" >"$src/build.log" 2>&1; then
  grep -E -m 20 "error|Error" "$src/build.log" || true  # the compiler's errors, above the traceback
  tail -40 "$src/build.log"
  echo "== the build failed"
  exit 1
fi
rm -rf "$DIR" && mkdir -p "$DIR"
cp "$src"/varlen_rnn/_C*.so "$src/varlen_rnn/_build_info.py" "$src/build.log" "$DIR/"
sources_fingerprint "$src" >"$DIR/fingerprint"
[ "$(cat "$DIR/fingerprint")" = "$(sources_fingerprint "$REPO")" ] ||
  { echo "== the sources changed during the build: run it again"; exit 1; }
why="$(prebuilt_usable "$DIR" "$REPO" "$VENV/bin/python")" || { echo "== not usable: $why"; exit 1; }
echo "== built in $((SECONDS - start)) s: $DIR ($(du -sh "$DIR" | cut -f1)); carry it, e.g."
echo "   run(command=..., carry=[\"${DIR#"$REPO"/}\"])"
