#!/usr/bin/env bash
# varlen_rnn's CPU build for ARM Linux (aarch64), run: built with Debian's cross compiler against
# PyPI's torch for aarch64, and its tests run by an aarch64 Python under QEMU's user-mode
# emulation, on this x86 machine. The portable build (no AVX-512, AVX2 or AMX kernels: ATen's
# BLAS/oneDNN take the products, the compiler vectorizes the gate passes for NEON) is otherwise
# never run: no ARM machine is lent here. QEMU runs the instructions, not an ARM core's timing or
# its weaker memory ordering (the emulated threads run on x86's), so this checks results, not
# speed or races.
#
#   bash scripts/check_aarch64.sh [pytest arguments]   # default: ARM_TESTS below
#
# Needs Debian (bookworm: its Python 3.11 for arm64), root for apt, and the network to PyPI and
# Debian. What it sets up lives in ARM_WORK (default .aarch64, ignored by git) and is reused:
#   root/   arm64 Debian packages unpacked (libc, Python 3.11 and its headers), QEMU's -L prefix
#   site/   torch for aarch64 (TORCH_SPEC, default torch==2.14.1) and the test dependencies
#   stubs/  empty stand-ins for the CUDA libraries that torch's aarch64 wheel (a CUDA build)
#           links against, instead of NVIDIA's 3 GB of wheels (scripts/aarch64_stubs.py)
#   src/    a copy of the tracked files with the aarch64 extension built in varlen_rnn/
# Tests that cannot run in this harness are deselected, each with its reason (DESELECT below).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
WORK=${ARM_WORK:-.aarch64}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
ROOT=$WORK/root SITE=$WORK/site STUBS=$WORK/stubs SRC=$WORK/src
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
HOST_PY=${PYTHON:-python3}
start=$(date +%s)
say() { echo "== [$(($(date +%s) - start)) s] $*"; }
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

# ---------------------------------------------------------------- the emulator and the compiler
if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-g++-12 >/dev/null; then
  say "installing qemu-user and the aarch64 cross compiler"
  apt_install qemu-user g++-12-aarch64-linux-gnu
fi

