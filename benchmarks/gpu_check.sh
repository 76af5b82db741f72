#!/usr/bin/env bash
# Everything a GPU session checks, in one command that returns what it learned even if a stage hangs.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [BUDGET_S]   # defaults: $OUT (else ./gpu_check_out), 540
#
# Stages, most valuable first; each runs under `timeout -k` with min(its own limit, what is left of
# the budget), and one that cannot get its minimum is "skipped (no time left)":
#   env -> build -> mma -> resources (cuobjdump) -> smoke -> tests_cuda -> probe -> memcheck
#   -> racecheck -> memory -> bench -> tests_rest -> cpu_bench16 -> cpu_bench1
# mma is the tensor-core wrapper's GPU unit test (tests/test_mma_gpu.py, seconds): a wrong fragment
# layout shows there first. If it does not pass, every later stage runs with
# VARLEN_RNN_TENSOR_CORES=0 (the exact CUDA-core kernels) and the summary says so at the top, so
# the rest of the run still measures and checks something sound.
# tests_cuda ends with test_cuda_device.py: what the CPU emulation cannot show (misaligned views,
# the exchange over every SM for hundreds of steps, persistent launches on busy streams finishing).
# The exchange between blocks (csrc/cuda/launch.h's Exchange: fp32 h on CUDA cores and TF32, 16-bit
# h on 16-bit tensor cores, padded shared-memory rows on tensor cores): tests_cuda's
# test_cuda_tensor_cores.py asserts which exchange each pass took, with rows that fill 16-byte
# vectors (H=40) and rows that do not (H=37); bench records it per case and mode (JSON "exchange",
# and in brackets after the case name in its table).
# OUT_DIR gets at most 8 files (what the device tool brings back): summary.md (also printed last),
# gpu_check_logs.tar.gz (every log, JSON and XML, rewritten after every stage, so a cut-off keeps
# all that finished), the benchmark's JSON/MD/PNG and the timing probe's JSON/MD. Logs live in a
# work folder outside OUT_DIR (GPU_CHECK_WORK, default a fresh temp folder).
#
# Environment: GPU_CHECK_BUDGET (when no second argument), GPU_CHECK_STAGES (a subset of the stages
# above), GPU_CHECK_LIMITS="probe=60 bench=120" (own limits), GPU_CHECK_PROBE_ARGS and
# GPU_CHECK_BENCH_ARGS (added to gpu_probe.py's and bench.py's arguments, e.g. "--impls
# persistent,fallback,auto,cudnn" or "--tf32 off"), PYTHON (default python3),
# VARLEN_RNN_COMMIT (the commit measured, for a copy without .git), MAX_JOBS, TORCH_CUDA_ARCH_LIST,
# GPU_CHECK_TEST_TIMEOUT (seconds a test, default 60), GPU_CHECK_TEST_WORKERS (pytest-xdist
# workers for the test stages where it is installed, default 4, 12 for tests_rest; 1: none),
# GPU_CHECK_PREBUILT (a prebuilt extension's folder, default build/gpu_prebuilt:
# benchmarks/gpu_prebuild.sh makes it on the development machine; the build stage uses it where
# it matches, else builds), GPU_CHECK_PREVIOUS_PROBE (a probe.json the probe compares its times with,
# default the first H200 run's; "" for none).
# Dry run on a CPU machine: GPU_CHECK_DRY_RUN=1 replaces every GPU stage by a cheap CPU stand-in
# through the same plumbing; GPU_CHECK_HANG=<stage> makes that stage hang (SIGTERM ignored, so
# only the kill ends it), GPU_CHECK_FAIL=<stage> makes it fail, GPU_CHECK_SANITIZER=refuse fakes
# compute-sanitizer's "Device not supported", GPU_CHECK_KILL_AFTER (default 5) is the grace in
# seconds between a stage's SIGTERM and its SIGKILL. tests/test_gpu_check.py runs these in CI.
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$REPO/gpu_check_out}}"
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"
BUDGET="${2:-${GPU_CHECK_BUDGET:-540}}"
DRY="${GPU_CHECK_DRY_RUN:-0}"
WORK="${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}"
mkdir -p "$WORK" && WORK="$(cd "$WORK" && pwd)"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
RESERVE=8      # seconds kept back for the kill grace, the summary and the archive
KILL_AFTER="${GPU_CHECK_KILL_AFTER:-5}"  # SIGKILL this long after a stage's SIGTERM
STAGES="${GPU_CHECK_STAGES:-env build mma resources smoke tests_cuda probe memcheck racecheck memory bench tests_rest cpu_bench16 cpu_bench1}"
KERNEL_REGEX='persistent_(forward|backward)_kernel|fallback_[a-z]+_step_kernel|lengths_prep_kernel'
PREBUILT="${GPU_CHECK_PREBUILT:-$REPO/build/gpu_prebuilt}"  # benchmarks/gpu_prebuild.sh's output
# shellcheck source=benchmarks/gpu_prebuilt.sh
. "$REPO/benchmarks/gpu_prebuilt.sh"
ARCHIVE="$OUT_DIR/gpu_check_logs.tar.gz"
TABLE="$WORK/stages.tsv"
: >"$TABLE"
START=$SECONDS
HAVE_GPU=0
nvidia-smi -L >/dev/null 2>&1 && HAVE_GPU=1
DEV=cuda
[ "$DRY" = 1 ] && DEV=cpu
BUILD_OK=1  # set to 0 by a build that fails; stages that need the extension are then skipped
TC_OFF=""   # why the later stages run with VARLEN_RNN_TENSOR_CORES=0 (empty: they do not)
COMMIT="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "${VARLEN_RNN_COMMIT:-unknown}")"
export PY REPO WORK DEV DRY KERNEL_REGEX PREBUILT PYTHONUNBUFFERED=1
# An in-place build wins over an installed package (the GPU machine has only the in-place one);
# every Python command runs from $WORK, so the source tree is never imported by accident.
# The sign of an in-place build is the compiled extension beside the sources (setup.py writes
# _build_info.py there for every build, pip installs included).
in_place() {
  compgen -G "$REPO/varlen_rnn/_C*.so" >/dev/null && export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  return 0
}
in_place
cd "$WORK" || exit 2

