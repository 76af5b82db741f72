#!/usr/bin/env bash
# Everything a GPU session checks, in one command of under ~8 minutes:
#   build in place -> CUDA tests -> compute-sanitizer (memcheck, racecheck) on a small
#   forward+backward of both recurrence paths -> the GPU benchmark -> a short table.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default: $OUT, else ./gpu_check_out
#
# Each stage has its own timeout (shrunk to what is left of GPU_CHECK_BUDGET seconds, default
# 540) and a failed stage never stops the next. Logs, JUnit XML, bench JSON/markdown and
# summary.md land in OUT_DIR. Without nvidia-smi the GPU stages are skipped (a dry run of the
# rest). Knobs: PYTHON (default python, else python3), GPU_CHECK_STAGES (default
# "env build tests_cuda tests_rest memcheck racecheck bench bench_fallback"; the last one, the
# same grid forced onto the fallback path to tune the auto choice, runs only if time is left),
# MAX_JOBS, TORCH_CUDA_ARCH_LIST.
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$REPO/gpu_check_out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-$(command -v python || command -v python3)}"
BUDGET="${GPU_CHECK_BUDGET:-540}"
STAGES="${GPU_CHECK_STAGES:-env build tests_cuda tests_rest memcheck racecheck bench bench_fallback}"
export MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$REPO"
START=$SECONDS
HAVE_GPU=0
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && HAVE_GPU=1
[ "${GPU_CHECK_FORCE_GPU:-0}" = 1 ] && HAVE_GPU=1  # dry-run the GPU stages' plumbing
SUMMARY="$OUT_DIR/summary.tsv"
printf 'stage\tstatus\tseconds\tnote\n' >"$SUMMARY"

# run_stage NAME MAX_SECONDS NEEDS_GPU(0|1) COMMAND...: output to OUT_DIR/NAME.log
run_stage() {
  local name="$1" max="$2" gpu="$3"; shift 3
  local log="$OUT_DIR/$name.log" status note="" rc t0=$SECONDS
  if [[ " $STAGES " != *" $name "* ]]; then return; fi
  local left=$((BUDGET - (SECONDS - START) - 10))
  if [ "$gpu" = 1 ] && [ "$HAVE_GPU" = 0 ]; then
    printf '%s\tSKIP\t0\tno GPU (nvidia-smi absent)\n' "$name" >>"$SUMMARY"; return
  fi
  if [ "$left" -lt 15 ]; then
    printf '%s\tSKIP\t0\tout of budget\n' "$name" >>"$SUMMARY"; return
  fi
  [ "$max" -gt "$left" ] && max=$left
  echo "== $name (timeout ${max}s) -> $log"
  # bash -c so that stage_* shell functions (exported below) run under timeout too.
  timeout --kill-after=10 "$max" bash -c '"$@"' _ "$@" >"$log" 2>&1
  rc=$?
  case $rc in
    0) status=PASS ;;
    124|137) status=TIMEOUT; note="after ${max}s" ;;
    *) status=FAIL; note="exit $rc" ;;
  esac
  # pytest's last line ("3 failed, 40 passed ...") says more than an exit code.
  local pyt='[0-9]+ (passed|failed|errors?|skipped)[^=]* in [0-9.]+s'
  if grep -qE "$pyt" "$log"; then
    note="$(grep -E "$pyt" "$log" | tail -1 | tr -d '=' | sed 's/^ *//; s/ *$//')${note:+; $note}"
  fi
  if [ "$name" = memcheck ] || [ "$name" = racecheck ]; then
    local s; s="$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -2 | tr '\n' ' ')"
    note="${s:-no sanitizer summary}${note:+; $note}"
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$note" >>"$SUMMARY"
  echo "   $status ($((SECONDS - t0))s) $note"
}

stage_env() {
  date -u +%Y-%m-%dT%H:%M:%SZ
  git -C "$REPO" rev-parse HEAD 2>/dev/null
  git -C "$REPO" status --short 2>/dev/null | head -20
  nvidia-smi 2>/dev/null || echo "nvidia-smi: not available"
  nvcc --version 2>/dev/null | tail -2
  "$PY" - <<'EOF'
import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, sms=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                memory_gib=round(p.total_memory / 2**30, 1))
print(json.dumps(info, indent=1))
EOF
}

