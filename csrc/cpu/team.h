// Helpers shared by the CPU step loops that run split by hidden units across
// a persistent thread team (cpu/split_steps.h forward, cpu/split_backward.h
// backward): where they run, the single-threaded BLAS call and the slices.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "layer.h"  // LayerDims

// The Fortran BLAS that torch's CPU build carries (MKL in the x86 wheels).
// Weak: where a build lacks it, the split loop is not used (blas_available).
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*, const int*)
    __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
}

namespace varlen_rnn {
namespace cpu {

// Row-major c[m, n] (ldc) = a[m, k] (lda) b[k, n] (ldb) + beta c, one thread.
inline void gemm_rm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                    int64_t ldb, float* c, int64_t ldc, float beta = 0) {
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const float one = 1;
  sgemm_("N", "N", &M, &N, &K, &one, b, &la, a, &lb, &beta, c, &lc);
}
inline void gemm_rm(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b,
                    int64_t ldb, double* c, int64_t ldc, double beta = 0) {
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const double one = 1;
  dgemm_("N", "N", &M, &N, &K, &one, b, &la, a, &lb, &beta, c, &lc);
}

inline bool blas_available() {
#if defined(_OPENMP)
  return sgemm_ != nullptr && dgemm_ != nullptr;
#else
  return false;
#endif
}

// The one place the step loops (forward and backward) are chosen.
// VARLEN_RNN_CPU_STEPS=split or =gemm forces both (tests exercise both);
// otherwise (auto) the split loops run with 2+ threads at H >= 256 or B <= 32.
// Measured on the 2-core Xeon, split vs per-step GEMM loop:
// - forward (float32 inference): 1.21x at B=16 H=512, 1.02x at B=64 H=256,
//   1.20x at B=16 H=128, 1.33x at B=32 H=64; at B >= 128 with H = 128 the two
//   tie (0.97-1.01x): there the per-step BLAS call already keeps both cores
//   busy;
// - backward (float32 training step, machine shared with other jobs at load
//   ~4, so a guide only, min of 15-25 interleaved repeats): GRU 1.25x at B=64
//   H=256, 1.29x at B=16 H=512, 1.45x at B=16 H=128, 1.01x at B=32 H=64; LSTM
//   1.20x / 1.11x and RNN 2.4x / 1.39x at the first two; the projected LSTM
//   (B=64 H=256 P=128) 1.11x; 0.95x at B=128 H=128 (2 layers, bidirectional)
//   and 1.02x at B=64 H=128.
inline bool use_split_loops(const LayerDims& dims) {
  if (!blas_available() || at::in_parallel_region()) return false;
  const char* env = std::getenv("VARLEN_RNN_CPU_STEPS");
  if (env != nullptr && std::strcmp(env, "split") == 0) return true;
  if (env != nullptr && std::strcmp(env, "gemm") == 0) return false;
  return at::get_num_threads() >= 2 && (dims.H >= 256 || dims.B <= 32);
}

// How many slices of H units a split loop cuts: as many as threads, fewer if
// H has fewer 16-unit blocks.
inline int64_t team_parts(int64_t H) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (H + 15) / 16));
}

// [lo, hi) of part k of n parts of `total`, cut at multiples of 16 (one
// AVX-512 vector of floats) so each slice's gate pass vectorizes fully.
inline std::pair<int64_t, int64_t> slice_of(int64_t total, int64_t parts, int64_t k) {
  const int64_t blocks = (total + 15) / 16;
  const int64_t b0 = blocks * k / parts, b1 = blocks * (k + 1) / parts;
  return {std::min(total, b0 * 16), std::min(total, b1 * 16)};
}

}  // namespace cpu
}  // namespace varlen_rnn