# ------------------------------------------------------------------------------------- stages
stage_env() {
  date -u +%Y-%m-%dT%H:%M:%SZ
  echo "commit $COMMIT; budget ${BUDGET}s; dry run $DRY; $(nproc) CPUs; $(uname -srm)"
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  nvcc --version 2>&1 | tail -2
  compute-sanitizer --version 2>&1 | head -2
  local driver
  driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)"
  "$PY" -c "
import platform, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU (CPU only)'
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'cudnn', torch.backends.cudnn.version(), 'tf32 cudnn', torch.backends.cudnn.allow_tf32,
      'tf32 matmul', torch.backends.cuda.matmul.allow_tf32)
print('KEY: %s, driver ${driver:-none}, torch %s, CUDA %s, commit $COMMIT' % (gpu, torch.__version__, torch.version.cuda))"
}

check_built() {  # the extension imports and registers its CUDA kernels (any kernels in a dry run)
  "$PY" -c "
import torch, varlen_rnn
ok = torch._C._dispatch_has_kernel_for_dispatch_key('varlen_rnn::gru_layer_forward', 'CUDA')
print('KEY: WITH_CUDA %s, CUDA kernels registered: %s (%s)' % (varlen_rnn.WITH_CUDA, ok, varlen_rnn.__file__))
raise SystemExit(0 if ok or '$DRY' == '1' else 1)"
}

