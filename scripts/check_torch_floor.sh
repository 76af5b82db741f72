#!/usr/bin/env bash
# The oldest torch varlen_rnn supports, checked: torch 2.11.0+cu130 on Python 3.12, the GPU
# machines' pair (PyPI's torch 2.11.0 is that build; Python 3.12 where this machine has it, else
# python3). In a virtual environment of its own (default .venv-floor) it builds
# the extension against that torch, CPU and CUDA kernels (sm_90, as benchmarks/gpu_check.sh builds
# on the GPU machine), in a copy of the tracked files, then checks those kernels' registers and
# runs the tests that lean hardest on torch's own APIs: torch.compile and export, autocast,
# torch.library (opcheck), nested tensors, torch.func, jit tracing, ONNX, DDP, torch's ModuleInfo
# data. So a change that only works on the newest torch fails here, not on the GPU machine, whose
# time is short.
#   FLOOR_VENV=path   where the environment lives (default: .venv-floor in the repository)
#   TORCH_FLOOR       the torch to install (default: torch==2.11.0)
#   PYTHON            the interpreter of the environment (default: python3.12, else python3)
#   TORCH_CUDA_ARCH_LIST  the CUDA kernels' architectures (default: 9.0)
#   FLOOR_WORK        the folder of the build (kept; a later run reuses a build of the same
#                     commit and changes there); default: a temporary folder, removed after
# Arguments go to pytest. .ci/run runs this in the background, niced, beside the main suite.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FLOOR_VENV:-.venv-floor}
TORCH_FLOOR=${TORCH_FLOOR:-torch==2.11.0}
pick_python() {  # a Python 3.12 that runs (a pyenv shim may exist and refuse), else python3
  for p in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    if "$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$p"
      return
    fi
  done
  echo python3
}
PY=${PYTHON:-$(pick_python)}
start=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV ($("$PY" --version))"
  "$PY" -m venv "$VENV"
fi
VENV=$(cd "$VENV" && pwd)
echo "== installing $TORCH_FLOOR and the test dependencies"
"$VENV/bin/pip" install -q --disable-pip-version-check "$TORCH_FLOOR" ninja pybind11 pytest numpy \
  hypothesis expecttest setuptools wheel "onnx==1.23.2" "onnxscript==0.7.2" "onnxruntime==1.32.0"
# cuobjdump for the register check of this build's kernels (as scripts/setup.sh).
if "$VENV/bin/python" -c 'import sys, torch; sys.exit(not (torch.version.cuda or "").startswith("13."))'; then
  "$VENV/bin/pip" install -q --disable-pip-version-check "nvidia-cuda-cuobjdump==13.5.37"
fi
echo "== installed in $(($(date +%s) - start)) s"
# The architecture of the CUDA kernels, for the build and the register check.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"

if [ -n "${FLOOR_WORK:-}" ]; then
  mkdir -p "$FLOOR_WORK"
  work=$(cd "$FLOOR_WORK" && pwd)
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi
# What the build is of: the commit and the working tree's changes.
source_id="$TORCH_FLOOR $TORCH_CUDA_ARCH_LIST $(git rev-parse HEAD)"
source_id+=" $(git status --porcelain | md5sum | cut -c1-12)"
if [ -f "$work/.floor_built" ] && [ "$(cat "$work/.floor_built")" = "$source_id" ]; then
  echo "== reusing the build in $work (built against $TORCH_FLOOR)"
else
  rm -f "$work/.floor_built"
  git ls-files -z | xargs -0 cp --parents -t "$work"
  echo "== building against $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')" \
    "(CPU and CUDA kernels, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  built=$(date +%s)
  (cd "$work" && MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$VENV/bin/python" setup.py -q build_ext \
    --inplace >"$work/build.log" 2>&1) ||
    { tail -50 "$work/build.log"; echo "== the build against $TORCH_FLOOR failed"; exit 1; }
  echo "== built in $(($(date +%s) - built)) s"
  echo "$source_id" >"$work/.floor_built"
fi
cd "$work"
# The register check reads this build's binary (CI's main build has the sm_80 kernels, this one
# sm_90's). Left out, as the main suite runs them against the newest torch and they test our code
# rather than torch's APIs (on CI's 2-core Zen 3, in the main suite's timing): the aarch64
# syntax check (63 s), the LSTM's and RNN's double backward through torch's ModuleInfo data
# (48 s; the GRU's stays), and the cell ops' gradgradcheck, gradcheck on padded
# rows and workspace-deciding tests (44 s; their opcheck and torch.compile tests stay).
PYTHONPATH="$work" VARLEN_RNN_SKIP_EMULATION=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  --basetemp "$work/.pytest-tmp" \
  tests/test_build.py tests/test_module.py tests/test_module_db.py tests/test_autocast.py \
  tests/test_cells_autocast.py tests/test_export.py tests/test_opcheck.py tests/test_cells_ops.py \
  tests/test_ragged.py tests/test_higher_order.py tests/test_small_calls.py tests/test_onnx.py \
  tests/test_ddp.py \
  --deselect tests/test_build.py::test_cpu_sources_compile_for_aarch64 \
  --deselect "tests/test_module_db.py::test_gradgrad[LSTM" \
  --deselect "tests/test_module_db.py::test_gradgrad[RNN" \
  --deselect tests/test_cells_ops.py::test_gradgradcheck_op \
  --deselect tests/test_cells_ops.py::test_gradcheck_padded_op \
  --deselect tests/test_cells_ops.py::test_op_deciding_workspace "$@"
echo "== $TORCH_FLOOR: passed in $(($(date +%s) - start)) s"
