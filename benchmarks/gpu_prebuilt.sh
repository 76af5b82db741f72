# Sourced by benchmarks/gpu_prebuild.sh, which builds the GPU machine's extension here, and by
# benchmarks/gpu_check.sh, whose build stage uses it there instead of building: how that
# extension is built, and what decides whether a prebuilt one is the one the sources on that
# machine would build.

# The GPU machine's build, in place in REPO with PYTHON: sm_90, ptxas -v in the log for the
# check's resources stage. One definition, so a prebuilt extension is the one the check builds.
build_gpu_extension() {  # REPO PYTHON
  (cd "$1" && MAX_JOBS="${MAX_JOBS:-$(nproc)}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
    VARLEN_RNN_CUDA="${VARLEN_RNN_CUDA:-1}" NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:--Xptxas=-v}" \
    "$2" setup.py build_ext --inplace)
}

# A hash of what the build reads: csrc/ and setup.py, file names and contents (16 hex digits).
sources_fingerprint() {  # REPO
  (cd "$1" && find csrc setup.py -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum |
    sha256sum | cut -c1-16)
}

# Succeeds when DIR holds an extension built from REPO's sources for PYTHON's version and
# torch; else prints why not.
prebuilt_usable() {  # DIR REPO PYTHON
  local dir=$1 repo=$2 py=$3 so want built have
  [ -d "$dir" ] || { echo "none at $dir"; return 1; }
  so="$(ls "$dir"/_C*.so 2>/dev/null | head -1)"
  [ -n "$so" ] && [ -f "$dir/_build_info.py" ] && [ -f "$dir/fingerprint" ] ||
    { echo "$dir lacks _C*.so, _build_info.py or fingerprint"; return 1; }
  [ "$(cat "$dir/fingerprint")" = "$(sources_fingerprint "$repo")" ] ||
    { echo "built from other sources (csrc/ or setup.py changed since)"; return 1; }
  want="_C$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
  [ "$(basename "$so")" = "$want" ] || { echo "built for another Python ($(basename "$so"), here $want)"; return 1; }
  built="$(sed -n "s/^TORCH_VERSION = '\(.*\)'$/\1/p" "$dir/_build_info.py")"
  have="$("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
  [ "$built" = "$have" ] || { echo "built against torch $built, here torch ${have:-none}"; return 1; }
  grep -q '^WITH_CUDA = True' "$dir/_build_info.py" || { echo "built without CUDA"; return 1; }
}