stage_build() {
  # In place: varlen_rnn/_C*.so and _build_info.py next to the sources (no network needed).
  "$PY" setup.py build_ext --inplace && "$PY" -c "import varlen_rnn, torch; \
print('WITH_CUDA', varlen_rnn.WITH_CUDA, 'CUDA kernel', \
torch._C._dispatch_has_kernel_for_dispatch_key('varlen_rnn::gru_layer_forward', 'CUDA'))"
}

# A small forward+backward of both paths, for compute-sanitizer: D=2, zero lengths, partial tiles,
# K chunks (VARLEN_RNN_PERSISTENT_MAX_KC) and all four dtypes; each path checked against the other.
SANITIZE_CASE='
import os, torch, varlen_rnn
torch.manual_seed(0)
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    gru = varlen_rnn.GRU(5, 40, 2, bidirectional=True, dtype=dtype, device="cuda")
    x = torch.randn(7, 11, 5, dtype=dtype, device="cuda", requires_grad=True)
    lengths = torch.tensor([7, 0, 3, 1, 7, 2, 5, 6, 0, 4, 7], device="cuda")
    res = {}
    for path in ("persistent", "fallback"):
        os.environ["VARLEN_RNN_CUDA_PATH"] = path
        os.environ["VARLEN_RNN_PERSISTENT_MAX_KC"] = "32"
        out, h = gru(x, lengths=lengths)
        g = torch.autograd.grad((out.float() ** 2).sum() + h.float().sum(), [x] + list(gru.parameters()))
        res[path] = [out, h, *g]
    torch.cuda.synchronize()
    err = max((a.double() - b.double()).abs().max().item() for a, b in zip(*res.values()))
    print(dtype, "persistent vs fallback max abs diff", err)
print("sanitize case done")
'

stage_sanitize() {  # $1: memcheck | racecheck
  local extra=()
  [ "$1" = memcheck ] && extra=(--leak-check no)
  compute-sanitizer --tool "$1" "${extra[@]}" --error-exitcode 3 --print-limit 20 \
    "$PY" -c "$SANITIZE_CASE"
}

stage_bench() {  # $1: auto | fallback (VARLEN_RNN_CUDA_PATH), $2: bench.py's time budget
  VARLEN_RNN_CUDA_PATH="$1" "$PY" benchmarks/bench.py --preset gpu --device cuda \
    --out "$OUT_DIR/bench${1/#auto/}" --time-budget "$2"
}

export -f stage_env stage_build stage_sanitize stage_bench
export PY REPO OUT_DIR SANITIZE_CASE
run_stage env 60 0 stage_env
run_stage build 300 0 stage_build
run_stage tests_cuda 200 1 "$PY" -m pytest tests/test_cuda.py -q -rs -p no:cacheprovider \
  --junitxml="$OUT_DIR/tests_cuda.xml"
run_stage tests_rest 120 1 "$PY" -m pytest tests -q -rs -p no:cacheprovider -k cuda \
  --ignore=tests/test_cuda.py --junitxml="$OUT_DIR/tests_rest.xml"
run_stage memcheck 100 1 stage_sanitize memcheck
run_stage racecheck 100 1 stage_sanitize racecheck
run_stage bench 200 1 stage_bench auto 150
run_stage bench_fallback 100 1 stage_bench fallback 60

{
  echo "# gpu_check $(date -u +%Y-%m-%d) on $( (nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo 'no GPU') | head -1)"
  echo
  echo "| stage | status | s | note |"
  echo "|---|---|---|---|"
  tail -n +2 "$SUMMARY" | awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}'
  ls "$OUT_DIR"/bench/*.md >/dev/null 2>&1 && { echo; cat "$OUT_DIR"/bench/*.md | head -60; }
  ls "$OUT_DIR"/benchfallback/*.md >/dev/null 2>&1 && {
    echo; echo "## fallback path (VARLEN_RNN_CUDA_PATH=fallback)"; cat "$OUT_DIR"/benchfallback/*.md | head -40; }
} >"$OUT_DIR/summary.md"
echo
if grep -q '^wrote ' "$OUT_DIR/bench.log" 2>/dev/null; then  # bench.py ends with its own short table
  echo "-- bench (full tables in $OUT_DIR/bench) --"
  sed -n '/^wrote /,$p' "$OUT_DIR/bench.log" | tail -n +2 | tail -30
  echo
fi
echo "results in $OUT_DIR (total $((SECONDS - START))s)"
column -t -s $'\t' "$SUMMARY" 2>/dev/null || cat "$SUMMARY"
! grep -qE $'\t(FAIL|TIMEOUT)\t' "$SUMMARY"