# A prebuilt extension (benchmarks/gpu_prebuild.sh, carried to the GPU machine) is used when it was
# built from these sources for this Python and torch, and loads; otherwise the stage builds.
stage_build() {
  local why
  if [ "$DRY" = 1 ]; then
    if why="$(prebuilt_usable "$PREBUILT" "$REPO" "$PY")"; then
      echo "dry run: would use the prebuilt extension in $PREBUILT"
    else
      echo "dry run: no prebuilt extension ($why)"
    fi
    echo "dry run: would run MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 python3 setup.py build_ext --inplace"
    check_built
    return
  fi
  if why="$(prebuilt_usable "$PREBUILT" "$REPO" "$PY")"; then
    echo "the prebuilt extension in $PREBUILT (its build log below, for the resources stage)"
    cat "$PREBUILT/build.log"
    cp "$PREBUILT"/_C*.so "$PREBUILT/_build_info.py" "$REPO/varlen_rnn/"
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    if check_built; then
      echo "KEY: prebuilt extension used ($(cat "$PREBUILT/fingerprint")), no build here"
      return 0
    fi
    echo "the prebuilt extension does not load here: building"
    rm -f "$REPO"/varlen_rnn/_C*.so "$REPO/varlen_rnn/_build_info.py"
  else
    echo "no prebuilt extension used: $why"
  fi
  build_gpu_extension "$REPO" "$PY" || return 1
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  check_built
}

stage_resources() {
  if [ "$DRY" = 1 ]; then "$PY" "$REPO/benchmarks/gpu_resources.py" --self-test; return; fi
  local so
  so="$(ls "$REPO"/varlen_rnn/_C*.so 2>/dev/null | head -1)"
  [ -n "$so" ] || { echo "no varlen_rnn/_C*.so"; return 1; }
  cuobjdump --dump-resource-usage "$so" >"$WORK/cuobjdump.txt" || return 1
  "$PY" "$REPO/benchmarks/gpu_resources.py" "$WORK/cuobjdump.txt" --ptxas-log "$WORK/build.log"
}