# ---------------------------------------------------------------- an aarch64 Python 3.11
if [ ! -x "$ROOT/usr/bin/python3.11" ]; then
  say "unpacking Debian's arm64 Python 3.11 into $ROOT"
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
    apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
  fi
  debs=$(mktemp -d)
  pkgs=()
  for p in libc6 libgcc-s1 libstdc++6 libgomp1 zlib1g libexpat1 libffi8 libssl3 libbz2-1.0 \
    liblzma5 libsqlite3-0 libncursesw6 libtinfo6 libreadline8 libuuid1 libcrypt1 libnsl2 \
    libtirpc3 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2 libkeyutils1 \
    libdb5.3 libgdbm6 python3.11-minimal libpython3.11-minimal libpython3.11-stdlib \
    libpython3.11-dev; do
    pkgs+=("$p:arm64")
  done
  download() { (cd "$debs" && apt-get download -q "${pkgs[@]}" >/dev/null 2>&1); }
  download || { apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null && download; }
  for d in "$debs"/*.deb; do dpkg -x "$d" "$ROOT"; done
  rm -rf "$debs"
  # QEMU opens an absolute path under its -L prefix first, where one exists there. torch's CPU
  # detection (cpuinfo, oneDNN's xbyak_aarch64) reads /proc/cpuinfo and each core's MIDR_EL1 and
  # crashes on the x86 host's: two Neoverse N1 cores in their place.
  mkdir -p "$ROOT/proc"
  : >"$ROOT/proc/cpuinfo"
  for c in 0 1; do
    printf 'processor\t: %d\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n' "$c" >>"$ROOT/proc/cpuinfo"
    mkdir -p "$ROOT/sys/devices/system/cpu/cpu$c/regs/identification"
    echo 0x00000000410fd0c1 >"$ROOT/sys/devices/system/cpu/cpu$c/regs/identification/midr_el1"
  done
fi
export QEMU_LD_PREFIX=$ROOT
PY=(qemu-aarch64 "$ROOT/usr/bin/python3.11")
# A test that starts Python again (sys.executable: the aarch64 binary) needs the kernel to hand
# aarch64 programs to QEMU (binfmt_misc), as Debian's qemu-user registers them where systemd runs.
# Registered here when it can be (root); else those tests fail and the rest run in one process.
BINFMT=/proc/sys/fs/binfmt_misc
if [ ! -e "$BINFMT/qemu-aarch64" ]; then
  { [ -e "$BINFMT/register" ] || mount -t binfmt_misc binfmt_misc "$BINFMT"; } 2>/dev/null || true
  cat /usr/lib/binfmt.d/qemu-aarch64.conf >"$BINFMT/register" 2>/dev/null || true
fi
WORKERS=()
if [ -e "$BINFMT/qemu-aarch64" ]; then
  WORKERS=(-n "${ARM_WORKERS:-$(nproc)}")
else
  echo "!! aarch64 programs are not registered with binfmt_misc: tests that start Python fail"
fi

# ---------------------------------------------------------------- torch for aarch64
PLATFORMS=()
for t in manylinux_2_17 manylinux_2_24 manylinux_2_26 manylinux_2_27 manylinux_2_28 manylinux2014; do
  PLATFORMS+=(--platform "${t}_aarch64")
done
# torch's own dependencies but NVIDIA's, and the tests' (setuptools and ninja: torch.compile's
# C++ and the helper extensions some tests compile).
DEPS='filelock typing-extensions>=4.10.0 sympy networkx jinja2 fsspec setuptools ninja numpy pytest
  pytest-xdist hypothesis expecttest'
if [ ! -f "$SITE/.installed" ] || [ "$(cat "$SITE/.installed")" != "$TORCH_SPEC $DEPS" ]; then
  say "installing $TORCH_SPEC for aarch64 and the test dependencies into $SITE"
  rm -rf "$SITE"
  pip_arm=("$HOST_PY" -m pip install -q --disable-pip-version-check --target "$SITE"
    "${PLATFORMS[@]}" --only-binary=:all: --python-version 3.11 --implementation cp)
  # torch without its CUDA dependencies (NVIDIA's wheels): the stubs stand in for them.
  "${pip_arm[@]}" --no-deps "$TORCH_SPEC"
  # shellcheck disable=SC2086
  "${pip_arm[@]}" --upgrade $DEPS
  echo "$TORCH_SPEC $DEPS" >"$SITE/.installed"
fi
if [ ! -d "$STUBS" ]; then
  say "writing the CUDA libraries' stand-ins into $STUBS"
  "$HOST_PY" scripts/aarch64_stubs.py "$SITE/torch" "$STUBS" \
    --sysroot "$ROOT/lib/aarch64-linux-gnu" --sysroot "$ROOT/usr/lib/aarch64-linux-gnu" \
    --python "$ROOT/usr/bin/python3.11" --cc aarch64-linux-gnu-gcc-12 >/dev/null
fi
# CPATH: the arm64 pyconfig.h (Python.h includes <aarch64-linux-gnu/python3.11/pyconfig.h>) for
# what tests compile at run time with the cross compiler (torch.compile's C++, the CUDA
# emulation's helper extensions).
export LD_LIBRARY_PATH=$STUBS PYTHONPATH=$SRC:$SITE CPATH=$ROOT/usr/include
export CC=aarch64-linux-gnu-gcc-12 CXX=aarch64-linux-gnu-g++-12
"${PY[@]}" -c 'import platform, torch; print("aarch64 Python", platform.python_version(), platform.machine(), "torch", torch.__version__, "cuda available:", torch.cuda.is_available())'

# ---------------------------------------------------------------- the build
say "copying the tracked files to $SRC and building the CPU extension for aarch64"
rm -rf "$SRC"
copy_tracked "$REPO" "$SRC"
obj=$WORK/obj
rm -rf "$obj" && mkdir -p "$obj"
TV=$("${PY[@]}" -c 'import torch; print(torch.__version__)')
TI=$SITE/torch/include
# setup.py's flags for a CPU build on Linux, and what torch.utils.cpp_extension adds to them.
FLAGS=(-std=c++20 -O3 -g0 -fno-trapping-math -fopenmp -fPIC -DNDEBUG -Wall
  -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=1
  -I"$SRC/csrc" -I"$TI" -I"$TI/torch/csrc/api/include" -I"$ROOT/usr/include/python3.11"
  -I"$ROOT/usr/include")
export CXX FLAGS_STR="${FLAGS[*]}" OBJ=$obj
(cd "$SRC" && ls csrc/*.cpp csrc/cpu/*.cpp) | (cd "$SRC" && xargs -P "$(nproc)" -I{} sh -c \
  'o=$OBJ/$(echo {} | tr / _).o; $CXX $FLAGS_STR -c {} -o $o 2>$o.log || { cat $o.log >&2; exit 255; }')
"$CXX" -shared -fopenmp "$obj"/*.o -L"$SITE/torch/lib" -lc10 -ltorch -ltorch_cpu -ltorch_python \
  -Wl,--allow-shlib-undefined -o "$SRC/varlen_rnn/_C.cpython-311-aarch64-linux-gnu.so"
cat >"$SRC/varlen_rnn/_build_info.py" <<EOF
# Written by scripts/check_aarch64.sh (a cross build for aarch64).
TORCH_VERSION = '$TV'
WITH_CUDA = False
CUDA_LEFT_OUT = 'the aarch64 cross build is CPU-only'
EOF
(cd "$SRC" && "${PY[@]}" -c 'import varlen_rnn, platform; print("varlen_rnn imports on", platform.machine(), "from", varlen_rnn.__file__)')

# ---------------------------------------------------------------- the tests
# The CPU suite's core: parity with nn + packing for every cell and layout, gradients (gradcheck,
# double backward), ragged input, errors, the CPU loops' own tests (about 10 minutes on 2 cores;
# the whole suite, `bash scripts/check_aarch64.sh tests`, about 50).
ARM_TESTS=${ARM_TESTS:-tests/test_parity.py tests/test_gradcheck.py tests/test_cells_parity.py
  tests/test_errors.py tests/test_ragged.py tests/test_ragged_ops.py tests/test_higher_order.py
  tests/test_output_mask.py tests/test_small_calls.py tests/test_cpu_split_steps.py
  tests/test_cpu_split_backward.py tests/test_cpu_directions.py tests/test_cpu_row_groups.py
  tests/test_cpu_hprev_chunks.py tests/test_cpu_chunked_projection.py tests/test_cpu_vec_math.py
  tests/test_module.py tests/test_stress.py tests/test_recording.py tests/test_weights_per_call.py}
# What this harness cannot run, each with why:
DESELECT=(
  # the build is CPU-only here although torch has CUDA (it expects the CUDA kernels built)
  --deselect tests/test_build.py::test_the_cuda_kernels_are_built_where_they_can_be
  # torch's aarch64 build itself aborts when OMP_THREAD_LIMIT is under torch.set_num_threads:
  # a plain matrix product does (its BLAS), before any of our code runs
  --deselect "tests/test_cpu_directions.py::test_fewer_threads_than_asked[gru-3]"
  --deselect "tests/test_cpu_directions.py::test_fewer_threads_than_asked[lstm_proj-3]"
  # QEMU's user mode drops madvise, so no memory is ever advised to huge pages
  --deselect "tests/test_cpu_large_tensors.py::test_outputs_of_32_mib_and_more_are_advised_unless_turned_off"
)
say "pytest under QEMU (aarch64): ${*:-$ARM_TESTS}"
cd "$SRC"
if [ $# -eq 0 ]; then
  # shellcheck disable=SC2086
  set -- $ARM_TESTS
fi
"${PY[@]}" -m pytest -p no:cacheprovider -q -rfE "${WORKERS[@]}" "${DESELECT[@]}" "$@"
say "done"
