#!/usr/bin/env bash
# The H200's second call (2026-12-04): the NaN's variants, the fixed tests, the messages of the
# failures tests_rest could not print, then the rest of tests_rest. Total under ~270 s.
set -u
export PYTHONUNBUFFERED=1
O="${OUT:-/tmp/run2}"; mkdir -p "$O"
cp build/gpu_prebuilt/_C*.so build/gpu_prebuilt/_build_info.py varlen_rnn/
python3 -c "import expecttest" 2>/dev/null || export PYTHONPATH="$PWD/tests/stand_ins"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
t0=$SECONDS
pt() {  # LIMIT FILE ARGS...: pytest, its summary printed on SIGINT too
  local lim=$1 f=$2; shift 2
  timeout -s INT -k 8 "$lim" python3 -m pytest -p no:cacheprovider -q -rfE --tb=short \
    --timeout 60 --timeout-method thread --rootdir "$PWD" "$@" >"$O/$f" 2>&1
  echo "== $f: rc $? at $((SECONDS - t0)) s: $(tail -1 "$O/$f")"
}
timeout -k 5 75 python3 benchmarks/results/gpu_check_H200_20261204-122542/run2/concurrent.py >"$O/concurrent.txt" 2>&1
echo "== concurrent at $((SECONDS - t0)) s"; cat "$O/concurrent.txt"
pt 40 fixed.txt -n 6 tests/test_cuda_device.py tests/test_cuda.py -k "graph_capture or tf32 or float32 or device"
pt 60 messages.txt -n 12 tests/test_autocast.py tests/test_cells_autocast.py tests/test_module_db.py -k "cuda and not emulated"
left=$((255 - (SECONDS - t0)))
[ $left -gt 20 ] && pt $left rest.txt -n 12 tests -k "cuda and not emulated" \
  --ignore=tests/test_cuda.py --ignore=tests/test_cuda_tensor_cores.py \
  --ignore=tests/test_cuda_ragged.py --ignore=tests/test_cuda_cells.py \
  --ignore=tests/test_cuda_device.py --ignore=tests/test_cuda_emulated.py \
  --ignore=tests/test_build.py --ignore=tests/test_autocast.py \
  --ignore=tests/test_cells_autocast.py --ignore=tests/test_module_db.py
grep -h -E "^(FAILED|ERROR)" "$O"/fixed.txt "$O"/messages.txt "$O"/rest.txt 2>/dev/null | cut -c1-300 | head -60
echo "== done at $((SECONDS - t0)) s"