stage_pytest() {  # NAME PYTEST_ARGS...: per-test timeout where pytest-timeout is installed
  local name=$1 extra=() rc
  shift
  if ! "$PY" -c "import expecttest" 2>/dev/null; then  # the GPU image lacks it (test_module_db.py)
    echo "expecttest not installed: tests/stand_ins/expecttest.py stands in"
    export PYTHONPATH="$REPO/tests/stand_ins${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    extra=(--timeout "${GPU_CHECK_TEST_TIMEOUT:-60}" --timeout-method thread)
  else
    echo "pytest-timeout not installed: no per-test timeout"
  fi
  # Workers (pytest-xdist, in the GPU image): the tests' child processes and compiles overlap,
  # and a test past its timeout ends only its worker (the thread method's os._exit), which
  # xdist replaces, not the whole stage with its summary and XML. -v names each test as it
  # ends, so a stage cut off by its own limit still says which ran and which failed.
  if [ "${GPU_CHECK_TEST_WORKERS:-4}" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null; then
    extra+=(-n "${GPU_CHECK_TEST_WORKERS:-4}")
  fi
  # A file that cannot be imported there (a module the image lacks) is an error of its own, not
  # the end of the stage: the other files' tests still run.
  # SIGINT some seconds before the stage's own limit: pytest then stops, prints its summary
  # (the failures' messages, -rfE) and writes its XML, which the stage's SIGTERM would lose
  # (the H200's first run: tests_rest cut off with 48 failures named and none explained).
  local cut=() lim=$((${STAGE_LIMIT:-0} - 12))
  [ "$lim" -ge 20 ] && cut=(timeout -s INT -k 8 "$lim")
  "${cut[@]}" "$PY" -m pytest -v -rfEs -p no:cacheprovider --continue-on-collection-errors \
    --rootdir "$REPO" --junitxml "$WORK/$name.xml" "${extra[@]}" "$@"
  rc=$?
  [ $rc = 5 ] && { echo "KEY: no tests selected"; return 0; }
  if [ $rc = 124 ] || [ $rc = 137 ]; then
    echo "CUT OFF: pytest interrupted after ${lim}s, near the stage's limit (its summary above)"
  fi
  return $rc
}

stage_mma() {  # the tensor-core wrapper on the GPU; on a GPU, a run where no test passed fails
  # one process: its module fixture compiles the wrapper's test kernels once
  GPU_CHECK_TEST_WORKERS=1 stage_pytest mma "$REPO/tests/test_mma_gpu.py" -ra || return $?
  [ "$DRY" = 1 ] && return 0
  "$PY" - "$WORK/mma.xml" <<'PYEOF'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
n = {k: sum(int(s.get(k, 0)) for s in root.iter("testsuite")) for k in ("tests", "failures", "errors", "skipped")}
passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
if passed == 0:
    print(f"KEY: no wrapper test passed ({n['skipped']} skipped): the tensor-core layout is unverified")
    sys.exit(1)
PYEOF
}

# What csrc/cuda/paths.cuh says when VARLEN_RNN_CUDA_PATH=persistent meets a refused launch.
# Exported: the stages run in child shells, where an unexported name reads as empty, and
# `grep -q ""` matches every log (the H200's first run reported both persistent kernels "not
# run" under the sanitizers that had run them with 0 errors).
COOPERATIVE_REFUSED="persistent kernel cannot run: the driver refused its cooperative launch"
export COOPERATIVE_REFUSED
fake_sanitizer() {  # dry run: compute-sanitizer's output around the same command
  while [ $# -gt 0 ] && [ "$1" != "$PY" ]; do shift; done
  if [ "${GPU_CHECK_SANITIZER:-}" = refuse ]; then
    echo "========= Error: Device not supported"; return 1
  fi
  if [ "${GPU_CHECK_SANITIZER:-}" = refuse-cooperative ] && [ "$VARLEN_RNN_CUDA_PATH" = persistent ]; then
    echo "RuntimeError: $COOPERATIVE_REFUSED"; echo "========= ERROR SUMMARY: 0 errors"; return 1
  fi
  "$@"
  local rc=$?
  echo "========= ERROR SUMMARY: 0 errors"
  return $rc
}

stage_sanitize() {  # memcheck | racecheck: our kernels only, float32 and bfloat16, each path
  local tool=$1 san=(compute-sanitizer) filt=() extra=() per notes=() refused=0 bad=0 path log rc s
  # Tensor cores forced where the dtype allows them (bfloat16; float32 stays on the exact kernel,
  # TF32 being off in gpu_smoke's children), so both persistent kernels are checked, the 16-bit
  # one with its 32-bit shared-memory fragment loads included; a failed mma stage's
  # VARLEN_RNN_TENSOR_CORES=0 still wins.
  local tc="${VARLEN_RNN_TENSOR_CORES:-1}"
  # memcheck: the exact float32 forward through the tagged exchange (its 64-bit words are global
  # accesses the first run's memcheck of the barrier did not see); racecheck keeps the barrier.
  local exchange=barrier
  [ "$tool" = memcheck ] && exchange=tagged
  per=$(((STAGE_LIMIT - 2) / 2))
  [ "$DRY" = 1 ] && san=(fake_sanitizer)
  if [ "$DRY" != 1 ] && compute-sanitizer --help 2>&1 | grep -q -- --kernel-regex; then
    filt=(--kernel-regex "kns=$KERNEL_REGEX")
  fi
  [ "$tool" = memcheck ] && extra=(--leak-check no)
  for path in persistent fallback; do
    log="$WORK/${tool}_$path.log"
    # The inner timeout keeps the second path's share even if the first one hangs.
    VARLEN_RNN_CUDA_PATH=$path VARLEN_RNN_TENSOR_CORES=$tc VARLEN_RNN_EXCHANGE=$exchange \
      timeout -k 3 "$per" bash -c '"$@"' _ "${san[@]}" --tool "$tool" \
      "${filt[@]}" "${extra[@]}" --error-exitcode 3 --print-limit 20 "$PY" "$REPO/benchmarks/gpu_smoke.py" \
      --child "$path" --device "$DEV" --sizes "$([ "$DRY" = 1 ] && echo tiny || echo sanitize)" \
      --dtypes float32,bfloat16 --no-graph --out "$WORK/${tool}_$path.pt" >"$log" 2>&1
    rc=$?
    if [ ${#filt[@]} -gt 0 ] && ! grep -q 'SUMMARY' "$log" && grep -qi 'kernel-regex\|unrecognized\|invalid value' "$log"; then
      echo "---- $path: the kernel filter was refused; checking every kernel instead"
      cp "$log" "$log.refused-filter.log"
      filt=()
      VARLEN_RNN_CUDA_PATH=$path VARLEN_RNN_TENSOR_CORES=$tc VARLEN_RNN_EXCHANGE=$exchange \
        timeout -k 3 "$per" compute-sanitizer --tool "$tool" "${extra[@]}" \
        --error-exitcode 3 --print-limit 20 "$PY" "$REPO/benchmarks/gpu_smoke.py" --child "$path" \
        --device "$DEV" --sizes sanitize --dtypes float32,bfloat16 --no-graph \
        --out "$WORK/${tool}_$path.pt" >"$log" 2>&1
      rc=$?
    fi
    echo "---- $path: exit $rc"
    tail -40 "$log"
    if grep -q "Device not supported" "$log"; then refused=$((refused + 1)); notes+=("$path refused"); continue; fi
    # The driver may refuse the persistent kernel's cooperative launch under the sanitizer (its
    # reserved resources): the kernel did not run, which is no finding about it.
    if [ "$path" = persistent ] && grep -q "$COOPERATIVE_REFUSED" "$log"; then
      notes+=("persistent: not run (the driver refused its cooperative launch under $tool)"); continue
    fi
    s="$(grep -aoE '(ERROR|RACECHECK) SUMMARY: .*' "$log" | tail -1)"
    case $rc in
      0) notes+=("$path: ${s:-no summary}") ;;
      124|137) notes+=("$path: timed out after ${per}s"); bad=1 ;;
      *) notes+=("$path: exit $rc, ${s:-no summary}"); bad=1 ;;
    esac
  done
  [ $refused = 2 ] && { echo "NOT RUN: compute-sanitizer refused the device (Device not supported)"; return 0; }
  s="$(printf '%s; ' "${notes[@]}")"
  echo "KEY: ${s%; }"
  return $bad
}

stage_bench() {  # bench | cpu_bench16 | cpu_bench1: results written as each case finishes
  local b="$REPO/benchmarks/bench.py" budget=$((STAGE_LIMIT - 45))
  [ $budget -lt 10 ] && budget=10
  case $1:$DRY in
    bench:1) "$PY" "$b" --preset quick --device cpu --limit 1 --rounds 1 --min-run-time 0.01 \
               --threads 1 --no-memory --out "$WORK/bench" ;;
    # shellcheck disable=SC2086  # extra arguments, split on purpose
    bench:*) "$PY" "$b" --preset gpu --device cuda --out "$WORK/bench" --time-budget $budget \
               ${GPU_CHECK_BENCH_ARGS:-} ;;
    cpu_bench*:1) "$PY" "$b" --preset quick --device cpu --limit 1 --rounds 1 --min-run-time 0.01 \
                    --threads 1 --no-memory --out "$WORK/$1" ;;
    # The GRU's three cases only: the first run's stages got 40 and 19 s, which ran 4 and 1 of
    # the preset's nine (all three cells).
    cpu_bench*) "$PY" "$b" --preset cpu-targets --cell gru --device cpu --threads "${1#cpu_bench}" \
                  --rounds 2 --min-run-time 0.2 --no-memory --time-budget $budget --out "$WORK/$1" ;;
  esac
}

