#!/usr/bin/env bash
# varlen_rnn's CPU extension built with clang instead of GCC, and its tests run against that build.
# Clang is the compiler of macOS and of some Linux builds (CC=clang); GCC builds everything else
# here, so what only clang trips on is otherwise never seen: clang 16 crashed (a stack overflow in
# its optimizer) on the bfloat16 products and refused an asm operand GCC takes; its
# target_clones wanted the attribute on every declaration, and its resolver took
# "arch=x86-64-v4" for a CPU model (the gate passes ran their baseline clone on AVX-512); it
# split the AVX-512 micro-kernel's vectors in two; its -fopenmp would bring LLVM's OpenMP
# runtime beside the libgomp torch loads (setup.py and csrc/cpu/team.h say what each does now).
#
#   bash scripts/check_clang.sh [pytest arguments]   # default: CLANG_TESTS below
#
# Needs Debian (clang-$CLANG_VERSION from apt, installed when missing; root) and the venv of
# scripts/setup.sh (PYTHON, default .venv/bin/python). A copy of the tracked files with the clang
# build in varlen_rnn/ lives in CLANG_WORK (default .clang, ignored by git) and is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VERSION=${CLANG_VERSION:-16}
WORK=${CLANG_WORK:-.clang}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
SRC=$WORK/src
PY=${PYTHON:-.venv/bin/python}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
start=$(date +%s)
say() { echo "== [$(($(date +%s) - start)) s] $*"; }
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

if ! command -v "clang++-$VERSION" >/dev/null; then
  say "installing clang-$VERSION"
  apt_install "clang-$VERSION"
fi

# The tracked files as they are in the working tree; build/ stays, so ninja rebuilds only what changed.
say "copying the tracked files into $SRC"
mkdir -p "$SRC"
find "$SRC" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
copy_tracked "$REPO" "$SRC"

say "building the CPU extension with clang++-$VERSION"
(cd "$SRC" && CC="clang-$VERSION" CXX="clang++-$VERSION" VARLEN_RNN_CUDA=0 \
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py -q build_ext --inplace 2>&1 |
  grep -v -e "No CUDA runtime is found" -e "^\[[0-9]*/[0-9]*\] " || true)
so=$(ls "$SRC"/varlen_rnn/_C*.so)
grep -q "WITH_CUDA = False" "$SRC/varlen_rnn/_build_info.py"
# What the build must be: no OpenMP runtime of its own (the teams call torch's, weakly bound) and
# no libtorch_python.so (a C++ program loads it without Python: test_export's AOTInductor runner).
needed=$(readelf -d "$so" | grep NEEDED || true)
if grep -q -e libomp -e libgomp -e libiomp -e libtorch_python <<<"$needed"; then
  echo "$needed"
  echo "== the clang build links an OpenMP runtime or libtorch_python.so"
  exit 1
fi
symbols=$(nm -D "$so")
grep -q " w GOMP_parallel$" <<<"$symbols" || { echo "== no weak GOMP_parallel in the build"; exit 1; }

CLANG_TESTS=${CLANG_TESTS:-tests/test_parity.py tests/test_cpu_row_groups.py tests/test_cpu_small_gemm.py
  tests/test_cpu_vec_math.py tests/test_cpu_bf16.py tests/test_errors.py}
if [ $# -eq 0 ]; then
  # shellcheck disable=SC2206  # a list of paths, split on whitespace
  set -- $CLANG_TESTS
fi
WORKERS=()
"$PY" -c "import xdist" 2>/dev/null && WORKERS=(-n "$(nproc)")
say "running the tests against the clang build: $*"
# From $SRC, whose varlen_rnn/ holds the clang build (the tests import the package found first).
cd "$SRC"
PYTHONPATH="$SRC" "$PY" -m pytest -p no:cacheprovider -q -rfE "${WORKERS[@]}" "$@"
say "done"
