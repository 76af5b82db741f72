#!/usr/bin/env bash
# Sets up a fresh machine for varlen_rnn: a virtual environment with torch and the
# test/demo dependencies, then builds and installs the package (C++ kernels, and
# the CUDA kernels when torch has CUDA and a toolkit is found).
#   VENV=path   where the environment lives (default: .venv in the repository)
#   TORCH_SPEC  the torch to install (default: torch==2.14.1)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PY" -m venv "$VENV"
fi
echo "== installing $TORCH_SPEC and the test/demo/ONNX dependencies"
# onnx, onnxscript, onnxruntime: the `onnx` extra (varlen_rnn.onnx, tests/test_onnx.py).
"$VENV/bin/pip" install -q --disable-pip-version-check "$TORCH_SPEC" ninja pybind11 pytest numpy \
  hypothesis expecttest matplotlib setuptools wheel "wordfreq==3.1.1" \
  "onnx==1.23.2" "onnxscript==0.7.2" "onnxruntime==1.32.0"
# cuobjdump, for tests/test_build.py's check of the built CUDA kernels' registers (the toolkit
# here has nvcc and ptxas only): a small wheel, with a CUDA 13 torch only.
if "$VENV/bin/python" -c 'import sys, torch; sys.exit(not (torch.version.cuda or "").startswith("13."))'; then
  "$VENV/bin/pip" install -q --disable-pip-version-check "nvidia-cuda-cuobjdump==13.5.37"
fi
echo "== building and installing varlen_rnn (this compiles the C++/CUDA kernels)"
start=$(date +%s)
MAX_JOBS=${MAX_JOBS:-$(nproc)} "$VENV/bin/pip" install -q --disable-pip-version-check \
  --no-build-isolation --no-deps .
echo "== built in $(( $(date +%s) - start )) s"
"$VENV/bin/python" -P -c "import varlen_rnn, torch; print('varlen_rnn', varlen_rnn.__version__, 'torch', torch.__version__, 'cuda kernels built:', varlen_rnn.WITH_CUDA)"