stage_cmd() {  # the command line of a stage, quoted for bash -c
  local probe_extra=() rest=("$REPO/tests" --ignore="$REPO/tests/test_cuda.py"
                             --ignore="$REPO/tests/test_cuda_tensor_cores.py"
                             --ignore="$REPO/tests/test_cuda_ragged.py"
                             --ignore="$REPO/tests/test_cuda_cells.py"
                             --ignore="$REPO/tests/test_cuda_device.py"
                             --ignore="$REPO/tests/test_cuda_emulated.py"
                             --ignore="$REPO/tests/test_build.py")  # its spill check: stage resources
  local first=("$REPO/tests/test_autocast.py" "$REPO/tests/test_cells_autocast.py"
               "$REPO/tests/test_module_db.py" "$REPO/tests/test_recording.py"
               "$REPO/tests/test_valid_rows.py") f
  for f in "${first[@]}"; do rest+=(--ignore="$f"); done
  local memory_case=(--B 64 --T 256 --I 256 --H 256)
  local previous_probe=() prev="${GPU_CHECK_PREVIOUS_PROBE-$REPO/benchmarks/results/gpu_check_H200_20261204-122542/probe.json}"
  [ -n "$prev" ] && [ -f "$prev" ] && previous_probe=(--previous "$prev")
  [ "$DRY" = 1 ] && probe_extra=(--tiny --dtypes float32 --H 16) && rest=("$REPO/tests/test_autocast.py") \
    && memory_case=(--B 8 --T 16 --I 8 --H 8)
  case $1 in
    env|build|resources|mma) echo "stage_$1" ;;
    smoke) printf '%q ' "$PY" "$REPO/benchmarks/gpu_smoke.py" --device "$DEV" \
             --time-budget $((STAGE_LIMIT - 5)) --out "$WORK/smoke" ;;
    # With the CUDA files, the CUDA cases of the files whose fixes only a GPU verifies (the
    # autocast dtypes and the ReLU's seeds, the module tests, the recording node, the valid
    # rows of CPU lengths), ahead of tests_rest, which the first run's budget cut off.
    tests_cuda) printf '%q ' stage_pytest tests_cuda "$REPO/tests/test_cuda.py" \
                  "$REPO/tests/test_cuda_tensor_cores.py" "$REPO/tests/test_cuda_ragged.py" \
                  "$REPO/tests/test_cuda_cells.py" "$REPO/tests/test_cuda_device.py" \
                  "${first[@]}" -k cuda ;;
    # Against the last committed probe (GPU_CHECK_PREVIOUS_PROBE: another file, or "" for none).
    probe) printf '%q ' "$PY" "$REPO/benchmarks/gpu_probe.py" --device "$DEV" \
             --time-budget $((STAGE_LIMIT - 8)) --out "$WORK/probe" --commit "$COMMIT" \
             "${previous_probe[@]}" "${probe_extra[@]}"
           echo "${GPU_CHECK_PROBE_ARGS:-}" ;;
    memcheck|racecheck) echo "stage_sanitize $1" ;;
    # What a training step holds at its peak, ours and the recipe's (the first run measured ours
    # at 1.8x the recipe's at B=64 H=256; the emulation's host code holds about 1.1x).
    memory) printf '%q ' "$PY" "$REPO/benchmarks/bench_memory_peak.py" --device "$DEV" \
              "${memory_case[@]}" ;;
    bench|cpu_bench16|cpu_bench1) echo "stage_bench $1" ;;
    # More workers for the many small tests of the other files (the H200's second call: 12
    # workers ran 1232 of them in 96 s; the first call's 4 ran 530 in its 90 s).
    tests_rest) printf '%q ' GPU_CHECK_TEST_WORKERS="${GPU_CHECK_TEST_WORKERS:-12}" stage_pytest \
                  tests_rest "${rest[@]}" -k "cuda and not emulated" ;;
  esac
}
export -f stage_env check_built stage_build build_gpu_extension sources_fingerprint prebuilt_usable stage_resources \
  stage_pytest stage_mma fake_sanitizer stage_sanitize stage_bench
