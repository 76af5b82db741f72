// A bfloat16 layer's weight gradients over few positions (cpu/bf16_gemm.h
// bf16_weight_grad): c = a^T b for a decoding step's backward, where ATen's
// bfloat16 GEMM costs far more than the arithmetic (K = n is 1 to a few).
#include "cpu/bf16_gemm.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

namespace varlen_rnn {
namespace cpu {

namespace {

#if defined(__x86_64__) && defined(__GNUC__)
#define VR_GRAD_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// A tile of c: rows g..g+R, columns j0..j0+cols (cols <= 16 kVecs):
// c[g + i, j] = bfloat16(sum_{r < n} a[r, g + i] b[r, j]), one float32 sum
// per element over the pairs of r in order, vdpbf16ps's exact products of
// pairs (the unit's own order within a pair, subnormals flushed), rounded
// once to nearest even by vcvtneps2bf16. a2 and b2: a and b with their
// pairs of rows interleaved (pair q, column g of a: the 32-bit word
// (a[2q, g], a[2q + 1, g]) at a2[q * lda + g], a zero row past n), pairs
// q < pairs. Each pair row of b2 (in L1) is loaded once for the R rows of
// the tile; a's R words of the pair are broadcast.
constexpr int kVecs = 4;
template <int R>
VR_GRAD_TARGET inline __attribute__((always_inline)) void grad_tile(int64_t pairs,
                                                                    const uint32_t* a2, int64_t lda,
                                                                    const uint32_t* b2, int64_t ldb,
                                                                    int64_t cols, at::BFloat16* c,
                                                                    int64_t ldc) {
  __mmask16 mask[kVecs];
#pragma GCC unroll 4
  for (int v = 0; v < kVecs; ++v) {
    mask[v] = static_cast<__mmask16>((1u << std::clamp<int64_t>(cols - 16 * v, 0, 16)) - 1);
  }
  __m512 acc[R][kVecs];
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) acc[i][v] = _mm512_setzero_ps();
  }
  for (int64_t q = 0; q < pairs; ++q) {
    __m512bh bv[kVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      bv[v] = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi32(mask[v], b2 + q * ldb + 16 * v));
    }
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const auto av =
          reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int32_t>(a2[q * lda + i])));
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], av, bv[v]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      const __m256bh h = _mm512_cvtneps_pbh(acc[i][v]);
      _mm256_mask_storeu_epi16(c + i * ldc + 16 * v, mask[v], reinterpret_cast<const __m256i&>(h));
    }
  }
}

// Rows g0..g1 of c, in tiles of 4 rows (16 sums, 4 vectors of b2 and a
// broadcast: 21 of the 32 registers) by 64 columns.
VR_GRAD_TARGET void grad_rows(int64_t g0, int64_t g1, int64_t pairs, const uint32_t* a2,
                              int64_t lda, const uint32_t* b2, int64_t ldb, int64_t P,
                              at::BFloat16* c, int64_t ldc) {
  constexpr int64_t kCols = 16 * kVecs;
  for (int64_t j0 = 0; j0 < P; j0 += kCols) {
    const int64_t cols = std::min(kCols, P - j0);
    int64_t g = g0;
    for (; g + 4 <= g1; g += 4) {
      grad_tile<4>(pairs, a2 + g, lda, b2 + j0, ldb, cols, c + g * ldc + j0, ldc);
    }
    for (; g < g1; ++g) grad_tile<1>(pairs, a2 + g, lda, b2 + j0, ldb, cols, c + g * ldc + j0, ldc);
  }
}

// Rows 2q and 2q + 1 of x (ld values apart; the second 0 past n) as one row
// of 32-bit words, for q < ceil(n / 2): out[q * cols + j] = (x[2q, j],
// x[2q + 1, j]).
void interleave_rows(int64_t n, const at::BFloat16* x, int64_t ld, int64_t cols, uint32_t* out) {
  for (int64_t q = 0; 2 * q < n; ++q) {
    const at::BFloat16* r0 = x + 2 * q * ld;
    for (int64_t j = 0; j < cols; ++j) {
      const uint32_t lo = r0[j].x, hi = 2 * q + 1 < n ? r0[ld + j].x : 0;
      out[q * cols + j] = lo | (hi << 16);
    }
  }
}
#endif

}  // namespace

