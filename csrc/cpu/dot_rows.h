// Rows of a against the rows of a weight as stored, on all threads:
// c[i, j] = sum_k a[i, k] w[j, k] for i < m, j < J; a [m, K] (lda), w [J, K]
// row-major (a torch weight, read in place: no packing, no transposed copy),
// c float32 (ldc). The products of a call of few steps, where packing the
// weight for a GEMM costs more than the steps' products (cpu/recurrence.h):
// - bfloat16 a and w: AVX512-BF16's dot products of pairs (vdpbf16ps), K
//   even (bf16_dot_rows, cpu/bf16_gemm.h);
// - float32: AVX-512 FMAs (f32_dot_rows, cpu/small_gemm.h).
// Written once for both (DotTraits): eight rows of w at a time, each with
// its own sum over k, a's row of k values loaded once for them; a task is a
// group of 8 rows of w, whose rows stay in L1 while a's rows pass them.
// Every c[i, j] is one sum in a fixed order (lanes of k, then the lanes'
// reduction), whatever m or the thread: deterministic.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace varlen_rnn {
namespace cpu {

#if defined(__x86_64__) && defined(__GNUC__)
#define VR_DOT_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))

// What differs between the element types: values of k per vector, the
// masked load of a vector of k and the multiply-add into float32 lanes.
template <typename T>
struct DotTraits;

template <>
struct DotTraits<at::BFloat16> {
  static constexpr int64_t kStep = 32;
  using Mask = __mmask32;
  using Vec = __m512bh;
  VR_DOT_TARGET static Vec load(Mask m, const at::BFloat16* p) {
    return reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(m, p));
  }
  VR_DOT_TARGET static __m512 madd(__m512 acc, Vec a, Vec w) { return _mm512_dpbf16_ps(acc, a, w); }
};

template <>
struct DotTraits<float> {
  static constexpr int64_t kStep = 16;
  using Mask = __mmask16;
  using Vec = __m512;
  VR_DOT_TARGET static Vec load(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  VR_DOT_TARGET static __m512 madd(__m512 acc, Vec a, Vec w) { return _mm512_fmadd_ps(a, w, acc); }
};

// c[i, j0 + q] for rows i0..i1 of a and q < rows (<= 8) of w from w8 (row
// j0): an independent sum per row of w (one chain would wait on each
// multiply-add's latency), a's kStep values of k loaded once for them, the
// tail of K masked; then their lane sums reduced together (halves added,
// three rounds of pairwise adds) and stored at once. kFull: rows is 8, known
// at compile time (the loop over w's rows unrolled, its sums in registers).
template <typename T, bool kFull>
VR_DOT_TARGET void dot_rows8(int64_t i0, int64_t i1, const T* a, int64_t lda, const T* w8,
                             int rows_given, int64_t K, float* c8, int64_t ldc) {
  using D = DotTraits<T>;
  using Mask = typename D::Mask;
  const int rows = kFull ? 8 : rows_given;
  const int64_t full = K / D::kStep * D::kStep;
  const Mask tail = static_cast<Mask>((uint64_t{1} << (K - full)) - 1);
  for (int64_t i = i0; i < i1; ++i) {
    const T* ai = a + i * lda;
    __m512 acc[8];
    for (int q = 0; q < 8; ++q) acc[q] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += D::kStep) {
      const Mask mask = k < full ? static_cast<Mask>(~Mask{0}) : tail;
      const typename D::Vec av = D::load(mask, ai + k);
      for (int q = 0; q < rows; ++q) acc[q] = D::madd(acc[q], av, D::load(mask, w8 + q * K + k));
    }
    __m256 h[8];
    for (int q = 0; q < 8; ++q) {
      h[q] = _mm256_add_ps(_mm512_castps512_ps256(acc[q]), _mm512_extractf32x8_ps(acc[q], 1));
    }
    const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
    const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(h[4], h[5]), _mm256_hadd_ps(h[6], h[7]));
    // t0 = [s0 s1 s2 s3 | s0' s1' s2' s3'] (low and high 128-bit halves' sums), t1 alike
    const __m256 sums =
        _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
    _mm256_mask_storeu_ps(c8 + i * ldc, static_cast<__mmask8>((1u << rows) - 1), sums);
  }
}

// The whole product on all threads (the caller checks the CPU runs it).
// Tasks of 8-row groups of w (~64 rows, 32 KiB of bfloat16 at K = 256).
template <typename T>
void dot_rows(int64_t m, const T* a, int64_t lda, const T* w, int64_t J, int64_t K, float* c,
              int64_t ldc) {
  if (m <= 0 || J <= 0) return;
  const int64_t groups = (J + 7) / 8;
  const int64_t grain = std::max<int64_t>(2, 2048 * 2 / sizeof(T) / std::max<int64_t>(K, 1));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t j0 = g * 8;
      if (J - j0 >= 8) {
        dot_rows8<T, true>(0, m, a, lda, w + j0 * K, 8, K, c + j0, ldc);
      } else {
        dot_rows8<T, false>(0, m, a, lda, w + j0 * K, static_cast<int>(J - j0), K, c + j0, ldc);
      }
    }
  });
}
#endif

}  // namespace cpu
}  // namespace varlen_rnn
