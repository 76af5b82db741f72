// Helpers shared by the CPU step loops that run split by hidden units across
// a persistent thread team (cpu/split_steps.h forward, cpu/split_backward.h
// backward): the single-threaded BLAS call and the slices.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>

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

// VARLEN_RNN_CPU_STEPS=split or =gemm forces the step loops' choice (tests
// exercise both): 1 or 0, or -1 when unset (auto).
inline int forced_steps() {
  const char* env = std::getenv("VARLEN_RNN_CPU_STEPS");
  if (env != nullptr && std::strcmp(env, "split") == 0) return 1;
  if (env != nullptr && std::strcmp(env, "gemm") == 0) return 0;
  return -1;
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