bool bf16_weight_grad_for(int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx512bf16 = __builtin_cpu_supports("avx512bf16");
  return n <= kGradRows && avx512bf16;
#else
  (void)n;
  return false;
#endif
}

void bf16_weight_grad(int64_t n, const at::BFloat16* a, int64_t lda, int64_t G,
                      const at::BFloat16* b, int64_t ldb, int64_t P, at::BFloat16* c, int64_t ldc) {
  TORCH_INTERNAL_ASSERT(bf16_weight_grad_for(n), "bf16_weight_grad: n = ", n,
                        " rows, or no AVX512-BF16");
  if (G <= 0 || P <= 0) return;
#if defined(__x86_64__) && defined(__GNUC__)
  // a's and b's rows paired once (n G + n P values): what the tiles
  // broadcast and load.
  const int64_t pairs = (n + 1) / 2;
  const at::Tensor paired = at::empty({pairs, G + P}, at::TensorOptions().dtype(at::kInt));
  auto* a2 = reinterpret_cast<uint32_t*>(paired.data_ptr<int32_t>());
  uint32_t* b2 = a2 + pairs * G;
  interleave_rows(n, a, lda, G, a2);
  interleave_rows(n, b, ldb, P, b2);
  // Tasks of rows of c, about 64 KiB of bfloat16 results each.
  const int64_t grain = std::max<int64_t>(1, 32768 / P);
  at::parallel_for(0, G, grain, [&](int64_t g0, int64_t g1) {
    grad_rows(g0, g1, pairs, a2, G, b2, P, P, c, ldc);
  });
#else
  (void)a, (void)lda, (void)b, (void)ldb, (void)c, (void)ldc;
#endif
}

namespace {

// The test entry (ops.cpp's _bf16_weight_grad): a [n, G] and b [n, P]
// bfloat16, any row strides; c = a^T b computed inside a NaN-filled
// [G + 1, P + 5] bfloat16 buffer, so a write past [G, P] shows.
at::Tensor bf16_weight_grad_op(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && a.scalar_type() == at::kBFloat16 && a.stride(1) == 1,
              "_bf16_weight_grad: a must be a 2-D bfloat16 tensor [n, G] with unit column "
              "stride, got ",
              a.sizes(), " ", a.scalar_type(), " strides ", a.strides());
  TORCH_CHECK(b.dim() == 2 && b.scalar_type() == at::kBFloat16 && b.stride(1) == 1 &&
                  b.size(0) == a.size(0),
              "_bf16_weight_grad: b must be a bfloat16 [n, P] with n = a.size(0) = ", a.size(0),
              " and unit column stride, got ", b.sizes(), " ", b.scalar_type());
  const int64_t n = a.size(0), G = a.size(1), P = b.size(1);
  TORCH_CHECK(bf16_weight_grad_for(n), "_bf16_weight_grad: takes at most ", kGradRows,
              " rows on a CPU with AVX512-BF16, got ", n);
  at::Tensor out = at::full({G + 1, P + 5}, std::numeric_limits<float>::quiet_NaN(),
                            a.options().dtype(at::kBFloat16));
  bf16_weight_grad(n, a.const_data_ptr<at::BFloat16>(), std::max<int64_t>(a.stride(0), 1), G,
                   b.const_data_ptr<at::BFloat16>(), std::max<int64_t>(b.stride(0), 1), P,
                   out.data_ptr<at::BFloat16>(), P + 5);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(varlen_rnn, CPU, m) { m.impl("_bf16_weight_grad", &bf16_weight_grad_op); }

}  // namespace cpu
}  // namespace varlen_rnn