export COMMIT BUDGET

# ------------------------------------------------------------------------------ bookkeeping
source "$REPO/benchmarks/gpu_check_report.sh"

own_limit() {  # NAME DEFAULT: GPU_CHECK_LIMITS="name=seconds ..." overrides
  local kv
  for kv in ${GPU_CHECK_LIMITS:-}; do
    [ "${kv%%=*}" = "$1" ] && { echo "${kv#*=}"; return; }
  done
  echo "$2"
}

record() {  # NAME STATUS SECONDS NOTE: replaces the stage's row, then summary and archive
  grep -v "^$1"$'\t' "$TABLE" >"$TABLE.tmp"
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$TABLE.tmp"
  mv "$TABLE.tmp" "$TABLE"
  write_summary
  write_archive
}

run_stage() {  # NAME OWN_LIMIT MIN_SECONDS NEEDS(none|build|gpu)
  local name=$1 own min=$3 needs=$4 left lim log="$WORK/$1.log" t0 rc secs status note cmd
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  own="$(own_limit "$name" "$2")"
  left=$((BUDGET - (SECONDS - START) - RESERVE))
  if [ "$needs" = gpu ] && [ "$HAVE_GPU" = 0 ] && [ "$DRY" != 1 ]; then
    record "$name" "skipped (no GPU: nvidia-smi finds none)" 0 ""; return
  fi
  if [ "$needs" != none ] && [ "$BUILD_OK" = 0 ]; then record "$name" "skipped (build failed)" 0 ""; return; fi
  if [ "$left" -lt "$min" ]; then record "$name" "skipped (no time left: ${left}s, needs ${min}s)" 0 ""; return; fi
  lim=$own
  [ "$lim" -gt "$left" ] && lim=$left
  export STAGE_LIMIT=$lim
  cmd="$(stage_cmd "$name")"
  [ "${GPU_CHECK_FAIL:-}" = "$name" ] && cmd="echo simulated failure; exit 7"
  [ "${GPU_CHECK_HANG:-}" = "$name" ] && cmd="trap '' TERM; echo simulated hang, SIGTERM ignored; sleep 100000"
  record "$name" "running (limit ${lim}s)" 0 ""  # what a cut-off during this stage leaves behind
  echo "== $name (limit ${lim}s): $cmd"
  t0=$SECONDS
  # The first line of every log: the tensor-core knob the stage's processes inherit.
  timeout -k "$KILL_AFTER" "$lim" bash -c 'echo "VARLEN_RNN_TENSOR_CORES=${VARLEN_RNN_TENSOR_CORES-unset}"
    '"$cmd" >"$log" 2>&1 </dev/null
  rc=$?
  secs=$((SECONDS - t0))
  if [ $rc = 0 ]; then status=ok
  elif { [ $rc = 124 ] || [ $rc = 137 ]; } && [ $secs -ge "$lim" ]; then status="timed out (after ${lim}s)"
  elif grep -q '^CUT OFF: ' "$log"; then status="timed out (after ${secs}s, summary kept)"
  else status="failed (exit $rc)"; fi
  note="$(stage_note "$log")"
  if [ $rc = 0 ] && grep -q '^NOT RUN: ' "$log"; then
    status="not run ($(grep -m1 '^NOT RUN: ' "$log" | cut -c10-))" note=""
  fi
  [ "$name" = build ] && [ $rc != 0 ] && BUILD_OK=0
  [ "$name" = build ] && in_place
  if [ "$name" = mma ] && [ "$status" != ok ]; then
    TC_OFF="the tensor-core wrapper test (mma) $status"
    export VARLEN_RNN_TENSOR_CORES=0 TC_OFF
  fi
  collect "$name"
  record "$name" "$status" "$secs" "$note"
  echo "   $status (${secs}s) $note"
}

finish() {
  trap - TERM INT
  write_summary
  write_archive
  echo
  cat "$WORK/summary.md"
  grep -qE $'\t(failed|timed out|running)' "$TABLE" && exit 1
  exit 0
}
trap 'record interrupted "interrupted (signal)" 0 ""; finish' TERM INT

echo "gpu_check: out $OUT_DIR, work $WORK, budget ${BUDGET}s, dry run $DRY, GPU $HAVE_GPU"
run_stage env 30 5 none
run_stage build 300 30 none
run_stage mma 60 15 gpu
run_stage resources 20 5 gpu
run_stage smoke 60 15 gpu
run_stage tests_cuda 200 20 gpu
run_stage probe 120 20 gpu  # five of our paths and the recipe (the first run: 62 s with four)
run_stage memcheck 80 20 gpu
run_stage racecheck 80 20 gpu
run_stage memory 40 20 gpu  # before bench, which takes what its limit allows
run_stage bench 200 40 gpu
run_stage tests_rest 150 20 gpu
run_stage cpu_bench16 100 30 build
run_stage cpu_bench1 100 30 build
finish
