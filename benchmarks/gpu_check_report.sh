# Sourced by gpu_check.sh: the summary, the archive, and what each stage leaves in OUT_DIR.
# Uses WORK, OUT_DIR, TABLE, ARCHIVE, PY, REPO, DRY, COMMIT, BUDGET, START from gpu_check.sh.

SUMMARY_MAX=11000  # characters: the device tool returns only the last 12,000 of stdout

stage_note() {  # LOG: a stage's key numbers, from its last "KEY: " line, else pytest's, else its last line
  local k
  k="$(grep -a '^KEY: ' "$1" 2>/dev/null | tail -1)"
  [ -n "$k" ] && { echo "${k#KEY: }" | cut -c1-400; return; }
  k="$(grep -aE '[0-9]+ (passed|failed|skipped|errors?|deselected)' "$1" 2>/dev/null | tail -1 \
       | tr -d '=' | sed 's/^ *//; s/ *$//')"
  [ -n "$k" ] && { echo "$k"; return; }
  tail -1 "$1" 2>/dev/null | tr -d '|\r' | cut -c1-200
}

out_name() {  # a name the device tool accepts: letters, digits, . _ -
  basename "$1" | tr -c 'A-Za-z0-9._\n-' '_'
}

collect() {  # NAME: copy what a finished (or killed) stage produced into OUT_DIR
  local f js
  case $1 in
    bench)
      js="$(ls -t "$WORK"/bench/*.json 2>/dev/null | head -1)"
      [ -n "$js" ] || return 0
      if [ ! -f "${js%.json}.png" ]; then  # cut off before its last write: re-make md and png
        (cd "$REPO/benchmarks" && timeout 60 "$PY" bench_report.py "$js") >>"$WORK/bench.log" 2>&1
      fi
      for f in "${js%.json}".json "${js%.json}".md "${js%.json}".png; do
        [ -f "$f" ] && cp "$f" "$OUT_DIR/$(out_name "$f")"
      done ;;
    probe)
      for f in "$WORK"/probe/probe.md "$WORK"/probe/probe.json; do
        [ -f "$f" ] && cp "$f" "$OUT_DIR/$(out_name "$f")"
      done ;;
  esac
  return 0
}

section() {  # TITLE FILE MAX_LINES: a fenced block of the file's first lines, if it has any
  [ -s "$2" ] || return 0
  printf '\n## %s\n\n```\n' "$1"
  head -n "$3" "$2"
  printf '```\n'
}

write_summary() {
  local s="$WORK/summary.md" part="$WORK/summary.part" gpu
  gpu="$(stage_note "$WORK/env.log" 2>/dev/null)"
  [ "$DRY" = 1 ] && gpu="DRY RUN (CPU stand-ins for the GPU stages); $gpu"
  {
    echo "# gpu_check: ${gpu:-environment not recorded}"
    echo
    if [ -n "${TC_OFF:-}" ]; then
      echo "**TENSOR CORES OFF: $TC_OFF, so every later stage ran with VARLEN_RNN_TENSOR_CORES=0"
      echo "(the exact CUDA-core kernels). Their results say nothing about the tensor-core path.**"
      echo
    fi
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), commit $COMMIT, budget ${BUDGET}s, $((SECONDS - START))s used." \
      "Full logs: gpu_check_logs.tar.gz."
    echo
    echo "| stage | status | s | key numbers |"
    echo "|---|---|---:|---|"
    awk -F'\t' '{ printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4 }' "$TABLE"
  } >"$s.tmp"
  # Sections by value; each is added only while the whole stays under SUMMARY_MAX.
  local tmp="$WORK/sec.txt"
  {
    grep -ah '^FAIL \|^ERROR \|^child .*\(failed\|timed out\)' "$WORK/smoke.log" 2>/dev/null | head -25
  } >"$tmp"
  _add "Smoke failures" "$tmp" 30 "$s"
  local logs=("$WORK/mma.log" "$WORK/tests_cuda.log" "$WORK/tests_rest.log")
  grep -ahE '^(FAILED|ERROR) ' "${logs[@]}" 2>/dev/null | cut -c1-240 >"$tmp"
  # A stage cut off before pytest's summary: its -v lines ("... FAILED tests/x.py::t" with
  # workers, "tests/x.py::t FAILED" without).
  [ -s "$tmp" ] || grep -ahE ' (FAILED|ERROR)( |$)' "${logs[@]}" 2>/dev/null | grep -a '::' \
    | cut -c1-240 >"$tmp"
  _add "Failed tests" "$tmp" 30 "$s"
  grep -ahE '^=+ +(Invalid|Error|ERROR|Race|.*[Hh]azard)' "$WORK"/memcheck_*.log "$WORK"/racecheck_*.log \
    2>/dev/null | grep -v 'SUMMARY' | cut -c1-200 >"$tmp"
  _add "Sanitizer reports" "$tmp" 20 "$s"
  grep -a '^- H=' "$WORK/probe/probe.md" 2>/dev/null >"$tmp"
  _add "Timing probe: crossover B (persistent vs fallback)" "$tmp" 20 "$s"
  sed -n '/^wrote /,$p' "$WORK/bench.log" 2>/dev/null | tail -n +2 | grep -v '^KEY: ' >"$tmp"
  _add "Benchmark (bench.py --preset gpu)" "$tmp" 45 "$s"
  grep -a '^|' "$WORK/probe/probe.md" 2>/dev/null >"$tmp"
  _add "Timing probe (ms, medians of CUDA events)" "$tmp" 40 "$s"
  grep -a '^|' "$WORK/resources.log" 2>/dev/null >"$tmp"
  _add "Kernel resources (cuobjdump, ptxas -v)" "$tmp" 30 "$s"
  rm -f "$tmp" "$part"
  mv "$s.tmp" "$s"
  cp "$s" "$OUT_DIR/summary.md"
}

_add() {  # TITLE FILE MAX_LINES SUMMARY: append the section to SUMMARY.tmp if it still fits
  local part="$WORK/summary.part"
  section "$1" "$2" "$3" >"$part"
  [ -s "$part" ] || return 0
  if [ $(($(wc -c <"$4.tmp") + $(wc -c <"$part"))) -le $SUMMARY_MAX ]; then
    cat "$part" >>"$4.tmp"
  else
    printf '\n(section "%s" left out for length: see the archive)\n' "$1" >>"$4.tmp"
  fi
}

write_archive() {  # every log, JSON, XML and markdown of the work folder, replaced atomically
  tar -czf "$ARCHIVE.tmp" -C "$WORK" --exclude='*.pt' --exclude='*.tmp' --exclude='*.part' . 2>/dev/null \
    && mv -f "$ARCHIVE.tmp" "$ARCHIVE"
}
